"""What the trainer reads: fixed token windows over a prepared split, and the global sampler.

Windows: a split's shards form one token stream; window i is tokens [i*L, i*L + L + 1) for
seq_len L, so consecutive windows share their boundary token (input = w[:-1], target = w[1:]) and
len = (tokens - 1) // L. Windows cross document (EOS/BOS) and shard boundaries.

Sampler: each epoch is one permutation of the window indices (torch.randperm seeded by (seed,
epoch)); the position is one global index into it. Optimizer step s of an epoch takes positions
[index, index + G) for global batch G; micro-step m of rank r of W ranks, micro-batch B, takes
index + (m*W + r)*B + [0, B). A step's sample set therefore depends only on (seed, epoch, index,
G): a run resumed with another world size or micro-batch layout but the same G continues from
exactly the next unseen sample. When fewer than G samples are left in an epoch, they are dropped
and the next epoch starts with a new permutation.
"""

import hashlib
from pathlib import Path

import numpy as np
import torch

from ..errors import UserError
from .manifest import SPLITS, read_manifest, shard_problem, tokenizer_dir

__all__ = ["TokenWindows", "GlobalSampler", "read_manifest", "tokenizer_dir"]


class TokenWindows:
    """Windows of seq_len + 1 tokens over one split of a prepared data directory, memory-mapped.
    Opening checks every shard's size against the manifest (and its sha256 with verify=True)."""

    def __init__(self, path, split: str = "train", seq_len: int = 1024, verify: bool = False):
        if split not in SPLITS:
            raise UserError(f"split must be one of {', '.join(SPLITS)}, got '{split}'")
        if seq_len < 1:
            raise UserError(f"seq_len must be >= 1, got {seq_len}")
        self.path, self.split, self.seq_len = Path(path), split, seq_len
        self.manifest = read_manifest(self.path)
        self.vocab_size = int(self.manifest["tokenizer"]["vocab_size"])
        self._shards = self.manifest["splits"][split]["shards"]
        for shard in self._shards:
            if problem := shard_problem(self.path, shard, checksum=verify):
                raise UserError(f"{problem}; check the data with `topk-ds data verify {self.path}`")
        sizes = np.array([s["tokens"] for s in self._shards], np.int64)
        self._starts = np.concatenate([[0], np.cumsum(sizes)])  # stream offset of each shard, then the end
        self.tokens = int(self._starts[-1])
        if self.tokens < seq_len + 1:
            raise UserError(f"the {split} split of {self.path} has {self.tokens} tokens, fewer than one window of "
                            f"seq_len + 1 = {seq_len + 1}")
        self._open()

    def _open(self) -> None:
        dtype = np.dtype(self.manifest["dtype"]).newbyteorder("<")
        self._maps = [np.memmap(self.path / s["file"], dtype=dtype, mode="r") for s in self._shards]

    def __getstate__(self):  # a memmap would pickle as a copy of the data: reopen instead (DataLoader workers)
        return {k: v for k, v in self.__dict__.items() if k != "_maps"}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._open()

    def __len__(self) -> int:
        return (self.tokens - 1) // self.seq_len

    def _window(self, i: int) -> np.ndarray:
        if not 0 <= i < len(self):
            raise IndexError(f"window {i} out of range [0, {len(self)})")
        start, end = i * self.seq_len, i * self.seq_len + self.seq_len + 1
        k = int(np.searchsorted(self._starts, start, side="right")) - 1
        if end <= self._starts[k + 1]:  # inside one shard: the common case
            return self._maps[k][start - self._starts[k]:end - self._starts[k]]
        parts = []
        while start < end:
            stop = min(end, int(self._starts[k + 1]))
            parts.append(self._maps[k][start - self._starts[k]:stop - self._starts[k]])
            start, k = stop, k + 1
        return np.concatenate(parts)

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.from_numpy(self._window(int(i)).astype(np.int64))

    def batch(self, indices) -> torch.Tensor:
        """(len(indices), seq_len + 1) int64."""
        out = np.empty((len(indices), self.seq_len + 1), np.int64)
        for row, i in enumerate(indices):
            out[row] = self._window(int(i))
        return torch.from_numpy(out)

    def check_vocab(self, vocab_size: int, what: str) -> None:
        """Refuse a model or tokenizer whose vocabulary differs from the one the data was prepared with."""
        if vocab_size != self.vocab_size:
            raise UserError(f"vocab size {vocab_size} of {what} does not match the data: {self.path} was prepared "
                            f"with a {self.vocab_size}-token tokenizer ({tokenizer_dir(self.path)})")


def _epoch_seed(seed: int, epoch: int) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{epoch}".encode()).digest()[:8], "little")


class GlobalSampler:
    """The deterministic, resumable order of samples; state is (epoch, index into the epoch's permutation)."""

    def __init__(self, num_samples: int, global_batch: int, seed: int = 0):
        if global_batch < 1:
            raise UserError(f"global batch must be >= 1, got {global_batch}")
        if num_samples < global_batch:
            raise UserError(f"the data has {num_samples} samples (windows), fewer than one global batch of "
                            f"{global_batch}; use more data, a shorter seq_len or a smaller batch")
        self.num_samples, self.global_batch, self.seed = num_samples, global_batch, seed
        self.epoch, self.index = 0, 0
        self._perm, self._perm_epoch = None, None

    def _permutation(self) -> torch.Tensor:
        if self._perm_epoch != self.epoch:  # built once per epoch: ~0.2 s for 20M samples
            g = torch.Generator().manual_seed(_epoch_seed(self.seed, self.epoch))
            dtype = torch.int32 if self.num_samples < 2**31 else torch.int64
            self._perm, self._perm_epoch = torch.randperm(self.num_samples, generator=g, dtype=dtype), self.epoch
        return self._perm

    def next_step(self, rank: int, world_size: int, micro_batch: int) -> list[list[int]]:
        """This rank's sample indices for each micro-step of the next optimizer step; advances by one global batch."""
        G = self.global_batch
        if not 0 <= rank < world_size or micro_batch < 1 or G % (world_size * micro_batch):
            raise UserError(f"global batch {G} must be a multiple of world_size {world_size} x micro_batch "
                            f"{micro_batch}, with 0 <= rank {rank} < world_size")
        if self.index + G > self.num_samples:  # the epoch's remainder (< G samples) is dropped
            self.epoch, self.index = self.epoch + 1, 0
        perm = self._permutation()
        accum = G // (world_size * micro_batch)
        steps = []
        for m in range(accum):
            start = self.index + (m * world_size + rank) * micro_batch
            steps.append(perm[start:start + micro_batch].tolist())
        self.index += G
        return steps

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "index": self.index}

    def load_state_dict(self, state: dict) -> None:
        epoch, index = state.get("epoch"), state.get("index")
        if not isinstance(epoch, int) or not isinstance(index, int) or epoch < 0 or not 0 <= index <= self.num_samples:
            raise UserError(f"sampler state {state} does not fit this data ({self.num_samples} samples)")
        self.epoch, self.index = epoch, index
