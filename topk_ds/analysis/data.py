"""The tokens to analyse, as batches of consecutive windows: from a prepared data directory
(memory-mapped shards) or from text files (.txt/.jsonl/.parquet), tokenized with the model's
tokenizer the way `data prepare` does it (<s> ids </s> per document, documents concatenated)."""

from pathlib import Path

import torch

from ..data.manifest import MANIFEST
from ..errors import UserError


def is_prepared(data) -> bool:
    return (Path(data) / MANIFEST).is_file()


def check_data(data) -> None:
    """Fail early on data that cannot be read: a prepared directory's manifest, or text files that exist."""
    if is_prepared(data):
        from ..data.manifest import read_manifest

        read_manifest(data)
    else:
        from ..data.sources import resolve

        resolve([str(data)])


def token_batches(data, tokenizer, vocab_size: int, seq_len: int, max_tokens: int, batch_windows: int,
                  split: str = "train"):
    """Yield (B, seq_len) int64 batches of non-overlapping windows, ceil(max_tokens / seq_len) windows
    in all (fewer when the data runs out). Raises UserError when the data holds not one window."""
    if seq_len < 1 or max_tokens < 1 or batch_windows < 1:
        raise UserError("--seq-len, --tokens and --batch must be >= 1")
    want = -(-max_tokens // seq_len)
    windows = _prepared(data, split, seq_len, vocab_size) if is_prepared(data) else _text(data, tokenizer, seq_len)
    batch, seen = [], 0
    for window in windows:
        batch.append(window)
        seen += 1
        if len(batch) == batch_windows or seen == want:
            yield torch.stack(batch)
            batch = []
        if seen == want:
            return
    if batch:
        yield torch.stack(batch)
    if seen == 0:
        raise UserError(f"{data} holds no tokens to analyse (not one window of {seq_len} tokens)")


def _prepared(data, split: str, seq_len: int, vocab_size: int):
    from ..data.dataset import TokenWindows

    windows = TokenWindows(data, split, seq_len)
    windows.check_vocab(vocab_size, "the model")
    for i in range(len(windows)):
        yield windows[i][:-1]  # window i and i + 1 share a boundary token: keep it once


def _text(data, tokenizer, seq_len: int):
    from ..data.sources import DocumentReader, resolve

    if tokenizer is None:
        raise UserError(f"the model has no tokenizer to encode {data}; pass prepared data (`topk-ds data prepare`)")
    reader = DocumentReader(resolve([str(data)]))
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    buffer = []
    for texts in reader.batches(64):
        for ids in tokenizer([t for t in texts if t], add_special_tokens=False)["input_ids"]:
            buffer += [bos, *ids, eos]
        full = len(buffer) // seq_len * seq_len
        yield from torch.tensor(buffer[:full], dtype=torch.int64).view(-1, seq_len)
        buffer = buffer[full:]
