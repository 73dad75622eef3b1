"""Small file helpers shared by every command: nothing is ever left half-written."""

import contextlib
import hashlib
import json
import os
import shutil
from pathlib import Path


def write_json(path: Path, obj) -> None:
    """Write JSON atomically: a temporary name in the same directory, then rename."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, path)


@contextlib.contextmanager
def atomic_output(path: Path):
    """Yield a temporary sibling of `path` (file or directory) to write into; on success it replaces
    `path` in one rename, on error it is removed and `path` is untouched."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True) if tmp.is_dir() else tmp.unlink(missing_ok=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True) if tmp.is_dir() else tmp.unlink(missing_ok=True)
        raise
    if path.is_dir():
        shutil.rmtree(path)
    os.replace(tmp, path)


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
