"""The analysis and evaluation section of the GPU benchmark (bench/bench_gpu.py calls `analysis_figures`):

(a) the statistics pass (`collect`: forward + statistics of every layer, accumulated on the GPU) of a
    paper-like TopK model (D=2048, L=8, k=64 on 6 blocks, V=32,000, bf16, 8 x 1024 tokens per batch) vs
    the same forward pass without statistics, tokens/s of its later batches (target >= 0.8; see
    bench_stats.pass_figures), and the forward's MFU;
(b) lm-eval throughput on one task (topk_topic_mc of the local suite, 4 choices per item): `topk-ds eval`'s
    in-process HFLM on the loaded model vs lm-eval loading the same saved directory itself (`--model hf`),
    items/s, both with `--batch-size auto`.

With dry=True both run on the CPU at tiny sizes in fp32, without targets: a test of the code paths, not a
GPU figure.
"""

import shutil
import time
from pathlib import Path
from types import SimpleNamespace

import torch

from bench.bench_stats import pass_figures
from bench.common import Figure
from topk_ds.devices import resolve
from topk_ds.model import ModelConfig, TopKConfig, Transformer

STATS = {False: dict(dim=2048, n_layers=8, n_heads=16, ffn_dim=5632, vocab_size=32000, max_seq_len=1024, k=64,
                     batch=8, batches=16, repeats=3, dtype="bf16"),
         True: dict(dim=64, n_layers=4, n_heads=4, ffn_dim=128, vocab_size=512, max_seq_len=64, k=8, batch=4,
                    batches=4, repeats=1, dtype="fp32")}
EVAL_ITEMS = {False: 400, True: 8}


def statistics_figures(dry: bool) -> list[Figure]:
    from topk_ds.analysis.units import Neurons
    from topk_ds.train.monitor import peak_flops

    s = dict(STATS[dry])
    k, batch, batches, repeats, dtype = (s.pop(key) for key in ("k", "batch", "batches", "repeats", "dtype"))
    device, dtype = resolve("cpu" if dry else "cuda", dtype)
    cfg = ModelConfig(**s)
    torch.manual_seed(0)
    model = Transformer(cfg, TopKConfig(k=k, n_nontopk=2)).to(device, dtype).eval()
    units = Neurons(SimpleNamespace(model=model, config=SimpleNamespace(train_step=None)))
    data = [torch.randint(0, cfg.vocab_size, (batch, cfg.max_seq_len), device=device) for _ in range(batches)]
    sync = torch.cuda.synchronize if device.type == "cuda" else None
    what = f"D={cfg.dim} L={cfg.n_layers} V={cfg.vocab_size:,} {str(dtype).removeprefix('torch.')} on {device.type}"
    figures, _ = pass_figures(units, data, what, repeats, sync, "" if dry else ">= 0.8")
    forward = figures[0].peer_value  # tokens/s
    peak, source = peak_flops(device, "bf16" if dtype == torch.bfloat16 else "fp32")
    flops = cfg.flops_per_token(cfg.max_seq_len, training=False) - 2 * cfg.vocab_size * cfg.dim  # no LM head
    return figures + [Figure(f"MFU of that forward ({source}) (information)", 100 * flops * forward / peak, "%",
                             "peak", 100.0, flops * forward / peak, "share of the peak")]


def eval_figure(data: Path, work: Path, dry: bool) -> Figure:
    """items/s of one local task through `topk-ds eval` vs lm-eval's own `--model hf` on the same directory."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    from topk_ds.data.manifest import read_manifest
    from topk_ds.evaluate.run import evaluate
    from topk_ds.evaluate.suites import LOCAL_DIR
    from topk_ds.model.hf import TopKLlamaConfig, TopKLlamaForCausalLM

    s = STATS[dry]
    device, dtype = resolve("cpu" if dry else "cuda", s["dtype"])
    manifest = read_manifest(data)
    cfg = ModelConfig(dim=s["dim"], n_layers=s["n_layers"], n_heads=s["n_heads"], ffn_dim=s["ffn_dim"],
                      vocab_size=manifest["tokenizer"]["vocab_size"], max_seq_len=256)
    tokenizer = data / manifest["tokenizer"]["dir"]
    model_dir = work / "eval-model"
    TopKLlamaForCausalLM(TopKLlamaConfig.from_args(cfg, TopKConfig(k=s["k"]))).to(dtype).save_pretrained(model_dir)
    for f in tokenizer.iterdir():
        shutil.copy2(f, model_dir / f.name)
    items = EVAL_ITEMS[dry]

    start = time.perf_counter()
    evaluate([str(model_dir)], "local", tasks=["topk_topic_mc"], out=work / "eval", batch_size="auto", limit=items,
             device=device, dtype=dtype)
    ours = items / (time.perf_counter() - start)
    start = time.perf_counter()
    lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={model_dir},dtype={str(dtype).removeprefix('torch.')},"
                            "max_length=256", tasks=["topk_topic_mc"], limit=items, batch_size="auto",
                            device=str(device), task_manager=TaskManager(include_path=str(LOCAL_DIR),
                                                                          include_defaults=False))
    theirs = items / (time.perf_counter() - start)
    return Figure(f"topk-ds eval, topk_topic_mc, {items} items, D={cfg.dim} L={cfg.n_layers} on {device.type}, "
                  "batch auto (information)", ours, "items/s", "lm-eval --model hf on the saved directory", theirs,
                  ours / theirs, "throughput vs peer (higher is better)")


def analysis_figures(data: Path, work: Path, dry: bool) -> list[Figure]:
    """The section: `data` is a prepared data directory (its tokenizer is used), `work` a scratch directory."""
    return statistics_figures(dry) + [eval_figure(data, work, dry)]
