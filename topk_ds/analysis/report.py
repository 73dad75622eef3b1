"""Neuron reports from saved statistics: frequency, entropies, top tokens, top contexts with the
activating token marked (and the neuron's activation at every token), the activation histogram, the
direct logit effect, a label from the top tokens and, with concepts, its topic scored. Computed a layer
at a time (vectorised over its neurons), so a report of every neuron costs one pass."""

import math
import re

from .concepts import MIN_COUNT, TOP_TOKENS, Concepts, label, show, top_tokens
from .stats import Stats

_BYTE = re.compile(r"<0x([0-9A-Fa-f]{2})>")
KINDS = {"topk": "TopK", "dense": "dense", "sae": "SAE"}


def kind_label(row: dict) -> str:
    """A layer's kind as shown ("TopK k=16", "dense", "SAE k=16") from its statistics row."""
    name = KINDS.get(row["kind"], row["kind"])
    return f"{name} k={row['k']}" if row.get("k") is not None else name


def text_of(pieces: list[str]) -> str:
    """Token strings as text (byte-fallback pieces of ASCII as their character)."""
    text = "".join(show(p) for p in pieces)
    return _BYTE.sub(lambda m: chr(int(m.group(1), 16)) if int(m.group(1), 16) < 128 else "\ufffd", text)


def _number(x) -> float | None:
    x = float(x)
    return None if math.isnan(x) else x


class LayerReport:
    def __init__(self, stats: Stats, layer: int, concepts: Concepts | None = None, n: int = TOP_TOKENS,
                 min_count: int = MIN_COUNT):
        self.stats, self.layer, self.ls = stats, layer, stats.layer(layer)
        self.row = next(r for r in stats.meta["layers"] if r["layer"] == layer)
        abar = stats.abar(layer)
        self.top_values, self.top_ids = top_tokens(abar, stats.counts, n, min_count)  # (n, D)
        self.scores = None if concepts is None else concepts.score(abar, stats.counts, self.ls.theta, stats.pieces,
                                                                   self.top_values, self.top_ids)

    def summary(self, i: int) -> dict:
        """One neuron's row of the layer table."""
        ls, tokens = self.ls, self.stats.tokens
        out = {"neuron": f"{self.layer}:{i}", "layer": self.layer, "index": i,
               "fires": int(ls.fires[i]), "frequency": int(ls.fires[i]) / tokens,
               "token_entropy": _number(ls.token_entropy[i]), "semantic_entropy": _number(ls.semantic_entropy[i]),
               "selected": int(ls.selected[i]), "max_activation": ls.top_values[i, 0].item() if ls.top_values.shape[1] else 0.0,
               "top_mean": max(self.top_values[0, i].item(), 0.0) if len(self.top_values) else 0.0,
               "label": label(self.top_ids[:, i], self.top_values[:, i], self.stats.pieces),
               "top_piece": self.stats.pieces[self.top_ids[0, i]] if len(self.top_values) and self.top_values[0, i] > 0
               else None}
        if self.scores is not None:
            out |= {"topic": self.scores["topic"][i], "precision": self.scores["precision"][i].item(),
                    "recall": self.scores["recall"][i].item()}
        return out

    def neuron(self, i: int, contexts: int = 10) -> dict:
        self.stats.check_neuron(self.layer, i)
        ls, stats, row = self.ls, self.stats, self.row
        report = self.summary(i) | {
            "kind": kind_label(row), "unit": stats.meta.get("units", "neuron"), "tokens": stats.tokens,
            "mean_activation": ls.sums[:, i].sum().item() / stats.tokens, "theta": ls.theta[i].item(),
            "layer_token_entropy_mean": row.get("token_entropy_mean"),
            "layer_semantic_entropy_mean": row.get("semantic_entropy_mean"),
            "top_tokens": [{"id": v, "token": show(stats.pieces[v]), "mean": m, "count": int(stats.counts[v])}
                           for v, m in zip(self.top_ids[:, i].tolist(), self.top_values[:, i].tolist()) if m > 0],
            "contexts": []}
        before = stats.meta["context_before"]

        def text(ids):
            return text_of([stats.pieces[v] for v in ids if v >= 0])

        for value, ctx, acts in zip(ls.top_values[i, :contexts].tolist(), ls.top_contexts[i, :contexts].tolist(),
                                    ls.top_acts[i, :contexts].tolist()):
            if value <= 0:
                break
            inside = [c for c, v in enumerate(ctx) if v >= 0]  # the window's tokens, each with the neuron's activation
            report["contexts"].append({"activation": value, "before": text(ctx[:before]),
                                       "token": text(ctx[before:before + 1]), "after": text(ctx[before + 1:]),
                                       "tokens": [text([ctx[c]]) for c in inside], "acts": [acts[c] for c in inside],
                                       "at": inside.index(before)})
        used = ls.histogram[i].nonzero().flatten().tolist()  # the bins from its first to its last non-empty one
        lo, hi = (used[0], used[-1] + 1) if used else (0, 0)
        report["histogram"] = {"edges": stats.meta["histogram_edges"][lo:hi + 1] if used else [],
                               "counts": ls.histogram[i, lo:hi].tolist()}
        report["promoted"], report["suppressed"] = (
            [{"id": v, "token": text([v]), "logit": x} for v, x in zip(ids[i].tolist(), values[i].tolist())]
            for ids, values in ((ls.promoted_ids, ls.promoted), (ls.suppressed_ids, ls.suppressed)))
        return report


def _fmt(x, digits: int = 2) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def format_report(r: dict) -> str:
    lines = [f"{r['unit']} {r['neuron']} ({r['kind']} layer), statistics over {r['tokens']:,} tokens",
             f"  fires on {r['frequency']:.2%} of tokens ({r['fires']:,}); mean activation {r['mean_activation']:.4f}, "
             f"max {r['max_activation']:.3f}",
             f"  token entropy     {_fmt(r['token_entropy'])}  (layer mean {_fmt(r['layer_token_entropy_mean'])})",
             f"  semantic entropy  {_fmt(r['semantic_entropy'])}  (layer mean {_fmt(r['layer_semantic_entropy_mean'])}; "
             f"|S| = {r['selected']} tokens above theta = {r['theta']:.3f})",
             f"  label: {r['label']}"]
    if "topic" in r:
        lines.append(f"  topic: {r['topic'] or 'none'}  precision {r['precision']:.2f}, recall {r['recall']:.2f}")
    for name in ("promoted", "suppressed"):
        lines.append(f"  logits {name}: " + ", ".join(f"{t['token']!r} {t['logit']:+.2f}" for t in r[name]))
    lines.append("  top tokens (mean activation, count):")
    lines += [f"    {t['token']!r:>18}  {t['mean']:8.3f}  {t['count']:>8,}" for t in r["top_tokens"]]
    lines.append("  top contexts (activation: text with the token in [[ ]]):")
    lines += [f"    {c['activation']:7.3f}  {c['before']}[[{c['token']}]]{c['after']}".replace("\n", "⏎")
              for c in r["contexts"]]
    return "\n".join(lines)
