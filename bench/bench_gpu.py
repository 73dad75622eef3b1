"""The GPU acceptance benchmark (`make bench-gpu`): correctness and speed on one CUDA GPU, written to
bench/results-gpu.md in the layout of bench/results.md (each speed figure a ratio against its peer
measured in the same run).

Correctness: TopK indices on the GPU equal the CPU's on bf16 input with many ties; a 30-step ZeRO-3
bf16 run with activation checkpointing whose loss falls, killed (SIGKILL) after its step-15
checkpoint and resumed, gives the uninterrupted run's losses at steps 16-30.
Speed (tokens/s, MFU against the datasheet peak, peak memory): a paper-like model (D=2048, L=8,
seq 1024) TopK vs its dense twin through the engine under ZeRO-1/2/3, compiled blocks off/on, the
tuned ZeRO-3 JSON; our dense model vs transformers' LlamaForCausalLM of the same shape in plain
PyTorch; the TopK op forward + backward vs ReLU at D=2048, k=64, 16k tokens, eager and compiled;
the statistics pass vs the bare forward and lm-eval's items/s (bench/gpu_analysis.py).

    bash bench/gpu_setup.sh bench/bench_gpu.py     # what `make bench-gpu` runs on a bare GPU machine
    python bench/bench_gpu.py --dry-run --out /tmp/r.md [--data DIR]

`--dry-run` runs every part on the CPU at tiny sizes in fp32 (compilation through the aot_eager
backend instead of inductor), so CI exercises every code path but CUDA; it claims no GPU figure.
"""

import argparse
import functools
import gc
import json
import os
import platform
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.bench_model import hf_llama, hf_logits, ours_logits, step  # noqa: E402
from bench.common import Figure, table  # noqa: E402
from bench.gpu_analysis import analysis_figures  # noqa: E402
from topk_ds.model import ModelConfig, Transformer, topk_activation  # noqa: E402
from topk_ds.model.topk import topk_indices  # noqa: E402

# (GPU, dry run): the training-correctness run, the speed shape, the TopK op's input
RUN = {False: dict(dim=256, layers=4, ffn=688, seq=256, micro=8, steps=30, kill_at=15, precision="bf16"),
       True: dict(dim=64, layers=4, ffn=128, seq=64, micro=8, steps=6, kill_at=3, precision="fp32")}
SPEED = {False: dict(dim=2048, layers=8, heads=16, ffn=5632, vocab=32000, seq=1024, micro=8, warmup=3, repeats=5,
                     precision="bf16"),
         True: dict(dim=64, layers=4, heads=4, ffn=128, vocab=512, seq=64, micro=4, warmup=1, repeats=2, precision="fp32")}
OP = {False: (16384, 2048, 64), True: (512, 256, 16)}


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn, repeats: int, warmup: int) -> float:
    """Median seconds of fn() with the device synchronised around each call."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def peak_memory_gib(reset: bool = False) -> float:
    """Peak device memory allocated since the last reset (CUDA); the process's peak RSS on CPU."""
    if torch.cuda.is_available():
        if reset:
            torch.cuda.reset_peak_memory_stats()
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def tied(shape, dtype=torch.bfloat16) -> torch.Tensor:
    """bf16 values from a few levels: the k-th and (k+1)-th largest tie in most rows."""
    g = torch.Generator().manual_seed(0)
    return (torch.randint(-8, 9, shape, generator=g) / 4).to(dtype)


# ---------------------------------------------------------------- correctness

def check_topk_device_equals_cpu(dry: bool) -> dict:
    tokens, dim, k = OP[dry]
    x = tied((tokens, dim))
    on_cpu = topk_indices(x, k).sort(dim=-1).values
    on_device = topk_indices(x.to(device()), k).sort(dim=-1).values.cpu()
    kth, next_ = x.float().sort(dim=-1, descending=True).values[:, k - 1:k + 1].unbind(-1)
    return {"check": f"TopK indices on {device().type} equal the CPU's ({tokens} x {dim} bf16, k={k})",
            "ok": torch.equal(on_cpu, on_device), "detail": f"{(kth == next_).float().mean():.0%} of rows tie at the k-th value"}


def make_data(work: Path, dry: bool) -> Path:
    from topk_ds.corpus import write_synthetic_corpus
    from topk_ds.data.prepare import prepare
    from topk_ds.data.tokenizer import train_tokenizer

    corpus = write_synthetic_corpus(work / "corpus", docs=60 if dry else 800, seed=0, progress=False)
    train_tokenizer([str(corpus)], 512 if dry else 2000, work / "tokenizer", progress=False)
    prepare([str(corpus)], work / "tokenizer", work / "data", val_tokens=2000, progress=False)
    return work / "data"


def train_args(data: Path, out: Path, dry: bool) -> list[str]:
    r = RUN[dry]
    sets = [f"data.path={data}", f"train.out_dir={out}", f"model.dim={r['dim']}", f"model.n_layers={r['layers']}",
            f"model.ffn_dim={r['ffn']}", f"model.max_seq_len={r['seq']}", f"data.seq_len={r['seq']}",
            f"train.micro_batch={r['micro']}", f"train.steps={r['steps']}", f"train.save_every={r['kill_at']}",
            f"train.precision={r['precision']}", "train.ds_config=ds_configs/zero3_bf16.json",
            "train.activation_checkpointing=true", "train.eval_every=0", "train.lr=0.003", "topk.anneal_ratio=1.0",
            "train.deterministic=true"]  # the resume check compares losses for equality: no atomics-order noise
    return [sys.executable, "-m", "topk_ds.cli", "train", "--config", "tiny", *[a for s in sets for a in ("--set", s)]]


def train(args: list[str]) -> None:
    proc = subprocess.run(args, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        raise RuntimeError(f"training failed (exit {proc.returncode}): {proc.stderr.strip()[-2000:]}")


def losses(run: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def check_training_resume(data: Path, work: Path, dry: bool) -> list[dict]:
    """Uninterrupted run; the same run SIGKILLed once its step-15 checkpoint is complete (tags the
    process wrote past it before the kill landed are removed, so the resume starts at 15); resumed."""
    r = RUN[dry]
    straight, killed = work / "straight", work / "killed"
    train(train_args(data, straight, dry))
    proc = subprocess.Popen(train_args(data, killed, dry), cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    marker = killed / f"checkpoints/global_step{r['kill_at']}/complete.json"
    while not marker.exists():
        if proc.poll() is not None:
            raise RuntimeError(f"the run to be killed ended early (exit {proc.returncode})")
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    for tag in (killed / "checkpoints").glob("global_step*"):
        if int(tag.name.removeprefix("global_step")) > r["kill_at"]:
            shutil.rmtree(tag)
    train(train_args(data, killed, dry) + ["--resume", "auto"])
    a, b = losses(straight), losses(killed)
    first, last = sum(a[:5]) / 5, sum(a[-5:]) / 5
    return [{"check": f"{r['steps']}-step ZeRO-3 {r['precision']} run with activation checkpointing: the loss falls",
             "ok": len(a) == r["steps"] and last < first, "detail": f"mean of the first 5 steps {first:.3f}, last 5 {last:.3f}"},
            {"check": f"killed after step {r['kill_at']} and resumed: steps {r['kill_at'] + 1}-{r['steps']} equal the "
                      "uninterrupted run's", "ok": a[r["kill_at"]:] == b[r["kill_at"]:] and len(b) == r["steps"],
             "detail": f"largest difference {max((abs(x - y) for x, y in zip(a[r['kill_at']:], b[r['kill_at']:])), default=0):.3g}"}]


# ---------------------------------------------------------------- speed

def op_figures(dry: bool) -> list[Figure]:
    tokens, dim, k = OP[dry]
    x = tied((tokens, dim)).to(device()).requires_grad_()
    grad = torch.randn(tokens, dim, dtype=x.dtype, device=x.device)
    compiled = torch.compile(topk_activation)

    def run(fn):
        def once():
            x.grad = None
            fn(x).backward(grad)
        return once

    eager = timed(run(lambda t: topk_activation(t, k)), 20, 3)
    relu = timed(run(torch.relu), 20, 3)
    fused = timed(run(lambda t: compiled(t, k)), 20, 3)
    what = f"{tokens} x {dim} bf16, k={k}"
    return [Figure(f"topk_activation fwd+bwd, {what}", eager * 1e3, "ms", "relu fwd+bwd", relu * 1e3, eager / relu,
                   "time vs peer (lower is better)"),
            Figure(f"topk_activation fwd+bwd compiled, {what}", fused * 1e3, "ms", "eager", eager * 1e3, fused / eager,
                   "time vs peer (lower is better)")]


def speed_shape(dry: bool) -> tuple[ModelConfig, dict]:
    s = SPEED[dry]
    return ModelConfig(dim=s["dim"], n_layers=s["layers"], n_heads=s["heads"], ffn_dim=s["ffn"], vocab_size=s["vocab"],
                       max_seq_len=s["seq"]), s


def hf_figures(dry: bool) -> list[Figure]:
    shape, s = speed_shape(dry)
    dtype = torch.bfloat16 if s["precision"] == "bf16" else torch.float32
    ours = Transformer(shape).to(device(), dtype).train()
    theirs = hf_llama(ours).to(device(), dtype)
    tokens, targets = torch.randint(0, shape.vocab_size, (2, s["micro"] // 2, s["seq"]), device=device())
    t_ours = timed(lambda: step(ours, tokens, targets, ours_logits), s["repeats"] + 2, s["warmup"])
    t_theirs = timed(lambda: step(theirs, tokens, targets, hf_logits), s["repeats"] + 2, s["warmup"])
    del ours, theirs
    return [Figure(f"dense Transformer fwd+bwd, D={shape.dim} L={shape.n_layers} seq {s['seq']} batch {s['micro'] // 2}, "
                   f"{s['precision']}", t_ours * 1e3, "ms", "transformers LlamaForCausalLM", t_theirs * 1e3, t_ours / t_theirs,
                   "time vs peer (lower is better)", "<= 1.0")]


def stage_json(work: Path, stage: int) -> str:
    """The shipped JSON of a stage (ZeRO-1: the ZeRO-2 one at stage 1)."""
    if stage == 3:
        return "ds_configs/zero3_bf16.json"
    ds = json.loads((ROOT / "ds_configs/zero2_bf16.json").read_text())
    ds["zero_optimization"]["stage"] = stage
    path = work / f"zero{stage}.json"
    path.write_text(json.dumps(ds))
    return str(path)


def tuned_json(work: Path, dry: bool) -> str:
    """zero3_2048x24.json; in a dry run with its granularity threshold at a tiny block's granularity
    (6e6 would make the whole tiny model one fetch unit, which the trainer refuses)."""
    if not dry:
        return "ds_configs/zero3_2048x24.json"
    from topk_ds.train.engine import module_granularity

    shape, _ = speed_shape(dry)
    ds = json.loads((ROOT / "ds_configs/zero3_2048x24.json").read_text())
    ds["zero_optimization"]["stage3_module_granularity_threshold"] = module_granularity(Transformer(shape).layers[0])
    path = work / "zero3_2048x24_tiny.json"
    path.write_text(json.dumps(ds))
    return str(path)


def engine_step(ds_config: str, topk: bool, compile_blocks: bool, dry: bool) -> dict:
    """Seconds per optimizer step (one micro-batch) through the engine, and the peak memory."""
    from topk_ds.config import load_config
    from topk_ds.train.engine import Engine

    shape, s = speed_shape(dry)
    cfg = load_config("paper-2048x24" if topk else "paper-2048x24-dense", [
        f"model.dim={shape.dim}", f"model.n_layers={shape.n_layers}", f"model.n_heads={shape.n_heads}",
        f"model.ffn_dim={shape.ffn_dim}", f"model.vocab_size={shape.vocab_size}", f"model.max_seq_len={s['seq']}",
        f"data.seq_len={s['seq']}", f"train.micro_batch={s['micro']}", "train.grad_accum=1", "train.steps=1000",
        "topk.anneal_ratio=0", f"train.precision={s['precision']}", f"train.ds_config={ds_config}",
        f"train.compile={str(compile_blocks).lower()}", "train.wandb=disabled", "train.tensorboard=false"])
    peak_memory_gib(reset=True)
    engine = Engine(cfg)
    batch = torch.randint(0, shape.vocab_size, (s["micro"], s["seq"] + 1))
    seconds = timed(lambda: engine.micro_step(batch), s["repeats"], s["warmup"])
    memory = peak_memory_gib()
    flops = cfg.model.flops_per_token(s["seq"])
    del engine
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return {"seconds": seconds, "tokens_per_s": s["micro"] * s["seq"] / seconds, "memory": memory, "flops": flops}


def engine_figures(work: Path, dry: bool) -> list[Figure]:
    from topk_ds.train.distributed import discover_ranks
    from topk_ds.train.engine import init_distributed
    from topk_ds.train.monitor import peak_flops

    discover_ranks()
    init_distributed()
    shape, s = speed_shape(dry)
    peak, source = peak_flops(device(), s["precision"])
    what = f"D={shape.dim} L={shape.n_layers} seq {s['seq']} micro {s['micro']}, {s['precision']}"
    memory_unit = "GiB" if torch.cuda.is_available() else "GiB process RSS"
    figures = []
    runs = [(f"ZeRO-{stage}", stage_json(work, stage), False) for stage in (1, 2, 3)]
    runs += [("ZeRO-3, compiled blocks", stage_json(work, 3), True), ("ZeRO-3, zero3_2048x24.json", tuned_json(work, dry), False)]
    for name, ds_config, compiled in runs:
        topk = engine_step(ds_config, True, compiled, dry)
        dense = engine_step(ds_config, False, compiled, dry)
        mfu = topk["flops"] * topk["tokens_per_s"] / peak
        figures += [
            Figure(f"TopK step, {name}, {what}", topk["tokens_per_s"], "tokens/s", "dense twin, same engine",
                   dense["tokens_per_s"], topk["seconds"] / dense["seconds"], "TopK / dense step time", "<= 1.03"),
            Figure(f"MFU of the TopK step, {name}", 100 * mfu, "%", f"peak ({source})", 100.0, mfu,
                   "share of the peak", ">= 0.5" if name == "ZeRO-3" else ""),
            Figure(f"peak memory of the TopK step, {name}", topk["memory"], memory_unit, "dense twin", dense["memory"],
                   topk["memory"] / dense["memory"], "memory vs peer (lower is better)")]
        if compiled:
            eager = next(f for f in figures if f.name.startswith("TopK step, ZeRO-3,"))
            figures.append(Figure(f"TopK step compiled, {what}", topk["tokens_per_s"], "tokens/s", "eager, ZeRO-3",
                                  eager.value, eager.value / topk["tokens_per_s"], "compiled / eager step time"))
    return figures


# ---------------------------------------------------------------- report

def environment(dry: bool) -> str:
    import deepspeed
    import transformers

    versions = f"torch {torch.__version__}, DeepSpeed {deepspeed.__version__}, transformers {transformers.__version__}"
    if dry:
        return (f"`python bench/bench_gpu.py --dry-run` on {platform.machine()} CPU: tiny sizes, fp32, compilation "
                f"through aot_eager; a test of the benchmark's code paths, not a GPU measurement. {versions}")
    smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
                         capture_output=True, text=True).stdout.strip().splitlines()[0]
    return f"`make bench-gpu` on {smi} (driver), CUDA {torch.version.cuda}, {versions}"


def report(env: str, sections: list[tuple[str, float, str]]) -> str:
    header = (f"# GPU benchmark results\n\n{env}, {time.strftime('%Y-%m-%d %H:%M')}. A ratio compares the figure with its "
              "peer measured in the same run.\n\n")
    return header + "\n".join(f"## {name} ({seconds:.0f} s)\n\n{body}\n" for name, seconds, body in sections)


def checks_table(checks: list[dict]) -> str:
    rows = ["| check | ok | detail |", "|---|---|---|"]
    return "\n".join(rows + [f"| {c['check']} | {'yes' if c['ok'] else 'NO'} | {c['detail']} |" for c in checks])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="every part on the CPU at tiny sizes (no GPU figure)")
    parser.add_argument("--out", type=Path, default=None,
                        help="the report (default bench/results-gpu.md; bench/out/results-gpu-dry-run.md with --dry-run)")
    parser.add_argument("--data", type=Path, default=None, help="prepared data for the training runs (default: made here)")
    args = parser.parse_args()
    dry = args.dry_run
    if not dry and not torch.cuda.is_available():
        sys.exit("bench_gpu.py: no CUDA device; run it on a GPU machine (make bench-gpu), or --dry-run on a CPU")
    out = args.out or ROOT / ("bench/out/results-gpu-dry-run.md" if dry else "bench/results-gpu.md")
    if dry:  # inductor's C++ compile takes minutes on a CPU; aot_eager still traces every graph whole
        torch.compile = functools.partial(torch.compile, backend="aot_eager")
    os.environ.setdefault("WANDB_MODE", "disabled")
    sections, failed = [], False
    with tempfile.TemporaryDirectory(prefix="bench-gpu-") as tmp:
        work = Path(tmp)
        started = time.time()
        checks = [check_topk_device_equals_cpu(dry)]
        data = args.data or make_data(work, dry)
        checks += check_training_resume(data, work, dry)
        failed |= not all(c["ok"] for c in checks)
        sections.append(("correctness", time.time() - started, checks_table(checks)))
        for name, part in (("TopK op", lambda: op_figures(dry)), ("model vs transformers", lambda: hf_figures(dry)),
                           ("engine", lambda: engine_figures(work, dry)),
                           ("analysis and evaluation", lambda: analysis_figures(data, work, dry))):
            started = time.time()
            try:
                figures = part()
                for f in figures if dry else ():  # the targets are a GPU's: a CPU dry run is not held to them
                    f.target = ""
                body = table(figures)
            except Exception as e:  # a GPU-only failure is itself a finding: record it, keep measuring
                failed, body = True, f"FAILED: {type(e).__name__}: {e}"
            sections.append((name, time.time() - started, body))
            print(f"== {name}\n{body}", flush=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(report(environment(dry), sections))
    print(f"wrote {out}" + ("; some checks FAILED" if failed else ""))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
