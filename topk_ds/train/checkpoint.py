"""Checkpoint policy around DeepSpeed's own save/load: when to save, which tags to keep, how to tell
a complete checkpoint from one cut short, and the small TrainState that makes resume exact.

A tag directory (`global_step{N}`) counts as complete once `complete.json` is in it: written after
every rank has returned from save_checkpoint, it lists each file with its size, so a truncated or
missing file is caught before DeepSpeed tries to load it.
"""

import contextlib
import io
import json
import random
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..errors import UserError
from ..io import write_json
from .distributed import barrier

MARKER = "complete.json"
_TAG = re.compile(r"^global_step(\d+)$")


@dataclass
class TrainState:
    step: int = 0  # optimizer steps taken (== the engine's global_steps)
    tokens: int = 0  # tokens consumed, all ranks
    sampler: dict = field(default_factory=lambda: {"epoch": 0, "index": 0})
    global_batch: int = 0  # sequences per step; a resume must keep it (the sample order depends on it)
    skipped_steps: int = 0  # steps DeepSpeed skipped for a non-finite gradient norm
    rng: dict = field(default_factory=dict)

    def capture_rng(self) -> None:
        self.rng = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}

    def restore_rng(self) -> None:
        if not self.rng:
            return
        random.setstate(self.rng["python"])
        np.random.set_state(self.rng["numpy"])
        torch.set_rng_state(self.rng["torch"])
        if torch.cuda.is_available() and self.rng["cuda"]:
            torch.cuda.set_rng_state_all(self.rng["cuda"])


def tag_for(step: int) -> str:
    return f"global_step{step}"


def tags_by_step(ckpt_dir: Path) -> list[tuple[int, Path]]:
    """Tag directories, newest first."""
    if not ckpt_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in ckpt_dir.iterdir() if p.is_dir() and (m := _TAG.match(p.name))]
    return sorted(found, reverse=True)


def problem(tag_dir: Path) -> str | None:
    """Why `tag_dir` cannot be resumed from, or None if it is complete."""
    marker = tag_dir / MARKER
    if not marker.exists():
        return "no complete.json (the save was interrupted)"
    try:
        files = json.loads(marker.read_text())["files"]
    except (ValueError, KeyError):
        return "complete.json is unreadable"
    for name, size in files.items():
        path = tag_dir / name
        if not path.exists():
            return f"{name} is missing"
        if path.stat().st_size != size:
            return f"{name} has {path.stat().st_size} bytes, expected {size} (truncated?)"
    return None


def latest_complete(ckpt_dir: Path, log=print) -> Path | None:
    """The newest complete checkpoint; incomplete or corrupt newer ones are reported and passed over."""
    for _, path in tags_by_step(ckpt_dir):
        reason = problem(path)
        if reason is None:
            return path
        log(f"checkpoint {path} is not usable: {reason}; falling back to the previous one")
    return None


class Checkpointer:
    def __init__(self, ckpt_dir: Path, every: int, keep_last: int, is_writer: bool):
        self.dir, self.every, self.keep_last = ckpt_dir, every, keep_last
        self.is_writer = is_writer  # local rank 0: writes markers and prunes on its node's filesystem
        self.last_saved: Path | None = None

    def maybe_save(self, engine, state: TrainState, final: bool = False) -> None:
        if final or state.step % self.every == 0:
            self.save(engine, state)

    def save(self, engine, state: TrainState) -> Path:
        tag = tag_for(state.step)
        if self.last_saved is not None and self.last_saved.name == tag:
            return self.last_saved
        state.capture_rng()
        engine.save(self.dir, tag, {"train_state": asdict(state)})
        barrier()  # every rank's shards are on disk before the tag is declared complete
        path = self.dir / tag
        if self.is_writer:
            files = {str(p.relative_to(path)): p.stat().st_size for p in sorted(path.rglob("*"))
                     if p.is_file() and p.name != MARKER}
            write_json(path / MARKER, {"step": state.step, "files": files})
            self._prune()
        barrier()
        self.last_saved = path
        return path

    def _prune(self) -> None:
        complete = [p for _, p in tags_by_step(self.dir) if (p / MARKER).exists()]
        for old in complete[self.keep_last:]:
            shutil.rmtree(old, ignore_errors=True)

    def resolve(self, resume: str, log=print) -> Path | None:
        """--resume auto|none|PATH -> the checkpoint directory to load, or None to start fresh."""
        if resume == "none":
            if tags_by_step(self.dir):
                raise UserError(f"{self.dir} already holds checkpoints; pass --resume auto to continue "
                                "that run or choose another train.out_dir")
            return None
        if resume == "auto":
            found = latest_complete(self.dir, log)
            if found is None and tags_by_step(self.dir):
                raise UserError(f"no complete checkpoint in {self.dir}: every tag there is incomplete or corrupt")
            return found
        path = Path(resume)
        if not path.is_dir():
            raise UserError(f"--resume {resume}: no such checkpoint directory")
        if not is_universal(path) and (reason := problem(path)) is not None:
            raise UserError(f"--resume {resume}: checkpoint is not usable: {reason}")
        return path


def saved_weights(tag_dir: Path) -> dict:
    """The model weights of one tag directory, with DeepSpeed's keys, lazily: every value has `.shape`, and
    `.contiguous()` makes it a tensor. ZeRO-1/2/3 shards are consolidated by DeepSpeed's zero_to_fp32 one
    tensor at a time (fp32); ZeRO-0's model-states file is memory-mapped."""
    if list(tag_dir.glob("*zero_pp_rank_*_optim_states.pt")):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        with contextlib.redirect_stdout(io.StringIO()):  # it prints four lines of progress per checkpoint
            return get_fp32_state_dict_from_zero_checkpoint(str(tag_dir.parent), tag=tag_dir.name, lazy_mode=True)
    return torch.load(tag_dir / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False, mmap=True)["module"]


def warm_start_tag(path: str) -> Path:
    """train.init_from -> a complete tag directory: the newest complete checkpoint of a run directory (or of
    its checkpoints/), or the global_stepN directory given."""
    given = Path(path)
    for ckpt_dir in (given / "checkpoints", given):
        if tags_by_step(ckpt_dir):
            if (found := latest_complete(ckpt_dir, log=lambda m: None)) is None:
                raise UserError(f"train.init_from={path}: no complete checkpoint in {ckpt_dir}")
            return found
    if not (_TAG.match(given.name) and given.is_dir()):
        raise UserError(f"train.init_from={path}: expected a run directory, its checkpoints/ or a global_stepN "
                        "checkpoint directory")
    if (reason := problem(given)) is not None:
        raise UserError(f"train.init_from={path}: the checkpoint is not usable: {reason}")
    return given


def is_universal(path: Path) -> bool:
    """A checkpoint written by deepspeed.checkpoint.ds_to_universal (loadable on any world size)."""
    return (path / "zero").is_dir()
