"""`topk-ds analyze stats|entropy|neuron|trace|browse` and `topk-ds steer`; handlers import lazily."""

import argparse
import sys
from pathlib import Path

from ..arguments import positive
from ..errors import UserError
from .settings import BINS, PERCENTILE, PROMPT, THRESHOLD_RATIO, TOP, TRACE_TOKENS

STATS_HELP = """\
Run MODEL (a converted directory, a run directory or a checkpoint tag) over --tokens tokens of
DATA (prepared shards, or .txt/.jsonl/.parquet text encoded with the model's tokenizer) in one
streaming pass, then compute token and semantic entropy (the paper's eq. 4-11, see topk_ds/analysis/entropy.py) of every neuron, and save

  OUT/stats.json           model fingerprint (config, alpha, step, weight hash), data, settings,
                           per-layer summary: L0, dead neurons, mean/std of both entropies
  OUT/tensors.safetensors  counts (V,), embedding (V, E); per layer: sums (V, D) [abar = sums /
                           counts], fires (D,), top_values (D, M), top_contexts (D, M, C),
                           token_entropy, semantic_entropy (NaN when |S| < 2), selected (|S|), theta
  OUT/vocab.json           the token strings

Activations are the positive part of each layer's output hidden state (dense layers clamped at 0
per position). TopK layers at alpha = 0 are accumulated on their k selected entries only.

Memory (besides the model and one batch): 4*V*D bytes per analysed layer for the per-token sums,
D*M*(4 + 4*C) per layer for the top contexts (C = 21 tokens), 4*V*E once for the embedding, and
for semantic entropy a V'*V' byte table of cosine bins (V' = token ids seen). For V=32000, D=1024:
131 MB per layer, and 1 GB for the table. Use --layers to analyse fewer layers."""


def check_settings(a) -> None:
    """The entropy and context settings, before any model is run."""
    if not 0 <= a.percentile <= 100:
        raise UserError(f"--percentile {a.percentile:g} must be in [0, 100]")
    if a.threshold <= 0:
        raise UserError(f"--threshold {a.threshold:g} must be > 0 (theta = THRESHOLD x percentile)")
    if not 1 <= a.bins <= 255:
        raise UserError(f"--bins {a.bins} must be in [1, 255]")
    if getattr(a, "top_contexts", 0) < 0:
        raise UserError(f"--top-contexts {a.top_contexts} must be >= 0")


def parse_neuron(text: str) -> tuple[int, int]:
    try:
        layer, index = (int(x) for x in text.split(":"))
    except ValueError:
        raise UserError(f"neuron '{text}' must be LAYER:INDEX, e.g. 0:17") from None
    return layer, index


def parse_index(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise UserError(f"neuron '{text}' must be LAYER:INDEX or INDEX, e.g. 0:17") from None


def check_run_neuron(run_dir, layer: int | None, index: int) -> None:
    """Check a neuron against a run's config.yaml (when it has one) before any checkpoint is read."""
    from ..config import load_config
    from .units import check_unit

    if (Path(run_dir) / "config.yaml").is_file():
        cfg = load_config(str(Path(run_dir) / "config.yaml"))
        check_unit(layer, index, cfg.model.n_layers, cfg.topk.width(cfg.model))


def _is_stats(path: str) -> bool:
    return (Path(path) / "stats.json").is_file()


def _concepts(explicit, stats=None):
    from .concepts import Concepts

    if explicit:
        return Concepts.load(explicit)
    recorded = stats.meta.get("concepts") if stats is not None else None
    return Concepts.load(recorded) if recorded and Path(recorded).exists() else None


def _units(model):
    """The units a command studies: the model's own neurons."""
    from .units import Neurons

    return Neurons(model)


def _collect(units, tokenizer, a, layers):
    from .data import token_batches
    from .stats import collect, compute_entropy, memory_bytes

    t = units.model.model
    seq_len = a.seq_len or min(t.cfg.max_seq_len, 1024)
    batches = token_batches(a.data, tokenizer, t.cfg.vocab_size, seq_len, a.tokens, max(1, a.batch_tokens // seq_len), a.split)
    n = len(units.check_layers(layers))
    print(f"accumulators for {n} layers: {memory_bytes(t.cfg.vocab_size, units.width, n, a.top_contexts) / 2**20:,.0f} MB",
          file=sys.stderr)
    stats = collect(units, tokenizer, batches, a.tokens, layers, a.top_contexts)
    compute_entropy(stats, a.percentile, a.threshold, a.bins)
    return stats


def _stats(a):
    from ..convert.hf_export import load
    from ..io import check_replaceable
    from .concepts import Concepts
    from .data import check_data

    out = Path(a.out)
    check_replaceable(out, "stats.json", "analyze stats")
    if (out / "stats.json").exists() and not a.force:
        raise UserError(f"{out} already holds statistics; pass --force to replace them")
    check_settings(a)
    check_data(a.data)  # before the model is loaded: a wrong path fails at once
    concepts = Concepts.load(a.concepts) if a.concepts else Concepts.beside(a.data)
    model, tokenizer = load(a.model, tag=a.tag)
    stats = _collect(_units(model), tokenizer, a, a.layers)
    stats.meta |= {"model": str(a.model), "data": str(a.data), "split": a.split,
                   "concepts": str(concepts.path.resolve()) if concepts else None}
    stats.save(out)
    short = "" if stats.tokens >= a.tokens else f" (all the data holds; {a.tokens:,} asked)"
    print(f"wrote statistics of {len(stats.layers)} layers over {stats.tokens:,} tokens{short} to {out}")


def _entropy(a):
    from .plots import entropy_by_layer
    from .stats import Stats, compute_entropy

    if a.names and len(a.names) != len(a.stats):
        raise UserError(f"--names gives {len(a.names)} names for {len(a.stats)} statistics directories")
    check_settings(a)
    models = []
    for j, path in enumerate(a.stats):
        stats = Stats.load(path)
        settings = {"percentile": a.percentile, "threshold_ratio": a.threshold, "bins": a.bins}
        if any(stats.meta["entropy"][k] != v for k, v in settings.items()):
            compute_entropy(stats, a.percentile, a.threshold, a.bins)
        name = a.names[j] if a.names else Path(path).name
        print(f"{name}: {stats.tokens:,} tokens, percentile {a.percentile:g}, threshold {a.threshold:g} x, {a.bins} bins")
        print("  layer  kind    token entropy    semantic entropy   no semantic entropy (|S| < 2)")
        for row in stats.meta["layers"]:
            s = stats.summary(row["layer"])
            fmt = lambda m, d: "n/a" if m is None else f"{m:.3f} ± {d:.3f}"  # noqa: E731
            print(f"  {row['layer']:>5}  {row['kind']:<6}  {fmt(s['token_entropy_mean'], s['token_entropy_std']):<15}  "
                  f"{fmt(s['semantic_entropy_mean'], s['semantic_entropy_std']):<17}  {s['no_semantic_entropy']}")
        models.append({"name": name, "layers": sorted(stats.layers),
                       "token": [stats.layers[l].token_entropy.numpy() for l in sorted(stats.layers)],
                       "semantic": [stats.layers[l].semantic_entropy.numpy() for l in sorted(stats.layers)]})
    if a.compare:
        print(f"wrote the per-layer entropy comparison of {len(models)} models to {entropy_by_layer(models, a.compare)}")
    else:
        print("printed the entropies (nothing written; --compare PNG draws them as the paper's Figure 3)")


def _neuron(a):
    from ..convert.hf_export import load
    from ..io import write_json
    from .report import LayerReport, format_report
    from .stats import Stats

    layer, index = parse_neuron(a.neuron)
    if a.data:
        check_settings(a)
    if _is_stats(a.model):
        stats = Stats.load(a.model, layers=[layer])
    else:
        model, tokenizer = load(a.model, tag=a.tag)
        units = _units(model)
        units.check(layer, index)
        if a.stats:
            stats = Stats.load(a.stats, layers=[layer])
            stats.check_units(units)
        elif a.data:
            stats = _collect(units, tokenizer, a, [layer])
        else:
            raise UserError(f"{a.model} is a model: pass --stats DIR (saved by `topk-ds analyze stats`) or --data DATA")
    stats.check_neuron(layer, index)
    report = LayerReport(stats, layer, _concepts(a.concepts, stats)).neuron(index, a.contexts)
    print(format_report(report))
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        write_json(Path(a.json), report)
        print(f"wrote the report of neuron {a.neuron} to {a.json}")
    else:
        print(f"printed the report of neuron {a.neuron} (nothing written; --json FILE saves it)")


def _trace(a):
    from ..io import write_json
    from .plots import entropy_over_training, neuron_heatmap
    from .trace import trace_entropy, trace_neuron

    out = Path(a.out) if a.out else Path(a.run_dir) / "analysis"
    if a.entropy == bool(a.neuron):
        raise UserError("give either --neuron L:I --token WORD (Figure 5) or --entropy (Figure 4)")
    if a.neuron and not a.token:
        raise UserError("--neuron needs --token WORD: the token whose mean activation is traced")
    if a.neuron:
        layer, index = parse_neuron(a.neuron) if ":" in a.neuron else (None, parse_index(a.neuron))
        check_run_neuron(a.run_dir, layer, index)
    out.mkdir(parents=True, exist_ok=True)
    if a.entropy:
        result = trace_entropy(a.run_dir, a.data, a.tokens, a.seq_len)
        name = "entropy-trace"
        png = entropy_over_training(result, out / f"{name}.png")
    else:
        result = trace_neuron(a.run_dir, index, a.token, a.data, a.tokens, a.seq_len)
        name = f"trace-{index}-{a.token}"
        png = neuron_heatmap(result, out / f"{name}.png", layer)
    write_json(out / f"{name}.json", result)
    print(f"wrote {png} and {out / f'{name}.json'} ({len(result['steps'])} checkpoints)")


def _browse(a):
    from .browse import build_site
    from .stats import Stats

    from ..io import check_replaceable

    check_replaceable(Path(a.out), "index.html", "analyze browse")
    concepts = _concepts(a.concepts, Stats.load(a.stats, layers=[]))
    pages = build_site(a.stats, a.out, concepts, a.contexts)
    print(f"wrote a neuron browser ({pages} neuron pages) to {a.out}/index.html (opens from file://, no network)")


def _steer(a):
    from ..convert.hf_export import load
    from ..io import write_json
    from .report import LayerReport
    from .stats import Stats
    from .steer import format_table, steer

    layer, index = parse_neuron(a.neuron)
    if a.samples < 1 or a.max_new_tokens < 1:
        raise UserError("--samples and --max-new-tokens must be >= 1")
    model, tokenizer = load(a.model, tag=a.tag)
    units = _units(model)
    units.check(layer, index)
    stats = None
    if a.stats:
        stats = Stats.load(a.stats, layers=[layer])
        stats.check_units(units)
    concepts = _concepts(a.concepts, stats)
    topic = a.topic
    if topic is not None and concepts is None:
        raise UserError("--topic needs the topics' words: pass --concepts concepts.json (or --stats DIR that recorded one)")
    if concepts is not None and topic is None:
        if stats is None:
            raise UserError("to score topic words, name the neuron's topic with --topic or pass --stats DIR to label it")
        topic = LayerReport(stats, layer, concepts).summary(index)["topic"]
    result = steer(units, tokenizer, layer, index, a.offset, a.prompt, a.samples, a.seed, a.max_new_tokens, concepts, topic)
    print(format_table(result))
    out = Path(a.out) if a.out else (Path(a.stats) / "steering" / f"{layer}_{index}.json" if a.stats
                                     else Path(f"steer_{layer}_{index}.json"))
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json(out, result)
    print(f"wrote {len(result['offsets'])} x {a.samples} samples of neuron {a.neuron} to {out}")


def _model_args(p, what: str = "MODEL") -> None:
    p.add_argument("--tag", help=f"checkpoint tag when {what} is a run directory (default: the newest complete one)")


def _entropy_args(p) -> None:
    p.add_argument("--percentile", type=float, default=PERCENTILE, help=f"theta's percentile (default {PERCENTILE:g})")
    p.add_argument("--threshold", type=float, default=THRESHOLD_RATIO,
                   help=f"theta = THRESHOLD x percentile (default {THRESHOLD_RATIO:g})")
    p.add_argument("--bins", type=int, default=BINS, help=f"cosine bins over [-1, 1], at most 255 (default {BINS})")


def _data_args(p, required: bool) -> None:
    p.add_argument("--data", required=required, help="prepared data directory (`topk-ds data prepare`), or "
                   ".txt/.jsonl/.parquet files encoded with the model's tokenizer")
    p.add_argument("--tokens", type=positive, default=1_000_000, help="tokens to run over (default 1,000,000)")
    p.add_argument("--split", default="train", choices=("train", "val"), help="split of prepared data (default train)")
    p.add_argument("--seq-len", type=int, default=None,
                   help="window length (default: the model's max_seq_len, at most 1024; use the training length)")
    p.add_argument("--batch-tokens", type=int, default=8192, help="tokens per forward pass (default 8192)")
    p.add_argument("--top-contexts", type=int, default=TOP, help=f"top-activating contexts kept per neuron (default {TOP})")
    _entropy_args(p)


def add_commands(commands) -> None:
    analyze = commands.add_parser("analyze", help="interpretability: statistics, entropies, neuron reports, tracing, browser")
    sub = analyze.add_subparsers(dest="analyze_command", required=True, parser_class=type(analyze))

    p = sub.add_parser("stats", help="activation statistics and entropies of every neuron, saved for later commands",
                       description=STATS_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="converted model directory, run directory or checkpoint tag")
    p.add_argument("--out", required=True, help="directory to write the statistics to")
    p.add_argument("--layers", type=int, nargs="+", help="layers to analyse (default: all)")
    p.add_argument("--concepts", help="concepts.json to label neurons with (default: the one beside the data's corpus)")
    p.add_argument("--force", action="store_true", help="replace existing statistics in --out")
    _model_args(p)
    _data_args(p, required=True)
    p.set_defaults(run=_stats)

    p = sub.add_parser("entropy", help="per-layer token and semantic entropy of saved statistics; --compare draws Figure 3")
    p.add_argument("stats", nargs="+", help="statistics directories (e.g. a TopK model and its dense twin)")
    p.add_argument("--names", nargs="+", help="a name per directory for the table and legend (default: directory names)")
    p.add_argument("--compare", metavar="PNG", help="draw mean ± std per layer of both entropies, all models overlaid")
    _entropy_args(p)
    p.set_defaults(run=_entropy)

    p = sub.add_parser("neuron", help="one neuron: top tokens, contexts, frequency, entropies, label, topic")
    p.add_argument("model", metavar="MODEL_OR_STATS", help="a statistics directory, or a model (with --stats or --data)")
    p.add_argument("neuron", metavar="L:I", help="layer:index, e.g. 0:17")
    p.add_argument("--stats", help="statistics of MODEL (refused when computed from another model)")
    p.add_argument("--concepts", help="concepts.json to score the label against (default: the one the statistics recorded)")
    p.add_argument("--contexts", type=int, default=10, help="top contexts to show (default 10)")
    p.add_argument("--json", help="also write the report as JSON to this file")
    _model_args(p)
    _data_args(p, required=False)
    p.set_defaults(run=_neuron)

    p = sub.add_parser("trace", help="a neuron over checkpoints x layers (Figure 5), or entropies over training (Figure 4)")
    p.add_argument("run_dir", metavar="RUN_DIR", help="a training run directory (its checkpoints/ are read with load())")
    p.add_argument("--neuron", metavar="L:I", help="neuron index I to trace in every layer (L is marked in the figure)")
    p.add_argument("--token", metavar="WORD", help="the token whose mean activation is traced (one token of the vocabulary)")
    p.add_argument("--entropy", action="store_true", help="per-layer entropy distributions over training steps")
    p.add_argument("--data", help="data to run on (default: the run's data.path)")
    p.add_argument("--tokens", type=positive, default=TRACE_TOKENS, help=f"tokens per checkpoint (default {TRACE_TOKENS:,})")
    p.add_argument("--seq-len", type=int, default=None, help="window length (default: the run's data.seq_len)")
    p.add_argument("--out", help="output directory (default RUN_DIR/analysis)")
    p.set_defaults(run=_trace)

    p = sub.add_parser("browse", help="a static HTML neuron browser of saved statistics (opens from file://)")
    p.add_argument("stats", metavar="STATS_DIR")
    p.add_argument("--out", required=True, help="site directory to write (replaced)")
    p.add_argument("--concepts", help="concepts.json for topic columns (default: the one the statistics recorded)")
    p.add_argument("--contexts", type=int, default=10, help="top contexts per neuron page (default 10)")
    p.set_defaults(run=_browse)

    p = commands.add_parser("steer", help="generate with one neuron's pre-activation offset (concept steering)",
                            description="Add each --offset to neuron L:I's pre-activation at every position (prompt and "
                            "every generated token, KV cache on) and sample with the paper's settings (temperature 0.7, "
                            "top-p 0.9, top-k 50); the unsteered baseline (offset 0) uses the same seed. With concepts "
                            "and a topic, reports the share of generated content words in the topic.")
    p.add_argument("model", help="converted model directory, run directory or checkpoint tag")
    p.add_argument("--neuron", required=True, metavar="L:I")
    p.add_argument("--offset", type=float, action="append", required=True, help="offset C (repeatable)")
    p.add_argument("--prompt", default=PROMPT, help=f"prompt (default {PROMPT!r})")
    p.add_argument("--samples", type=int, default=5, help="samples per offset (default 5)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed, the same for every offset (default 0)")
    p.add_argument("--max-new-tokens", type=int, default=128, help="tokens to generate (default 128)")
    p.add_argument("--stats", help="statistics of MODEL: label the neuron, and save the samples in STATS/steering/ for browse")
    p.add_argument("--concepts", help="concepts.json (default: the one the statistics recorded)")
    p.add_argument("--topic", help="the topic whose share of generated words to report (default: the neuron's label topic)")
    p.add_argument("--out", help="JSON file to write (default STATS/steering/L_I.json, else steer_L_I.json)")
    _model_args(p)
    p.set_defaults(run=_steer)
