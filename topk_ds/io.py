"""Small file helpers shared by every command: nothing is ever left half-written."""

import contextlib
import hashlib
import json
import os
import secrets
import shutil
from pathlib import Path

from .errors import UserError


def write_text(path: Path, text: str) -> None:
    """Write a file atomically: a temporary sibling, then one rename. The temporary's name is unique to
    this process (pid and a random part: pids repeat across nodes), so writers never share one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_json(path: Path, obj) -> None:
    write_text(path, json.dumps(obj, indent=1, sort_keys=True) + "\n")


@contextlib.contextmanager
def atomic_output(path: Path):
    """Yield a temporary sibling of `path` (file or directory) to write into; on success it replaces
    `path` in one rename, on error it is removed and `path` is untouched."""
    path = Path(path).resolve()
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    _remove(tmp)
    try:
        yield tmp
    except BaseException:
        _remove(tmp)
        raise
    if path.is_dir() != tmp.is_dir() and path.exists():
        _remove(tmp)
        raise UserError(f"{path} exists and is a {'directory' if path.is_dir() else 'file'}; choose another output")
    if path.is_dir():
        shutil.rmtree(path)
    os.replace(tmp, path)


def _remove(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)


def check_replaceable(out: Path, marker: str, what: str) -> None:
    """Refuse to replace a directory that holds something other than our own output (`marker` in it)."""
    out = Path(out)
    if out.is_file():
        raise UserError(f"{out} is a file; {what} writes a directory there")
    if out.is_dir() and any(out.iterdir()) and not (out / marker).exists():
        raise UserError(f"{out} is not empty and holds no {marker}: {what} would replace it; choose another --out")


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
