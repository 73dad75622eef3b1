"""Activation statistics on CPU, each figure against its peer in the same run:

(a) accumulating one TopK layer's statistics (per-token sums, firing counts, top contexts) over its
    k selected entries vs a dense accumulation of the same quantities, at D=1024, k=64, a 32,000-token
    vocabulary, 8,192 tokens per batch: throughput in tokens/s (target >= 10x), and the peak memory
    of each, measured in a process of its own (peak resident set over the inputs'); for information
    the same at a 2,048-token vocabulary. The sparse path does 16x fewer additions, but they scatter
    into random rows of the V x D sums (125 MiB at V=32,000), which costs far more per addition on a
    CPU than the dense path's contiguous row adds;
(b) the statistics pass (`collect`: the forward pass + statistics of every layer) of a D=1024, L=4 TopK
    model (2 TopK, 2 dense layers, V=32,000) vs the same forward pass without statistics, tokens/s of its
    later batches (target >= 0.8; fixed costs that a long pass amortises apart), one process of 2 threads;
(c) for information, the same pass on 2 processes of 1 thread (gloo; each runs every other batch, the
    statistics merged) vs (b)'s one process of 2 threads: the 2-rank speed-up on the same cores.

    python bench/bench_stats.py [--quick]
"""

import multiprocessing as mp
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import Figure, main, timeit_all  # noqa: E402

D, K, V, N = 1024, 64, 32000, 8192


def _accumulate(sparse: bool, batches: int, vocab: int, queue) -> None:
    """In a fresh process: tokens/s and resident-set growth (bytes) of one layer's accumulation."""
    from topk_ds.analysis.stats import LayerStats, windows
    from topk_ds.model.topk import topk_activation

    torch.set_num_threads(2)
    g = torch.Generator().manual_seed(0)
    inputs = [(topk_activation(torch.randn(N, D, generator=g), K), torch.randint(0, V, (N,), generator=g))
              for _ in range(batches + 1)]
    inputs = [(acts, tokens % vocab) for acts, tokens in inputs]

    def window_of(positions):  # in sequences of 1024 tokens
        return windows(positions, 1024, 16, 4)

    Path("/proc/self/clear_refs").write_text("5")  # the peak so far (making the inputs) is not the accumulation's
    base = _status("VmRSS")
    ls = LayerStats.empty(0, vocab, D, K if sparse else None)
    ls.update(*inputs[0], window_of)  # warm up (and fill the top lists)
    start = time.perf_counter()
    for acts, tokens in inputs[1:]:
        ls.update(acts, tokens, window_of)
    rate = batches * N / (time.perf_counter() - start)
    queue.put((rate, _status("VmHWM") - base))


def _status(field: str) -> int:
    """A memory figure of this process from /proc/self/status (VmRSS: now, VmHWM: peak since clear_refs), in bytes."""
    line = next(line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith(field + ":"))
    return int(line.split()[1]) * 1024


def measure(sparse: bool, batches: int, vocab: int = V) -> tuple[float, int]:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_accumulate, args=(sparse, batches, vocab, queue))
    proc.start()
    result = queue.get()
    proc.join()
    return result


def accumulation_figures(batches: int) -> list[Figure]:
    (sparse, sparse_mem), (dense, dense_mem) = measure(True, batches), measure(False, batches)
    (small_sparse, _), (small_dense, _) = measure(True, batches, 2048), measure(False, batches, 2048)
    figures = [
        Figure(f"one TopK layer's statistics, sparse (k={K} indices), D={D} V={V:,}", sparse, "tokens/s",
               "dense accumulation of the same quantities", dense, sparse / dense, "throughput vs peer (higher is better)",
               ">= 10"),
        Figure("peak memory of that accumulation, sparse: resident-set growth (the V x D sums are 125 MiB)",
               sparse_mem / 2**20, "MiB", "dense accumulation", dense_mem / 2**20, sparse_mem / dense_mem,
               "memory vs peer (lower is better)"),
        Figure("the same at V=2,048 (the synthetic corpus's vocabulary, 8 MiB of sums) (information)",
               small_sparse, "tokens/s", "dense accumulation", small_dense, small_sparse / small_dense,
               "throughput vs peer (higher is better)"),
    ]
    return figures


def _model_and_batches(batches: int):
    """The (b)/(c) model (seeded: the same in every process) and its batches of 4 x 256 tokens."""
    from types import SimpleNamespace

    from topk_ds.analysis.units import Neurons
    from topk_ds.model import ModelConfig, TopKConfig, Transformer

    torch.manual_seed(0)
    model = Transformer(ModelConfig(dim=D, n_layers=4, n_heads=16, ffn_dim=2816, vocab_size=V, max_seq_len=256),
                        TopKConfig(k=K, n_nontopk=2)).eval()
    units = Neurons(SimpleNamespace(model=model, config=SimpleNamespace(train_step=None)))
    return units, [torch.randint(0, V, (4, 256)) for _ in range(batches)]


def _statistics(units, batches) -> None:
    from topk_ds.analysis.stats import collect

    collect(units, None, batches, sum(b.numel() for b in batches), progress=False)


def _forward(units, batches) -> None:
    """The same forward pass (hooks at the same layers, stopping after the last one) without statistics."""
    from topk_ds.analysis.units import run_until_recorded

    with torch.inference_mode(), units.record(units.layers, lambda layer, acts: None):
        for b in batches:
            run_until_recorded(units.model, b)


def pass_figures(units, data: list, what: str, repeats: int, sync=None, target: str = ">= 0.8") -> tuple[list, float]:
    """A pass's throughput is that of its later batches: each pass also has fixed costs (the units' logit
    effects: V x D x D per layer; the first batches filling the empty top lists) that 10M tokens amortise.
    So the target figure is the marginal rate, from passes over the first half of `data` and over all of it;
    the half pass as a whole is information. `sync()` waits for the device. Returns the figures and the
    whole pass's tokens/s."""
    def synced(fn):
        return lambda: (fn(), sync and sync())

    half = data[:len(data) // 2]
    t_long, t_short, t_forward = timeit_all(synced(lambda: _statistics(units, data)),
                                            synced(lambda: _statistics(units, half)),
                                            synced(lambda: _forward(units, half)), repeats=repeats)
    n, all_tokens = sum(b.numel() for b in half), sum(b.numel() for b in data)
    return [Figure(f"statistics pass, forward + statistics of all layers, {what}: rate of batches "
                   f"{len(half) + 1}-{len(data)} (t(all) - t(first half))", n / (t_long - t_short), "tokens/s",
                   "the same forward without statistics", n / t_forward, t_forward / (t_long - t_short),
                   "throughput vs peer (higher is better)", target),
            Figure(f"the whole pass over {n:,} tokens, fixed costs included (information)", n / t_short, "tokens/s",
                   "the same forward without statistics", n / t_forward, t_forward / t_short,
                   "throughput vs peer (higher is better)")], all_tokens / t_long


def _rank(rank: int, port: int, batches: int, repeats: int, queue) -> None:
    """One of 2 processes (1 thread each): the median time of the statistics pass over all batches, merge included."""
    import statistics

    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    units, data = _model_and_batches(batches)
    _statistics(units, data[:2])  # warm up
    times = []
    for _ in range(repeats):
        dist.barrier()
        start = time.perf_counter()
        _statistics(units, data)
        times.append(time.perf_counter() - start)
    if rank == 0:
        queue.put(statistics.median(times))
    dist.destroy_process_group()


def two_ranks_figure(batches: int, repeats: int, one_process_rate: float) -> Figure:
    from topk_ds.train.distributed import free_port

    ctx = mp.get_context("spawn")
    queue, port = ctx.Queue(), free_port()
    procs = [ctx.Process(target=_rank, args=(r, port, batches, repeats, queue)) for r in range(2)]
    for p in procs:
        p.start()
    seconds = queue.get()
    for p in procs:
        p.join()
    rate = batches * 4 * 256 / seconds
    return Figure(f"the same statistics pass over {batches * 4 * 256:,} tokens on 2 processes x 1 thread (gloo, "
                  "merged) (information)", rate, "tokens/s", "1 process x 2 threads", one_process_rate,
                  rate / one_process_rate, "speed-up (higher is better)")


def run(quick: bool) -> list[Figure]:
    torch.set_num_threads(2)
    batches, repeats = (4, 1) if quick else (8, 2)
    units, data = _model_and_batches(batches)
    statistics, one_process_rate = pass_figures(units, data, f"D={D} L=4 (2 TopK, 2 dense) V={V:,}, 1 process x 2 "
                                                "threads", repeats)
    return accumulation_figures(4 if quick else 10) + statistics + [two_ranks_figure(batches, repeats, one_process_rate)]


if __name__ == "__main__":
    main("stats", run)
