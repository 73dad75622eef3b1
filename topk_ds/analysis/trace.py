"""Tracing over the checkpoints of one run (the paper's Section 5): neuron index i is the same
neuron in every checkpoint and, in the residual stream, the same dimension in every layer, so

    trace_neuron   the mean activation of index i on one token, checkpoints x layers (Figure 5)
    trace_entropy  each layer's distribution of token / semantic entropy per checkpoint (Figure 4)

Every checkpoint is loaded with `load()` at the alpha recorded for its step, as it ran in training, one at
a time on the device; the data is tokenised once and the same batches run through every checkpoint.
"""

import sys
import time
from pathlib import Path

import torch

from ..config import load_config
from ..convert.hf_export import load, run_checkpoints
from ..devices import free_device_memory, resolve
from ..errors import UserError
from ..progress import progress as progress_of
from .data import token_batches
from .settings import TRACE_TOKENS
from .stats import collect, compute_entropy
from .units import Neurons, run_until_recorded


def run_data(run_dir, data=None, seq_len=None) -> tuple[str, int]:
    """The data to trace on: --data, else the run's own data.path; seq_len likewise (at most the model's context)."""
    cfg = load_config(str(Path(run_dir) / "config.yaml")) if (Path(run_dir) / "config.yaml").is_file() else None
    if data is None and cfg is None:
        raise UserError(f"{run_dir} has no config.yaml naming its data; pass --data")
    if cfg is not None and seq_len is not None and seq_len > cfg.model.max_seq_len:
        raise UserError(f"--seq-len {seq_len} exceeds the model's context (max_seq_len {cfg.model.max_seq_len}); "
                        f"choose --seq-len <= {cfg.model.max_seq_len}")
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


def _over_checkpoints(run_dir, measure, device="cpu", dtype=None, progress: bool = True) -> tuple[list[int], list]:
    """(steps, [measure(model, tokenizer) per checkpoint]) over the run's complete checkpoints, oldest first,
    one model on the device at a time (freed before the next is read); prints the time each one took."""
    device, dtype = resolve(device, dtype)
    steps, results = [], []
    bar = progress_of(run_checkpoints(run_dir), desc="checkpoints", unit="ckpt", enabled=progress)
    for step, tag in bar:
        start = time.perf_counter()
        model, tokenizer = load(run_dir, tag=tag.name, device=device, dtype=dtype)
        loaded = time.perf_counter()
        results.append(measure(model, tokenizer))
        steps.append(step)
        del model
        free_device_memory(device)
        if progress:
            bar.write(f"{tag.name}: {time.perf_counter() - start:.1f} s (load {loaded - start:.1f} s, pass "
                      f"{time.perf_counter() - loaded:.1f} s)", file=sys.stderr)
    return steps, results


class _Batches:
    """The data's windows, tokenised once (with the first checkpoint's tokenizer: a run has one) and kept on
    the device for every checkpoint."""

    def __init__(self, data, seq_len: int, tokens: int, batch: int):
        self.args, self.batches = (data, seq_len, tokens, batch), None

    def get(self, model, tokenizer) -> list[torch.Tensor]:
        if self.batches is None:
            data, seq_len, tokens, batch = self.args
            device = model.model.tok_embeddings.weight.device
            self.batches = [b.to(device) for b in token_batches(data, tokenizer, model.model.cfg.vocab_size, seq_len,
                                                                 tokens, batch)]
        return self.batches


def trace_neuron(run_dir, index: int, word: str, data=None, tokens: int = TRACE_TOKENS, seq_len=None,
                 batch: int = 16, progress: bool = True, device="cpu", dtype=None, units_of=Neurons) -> dict:
    """{steps, word, token_id, index, units, layers, mean[layer][checkpoint] (abar of `word`),
    overall[layer][checkpoint] (mean over all tokens), count}: activations as in the statistics (positive
    part), of the units `units_of(model)` gives in every checkpoint (default: its neurons)."""
    data, seq_len = run_data(run_dir, data, seq_len)
    windows, found = _Batches(data, seq_len, tokens, batch), {}

    def measure(model, tokenizer):
        if tokenizer is None:
            raise UserError(f"{run_dir}: no tokenizer found for the run (its data.path/tokenizer)")
        if "id" not in found:
            found["id"] = token_id(tokenizer, word)
        units = units_of(model)
        units.check(None, index)
        found["units"], found["layers"] = units.name, units.layers
        batches = windows.get(model, tokenizer)
        masks = [b == found["id"] for b in batches]
        found["count"], found["tokens"] = int(sum(m.sum() for m in masks)), sum(b.numel() for b in batches)
        if found["count"] == 0:
            raise UserError(f"'{word}' does not occur in the first {found['tokens']:,} tokens of {data}; pass more "
                            "--tokens or other --data")
        row = {l: j for j, l in enumerate(units.layers)}
        on_word, everywhere = (torch.zeros(len(row), dtype=torch.float64, device=batches[0].device) for _ in range(2))
        current = {}

        def record(l, acts):
            a = acts[..., index].clamp(min=0).double()
            on_word[row[l]] += a[current["mask"]].sum()
            everywhere[row[l]] += a.sum()

        with torch.inference_mode(), units.record(units.layers, record):
            for window, mask in zip(batches, masks):
                current["mask"] = mask
                run_until_recorded(model, window)
        return (on_word / found["count"]).tolist(), (everywhere / found["tokens"]).tolist()

    steps, results = _over_checkpoints(run_dir, measure, device, dtype, progress)
    mean, overall = zip(*results)
    return {"word": word, "token_id": found["id"], "index": index, "units": found["units"], "layers": found["layers"],
            "steps": steps, "count": found["count"],
            "tokens": found["tokens"], "data": str(data), "mean": [list(r) for r in zip(*mean)],
            "overall": [list(r) for r in zip(*overall)]}


def trace_entropy(run_dir, data=None, tokens: int = TRACE_TOKENS, seq_len=None, batch: int = 16,
                  progress: bool = True, device="cpu", dtype=None, units_of=Neurons) -> dict:
    """{steps, layers: [{layer, kind, token: [per checkpoint {mean, std, p5, p95}], semantic: [...]}]}."""
    data, seq_len = run_data(run_dir, data, seq_len)
    windows = _Batches(data, seq_len, tokens, batch)

    def measure(model, tokenizer):
        stats = collect(units_of(model), tokenizer, windows.get(model, tokenizer), tokens, top=0, progress=False,
                        logit_effect=False)
        compute_entropy(stats, progress=False)
        return [(row["layer"], row["kind"], _spread(stats.layers[row["layer"]].token_entropy),
                 _spread(stats.layers[row["layer"]].semantic_entropy)) for row in stats.meta["layers"]]

    steps, results = _over_checkpoints(run_dir, measure, device, dtype, progress)
    layers = [{"layer": l, "kind": kind, "token": [r[j][2] for r in results], "semantic": [r[j][3] for r in results]}
              for j, (l, kind, _, _) in enumerate(results[0])]
    return {"steps": steps, "tokens": tokens, "data": str(data), "layers": layers}


def _spread(x: torch.Tensor) -> dict:
    x = x[~x.isnan()].double()
    if len(x) == 0:
        return {"mean": None, "std": None, "p5": None, "p95": None}
    q = torch.quantile(x, torch.tensor([0.05, 0.95], dtype=torch.float64)).tolist()
    return {"mean": x.mean().item(), "std": x.std(unbiased=False).item(), "p5": q[0], "p95": q[1]}
