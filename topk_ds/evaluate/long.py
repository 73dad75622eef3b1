"""`topk-ds eval --suite long`: retention over long contexts, against planted ground truth.

Documents of the long grammar (topk_ds.corpus.long, a stream disjoint from the training corpus) fill
the context: key -> value facts at the start, each stated again later. Per model, one forward pass
per document gives
  - retrieval accuracy by distance: a restatement counts as recalled when every token of its value is
    the model's greedy prediction given the true prefix (lm-eval's `is_greedy`), bucketed by the token
    distance back to the fact (64-128, ..., 4k-8k);
  - perplexity by position: exp of the mean next-token loss over the tokens at positions 0-256,
    256-1k, 1k-4k, 4k-8k.
A direct evaluator, not lm-eval: lm-eval's rolling loglikelihood sums a document's log-probabilities,
so perplexity by position cannot be expressed, and its loglikelihood requests would run the (up to 8k
token) prefix once per restatement, where one pass over the document answers all of them.
"""

import bisect
import json
import math
import sys
from pathlib import Path

import torch

from ..corpus import doc_rng
from ..corpus.long import long_document
from ..errors import UserError
from .run import _file_names, _step, _write, check_max_length, describe, load_model

DISTANCE_BUCKETS = (64, 128, 256, 512, 1024, 2048, 4096, 8192)  # retrieval: [64, 128), ..., [4096, 8192)
POSITION_BUCKETS = (0, 256, 1024, 4096, 8192)  # perplexity: [0, 256), [256, 1k), [1k, 4k), [4k, 8k)
SEED, DEFAULT_DOCS = 0, 32
STREAM = "long-eval"  # the training corpus uses "long"
TOKENS_PER_WORD = 1.5  # at most, for tokenizers trained on the grammar: restatements stay inside the context


def _label(lo: int, hi: int) -> str:
    k = lambda n: f"{n // 1024}k" if n >= 1024 else str(n)  # noqa: E731
    return f"{k(lo)}-{k(hi)}"


def bucket(value: int, edges: tuple[int, ...]) -> int | None:
    """Index i with edges[i] <= value < edges[i + 1], or None outside."""
    i = bisect.bisect_right(edges, value) - 1
    return i if 0 <= i < len(edges) - 1 else None


def documents(tokenizer, length: int, docs: int, seed: int = SEED) -> list[tuple[torch.Tensor, list[tuple[list[int], int]]]]:
    """`docs` long documents cut to `length` tokens: (ids (length,), [(value token positions of a
    restatement, token distance back to its fact)]). A word is at least one token, so a document of
    `length` words always fills the context; one fact per 128 tokens, at most 16, keeps most of it prose."""
    out = []
    facts, reach = min(16, max(1, length // 128)), int(length / TOKENS_PER_WORD)
    for i in range(docs):
        doc = long_document(doc_rng(seed, i, STREAM), length, facts, reach)
        enc = tokenizer(doc["text"], return_offsets_mapping=True)
        ids, offsets = enc["input_ids"][:length], enc["offset_mapping"][:length]
        if len(ids) < length:
            raise UserError(f"the tokenizer made {len(ids)} tokens of a {length}-word document; the long suite "
                            "needs a tokenizer that gives every word at least one token")
        queries = []
        for fact in doc["facts"]:
            (fact_span, *restated) = [[t for t, (s, e) in enumerate(offsets) if s < b and e > a] for a, b in fact["spans"]]
            for tokens in restated:
                if fact_span and tokens and tokens[-1] < length:
                    queries.append((tokens, tokens[0] - fact_span[0]))
        out.append((torch.tensor(ids), queries))
    return out


@torch.no_grad()
def score(model, docs, batch_size: int = 1) -> dict:
    """Recalled / asked per distance bucket and loss sum / count per position bucket."""
    recalled, asked = [0] * (len(DISTANCE_BUCKETS) - 1), [0] * (len(DISTANCE_BUCKETS) - 1)
    loss, count = [0.0] * (len(POSITION_BUCKETS) - 1), [0] * (len(POSITION_BUCKETS) - 1)
    device = next(model.parameters()).device
    for start in range(0, len(docs), batch_size):
        chunk = docs[start:start + batch_size]
        ids = torch.stack([d[0] for d in chunk]).to(device)
        logits = model(ids, use_cache=False).logits.float()  # (B, T, V)
        nll = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none").cpu()
        greedy = (logits[:, :-1].argmax(-1) == ids[:, 1:]).cpu()  # greedy[b, j - 1]: token j was the top prediction
        for b, (_, queries) in enumerate(chunk):
            for tokens, distance in queries:
                if (i := bucket(distance, DISTANCE_BUCKETS)) is not None:
                    asked[i] += 1
                    recalled[i] += bool(greedy[b, [t - 1 for t in tokens]].all())
        for i in range(len(count)):  # nll[:, j - 1] is the loss of the token at position j
            part = nll[:, max(POSITION_BUCKETS[i] - 1, 0):POSITION_BUCKETS[i + 1] - 1]
            loss[i] += part.sum().item()
            count[i] += part.numel()
    return {"distance": [{"bucket": _label(DISTANCE_BUCKETS[i], DISTANCE_BUCKETS[i + 1]), "asked": asked[i],
                          "recalled": recalled[i], "accuracy": recalled[i] / asked[i] if asked[i] else None}
                         for i in range(len(asked))],
            "position": [{"bucket": _label(POSITION_BUCKETS[i], POSITION_BUCKETS[i + 1]), "tokens": count[i],
                          "perplexity": math.exp(loss[i] / count[i]) if count[i] else None}
                         for i in range(len(count))]}


def evaluate_long(models: list[str], out: Path | None = None, docs: int = DEFAULT_DOCS,
                  max_length: int | None = None, batch_size: int = 1, device="cpu", dtype=None) -> Path:
    """Every model on the same documents, one after another on `device`; OUT/LABEL.json per model,
    OUT/table.md and OUT/retention.png."""
    from ..analysis.plots import retention
    from ..devices import check_memory, cost_line, free_device_memory, resolve

    device, dtype = resolve(device, dtype)
    if max_length is not None:  # refused before any model is read
        _check_length(max_length)
    specs = [describe(Path(m)) for m in models]
    limits = [s.max_len for s in specs if s.max_len is not None]
    length = max_length or (min(limits) if limits else None)
    if length is None:
        raise UserError("no model states its longest sequence: pass --max-length")
    check_max_length(specs, length)
    if max_length is None:
        _check_length(length)
    flops = []
    for spec in specs:  # every model checked before the first is loaded
        needs, per_token = _needs(spec, length, batch_size, dtype)
        print(check_memory(f"eval --suite long {spec.label}", needs, device, "choose a smaller --batch-size or "
                           "--max-length"), file=sys.stderr)
        flops.append(per_token)
    out = Path(out) if out else Path("eval_results") / "long"
    out.mkdir(parents=True, exist_ok=True)
    rows, names, cache = [], _file_names(specs), {}
    for i, (spec, name) in enumerate(zip(specs, names), 1):
        print(f"[{i}/{len(specs)}] {spec.label}{_step(spec)}: {docs} documents of {length} tokens",
              file=sys.stderr, flush=True)
        print(cost_line(f"eval --suite long {spec.label}", docs * length, flops[i - 1], device, dtype),
              file=sys.stderr, flush=True)
        model, tokenizer = load_model(spec, device, dtype)
        key = json.dumps(tokenizer.get_vocab(), sort_keys=True)  # same tokenizer, same documents
        if key not in cache:
            cache[key] = documents(tokenizer, length, docs)
        try:
            result = score(model, cache[key], batch_size)
        except torch.cuda.OutOfMemoryError as e:
            raise UserError(f"{spec.label}: out of memory on {device} ({str(e).splitlines()[0]}); choose a smaller "
                            "--batch-size or --max-length") from None
        finally:
            del model
            free_device_memory(device)
        result |= {"model": str(spec.path.resolve()), "label": spec.label, "train_step": spec.step, "docs": docs,
                   "max_length": length, "device": str(device), "dtype": str(dtype).removeprefix("torch.")}
        _write(out / f"{name}.json", json.dumps(result, indent=1) + "\n")
        rows.append((spec, result))
    table = markdown_table(rows, length, docs)
    _write(out / "table.md", table + "\n")
    retention([{"name": spec.label, **result} for spec, result in rows], out / "retention.png")
    print(table)
    print(f"wrote {', '.join(n + '.json' for n in names)}, table.md and retention.png to {out}/")
    return out


def _check_length(length: int) -> None:
    if length < 2 * DISTANCE_BUCKETS[0]:
        raise UserError(f"--max-length {length} is too short for the long suite: facts are recalled "
                        f"{DISTANCE_BUCKETS[0]} or more tokens later; use at least {2 * DISTANCE_BUCKETS[0]}")


def _needs(spec, length: int, batch_size: int, dtype: torch.dtype) -> tuple[dict[str, int], float]:
    """({part: bytes} one model needs to score batches of `batch_size` documents of `length` tokens, forward
    FLOPs per token), from its config alone. Activations are an estimate (the SwiGLU hidden three times and the
    residual stream six times per token); the logits are held in the model's dtype and twice in fp32 (the copy
    scored and cross-entropy's log-softmax)."""
    if spec.kind == "topk":
        from ..convert.hf_export import read_config

        cfg = read_config(spec.path)[0]
        params, flops = cfg.num_params(), cfg.flops_per_token(length, training=False)
        vocab, dim, ffn = cfg.vocab_size, cfg.dim, cfg.ffn_dim
    else:  # another causal LM: its parameters counted on the meta device, 2 FLOPs per weight as `eval` counts them
        from transformers import AutoConfig, AutoModelForCausalLM

        config = AutoConfig.from_pretrained(spec.path)
        with torch.device("meta"):
            params = sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())
        flops, vocab, dim = 2.0 * params, config.vocab_size, config.hidden_size
        ffn = getattr(config, "intermediate_size", None) or 4 * dim
    tokens = batch_size * length
    return ({"model": params * dtype.itemsize, "logits": tokens * vocab * (dtype.itemsize + 8),
             "activations": tokens * (3 * ffn + 6 * dim) * dtype.itemsize}, flops)


def markdown_table(rows, length: int, docs: int) -> str:
    first = rows[0][1]
    dist = [d["bucket"] for d in first["distance"]]
    pos = [p["bucket"] for p in first["position"]]
    header = ["Model", "Step", "TopK", *(f"Recall {b} ↑" for b in dist), *(f"PPL {b} ↓" for b in pos)]
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    for spec, r in rows:
        recall = ["–" if d["accuracy"] is None else f"{100 * d['accuracy']:.1f} ({d['asked']})" for d in r["distance"]]
        ppl = ["–" if p["perplexity"] is None else f"{p['perplexity']:.2f}" for p in r["position"]]
        lines.append("| " + " | ".join([spec.label, "–" if spec.step is None else str(spec.step),
                                        "✗" if spec.topk is None else f"✓ k={spec.topk}", *recall, *ppl]) + " |")
    return "\n".join(lines) + (
        f"\n\nRecall: % of restated facts whose every value token is the greedy prediction, by token distance back "
        f"to the fact (restatements counted in parentheses; chance is about 1e-4). PPL: perplexity of the tokens at "
        f"those positions. {docs} documents of the long grammar, {length} tokens each; '–': no such distance or "
        "position within the context.")
