"""Tracing over the checkpoints of one run (the paper's Section 5): neuron index i is the same
neuron in every checkpoint and, in the residual stream, the same dimension in every layer, so

    trace_neuron   the mean activation of index i on one token, checkpoints x layers (Figure 5)
    trace_entropy  each layer's distribution of token / semantic entropy per checkpoint (Figure 4)

Every checkpoint is loaded with `load()` at the alpha recorded for its step, as it ran in training.
"""

from pathlib import Path

import torch
from ..config import load_config
from ..convert.hf_export import load, run_checkpoints
from ..errors import UserError
from ..progress import progress as progress_of
from .data import token_batches
from .settings import TRACE_TOKENS
from .stats import collect, compute_entropy
from .units import Neurons, run_until_recorded


def run_data(run_dir, data=None, seq_len=None) -> tuple[str, int]:
    """The data to trace on: --data, else the run's own data.path; seq_len likewise."""
    cfg = load_config(str(Path(run_dir) / "config.yaml")) if (Path(run_dir) / "config.yaml").is_file() else None
    if data is None and cfg is None:
        raise UserError(f"{run_dir} has no config.yaml naming its data; pass --data")
    return data or cfg.data.path, seq_len or (cfg.data.seq_len if cfg else 256)


def token_id(tokenizer, word: str) -> int:
    """The id of `word` as one token: the word-start piece ("▁work") if there is one, else the bare piece."""
    for piece in (f"▁{word}", word):
        i = tokenizer.convert_tokens_to_ids(piece)
        if i is not None and i != tokenizer.unk_token_id:
            return i
    pieces = tokenizer.convert_ids_to_tokens(tokenizer(f" {word}", add_special_tokens=False).input_ids)
    raise UserError(f"'{word}' is not a single token of the model's vocabulary (it encodes as {pieces}); "
                    f"trace a word that is one token")


def _checkpoints(run_dir, progress: bool):
    for step, tag in progress_of(run_checkpoints(run_dir), desc="checkpoints", unit="ckpt", enabled=progress):
        model, tokenizer = load(run_dir, tag=tag.name)
        yield step, model, tokenizer


def trace_neuron(run_dir, index: int, word: str, data=None, tokens: int = TRACE_TOKENS, seq_len=None,
                 batch: int = 16, progress: bool = True) -> dict:
    """{steps, word, token_id, index, mean[layer][checkpoint] (abar of `word`), overall[layer][checkpoint]
    (mean over all tokens), count}: activations as in the statistics (positive part)."""
    data, seq_len = run_data(run_dir, data, seq_len)
    steps, mean, overall, count, tid = [], [], [], 0, None
    for step, model, tokenizer in _checkpoints(run_dir, progress):
        if tokenizer is None:
            raise UserError(f"{run_dir}: no tokenizer found for the run (its data.path/tokenizer)")
        tid = token_id(tokenizer, word) if tid is None else tid
        units = Neurons(model)
        units.check(None, index)
        n = model.model.cfg.n_layers
        on_word, everywhere = torch.zeros(n, dtype=torch.float64), torch.zeros(n, dtype=torch.float64)
        current = {}

        def record(l, acts):
            a = acts[..., index].clamp(min=0).double()
            on_word[l] += a[current["mask"]].sum()
            everywhere[l] += a.sum()

        seen, count = 0, 0
        with torch.inference_mode(), units.record(units.layers, record):
            for window in token_batches(data, tokenizer, model.model.cfg.vocab_size, seq_len, tokens, batch):
                current["mask"] = window == tid
                count += int(current["mask"].sum())
                seen += window.numel()
                run_until_recorded(model, window)
        if count == 0:
            raise UserError(f"'{word}' does not occur in the first {seen:,} tokens of {data}; pass more --tokens or other --data")
        steps.append(step)
        mean.append((on_word / count).tolist())
        overall.append((everywhere / seen).tolist())
    return {"word": word, "token_id": tid, "index": index, "steps": steps, "count": count, "tokens": seen,
            "data": str(data), "mean": [list(r) for r in zip(*mean)], "overall": [list(r) for r in zip(*overall)]}


def trace_entropy(run_dir, data=None, tokens: int = TRACE_TOKENS, seq_len=None, batch: int = 16,
                  progress: bool = True) -> dict:
    """{steps, layers: [{layer, kind, token: [per checkpoint {mean, std, p5, p95}], semantic: [...]}]}."""
    data, seq_len = run_data(run_dir, data, seq_len)
    steps, layers = [], None
    for step, model, tokenizer in _checkpoints(run_dir, progress):
        stats = collect(Neurons(model), tokenizer, token_batches(data, tokenizer, model.model.cfg.vocab_size, seq_len, tokens, batch),
                        tokens, top=0, progress=False)
        compute_entropy(stats, progress=False)
        if layers is None:
            layers = [{"layer": row["layer"], "kind": row["kind"], "token": [], "semantic": []} for row in stats.meta["layers"]]
        for row in layers:
            ls = stats.layers[row["layer"]]
            row["token"].append(_spread(ls.token_entropy))
            row["semantic"].append(_spread(ls.semantic_entropy))
        steps.append(step)
    return {"steps": steps, "tokens": tokens, "data": str(data), "layers": layers}


def _spread(x: torch.Tensor) -> dict:
    x = x[~x.isnan()].double()
    if len(x) == 0:
        return {"mean": None, "std": None, "p5": None, "p95": None}
    q = torch.quantile(x, torch.tensor([0.05, 0.95], dtype=torch.float64)).tolist()
    return {"mean": x.mean().item(), "std": x.std(unbiased=False).item(), "p5": q[0], "p95": q[1]}
