"""Activation statistics of a model's units (analysis.units: its neurons, or an SAE's latents) over a
token stream: one streaming pass, bounded memory, saved so that later commands never run the model again.

Per analysed layer (V token ids, D units, M top contexts of C tokens each):

    sums          (V, D)    float32  sum of a_t over the positions t holding token v; abar = sums / counts
    fires         (D,)      int64    positions where the neuron is > 0: firing frequency, L0, dead neurons
    histogram     (D, H)    int64    its non-zero activations counted in H fixed log-spaced bins
                                     (settings.HISTOGRAM: 1e-4 .. 1e4, 8 bins a decade; values outside go
                                     to the first or last bin), so it streams and merges by addition
    top_values    (D, M)    float32  the neuron's M largest activations, best first (0: empty slot)
    top_contexts  (D, M, C) int32    the window tokens around each (-1 outside the window); the
                                     activating token sits at index `before`
    top_acts      (D, M, C) float32  the neuron's activation at every token of that window (per-token shading)
    promoted, promoted_ids     (D, n)  its direct logit effect ("logit lens"): the n tokens whose logits its
    suppressed, suppressed_ids (D, n)  direction raises most / lowers most, through the final norm's gain and
                                       the unembedding (computed once from the weights)

and once: counts (V,) int64, the input embedding (V, E) (for semantic entropy), the vocabulary.

`a` is the positive part of a unit's activation: the output itself for a ReLU TopK layer (and an SAE's
TopK latents), clamped at 0 per position for dense layers (and identity TopK), so abar >= 0 can be
normalised.

A TopK layer running at alpha = 0 (or a TopK SAE) holds at most k non-zeros per token, and only those k entries are
accumulated (an index-add of N*k values), so the cost grows with k, not D. The top contexts are
tensors merged per batch: a candidate must beat its neuron's current M-th best, so after the first
batches almost nothing passes and the merge touches only the few neurons that gained.

The accumulators live on the model's device. Under a multi-process launcher (`python -m topk_ds.analysis`)
every process takes every G-th batch, and the statistics are merged as each tensor's field declares
(`merge` in its metadata): sums, fires, histogram (and counts) add; top_values merge as a top-M per unit,
and top_contexts and top_acts follow the slots that merge keeps; the logit effect and the embedding come
from the weights, after the merge. That is what one process would have gathered over all the batches.
"""

import json
import shutil
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch
import torch.distributed as dist

from ..errors import UserError
from ..io import atomic_output, write_json
from ..progress import progress as progress_of
from . import entropy
from .settings import AFTER, BEFORE, HISTOGRAM, LOGIT_TOKENS, TOP
from .units import run_until_recorded

FORMAT, FORMAT_VERSION = "topk_ds-stats", 2
ACTIVATION_NOTE = "positive part of each layer's output hidden state (dense layers clamped at 0 per position)"
MERGE_SUM, MERGE_TOP = {"merge": "sum"}, {"merge": "top"}  # how a tensor combines over processes (merge_ranks)


def histogram_edges() -> torch.Tensor:
    """The H + 1 edges of the activation histogram's bins (log-spaced, fixed: see settings.HISTOGRAM)."""
    low, high, per_decade = HISTOGRAM
    return torch.logspace(low, high, (high - low) * per_decade + 1, dtype=torch.float64)


@dataclass
class LayerStats:
    layer: int
    k: int | None  # TopK layer accumulated on its k selected entries; None: dense accumulation
    sums: torch.Tensor = field(metadata=MERGE_SUM)
    fires: torch.Tensor = field(metadata=MERGE_SUM)
    histogram: torch.Tensor = field(metadata=MERGE_SUM)
    top_values: torch.Tensor = field(metadata=MERGE_TOP)  # the ranking of every "top" tensor
    top_contexts: torch.Tensor = field(metadata=MERGE_TOP)
    top_acts: torch.Tensor = field(metadata=MERGE_TOP)
    # set by direct_logit_effect, from the weights after the pass (so never merged): (D, n) each
    promoted: torch.Tensor | None = None
    promoted_ids: torch.Tensor | None = None
    suppressed: torch.Tensor | None = None
    suppressed_ids: torch.Tensor | None = None
    # set by compute_entropy: (D,) each
    token_entropy: torch.Tensor | None = None
    semantic_entropy: torch.Tensor | None = None
    selected: torch.Tensor | None = None  # |S|
    theta: torch.Tensor | None = None

    TENSORS = ("sums", "fires", "histogram", "top_values", "top_contexts", "top_acts", "promoted", "promoted_ids",
               "suppressed", "suppressed_ids", "token_entropy", "semantic_entropy", "selected", "theta")

    @classmethod
    def empty(cls, layer: int, vocab: int, dim: int, k: int | None, top: int = TOP,
              context: int = BEFORE + 1 + AFTER, device="cpu"):
        bins = len(histogram_edges()) - 1
        return cls(layer, k, torch.zeros(vocab, dim, device=device), torch.zeros(dim, dtype=torch.int64, device=device),
                   torch.zeros(dim, bins, dtype=torch.int64, device=device), torch.zeros(dim, top, device=device),
                   torch.full((dim, top, context), -1, dtype=torch.int32, device=device),
                   torch.zeros(dim, top, context, device=device))

    def tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor this layer holds, by field name."""
        return {f.name: getattr(self, f.name) for f in fields(self) if isinstance(getattr(self, f.name), torch.Tensor)}

    def to(self, device) -> "LayerStats":
        for name, t in self.tensors().items():
            setattr(self, name, t.to(device))
        return self

    def merge_ranks(self) -> None:
        """Combine this layer's statistics over the processes of a data-parallel pass, in place on every
        process, by each tensor's `merge` rule; a tensor without one is a mistake, not silently dropped."""
        world = dist.get_world_size()
        M = self.top_values.shape[1]
        order = None
        if M:  # the M best of the G x M candidates of every unit, by value
            order = torch.cat(_all_gather(self.top_values, world), dim=1).topk(M, dim=1).indices
        for name, t in self.tensors().items():
            rule = next(f.metadata.get("merge") for f in fields(self) if f.name == name)
            if rule == "sum":
                dist.all_reduce(t)
            elif rule == "top":
                if order is not None:
                    merged = torch.cat(_all_gather(t, world), dim=1)  # (D, G*M, ...)
                    index = order.view(*order.shape, *[1] * (t.dim() - 2)).expand(-1, -1, *t.shape[2:])
                    setattr(self, name, merged.gather(1, index))
            else:
                raise ValueError(f"LayerStats.{name} has no merge rule (field metadata 'merge': sum or top)")

    @property
    def dim(self) -> int:
        return self.sums.shape[1]

    def update(self, acts: torch.Tensor, tokens: torch.Tensor, window_of) -> None:
        """acts (N, D) activations at N positions, tokens (N,) their ids; window_of(positions (n,)) -> (n, C)
        the positions of each one's context window (-1 outside its sequence)."""
        D, device = self.dim, acts.device
        if self.k is not None:
            positions, idx = (acts > 0).nonzero(as_tuple=True)  # at most k entries per position
            values = acts[positions, idx]
            self.sums.view(-1).index_add_(0, tokens[positions] * D + idx, values)
            self.fires += torch.bincount(idx, minlength=D)
            self._count(idx, values)
            self._offer(idx, values, positions, acts, tokens, window_of)
        else:
            acts = acts.clamp(min=0)
            fired, idx = (acts > 0).nonzero(as_tuple=True)
            self.sums.index_add_(0, tokens, acts)
            self.fires += torch.bincount(idx, minlength=D)
            self._count(idx, acts[fired, idx])
            values, positions = acts.topk(min(self.top_values.shape[1], len(acts)), dim=0)  # (M, D) per neuron
            neurons = torch.arange(D, device=device).expand_as(values)
            live = values > 0
            self._offer(neurons[live], values[live], positions[live], acts, tokens, window_of)

    def _count(self, neurons, values) -> None:
        """Add non-zero activations `values` of `neurons` (both (n,)) to the histogram."""
        H = self.histogram.shape[1]
        bins = torch.bucketize(values, histogram_edges()[1:-1].to(values.device, values.dtype))
        self.histogram += torch.bincount(neurons * H + bins, minlength=self.histogram.numel()).view(-1, H)

    def _offer(self, neurons, values, positions, acts, tokens, window_of) -> None:
        """Merge candidate (neuron, value, position) triples into the per-neuron top lists, each with the
        tokens of its window and the neuron's activation at every one of them."""
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
        rank = torch.arange(len(neurons), device=neurons.device) - (count.cumsum(0) - count)[row]
        keep = rank < M
        row, rank = row[keep], rank[keep]
        new_values = torch.zeros(len(touched), M, device=neurons.device)
        new_values[row, rank] = values[keep]
        C = self.top_contexts.shape[2]
        window = window_of(positions[keep])  # (n, C)
        inside, at = window >= 0, window.clamp(min=0)
        new_contexts = torch.full((len(touched), M, C), -1, dtype=torch.int32, device=neurons.device)
        new_contexts[row, rank] = torch.where(inside, tokens[at], -1).to(torch.int32)
        new_acts = torch.zeros(len(touched), M, C, device=neurons.device)
        new_acts[row, rank] = torch.where(inside, acts[at, neurons[keep, None]], 0.0).clamp(min=0).float()
        merged = torch.cat([self.top_values[touched], new_values], dim=1)  # (U, 2M)
        best, which = merged.topk(M, dim=1)
        self.top_values[touched] = best
        which = which[..., None].expand(-1, -1, C)
        self.top_contexts[touched] = torch.cat([self.top_contexts[touched], new_contexts], dim=1).gather(1, which)
        self.top_acts[touched] = torch.cat([self.top_acts[touched], new_acts], dim=1).gather(1, which)


def memory_needs(model, width: int, layers: int, batch_tokens: int, dtype_bytes: int, top: int = TOP,
                 context: int = BEFORE + 1 + AFTER) -> tuple[dict[str, int], dict[str, int]]:
    """Bytes a statistics pass needs, ({part: bytes} on the model's device, {part: bytes} in host memory), for a
    ModelConfig `model`, `layers` analysed layers of `width` units and batches of `batch_tokens` tokens.

    device: the weights; the accumulators (per layer V x width fp32 sums, firing counts and histograms, the top
            contexts with their activations); one batch's
            activations (an estimate: the SwiGLU hidden three times, the residual stream six times, and the
            fp32 copy the statistics take of a layer's output)
    host:   the accumulators again (saved from there), the fp32 embedding, and for entropy a V x V byte table
            of cosine bins and one layer's per-token means in fp32 and fp64"""
    V, D, F = model.vocab_size, model.dim, model.ffn_dim
    bins = len(histogram_edges()) - 1
    accumulators = layers * (4 * V * width + 8 * width * (1 + bins) + width * top * (4 + 8 * context))
    device = {"model": model.num_params() * dtype_bytes, "statistics": accumulators,
              "a batch's activations": batch_tokens * ((3 * F + 6 * D) * dtype_bytes + 8 * width)}
    host = {"statistics": accumulators, "embedding": 4 * V * D, "entropy": V * V + 20 * V * width}
    return device, host


@torch.inference_mode()
def direct_logit_effect(units, stats: dict[int, "LayerStats"], n: int = LOGIT_TOKENS, block: int = 1024) -> None:
    """Every unit's direct logit effect ("logit lens"): its direction (units.directions(l)) scaled by the final
    RMSNorm's gain and projected on the unembedding; the n most promoted and n most suppressed tokens,
    `block` units at a time so the (units, V) logits stay small."""
    t = units.model.model
    gain, unembed = t.norm.weight.float(), t.output.weight.float()
    n = min(n, unembed.shape[0])
    for l, ls in stats.items():
        directions = units.directions(l)
        up, up_ids, down, down_ids = [], [], [], []
        for start in range(0, len(directions), block):
            logits = (directions[start:start + block].float() * gain) @ unembed.T  # (b, V)
            values, ids = logits.topk(n, dim=1)
            up.append(values), up_ids.append(ids)
            values, ids = logits.topk(n, dim=1, largest=False)
            down.append(values), down_ids.append(ids)
        ls.promoted, ls.promoted_ids = torch.cat(up).cpu(), torch.cat(up_ids).int().cpu()
        ls.suppressed, ls.suppressed_ids = torch.cat(down).cpu(), torch.cat(down_ids).int().cpu()


def pieces_of(tokenizer, vocab: int) -> list[str]:
    """The token strings by id (placeholders <id> when the model came without a tokenizer)."""
    return tokenizer.convert_ids_to_tokens(list(range(vocab))) if tokenizer is not None else [f"<{i}>" for i in range(vocab)]


def collect(units, tokenizer, batches, max_tokens: int, layers=None, top: int = TOP, before: int = BEFORE,
            after: int = AFTER, progress: bool = True, logit_effect: bool = True) -> "Stats":
    """One pass over `batches` of (B, T) token ids, reading `units` (analysis.units: the model's neurons or
    an SAE's latents) at `layers` (default: every layer that has units); entropies not yet computed.
    Accumulated on the model's device, returned on the CPU. In a process group (torch.distributed initialised,
    as `python -m topk_ds.analysis` does under a launcher) process r runs batches r, r + G, r + 2G, ... and
    every process returns the statistics of all the batches. `logit_effect=False` leaves out the units' direct
    logit effects (a fixed cost of V x width x width per layer, which tracing does not need)."""
    model = units.model
    layers = units.check_layers(layers)
    device = model.model.tok_embeddings.weight.device
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    V, D = model.model.cfg.vocab_size, units.width
    stats = {l: LayerStats.empty(l, V, D, units.sparsity(l), top, before + 1 + after, device) for l in layers}
    counts = torch.zeros(V, dtype=torch.int64, device=device)
    batch = {}

    def record(l, acts):
        stats[l].update(acts.reshape(-1, D).float(), batch["tokens"], batch["window_of"])

    seen, T = 0, None
    bar = progress_of(total=max_tokens, desc="stats", unit="tok", unit_scale=True, enabled=progress and rank == 0)
    try:
        with torch.inference_mode(), units.record(layers, record):
            for j, tokens in enumerate(batches):
                T = tokens.shape[1]
                if j % world == rank:
                    tokens = tokens.to(device)
                    batch["tokens"] = tokens.reshape(-1)
                    batch["window_of"] = lambda pos, T=T: windows(pos, T, before, after)
                    counts += torch.bincount(batch["tokens"], minlength=V)
                    run_until_recorded(model, tokens)
                    seen += tokens.numel()
                bar.update(tokens.numel())  # every batch, so that rank 0's bar shows the whole pass
    finally:
        bar.close()
    if world > 1:
        total = torch.tensor([seen], device=device)
        for t in (total, counts):
            dist.all_reduce(t)
        seen = int(total.item())
        for ls in stats.values():
            ls.merge_ranks()
    if logit_effect:
        direct_logit_effect(units, stats)
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "units": units.name, "description": units.description,
            "fingerprint": units.fingerprint(),
            "tokens": seen, "seq_len": T, "vocab_size": V, "dim": D, "n_layers": model.model.cfg.n_layers,
            "context_before": before, "context_after": after, "top_contexts": top, "activation": ACTIVATION_NOTE,
            "histogram_edges": histogram_edges().tolist(),
            "logit_effect": {"tokens": LOGIT_TOKENS, "through": "the final RMSNorm's gain and the unembedding"},
            "layers": [{"layer": l, "kind": units.kind(l), "k": units.sparsity(l),
                        "accumulation": "sparse" if stats[l].k is not None else "dense"} for l in layers]}
    embedding = model.model.tok_embeddings.weight.detach().to("cpu", torch.float32, copy=True)
    return Stats(meta, counts.cpu(), embedding, {l: ls.to("cpu") for l, ls in stats.items()}, pieces_of(tokenizer, V))


def _all_gather(t: torch.Tensor, world: int) -> list[torch.Tensor]:
    out = [torch.empty_like(t) for _ in range(world)]
    dist.all_gather(out, t.contiguous())
    return out


def windows(positions: torch.Tensor, T: int, before: int, after: int) -> torch.Tensor:
    """(n, before + 1 + after) flat positions of the context window around each of `positions` in a batch of
    sequences of length T; -1 where the window runs past its sequence."""
    col = positions % T
    offsets = torch.arange(-before, after + 1, device=positions.device)
    inside = (col[:, None] + offsets >= 0) & (col[:, None] + offsets < T)
    return torch.where(inside, positions[:, None] + offsets, -1)


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
        from safetensors import SafetensorError, safe_open

        path = Path(path)
        try:
            meta = json.loads((path / "stats.json").read_text())
        except (OSError, ValueError):
            raise UserError(f"{path} holds no statistics (no readable stats.json); make them with "
                            f"`topk-ds analyze stats MODEL --data DATA --out {path}`") from None
        if meta.get("format") != FORMAT:
            raise UserError(f"{path}/stats.json is not a topk_ds statistics file")
        if meta.get("format_version") != FORMAT_VERSION:
            raise UserError(f"the statistics in {path} are of format version {meta.get('format_version')}, this topk_ds "
                            f"reads version {FORMAT_VERSION}; recompute them with `topk-ds analyze stats`")
        wanted = [row["layer"] for row in meta["layers"] if layers is None or row["layer"] in layers]
        k_of = {row["layer"]: row["k"] if row["accumulation"] == "sparse" else None for row in meta["layers"]}
        try:
            with safe_open(path / "tensors.safetensors", "pt") as f:
                names = set(f.keys())
                counts, embedding = f.get_tensor("counts"), f.get_tensor("embedding")
                loaded = {l: LayerStats(l, k_of[l], **{n: f.get_tensor(f"layer{l}.{n}") for n in LayerStats.TENSORS
                                                       if f"layer{l}.{n}" in names}) for l in wanted}
            pieces = json.loads((path / "vocab.json").read_text())
        except (OSError, ValueError, KeyError, TypeError, SafetensorError) as e:
            raise UserError(f"the statistics in {path} are incomplete or corrupt ({str(e).splitlines()[0]}); "
                            f"recompute them") from None
        return cls(meta, counts, embedding, loaded, pieces, path)


def _nanmean(x: torch.Tensor) -> float | None:
    x = x[~x.isnan()]
    return x.mean().item() if len(x) else None


def _nanstd(x: torch.Tensor) -> float | None:
    x = x[~x.isnan()]
    return x.std(unbiased=False).item() if len(x) else None
