"""Data loader for the task YAMLs beside this file.

lm-eval resolves a relative `data_files` against the working directory; this resolves it against
this directory, so `--include_path eval/local` works from anywhere. Extra keyword arguments are
lm-eval's task metadata, which it passes to every `custom_dataset` loader.
"""

import json
from pathlib import Path

import datasets


def load(data_files: str, **metadata) -> datasets.DatasetDict:
    path = Path(__file__).parent / data_files
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})
