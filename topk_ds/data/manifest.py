"""A prepared data directory and its manifest.json: reading, shard checks, `topk-ds data verify`.

    DATA/manifest.json         written last by `topk-ds data prepare`
    DATA/train-00000.bin ...   raw little-endian uint16 (uint32 when the vocabulary needs it)
    DATA/val-00000.bin ...     the held-out validation documents
    DATA/tokenizer/            tokenizer.model + the Hugging Face tokenizer files
"""

import json
from pathlib import Path

from ..errors import UserError
from ..io import sha256_file

MANIFEST = "manifest.json"
FORMAT = "topk_ds-tokens"
FORMAT_VERSION = 1
SPLITS = ("train", "val")
DEFAULT_VAL_TOKENS = 250_000  # `data prepare` defaults (here, in a light module, for the CLI's --help)
DEFAULT_SHARD_TOKENS = 100_000_000  # 200 MB of uint16 per file
DTYPES = {"uint16": 2, "uint32": 4}  # little-endian token ids: bytes per token


def tokenizer_dir(data_path) -> Path:
    """DATA/tokenizer: the tokenizer the data was prepared with (sentencepiece + Hugging Face files)."""
    return Path(data_path) / "tokenizer"


def read_manifest(path) -> dict:
    """The manifest of a prepared data directory (or the manifest file itself), checked for format."""
    path = Path(path)
    file = path if path.name == MANIFEST and path.is_file() else path / MANIFEST
    if not file.is_file():
        raise UserError(f"{path} is not a prepared data directory (no {MANIFEST}); make one with `topk-ds data prepare`")
    try:
        m = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise UserError(f"{file} is corrupt ({e}); prepare the data again") from None
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise UserError(f"{file} is not a topk_ds token manifest; prepare the data with `topk-ds data prepare`")
    if m.get("format_version") != FORMAT_VERSION:
        raise UserError(f"{file} has format version {m.get('format_version')}, this topk_ds reads version "
                        f"{FORMAT_VERSION}; prepare the data again")
    try:
        shards = [s for split in SPLITS for s in m["splits"][split]["shards"]]
        counts = [m["tokenizer"]["vocab_size"], *(m["tokens"][split] for split in SPLITS),
                  *(m["splits"][split]["tokens"] for split in SPLITS), *(s[k] for s in shards for k in ("tokens", "bytes"))]
        names = [m["dtype"], *(s[k] for s in shards for k in ("file", "sha256"))]
    except (KeyError, TypeError) as e:
        raise UserError(f"{file} is corrupt (missing entry {e}); prepare the data again") from None
    if not all(type(n) is int for n in counts) or not all(isinstance(n, str) for n in names):
        raise UserError(f"{file} is corrupt (a count that is not a whole number, or a name that is not text); "
                        f"prepare the data again")
    if problem := _inconsistency(m):
        raise UserError(f"{file} contradicts itself: {problem} (edited or damaged); prepare the data again")
    return m


def _inconsistency(m: dict) -> str | None:
    """What the shard bytes cannot tell: counts, dtype and vocabulary that disagree with each other."""
    dtype, vocab = m["dtype"], m["tokenizer"]["vocab_size"]
    if dtype not in DTYPES:
        return f"dtype '{dtype}' is not one of {', '.join(DTYPES)}"
    if not 2 <= vocab <= 1 << (8 * DTYPES[dtype]):
        return f"a vocabulary of {vocab} tokens cannot be stored as {dtype}"
    for split in SPLITS:
        shards = m["splits"][split]["shards"]
        for s in shards:
            if s["file"] != Path(s["file"]).name or s["file"] in ("", ".", ".."):
                return f"shard '{s['file']}' is not a file name inside the data directory"
            if s["tokens"] < 0 or s["bytes"] != s["tokens"] * DTYPES[dtype]:
                return f"{s['file']} is listed with {s['tokens']} tokens of {dtype} but {s['bytes']} bytes"
        if not sum(s["tokens"] for s in shards) == m["splits"][split]["tokens"] == m["tokens"][split]:
            return f"the {split} split's token counts disagree (its shards, splits.{split}.tokens, tokens.{split})"
    if m["tokens"].get("total") != m["tokens"]["train"] + m["tokens"]["val"]:
        return "tokens.total is not train + val"
    return None


def shard_problem(data_path: Path, shard: dict, checksum: bool, vocab_size: int | None = None,
                  dtype: str = "uint16") -> str | None:
    """What is wrong with one shard file (missing, wrong size, wrong sha256, with vocab_size an id outside
    the vocabulary), or None. The checksum and the ids are read in one pass."""
    file = Path(data_path) / shard["file"]
    if not file.is_file():
        return f"{file}: missing"
    size = file.stat().st_size
    if size != shard["bytes"]:
        return f"{file}: {size} bytes, the manifest says {shard['bytes']} (truncated or overwritten)"
    if not checksum:
        return None
    if vocab_size is None:
        digest, largest = sha256_file(file), -1
    else:
        digest, largest = _hash_and_largest_id(file, dtype)
    if digest != shard["sha256"]:
        return f"{file}: sha256 does not match the manifest (the file changed after prepare)"
    if vocab_size is not None and largest >= vocab_size:
        return f"{file}: holds token id {largest}, outside the manifest's vocabulary of {vocab_size} tokens"
    return None


def _hash_and_largest_id(file: Path, dtype: str, chunk: int = 1 << 22) -> tuple[str, int]:
    import hashlib

    import numpy as np

    h, largest = hashlib.sha256(), -1
    with open(file, "rb") as f:
        while block := f.read(chunk):  # chunk is a multiple of the item size, and so is the file (checked)
            h.update(block)
            largest = max(largest, int(np.frombuffer(block, np.dtype(dtype).newbyteorder("<")).max()))
    return h.hexdigest(), largest


def verify(data_path, progress: bool = True) -> list[str]:
    """Every shard's size, sha256 and ids, and the tokenizer (its hash, vocabulary and special ids), against
    the manifest: one line per problem."""
    from ..progress import progress as progress_of

    data_path = Path(data_path)
    m = read_manifest(data_path)
    problems, vocab = _tokenizer_problems(data_path, m)
    shards = [s for split in SPLITS for s in m["splits"][split]["shards"]]
    return [p for s in progress_of(shards, desc="verify", unit="shard", enabled=progress)
            if (p := shard_problem(data_path, s, True, vocab, m["dtype"]))] + problems


def _tokenizer_problems(data_path: Path, m: dict) -> tuple[list[str], int]:
    """What is wrong with the data's tokenizer, and the vocabulary size the ids must stay below: the
    tokenizer's own when it is the one recorded (a manifest edited to another size is reported once,
    not again for every shard), else the manifest's."""
    from .tokenizer import load_sentencepiece

    model, vocab = tokenizer_dir(data_path) / "tokenizer.model", m["tokenizer"]["vocab_size"]
    if not model.is_file():
        return [f"{model}: missing"], vocab
    try:
        sp = load_sentencepiece(model)
        found = {"vocab_size": sp.vocab_size(), "bos_id": sp.bos_id(), "eos_id": sp.eos_id()}
    except UserError:
        found = None
    if sha256_file(model) != m["tokenizer"]["sha256"]:
        what = f"vocab {found['vocab_size']}" if found else "not a sentencepiece model"
        return [f"{model}: not the tokenizer the data was prepared with ({what}, the manifest says vocab {vocab}; "
                f"sha256 differs)"], vocab
    if found and (wrong := [k for k, v in found.items() if m["tokenizer"].get(k, v) != v]):
        said = ", ".join(f"{k} {m['tokenizer'][k]}" for k in wrong)
        return [f"{data_path / MANIFEST} says {said}, but its tokenizer (sha256 as recorded) has "
                f"{', '.join(f'{k} {found[k]}' for k in wrong)}: the manifest was edited"], found["vocab_size"]
    return [], vocab
