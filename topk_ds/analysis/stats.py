"""Activation statistics of a model's units (analysis.units: its neurons, or an SAE's latents) over a
token stream: one streaming pass, bounded memory, saved so that later commands never run the model again.

Per analysed layer (V token ids, D units, M top contexts of C tokens each):

    sums          (V, D)    float32  sum of a_t over the positions t holding token v; abar = sums / counts
    fires         (D,)      int64    positions where the neuron is > 0: firing frequency, L0, dead neurons
    top_values    (D, M)    float32  the neuron's M largest activations, best first (0: empty slot)
    top_contexts  (D, M, C) int32    the window tokens around each (-1 outside the window); the
                                     activating token sits at index `before`

and once: counts (V,) int64, the input embedding (V, E) (for semantic entropy), the vocabulary.
`a` is the positive part of a unit's activation: the output itself for a ReLU TopK layer (and an SAE's
TopK latents), clamped at 0 per position for dense layers (and identity TopK), so abar >= 0 can be
normalised.

A TopK layer running at alpha = 0 (or a TopK SAE) holds at most k non-zeros per token, and only those k entries are
accumulated (an index-add of N*k values), so the cost grows with k, not D. The top contexts are
tensors merged per batch: a candidate must beat its neuron's current M-th best, so after the first
batches almost nothing passes and the merge touches only the few neurons that gained.
"""

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from ..errors import UserError
from ..io import atomic_output, write_json
from ..progress import progress as progress_of
from . import entropy
from .settings import AFTER, BEFORE, TOP
from .units import run_until_recorded

FORMAT, FORMAT_VERSION = "topk_ds-stats", 1
ACTIVATION_NOTE = "positive part of each layer's output hidden state (dense layers clamped at 0 per position)"


@dataclass
class LayerStats:
    layer: int
    k: int | None  # TopK layer accumulated on its k selected entries; None: dense accumulation
    sums: torch.Tensor
    fires: torch.Tensor
    top_values: torch.Tensor
    top_contexts: torch.Tensor
    # set by compute_entropy: (D,) each
    token_entropy: torch.Tensor | None = None
    semantic_entropy: torch.Tensor | None = None
    selected: torch.Tensor | None = None  # |S|
    theta: torch.Tensor | None = None

    TENSORS = ("sums", "fires", "top_values", "top_contexts", "token_entropy", "semantic_entropy", "selected", "theta")

    @classmethod
    def empty(cls, layer: int, vocab: int, dim: int, k: int | None, top: int = TOP, context: int = BEFORE + 1 + AFTER):
        return cls(layer, k, torch.zeros(vocab, dim), torch.zeros(dim, dtype=torch.int64), torch.zeros(dim, top),
                   torch.full((dim, top, context), -1, dtype=torch.int32))

    @property
    def dim(self) -> int:
        return self.sums.shape[1]

    def update(self, acts: torch.Tensor, tokens: torch.Tensor, context_of) -> None:
        """acts (N, D) activations at N positions, tokens (N,) their ids; context_of(positions) -> (n, C)."""
        D = self.dim
        if self.k is not None:
            positions, idx = (acts > 0).nonzero(as_tuple=True)  # at most k entries per position
            values = acts[positions, idx]
            self.sums.view(-1).index_add_(0, tokens[positions] * D + idx, values)
            self.fires += torch.bincount(idx, minlength=D)
            self._offer(idx, values, positions, context_of)
        else:
            acts = acts.clamp(min=0)
            self.sums.index_add_(0, tokens, acts)
            self.fires += (acts > 0).sum(0)
            values, positions = acts.topk(min(self.top_values.shape[1], len(acts)), dim=0)  # (M, D) per neuron
            neurons = torch.arange(D).expand_as(values)
            live = values > 0
            self._offer(neurons[live], values[live], positions[live], context_of)

    def _offer(self, neurons, values, positions, context_of) -> None:
        """Merge candidate (neuron, value, position) triples into the per-neuron top lists."""
        M = self.top_values.shape[1]
        if M == 0:
            return
        beats = values > self.top_values[neurons, -1]
        neurons, values, positions = neurons[beats], values[beats], positions[beats]
        if len(neurons) == 0:
            return
        order = values.argsort(descending=True, stable=True)
        order = order[neurons[order].argsort(stable=True)]  # grouped by neuron, best first within a group
        neurons, values, positions = neurons[order], values[order], positions[order]
        touched, row, count = torch.unique_consecutive(neurons, return_inverse=True, return_counts=True)
        rank = torch.arange(len(neurons)) - (count.cumsum(0) - count)[row]
        keep = rank < M
        row, rank = row[keep], rank[keep]
        new_values = torch.zeros(len(touched), M)
        new_values[row, rank] = values[keep]
        new_contexts = torch.full((len(touched), M, self.top_contexts.shape[2]), -1, dtype=torch.int32)
        new_contexts[row, rank] = context_of(positions[keep])
        merged = torch.cat([self.top_values[touched], new_values], dim=1)  # (U, 2M)
        best, which = merged.topk(M, dim=1)
        contexts = torch.cat([self.top_contexts[touched], new_contexts], dim=1)
        self.top_values[touched] = best
        self.top_contexts[touched] = contexts.gather(1, which[..., None].expand(-1, -1, contexts.shape[2]))


def memory_bytes(vocab: int, dim: int, layers: int, top: int = TOP, context: int = BEFORE + 1 + AFTER) -> int:
    """Accumulator memory: sums per layer, the top contexts, and the embedding kept once."""
    return layers * (4 * vocab * dim + 8 * dim + dim * top * (4 + 4 * context)) + 4 * vocab * dim


def pieces_of(tokenizer, vocab: int) -> list[str]:
    """The token strings by id (placeholders <id> when the model came without a tokenizer)."""
    return tokenizer.convert_ids_to_tokens(list(range(vocab))) if tokenizer is not None else [f"<{i}>" for i in range(vocab)]


def collect(units, tokenizer, batches, max_tokens: int, layers=None, top: int = TOP, before: int = BEFORE,
            after: int = AFTER, progress: bool = True) -> "Stats":
    """One pass over `batches` of (B, T) token ids, reading `units` (analysis.units: the model's neurons or
    an SAE's latents) at `layers` (default: every layer that has units); entropies not yet computed."""
    model = units.model
    layers = units.check_layers(layers)
    V, D = model.model.cfg.vocab_size, units.width
    stats = {l: LayerStats.empty(l, V, D, units.sparsity(l), top, before + 1 + after) for l in layers}
    counts = torch.zeros(V, dtype=torch.int64)
    batch = {}

    def record(l, acts):
        stats[l].update(acts.reshape(-1, D).float(), batch["tokens"], batch["context_of"])

    seen, T = 0, None
    bar = progress_of(total=max_tokens, desc="stats", unit="tok", unit_scale=True, enabled=progress)
    try:
        with torch.inference_mode(), units.record(layers, record):
            for tokens in batches:
                T = tokens.shape[1]
                padded = torch.nn.functional.pad(tokens, (before, after), value=-1).to(torch.int32)
                windows = padded.unfold(1, before + 1 + after, 1)  # (B, T, C): the context of every position
                batch["tokens"] = tokens.reshape(-1)
                batch["context_of"] = lambda pos, w=windows, T=T: w[pos // T, pos % T]
                counts += torch.bincount(batch["tokens"], minlength=V)
                run_until_recorded(model, tokens)
                seen += tokens.numel()
                bar.update(tokens.numel())
    finally:
        bar.close()
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "units": units.name, "fingerprint": units.fingerprint(),
            "tokens": seen, "seq_len": T, "vocab_size": V, "dim": D, "n_layers": model.model.cfg.n_layers,
            "context_before": before, "context_after": after, "top_contexts": top, "activation": ACTIVATION_NOTE,
            "layers": [{"layer": l, "kind": units.kind(l), "k": units.sparsity(l),
                        "accumulation": "sparse" if stats[l].k is not None else "dense"} for l in layers]}
    return Stats(meta, counts, model.model.tok_embeddings.weight.detach().float().clone(), stats, pieces_of(tokenizer, V))


def compute_entropy(stats: "Stats", percentile: float = entropy.PERCENTILE, ratio: float = entropy.THRESHOLD_RATIO,
                    bins: int = entropy.BINS, progress: bool = True) -> None:
    """Token and semantic entropy of every neuron of every layer, over the token ids seen in the data."""
    seen = stats.counts > 0
    freq = stats.counts[seen]
    table = entropy.cosine_bins(stats.embedding[seen], bins)
    for ls in progress_of(stats.layers.values(), desc="entropy", unit="layer", enabled=progress):
        abar = ls.sums[seen] / freq[:, None]
        ls.token_entropy = entropy.token_entropy(abar)
        ls.semantic_entropy, ls.selected, ls.theta = entropy.semantic_entropy(abar, freq, None, percentile, ratio,
                                                                              bins, table)
    stats.meta["entropy"] = {"percentile": percentile, "threshold_ratio": ratio, "bins": bins,
                             "over": f"the {int(seen.sum())} token ids seen in the data", "log": "natural"}
    for row in stats.meta["layers"]:
        row.update(stats.summary(row["layer"]))


class Stats:
    """Saved as DIR/stats.json (what, from which model and data, per-layer summary), DIR/tensors.safetensors
    and DIR/vocab.json (the token strings, so reports need no tokenizer)."""

    def __init__(self, meta: dict, counts: torch.Tensor, embedding: torch.Tensor, layers: dict[int, LayerStats],
                 pieces: list[str] | None, path: Path | None = None):
        self.meta, self.counts, self.embedding, self.layers, self.pieces, self.path = meta, counts, embedding, layers, pieces, path

    @property
    def tokens(self) -> int:
        return self.meta["tokens"]

    def layer(self, l: int) -> LayerStats:
        if l not in self.layers:
            analysed = [row["layer"] for row in self.meta["layers"]]
            raise UserError(f"layer {l} is not in the statistics{f' at {self.path}' if self.path else ''} "
                            f"(analysed layers: {', '.join(map(str, analysed))}; the model has 0..{self.meta['n_layers'] - 1})")
        return self.layers[l]

    def abar(self, l: int) -> torch.Tensor:
        """(V, D) mean activation per token id (0 for ids never seen)."""
        return self.layer(l).sums / self.counts.clamp(min=1)[:, None]

    def summary(self, l: int) -> dict:
        ls = self.layers[l]
        fired = ls.fires.double()
        out = {"l0": fired.sum().item() / self.tokens, "dead": int((ls.fires == 0).sum()),
               "frequency_mean": (fired / self.tokens).mean().item()}
        if ls.token_entropy is not None:
            te, se = ls.token_entropy, ls.semantic_entropy
            out |= {"token_entropy_mean": _nanmean(te), "token_entropy_std": _nanstd(te),
                    "semantic_entropy_mean": _nanmean(se), "semantic_entropy_std": _nanstd(se),
                    "no_semantic_entropy": int(se.isnan().sum())}
        return out

    def check_units(self, units) -> None:
        """Refuse statistics that were computed from other units: another model (or the same one at another
        alpha), or another SAE."""
        mine, theirs = self.meta["fingerprint"], units.fingerprint()
        if mine != theirs:
            what = next(k for k in sorted(set(mine) | set(theirs), key=lambda k: k != "weights")
                        if mine.get(k) != theirs.get(k))
            raise UserError(f"the statistics at {self.path} come from another {'SAE' if what == 'sae' else 'model'} "
                            f"({what} differ: step "
                            f"{mine.get('train_step')}, weights {mine['weights']} vs this model's step "
                            f"{theirs.get('train_step')}, weights {theirs['weights']}); recompute them with "
                            f"`topk-ds analyze stats`")

    def check_neuron(self, l: int, i: int) -> None:
        ls, name = self.layer(l), self.meta.get("units", "neuron")
        if not 0 <= i < ls.dim:
            raise UserError(f"{name} index {i} is out of range: layer {l} has {name}s 0..{ls.dim - 1}")

    def save(self, out: Path) -> Path:
        from safetensors.torch import save_file

        tensors = {"counts": self.counts, "embedding": self.embedding}
        for l, ls in self.layers.items():
            tensors |= {f"layer{l}.{name}": getattr(ls, name).contiguous() for name in LayerStats.TENSORS
                        if getattr(ls, name) is not None}
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        with atomic_output(out) as tmp:
            tmp.mkdir()
            if (out / "steering").is_dir():  # `topk-ds steer --stats` results survive a recomputation
                shutil.copytree(out / "steering", tmp / "steering")
            save_file(tensors, tmp / "tensors.safetensors")
            (tmp / "vocab.json").write_text(json.dumps(self.pieces))
            write_json(tmp / "stats.json", self.meta)
        self.path = out
        return out

    @classmethod
    def load(cls, path, layers=None) -> "Stats":
        """The statistics in `path`; with `layers`, only those layers' tensors are read."""
        from safetensors import safe_open

        path = Path(path)
        try:
            meta = json.loads((path / "stats.json").read_text())
        except (OSError, ValueError):
            raise UserError(f"{path} holds no statistics (no readable stats.json); make them with "
                            f"`topk-ds analyze stats MODEL --data DATA --out {path}`") from None
        if meta.get("format") != FORMAT or meta.get("format_version") != FORMAT_VERSION:
            raise UserError(f"{path}/stats.json is not a topk_ds statistics file of version {FORMAT_VERSION}")
        wanted = [row["layer"] for row in meta["layers"] if layers is None or row["layer"] in layers]
        k_of = {row["layer"]: row["k"] if row["accumulation"] == "sparse" else None for row in meta["layers"]}
        try:
            with safe_open(path / "tensors.safetensors", "pt") as f:
                names = set(f.keys())
                counts, embedding = f.get_tensor("counts"), f.get_tensor("embedding")
                loaded = {l: LayerStats(l, k_of[l], **{n: f.get_tensor(f"layer{l}.{n}") for n in LayerStats.TENSORS
                                                       if f"layer{l}.{n}" in names}) for l in wanted}
            pieces = json.loads((path / "vocab.json").read_text())
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise UserError(f"the statistics in {path} are incomplete or corrupt ({str(e).splitlines()[0]}); "
                            f"recompute them") from None
        return cls(meta, counts, embedding, loaded, pieces, path)


def _nanmean(x: torch.Tensor) -> float | None:
    x = x[~x.isnan()]
    return x.mean().item() if len(x) else None


def _nanstd(x: torch.Tensor) -> float | None:
    x = x[~x.isnan()]
    return x.std(unbiased=False).item() if len(x) else None
