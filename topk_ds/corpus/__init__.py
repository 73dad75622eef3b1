"""The embedded default: a synthetic topic corpus, written as jsonl + concepts.json. Its concepts are
planted, so analysis can be checked against them."""

import json
import random
from pathlib import Path

from ..errors import UserError
from ..io import atomic_output, check_new_dir, write_json
from ..progress import progress as progress_of
from .grammar import concept_words, document, function_words

DEFAULT_DOCS = 3600  # about 4.5 MB of text


def doc_rng(seed: int, index: int, stream: str = "train") -> random.Random:
    """Each document has its own generator, so any document can be produced alone."""
    return random.Random(f"{stream}:{seed}:{index}")


def write_synthetic_corpus(out: Path, docs: int = DEFAULT_DOCS, seed: int = 0, progress: bool = True) -> Path:
    """Write the new directory `out`: corpus.jsonl (text, topics) and concepts.json, in one rename.
    Same seed, same bytes."""
    return write_corpus(out, docs, seed, lambda i: document(doc_rng(seed, i)), "synthetic corpus", progress)


def write_corpus(out: Path, docs: int, seed: int, make, desc: str, progress: bool = True, **meta) -> Path:
    """The new directory `out` in one rename: corpus.jsonl with make(i) for every document i, and
    concepts.json (the planted topics, and `meta`)."""
    if docs < 1:
        raise UserError(f"--docs must be >= 1, got {docs}")
    out = check_new_dir(out, "corpus synth")
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(out) as tmp:
        tmp.mkdir()
        with open(tmp / "corpus.jsonl", "w") as f, progress_of(range(docs), desc=desc, unit="doc", enabled=progress) as bar:
            for i in bar:
                f.write(json.dumps(make(i)) + "\n")
        write_json(tmp / "concepts.json", {"topics": concept_words(), "function_words": function_words(),
                                           "seed": seed, "docs": docs, **meta})
    return out / "corpus.jsonl"


def load_concepts(path: Path) -> dict[str, set[str]]:
    """topic -> its words, from a concepts.json (or the directory holding one)."""
    path = path / "concepts.json" if path.is_dir() else path
    try:
        return {k: set(v) for k, v in json.loads(path.read_text())["topics"].items()}
    except (OSError, ValueError, KeyError) as e:
        raise UserError(f"cannot read concepts from {path}: {e}") from None
