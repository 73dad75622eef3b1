"""`topk-ds convert` wall time against its floor, in the same run: the whole conversion of a ZeRO-3
checkpoint (consolidate, build the Hugging Face model, write safetensors + config + tokenizer +
modeling code) vs DeepSpeed's `zero_to_fp32` consolidation alone on the same checkpoint. Both in
process, imports excluded. Target <= 1.5.

The checkpoint comes from `topk-ds train` (2 steps, ZeRO-3, fp32, one CPU rank) of a D=512, L=8
model (~28 M parameters; D=256, L=4 with --quick), big enough that fixed overheads do not dominate.

    python bench/bench_convert.py [--quick]
"""

import json
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


def train_checkpoint(tmp: Path, dim: int, layers: int) -> Path:
    """A finished 2-step ZeRO-3 run; returns its checkpoint tag directory."""
    corpus = write_synthetic_corpus(tmp / "corpus", docs=400, progress=False)
    train_tokenizer([str(corpus)], VOCAB, tmp / "tokenizer", progress=False)
    prepare([str(corpus)], tmp / "tokenizer", tmp / "data", val_tokens=5000, progress=False)
    (tmp / "zero3.json").write_text(json.dumps({"zero_optimization": {"stage": 3}}))
    overrides = {"model.dim": dim, "model.n_layers": layers, "model.n_heads": dim // 64, "model.ffn_dim": 1408,
                 "topk.k": 64, "data.path": tmp / "data", "train.out_dir": tmp / "run", "train.steps": 2,
                 "train.save_every": 2, "train.ds_config": tmp / "zero3.json"}
    subprocess.run([sys.executable, "-m", "topk_ds.cli", "train", "--config", "tiny",
                    *[a for k, v in overrides.items() for a in ("--set", f"{k}={v}")]],
                   check=True, capture_output=True, text=True)
    return tmp / "run" / "checkpoints" / "global_step2"


def run(quick: bool) -> list[Figure]:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    dim, layers, repeats = (256, 4, 2) if quick else (512, 8, 3)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        tag = train_checkpoint(tmp, dim, layers)
        outs = iter(range(1_000))

        def ours():
            convert(tag, tmp / f"hf{next(outs)}")

        def peer():
            return get_fp32_state_dict_from_zero_checkpoint(str(tag.parent), tag=tag.name)

        params = sum(t.numel() for t in peer().values())
        size_mb = sum(f.stat().st_size for f in tag.iterdir()) / 1e6
        t_ours, t_peer = timeit_pair(ours, peer, repeats=repeats, warmup=1)
    return [Figure(f"convert ZeRO-3 checkpoint, D={dim} L={layers}, {params / 1e6:.1f} M params, {size_mb:.0f} MB, "
                   "1 rank", t_ours, "s", "zero_to_fp32 consolidation alone", t_peer, t_ours / t_peer,
                   "time vs peer (lower is better)", "<= 1.5")]


if __name__ == "__main__":
    main("bench_convert", run)
