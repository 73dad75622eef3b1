"""The latents of a post-hoc SAE as analysis units (`topk_ds.analysis.units.Units`): unit l:i is latent i
of the SAE trained on the residual stream after block l (the output of `model.model.layers[l]`: for a
residual-site model, what a TopK layer there sparsifies)."""

import contextlib
from pathlib import Path

import torch

from ..analysis.units import Units, model_fingerprint, recording, weights_hash
from ..errors import UserError
from . import library


def sae_fingerprint(saes: dict) -> dict:
    """The settings of SAEs {layer: SAE} and a hash of their weights."""
    weights = weights_hash((f"{l}.{name}", p) for l, sae in saes.items() for name, p in sae.state_dict().items())
    return {"config": library.config_of(next(iter(saes.values()))), "layers": sorted(saes), "weights": weights}


class Latents(Units):
    name = "latent"

    def __init__(self, model, sae_dir):
        self.model, self.sae_dir = model, Path(sae_dir)
        self.trained = library.read_record(sae_dir)
        t = model.model
        n, D = t.cfg.n_layers, t.cfg.dim
        for l in self.trained["layers"]:
            if not 0 <= l < n:
                raise UserError(f"the SAE in {sae_dir} reads layer {l}, which this model does not have (layers 0..{n - 1})")
        self.saes = {l: sae.to(t.norm.weight.device) for l, sae in library.load(sae_dir).items()}
        widths = {sae.num_latents for sae in self.saes.values()}
        for l, sae in self.saes.items():
            if sae.d_in != D:
                raise UserError(f"the SAE in {sae_dir} reads {sae.d_in}-wide residual streams (layer {l}); "
                                f"this model's is {D} wide: it was trained on another model")
        if len(widths) != 1:
            raise UserError(f"the SAEs in {sae_dir} have different widths ({sorted(widths)}); train them together")
        self.layers = sorted(self.saes)
        self.width = widths.pop()
        self.description = (f"latents of the SAE in {sae_dir} ({self.width} latents, k={self.trained['k']}, "
                            f"trained by {self.trained['library']})")
        self.blocks = t.layers

    def kind(self, layer: int) -> str:
        return "sae"

    def sparsity(self, layer: int) -> int | None:
        return self.saes[layer].cfg.k

    def record(self, layers: list[int], fn):
        return recording(self.blocks, layers, fn, lambda l, out: library.encode(self.saes[l], out))

    @contextlib.contextmanager
    def _on_output(self, layer: int, change):
        """While active, block `layer`'s output x becomes change(x) at every position (KV cache included: each
        generated token passes through the block)."""
        handle = self.blocks[layer].register_forward_hook(lambda module, args, out: change(out))
        try:
            yield
        finally:
            handle.remove()

    def steered(self, layer: int, index: int, offset: float):
        """offset * W_dec[index] added to the residual stream after block `layer`: what the latent at activation
        `offset` adds to the SAE's reconstruction."""
        direction = library.decoder(self.saes[layer])[index]
        return self._on_output(layer, lambda x: x + (offset * direction).to(x.dtype))

    def reconstructed(self, layer: int):
        return self._on_output(layer, lambda x: library.reconstruct(self.saes[layer], x))

    def directions(self, layer: int) -> torch.Tensor:
        return library.decoder(self.saes[layer])

    def fingerprint(self) -> dict:
        return model_fingerprint(self.model) | {"sae": sae_fingerprint(self.saes)}

    def extra_training(self) -> dict:
        r = self.trained
        return {"seconds": r["seconds"], "flops": r["flops"], "tokens": r["tokens"], "what": f"SAE training ({r['library']})"}

    def retrain(self, model, tokenizer, out, seed_offset: int = 0) -> "Latents":
        """An SAE with this one's settings and tokens trained on `model` (another checkpoint), with its seed plus
        `seed_offset`."""
        from .train import train_like

        train_like(self.trained, model, tokenizer, out, seed=self.trained["seed"] + seed_offset)
        return Latents(model, out)
