"""`topk-ds demo`: the whole idea on the embedded default, in minutes on a CPU.

    synthetic corpus -> tokenizer -> shards -> train a dense baseline and a TopK LM of the same shape
    and token budget (DeepSpeed, 2 CPU ranks) -> convert both -> the local lm-eval suite ->
    statistics and entropies (Figure 3) -> concept neurons -> steering -> tracing (Figure 5) ->
    the neuron browser -> a post-hoc SAE on the dense model and the three-way comparison (TopK LM
    neurons, dense neurons, SAE latents) -> DIR/report.md

Each stage is the command a user would type, printed as it runs (`$ topk-ds ...`), so any of them
can be repeated by hand. A stage is skipped when its output exists (every command writes its
output atomically), so a re-run reuses finished work; DIR/demo.json records the settings of the
stages that finished, and a re-run that changes one of them is refused rather than mixing results.
"""

import argparse
import functools
import json
import math
import os
import shlex
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .errors import UserError
from .analysis.settings import PROMPT
from .io import atomic_output, check_output, write_json

PRECISION_BAR = 0.8  # a "concept neuron": at least this share of its top tokens from one topic


@dataclass
class DemoSettings:
    docs: int = 3600  # synthetic documents (~4.5 MB of text)
    vocab: int = 2048  # BPE tokens: enough that every topic word is one token
    steps: int = 800  # optimizer steps of each model (global batch 16 x 128 tokens with 2 ranks)
    ranks: int = 2  # DeepSpeed CPU ranks
    stats_tokens: int = 200_000  # tokens the statistics run over
    eval_limit: int | None = None  # items per lm-eval task (None: all)
    # steering offsets, in multiples of the neuron's largest activation in the statistics (the scale it fires at)
    offset_scales: list[float] = field(default_factory=lambda: [1.0, 2.0, 4.0])
    samples: int = 5  # steering samples per offset
    seed: int = 0


class Demo:
    def __init__(self, out: Path, settings: DemoSettings):
        self.out, self.s = Path(out), settings
        self.paths = {name: self.out / name for name in ("corpus", "tokenizer", "data", "runs", "hf", "eval", "stats", "site",
                                                         "sae", "compare")}
        self.commands: list[str] = []
        self.timings: list[tuple[str, float, bool]] = []
        self._rows: dict[str, list[dict]] = {}  # concept_rows, read once per model

    @functools.cached_property
    def concepts(self):
        from .analysis.concepts import Concepts

        return Concepts.load(self.paths["corpus"] / "concepts.json")

    # --- running -----------------------------------------------------------------------------------

    def recorded(self) -> dict:
        """DIR/demo.json: the settings the finished stages were made with (each recorded when its stage
        succeeds, so a stage that failed, e.g. on a too large --vocab, does not hold a rerun to its settings)."""
        path = self.out / "demo.json"
        try:
            return json.loads(path.read_text()) if path.exists() else {}
        except (OSError, ValueError):
            raise UserError(f"{path} is unreadable; remove it (the demo then reuses what {self.out} holds)") from None

    def check_settings(self) -> None:
        check_output(self.out, "demo")
        mine = asdict(self.s)
        diff = ", ".join(f"{k}={v!r} (now {mine[k]!r})" for k, v in self.recorded().items() if k in mine and mine[k] != v)
        if diff:
            raise UserError(f"{self.out} holds a demo made with other settings ({diff}); choose another --out "
                            "or remove it")
        self.out.mkdir(parents=True, exist_ok=True)

    def stage(self, title: str, done: Path, action, uses: tuple[str, ...] = ()) -> None:
        """Run one stage unless its output `done` exists; `uses` names the settings it depends on."""
        n = len(self.timings) + 1
        if done.exists():
            print(f"[{n}] {title}: reusing {done}", flush=True)
            self.timings.append((title, 0.0, True))
        else:
            print(f"[{n}] {title}", flush=True)
            started = time.time()
            action()
            self.timings.append((title, time.time() - started, False))
        recorded = self.recorded()
        if any(k not in recorded for k in uses):
            write_json(self.out / "demo.json", recorded | {k: asdict(self.s)[k] for k in uses})

    def topk_ds(self, *args) -> None:
        """Run one `topk-ds` command in this process, echoing it."""
        from .cli import main

        argv = [str(a) for a in args]
        self.commands.append("topk-ds " + shlex.join(argv))
        print(f"$ {self.commands[-1]}", flush=True)
        main(argv)

    def run(self) -> Path:
        p, s = self.paths, self.s
        self.check_settings()
        self.stage("synthetic topic corpus", p["corpus"] / "concepts.json",
                   lambda: self.topk_ds("corpus", "synth", "--out", p["corpus"], "--docs", s.docs, "--seed", s.seed),
                   uses=("docs", "seed"))
        self.stage("tokenizer", p["tokenizer"] / "tokenizer.model",
                   lambda: self.topk_ds("tokenizer", "train", "--input", p["corpus"] / "corpus.jsonl",
                                        "--vocab-size", s.vocab, "--out", p["tokenizer"]), uses=("vocab",))
        self.stage("token shards", p["data"] / "manifest.json",
                   lambda: self.topk_ds("data", "prepare", "--input", p["corpus"] / "corpus.jsonl", "--tokenizer",
                                        p["tokenizer"], "--out", p["data"], "--val-tokens",
                                        min(50_000, 12 * s.docs)))  # ~5 % of the tokens
        for name in ("dense", "topk"):
            run = p["runs"] / name
            self.stage(f"train the {name} model ({s.ranks} DeepSpeed ranks)",
                       run / "checkpoints" / f"global_step{s.steps}" / "complete.json", lambda: self.train(name, run),
                       uses=("steps", "ranks", "seed"))
        for name in ("dense", "topk"):
            self.stage(f"convert the {name} model", p["hf"] / name / "config.json",
                       lambda: self.topk_ds("convert", p["runs"] / name, p["hf"] / name))
        limit = ["--limit", s.eval_limit] if s.eval_limit else []
        self.stage("evaluate both (local lm-eval suite)", p["eval"] / "table.md",
                   lambda: self.topk_ds("eval", p["hf"] / "dense", p["hf"] / "topk", "--suite", "local", "--out",
                                        p["eval"], "--max-length", 128, *limit), uses=("eval_limit",))
        for name in ("dense", "topk"):
            self.stage(f"statistics and entropies of the {name} model", p["stats"] / name / "stats.json",
                       lambda: self.topk_ds("analyze", "stats", p["hf"] / name, "--data", p["data"], "--tokens",
                                            s.stats_tokens, "--seq-len", 128, "--out", p["stats"] / name),
                       uses=("stats_tokens",))
        self.stage("entropy per layer (Figure 3)", self.out / "entropy.png",
                   lambda: self.topk_ds("analyze", "entropy", p["stats"] / "dense", p["stats"] / "topk", "--names",
                                        "dense", "TopK", "--compare", self.out / "entropy.png"))
        best = self.best_neuron()
        layer, index = best["layer"], best["index"]
        offsets = sorted({float(f"{f * best['max_activation']:.2g}") for f in s.offset_scales} - {0.0})
        if not offsets:
            raise UserError(f"neuron {layer}:{index} fires too weakly (largest activation {best['max_activation']:.3g}) "
                            "for --offset-scales to give an offset; train longer (--steps)")
        self.stage(f"steer with concept neuron {layer}:{index} ({best['label']})",
                   p["stats"] / "topk" / "steering" / f"{layer}_{index}.json",
                   lambda: self.topk_ds("steer", p["hf"] / "topk", "--neuron", f"{layer}:{index}",
                                        *[a for c in offsets for a in ("--offset", c)], "--samples", s.samples,
                                        "--seed", s.seed, "--stats", p["stats"] / "topk"),
                   uses=("offset_scales", "samples", "seed"))
        word = best["top_word"]
        self.stage(f"trace neuron index {index} on '{word}' over checkpoints (Figure 5)",
                   self.out / "trace" / f"trace-{index}-{word}.json",
                   lambda: self.topk_ds("analyze", "trace", p["runs"] / "topk", "--neuron", f"{layer}:{index}",
                                        "--token", word, "--tokens", 20_000, "--out", self.out / "trace"))
        self.stage("neuron browser", p["site"] / "index.html",
                   lambda: self.topk_ds("analyze", "browse", p["stats"] / "topk", "--out", p["site"]))
        # the post-hoc alternative: an SAE (EleutherAI's sparsify) on the dense model's residual stream at the TopK
        # layers, over the statistics tokens; the comparison trains another on an earlier checkpoint for stability
        self.stage("SAE on the dense model's TopK-site layers (sparsify)", p["sae"] / "topk_ds.json",
                   lambda: self.topk_ds("sae", "train", p["hf"] / "dense", "--data", p["data"], "--tokens",
                                        s.stats_tokens, "--seq-len", 128, "--seed", s.seed, "--out", p["sae"]))
        self.stage("TopK LM vs dense neurons vs SAE latents", p["compare"] / "compare.json",
                   lambda: self.topk_ds("analyze", "compare", "--topk", p["runs"] / "topk", "--dense", p["runs"] / "dense",
                                        "--sae", p["sae"], "--data", p["data"], "--tokens", s.stats_tokens, "--seq-len", 128,
                                        "--seeds", 2, "--samples", s.samples, "--seed", s.seed, "--out", p["compare"]))
        report = self.out / "report.md"
        with atomic_output(report) as tmp:
            tmp.write_text(self.report(best))
        print(f"wrote the demo's report to {report} (neuron browser: {p['site'] / 'index.html'})")
        return report

    def train(self, name: str, run: Path) -> None:
        """Train through the `deepspeed` launcher (ranks on this machine), showing progress from metrics.jsonl."""
        from .progress import progress

        from .train.distributed import free_port

        s = self.s
        preset = "demo" if name == "topk" else "demo-dense"
        resume = "auto" if (run / "checkpoints").is_dir() else "none"
        args = ["--config", preset, "--set", f"data.path={self.paths['data']}", "--set", f"train.out_dir={run}",
                "--set", f"train.steps={s.steps}", "--set", f"train.save_every={max(1, s.steps // 4)}",
                "--set", f"train.eval_every={max(1, s.steps // 4)}", "--set", f"train.seed={s.seed}", "--resume", resume]
        launcher = ["--num_gpus", str(s.ranks), "--master_port", str(free_port()), "--module", "topk_ds.train"]
        shown = "deepspeed " + shlex.join(launcher + args)
        self.commands.append(shown)
        print(f"$ {shown}", flush=True)
        run.mkdir(parents=True, exist_ok=True)
        log = run / "launcher.log"
        # one thread per rank: the ranks share this machine's cores
        threads = str(max(1, (os.cpu_count() or 1) // s.ranks))
        env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", threads)}
        metrics = run / "metrics.jsonl"
        with open(log, "a") as out, progress(total=s.steps, desc=f"train {name}", unit="step", every=max(1, s.steps // 20)) as bar:
            proc = subprocess.Popen([sys.executable, "-m", "deepspeed.launcher.runner", *launcher, *args],
                                    stdout=out, stderr=subprocess.STDOUT, env=env)
            try:
                while proc.poll() is None:
                    time.sleep(1.0)
                    _show(bar, metrics)
            except BaseException:
                proc.terminate()  # the trainer saves a checkpoint on SIGTERM: a re-run resumes from it
                proc.wait()
                raise
            _show(bar, metrics)
        if proc.returncode != 0:
            errors = [line.strip() for line in log.read_text(errors="replace").splitlines() if "error" in line.lower()]
            raise UserError(f"training the {name} model failed (exit {proc.returncode}): "
                            f"{errors[-1] if errors else 'no error line'}; the launcher's output is in {log}")

    # --- reading the results -----------------------------------------------------------------------

    def concept_rows(self, name: str) -> list[dict]:
        """A row per neuron of every layer (LayerReport.summary), with the layer's kind."""
        from .analysis.report import LayerReport
        from .analysis.stats import Stats

        if name not in self._rows:
            stats = Stats.load(self.paths["stats"] / name)
            rows = []
            for meta in stats.meta["layers"]:
                view = LayerReport(stats, meta["layer"], self.concepts)
                rows += [view.summary(i) | {"kind": meta["kind"]} for i in range(stats.layers[meta["layer"]].dim)]
            self._rows[name] = rows
        return self._rows[name]

    def best_neuron(self) -> dict:
        """The steering showcase: the first of `steering_candidates` among the TopK layers' neurons (pure,
        strong, and of a topic that is rare in unsteered samples). Its `top_word` is traced over the checkpoints."""
        from .analysis.concepts import word_of
        from .analysis.steer import sample, steering_candidates, topic_shares
        from .convert.hf_export import load

        model, tokenizer = load(self.paths["hf"] / "topk")
        baseline = topic_shares(sample(model, tokenizer, PROMPT, self.s.samples, self.s.seed, 128), self.concepts)
        rows = [r for r in self.concept_rows("topk") if r["kind"] == "topk"]
        found = steering_candidates(rows, self.concepts, baseline, n=1, precision=PRECISION_BAR)
        if not found:
            raise UserError(f"no TopK neuron is a concept neuron (precision >= {PRECISION_BAR}) whose strongest token "
                            "is a word of its topic; train longer (--steps)")
        return found[0] | {"top_word": word_of(found[0]["top_piece"])}

    def report(self, best: dict) -> str:
        p, s, concepts = self.paths, self.s, self.concepts
        lines = ["# topk_ds demo", "",
                 f"A dense Llama and a TopK LM of the same shape (D=128, L=4, FFN 256; TopK k=16 on blocks 0-1, "
                 f"annealed over the first 20 % of steps) trained for {s.steps} steps each on the same "
                 f"{s.docs}-document synthetic topic corpus ({len(concepts.names)} planted topics: "
                 f"{', '.join(concepts.names)}), through DeepSpeed with {s.ranks} CPU ranks.", ""]
        lines += ["## Table 1: the two models side by side", "", self.training_table(), "",
                  "The local lm-eval suite (`topk-ds eval --suite local`):", "",
                  (p["eval"] / "table.md").read_text().strip(), ""]
        lines += ["## Figure 3: entropies per layer", "", "![entropy per layer](entropy.png)", "",
                  self.entropy_table(), "",
                  "TopK layers (0-1) should show lower, narrower token and semantic entropy than the dense "
                  "model's same layers; the last two layers are dense in both models.", ""]
        lines += self.concepts_section()
        lines += self.steering_section(best)
        trace = self.out / "trace" / f"trace-{best['index']}-{best['top_word']}.png"
        lines += self.sae_section()
        lines += ["## Figure 5: one neuron index across checkpoints and layers", "",
                  f"Mean activation of index {best['index']} on '{best['top_word']}' in every layer, read from "
                  f"the TopK run's DeepSpeed checkpoints directly (`topk-ds analyze trace`):", "",
                  f"![trace]({trace.relative_to(self.out)})", ""]
        lines += ["## Where everything is", "",
                  "| what | path |", "|---|---|",
                  "| neuron browser (opens from file://) | `site/index.html` |",
                  "| converted models (`AutoModelForCausalLM`, `trust_remote_code=True`) | `hf/dense`, `hf/topk` |",
                  "| training runs (metrics.jsonl, checkpoints, launcher.log) | `runs/dense`, `runs/topk` |",
                  "| lm-eval results | `eval/` |", "| statistics (`topk-ds analyze neuron stats/topk L:I`) | `stats/` |",
                  "| the SAE (sparsify's format: `SparseCoder.load_many('sae', local=True)`) | `sae/` |",
                  "| the three-way comparison (`compare.md`, `compare.json`, the SAEs it trained) | `compare/` |",
                  "", "## Stages", "", "| stage | seconds |", "|---|---:|"]
        lines += [f"| {t} | {'reused' if reused else f'{secs:.0f}'} |" for t, secs, reused in self.timings]
        if self.commands:
            lines += ["", "Commands run this time (each can be repeated by hand):", "", "```bash",
                      *self.commands, "```"]
        return "\n".join(lines) + "\n"

    def training_table(self) -> str:
        rows = ["| model | steps | tokens | final train loss (mean of last 20 steps) | validation loss | "
                "validation perplexity |", "|---|---:|---:|---:|---:|---:|"]
        for name in ("dense", "topk"):
            records = [json.loads(line) for line in (self.paths["runs"] / name / "metrics.jsonl").read_text().splitlines()]
            val = [r for r in records if "val_loss" in r][-1]
            tail = records[-20:]
            rows.append(f"| {name} | {records[-1]['step']} | {records[-1]['tokens']:,} | "
                        f"{sum(r['loss'] for r in tail) / len(tail):.3f} | {val['val_loss']:.3f} | {val['val_ppl']:.2f} |")
        return "\n".join(rows)

    def entropy_table(self) -> str:
        def fmt(m, sd):
            return "n/a" if m is None else f"{m:.2f} ± {sd:.2f}"

        summary = {n: json.loads((self.paths["stats"] / n / "stats.json").read_text())["layers"] for n in ("dense", "topk")}
        rows = ["| layer | dense: token entropy | TopK: token entropy | dense: semantic entropy | "
                "TopK: semantic entropy | TopK: L0 |", "|---|---:|---:|---:|---:|---:|"]
        for d, t in zip(summary["dense"], summary["topk"]):
            rows.append(f"| {t['layer']} ({t['kind']}) | {fmt(d['token_entropy_mean'], d['token_entropy_std'])} | "
                        f"{fmt(t['token_entropy_mean'], t['token_entropy_std'])} | "
                        f"{fmt(d['semantic_entropy_mean'], d['semantic_entropy_std'])} | "
                        f"{fmt(t['semantic_entropy_mean'], t['semantic_entropy_std'])} | {t['l0']:.1f} |")
        return "\n".join(rows) + "\n\nStatistics over " + f"{self.s.stats_tokens:,} training tokens (natural log)."

    def concepts_section(self) -> list[str]:
        counts = {name: [r for r in self.concept_rows(name) if r.get("topic") and r["precision"] >= PRECISION_BAR]
                  for name in ("dense", "topk")}
        lines = ["## Concept neurons", "",
                 f"A neuron is a concept neuron when at least {PRECISION_BAR:.0%} of its 10 top tokens (by mean "
                 "activation) are words of one planted topic; recall is the share of that topic's words above "
                 "the neuron's θ.", "", "| layer | dense: concept neurons (topics) | TopK: concept neurons (topics) |",
                 "|---|---:|---:|"]
        for layer in sorted({r["layer"] for r in self.concept_rows("topk")}):
            cells = []
            for name in ("dense", "topk"):
                here = [r for r in counts[name] if r["layer"] == layer]
                cells.append(f"{len(here)} ({len({r['topic'] for r in here})})")
            lines.append(f"| {layer} | {cells[0]} | {cells[1]} |")
        strongest = sorted((r for r in counts["topk"] if r["kind"] == "topk"), key=lambda r: -r["top_mean"])[:12]
        lines += ["", "The strongest concept neurons of the TopK layers:", "",
                  "| neuron | label (top tokens) | topic | precision | recall | top mean activation | token entropy |",
                  "|---|---|---|---:|---:|---:|---:|"]
        lines += [f"| {r['neuron']} | {r['label']} | {r['topic']} | {r['precision']:.2f} | {r['recall']:.2f} | "
                  f"{r['top_mean']:.2f} | {_fmt(r['token_entropy'])} |" for r in strongest]
        covered = sorted({r["topic"] for r in counts["topk"] if r["kind"] == "topk"})
        lines += ["", f"Topics with a concept neuron in the TopK layers: {len(covered)} of {len(self.concepts.names)} "
                  f"({', '.join(covered) or 'none'}).", ""]
        return lines

    def sae_section(self) -> list[str]:
        from .analysis.compare import findings, table

        result = json.loads((self.paths["compare"] / "compare.json").read_text())
        sae = json.loads((self.paths["sae"] / "topk_ds.json").read_text())
        return ["## TopK LM vs SAE", "",
                f"The paper says a TopK LM's neurons are as interpretable as the latents of a post-hoc SAE, without "
                f"training one, and stay put across checkpoints. Here the question is asked of three contenders on the "
                f"same {result['tokens']:,} tokens at layers {', '.join(map(str, result['layers']))}: the TopK LM's "
                f"neurons, the dense model's neurons, and the latents of a TopK SAE ({sae['library']}; "
                f"{sae['num_latents']} latents, k={sae['k']}, fraction of variance unexplained "
                f"{', '.join(f'{v:.3f}' for v in sae['fvu'].values())}) trained on the dense model's residual stream "
                f"at those layers in {sae['seconds']:.0f} s. For stability each run's last two checkpoints are compared "
                f"(a second SAE is trained on the earlier one and matched to the first by the Hungarian algorithm on "
                f"decoder cosine); a third SAE with another seed measures how many latents two seeds share.", "",
                table(result), "", "![TopK LM vs SAE](compare/compare.png)", "", *findings(result), "",
                "One seed, a small synthetic corpus and small models: a measurement of this run, not a general verdict "
                "(`compare/compare.md` has the best unit per topic, `compare/compare.json` every number).", ""]

    def steering_section(self, best: dict) -> list[str]:
        result = json.loads((self.paths["stats"] / "topk" / "steering" / f"{best['layer']}_{best['index']}.json").read_text())
        lines = ["## Steering", "",
                 f"Neuron {result['neuron']} ({best['label']}; topic {result['topic']}, precision "
                 f"{best['precision']:.2f}, largest activation {best['max_activation']:.2f}) gets the offset added "
                 f"to its pre-activation at every position (offsets of {', '.join(f'{f:g}' for f in self.s.offset_scales)} "
                 f"times its largest activation); "
                 f"{result['samples']} samples per offset from {result['prompt']!r} with the paper's sampling "
                 f"(temperature 0.7, top-p 0.9, top-k 50) and the same seed for every offset.", "",
                 f"| offset | share of generated content words in '{result['topic']}' | first sample |",
                 "|---:|---:|---|"]
        for row in result["offsets"]:
            sample = " ".join(row["texts"][0].split())[:160].replace("|", "\\|")
            lines.append(f"| {row['offset']:+g} | {row['share']:.1%} ({row['topic_words']}/{row['content_words']}) | "
                         f"{sample} |")
        base, *steered = result["offsets"]
        top = max(steered, key=lambda r: r["share"])
        verdict = "raised" if top["share"] > base["share"] else "did not raise"
        lines += ["", f"Steering {verdict} the share of '{result['topic']}' words from {base['share']:.1%} (unsteered, "
                  f"same seeds) to {top['share']:.1%} at offset {top['offset']:+g}."]
        return lines + [""]


def _fmt(x) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.2f}"


def _show(bar, metrics: Path) -> None:
    """Move the progress bar to the last step in metrics.jsonl (nothing yet, or a line being written: wait)."""
    try:
        last = json.loads(metrics.read_text().splitlines()[-1])
    except (OSError, IndexError, ValueError):
        return
    bar.update(last["step"] - bar.n)
    annealing = {"alpha": f"{last['alpha']:.2f}"} if "alpha" in last else {}  # a dense model has none
    bar.set_postfix(loss=f"{last['loss']:.3f}", **annealing, refresh=False)


def _demo(a) -> None:
    if a.steps < 4 or a.docs < 1 or a.ranks < 1 or a.stats_tokens < 1 or a.samples < 1:
        raise UserError("--steps must be >= 4; --docs, --ranks, --stats-tokens and --samples >= 1")
    if not all(f > 0 for f in a.offset_scales):
        raise UserError("--offset-scales must be > 0")
    settings = DemoSettings(docs=a.docs, vocab=a.vocab, steps=a.steps, ranks=a.ranks, stats_tokens=a.stats_tokens,
                            eval_limit=a.eval_limit, offset_scales=a.offset_scales, samples=a.samples, seed=a.seed)
    Demo(Path(a.out), settings).run()


def add_commands(commands) -> None:
    from .arguments import positive

    d = DemoSettings()
    p = commands.add_parser("demo", help="the whole pipeline on the synthetic corpus: dense vs TopK, eval, analysis",
                            description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="demo", help="output directory (default demo)")
    p.add_argument("--docs", type=int, default=d.docs, help=f"synthetic documents (default {d.docs})")
    p.add_argument("--vocab", type=positive, default=d.vocab, help=f"tokenizer vocabulary (default {d.vocab})")
    p.add_argument("--steps", type=int, default=d.steps, help=f"optimizer steps per model (default {d.steps})")
    p.add_argument("--ranks", type=int, default=d.ranks, help=f"DeepSpeed CPU ranks (default {d.ranks})")
    p.add_argument("--stats-tokens", type=positive, default=d.stats_tokens,
                   help=f"tokens for the statistics (default {d.stats_tokens:,})")
    p.add_argument("--eval-limit", type=int, default=None, help="items per evaluation task (default: all)")
    p.add_argument("--offset-scales", type=float, nargs="+", default=d.offset_scales, metavar="F",
                   help="steering offsets as multiples of the neuron's largest activation (default 1 2 4)")
    p.add_argument("--samples", type=int, default=d.samples, help=f"steering samples per offset (default {d.samples})")
    p.add_argument("--seed", type=int, default=d.seed, help="seed of the corpus, the models and the sampling")
    p.set_defaults(run=_demo)
