"""`topk-ds analyze stats|entropy|neuron|trace|browse|export` and `topk-ds steer`; handlers import lazily."""

import argparse
import dataclasses
import functools
import sys
from pathlib import Path

from ..arguments import count, device_args, number, positive
from ..errors import UserError
from ..io import check_output
from .settings import BINS, EXPORT_FORMATS, PERCENTILE, PROMPT, THRESHOLD_RATIO, TOP, TRACE_TOKENS

STATS_HELP = """\
Run MODEL (a converted directory, a run directory or a checkpoint tag) over --tokens tokens of
DATA (prepared shards, or .txt/.jsonl/.parquet text encoded with the model's tokenizer) in one
streaming pass, then compute token and semantic entropy (the paper's eq. 4-11, see topk_ds/analysis/entropy.py) of every neuron, and save

  OUT/stats.json           model fingerprint (config, alpha, step, weight hash), data, settings,
                           per-layer summary: L0, dead neurons, mean/std of both entropies
  OUT/tensors.safetensors  counts (V,), embedding (V, E); per layer: sums (V, D) [abar = sums /
                           counts], fires (D,), histogram (D, 64) [non-zero activations in
                           log-spaced bins, 1e-4..1e4], top_values (D, M), top_contexts (D, M, C)
                           and top_acts (D, M, C) [the neuron's activation at each context token],
                           promoted / suppressed (+ _ids) (D, 10) [direct logit effect: its
                           direction through the final norm's gain and the unembedding],
                           token_entropy, semantic_entropy (NaN when |S| < 2), selected (|S|), theta
  OUT/vocab.json           the token strings

Activations are the positive part of each layer's output hidden state (dense layers clamped at 0
per position). TopK layers at alpha = 0 are accumulated on their k selected entries only.

Memory, stated before the model is loaded (and refused, naming the need and what is available, when it
does not fit): on the model's device the weights, 4*V*D bytes per analysed layer for the per-token sums,
D*M*(4 + 8*C) per layer for the top contexts with their activations (C = 21 tokens), 520*D for the
histograms, and one batch's activations; in host memory the accumulators again (they are saved from
there), 4*V*E for the embedding and, for semantic entropy, a V'*V' byte table of cosine bins (V' = token
ids seen). For V=32000, D=2048: 270 MB per layer (6.5 GB for 24 layers), and 1 GB for the table. Use
--layers to analyse fewer layers.

On G processes: `deepspeed --num_gpus G --module topk_ds.analysis stats ...` (or torchrun --nproc-per-node
G -m topk_ds.analysis, mpirun, srun) splits the batches among them and writes what one process would."""



EXPORT_HELP = """\
Write saved statistics (`topk-ds analyze stats`) in the format of another tool; nothing is recomputed.

  neuronpedia  Neuronpedia's import layout: OUT/MODEL_ID/LAYER-SOURCE_SET/{model,release,sourceset,
               source}.jsonl, features/batch-N.jsonl.gz and activations/batch-N.jsonl.gz (the records
               Neuronpedia's export and SAEDashboard's exporter write), for neurons and SAE latents
  sparsify     every TopK layer as an EleutherAI sparsify SparseCoder (identity encoder and decoder,
               the layer's k): OUT/layers.L.act/{cfg.json,sae.safetensors}; opens with
               sparsify.SparseCoder.load_many(OUT, local=True)
  saelens      the same as SAELens TopK SAEs: OUT/layers.L.act/{cfg.json,sae_weights.safetensors};
               opens with sae_lens.SAE.load_from_disk(OUT/layers.L.act)

The SAE formats need the model: the one whose path stats.json recorded, or --model."""


def check_settings(a) -> None:
    """The entropy and context settings, before any model is run."""
    if not 0 <= a.percentile <= 100:
        raise UserError(f"--percentile {a.percentile:g} must be in [0, 100]")
    if a.threshold <= 0:
        raise UserError(f"--threshold {a.threshold:g} must be > 0 (theta = THRESHOLD x percentile)")
    if not 1 <= a.bins <= 255:
        raise UserError(f"--bins {a.bins} must be in [1, 255]")


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


def check_run_neuron(run_dir, layer: int | None, index: int, sae=None) -> None:
    """Check a neuron against a run's config.yaml (when it has one), or a latent against its SAE, before any
    checkpoint is read."""
    from ..config import load_config
    from .units import check_layers, check_unit

    if sae:
        from ..sae.library import read_record

        r = read_record(sae)
        n = r["model_fingerprint"]["config"]["model"]["n_layers"]
        if layer is not None:
            check_layers([layer], r["layers"], n)
        check_unit(None, index, n, r["num_latents"], "latent")
    elif (Path(run_dir) / "config.yaml").is_file():
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


def _units(model, a):
    """The units a command studies: the model's own neurons, or with --sae DIR that SAE's latents."""
    if getattr(a, "sae", None):
        from ..sae import Latents

        return Latents(model, a.sae)
    from .units import Neurons

    return Neurons(model)


def _unit_layout(a, model, topk) -> tuple[list[int], int]:
    """(layers that have units, units per layer), before any weights are read: the SAE's with --sae, else the
    model's neurons."""
    if getattr(a, "sae", None):
        from ..sae.library import read_record

        r = read_record(a.sae)
        return r["layers"], r["num_latents"]
    return list(range(model.n_layers)), topk.width(model)


def _check_stats_sae(stats, a) -> None:
    """With --sae DIR, statistics read without a model must be of that SAE's latents."""
    if not getattr(a, "sae", None):
        return
    from ..sae.latents import sae_fingerprint
    from ..sae.library import load

    theirs = stats.meta["fingerprint"].get("sae")
    if theirs != sae_fingerprint(load(a.sae)):
        what = "of another SAE" if theirs else "of a model's neurons"
        raise UserError(f"the statistics at {stats.path} are {what}, not of the latents of the SAE in {a.sae}; "
                        f"compute them with `topk-ds analyze stats MODEL --sae {a.sae}`")


def _seq_len(requested: int | None, model) -> int:
    """The window length: as asked (at most the model's context, as eval refuses longer), else the model's
    max_seq_len up to 1024."""
    if requested is not None and requested > model.max_seq_len:
        raise UserError(f"--seq-len {requested} exceeds the model's context (max_seq_len {model.max_seq_len}); "
                        f"choose --seq-len <= {model.max_seq_len}")
    return requested or min(model.max_seq_len, 1024)


def _plan_pass(a, layers, what: str = "analyze stats"):
    """Before any weights are read: the device, the layers, the window length, the memory the pass needs
    (refused in one line when it does not fit) and what it will cost. -> (device, dtype, layers, seq_len)."""
    import torch

    from ..convert.hf_export import read_config
    from ..devices import check_memory, cost_line, resolve
    from ..train.distributed import rank, world_size
    from .stats import memory_needs
    from .units import check_layers

    device, dtype = resolve(a.device, a.dtype)
    model, topk = read_config(a.model, a.tag)
    available, width = _unit_layout(a, model, topk)
    layers = check_layers(layers, available, model.n_layers)
    seq_len = _seq_len(a.seq_len, model)
    batch_tokens = max(1, a.batch_tokens // seq_len) * seq_len
    on_device, on_host = memory_needs(model, width, len(layers), batch_tokens, dtype.itemsize, a.top_contexts)
    hint = "analyse fewer layers with --layers (or use fewer --batch-tokens)"
    lines = [check_memory(what, on_host | on_device, device, hint)] if device.type == "cpu" else \
        [check_memory(what, on_device, device, hint), check_memory(what, on_host, torch.device("cpu"), hint)]
    forward = dataclasses.replace(model, n_layers=max(layers) + 1)  # the pass stops after the last analysed layer
    flops = forward.flops_per_token(seq_len, training=False) - 2 * model.vocab_size * model.dim  # no LM head
    lines.append(cost_line(what, -(-a.tokens // seq_len) * seq_len, flops, device, dtype, world_size()))
    if rank() == 0:
        print("\n".join(lines), file=sys.stderr, flush=True)
    return device, dtype, layers, seq_len


def _collect(units, tokenizer, a, layers, seq_len):
    from ..train.distributed import rank
    from .data import token_batches
    from .stats import collect, compute_entropy

    batches = token_batches(a.data, tokenizer, units.model.model.cfg.vocab_size, seq_len, a.tokens,
                            max(1, a.batch_tokens // seq_len), a.split)
    stats = collect(units, tokenizer, batches, a.tokens, layers, a.top_contexts)
    if rank() == 0:  # on several processes every one holds the merged statistics; one goes on with them
        compute_entropy(stats, a.percentile, a.threshold, a.bins)
    return stats


def _stats(a):
    from ..convert.hf_export import load
    from ..io import check_replaceable
    from ..train.distributed import rank
    from .concepts import Concepts
    from .data import check_data

    out = Path(a.out)
    check_replaceable(out, "stats.json", "analyze stats")
    if (out / "stats.json").exists() and not a.force:
        raise UserError(f"{out} already holds statistics; pass --force to replace them")
    check_settings(a)
    check_data(a.data)  # before the model is loaded: a wrong path fails at once
    concepts = Concepts.load(a.concepts) if a.concepts else Concepts.beside(a.data)
    device, dtype, layers, seq_len = _plan_pass(a, a.layers)
    model, tokenizer = load(a.model, tag=a.tag, device=device, dtype=dtype)
    stats = _collect(_units(model, a), tokenizer, a, layers, seq_len)
    if rank() != 0:  # one process writes
        return
    stats.meta |= {"model": str(Path(a.model).resolve()), "tag": a.tag, "data": str(a.data), "split": a.split,
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
    if a.compare:
        check_output(a.compare, "analyze entropy --compare", kind="file")
        if Path(a.compare).suffix.lower() != ".png":
            raise UserError(f"--compare {a.compare}: the figure is written as a PNG; name it FILE.png")
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
    from ..convert.hf_export import load, read_config
    from ..devices import resolve
    from ..io import write_json
    from .report import LayerReport, format_report
    from .stats import Stats

    layer, index = parse_neuron(a.neuron)
    if a.json:
        check_output(a.json, "analyze neuron --json", kind="file")
    if a.data:
        check_settings(a)
    if _is_stats(a.model):
        stats = Stats.load(a.model, layers=[layer])
        _check_stats_sae(stats, a)
    elif a.stats or a.data:
        if a.data:
            device, dtype, _, seq_len = _plan_pass(a, [layer], "analyze neuron")
        else:
            device, dtype = resolve(a.device, a.dtype)
        model, tokenizer = load(a.model, tag=a.tag, device=device, dtype=dtype)
        units = _units(model, a)
        units.check(layer, index)
        if a.stats:
            stats = Stats.load(a.stats, layers=[layer])
            stats.check_units(units)
        else:
            stats = _collect(units, tokenizer, a, [layer], seq_len)
    else:
        read_config(a.model, a.tag)  # a model, else what it is not
        raise UserError(f"{a.model} is a model: pass --stats DIR (saved by `topk-ds analyze stats`) or --data DATA")
    stats.check_neuron(layer, index)
    report = LayerReport(stats, layer, _concepts(a.concepts, stats)).neuron(index, a.contexts)
    print(format_report(report))
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        write_json(Path(a.json), report)
        print(f"wrote the report of {report['unit']} {a.neuron} to {a.json}")
    else:
        print(f"printed the report of {report['unit']} {a.neuron} (nothing written; --json FILE saves it)")


def _trace(a):
    from ..config import load_config
    from ..convert.hf_export import run_checkpoints
    from ..devices import check_memory, cost_line, resolve
    from ..io import write_json
    from .plots import entropy_over_training, neuron_heatmap
    from .trace import run_data, trace_entropy, trace_neuron

    out = check_output(Path(a.out) if a.out else Path(a.run_dir) / "analysis", "analyze trace")
    if a.entropy == bool(a.neuron):
        raise UserError("give either --neuron L:I --token WORD (Figure 5) or --entropy (Figure 4)")
    if a.neuron and not a.token:
        raise UserError("--neuron needs --token WORD: the token whose mean activation is traced")
    if a.neuron:
        layer, index = parse_neuron(a.neuron) if ":" in a.neuron else (None, parse_index(a.neuron))
        check_run_neuron(a.run_dir, layer, index, a.sae)
    device, dtype = resolve(a.device, a.dtype)
    data, seq_len = run_data(a.run_dir, a.data, a.seq_len)
    checkpoints = run_checkpoints(a.run_dir)
    if (Path(a.run_dir) / "config.yaml").is_file():
        model = load_config(str(Path(a.run_dir) / "config.yaml")).model
        print(check_memory("analyze trace", {"one checkpoint's model": model.num_params() * dtype.itemsize}, device),
              file=sys.stderr)
        tokens = -(-a.tokens // seq_len) * seq_len
        print(cost_line(f"analyze trace over {len(checkpoints)} checkpoints", len(checkpoints) * tokens,
                        model.flops_per_token(seq_len, training=False), device, dtype), file=sys.stderr, flush=True)
    out.mkdir(parents=True, exist_ok=True)
    units_of = functools.partial(_units, a=a)
    prefix = "sae-" if a.sae else ""  # a latent's trace beside the neuron's of the same index
    if a.entropy:
        result = trace_entropy(a.run_dir, data, a.tokens, seq_len, device=device, dtype=dtype, units_of=units_of)
        name = f"{prefix}entropy-trace"
        png = entropy_over_training(result, out / f"{name}.png")
    else:
        result = trace_neuron(a.run_dir, index, a.token, data, a.tokens, seq_len, device=device, dtype=dtype,
                              units_of=units_of)
        name = f"{prefix}trace-{index}-{a.token}"
        png = neuron_heatmap(result, out / f"{name}.png", layer)
    write_json(out / f"{name}.json", result)
    print(f"wrote {png} and {out / f'{name}.json'} ({len(result['steps'])} checkpoints)")


def _browse(a):
    from .browse import build_site
    from .stats import Stats

    from ..io import check_replaceable

    check_replaceable(Path(a.out), "index.html", "analyze browse")
    stats = Stats.load(a.stats, layers=[])
    _check_stats_sae(stats, a)
    concepts = _concepts(a.concepts, stats)
    pages = build_site(a.stats, a.out, concepts, a.contexts)
    unit = stats.meta.get("units", "neuron")
    print(f"wrote a {unit} browser ({pages} {unit} pages) to {a.out}/index.html (opens from file://, no network)")


def _export(a):
    from ..io import check_replaceable
    from .export import MARKER, export

    check_replaceable(Path(a.out), MARKER, "analyze export")
    names = {"model_id": a.model_id, "source_set": a.source_set, "release": a.release, "creator": a.creator}
    written = export(a.stats, a.format, a.out, a.model, a.layers, names)
    print(f"wrote {len(written)} {'sources' if a.format == 'neuronpedia' else 'SAEs'} in {a.format} format to {a.out} "
          f"({', '.join(written)})")


def _steer(a):
    from ..convert.hf_export import load
    from ..io import write_json
    from .report import LayerReport
    from .stats import Stats
    from .steer import format_table, steer

    layer, index = parse_neuron(a.neuron)
    if a.greedy and a.samples not in (None, 1):
        raise UserError(f"--greedy decodes one text per offset; drop --samples {a.samples}")
    samples = a.samples or (1 if a.greedy else 5)
    out = Path(a.out) if a.out else (Path(a.stats) / "steering" / f"{layer}_{index}.json" if a.stats
                                     else Path(f"steer_{layer}_{index}.json"))
    check_output(out, "steer", kind="file")
    device, dtype = _plan_generation(a, layer, len({0.0, *a.offset}), samples)
    model, tokenizer = load(a.model, tag=a.tag, device=device, dtype=dtype)
    units = _units(model, a)
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
    result = steer(units, tokenizer, layer, index, a.offset, a.prompt, samples, a.seed, a.max_new_tokens, concepts, topic,
                   a.greedy)
    print(format_table(result))
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json(out, result)
    print(f"wrote {len(result['offsets'])} x {samples} samples of {units.name} {a.neuron} to {out}")


def _plan_generation(a, layer: int, offsets: int, samples: int):
    """Before any weights are read, for steer: the device, the layer, the memory of the model and the cost of
    `samples` continuations per offset (the unsteered one included). -> (device, dtype)."""
    from ..convert.hf_export import read_config
    from ..devices import check_memory, cost_line, resolve
    from .units import check_layers

    device, dtype = resolve(a.device, a.dtype)
    model, topk = read_config(a.model, a.tag)
    check_layers([layer], _unit_layout(a, model, topk)[0], model.n_layers)
    print(check_memory("steer", {"model": model.num_params() * dtype.itemsize}, device), file=sys.stderr)
    tokens = offsets * samples * (a.max_new_tokens + len(a.prompt.split()) + 1)  # ~ a token per word of the prompt
    print(cost_line(f"steer: {offsets} offsets x {samples} samples of {a.max_new_tokens} new tokens", tokens,
                    model.flops_per_token(a.max_new_tokens, training=False), device, dtype), file=sys.stderr, flush=True)
    return device, dtype


COMPARE_HELP = """\
The paper's central claim as a measurement: TopK LM neurons (--topk), its dense twin's neurons (--dense)
and the latents of SAEs trained on the dense twin (--sae, from `topk-ds sae train`), at the layers they
share, over the same --tokens tokens of DATA, scored against the planted topics (concepts.json):
concept recovery (best unit's F1 per topic), token and semantic entropy, steering success of the top
concept units, stability over the runs' last --checkpoints checkpoints (an SAE is trained anew on each
earlier checkpoint with its own settings; units are matched by the Hungarian algorithm on decoder
cosine), with --seeds N the share of SAE latents shared across seeds, and the cost: training time and
FLOPs against the dense model's, and validation loss with each layer's stream replaced by the units'
reconstruction. Pass run directories to measure stability and training time.

  OUT/compare.json   one object per contender under "contenders" (definitions in topk_ds/analysis/compare.py)
  OUT/compare.md     the table and what it says
  OUT/compare.png    the measures side by side
  OUT/saes/          the SAEs trained for stability and seeds"""


def _run_of(path) -> Path | None:
    """A run directory (it has checkpoints to read); a converted model or a single tag has none."""
    return Path(path) if (Path(path) / "checkpoints").is_dir() else None


def _compare(a):
    from ..convert.hf_export import load
    from ..devices import cost_line, resolve
    from ..io import atomic_output, check_replaceable, write_json
    from ..sae import Latents
    from ..sae.library import read_record
    from ..sae.train import check_precision
    from .compare import Comparison, Contender, Settings, markdown
    from .concepts import Concepts
    from .data import check_data
    from .plots import contenders as contenders_figure
    from .units import Neurons, model_fingerprint

    out = Path(a.out)
    check_replaceable(out, "compare.json", "analyze compare")
    if (out / "compare.json").exists() and not a.force:
        raise UserError(f"{out} already holds a comparison; pass --force to replace it")
    if a.checkpoints < 2:
        raise UserError(f"--checkpoints {a.checkpoints} must be >= 2: stability compares earlier checkpoints with the last")
    device, dtype = resolve(a.device, a.dtype)
    check_precision(device, dtype)  # SAEs are trained anew for stability and seeds
    check_data(a.data)
    concepts = Concepts.load(a.concepts) if a.concepts else Concepts.beside(a.data)
    if concepts is None:
        raise UserError(f"no concepts.json beside {a.data}: pass --concepts (the planted topics the units are scored on)")
    records = [read_record(d) for d in a.sae]  # every SAE directory checked before a model loads
    topk, tokenizer = load(a.topk, device=device, dtype=dtype)
    dense, _ = load(a.dense, device=device, dtype=dtype)
    if tokenizer is None:
        raise UserError(f"{a.topk} has no tokenizer: steering needs one")
    if topk.config.vocab_size != dense.config.vocab_size:
        raise UserError(f"--topk and --dense have different vocabularies ({topk.config.vocab_size} and "
                        f"{dense.config.vocab_size} tokens): compare a TopK LM with its dense twin")
    contenders = [Contender("TopK LM", Neurons(topk), _run_of(a.topk)), Contender("dense", Neurons(dense), _run_of(a.dense))]
    mine = model_fingerprint(dense)
    names = [f"SAE {r['expansion']}x" for r in records]
    for d, r, name in zip(a.sae, records, names):
        theirs = r["model_fingerprint"]
        if theirs["weights"] != mine["weights"]:
            raise UserError(f"the SAE in {d} was trained on another model (step {theirs.get('train_step')}, weights "
                            f"{theirs['weights']}), not on --dense (step {mine.get('train_step')}, weights "
                            f"{mine['weights']}): the SAE contender reads the dense twin")
        if names.count(name) > 1:
            name = f"{name} k={r['k']} seed {r['seed']}"
        contenders.append(Contender(name, Latents(dense, d), _run_of(a.dense)))
    settings = Settings(data=a.data, split=a.split, tokens=a.tokens, seq_len=a.seq_len, val_tokens=a.val_tokens,
                        checkpoints=a.checkpoints, seeds=a.seeds, steer_units=a.steer_units, samples=a.samples,
                        max_new_tokens=a.max_new_tokens, seed=a.seed)
    with atomic_output(out) as tmp:
        tmp.mkdir()
        comparison = Comparison(contenders, tokenizer, concepts, settings, tmp, reference=contenders[1])
        print(cost_line(f"analyze compare: the LM passes of {len(contenders)} contenders", *comparison.lm_passes(),
                        device, dtype), file=sys.stderr, flush=True)
        result = comparison.run()
        result["models"] = {"topk": str(a.topk), "dense": str(a.dense), "sae": [str(d) for d in a.sae]}
        write_json(tmp / "compare.json", result)
        contenders_figure(result, tmp / "compare.png")
        (tmp / "compare.md").write_text(markdown(result))
    print(f"wrote compare.md, compare.json and compare.png ({len(contenders)} contenders) to {out}")


def _model_args(p, what: str = "MODEL") -> None:
    p.add_argument("--tag", help=f"checkpoint tag when {what} is a run directory (default: the newest complete one)")


def _sae_arg(p, what: str) -> None:
    p.add_argument("--sae", metavar="DIR", help=what)


def _entropy_args(p) -> None:
    p.add_argument("--percentile", type=number, default=PERCENTILE, help=f"theta's percentile (default {PERCENTILE:g})")
    p.add_argument("--threshold", type=number, default=THRESHOLD_RATIO,
                   help=f"theta = THRESHOLD x percentile (default {THRESHOLD_RATIO:g})")
    p.add_argument("--bins", type=int, default=BINS, help=f"cosine bins over [-1, 1], at most 255 (default {BINS})")


def _data_args(p, required: bool) -> None:
    p.add_argument("--data", required=required, help="prepared data directory (`topk-ds data prepare`), or "
                   ".txt/.jsonl/.parquet files encoded with the model's tokenizer")
    p.add_argument("--tokens", type=positive, default=1_000_000, help="tokens to run over (default 1,000,000)")
    p.add_argument("--split", default="train", choices=("train", "val"), help="split of prepared data (default train)")
    p.add_argument("--seq-len", type=positive, default=None, help="window length, at most the model's max_seq_len "
                   "(default: the model's max_seq_len, at most 1024; use the training length)")
    p.add_argument("--batch-tokens", type=positive, default=8192, help="tokens per forward pass (default 8192)")
    p.add_argument("--top-contexts", type=count, default=TOP, help=f"top-activating contexts kept per neuron (default {TOP})")
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
    device_args(p)
    _sae_arg(p, "statistics of the latents of the SAE in DIR (`topk-ds sae train`) at its layers, instead of the "
                "model's neurons")
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
    p.add_argument("--contexts", type=count, default=10, help="top contexts to show (default 10)")
    p.add_argument("--json", help="also write the report as JSON to this file")
    _model_args(p)
    _data_args(p, required=False)
    device_args(p)
    _sae_arg(p, "L:I is latent I of the SAE in DIR at layer L (statistics given must be of that SAE)")
    p.set_defaults(run=_neuron)

    p = sub.add_parser("trace", help="a neuron over checkpoints x layers (Figure 5), or entropies over training (Figure 4)")
    p.add_argument("run_dir", metavar="RUN_DIR", help="a training run directory (its checkpoints/ are read with load())")
    p.add_argument("--neuron", metavar="L:I", help="neuron index I to trace in every layer (L is marked in the figure)")
    p.add_argument("--token", metavar="WORD", help="the token whose mean activation is traced (one token of the vocabulary)")
    p.add_argument("--entropy", action="store_true", help="per-layer entropy distributions over training steps")
    p.add_argument("--data", help="data to run on (default: the run's data.path)")
    p.add_argument("--tokens", type=positive, default=TRACE_TOKENS, help=f"tokens per checkpoint (default {TRACE_TOKENS:,})")
    p.add_argument("--seq-len", type=positive, default=None, help="window length (default: the run's data.seq_len)")
    p.add_argument("--out", help="output directory (default RUN_DIR/analysis)")
    device_args(p)
    _sae_arg(p, "trace latent I of the SAE in DIR (the same SAE applied to every checkpoint) at its layers")
    p.set_defaults(run=_trace)

    p = sub.add_parser("browse", help="a static HTML neuron browser of saved statistics (opens from file://)")
    p.add_argument("stats", metavar="STATS_DIR")
    p.add_argument("--out", required=True, help="site directory to write (replaced)")
    p.add_argument("--concepts", help="concepts.json for topic columns (default: the one the statistics recorded)")
    p.add_argument("--contexts", type=count, default=10, help="top contexts per neuron page (default 10)")
    _sae_arg(p, "the SAE the statistics were computed from (checked)")
    p.set_defaults(run=_browse)

    p = sub.add_parser("export", help="saved statistics as Neuronpedia's import layout, or TopK layers as SAEs of "
                       "sparsify / SAELens", description=EXPORT_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("stats", metavar="STATS_DIR")
    p.add_argument("--format", required=True, choices=EXPORT_FORMATS)
    p.add_argument("--out", required=True, help="directory to write (replaced as a whole)")
    p.add_argument("--layers", type=int, nargs="+", help="layers to export (default: every analysed layer)")
    p.add_argument("--model", help="sparsify/saelens: the model the statistics came from (default: the one recorded "
                   "in STATS_DIR/stats.json; checked against the statistics' fingerprint)")
    p.add_argument("--model-id", help="neuronpedia: the model's id (default topk-llama-DIMxLAYERS-kK)")
    p.add_argument("--source-set", help="neuronpedia: the source set (default topk-res-WIDTH, sae-res-WIDTH for latents)")
    p.add_argument("--release", help="neuronpedia: the release name (default topk-ds)")
    p.add_argument("--creator", help="neuronpedia: the creator's name (default topk_ds)")
    p.set_defaults(run=_export)

    p = sub.add_parser("compare", help="TopK LM neurons vs dense-twin neurons vs SAE latents, against the planted topics",
                       description=COMPARE_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--topk", required=True, metavar="RUN_OR_MODEL", help="the TopK LM (a run directory for stability and cost)")
    p.add_argument("--dense", required=True, metavar="RUN_OR_MODEL", help="its dense twin (a run directory likewise)")
    p.add_argument("--sae", required=True, action="append", metavar="DIR",
                   help="an SAE trained on --dense by `topk-ds sae train` (repeatable: one contender each)")
    p.add_argument("--data", required=True, help="the data the statistics run over (prepared data: its val split "
                   "gives the validation loss)")
    p.add_argument("--concepts", help="concepts.json of the planted topics (default: the one beside the data's corpus)")
    p.add_argument("--out", required=True, help="directory to write the comparison to")
    p.add_argument("--tokens", type=positive, default=1_000_000, help="statistics tokens (default 1,000,000)")
    p.add_argument("--split", default="train", choices=("train", "val"), help="split of prepared data (default train)")
    p.add_argument("--seq-len", type=positive, default=None, help="window length (default: the model's, at most 1024)")
    p.add_argument("--val-tokens", type=positive, default=50_000, help="validation tokens for the losses (default 50,000)")
    p.add_argument("--checkpoints", type=int, default=2, metavar="M", help="the runs' last M checkpoints for stability (default 2)")
    p.add_argument("--seeds", type=positive, default=1, metavar="N",
                   help="train each SAE with N - 1 more seeds and report the latents they share (default 1: none)")
    p.add_argument("--steer-units", type=positive, default=5, metavar="N", help="top concept units steered (default 5)")
    p.add_argument("--samples", type=positive, default=6, help="steering samples per unit and scale (default 6)")
    p.add_argument("--max-new-tokens", type=positive, default=48, help="tokens per steering sample (default 48)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed, the same for every contender (default 0)")
    p.add_argument("--force", action="store_true", help="replace a comparison already in --out")
    device_args(p)
    p.set_defaults(run=_compare)

    p = commands.add_parser("steer", help="generate with one neuron's pre-activation offset (concept steering)",
                            description="Add each --offset to neuron L:I's pre-activation at every position (prompt and "
                            "every generated token, KV cache on) and sample with the paper's settings (temperature 0.7, "
                            "top-p 0.9, top-k 50); the unsteered baseline (offset 0) uses the same seed. With concepts "
                            "and a topic, reports the share of generated content words in the topic.")
    p.add_argument("model", help="converted model directory, run directory or checkpoint tag")
    p.add_argument("--neuron", required=True, metavar="L:I")
    p.add_argument("--offset", type=number, action="append", required=True, help="offset C (repeatable)")
    p.add_argument("--prompt", default=PROMPT, help=f"prompt (default {PROMPT!r})")
    p.add_argument("--samples", type=positive, default=None, help="samples per offset (default 5; 1 with --greedy)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed, the same for every offset (default 0)")
    p.add_argument("--greedy", action="store_true", help="greedy decoding instead of the paper's sampling (one text "
                   "per offset, the same on any machine)")
    p.add_argument("--max-new-tokens", type=positive, default=128, help="tokens to generate (default 128)")
    p.add_argument("--stats", help="statistics of MODEL: label the neuron, and save the samples in STATS/steering/ for browse")
    p.add_argument("--concepts", help="concepts.json (default: the one the statistics recorded)")
    p.add_argument("--topic", help="the topic whose share of generated words to report (default: the neuron's label topic)")
    p.add_argument("--out", help="JSON file to write (default STATS/steering/L_I.json, else steer_L_I.json)")
    _model_args(p)
    device_args(p)
    _sae_arg(p, "steer latent I of the SAE in DIR: add OFFSET x its decoder direction W_dec[I] to the residual "
                "stream after block L at every position")
    p.set_defaults(run=_steer)
