"""The one seam to the SAE library, EleutherAI's sparsify (PyPI `eai-sparsify`): train TopK SAEs on the
residual stream after given blocks of a model, load them, encode and decode. The rest of topk_ds sees
SAEs only through this module and `topk_ds.sae.Latents`.

An SAE directory is the library's own format, so its own loader opens it
(`sparsify.SparseCoder.load_many(DIR, local=True)` or `load_from_disk(DIR/layers.N)`):

    DIR/layers.N/cfg.json, sae.safetensors   the SAE of the residual stream after block N (hookpoint
                                             `layers.N` of the base model, the output of block N)
    DIR/config.json, state.pt, ...           the library's training state
    DIR/topk_ds.json                         ours: the model (path, fingerprint) and tokens it was
                                             trained on, the settings, wall time and FLOPs
"""

import contextlib
import json
import os
import sys
import time
from pathlib import Path

import torch

from ..devices import cost_line
from ..errors import UserError
from ..io import atomic_output, write_json
from ..progress import progress

RECORD, FORMAT = "topk_ds.json", "topk_ds-sae"
DATA_ORDER_SEED = 0  # the training windows are shuffled once with this seed: --seed changes only the SAE's init
FVU_WINDOWS = 64  # training windows the recorded fraction of variance unexplained is measured on


def hookpoint(layer: int) -> str:
    """The library's name of the residual stream after block `layer`, relative to the base model."""
    return f"layers.{layer}"


@contextlib.contextmanager
def _quiet():
    """The library prints its chatter on stdout; a command's stdout holds only the line saying what it wrote."""
    with contextlib.redirect_stdout(sys.stderr):
        yield


def _library():
    if not torch.cuda.is_available():
        os.environ.setdefault("SPARSIFY_DISABLE_TRITON", "1")  # read once, when sparsify is imported
    with _quiet():
        import sparsify
    return sparsify


def version() -> str:
    return f"eai-sparsify {_library().__version__}"


class _Windows(torch.utils.data.Dataset):
    """Fixed-length token windows as the library's trainer reads them: rows with an `input_ids` column."""

    def __init__(self, windows: torch.Tensor):
        order = torch.randperm(len(windows), generator=torch.Generator().manual_seed(DATA_ORDER_SEED))
        self.windows = windows[order]

    def __len__(self):
        return len(self.windows)

    def __getitem__(self, i):
        return {"input_ids": self.windows[i].long()}


def flops_per_token(model, layers: int, num_latents: int, k: int, seq_len: int) -> tuple[float, float]:
    """(the LM's forward, the SAEs' training) matmul FLOPs per token. The library runs the whole model on
    every batch; per layer the SAE costs 2*D*M for the encoder, 2*k*D for the sparse decoder, and the
    sparse backward about 6*k*D more (the encoder's gradient touches only the k chosen rows)."""
    D = model.model.cfg.dim
    return model.model.cfg.flops_per_token(seq_len, training=False), layers * (2 * D * num_latents + 8 * k * D)


def train(model, windows: torch.Tensor, layers: list[int], out: Path, *, k: int, expansion: int, seed: int,
          batch_size: int, record: dict, show_progress: bool = True) -> dict:
    """Train one TopK SAE per layer on the residual stream after that block, over `windows` (N, T) of token
    ids, with the library's trainer (its defaults: signum, fraction-of-variance loss, unit-norm decoder).
    Writes `out` atomically; returns the record written to out/topk_ds.json (`record` plus the settings,
    wall time and FLOPs)."""
    sparsify = _library()
    D = model.model.cfg.dim
    config = sparsify.TrainConfig(sparsify.SaeConfig(k=k, expansion_factor=expansion), batch_size=batch_size,
                                  hookpoints=[hookpoint(l) for l in layers], init_seeds=[seed], log_to_wandb=False,
                                  save_every=sys.maxsize)
    data = _Windows(windows)

    def bar(*args, initial=0, disable=False, **kwargs):  # the library counts whole batches; the last may be short
        return progress(desc="sae train", total=-(-len(data) // batch_size), initial=initial, unit="batch",
                        enabled=show_progress and not disable)

    lm_flops, sae_flops = flops_per_token(model, len(layers), D * expansion, k, windows.shape[1])
    if show_progress:
        print(cost_line("sae train", windows.numel(), lm_flops + sae_flops, model.device, model.dtype), file=sys.stderr,
              flush=True)
    cache, precision = model.config.use_cache, torch.get_float32_matmul_precision()
    with atomic_output(out) as tmp:
        config.save_dir, config.run_name = str(tmp.parent), tmp.name
        model.config.use_cache = False  # no KV cache to build on every batch
        started = time.time()
        try:
            # the library draws a plain tqdm bar; ours writes lines in logs
            with _quiet(), _patched(sparsify.trainer, "tqdm", bar):
                sparsify.Trainer(config, data, model).fit()
        finally:
            model.config.use_cache = cache
            torch.set_float32_matmul_precision(precision)  # fit() sets "high" for the whole process
        seconds = time.time() - started
        saved = {l: sparsify.SparseCoder.load_from_disk(tmp / hookpoint(l), device=model.device).eval() for l in layers}
        tokens = windows.numel()
        record = record | {
            "format": FORMAT, "library": version(), "layers": list(layers), "hookpoints": config.hookpoints,
            "d_in": D, "k": k, "expansion": expansion, "num_latents": D * expansion, "seed": seed,
            "data_order_seed": DATA_ORDER_SEED, "batch_size": batch_size, "seq_len": windows.shape[1], "tokens": tokens,
            "seconds": seconds, "flops": tokens * (lm_flops + sae_flops),
            "fvu": {str(l): v for l, v in fvu(model, saved, data.windows[:FVU_WINDOWS]).items()},
            "flops_note": "matmul FLOPs: the LM's forward on every token (the library runs the whole model) plus, "
                          "per layer, 2*D*M (encoder) + 8*k*D (sparse decoder and backward)"}
        write_json(tmp / RECORD, record)
    return record


@torch.inference_mode()
def fvu(model, saes: dict, windows: torch.Tensor) -> dict[int, float]:
    """{layer: fraction of the variance of block `layer`'s output over `windows` that its SAE leaves unexplained}."""
    outputs = {l: [] for l in saes}
    handles = [model.model.layers[l].register_forward_hook(lambda m, a, out, l=l: outputs[l].append(out.flatten(0, 1)))
               for l in saes]
    try:
        for chunk in windows.long().split(16):
            model.model(chunk)
    finally:
        for h in handles:
            h.remove()
    result = {}
    for l, sae in saes.items():
        x = torch.cat(outputs[l]).float()
        result[l] = ((x - reconstruct(sae, x).float()).pow(2).sum() / (x - x.mean(0)).pow(2).sum()).item()
    return result


@contextlib.contextmanager
def _patched(module, name: str, value):
    saved = getattr(module, name)
    setattr(module, name, value)
    try:
        yield
    finally:
        setattr(module, name, saved)


def read_record(sae_dir) -> dict:
    """out/topk_ds.json of an SAE directory, with the layers it holds checked; UserError when `sae_dir` is
    not an SAE directory of `topk-ds sae train`."""
    sae_dir = Path(sae_dir)
    try:
        record = json.loads((sae_dir / RECORD).read_text())
        layers = record["layers"]
    except (OSError, ValueError, KeyError, TypeError):
        raise UserError(f"{sae_dir} is not an SAE directory (no readable {RECORD}); train one with "
                        f"`topk-ds sae train MODEL --data DATA --out {sae_dir}`") from None
    if record.get("format") != FORMAT:
        raise UserError(f"{sae_dir}/{RECORD} is not a topk_ds SAE record")
    for l in layers:
        if not (sae_dir / hookpoint(l) / "cfg.json").is_file():
            raise UserError(f"{sae_dir} is incomplete: it records layer {l} but has no {hookpoint(l)}/cfg.json")
    return record


def load(sae_dir) -> dict:
    """{layer: the library's SparseCoder} of an SAE directory (eval mode, on the CPU)."""
    record = read_record(sae_dir)
    sparsify = _library()
    saes = {}
    for l in record["layers"]:
        try:
            saes[l] = sparsify.SparseCoder.load_from_disk(Path(sae_dir) / hookpoint(l)).eval()
        except Exception as e:  # a truncated or foreign file: safetensors and json raise many types
            raise UserError(f"cannot load the SAE in {Path(sae_dir) / hookpoint(l)}: "
                            f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    return saes


def encode(sae, x: torch.Tensor) -> torch.Tensor:
    """Latent activations (..., M) of residual-stream vectors x (..., D): the library's TopK encoder, its k
    values scattered into a dense vector."""
    flat = x.reshape(-1, x.shape[-1]).to(sae.dtype)
    acts, idx, _ = sae.encode(flat)
    return torch.zeros(len(flat), sae.num_latents, dtype=acts.dtype, device=acts.device).scatter_(1, idx, acts) \
        .view(*x.shape[:-1], sae.num_latents)


def reconstruct(sae, x: torch.Tensor) -> torch.Tensor:
    """The SAE's reconstruction of x (..., D): decode(encode(x)), in x's dtype."""
    flat = x.reshape(-1, x.shape[-1]).to(sae.dtype)
    acts, idx, _ = sae.encode(flat)
    return sae.decode(acts, idx).to(x.dtype).view_as(x)


def decoder(sae) -> torch.Tensor:
    """(M, D) what each latent writes into the residual stream per unit of activation."""
    return sae.W_dec.detach()


def config_of(sae) -> dict:
    return sae.cfg.to_dict() | {"d_in": sae.d_in, "num_latents": sae.num_latents}
