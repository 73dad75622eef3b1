"""Units: what the analysis studies. A unit is one coordinate of a code read at a layer: a neuron of the
model itself (`Neurons`: entry i of the TopK site's output, `l:i`), or a latent of a post-hoc sparse
autoencoder trained on that layer (`topk_ds.sae.Latents`). Statistics, entropies, reports, steering,
tracing, the browser and the comparison ask a `Units` for activations, directions and interventions,
and never branch on which kind it is.

    units.layers                   layers that have units, and units.width units per layer
    units.kind(l)                  "topk" | "dense" | "sae": what the code at layer l is
    units.sparsity(l)              k when a token has at most k non-zero units there (else None)
    units.record(layers, fn)       while active, every forward calls fn(l, acts (B, T, width)) for each
                                   of `layers` and stops after the last of them (no LM head)
    units.steered(l, i, c)         while active, unit l:i is pushed by c at every position
    units.directions(l)            (width, dim) the residual-stream direction each unit writes
    units.reconstructed(l)         while active, layer l's stream is replaced by what the units' code
                                   reconstructs of it (the model's own neurons: the stream itself)
    units.fingerprint()            what identifies these units (model weights, SAE weights, alpha)
    units.description              a phrase for reports ("TopK LM neurons", "latents of the SAE in ...")
    units.extra_training()         what the units cost beyond training the model (seconds, FLOPs, tokens)
    units.retrain(model, tok, out, seed_offset)  the same kind of units on another model (another checkpoint
                                   of the run), or from another seed; None where that means training another model
"""

import contextlib
import hashlib
from dataclasses import asdict

import torch

from ..errors import UserError
from ..model.topk import TopK


class StopForward(Exception):
    """Raised by the hook of the last recorded layer: the rest of the model (and the LM head) is not needed."""


def run_until_recorded(model, tokens: torch.Tensor) -> None:
    """Run the bare Transformer of `model` on tokens (B, T) while a `record` is active."""
    try:
        model.model(tokens)
    except StopForward:
        pass


def weights_hash(tensors) -> str:
    """A hash of named tensors [(name, tensor)] over names, shapes and up to 65,536 evenly spaced values of
    every tensor (fast at any size), rounded to bf16 so that the same weights loaded in fp32 or bf16, on any
    device, have one hash."""
    h = hashlib.sha256()
    for name, p in sorted(tensors, key=lambda item: item[0]):
        flat = p.detach().reshape(-1)
        h.update(f"{name}{tuple(p.shape)}".encode())
        h.update(flat[::max(1, flat.numel() // 65536)].to(torch.bfloat16).cpu().view(torch.int16).numpy().tobytes())
    return h.hexdigest()[:20]


def model_fingerprint(model) -> dict:
    """A model's config, alpha, step and a hash of its weights."""
    t = model.model
    alphas = {float(m.alpha) for m in t.topk_modules()}
    return {"config": {"model": asdict(t.cfg), "topk": asdict(t.topk)}, "alpha": max(alphas, default=0.0),
            "train_step": getattr(model.config, "train_step", None), "weights": weights_hash(t.state_dict().items())}


@contextlib.contextmanager
def recording(modules, layers: list[int], fn, read=lambda l, out: out):
    """While active, every forward calls fn(l, read(l, output of modules[l])) for each of `layers`, and stops
    after the last of them."""
    last = max(layers)

    def hook(l):
        def call(module, args, out):
            fn(l, read(l, out))
            if l == last:
                raise StopForward
        return call

    handles = [modules[l].register_forward_hook(hook(l)) for l in layers]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def check_layers(layers, available: list[int], n_layers: int) -> list[int]:
    """`layers` (None or empty: all available ones), sorted, each checked."""
    layers = list(available) if not layers else sorted(set(layers))
    for l in layers:
        if not 0 <= l < n_layers:
            raise UserError(f"layer {l} does not exist: the model has layers 0..{n_layers - 1}")
        if l not in available:
            raise UserError(f"layer {l} has no units here (units at layers {', '.join(map(str, available))})")
    return layers


def check_unit(layer: int | None, index: int, n_layers: int, width: int, name: str = "neuron") -> None:
    """Unit layer:index (layer None: the index alone) of a model with `n_layers` layers of `width` units."""
    if layer is not None:
        check_layers([layer], list(range(n_layers)), n_layers)
    if not 0 <= index < width:
        raise UserError(f"{name} index {index} is out of range: each layer has {name}s 0..{width - 1}")


class Units:
    """The interface (see the module docstring); `Neurons` and `topk_ds.sae.Latents` implement it."""

    name = "units"  # how a unit is called in messages: "neuron", "latent"
    model = None  # the TopKLlamaForCausalLM the units are read from
    layers: list[int] = []
    width: int = 0

    def kind(self, layer: int) -> str:
        raise NotImplementedError

    def sparsity(self, layer: int) -> int | None:
        raise NotImplementedError

    def record(self, layers: list[int], fn):
        raise NotImplementedError

    def steered(self, layer: int, index: int, offset: float):
        raise NotImplementedError

    def directions(self, layer: int) -> torch.Tensor:
        raise NotImplementedError

    def reconstructed(self, layer: int):
        raise NotImplementedError

    def fingerprint(self) -> dict:
        raise NotImplementedError

    description = ""

    def extra_training(self) -> dict:
        raise NotImplementedError

    def retrain(self, model, tokenizer, out, seed_offset: int = 0) -> "Units | None":
        raise NotImplementedError

    def check_layers(self, layers) -> list[int]:
        return check_layers(layers, self.layers, self.model.model.cfg.n_layers)

    def check(self, layer: int | None, index: int) -> None:
        """Unit layer:index (layer None: the index alone) exists."""
        if layer is not None:
            self.check_layers([layer])
        check_unit(None, index, self.model.model.cfg.n_layers, self.width, self.name)


class Neurons(Units):
    """The model's own neurons at its TopK site (the residual stream after each block, or the FFN hidden
    of the mlp-site ablation): unit l:i is entry i of the output of `sites()[l]`, in every layer."""

    name = "neuron"

    def __init__(self, model):
        self.model = model
        t = model.model
        self.sites = t.sites()
        self.layers = list(range(len(self.sites)))
        self.width = t.topk.width(t.cfg)

    def kind(self, layer: int) -> str:
        return "topk" if isinstance(self.sites[layer], TopK) else "dense"

    def sparsity(self, layer: int) -> int | None:
        """A TopK layer running at alpha = 0 holds at most k non-zeros per token."""
        site = self.sites[layer]
        return site.k if isinstance(site, TopK) and float(site.alpha) == 0.0 else None

    def record(self, layers: list[int], fn):
        return recording(self.sites, layers, fn)

    @contextlib.contextmanager
    def steered(self, layer: int, index: int, offset: float):
        """The paper's steering: `offset` added to the neuron's pre-activation at every position (the
        prompt and, under the KV cache, every generated token)."""
        def add(module, args):
            x = args[0].clone()
            x[..., index] += offset
            return (x, *args[1:])

        handle = self.sites[layer].register_forward_pre_hook(add)
        try:
            yield
        finally:
            handle.remove()

    def directions(self, layer: int) -> torch.Tensor:
        """Neuron i of the residual stream is the basis vector e_i; at the mlp site, column i of w2."""
        t = self.model.model
        if t.topk.site == "mlp":
            return t.layers[layer].feed_forward.w2.weight.detach().T
        return torch.eye(self.width, device=t.norm.weight.device, dtype=t.norm.weight.dtype)

    def reconstructed(self, layer: int):
        """A neuron code is the stream itself: nothing to splice."""
        return contextlib.nullcontext()

    def fingerprint(self) -> dict:
        return model_fingerprint(self.model)

    @property
    def description(self) -> str:
        kinds = {self.kind(l) for l in self.layers}
        return f"{'TopK LM' if 'topk' in kinds else 'dense LM'} neurons ({self.model.model.topk.site} site)"

    def extra_training(self) -> dict:
        return {"seconds": 0.0, "flops": 0.0, "tokens": 0, "what": "nothing: the code is the model's own"}

    def retrain(self, model, tokenizer, out, seed_offset: int = 0) -> "Neurons | None":
        """Another checkpoint's neurons are its own; another seed would be another training of the model."""
        return Neurons(model) if seed_offset == 0 else None
