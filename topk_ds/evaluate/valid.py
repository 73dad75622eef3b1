"""The documents behind Table 1's "Valid." column: the validation split of a prepared data directory,
decoded back into text, or the "text" field of a jsonl of held-out documents."""

import json
from pathlib import Path

import numpy as np

from ..data.manifest import read_manifest, shard_problem, tokenizer_dir
from ..data.tokenizer import load_sentencepiece
from ..errors import UserError


def validation_documents(path) -> list[str]:
    path = Path(path)
    if path.is_dir():
        return decode_val_split(path)
    if path.is_file():
        return _jsonl_texts(path)
    raise UserError(f"validation data {path}: no such file or directory (expected a prepared data directory or a "
                    "jsonl with a \"text\" field)")


def decode_val_split(data_path: Path) -> list[str]:
    """`data prepare` writes each document as <s> ids </s>: cut the val stream at every </s>."""
    manifest = read_manifest(data_path)
    shards = manifest["splits"]["val"]["shards"]
    for shard in shards:
        if problem := shard_problem(data_path, shard, checksum=False):
            raise UserError(f"{problem}; check the data with `topk-ds data verify {data_path}`")
    if not shards:
        raise UserError(f"{data_path} has an empty validation split; prepare it with --val-tokens > 0")
    dtype = np.dtype(manifest["dtype"]).newbyteorder("<")
    stream = np.concatenate([np.fromfile(data_path / s["file"], dtype=dtype) for s in shards]).astype(np.int64)
    sp = load_sentencepiece(tokenizer_dir(data_path))
    ends = np.flatnonzero(stream == sp.eos_id())
    starts = np.concatenate([[0], ends[:-1] + 1])
    docs = [stream[s + (stream[s] == sp.bos_id()):e].tolist() for s, e in zip(starts, ends)]
    return sp.decode(docs)


def _jsonl_texts(path: Path) -> list[str]:
    texts = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                texts.append(str(json.loads(line)["text"]))
            except (ValueError, KeyError, TypeError):
                raise UserError(f"{path}:{n}: expected one JSON object with a \"text\" field per line") from None
    if not texts:
        raise UserError(f"{path} holds no documents")
    return texts
