"""`topk-ds analyze compare`: the paper's central claim as a measurement. Contenders (a TopK LM's neurons,
its dense twin's neurons, post-hoc SAE latents on the dense twin: any `Units`) are read at the same layers
over the same tokens and scored against the planted topics of the synthetic corpus:

    topics_recovered      planted topics whose best unit has F1 >= 0.5 over the topic's words (precision over
                          the unit's top tokens, recall over the topic's words above its theta, as
                          `analyze neuron` defines them); mean_best_f1 averages the best F1 over all topics
    token_entropy,        mean and std over the units (the paper's eq. 4-11)
    semantic_entropy
    steering_success      of the top-N concept units as `steer.steering_candidates` ranks them, the share that
                          steer their topic: steering at 1x OR 2x the unit's largest activation (either scale;
                          the issue's "at 1 and 2 times") raises the topic's share of generated content words by
                          >= the gain (0.2) over the unsteered baseline (same prompt, seeds, sampling);
                          a contender with fewer than N candidates counts the missing ones as failures
    checkpoint_stability  over the last M checkpoints of the model's run: the units of each earlier checkpoint
                          (`units.retrain`: a neuron is the model's own; an SAE is trained anew) are matched to
                          the final ones by the Hungarian algorithm on decoder cosine (a neuron's direction is
                          its basis vector, so neurons keep their index); the share of the final concept units
                          whose match has the same topic (share_concept: and is a concept unit there too), and
                          the matched cosines
    seeds                 (--seeds N) the share of units whose Hungarian match in units of another seed has
                          decoder cosine >= 0.7 (Paulo & Belrose 2025); None where a seed means another LM
    cost                  training seconds and FLOPs of the model (its run's metrics) plus what the units add
                          (an SAE's training), against the dense model's; the validation loss of the model with
                          each layer's stream replaced by the units' reconstruction, beside its own
"""

import json
import math
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch.nn import functional as F

from ..errors import UserError
from .concepts import Concepts
from .data import token_batches
from .report import LayerReport
from .settings import PROMPT
from .stats import collect, compute_entropy

F1_BAR = 0.5  # a topic is recovered when its best unit reaches this F1
PRECISION_BAR = 0.8  # a concept unit: at least this share of its top tokens from one topic
SHARED_COSINE = 0.7  # Paulo & Belrose's threshold for a latent two SAEs share


@dataclass
class Contender:
    name: str
    units: object  # analysis.units.Units at the final checkpoint
    run: Path | None = None  # the training run of units.model: its checkpoints and training time


@dataclass
class Settings:
    data: str
    split: str = "train"
    tokens: int = 1_000_000  # statistics tokens per contender and checkpoint
    seq_len: int | None = None
    val_tokens: int = 50_000
    checkpoints: int = 2  # the run's last M checkpoints for stability
    seeds: int = 1  # units per contender trained with other seeds (1: none)
    steer_units: int = 5
    scales: list[float] = field(default_factory=lambda: [1.0, 2.0])
    min_gain: float = 0.2
    samples: int = 6
    max_new_tokens: int = 48
    seed: int = 0

    def window(self, cfg) -> int:
        """Tokens per window for a model of config `cfg`."""
        return self.seq_len or min(cfg.max_seq_len, 1024)


def _say(message: str) -> None:
    print(f"compare: {message}", file=sys.stderr, flush=True)


def match(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows of a (M, D) matched one-to-one to rows of b (M', D) by the Hungarian algorithm on cosine
    similarity (largest total): (j, cos), each (M,), j[i] the row of b matched to row i (-1 and NaN when
    b has fewer rows)."""
    from scipy.optimize import linear_sum_assignment

    cos = F.normalize(a.double().cpu(), dim=1) @ F.normalize(b.double().cpu(), dim=1).T
    rows, cols = linear_sum_assignment(cos.numpy(), maximize=True)
    rows, cols = torch.as_tensor(rows), torch.as_tensor(cols)
    j = torch.full((len(a),), -1, dtype=torch.int64).index_put_((rows,), cols)
    matched = torch.full((len(a),), math.nan, dtype=torch.float64).index_put_((rows,), cos[rows, cols])
    return j, matched


def _spread(x) -> dict:
    x = torch.as_tensor(x, dtype=torch.float64)
    x = x[~x.isnan()]
    if len(x) == 0:
        return {"mean": None, "std": None}
    return {"mean": x.mean().item(), "std": x.std(unbiased=False).item()}


class Reader:
    """Statistics of units over the comparison's tokens, and their rows scored against the topics."""

    def __init__(self, tokenizer, concepts: Concepts, s: Settings, layers: list[int]):
        self.tokenizer, self.concepts, self.s, self.layers = tokenizer, concepts, s, layers

    def stats(self, units, progress: bool = True):
        cfg = units.model.model.cfg
        seq_len = self.s.window(cfg)
        batches = token_batches(self.s.data, self.tokenizer, cfg.vocab_size, seq_len, self.s.tokens,
                                max(1, 8192 // seq_len), self.s.split)
        stats = collect(units, self.tokenizer, batches, self.s.tokens, self.layers, top=1, progress=progress)
        compute_entropy(stats, progress=False)
        return stats

    def rows(self, stats) -> tuple[dict, dict]:
        """({(layer, index): summary row}, {topic: best unit by F1 with its F1, precision, recall})."""
        rows, best = {}, {t: {"f1": 0.0, "unit": None, "precision": 0.0, "recall": 0.0} for t in self.concepts.names}
        for l in self.layers:
            view = LayerReport(stats, l, self.concepts)
            rows |= {(l, i): view.summary(i) for i in range(stats.layers[l].dim)}
            precision, recall = self.concepts.by_topic(stats.abar(l), stats.counts, stats.layers[l].theta, stats.pieces,
                                                       view.top_values, view.top_ids)
            f1 = (2 * precision * recall / (precision + recall)).nan_to_num(0.0)  # (topics, D)
            value, unit = f1.max(dim=1)
            for t, name in enumerate(self.concepts.names):
                if value[t] > best[name]["f1"]:
                    i = int(unit[t])
                    best[name] = {"f1": value[t].item(), "unit": f"{l}:{i}", "precision": precision[t, i].item(),
                                  "recall": recall[t, i].item()}
        return rows, best


def concept_units(rows: dict) -> dict:
    return {key: r["topic"] for key, r in rows.items() if r.get("topic") and r["precision"] >= PRECISION_BAR}


def training_cost(run) -> dict | None:
    """Seconds (the sum of the optimizer steps' times in metrics.jsonl), tokens and FLOPs of a run's training."""
    from ..config import load_config

    metrics = Path(run) / "metrics.jsonl" if run else None
    if metrics is None or not metrics.is_file():
        return None
    by_step = {}
    for line in metrics.read_text().splitlines():
        try:
            r = json.loads(line)
        except ValueError:
            continue  # a line being written
        by_step[r["step"]] = r  # a resumed run repeats steps: the last record of each counts
    seconds, tokens = 0.0, 0
    for step in sorted(by_step):
        r = by_step[step]
        seconds += (r["tokens"] - tokens) / r["tokens_per_s"]
        tokens = r["tokens"]
    cfg = load_config(str(Path(run) / "config.yaml"))
    return {"seconds": seconds, "tokens": tokens, "flops": cfg.model.flops_per_token(cfg.data.seq_len) * tokens}


class Comparison:
    def __init__(self, contenders: list[Contender], tokenizer, concepts: Concepts, settings: Settings, out: Path,
                 reference: Contender, progress: bool = True):
        self.contenders, self.tokenizer, self.concepts, self.s, self.out = contenders, tokenizer, concepts, settings, out
        self.reference, self.progress = reference, progress
        layers = set(contenders[0].units.layers)
        for c in contenders[1:]:
            layers &= set(c.units.layers)
        if not layers:
            raise UserError("the contenders share no layer: train the SAE on layers the models have units at")
        self.layers = sorted(layers)
        self.reader = Reader(tokenizer, concepts, settings, self.layers)
        self._baselines: dict[int, list[str]] = {}

    def lm_passes(self) -> tuple[int, float]:
        """(Tokens the contenders' LMs read, at most; their mean forward FLOPs per token) for the cost line:
        per contender, statistics at the final and earlier checkpoints, the validation loss (its own and with
        each layer spliced) and the steering samples (baseline and every candidate at every scale). The SAEs
        trained anew for stability and seeds are not counted."""
        s, cfgs = self.s, [c.units.model.model.cfg for c in self.contenders]
        samples = s.samples * s.max_new_tokens * (1 + s.steer_units * len(s.scales))
        tokens = s.tokens * s.checkpoints + s.val_tokens * (1 + len(self.layers)) + samples
        flops = [cfg.flops_per_token(s.window(cfg), training=False) for cfg in cfgs]
        return len(cfgs) * tokens, sum(flops) / len(flops)

    def run(self) -> dict:
        reference_cost = training_cost(self.reference.run)
        contenders = [self.measure(c, reference_cost) for c in self.contenders]
        return {"format": "topk_ds-compare", "layers": self.layers, "data": str(self.s.data), "tokens": self.s.tokens,
                "concepts": str(self.concepts.path), "topics": self.concepts.names, "settings": asdict(self.s),
                "definitions": {"recovered_f1": F1_BAR, "concept_precision": PRECISION_BAR, "shared_cosine": SHARED_COSINE},
                "reference": self.reference.name, "contenders": contenders}

    def measure(self, c: Contender, reference_cost) -> dict:
        _say(f"{c.name}: statistics over {self.s.tokens:,} tokens at layers {', '.join(map(str, self.layers))}")
        stats = self.reader.stats(c.units, self.progress)
        rows, best = self.reader.rows(stats)
        token = torch.cat([stats.layers[l].token_entropy for l in self.layers])
        semantic = torch.cat([stats.layers[l].semantic_entropy for l in self.layers])
        out = {"name": c.name, "kind": c.units.kind(self.layers[0]), "description": c.units.description,
               "model_step": c.units.model.config.train_step, "layers": self.layers,
               "units": len(rows), "dead": sum(int((stats.layers[l].fires == 0).sum()) for l in self.layers),
               "concept_units": len(concept_units(rows)),
               "topics_recovered": sum(b["f1"] >= F1_BAR for b in best.values()),
               "mean_best_f1": sum(b["f1"] for b in best.values()) / len(best), "best_by_topic": best,
               "token_entropy": _spread(token), "semantic_entropy": _spread(semantic),
               "no_semantic_entropy": int(semantic.isnan().sum())}
        out["steering"] = self.steering(c, list(rows.values()))
        out["steering_success"] = out["steering"]["success_of_n"]
        out["checkpoint_stability"] = self.stability(c, rows)
        out["seeds"] = self.seeds(c)
        out["cost"] = self.cost(c, reference_cost)
        return out

    # --- steering --------------------------------------------------------------------------------------

    def baseline(self, model) -> list[str]:
        from .steer import sample

        if id(model) not in self._baselines:
            self._baselines[id(model)] = sample(model, self.tokenizer, PROMPT, self.s.samples, self.s.seed,
                                                self.s.max_new_tokens)
        return self._baselines[id(model)]

    def steering(self, c: Contender, rows: list[dict]) -> dict:
        from .steer import steering_candidates, steering_success, topic_shares

        s = self.s
        baseline = self.baseline(c.units.model)
        candidates = steering_candidates(rows, self.concepts, topic_shares(baseline, self.concepts), n=s.steer_units,
                                         precision=PRECISION_BAR)
        _say(f"{c.name}: steering {len(candidates)} of {s.steer_units} candidate units")
        result = steering_success(c.units, self.tokenizer, candidates, self.concepts, s.scales, s.min_gain, PROMPT,
                                  s.samples, s.seed, s.max_new_tokens, baseline, progress=self.progress)
        successes = sum(u["success"] for u in result["units"])
        return result | {"n": s.steer_units, "candidates": len(candidates), "successes": successes,
                         "success_of_n": successes / s.steer_units}

    # --- stability over checkpoints and seeds ---------------------------------------------------------

    def stability(self, c: Contender, rows: dict) -> dict | None:
        from ..convert.hf_export import load, run_checkpoints

        if c.run is None or not (Path(c.run) / "checkpoints").is_dir():
            return None
        found = run_checkpoints(c.run)[-self.s.checkpoints:]
        if len(found) < 2:
            return None
        final_step = found[-1][0]
        if c.units.model.config.train_step != final_step:
            raise UserError(f"{c.name}: the model compared is from step {c.units.model.config.train_step}, but the "
                            f"newest checkpoint of {c.run} is step {final_step}; compare the run's newest checkpoint")
        concepts = concept_units(rows)
        per_checkpoint = []
        for step, tag in found[:-1]:
            _say(f"{c.name}: checkpoint step {step}")
            model, _ = load(c.run, tag=tag.name, device=c.units.model.device, dtype=c.units.model.dtype)
            earlier = c.units.retrain(model, self.tokenizer, self.out / "saes" / f"{_slug(c.name)}-step{step}")
            earlier_rows, _ = self.reader.rows(self.reader.stats(earlier, self.progress))
            stable, concept, cosines, concept_cosines = 0, 0, [], []
            for l in self.layers:
                j, cos = match(c.units.directions(l), earlier.directions(l))
                cosines.append(cos)
                for (layer, i), topic in concepts.items():
                    if layer != l:
                        continue
                    concept_cosines.append(cos[i].item())
                    other = earlier_rows.get((l, int(j[i])), {})
                    if other.get("topic") == topic:
                        stable += 1
                        concept += other["precision"] >= PRECISION_BAR
            n = max(1, len(concepts))
            per_checkpoint.append({"step": step, "stable": stable, "share": stable / n, "share_concept": concept / n,
                                   "matched_cosine": _quantiles(torch.cat(cosines)),
                                   "concept_matched_cosine": _spread(concept_cosines)})
        return {"final_step": final_step, "concept_units": len(concepts), "checkpoints": per_checkpoint,
                "share": sum(p["share"] for p in per_checkpoint) / len(per_checkpoint),
                "share_concept": sum(p["share_concept"] for p in per_checkpoint) / len(per_checkpoint)}

    def seeds(self, c: Contender) -> dict | None:
        if self.s.seeds < 2:
            return None
        per_seed = []
        for offset in range(1, self.s.seeds):
            _say(f"{c.name}: seed offset {offset}")
            other = c.units.retrain(c.units.model, self.tokenizer, self.out / "saes" / f"{_slug(c.name)}-seed+{offset}",
                                    seed_offset=offset)
            if other is None:
                return None
            cos = torch.cat([match(c.units.directions(l), other.directions(l))[1] for l in self.layers])
            per_seed.append({"seed_offset": offset, "shared": (cos >= SHARED_COSINE).double().mean().item(),
                             "matched_cosine": _quantiles(cos)})
        return {"seeds": self.s.seeds, "threshold": SHARED_COSINE, "per_seed": per_seed,
                "shared": sum(p["shared"] for p in per_seed) / len(per_seed)}

    # --- cost ------------------------------------------------------------------------------------------

    def cost(self, c: Contender, reference) -> dict:
        model_cost = training_cost(c.run)
        extra = c.units.extra_training()
        out = {"model_training": model_cost, "units_training": extra, "validation": self.validation(c)}
        if model_cost and reference:
            out["seconds_vs_dense"] = (model_cost["seconds"] + extra["seconds"]) / reference["seconds"]
            out["flops_vs_dense"] = (model_cost["flops"] + extra["flops"]) / reference["flops"]
            out["units_seconds_vs_dense"] = extra["seconds"] / reference["seconds"]
        return out

    def validation(self, c: Contender) -> dict:
        model = c.units.model
        cfg = model.model.cfg
        seq_len = self.s.window(cfg)
        split = "val" if _has_val(self.s.data) else self.s.split
        batches = [b.to(model.device) for b in token_batches(self.s.data, self.tokenizer, cfg.vocab_size, seq_len,
                                                             self.s.val_tokens, max(1, 8192 // seq_len), split)]

        def loss() -> float:
            total, n = 0.0, 0
            with torch.inference_mode():
                for b in batches:
                    total += model.model(b[:, :-1], b[:, 1:]).item() * b[:, 1:].numel()
                    n += b[:, 1:].numel()
            return total / n

        own = loss()
        spliced = {}
        for l in self.layers:
            with c.units.reconstructed(l):
                spliced[str(l)] = loss()
        return {"split": split, "tokens": sum(b.numel() for b in batches), "loss": own, "loss_spliced": spliced}


def _has_val(data) -> bool:
    from ..data.manifest import read_manifest
    from .data import is_prepared

    return is_prepared(data) and read_manifest(data)["splits"]["val"]["tokens"] > 0


def _quantiles(x: torch.Tensor) -> dict:
    x = x[~x.isnan()].double()
    q = torch.quantile(x, torch.tensor([0.05, 0.5, 0.95], dtype=torch.float64)).tolist()
    return {"mean": x.mean().item(), "p5": q[0], "median": q[1], "p95": q[2]}


def _slug(name: str) -> str:
    return "".join(ch if ch.isalnum() else "-" for ch in name.lower()).strip("-")


# --- the report ------------------------------------------------------------------------------------

def _num(x, fmt: str = "{:.2f}") -> str:
    return "n/a" if x is None else fmt.format(x)


def _pm(s: dict) -> str:
    return "n/a" if s["mean"] is None else f"{s['mean']:.2f} ± {s['std']:.2f}"


def table(result: dict) -> str:
    """The contenders side by side, one metric a row."""
    cs, T = result["contenders"], len(result["topics"])
    stab = [c["checkpoint_stability"] for c in cs]
    rows = [("units (layers " + ", ".join(map(str, result["layers"])) + ")", [str(c["units"]) for c in cs]),
            ("dead units (never fire)", [str(c["dead"]) for c in cs]),
            (f"concept units (≥ {PRECISION_BAR:.0%} of top tokens from one topic)", [str(c["concept_units"]) for c in cs]),
            (f"topics recovered (best unit F1 ≥ {F1_BAR})", [f"{c['topics_recovered']}/{T}" for c in cs]),
            ("mean best F1 over topics", [f"{c['mean_best_f1']:.2f}" for c in cs]),
            ("token entropy (mean ± std, nats)", [_pm(c["token_entropy"]) for c in cs]),
            ("semantic entropy (mean ± std)", [_pm(c["semantic_entropy"]) for c in cs]),
            (f"steering success (top {cs[0]['steering']['n']} concept units, gain ≥ {cs[0]['steering']['min_gain']:g})",
             [f"{c['steering']['successes']}/{c['steering']['n']}" for c in cs]),
            ("checkpoint stability (final concept units whose match has their topic)",
             [_num(s and s["share"]) + (f" (steps {', '.join(str(p['step']) for p in s['checkpoints'])} → {s['final_step']})"
                                        if s else "") for s in stab]),
            ("... and is a concept unit there too", [_num(s and s["share_concept"]) for s in stab]),
            ("matched decoder cosine across checkpoints (median, all units)",
             [_num(s and s["checkpoints"][0]["matched_cosine"]["median"]) for s in stab]),
            (f"units shared across seeds (matched cosine ≥ {SHARED_COSINE})",
             [_num(c["seeds"] and c["seeds"]["shared"]) for c in cs]),
            ("training time vs the dense model (model + units)", [_num(c["cost"].get("seconds_vs_dense"), "{:.2f}x") for c in cs]),
            ("training FLOPs vs the dense model", [_num(c["cost"].get("flops_vs_dense"), "{:.3f}x") for c in cs]),
            ("validation loss, the model's own", [f"{c['cost']['validation']['loss']:.3f}" for c in cs])]
    rows += [(f"validation loss, layer {l} replaced by the units' reconstruction",
              [f"{c['cost']['validation']['loss_spliced'][str(l)]:.3f}" for c in cs]) for l in result["layers"]]
    lines = ["| | " + " | ".join(c["name"] for c in cs) + " |", "|---|" + "---:|" * len(cs)]
    lines += [f"| {name} | " + " | ".join(cells) + " |" for name, cells in rows]
    return "\n".join(lines)


def topic_table(result: dict) -> str:
    cs = result["contenders"]
    lines = ["| topic | " + " | ".join(f"{c['name']}: best unit (F1)" for c in cs) + " |", "|---|" + "---|" * len(cs)]
    for t in result["topics"]:
        cells = [f"{b['unit'] or '-'} ({b['f1']:.2f})" for b in (c["best_by_topic"][t] for c in cs)]
        lines.append(f"| {t} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _ranked(cs: list[dict], value, higher: bool = True, fmt: str = "{:.2f}") -> str:
    """'A 0.80, B 0.75, C 0.40' best first, contenders without a value left out."""
    have = [(value(c), c["name"]) for c in cs if value(c) is not None]
    have.sort(key=lambda x: -x[0] if higher else x[0])
    return ", ".join(f"{name} {fmt.format(v)}" for v, name in have)


def findings(result: dict) -> list[str]:
    """What the numbers say, each claim with its numbers, whichever way they come out."""
    cs, T = result["contenders"], len(result["topics"])
    lines = [f"- **Concepts found**: topics recovered of {T}: "
             + _ranked(cs, lambda c: c["topics_recovered"], fmt="{:d}") + "; mean best F1: "
             + _ranked(cs, lambda c: c["mean_best_f1"]) + "."]
    lines.append("- **Specificity** (lower entropy = narrower units): token entropy "
                 + _ranked(cs, lambda c: c["token_entropy"]["mean"], higher=False) + "; semantic entropy "
                 + _ranked(cs, lambda c: c["semantic_entropy"]["mean"], higher=False) + ".")
    lines.append("- **Steering** (share of the top concept units that steer their topic): "
                 + _ranked(cs, lambda c: c["steering_success"]) + ".")
    if any(c["checkpoint_stability"] for c in cs):
        lines.append("- **Stability across checkpoints** (final concept units whose matched unit at the earlier "
                     "checkpoint has the same topic): "
                     + _ranked(cs, lambda c: c["checkpoint_stability"] and c["checkpoint_stability"]["share"]) + ".")
    if any(c["seeds"] for c in cs):
        lines.append(f"- **Seeds**: units shared between seeds (matched cosine ≥ {SHARED_COSINE}): "
                     + _ranked(cs, lambda c: c["seeds"] and c["seeds"]["shared"])
                     + " (Paulo & Belrose report about 30-50 % for LLM SAEs; the LMs' own neurons would need "
                       "LMs trained from other seeds and are not measured).")
    if any(c["cost"].get("seconds_vs_dense") for c in cs):
        lines.append("- **Cost** (training time of model and units over the dense model's): "
                     + _ranked(cs, lambda c: c["cost"].get("seconds_vs_dense"), higher=False, fmt="{:.2f}x") + ".")
    lines.append("- **Fidelity** (validation loss with the units' reconstruction in place of the stream; the "
                 "models' own neurons reconstruct it exactly): "
                 + _ranked(cs, lambda c: max(c["cost"]["validation"]["loss_spliced"].values()), higher=False,
                           fmt="{:.3f}") + " (worst layer).")
    return lines


def markdown(result: dict) -> str:
    s = result["settings"]
    lines = ["# TopK LM neurons vs SAE latents", "",
             f"Units at layers {', '.join(map(str, result['layers']))}, statistics over {result['tokens']:,} tokens of "
             f"{result['data']}, scored against the {len(result['topics'])} planted topics of {result['concepts']}. "
             f"Steering: {s['samples']} samples of {s['max_new_tokens']} tokens from {PROMPT!r}, seed {s['seed']}, "
             f"offsets {' and '.join(f'{x:g}' for x in s['scales'])} times each unit's largest activation. A unit "
             f"counts as steering its topic when steering at {' or '.join(f'{x:g}x' for x in s['scales'])} its largest "
             f"activation (either scale) raises its topic's share of generated content words by ≥ {s['min_gain']:g} "
             f"over the unsteered baseline; the candidates are the top {s['steer_units']} concept units as "
             "`steer.steering_candidates` ranks them (pure, strong, room to rise, one per topic).", "",
             table(result), "", "![contenders](compare.png)", "", "## What it says", "", *findings(result), "",
             "## Best unit per topic", "", topic_table(result), "",
             "Definitions: `topk_ds/analysis/compare.py`; every number is in `compare.json`.", ""]
    return "\n".join(lines)
