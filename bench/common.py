"""Shared by every benchmark: time a callable, state each figure as a ratio against its peer
measured in the same run, print a table and write JSON to bench/out/NAME.json.

A benchmark module defines `run(quick: bool) -> list[Figure]` and ends with
`if __name__ == "__main__": main(NAME, run)`. `bench/run_all.py` runs them all into results.md.
"""

import argparse
import json
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

OUT = Path(__file__).parent / "out"


@dataclass
class Figure:
    name: str  # what was measured, e.g. "topk fwd+bwd D=1024 k=64"
    value: float  # the measurement
    unit: str  # e.g. "ms", "tokens/s"
    peer: str  # what it is compared against
    peer_value: float
    ratio: float  # value / peer_value (or the inverse for rates: stated in `ratio_meaning`)
    ratio_meaning: str  # e.g. "time vs peer (lower is better)"
    target: str = ""  # e.g. "<= 1.05"; empty when there is none

    @property
    def ok(self) -> bool | None:
        if not self.target:
            return None
        op, bound = self.target.split()
        return self.ratio <= float(bound) if op == "<=" else self.ratio >= float(bound)


def timeit(fn, repeats: int = 5, warmup: int = 1) -> float:
    """Median wall time of fn() in seconds."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def timeit_pair(fn, peer, repeats: int = 5, warmup: int = 1) -> tuple[float, float]:
    """Median times of fn and peer, interleaved so both see the same machine conditions."""
    return timeit_all(fn, peer, repeats=repeats, warmup=warmup)


def timeit_all(*fns, repeats: int = 5, warmup: int = 1) -> list[float]:
    """Median times of every fn, interleaved so all see the same machine conditions."""
    for _ in range(warmup):
        for f in fns:
            f()
    times = [[] for _ in fns]
    for _ in range(repeats):
        for f, out in zip(fns, times):
            start = time.perf_counter()
            f()
            out.append(time.perf_counter() - start)
    return [statistics.median(t) for t in times]


def table(figures: list[Figure]) -> str:
    rows = ["| figure | value | peer | peer value | ratio | target | ok |", "|---|---|---|---|---|---|---|"]
    for f in figures:
        ok = {None: "", True: "yes", False: "NO"}[f.ok]
        rows.append(f"| {f.name} | {f.value:.4g} {f.unit} | {f.peer} | {f.peer_value:.4g} {f.unit} | "
                    f"{f.ratio:.3f} ({f.ratio_meaning}) | {f.target} | {ok} |")
    return "\n".join(rows)


def save(name: str, figures: list[Figure], extra: dict | None = None) -> Path:
    OUT.mkdir(exist_ok=True)
    path = OUT / f"{name}.json"
    path.write_text(json.dumps({"figures": [asdict(f) | {"ok": f.ok} for f in figures], **(extra or {})}, indent=1))
    return path


def main(name: str, run) -> None:
    parser = argparse.ArgumentParser(description=f"benchmark: {name}")
    parser.add_argument("--quick", action="store_true", help="smaller sizes, fewer repeats")
    args = parser.parse_args()
    figures = run(args.quick)
    print(table(figures))
    print(f"wrote {save(name, figures)}")
