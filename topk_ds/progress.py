"""Progress for long work, chosen once: a tqdm bar on a terminal, plain lines anywhere else (SLURM
.out files, nohup, CI logs), where a bar's carriage-return frames would pile up on a few lines.

    for x in progress(items, desc="stats", unit="tok")          # iterate
    with progress(total=n, desc="train", every=10) as bar: ...  # or update by hand

In line mode a line is written every `every` counts when given, else at most every
`TOPK_DS_PROGRESS_SECONDS` seconds (default 30), and once at the end.
"""

import os
import sys

from tqdm import tqdm

LINE_SECONDS = float(os.environ.get("TOPK_DS_PROGRESS_SECONDS", "30"))


class _Lines(tqdm):
    """tqdm's own meter (count, rate, elapsed, postfix), written as one whole line per report."""

    def display(self, msg=None, pos=None):
        line = (msg or self.format_meter(**self.format_dict)).strip()
        if line and line != getattr(self, "_last_line", None):
            self._last_line = line
            self.fp.write(line + "\n")
            self.fp.flush()
        return True

    def clear(self, nolock=False):
        pass  # a written line stays (tqdm would erase the bar with carriage returns around every write())

    def close(self):
        if not self.disable and not getattr(self, "_closed_line", False):
            self._closed_line = True
            self.display()
        self.disable = True
        super().close()


def on_terminal(stream=None) -> bool:
    stream = stream or sys.stderr
    return hasattr(stream, "isatty") and stream.isatty()


def progress(iterable=None, *, desc: str, total=None, unit: str = "it", unit_scale: bool = False, initial: int = 0,
             every: int | None = None, enabled: bool = True, file=None):
    """A progress reporter with tqdm's interface (iterate, update, set_postfix, write, close)."""
    file = file or sys.stderr
    common = dict(iterable=iterable, desc=desc, total=total, unit=unit, unit_scale=unit_scale, initial=initial,
                  disable=not enabled, file=file)
    if on_terminal(file):
        return tqdm(**common, dynamic_ncols=True)
    fmt = "{desc}: {n_fmt}/{total_fmt} {unit} ({percentage:.0f}%) [{elapsed}<{remaining}, {rate_fmt}{postfix}]"
    if total is None and not hasattr(iterable, "__len__"):
        fmt = "{desc}: {n_fmt} {unit} [{elapsed}, {rate_fmt}{postfix}]"
    timing = dict(miniters=every, mininterval=0) if every else dict(mininterval=LINE_SECONDS)
    return _Lines(**common, **timing, maxinterval=float("inf"), bar_format=fmt)
