"""Small file helpers shared by every command: outputs are checked before any work is done, and
nothing is ever left half-written."""

import contextlib
import glob
import hashlib
import json
import os
import re
import shutil
import socket
import tempfile
from pathlib import Path

from .errors import UserError

HOST = socket.gethostname()


def write_json(path: Path, obj) -> None:
    """Write JSON atomically (see atomic_output)."""
    with atomic_output(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=1, sort_keys=True) + "\n")


@contextlib.contextmanager
def atomic_output(path: Path):
    """Yield a temporary sibling of `path` (file or directory) to write into; on success it replaces
    `path` in one rename, on error it is removed and `path` is untouched. The temporary is named
    .NAME.tmp-HOST-PID; those of processes of this host that no longer run (kill -9) are removed first."""
    path = Path(path).resolve()
    _remove_stale_temporaries(path)
    tmp = path.with_name(f".{path.name}.tmp-{HOST}-{os.getpid()}")
    _remove(tmp)
    try:
        yield tmp
        if path.exists() and path.is_dir() != tmp.is_dir():
            raise UserError(f"{path} exists and is a {'directory' if path.is_dir() else 'file'}; choose another output")
        if path.is_dir():
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException as e:
        _remove(tmp)
        error = _write_error(e, path)
        if error is e:
            raise
        raise error from None


def _write_error(e: BaseException, path: Path) -> BaseException:
    """An error met while writing `path`, as an OSError naming it where the writer did not: a bare
    "No space left on device" from a write call, or a library's own I/O error ("... (os error 28)")."""
    if isinstance(e, OSError) and e.filename is None and e.errno:
        return OSError(e.errno, e.strerror or os.strerror(e.errno), str(path))
    found = re.search(r"\(os error (\d+)\)", str(e)) if not isinstance(e, (OSError, UserError)) else None
    if found:
        code = int(found.group(1))
        return OSError(code, os.strerror(code), str(path))
    return e


def _remove(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _remove_stale_temporaries(path: Path) -> None:
    """Temporaries of `path` left by processes of this host that were killed (.NAME.tmp-HOST-PID, or
    .NAME.tmp-PID as older versions named them); those of live processes and other hosts are kept."""
    for tmp in path.parent.glob(f".{glob.escape(path.name)}.tmp-*"):
        host, _, pid = tmp.name[len(path.name) + 6:].rpartition("-")
        if host in ("", HOST) and pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            _remove(tmp)


def check_output(path, what: str, kind: str = "dir") -> Path:
    """Refuse, before any work is done, an output `what` cannot write: a file where it writes a directory
    (kind "dir") or a directory where it writes a file (kind "file"), a parent that is a file, or a
    directory it cannot create files in (read-only, immutable, no permission)."""
    path = Path(path)
    if kind == "dir" and path.exists() and not path.is_dir():
        raise UserError(f"{path} is a file; {what} writes a directory there: choose another output")
    if kind == "file" and path.is_dir():
        raise UserError(f"{path} is a directory; {what} writes a file there: choose another output")
    folder = next((p for p in path.absolute().parents if p.exists()), Path("/"))  # where the temporary sibling goes
    if not folder.is_dir():
        raise UserError(f"cannot write {path}: {folder} is a file, not a directory")
    for where in [folder] + ([path] if path.is_dir() else []):
        try:
            os.rmdir(tempfile.mkdtemp(prefix=".topk_ds-write-check-", dir=where))
        except OSError as e:
            raise UserError(f"cannot write {path}: {where} is not writable ({e.strerror})") from None
    return path


def check_new_dir(out, what: str) -> Path:
    """An output directory that must be new (or empty): commands that write one in a single rename."""
    out = check_output(out, what)
    if out.is_dir() and any(out.iterdir()):
        raise UserError(f"{out} already exists and is not empty; {what} writes a new directory: "
                        f"choose another --out or remove it")
    return out


def check_replaceable(out, marker: str, what: str) -> Path:
    """An output directory that may be replaced only when it holds our own output (`marker` in it)."""
    out = check_output(out, what)
    if out.is_dir() and any(out.iterdir()) and not (out / marker).exists():
        raise UserError(f"{out} is not empty and holds no {marker}: {what} would replace it; choose another --out")
    return out


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
