"""`topk-ds data prepare`: documents -> sentencepiece ids with BOS/EOS -> packed token shards.

Documents are encoded in batches by sentencepiece's own multi-threaded encoder (the fast path),
each as <s> ids </s>, and concatenated in input order into each split's stream of shards.

Validation split (VAL_RULE): number the documents that have text from 0 in input order; while the
validation split holds fewer than --val-tokens tokens, document i goes to it when
blake2b(f"{seed}:{i}") is even (about every second document); after that every document goes to
training. So validation takes about the first 2 x --val-tokens tokens' worth of documents, and
the same input, tokenizer and seed always give the same split.

Nothing half-written: everything goes into a hidden sibling directory (topk_ds.io.atomic_output),
manifest.json last, renamed to OUT in one step; an error, Ctrl-C or SIGTERM removes it. Prepare
never resumes or overwrites: an OUT that holds anything is refused.
"""

import contextlib
import hashlib
import shutil
from itertools import chain
from pathlib import Path

import numpy as np

from ..errors import UserError
from ..io import atomic_output, check_new_dir, sha256_file, write_json
from .manifest import DEFAULT_SHARD_TOKENS, DEFAULT_VAL_TOKENS, FORMAT, FORMAT_VERSION, MANIFEST, SPLITS, tokenizer_dir
from .sources import DocumentReader, resolve
from .tokenizer import FILES, MODEL, cpu_threads, load_sentencepiece

BATCH_DOCS = 1024  # documents per sentencepiece call
VAL_RULE = ("documents with text numbered from 0 in input order; while validation has fewer than val_tokens "
            "tokens, document i goes to it if blake2b('{seed}:{i}') is even; then all go to training")


def goes_to_val(seed: int, index: int) -> bool:
    return hashlib.blake2b(f"{seed}:{index}".encode(), digest_size=8).digest()[0] % 2 == 0


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype("<u2") if vocab_size <= 1 << 16 else np.dtype("<u4")


class ShardWriter:
    """One split's token stream, cut into files of at most shard_tokens tokens and hashed as written."""

    def __init__(self, folder: Path, split: str, dtype: np.dtype, shard_tokens: int):
        self.folder, self.split, self.dtype, self.shard_tokens = folder, split, dtype, shard_tokens
        self.shards, self.tokens, self._file = [], 0, None

    def write(self, tokens: np.ndarray) -> None:
        while len(tokens):
            if self._file is None:
                self._name = f"{self.split}-{len(self.shards):05d}.bin"
                self._file, self._hash, self._count = open(self.folder / self._name, "wb"), hashlib.sha256(), 0
            chunk, tokens = tokens[:self.shard_tokens - self._count], tokens[self.shard_tokens - self._count:]
            self._file.write(chunk.data)
            self._hash.update(chunk.data)
            self._count += len(chunk)
            self.tokens += len(chunk)
            if self._count == self.shard_tokens:
                self._finish()

    def _finish(self) -> None:
        self._file.close()
        self.shards.append({"file": self._name, "tokens": self._count, "bytes": self._count * self.dtype.itemsize,
                            "sha256": self._hash.hexdigest()})
        self._file = None

    def close(self) -> list[dict]:
        if self._file is not None:
            self._finish()
        return self.shards

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        if self._file is not None:  # failed or interrupted: the file goes with the temporary directory
            with contextlib.suppress(OSError):  # its buffered bytes cannot be written either (a full disk)
                self._file.close()


def _val_mask(lengths: np.ndarray, first: int, have: int, want: int, seed: int) -> np.ndarray | None:
    """Which of these documents (numbered from `first`) go to validation; None when it is full."""
    if have >= want:
        return None
    mask = np.zeros(len(lengths), bool)
    for j, n in enumerate(lengths.tolist()):
        if have >= want:
            break
        if goes_to_val(seed, first + j):
            mask[j], have = True, have + n
    return mask


def _tokenize(reader: DocumentReader, sp, writers: dict, val_tokens: int, max_tokens: int | None, seed: int,
              progress: bool) -> dict:
    """Encode every document into the writers; returns the document counts."""
    from ..progress import progress as progress_of

    docs = {"seen": 0, "not_utf8": 0, "empty": 0, "train": 0, "val": 0}
    dtype, threads, total = writers["train"].dtype, cpu_threads(), 0
    with progress_of(total=max_tokens, desc="prepare", unit="tok", unit_scale=True, enabled=progress) as bar:
        for batch in reader.batches(BATCH_DOCS):
            keep = [i for i, text in enumerate(batch) if text]
            ids = sp.encode([batch[i] for i in keep], add_bos=True, add_eos=True, num_threads=threads)
            lengths = np.fromiter(map(len, ids), np.int64, count=len(ids))
            used = len(batch)
            if max_tokens is not None and total + lengths.sum() >= max_tokens:  # cut the stream at max_tokens
                room = max_tokens - total
                lengths = lengths[:int(np.searchsorted(np.cumsum(lengths), room)) + 1]
                lengths[-1] -= lengths.sum() - room
                used = keep[len(lengths) - 1] + 1
            docs["seen"] += used
            docs["not_utf8"] += sum(text is None for text in batch[:used])
            docs["empty"] += sum(text == "" for text in batch[:used])
            tokens = np.fromiter(chain.from_iterable(ids), dtype, count=int(lengths.sum()))
            mask = _val_mask(lengths, docs["train"] + docs["val"], writers["val"].tokens, val_tokens, seed)
            if mask is None:
                writers["train"].write(tokens)
            else:
                to_val = np.repeat(mask, lengths)
                writers["val"].write(tokens[to_val])
                writers["train"].write(tokens[~to_val])
            n_val = 0 if mask is None else int(mask.sum())
            docs["val"] += n_val
            docs["train"] += len(lengths) - n_val
            total += len(tokens)
            bar.update(len(tokens))
            bar.set_postfix(docs=docs["seen"], refresh=False)
            if total == max_tokens:
                break
    return docs


def prepare(inputs: list[str], tokenizer, out, text_field: str = "text", val_tokens: int = DEFAULT_VAL_TOKENS,
            max_tokens: int | None = None, seed: int = 0, strict: bool = False,
            shard_tokens: int = DEFAULT_SHARD_TOKENS, progress: bool = True) -> dict:
    """Tokenize the inputs into OUT (shards, manifest.json, tokenizer/); returns the manifest."""
    tokenizer, out = Path(tokenizer), Path(out)
    if val_tokens < 0 or shard_tokens < 1 or (max_tokens is not None and max_tokens < 1):
        raise UserError("--val-tokens must be >= 0, --shard-tokens and --max-tokens >= 1")
    if max_tokens is not None and val_tokens >= max_tokens:
        raise UserError(f"--val-tokens {val_tokens} must be smaller than --max-tokens {max_tokens} (training needs some)")
    if (out / MANIFEST).is_file():
        raise UserError(f"{out} already holds prepared data; prepare does not resume or overwrite: "
                        f"choose another --out or remove it")
    check_new_dir(out, "data prepare")
    missing = [f for f in FILES if not (tokenizer / f).is_file()]
    if not tokenizer.is_dir() or missing:
        raise UserError(f"--tokenizer {tokenizer} must be a directory with {', '.join(FILES)} (missing "
                        f"{', '.join(missing)}); make one with `topk-ds tokenizer train` or `topk-ds tokenizer import`")
    sp = load_sentencepiece(tokenizer)
    reader = DocumentReader(resolve(inputs), text_field, strict)

    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(out) as tmp, contextlib.ExitStack() as files:
        tmp.mkdir()
        tokenizer_dir(tmp).mkdir()
        for f in FILES:
            shutil.copyfile(tokenizer / f, tokenizer_dir(tmp) / f)
        writers = {split: files.enter_context(ShardWriter(tmp, split, token_dtype(sp.vocab_size()), shard_tokens))
                   for split in SPLITS}
        docs = _tokenize(reader, sp, writers, val_tokens, max_tokens, seed, progress)
        shards = {split: w.close() for split, w in writers.items()}
        train, val = writers["train"].tokens, writers["val"].tokens
        if docs["train"] + docs["val"] == 0:
            raise UserError(f"no documents with text in {reader.source.spec} ({docs['seen']} read, "
                            f"{docs['not_utf8']} not UTF-8, {docs['empty']} empty)")
        if val < val_tokens:
            raise UserError(f"--val-tokens {val_tokens:,} is more than this corpus can give: validation got {val:,} "
                            f"of its {train + val:,} tokens (about every second document until full); lower --val-tokens")
        if train == 0:
            raise UserError(f"no tokens left for training: validation took all {val:,}; lower --val-tokens")
        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "source": reader.source.spec,
            "text_field": reader.field,
            "tokenizer": {"dir": "tokenizer", "sha256": sha256_file(tokenizer / MODEL), "vocab_size": sp.vocab_size(),
                          "bos_id": sp.bos_id(), "eos_id": sp.eos_id()},
            "dtype": writers["train"].dtype.name,
            "byte_order": "little",
            "documents": docs,
            "tokens": {"total": train + val, "train": train, "val": val},
            "splits": {split: {"tokens": writers[split].tokens, "shards": shards[split]} for split in SPLITS},
            "options": {"val_tokens": val_tokens, "max_tokens": max_tokens, "seed": seed, "strict": strict,
                        "shard_tokens": shard_tokens},
            "val_rule": VAL_RULE,
        }
        write_json(tmp / MANIFEST, manifest)  # last: a directory without it is not prepared data
    return manifest
