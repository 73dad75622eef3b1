"""The embedded default: a synthetic topic corpus, written as jsonl + concepts.json. Its concepts are
planted, so analysis can be checked against them."""

import json
import random
from pathlib import Path

from ..errors import UserError
from ..io import atomic_output, write_json
from ..progress import progress as progress_of
from .grammar import concept_words, document, function_words

DEFAULT_DOCS = 3600  # about 4.5 MB of text


def doc_rng(seed: int, index: int, stream: str = "train") -> random.Random:
    """Each document has its own generator, so any document can be produced alone."""
    return random.Random(f"{stream}:{seed}:{index}")


def write_synthetic_corpus(out: Path, docs: int = DEFAULT_DOCS, seed: int = 0, progress: bool = True) -> Path:
    """Write out/corpus.jsonl (text, topics) and out/concepts.json. Same seed, same bytes."""
    return write_corpus(out, docs, seed, lambda i: document(doc_rng(seed, i)), "synthetic corpus", progress)


def write_corpus(out: Path, docs: int, seed: int, make, desc: str, progress: bool = True, **meta) -> Path:
    """out/corpus.jsonl with make(i) for every document i, and out/concepts.json (the planted topics, `meta`)."""
    if docs < 1:
        raise UserError(f"--docs must be >= 1, got {docs}")
    out.mkdir(parents=True, exist_ok=True)
    path = out / "corpus.jsonl"
    with atomic_output(path) as tmp, open(tmp, "w") as f:
        for i in progress_of(range(docs), desc=desc, unit="doc", enabled=progress):
            f.write(json.dumps(make(i)) + "\n")
    write_json(out / "concepts.json", {"topics": concept_words(), "function_words": function_words(),
                                       "seed": seed, "docs": docs, **meta})
    return path


def load_concepts(path: Path) -> dict[str, set[str]]:
    """topic -> its words, from a concepts.json (or the directory holding one)."""
    path = path / "concepts.json" if path.is_dir() else path
    try:
        return {k: set(v) for k, v in json.loads(path.read_text())["topics"].items()}
    except (OSError, ValueError, KeyError) as e:
        raise UserError(f"cannot read concepts from {path}: {e}") from None
