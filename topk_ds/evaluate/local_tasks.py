"""The data of the `local` suite: items of the synthetic topic grammar (topk_ds.corpus.grammar), drawn with a fixed
seed from streams disjoint from the training corpus's ("train"), written as jsonl beside the task
YAMLs in eval/local/. The files are shipped; `topk-ds eval-make-local` regenerates them."""

import json
import shutil
from pathlib import Path

from ..corpus import doc_rng
from ..corpus.grammar import choice_item, cloze_item, document
from ..io import atomic_output, check_output
from .suites import LOCAL_DIR, LOCAL_SEED
# file -> (grammar function, random stream, items); ~0.5 MB in all
FILES = {
    "heldout.jsonl": (document, "heldout", 200),
    "cloze.jsonl": (cloze_item, "cloze", 300),
    "topic_mc.jsonl": (choice_item, "choice", 300),
}
TASK_FILES = ("utils.py", "topk_heldout.yaml", "topk_cloze.yaml", "topk_topic_mc.yaml")


def make_local_tasks(out: Path = LOCAL_DIR, seed: int = LOCAL_SEED) -> dict[str, int]:
    """Write the jsonl files into `out` (each atomically); anywhere but eval/local, also copy the task
    YAMLs and their loader, so `out` is a complete --include_path. Returns {file: items}."""
    out = check_output(out, "eval-make-local")
    out.mkdir(parents=True, exist_ok=True)
    for name, (make, stream, n) in FILES.items():
        with atomic_output(out / name) as tmp, open(tmp, "w") as f:
            for i in range(n):
                f.write(json.dumps(make(doc_rng(seed, i, stream))) + "\n")
    if out.resolve() != LOCAL_DIR.resolve():
        for name in TASK_FILES:
            with atomic_output(out / name) as tmp:
                shutil.copy2(LOCAL_DIR / name, tmp)
    return {name: n for name, (_, _, n) in FILES.items()}
