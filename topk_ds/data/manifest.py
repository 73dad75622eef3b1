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
        int(m["tokenizer"]["vocab_size"]), str(m["dtype"])
        for split in SPLITS:
            for s in m["splits"][split]["shards"]:
                str(s["file"]), int(s["tokens"]), int(s["bytes"]), str(s["sha256"])
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"{file} is corrupt (bad or missing entry {e}); prepare the data again") from None
    return m


def shard_problem(data_path: Path, shard: dict, checksum: bool) -> str | None:
    """What is wrong with one shard file (missing, wrong size, wrong sha256), or None."""
    file = Path(data_path) / shard["file"]
    if not file.is_file():
        return f"{file}: missing"
    size = file.stat().st_size
    if size != shard["bytes"]:
        return f"{file}: {size} bytes, the manifest says {shard['bytes']} (truncated or overwritten)"
    if checksum and sha256_file(file) != shard["sha256"]:
        return f"{file}: sha256 does not match the manifest (the file changed after prepare)"
    return None


def verify(data_path, progress: bool = True) -> list[str]:
    """Every shard's size and sha256, and the tokenizer's hash, against the manifest: one line per problem."""
    from ..progress import progress as progress_of

    data_path = Path(data_path)
    m = read_manifest(data_path)
    shards = [s for split in SPLITS for s in m["splits"][split]["shards"]]
    problems = [p for s in progress_of(shards, desc="verify", unit="shard", enabled=progress)
                if (p := shard_problem(data_path, s, checksum=True))]
    model = tokenizer_dir(data_path) / "tokenizer.model"
    if not model.is_file():
        problems.append(f"{model}: missing")
    elif sha256_file(model) != m["tokenizer"]["sha256"]:
        from .tokenizer import load_sentencepiece

        try:
            found = f"vocab {load_sentencepiece(model).vocab_size()}"
        except UserError:
            found = "not a sentencepiece model"
        problems.append(f"{model}: not the tokenizer the data was prepared with ({found}, the manifest says vocab "
                        f"{m['tokenizer']['vocab_size']}; sha256 differs)")
    return problems
