"""Post-hoc SAEs, for information (no targets: what the comparison costs, measured against its peer):

(a) training TopK SAEs with EleutherAI's sparsify (through topk_ds/sae/library.py) on the residual stream
    after two blocks of a dense model, in tokens/s, against the same model's forward pass over the same
    windows: at expansion 1 (as wide as the TopK layer) and 8 (the usual SAE width);
(b) the wall time of `topk-ds analyze compare` on the demo's models (a `topk-ds demo` directory: DEMO or
    ./demo; skipped when there is none), against `topk-ds analyze stats` of the dense model over the same
    tokens, each in its own process as a user runs them.

    python bench/bench_sae.py [--quick]
"""

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.common import Figure, main  # noqa: E402

D, L, V, SEQ = 256, 4, 2048, 128


def dense_model():
    from topk_ds.model.args import ModelConfig, TopKConfig
    from topk_ds.model.hf import TopKLlamaConfig, TopKLlamaForCausalLM

    torch.manual_seed(0)
    cfg = ModelConfig(dim=D, n_layers=L, n_heads=4, ffn_dim=4 * D, vocab_size=V, max_seq_len=SEQ)
    return TopKLlamaForCausalLM(TopKLlamaConfig.from_args(cfg, TopKConfig(enabled=False, k=32))).eval()


def training_figures(windows: int) -> list[Figure]:
    from topk_ds.sae.library import train

    model = dense_model()
    data = torch.randint(0, V, (windows, SEQ), generator=torch.Generator().manual_seed(1), dtype=torch.int32)
    with torch.inference_mode():
        model.model(data[:16].long())  # warm up
        start = time.perf_counter()
        for chunk in data.long().split(16):
            model.model(chunk)
        forward = data.numel() / (time.perf_counter() - start)
    figures = []
    for expansion in (1, 8):
        with tempfile.TemporaryDirectory() as tmp:
            record = train(model, data, [0, 1], Path(tmp) / "sae", k=32, expansion=expansion, seed=0, batch_size=16,
                           record={}, show_progress=False)
        rate = record["tokens"] / record["seconds"]
        figures.append(Figure(f"SAE training, 2 layers, D={D} x{expansion} ({D * expansion} latents, k=32), sparsify",
                              rate, "tokens/s", f"the dense model's forward (D={D}, L={L}) on the same windows", forward,
                              rate / forward, "throughput vs peer (information)"))
    return figures


def _timed(args: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "topk_ds.cli", *args], check=True, cwd=ROOT, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def compare_figure() -> Figure | None:
    demo = Path(os.environ.get("DEMO", ROOT / "demo"))
    if not (demo / "compare" / "compare.json").is_file():
        print(f"no demo comparison in {demo} (run `topk-ds demo` first, or set DEMO=DIR): (b) skipped", file=sys.stderr)
        return None
    s = json.loads((demo / "demo.json").read_text())
    tokens = str(s["stats_tokens"])
    with tempfile.TemporaryDirectory() as tmp:
        stats = _timed(["analyze", "stats", str(demo / "hf" / "dense"), "--data", str(demo / "data"), "--tokens", tokens,
                        "--seq-len", "128", "--out", f"{tmp}/stats"])
        compare = _timed(["analyze", "compare", "--topk", str(demo / "runs" / "topk"), "--dense", str(demo / "runs" / "dense"),
                          "--sae", str(demo / "sae"), "--data", str(demo / "data"), "--tokens", tokens, "--seq-len", "128",
                          "--seeds", "2", "--samples", str(s["samples"]), "--seed", str(s["seed"]), "--out", f"{tmp}/compare"])
    return Figure(f"`analyze compare` on the demo's models ({int(tokens):,} tokens, 3 contenders x 2 checkpoints, "
                  "2 SAE trainings, steering, validation)", compare, "s",
                  "`analyze stats` of the dense model over the same tokens", stats, compare / stats,
                  "time vs peer (information)")


def run(quick: bool) -> list[Figure]:
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    figures = training_figures(128 if quick else 512)
    figure = None if quick else compare_figure()
    return figures + ([figure] if figure else [])


if __name__ == "__main__":
    main("sae", run)
