"""Run every benchmark (bench/bench_*.py) and write bench/results.md: each figure as a ratio against
its peer measured in the same run, with its target. Each benchmark runs in its own process so that
one's threads, caches or distributed state cannot colour another's figures.

    python bench/run_all.py [--quick] [--only model,train]
"""

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH.parent))
from bench.common import OUT, Figure, table  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smaller sizes, fewer repeats")
    parser.add_argument("--only", help="comma-separated benchmark names (model, prepare, train, convert, stats)")
    args = parser.parse_args()
    # bench_gpu.py needs a GPU and writes its own report (make bench-gpu)
    names = sorted(p.stem.removeprefix("bench_") for p in BENCH.glob("bench_*.py") if p.stem != "bench_gpu")
    if args.only:
        names = [n for n in names if n in args.only.split(",")]
    sections, failed = [], []
    for name in names:
        print(f"== bench_{name}", flush=True)
        started = time.time()
        proc = subprocess.run([sys.executable, str(BENCH / f"bench_{name}.py"), *(["--quick"] if args.quick else [])],
                              cwd=BENCH.parent)
        result = OUT / f"{name}.json"
        if proc.returncode != 0 or not result.exists() or result.stat().st_mtime < started:
            failed.append(name)
            sections.append(f"## {name}\n\nFAILED (exit {proc.returncode}); run `python bench/bench_{name}.py` to see why.\n")
            continue
        data = json.loads(result.read_text())
        figures = [Figure(**{k: v for k, v in f.items() if k != "ok"}) for f in data["figures"]]
        notes = "".join(f"- {k}: {v}\n" for k, v in data.items() if k != "figures")
        sections.append(f"## {name} ({time.time() - started:.0f} s)\n\n{table(figures)}\n\n{notes}")
    header = (f"# Benchmark results\n\n`python bench/run_all.py{' --quick' if args.quick else ''}` on "
              f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch "
              f"{torch.__version__}, {time.strftime('%Y-%m-%d %H:%M')}. A ratio compares the figure with its "
              "peer measured in the same run.\n\n")
    (BENCH / "results.md").write_text(header + "\n".join(sections))
    print(f"wrote {BENCH / 'results.md'}" + (f"; failed: {', '.join(failed)}" if failed else ""))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
