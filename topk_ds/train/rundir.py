"""The run directory's guard: one live run per directory, the same directory on every node, and no
trace left by a start that is refused.

    with RunDirectory(path) as run_dir:   # locked by rank 0; every rank checked to see the same directory
        ...                               # checks that may refuse: a directory this start made is removed
        run_dir.commit()                  # from here on the run's files are written

The lock is an advisory `flock` on `.lock`, held open by rank 0 for the whole run: the kernel (or the
NFS server) drops it when the process dies, however it dies, so a run killed with kill -9 leaves no
lock to clear by hand and the next start takes it over.
"""

import fcntl
import json
import os
import secrets
import shutil
import socket
import time
from pathlib import Path

from ..errors import UserError, describe_os_error
from ..io import check_output
from .distributed import agree, from_rank0, rank

LOCK = ".lock"
_SEE_TRIES = 10  # another node's filesystem client may lag a moment behind rank 0's write


class RunDirectory:
    def __init__(self, path: Path, log=print):
        self.path, self.log = Path(path), log
        self.created = self.committed = False
        self._lock = None

    def __enter__(self) -> "RunDirectory":
        try:
            agree(self._claim() if rank() == 0 else None)
            nonce = from_rank0(lambda: self._nonce)
            agree(self._sees(nonce))
        except BaseException:
            self._release(failed=True)
            raise
        return self

    def commit(self) -> None:
        self.committed = True

    def __exit__(self, exc_type, *exc) -> None:
        self._release(failed=exc_type is not None)

    def _claim(self) -> str | None:
        """Rank 0: create the directory if needed and lock it; a problem, or None."""
        try:
            check_output(self.path, "train (train.out_dir)")  # a file there, or a directory nothing can be written in
            self.created = not self.path.exists()
            self.path.mkdir(parents=True, exist_ok=True)
            lock = open(self.path / LOCK, "a+")
        except UserError as e:
            return str(e)
        except OSError as e:
            return f"cannot use train.out_dir: {describe_os_error(e)}"
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            holder = _describe(lock.read())
            lock.close()
            return f"{self.path} is in use by a live run ({holder}); wait for it to end or choose another train.out_dir"
        except OSError as e:  # a filesystem without locks (some Lustre mounts): run unguarded, say so
            self.log(f"warning: cannot lock {self.path / LOCK} ({e.strerror}); nothing stops a second run "
                     "from using this directory at the same time")
        self._nonce = secrets.token_hex(8)
        lock.seek(0)
        lock.truncate()
        lock.write(json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "nonce": self._nonce,
                               "since": time.strftime("%Y-%m-%d %H:%M:%S")}) + "\n")
        lock.flush()
        os.fsync(lock.fileno())  # visible to the other nodes before they look
        self._lock = lock
        return None

    def _sees(self, nonce: str) -> str | None:
        """Every rank: is the lock rank 0 just wrote in this rank's view of the directory?"""
        for attempt in range(_SEE_TRIES):
            if attempt:
                time.sleep(0.3)
            try:
                if json.loads((self.path / LOCK).read_text()).get("nonce") == nonce:
                    return None
            except (OSError, ValueError):
                pass
        return (f"rank {rank()} on {socket.gethostname()} does not see the run directory {self.path} that rank 0 "
                "writes: train.out_dir must be one directory on a filesystem every node shares (an absolute path; "
                "a relative one is resolved on each node)")

    def _release(self, failed: bool) -> None:
        if rank() == 0 and failed and self.created and not self.committed:
            shutil.rmtree(self.path, ignore_errors=True)
        if self._lock is not None:
            self._lock.close()  # releases the flock; the file stays (unlinking it would race a new holder)
            self._lock = None


def _describe(text: str) -> str:
    try:
        h = json.loads(text)
        return f"pid {h['pid']} on {h['host']} since {h['since']}"
    except (ValueError, KeyError, TypeError):
        return "holder unknown"
