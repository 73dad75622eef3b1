"""`topk-ds sae train`: TopK SAEs on the residual stream after given blocks of any model `load()` opens,
over the same token windows the statistics read (`analysis.data.token_batches`), trained by the library
behind `library.py`."""

from pathlib import Path

import torch

from ..analysis.data import token_batches
from ..analysis.units import check_layers, model_fingerprint
from ..errors import UserError
from . import library


def default_layers(model) -> list[int]:
    """The blocks a TopK layer sparsifies (for a dense twin: those its TopK twin sparsifies)."""
    t = model.model
    return list(range(max(1, t.cfg.n_layers - t.topk.n_nontopk)))


def check_settings(model, layers, k: int | None, expansion: int) -> tuple[list[int], int]:
    """(layers, k) checked against the model; k defaults to the TopK LM's k (a dense twin records its twin's)."""
    t = model.model
    layers = check_layers(layers or default_layers(model), list(range(t.cfg.n_layers)), t.cfg.n_layers)
    k = t.topk.k if k is None else k
    if expansion < 1:
        raise UserError(f"--expansion {expansion} must be >= 1 (SAE width = expansion x D = expansion x {t.cfg.dim})")
    width = expansion * t.cfg.dim
    if not 1 <= k <= width:
        raise UserError(f"--k {k} does not fit an SAE of {width} latents (expansion {expansion} x D={t.cfg.dim}); "
                        f"choose 1 <= k <= {width}")
    return layers, k


def check_precision(device: torch.device, dtype: torch.dtype) -> None:
    """SAEs train on the CPU in fp32 only: sparsify mixes precisions only under CUDA autocast."""
    if device.type == "cpu" and dtype != torch.float32:
        raise UserError("SAEs are trained with the model in fp32 on the CPU (sparsify mixes precisions only under "
                        "CUDA autocast); drop --dtype bf16")


def windows_of(model, tokenizer, data, tokens: int, seq_len: int, split: str) -> torch.Tensor:
    """(N, seq_len) int32: the first `tokens` tokens of the data in windows, as the statistics read them."""
    t = model.model
    return torch.cat(list(token_batches(data, tokenizer, t.cfg.vocab_size, seq_len, tokens, 64, split))).to(torch.int32)


def train_sae(model, tokenizer, data, out: Path, *, layers=None, k: int | None = None, expansion: int = 1,
              tokens: int = 1_000_000, seq_len: int | None = None, split: str = "train", seed: int = 0,
              batch_size: int = 16, model_path=None, show_progress: bool = True) -> dict:
    layers, k = check_settings(model, layers, k, expansion)
    seq_len = seq_len or min(model.model.cfg.max_seq_len, 1024)
    windows = windows_of(model, tokenizer, data, tokens, seq_len, split)
    record = {"model": None if model_path is None else str(model_path), "model_fingerprint": model_fingerprint(model),
              "data": str(data), "split": split}
    return library.train(model, windows, layers, Path(out), k=k, expansion=expansion, seed=seed, batch_size=batch_size,
                         record=record, show_progress=show_progress)


def train_like(record: dict, model, tokenizer, out: Path, seed: int) -> dict:
    """An SAE with the settings and tokens of another's `record`, on `model` (e.g. another checkpoint)."""
    return train_sae(model, tokenizer, record["data"], out, layers=record["layers"], k=record["k"],
                     expansion=record["expansion"], tokens=record["tokens"], seq_len=record["seq_len"],
                     split=record["split"], seed=seed, batch_size=record["batch_size"], show_progress=False)
