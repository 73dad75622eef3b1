"""Concept steering (the paper's Section 4): add an offset c to one neuron's pre-activation,
z_{l,i,t} <- z_{l,i,t} + c, at every position: the prompt, and every generated token (under the KV
cache each generated token passes through the model alone, and the hook sees it). Sampling follows
the paper: temperature 0.7, top-p 0.9, top-k 50, from "Once upon a time,". Every offset is sampled
with the same seed as the unsteered baseline, so the texts differ only by the intervention."""

import contextlib

import torch
from tqdm import tqdm

from ..convert.hf_export import GENERATION_DEFAULTS
from ..errors import UserError
from .settings import PROMPT


@contextlib.contextmanager
def steered(model, layer: int, index: int, offset: float):
    """Within the block, neuron layer:index of `model` (a TopKLlamaForCausalLM) gets `offset` added to
    its pre-activation at every position."""
    def add(module, args):
        x = args[0].clone()
        x[..., index] += offset
        return (x, *args[1:])

    handle = model.model.sites()[layer].register_forward_pre_hook(add)
    try:
        yield
    finally:
        handle.remove()


def sample(model, tokenizer, prompt: str, samples: int, seed: int, max_new_tokens: int) -> list[str]:
    """`samples` continuations of `prompt` (one batch), text only."""
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    torch.manual_seed(seed)
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), num_return_sequences=samples,
                             **(GENERATION_DEFAULTS | {"max_new_tokens": max_new_tokens}),
                             pad_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id)
    return tokenizer.batch_decode(out[:, ids.shape[1]:], skip_special_tokens=True)


def steer(model, tokenizer, layer: int, index: int, offsets: list[float], prompt: str = PROMPT, samples: int = 5,
          seed: int = 0, max_new_tokens: int = 128, concepts=None, topic: str | None = None,
          progress: bool = True) -> dict:
    """Texts per offset, the unsteered baseline (offset 0) first; with concepts and a topic, the share of
    generated content words that belong to the topic."""
    if tokenizer is None:
        raise UserError("the model has no tokenizer: steering needs one to encode the prompt and decode the samples")
    if topic is not None and topic not in concepts.topics:
        raise UserError(f"unknown topic '{topic}'; {concepts.path} has {', '.join(concepts.names)}")
    rows = []
    for offset in tqdm([0.0] + [c for c in offsets if c != 0], desc="steer", unit="offset", disable=not progress):
        with steered(model, layer, index, offset) if offset else contextlib.nullcontext():
            texts = sample(model, tokenizer, prompt, samples, seed, max_new_tokens)
        row = {"offset": offset, "texts": texts}
        if topic is not None:
            hits, words = concepts.share(texts, topic)
            row |= {"topic_words": hits, "content_words": words, "share": hits / words if words else 0.0}
        rows.append(row)
    return {"neuron": f"{layer}:{index}", "prompt": prompt, "samples": samples, "seed": seed,
            "max_new_tokens": max_new_tokens, "sampling": {k: v for k, v in GENERATION_DEFAULTS.items() if k != "max_new_tokens"},
            "topic": topic, "offsets": rows}


def format_table(result: dict) -> str:
    lines = [f"steering neuron {result['neuron']} from {result['prompt']!r}, seed {result['seed']}"
             + (f"; share of generated content words in topic '{result['topic']}'" if result["topic"] else "")]
    for row in result["offsets"]:
        share = f"  {row['share']:6.1%} ({row['topic_words']}/{row['content_words']})" if "share" in row else ""
        lines.append(f"offset {row['offset']:+g}{' (unsteered)' if not row['offset'] else ''}{share}")
        lines += [f"  [{j}] {t.strip()}".replace("\n", " ⏎ ") for j, t in enumerate(row["texts"], 1)]
    return "\n".join(lines)
