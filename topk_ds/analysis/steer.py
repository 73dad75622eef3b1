"""Concept steering (the paper's Section 4): push one unit by an offset c at every position: the prompt,
and every generated token (under the KV cache each generated token passes through the model alone, and
the hook sees it). For a neuron that is z_{l,i,t} <- z_{l,i,t} + c on its pre-activation; how other
units are pushed is theirs to say (`Units.steered`). Sampling follows the paper: temperature 0.7,
top-p 0.9, top-k 50, from "Once upon a time,", or greedy decoding (one text, reproducible anywhere: what
an nnsight intervention on the same pre-activation gives too). Every offset is sampled with the same seed
as the unsteered baseline, so the texts differ only by the intervention."""

import contextlib

import torch
from ..convert.hf_export import GENERATION_DEFAULTS
from ..errors import UserError
from ..progress import progress as progress_of
from .settings import PROMPT


def sampling(greedy: bool = False) -> dict:
    """Generation settings: the paper's sampling, or greedy decoding."""
    return {"do_sample": False} if greedy else {k: v for k, v in GENERATION_DEFAULTS.items() if k != "max_new_tokens"}


def generate(model, tokenizer, prompt: str, samples: int, seed: int, max_new_tokens: int,
             greedy: bool = False) -> torch.Tensor:
    """(samples, new tokens) ids of `samples` continuations of `prompt` (one batch; ended ones padded with EOS),
    within the model's context: RoPE has no table, so the model would run past it without a word."""
    ids = tokenizer(prompt, return_tensors="pt").input_ids.to(model.device)
    context = model.config.max_seq_len
    if ids.shape[1] + max_new_tokens > context:
        raise UserError(f"--max-new-tokens {max_new_tokens} after a prompt of {ids.shape[1]} tokens exceeds the model's "
                        f"context (max_seq_len {context}); choose --max-new-tokens <= {max(context - ids.shape[1], 0)}")
    torch.manual_seed(seed)
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), num_return_sequences=samples,
                             **sampling(greedy), max_new_tokens=max_new_tokens,
                             pad_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id)
    return out[:, ids.shape[1]:].cpu()


def sample(model, tokenizer, prompt: str, samples: int, seed: int, max_new_tokens: int, greedy: bool = False) -> list[str]:
    """`samples` continuations of `prompt` (one batch), text only."""
    return tokenizer.batch_decode(generate(model, tokenizer, prompt, samples, seed, max_new_tokens, greedy),
                                  skip_special_tokens=True)


def topic_shares(texts: list[str], concepts) -> dict[str, float]:
    """Each topic's share of the content words of `texts`."""
    shares = {}
    for topic in concepts.names:
        hits, words = concepts.share(texts, topic)
        shares[topic] = hits / words if words else 0.0
    return shares


def steering_candidates(rows: list[dict], concepts, baseline: dict[str, float], n: int = 5,
                        precision: float = 0.8) -> list[dict]:
    """The `n` units most likely to steer, by what predicts it: purity (precision >= `precision`, and the
    unit's strongest token is a word of its topic), the scale it fires at (its mean activation on its best
    token: weak units do not steer at any offset), and room to rise (a low unsteered share of its topic).
    At most one unit per topic, so a population of candidates covers several concepts."""
    from .concepts import word_of

    pure = [r for r in rows if r.get("topic") and r["precision"] >= precision and r["top_mean"] > 0
            and word_of(r["top_piece"]) in concepts.topics[r["topic"]]]
    ranked = sorted(pure, key=lambda r: -r["top_mean"] * (1.0 - baseline.get(r["topic"], 0.0)))
    chosen, topics = [], set()
    for r in ranked:
        if r["topic"] not in topics:
            chosen.append(r)
            topics.add(r["topic"])
        if len(chosen) == n:
            break
    return chosen


def steering_success(units, tokenizer, candidates: list[dict], concepts, scales=(1.0, 2.0), min_gain: float = 0.2,
                     prompt: str = PROMPT, samples: int = 6, seed: int = 0, max_new_tokens: int = 48,
                     baseline_texts: list[str] | None = None, progress: bool = True) -> dict:
    """Steer each candidate (rows with layer, index, topic, max_activation) at `scales` times its largest
    activation; a unit succeeds when at some scale its topic's share of generated content words rises by
    at least `min_gain` over the unsteered baseline (same prompt, seed and sampling for every unit)."""
    if baseline_texts is None:
        baseline_texts = sample(units.model, tokenizer, prompt, samples, seed, max_new_tokens)
    baseline = topic_shares(baseline_texts, concepts)
    results = []
    for r in progress_of(candidates, desc="steering success", unit="unit", enabled=progress):
        shares = {}
        for scale in scales:
            with units.steered(r["layer"], r["index"], scale * r["max_activation"]):
                texts = sample(units.model, tokenizer, prompt, samples, seed, max_new_tokens)
            hits, words = concepts.share(texts, r["topic"])
            shares[scale] = hits / words if words else 0.0
        gain = max(shares.values()) - baseline[r["topic"]]
        results.append({"neuron": f"{r['layer']}:{r['index']}", "topic": r["topic"], "max_activation": r["max_activation"],
                        "baseline_share": baseline[r["topic"]], "shares": shares, "gain": gain, "success": gain >= min_gain})
    return {"scales": list(scales), "min_gain": min_gain, "prompt": prompt, "samples": samples, "seed": seed,
            "max_new_tokens": max_new_tokens, "units": results,
            "success": sum(u["success"] for u in results) / len(results) if results else 0.0}


def steer(units, tokenizer, layer: int, index: int, offsets: list[float], prompt: str = PROMPT, samples: int = 5,
          seed: int = 0, max_new_tokens: int = 128, concepts=None, topic: str | None = None, greedy: bool = False,
          progress: bool = True) -> dict:
    """Texts (and their token ids) per offset, the unsteered baseline (offset 0) first; with concepts and a topic,
    the share of generated content words that belong to the topic."""
    if tokenizer is None:
        raise UserError("the model has no tokenizer: steering needs one to encode the prompt and decode the samples")
    if topic is not None and topic not in concepts.topics:
        raise UserError(f"unknown topic '{topic}'; {concepts.path} has {', '.join(concepts.names)}")
    rows = []
    for offset in progress_of([0.0] + [c for c in offsets if c != 0], desc="steer", unit="offset", enabled=progress):
        with units.steered(layer, index, offset) if offset else contextlib.nullcontext():
            ids = generate(units.model, tokenizer, prompt, samples, seed, max_new_tokens, greedy)
        texts = tokenizer.batch_decode(ids, skip_special_tokens=True)
        row = {"offset": offset, "texts": texts, "ids": ids.tolist()}
        if topic is not None:
            hits, words = concepts.share(texts, topic)
            row |= {"topic_words": hits, "content_words": words, "share": hits / words if words else 0.0}
        rows.append(row)
    return {"neuron": f"{layer}:{index}", "units": units.name, "prompt": prompt, "samples": samples, "seed": seed,
            "max_new_tokens": max_new_tokens, "sampling": sampling(greedy), "topic": topic, "offsets": rows}


def format_table(result: dict) -> str:
    how = "greedy" if not result["sampling"]["do_sample"] else f"seed {result['seed']}"
    lines = [f"steering {result['units']} {result['neuron']} from {result['prompt']!r}, {how}"
             + (f"; share of generated content words in topic '{result['topic']}'" if result["topic"] else "")]
    for row in result["offsets"]:
        share = f"  {row['share']:6.1%} ({row['topic_words']}/{row['content_words']})" if "share" in row else ""
        lines.append(f"offset {row['offset']:+g}{' (unsteered)' if not row['offset'] else ''}{share}")
        lines += [f"  [{j}] {t.strip()}".replace("\n", " ⏎ ") for j, t in enumerate(row["texts"], 1)]
    return "\n".join(lines)
