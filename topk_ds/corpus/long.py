"""Long documents with planted key -> value facts: the ground truth of long-range retention.

A document opens with `facts` sentences "The code of the spicy kettle is 7412." (distinct keys from the
topic grammar's adjectives and nouns, random 4-digit values), continues in the grammar's paragraphs about
its topic, and states every fact once more at a distance drawn log-uniformly from 64 words to the length
of the document. The restatement is where retention is measured: its value can only be predicted by
looking back to the fact (`topk-ds eval --suite long` checks the greedy prediction of each value token).
Distances here are in words; a word is at least one token, and the evaluator buckets by the real token
distance under each model's tokenizer.
"""

import math
import random
from pathlib import Path

from ..errors import UserError
from . import doc_rng, write_corpus
from .grammar import TOPIC_LIST, _topics, _Writer

MIN_DISTANCE = 64  # words between a fact and its restatement, at least
DEFAULT_LENGTH = 6000  # words per document: about 8k tokens with a tokenizer trained on the corpus
DEFAULT_FACTS = 16
DEFAULT_LONG_DOCS = 400
MAX_FACTS = 64


def fact_sentence(key: str, value: str) -> str:
    return f"The code of the {key} is {value}."


def long_document(rng: random.Random, length: int = DEFAULT_LENGTH, facts: int = DEFAULT_FACTS,
                  reach: int | None = None) -> dict:
    """{"text", "topics", "facts": [{"key", "value", "spans": [[start, end] of the value in text, fact first]}]}.
    Restatements come MIN_DISTANCE to `reach` words after their fact (default: length - MIN_DISTANCE)."""
    main, second = _topics(rng)
    writer = _Writer(rng, main, second)
    keys = rng.sample([(a, n[0]) for t in TOPIC_LIST for a in t.adjectives for n in t.nouns], facts)
    planted = [{"key": f"{a} {n}", "value": f"{rng.randrange(1000, 10000)}", "spans": []} for a, n in keys]
    pieces, chars, words = [], 0, 0

    def add(sentence: str, separator: str = " ", fact: dict | None = None) -> None:
        nonlocal chars, words
        if pieces:
            pieces.append(separator)
            chars += len(separator)
        if fact is not None:
            start = chars + sentence.rindex(fact["value"])
            fact["spans"].append([start, start + len(fact["value"])])
        pieces.append(sentence)
        chars, words = chars + len(sentence), words + len(sentence.split())

    for fact in planted:
        add(fact_sentence(fact["key"], fact["value"]), fact=fact)
    # all facts are stated again, each `distance` words later; log-uniform distances cover every octave alike
    lo, hi = math.log(MIN_DISTANCE), math.log(max(reach or length - MIN_DISTANCE, MIN_DISTANCE))
    due = sorted((words + round(math.exp(rng.uniform(lo, hi))), i) for i in range(facts))
    while words < length or due:
        for j in range(rng.randint(4, 8)):  # a paragraph
            separator = "\n\n" if j == 0 else " "
            if due and words >= due[0][0]:
                fact = planted[due.pop(0)[1]]
                add(fact_sentence(fact["key"], fact["value"]), separator, fact)
                separator = " "
            add(writer.sentence(), separator)
    return {"text": "".join(pieces), "topics": [main.name] + ([second.name] if second else []), "facts": planted}


def write_long_corpus(out: Path, docs: int = DEFAULT_LONG_DOCS, seed: int = 0, length: int = DEFAULT_LENGTH,
                      facts: int = DEFAULT_FACTS, progress: bool = True) -> Path:
    """Write out/corpus.jsonl (long documents with their facts) and out/concepts.json. Same seed, same bytes."""
    if not 1 <= facts <= MAX_FACTS:
        raise UserError(f"--facts must be in [1, {MAX_FACTS}], got {facts}")
    if length < 2 * MIN_DISTANCE:
        raise UserError(f"--length must be at least {2 * MIN_DISTANCE} words (facts are stated again "
                        f"{MIN_DISTANCE} or more words later), got {length}")
    return write_corpus(out, docs, seed, lambda i: long_document(doc_rng(seed, i, "long"), length, facts),
                        "long corpus", progress, long={"length": length, "facts": facts})
