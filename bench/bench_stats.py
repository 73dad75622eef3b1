"""Activation statistics on CPU, each figure against its peer in the same run:

(a) accumulating one TopK layer's statistics (per-token sums, firing counts, top contexts) over its
    k selected entries vs a dense accumulation of the same quantities, at D=1024, k=64, a 32,000-token
    vocabulary, 8,192 tokens per batch: throughput in tokens/s (target >= 10x), and the peak memory
    of each, measured in a process of its own (resident set growth over the inputs); for information
    the same at a 2,048-token vocabulary. The sparse path does 16x fewer additions, but they scatter
    into random rows of the V x D sums (125 MiB at V=32,000), which costs far more per addition on a
    CPU than the dense path's contiguous row adds;
(b) for information, the whole `collect` pass (the model's forward + statistics of every layer)
    on a D=1024, L=4 TopK model vs the model's forward alone.

    python bench/bench_stats.py [--quick]
"""

import multiprocessing as mp
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import Figure, main, timeit_pair  # noqa: E402

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

    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    ls = LayerStats.empty(0, vocab, D, K if sparse else None)
    ls.update(*inputs[0], window_of)  # warm up (and fill the top lists)
    start = time.perf_counter()
    for acts, tokens in inputs[1:]:
        ls.update(acts, tokens, window_of)
    rate = batches * N / (time.perf_counter() - start)
    queue.put((rate, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base))


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


def collect_figure(repeats: int) -> Figure:
    from types import SimpleNamespace

    from topk_ds.analysis.stats import collect
    from topk_ds.analysis.units import Neurons
    from topk_ds.model import ModelConfig, TopKConfig, Transformer

    torch.manual_seed(0)
    model = Transformer(ModelConfig(dim=D, n_layers=4, n_heads=16, ffn_dim=2816, vocab_size=V, max_seq_len=256),
                        TopKConfig(k=K, n_nontopk=2)).eval()
    wrapper = SimpleNamespace(model=model, config=SimpleNamespace(train_step=None))
    tokens = torch.randint(0, V, (8, 256))

    def ours():
        collect(Neurons(wrapper), None, [tokens], tokens.numel(), progress=False)

    def peer():
        with torch.inference_mode():
            model(tokens)

    t_ours, t_peer = timeit_pair(ours, peer, repeats=repeats, warmup=1)
    n = tokens.numel()
    return Figure(f"collect: forward + statistics of all 4 layers, D={D} (2 TopK, 2 dense) (information)", n / t_ours,
                  "tokens/s", "the forward alone", n / t_peer, t_ours / t_peer, "time vs peer (lower is better)")


def run(quick: bool) -> list[Figure]:
    torch.set_num_threads(2)
    return accumulation_figures(4 if quick else 10) + [collect_figure(2 if quick else 4)]


if __name__ == "__main__":
    main("stats", run)
