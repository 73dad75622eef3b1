"""The micro-batches of the next optimizer step, read on a background thread while this step trains,
so reading memory-mapped shards (from a network filesystem, say) never sits on the step.

The sampler stays on the calling thread and runs one step ahead; each step's batches come with the
sampler state right after that step, which is what a checkpoint records, so resume stays exact.
"""

from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

import torch


class Prefetcher:
    """`next_indices()` gives the sample indices of each micro-batch of the next step (and advances
    the sampler), `state()` the sampler state, `read(indices)` a (B, T + 1) batch. With
    `pin_memory` (CUDA) batches land in page-locked memory, so the copy to the GPU is asynchronous."""

    def __init__(self, read: Callable[[list[int]], torch.Tensor], next_indices: Callable[[], list[list[int]]],
                 state: Callable[[], dict], pin_memory: bool = False):
        self.read, self.next_indices, self.state, self.pin_memory = read, next_indices, state, pin_memory
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="prefetch")
        self.ahead = self._schedule()

    def _schedule(self) -> tuple[Future, dict]:
        indices = self.next_indices()
        return self.pool.submit(self._read_step, indices), self.state()

    def _read_step(self, indices: list[list[int]]) -> list[torch.Tensor]:
        batches = [self.read(micro) for micro in indices]
        return [b.pin_memory() for b in batches] if self.pin_memory else batches

    def next_step(self) -> tuple[list[torch.Tensor], dict]:
        """The next step's micro-batches and the sampler state after it; starts reading the one after."""
        future, state = self.ahead
        batches = future.result()  # re-raises a read error here, on the training thread
        self.ahead = self._schedule()
        return batches, state

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> "Prefetcher":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
