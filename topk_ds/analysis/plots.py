"""The paper's figures as PNG (matplotlib, Agg): entropies per layer of several models (Figure 3),
a neuron's activation on one token over checkpoints x layers (Figure 5), entropies over training
(Figure 4)."""

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from ..io import atomic_output  # noqa: E402


def _save(fig, out) -> Path:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(out) as tmp:
        fig.savefig(tmp, dpi=120, bbox_inches="tight", format="png")
    plt.close(fig)
    return out


def entropy_by_layer(models: list[dict], out) -> Path:
    """models: [{name, layers: [int], token: [(D,) array per layer], semantic: [...]}]: mean +- std per layer."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for m in models:
        for ax, key in zip(axes, ("token", "semantic")):
            mean = np.array([np.nanmean(v) if np.isfinite(v).any() else np.nan for v in m[key]])
            std = np.array([np.nanstd(v) if np.isfinite(v).any() else np.nan for v in m[key]])
            line, = ax.plot(m["layers"], mean, marker="o", label=m["name"])
            ax.fill_between(m["layers"], mean - std, mean + std, color=line.get_color(), alpha=0.2)
    layers = sorted({l for m in models for l in m["layers"]})
    for ax, title in zip(axes, ("token entropy", "semantic entropy")):
        ax.set(xlabel="layer", ylabel=f"{title} (nats)", title=f"{title}: mean ± std over neurons")
        ax.set_xticks(layers)
        ax.grid(alpha=0.3)
    axes[0].legend()
    return _save(fig, out)


def neuron_heatmap(trace: dict, out, layer: int | None = None) -> Path:
    """Figure 5: rows are layers, columns checkpoints."""
    mean = np.array(trace["mean"])
    fig, ax = plt.subplots(figsize=(max(4, 0.6 * len(trace["steps"]) + 2), max(3, 0.35 * len(mean) + 1.5)))
    image = ax.imshow(mean, origin="lower", aspect="auto", cmap="viridis")
    ax.set_xticks(range(len(trace["steps"])), [str(s) for s in trace["steps"]], rotation=45)
    layers = trace.get("layers", range(len(mean)))
    ax.set_yticks(range(len(mean)), [f"{l}*" if l == layer else str(l) for l in layers])
    ax.set(xlabel="training step", ylabel="layer",
           title=f"{trace.get('units', 'neuron')} index {trace['index']}: mean activation on '{trace['word']}'")
    fig.colorbar(image, ax=ax, label="mean activation")
    return _save(fig, out)


def entropy_over_training(trace: dict, out) -> Path:
    """Figure 4: per layer, the mean entropy over checkpoints with its 5th-95th percentile band; dense layers dashed."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    colors = plt.cm.viridis(np.linspace(0, 0.9, len(trace["layers"])))
    for row, color in zip(trace["layers"], colors):
        for ax, key in zip(axes, ("token", "semantic")):
            pick = lambda name: np.array([np.nan if s[name] is None else s[name] for s in row[key]], float)  # noqa: E731
            style = "--" if row["kind"] == "dense" else "-"
            ax.plot(trace["steps"], pick("mean"), style, marker="o", color=color, label=f"layer {row['layer']} ({row['kind']})")
            ax.fill_between(trace["steps"], pick("p5"), pick("p95"), color=color, alpha=0.12)
    for ax, title in zip(axes, ("token entropy", "semantic entropy")):
        ax.set(xlabel="training step", ylabel=f"{title} (nats)", title=f"{title} over training (band: 5th-95th pct)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    return _save(fig, out)


def retention(models: list[dict], out) -> Path:
    """Long-context retention (topk-ds eval --suite long): recall of planted facts by token distance and
    perplexity by position, models overlaid. models: [{name, distance: [{bucket, accuracy}], position: [{bucket, perplexity}]}]."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for m in models:
        for ax, key, value, scale in ((axes[0], "distance", "accuracy", 100), (axes[1], "position", "perplexity", 1)):
            ys = [np.nan if b[value] is None else scale * b[value] for b in m[key]]
            ax.plot(range(len(ys)), ys, marker="o", label=m["name"])
    for ax, key, ylabel, title in ((axes[0], "distance", "recalled (%)", "recall of planted facts by distance"),
                                   (axes[1], "position", "perplexity", "perplexity by position")):
        buckets = [b["bucket"] for b in models[0][key]]
        ax.set_xticks(range(len(buckets)), buckets, rotation=30)
        ax.set(xlabel=f"{key} (tokens)", ylabel=ylabel, title=title)
        ax.grid(alpha=0.3)
    axes[0].set_ylim(-2, 102)
    axes[0].legend()
    return _save(fig, out)


def contenders(result: dict, out) -> Path:
    """`analyze compare`: the [0, 1] measures side by side (left), the entropies with their spread (right)."""
    cs = result["contenders"]
    topics = len(result["topics"])
    measures = {"topics recovered": lambda c: c["topics_recovered"] / topics, "mean best F1": lambda c: c["mean_best_f1"],
                "steering success": lambda c: c["steering_success"],
                "checkpoint stability": lambda c: c["checkpoint_stability"] and c["checkpoint_stability"]["share"],
                "shared across seeds": lambda c: c["seeds"] and c["seeds"]["shared"]}
    fig, axes = plt.subplots(1, 2, figsize=(13, 4), gridspec_kw={"width_ratios": [3, 2]})
    width = 0.8 / len(cs)
    for j, c in enumerate(cs):
        values = [np.nan if f(c) is None else f(c) for f in measures.values()]
        axes[0].bar(np.arange(len(measures)) + j * width, values, width, label=c["name"])
        for e, key in enumerate(("token_entropy", "semantic_entropy")):
            s = c[key]
            axes[1].bar(e + j * width, np.nan if s["mean"] is None else s["mean"], width, yerr=s["std"] or 0,
                        capsize=3, color=f"C{j}")
    axes[0].set_xticks(np.arange(len(measures)) + 0.4 - width / 2, list(measures), rotation=15)
    axes[0].set(ylim=(0, 1.05), ylabel="share", title="against the planted topics (higher is better; gaps: n/a)")
    axes[0].legend()
    axes[1].set_xticks(np.arange(2) + 0.4 - width / 2, ["token entropy", "semantic entropy"])
    axes[1].set(ylabel="nats", title="entropy over units (lower: more specific)")
    for ax in axes:
        ax.grid(alpha=0.3, axis="y")
    return _save(fig, out)
