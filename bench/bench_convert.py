"""Converter speed: `topk-ds convert` of a ZeRO-3 checkpoint (consolidate, build the Hugging Face
model, write model.safetensors, config, generation config, tokenizer and modeling code) against, in
the same run and process (imports excluded):

  - DeepSpeed's zero_to_fp32 consolidation alone, in memory (the issue's peer; target <= 1.5), and
  - DeepSpeed's own offline converter writing the same fp32 weights as one model.safetensors
    (`convert_zero_checkpoint_to_fp32_state_dict`), the end-to-end equivalent (information).

Writing the weights costs more than consolidating them from the page cache (both are memory copies,
the write goes through the file system), so against the in-memory consolidation the ratio is bounded
below by (consolidate + write) / consolidate whatever the converter does; against DeepSpeed's
writing converter it shows what the Hugging Face packaging adds.

The checkpoint comes from `topk-ds train` (2 steps, ZeRO-3, fp32, one CPU rank): D=512, L=8, FFN
1408 (28 M parameters), and, for information (not with --quick), the paper's D=1024, L=8 shape.

    python bench/bench_convert.py [--quick]
"""

import contextlib
import io
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import Figure, main, timeit_pair  # noqa: E402
from topk_ds.convert.hf_export import convert  # noqa: E402
from topk_ds.corpus import write_synthetic_corpus  # noqa: E402
from topk_ds.data.prepare import prepare  # noqa: E402
from topk_ds.data.tokenizer import train_tokenizer  # noqa: E402

VOCAB = 2048


def train_checkpoint(tmp: Path, dim: int, layers: int, ffn_dim: int) -> Path:
    """A finished 2-step ZeRO-3 run in tmp/run (data in tmp/data); returns its checkpoint tag directory."""
    if not (tmp / "data").exists():
        corpus = write_synthetic_corpus(tmp / "corpus", docs=400, progress=False)
        train_tokenizer([str(corpus)], VOCAB, tmp / "tokenizer", progress=False)
        prepare([str(corpus)], tmp / "tokenizer", tmp / "data", val_tokens=5000, progress=False)
        (tmp / "zero3.json").write_text(json.dumps({"zero_optimization": {"stage": 3}}))
    shutil.rmtree(tmp / "run", ignore_errors=True)
    overrides = {"model.dim": dim, "model.n_layers": layers, "model.n_heads": dim // 64, "model.ffn_dim": ffn_dim,
                 "topk.k": 64, "data.path": tmp / "data", "train.out_dir": tmp / "run", "train.steps": 2,
                 "train.save_every": 2, "train.ds_config": tmp / "zero3.json"}
    subprocess.run([sys.executable, "-m", "topk_ds.cli", "train", "--config", "tiny",
                    *[a for k, v in overrides.items() for a in ("--set", f"{k}={v}")]],
                   check=True, capture_output=True, text=True)
    return tmp / "run" / "checkpoints" / "global_step2"


def measure(tmp: Path, dim: int, layers: int, ffn_dim: int, repeats: int, target: str) -> list[Figure]:
    from deepspeed.utils.zero_to_fp32 import (convert_zero_checkpoint_to_fp32_state_dict,
                                               get_fp32_state_dict_from_zero_checkpoint)

    tag = train_checkpoint(tmp, dim, layers, ffn_dim)
    quiet = contextlib.redirect_stdout(io.StringIO())

    def ours():  # replacing the previous output, as `convert --force` does
        convert(tag, tmp / "hf", force=True)

    def consolidate():
        with contextlib.redirect_stdout(io.StringIO()):
            return get_fp32_state_dict_from_zero_checkpoint(str(tag.parent), tag=tag.name)

    def deepspeed_convert():
        shutil.rmtree(tmp / "ds", ignore_errors=True)
        with contextlib.redirect_stdout(io.StringIO()):
            convert_zero_checkpoint_to_fp32_state_dict(str(tag.parent), str(tmp / "ds"), tag=tag.name,
                                                       safe_serialization=True)

    with quiet:
        params = sum(t.numel() for t in consolidate().values())
    size_mb = sum(f.stat().st_size for f in tag.iterdir()) / 1e6
    what = f"convert ZeRO-3 checkpoint D={dim} L={layers}, {params / 1e6:.0f} M params, {size_mb:.0f} MB, 1 rank"
    t_ours, t_peer = timeit_pair(ours, consolidate, repeats=repeats, warmup=1)
    t_ours2, t_ds = timeit_pair(ours, deepspeed_convert, repeats=repeats, warmup=1)
    shutil.rmtree(tmp / "hf")
    shutil.rmtree(tmp / "ds")
    return [Figure(what + ("" if target else " (information)"), t_ours, "s", "zero_to_fp32 consolidation alone (in memory)",
                   t_peer, t_ours / t_peer, "time vs peer (lower is better)", target),
            Figure(what + " (information)", t_ours2, "s", "DeepSpeed's converter writing model.safetensors", t_ds,
                   t_ours2 / t_ds, "time vs peer (lower is better)")]


def run(quick: bool) -> list[Figure]:
    with tempfile.TemporaryDirectory() as tmp:
        figures = measure(Path(tmp), 512, 8, 1408, 3 if quick else 5, "<= 1.5")
        if not quick:
            figures += measure(Path(tmp), 1024, 8, 2816, 5, "")
    return figures


if __name__ == "__main__":
    main("convert", run)
