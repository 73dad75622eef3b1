"""Long context on this CPU, fp32, 2 ranks (gloo), each figure against its peer in the same run:
(a) activation memory per rank at seq 2048, sequence parallelism over the 2 ranks (Ulysses, each runs 1024
    positions) vs none (each runs a whole sequence): the peak of the bytes allocated above the state before
    forward + backward (gradients already allocated, so what is counted is activations, the all-to-all
    buffers and temporaries), from the profiler's allocation events, target <= 0.6; and the bytes of the
    tensors autograd keeps for backward (the planner's "activations saved for backward"), information;
(b) step time (forward + backward) for the same global batch, 2 sequences of 2048 over the 2 ranks: SP=2
    (both sequences, half of each per rank) vs SP=1 (one whole sequence per rank), information;
(c) recall of planted facts by distance and perplexity by position, TopK vs its dense twin, both trained
    by the README's CPU recipe (at 64 tokens, continued at 256 with SP=2 and YaRN x4) on the long corpus.

    python bench/bench_long.py [--quick]
"""

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import Figure, main  # noqa: E402
from topk_ds.model import ModelConfig, TopKConfig, Transformer  # noqa: E402

SEQ = 2048
SHAPE = ModelConfig(dim=256, n_layers=4, n_heads=8, ffn_dim=688, vocab_size=4096, max_seq_len=SEQ)


def saved_bytes(fn) -> int:
    """Bytes of the distinct storages autograd saves for backward while fn() runs its forward."""
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = fn()
    loss.backward()
    return sum(storages.values())


def peak_bytes(fn) -> int:
    """The most bytes live at once during fn().backward() beyond those live before it: the running sum of the
    CPU allocator's allocations and frees, as the profiler records them (a CPU has no allocator statistics)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn().backward()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak


def _rank(rank: int, port: int, repeats: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE="2")
    torch.set_num_threads(1)
    import torch.distributed as dist

    from topk_ds.train.engine import init_distributed, ulysses_attention

    init_distributed()
    torch.manual_seed(0)
    model = Transformer(SHAPE, TopKConfig(k=64, n_nontopk=2)).train()
    for p in model.parameters():  # gradients accumulate in place: the memory figures count no gradient
        p.grad = torch.zeros_like(p)
    tokens = torch.randint(0, SHAPE.vocab_size, (2, SEQ + 1), generator=torch.Generator().manual_seed(1))
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    half = SEQ // 2

    def whole(batch):  # SP=1: this rank's own sequence(s), all positions
        return lambda: model(inputs[batch], targets[batch])

    def split(batch):  # SP=2: both ranks run the same sequence(s), each its half of the positions
        start = rank * half
        return lambda: model(inputs[batch, start:start + half], targets[batch, start:start + half], start=start) / 2

    def step(fn):
        dist.barrier()
        started = time.perf_counter()
        fn().backward()
        dist.barrier()
        return time.perf_counter() - started

    result = {"sp1_bytes": saved_bytes(whole(slice(rank, rank + 1))), "sp1_peak": peak_bytes(whole(slice(rank, rank + 1)))}
    sp1 = [step(whole(slice(rank, rank + 1))) for _ in range(repeats + 1)][1:]
    model.set_attention(ulysses_attention(dist.new_group([0, 1])))
    result |= {"sp2_bytes": saved_bytes(split(slice(0, 1))), "sp2_peak": peak_bytes(split(slice(0, 1)))}
    sp2 = [step(split(slice(0, 2))) for _ in range(repeats + 1)][1:]
    result |= {"sp1_s": sorted(sp1)[len(sp1) // 2], "sp2_s": sorted(sp2)[len(sp2) // 2]}
    if rank == 0:
        Path(out).write_text(json.dumps(result))
    dist.destroy_process_group()


def parallel_figures(repeats: int) -> list[Figure]:
    from topk_ds.train.distributed import free_port

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        torch.multiprocessing.spawn(_rank, args=(free_port(), repeats, str(out)), nprocs=2)
        r = json.loads(out.read_text())
    what = f"D={SHAPE.dim} L={SHAPE.n_layers} heads={SHAPE.n_heads} TopK k=64, seq {SEQ}, 2 CPU ranks"
    mib = 2**20
    return [
        Figure(f"peak activation memory per rank, one sequence, SP=2 (Ulysses), {what}", r["sp2_peak"] / mib,
               "MiB", "SP=1 (the whole sequence on one rank)", r["sp1_peak"] / mib, r["sp2_peak"] / r["sp1_peak"],
               "memory vs peer (lower is better)", "<= 0.6"),
        Figure(f"activations saved for backward per rank, one sequence, SP=2 (information), {what}",
               r["sp2_bytes"] / mib, "MiB", "SP=1 (the whole sequence on one rank)", r["sp1_bytes"] / mib,
               r["sp2_bytes"] / r["sp1_bytes"], "memory vs peer (lower is better)"),
        Figure(f"fwd+bwd of 2 sequences over 2 ranks, SP=2 (information), {what}", r["sp2_s"], "s",
               "SP=1 (one sequence per rank)", r["sp1_s"], r["sp2_s"] / r["sp1_s"], "time vs peer (lower is better)"),
    ]


def cli(*args, timeout=3600):
    proc = subprocess.run([sys.executable, "-m", "topk_ds.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout)
    if proc.returncode:
        raise RuntimeError(f"topk-ds {' '.join(map(str, args))}: {proc.stderr[-2000:]}")


def retention_figures(quick: bool) -> list[Figure]:
    """The README's CPU recipe with more steps: TopK and its dense twin, the same data and schedule."""
    from topk_ds.train.distributed import free_port

    steps1, steps2, docs = (300, 30, 16) if quick else (3000, 300, 64)
    root = Path(tempfile.mkdtemp(prefix="bench_long-"))
    cli("corpus", "synth", "--long", "--out", root / "corpus", "--docs", 1500, "--length", 300, "--facts", 16)
    cli("tokenizer", "train", "--input", root / "corpus/corpus.jsonl", "--vocab-size", 2000, "--out", root / "tok")
    cli("data", "prepare", "--input", root / "corpus/corpus.jsonl", "--tokenizer", root / "tok", "--out", root / "data",
        "--val-tokens", 20000)
    common = ["--set", f"data.path={root / 'data'}", "--set", "train.eval_every=0", "--set", "train.lr=3e-3"]
    for config in ("tiny", "tiny-dense"):
        cli("train", "--config", config, *common, "--set", f"train.out_dir={root / config}-64", "--set",
            f"train.steps={steps1}", "--set", f"train.save_every={steps1}")
        proc = subprocess.run(
            [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", str(free_port()),
             "--module", "topk_ds.train", "--config",
             config, *common, "--set", f"train.out_dir={root / config}-256", "--set", f"train.init_from={root / config}-64",
             "--set", "model.max_seq_len=256", "--set", "data.seq_len=256", "--set", "topk.anneal_ratio=0", "--set",
             "model.rope_scaling={rope_type: yarn, factor: 4, original_max_position_embeddings: 64}", "--set",
             "train.sequence_parallel=2", "--set", f"train.steps={steps2}", "--set", f"train.save_every={steps2}"],
            capture_output=True, text=True, timeout=3600)
        if proc.returncode:
            raise RuntimeError(proc.stderr[-2000:])
    cli("eval", f"{root}/tiny-256", f"{root}/tiny-dense-256", "--suite", "long", "--out", root / "eval", "--limit", docs)
    topk, dense = (json.loads((root / f"eval/{name}-256-step{steps2}.json").read_text()) for name in ("tiny", "tiny-dense"))
    what = f"tiny (D=64 L=4) {steps1} steps at 64 + {steps2} at 256 (SP=2, YaRN x4), {docs} documents of 256 tokens"
    figures = []
    for t, d in zip(topk["distance"], dense["distance"]):
        if t["asked"]:
            figures.append(Figure(f"recall of planted facts {t['bucket']} tokens back ({t['asked']} facts), TopK, {what}",
                                  100 * t["accuracy"], "%", "dense twin", 100 * d["accuracy"],
                                  t["accuracy"] / d["accuracy"] if d["accuracy"] else float("nan"),
                                  "recall vs peer (higher is better)"))
    for t, d in zip(topk["position"], dense["position"]):
        if t["tokens"]:
            figures.append(Figure(f"perplexity at positions {t['bucket']}, TopK, {what}", t["perplexity"], "",
                                  "dense twin", d["perplexity"], t["perplexity"] / d["perplexity"],
                                  "perplexity vs peer (lower is better)"))
    return figures


def run(quick: bool) -> list[Figure]:
    torch.set_num_threads(1)
    return parallel_figures(2 if quick else 5) + retention_figures(quick)


if __name__ == "__main__":
    main("long", run)
