"""Neuron labels from top tokens and, where the topics are known (the synthetic corpus writes
concepts.json beside corpus.jsonl), scoring against them:

    top tokens  the n token ids of largest abar (> 0) among those seen at least `min_count` times
    label       the first three top tokens, e.g. "chef/soup/kitchen"
    topic       the topic holding most of the top tokens (as whole words)
    precision   share of the top tokens that are words of that topic
    recall      share of the topic's words (whole tokens seen in the data) in the neuron's set S
                (abar > theta, the set semantic entropy is computed over)
"""

import json
import re
from pathlib import Path

import torch

from ..errors import UserError

TOP_TOKENS, MIN_COUNT = 10, 3  # a token seen once or twice has too noisy a mean to rank


def show(piece: str) -> str:
    """A token as text: sentencepiece's word-start mark as a space."""
    return piece.replace("▁", " ")


def word_of(piece: str) -> str | None:
    """The word a token spells when it is a whole word ("▁chef" -> "chef"), else None."""
    w = piece.removeprefix("▁")
    return w.lower() if w != piece and w.isalpha() else None


def top_tokens(abar: torch.Tensor, counts: torch.Tensor, n: int = TOP_TOKENS, min_count: int = MIN_COUNT):
    """(values, ids), each (n', D) best first, n' = min(n, ids seen >= min_count times). A neuron with
    fewer than n' tokens of positive abar has -inf in the rest of its column: those are no top tokens."""
    eligible = counts >= min_count
    n = min(n, int(eligible.sum()))
    return abar.masked_fill(~eligible[:, None] | (abar <= 0), float("-inf")).topk(n, dim=0)


def label(ids, values, pieces: list[str]) -> str:
    """The first three top tokens ("chef/soup/kitchen"); "-" for a neuron that never fires."""
    shown = [show(pieces[v]).strip() or show(pieces[v]) for v, x in zip(ids[:3].tolist(), values[:3].tolist()) if x > 0]
    return "/".join(shown) or "-"


class Concepts:
    def __init__(self, topics: dict[str, set[str]], function_words: set[str], path: Path | None = None):
        self.names = sorted(topics)
        self.topics, self.function_words, self.path = topics, function_words, path

    @classmethod
    def load(cls, path) -> "Concepts":
        path = Path(path)
        path = path / "concepts.json" if path.is_dir() else path
        try:
            raw = json.loads(path.read_text())
            return cls({k: set(v) for k, v in raw["topics"].items()}, set(raw.get("function_words", [])), path)
        except (OSError, ValueError, KeyError, AttributeError) as e:
            raise UserError(f"cannot read concepts from {path}: {e}") from None

    @classmethod
    def beside(cls, data) -> "Concepts | None":
        """The concepts.json next to the corpus `data` was made from (a prepared directory's manifest
        names its source), if there is one."""
        data = Path(data)
        candidates = [data]
        if (data / "manifest.json").is_file():
            candidates = [Path(s) for s in json.loads((data / "manifest.json").read_text()).get("source", "").split()]
        for c in candidates:
            found = c / "concepts.json" if c.is_dir() else c.parent / "concepts.json"
            if found.is_file():
                return cls.load(found)
        return None

    def by_topic(self, abar, counts, theta, pieces: list[str], top_values, top_ids):
        """Every unit of a layer against every topic: abar (V, D), theta (D,), top_values and top_ids (n, D) from
        top_tokens -> precision (topics, D) over the unit's top tokens (those it fires on), recall (topics, D)."""
        index = {w: t for t, name in enumerate(self.names) for w in self.topics[name]}
        token_topic = torch.tensor([index.get(word_of(p), -1) for p in pieces])
        fired = top_values > 0  # (n, D)
        topic_of = token_topic[top_ids].masked_fill(~fired, -1)
        hits = (topic_of[None] == torch.arange(len(self.names))[:, None, None]).sum(1)  # (topics, D)
        vocab = (token_topic[None, :] == torch.arange(len(self.names))[:, None]) & (counts > 0)  # (topics, V)
        found = vocab.float() @ (abar > theta).float()  # (topics, D)
        return hits / fired.sum(0).clamp(min=1), found / vocab.sum(1, keepdim=True).clamp(min=1)

    def score(self, abar, counts, theta, pieces: list[str], top_values, top_ids) -> dict:
        """Every unit of a layer at once -> topic (list of D names, None without a hit), precision (D,) and
        recall (D,) of that topic."""
        precision, recall = self.by_topic(abar, counts, theta, pieces, top_values, top_ids)
        best_precision, best = precision.max(dim=0)
        hit = best_precision > 0
        return {"topic": [self.names[t] if h else None for t, h in zip(best.tolist(), hit.tolist())],
                "precision": best_precision, "recall": torch.where(hit, recall.gather(0, best[None]).squeeze(0), 0.0)}

    def share(self, texts: list[str], topic: str) -> tuple[int, int]:
        """(words of `topic`, content words) in `texts`; content words are all but the function words."""
        words = [w for text in texts for w in re.findall(r"[a-z]+", text.lower()) if w not in self.function_words]
        return sum(w in self.topics[topic] for w in words), len(words)
