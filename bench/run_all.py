"""Run every benchmark (bench/bench_*.py) and write bench/results.md: each figure as a ratio against
its peer measured in the same run, with its target. Each benchmark runs in its own process so that
one's threads, caches or distributed state cannot colour another's figures.

    python bench/run_all.py [--quick] [--only model,train]

With --only, the other benchmarks' sections of an existing results.md are kept; each section says
which run produced it.
"""

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH.parent))
from bench.common import OUT, Figure, table  # noqa: E402
from topk_ds.io import atomic_output  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smaller sizes, fewer repeats")
    parser.add_argument("--only", help="comma-separated benchmark names (model, prepare, train, convert, stats)")
    args = parser.parse_args()
    # bench_gpu.py needs a GPU and writes its own report (make bench-gpu)
    names = sorted(p.stem.removeprefix("bench_") for p in BENCH.glob("bench_*.py") if p.stem != "bench_gpu")
    if args.only:
        names = [n for n in names if n in args.only.split(",")]
    command = f"python bench/run_all.py{' --quick' if args.quick else ''}{' --only ' + args.only if args.only else ''}"
    run = f"`{command}`, {time.strftime('%Y-%m-%d %H:%M')}"
    sections, failed = kept_sections(names) if args.only else {}, []
    for name in names:
        print(f"== bench_{name}", flush=True)
        started, load = time.time(), os.getloadavg()[0]
        proc = subprocess.run([sys.executable, str(BENCH / f"bench_{name}.py"), *(["--quick"] if args.quick else [])],
                              cwd=BENCH.parent)
        result = OUT / f"{name}.json"
        if proc.returncode != 0 or not result.exists() or result.stat().st_mtime < started:
            failed.append(name)
            sections[name] = f"## {name} ({run})\n\nFAILED (exit {proc.returncode}); run `python bench/bench_{name}.py` to see why.\n"
            continue
        data = json.loads(result.read_text())
        figures = [Figure(**{k: v for k, v in f.items() if k != "ok"}) for f in data["figures"]]
        notes = "".join(f"- {k}: {v}\n" for k, v in data.items() if k != "figures")
        notes += (f"- machine load (other users' work included): 1-minute load average {load:.1f} at the start, "
                  f"{os.getloadavg()[0]:.1f} at the end, on {os.cpu_count()} cores\n")
        sections[name] = f"## {name} ({time.time() - started:.0f} s; {run})\n\n{table(figures)}\n\n{notes}"
    header = (f"# Benchmark results\n\n`python bench/run_all.py` on {platform.processor() or platform.machine()}, "
              f"{torch.get_num_threads()} threads, torch {torch.__version__}. A ratio compares the figure with its peer "
              "measured in the same run.\n\n")
    with atomic_output(BENCH / "results.md") as tmp:
        tmp.write_text(header + "\n".join(sections[name] for name in sorted(sections)))
    print(f"wrote {BENCH / 'results.md'}" + (f"; failed: {', '.join(failed)}" if failed else ""))
    sys.exit(1 if failed else 0)


def kept_sections(rerun: list[str]) -> dict[str, str]:
    """The sections of the existing results.md that this run does not redo, by benchmark name."""
    path = BENCH / "results.md"
    if not path.exists():
        return {}
    header, *parts = ("\n" + path.read_text()).split("\n## ")
    dated = re.search(r"(`python bench/run_all.py[^`]*`).*?(\d{4}-\d\d-\d\d \d\d:\d\d)", header)
    kept = {}
    for part in parts:
        title, body = part.split("\n", 1)
        name = title.split(" ", 1)[0]
        if "run_all.py" not in title and dated:  # a section of a whole run: the header says which
            title = title.replace(")", f"; {dated[1]}, {dated[2]})", 1)
        if name not in rerun:
            kept[name] = f"## {title}\n{body.rstrip()}\n"
    return kept


if __name__ == "__main__":
    main()
