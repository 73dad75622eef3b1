"""Checkpoint policy around DeepSpeed's own save/load: when to save, which tags to keep, how to tell a
complete, intact checkpoint from one cut short or damaged, and the small TrainState that makes
resume exact.

A tag directory (`global_step{N}`) counts as complete once `complete.json` is in it. Rank 0 writes it
after every rank has returned from save_checkpoint; it holds the TrainState and every file's size and
sha256, each rank hashing its own shards in parallel. So a truncated, missing or altered file is
caught before DeepSpeed reads it, and resume, convert, eval and trace fall back to (or refuse) such
a checkpoint. TOPK_DS_SKIP_CHECKSUMS=1 skips computing and checking the sums (sizes are still
checked), for checkpoints too large to read twice.
"""

import contextlib
import functools
import io
import json
import os
import re
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..config import Config, load_config, resume_changes
from ..errors import UserError
from ..io import sha256_file, write_json
from .distributed import SharedError, all_gather, barrier, from_rank0, rank, together, world_size

MARKER = "complete.json"
_TAG = re.compile(r"^global_step(\d+)$")
_RANK = re.compile(r"rank_(\d+)")  # DeepSpeed's shard names: zero_pp_rank_R_mp_rank_00_optim_states.pt


@dataclass
class TrainState:
    """No RNG state: training draws no random numbers (the sample order has its own seeded generator and
    the model no dropout), so a resume on any number of ranks has none to restore."""

    step: int = 0  # optimizer steps taken (== the engine's global_steps)
    tokens: int = 0  # tokens consumed, all ranks
    sampler: dict = field(default_factory=lambda: {"epoch": 0, "index": 0})
    global_batch: int = 0  # sequences per step; a resume must keep it (the sample order depends on it)
    skipped_steps: int = 0  # steps DeepSpeed skipped for a non-finite gradient norm

    @classmethod
    def saved(cls, state: dict) -> "TrainState":
        """From a checkpoint; one of an older topk_ds also holds an "rng" entry, unused."""
        return cls(**{name: value for name, value in state.items() if name != "rng"})

    def check_batch(self, global_batch: int) -> None:
        if self.global_batch != global_batch:
            raise SharedError(f"the checkpoint was trained with a global batch of {self.global_batch} sequences, this "
                              f"run has {global_batch}; keep micro_batch x grad_accum x ranks equal to resume exactly")


def tag_for(step: int) -> str:
    return f"global_step{step}"


def tags_by_step(ckpt_dir: Path) -> list[tuple[int, Path]]:
    """Tag directories, newest first."""
    if not ckpt_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in ckpt_dir.iterdir() if p.is_dir() and (m := _TAG.match(p.name))]
    return sorted(found, reverse=True)


def checksums_enabled() -> bool:
    return os.environ.get("TOPK_DS_SKIP_CHECKSUMS", "0").lower() in ("0", "", "false", "no")


def owner(name: str, world: int) -> int:
    """The rank that hashes and verifies a checkpoint file: the one whose shard it is, rank 0 for the rest."""
    m = _RANK.search(name)
    return int(m.group(1)) % world if m else 0


@functools.lru_cache(maxsize=1024)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    return sha256_file(Path(path))


def file_sha256(path: Path) -> str:
    """Once per process for an unchanged file (trace lists every checkpoint, then loads each)."""
    st = path.stat()
    return _sha256(str(path), st.st_size, st.st_mtime_ns)


def read_marker(tag_dir: Path) -> dict | None:
    """complete.json with files as {name: {"size", "sha256"}}, or None if unreadable. An older topk_ds wrote
    sizes alone ({name: size}) and no train_state: such a checkpoint is still checked by size."""
    try:
        marker = json.loads((tag_dir / MARKER).read_text())
        marker["files"] = {name: entry if isinstance(entry, dict) else {"size": entry, "sha256": None}
                           for name, entry in marker["files"].items()}
        if "train_state" in marker:
            TrainState.saved(marker["train_state"])
        return marker if all(isinstance(e["size"], int) for e in marker["files"].values()) else None
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def problem(tag_dir: Path, share: tuple[int, int] = (0, 1)) -> str | None:
    """Why `tag_dir` cannot be loaded, or None. Sizes are checked whole; checksums only of the files that
    rank share[0] of share[1] owns (ranks verify a checkpoint together; the default: all files)."""
    if not (tag_dir / MARKER).exists():
        return "no complete.json (the save was interrupted)"
    marker = read_marker(tag_dir)
    if marker is None:
        return "complete.json is unreadable (damaged?)"
    files = marker["files"]
    for name, entry in files.items():
        path = tag_dir / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != entry["size"]:
            return f"{name} has {path.stat().st_size} bytes, expected {entry['size']} (truncated?)"
    if not checksums_enabled():
        return None
    mine = [n for n, e in files.items() if e.get("sha256") and owner(n, share[1]) == share[0]]
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:  # hashlib releases the GIL
        sums = list(pool.map(lambda n: file_sha256(tag_dir / n), mine))
    for name, digest in zip(mine, sums):
        if digest != files[name]["sha256"]:
            return f"{name} does not match its sha256 in complete.json (damaged?)"
    return None


def latest_complete(ckpt_dir: Path, log=print) -> Path | None:
    """The newest intact checkpoint (one process); damaged or incomplete newer ones are reported and passed over."""
    for _, path in tags_by_step(ckpt_dir):
        reason = problem(path)
        if reason is None:
            return path
        log(f"checkpoint {path} is not usable: {reason}; falling back to the previous one")
    return None


def check_same_run(cfg: Config, checkpoint: Path) -> None:
    """Refuse a resume that changes what the checkpoint's run fixed at its start (config.RESUMABLE)."""
    saved = checkpoint.parent.parent / "config.yaml"  # RUN/checkpoints/TAG
    if not saved.is_file():
        return  # a checkpoint moved out of its run: loading it still checks every shape
    changed = resume_changes(load_config(str(saved)), cfg)
    if changed:
        raise UserError(f"resuming {checkpoint} would change what its run fixed at the start ({'; '.join(changed)}); "
                        "a resume may change only train.steps, the save/eval cadence, logging and the batch layout "
                        "(same global batch): start a new train.out_dir for another model")


class Checkpointer:
    """Used by every rank alike; rank 0 writes the markers and prunes (one writer for the run directory)."""

    def __init__(self, ckpt_dir: Path, every: int, keep_last: int, log=print):
        self.dir, self.every, self.keep_last, self.log = ckpt_dir, every, keep_last, log
        self.last_saved: Path | None = None

    def maybe_save(self, engine, state: TrainState, final: bool = False) -> None:
        if final or state.step % self.every == 0:
            self.save(engine, state)

    def save(self, engine, state: TrainState) -> Path:
        """Every rank. A write that fails on any rank (a full disk, a file-size limit, an unwritable directory)
        stops every rank with one line; the partial tag directory is removed, the earlier checkpoints stay."""
        tag = tag_for(state.step)
        if self.last_saved is not None and self.last_saved.name == tag:
            return self.last_saved
        started, path = time.perf_counter(), self.dir / tag
        try:
            with together():
                try:
                    engine.save(self.dir, tag, {"train_state": asdict(state)})
                except OSError:
                    barrier()  # the other ranks wait in the barrier that ends DeepSpeed's save
                    raise
            # every rank's shards are on disk now (together() synchronised): list and hash them
            names = from_rank0(lambda: sorted(str(p.relative_to(path)) for p in path.rglob("*") if p.is_file()))
            with together():
                mine = {n: {"size": (path / n).stat().st_size,
                            "sha256": file_sha256(path / n) if checksums_enabled() else None}
                        for n in names if owner(n, world_size()) == rank()}
            files = {n: e for part in all_gather(mine) for n, e in part.items()}
            with together():
                if rank() == 0:
                    write_json(path / MARKER, {"step": state.step, "train_state": asdict(state), "files": files})
        except SharedError as e:
            if rank() == 0:
                shutil.rmtree(path, ignore_errors=True)
            raise SharedError(f"saving the checkpoint of step {state.step} failed: {e}; the partial {path} was "
                              "removed (the earlier checkpoints are intact)") from None
        if rank() == 0:
            self._prune()
        barrier()
        self.last_saved = path
        self.log(f"saved {path} ({sum(e['size'] for e in files.values()) / 1e6:,.0f} MB) "
                 f"in {time.perf_counter() - started:.1f} s")
        return path

    def _prune(self) -> None:
        complete = [p for _, p in tags_by_step(self.dir) if (p / MARKER).exists()]
        for old in complete[self.keep_last:]:
            shutil.rmtree(old, ignore_errors=True)

    def _verify(self, tag_dir: Path) -> str | None:
        """Every rank checks the sizes and the checksums of its own shards; all get the first problem."""
        found = [p for p in all_gather(problem(tag_dir, (rank(), world_size()))) if p is not None]
        return found[0] if found else None

    def resolve(self, resume: str) -> Path | None:
        """--resume auto|none|PATH -> the checkpoint directory to load, or None to start fresh. Every rank
        gets the same answer (rank 0's listing, checks shared out)."""
        tags = from_rank0(lambda: tags_by_step(self.dir))
        if resume == "none":
            if tags:
                raise SharedError(f"{self.dir} already holds checkpoints; pass --resume auto to continue "
                                  "that run or choose another train.out_dir")
            return None
        if resume == "auto":
            for _, path in tags:
                reason = self._verify(path)
                if reason is None:
                    return path
                self.log(f"checkpoint {path} is not usable: {reason}; falling back to the previous one")
            if tags:
                raise SharedError(f"no usable checkpoint in {self.dir}: every tag there is incomplete or damaged")
            return None
        path = Path(resume)
        if not path.is_dir():
            raise SharedError(f"--resume {resume}: no such checkpoint directory")
        if not is_universal(path) and (reason := self._verify(path)) is not None:
            raise SharedError(f"--resume {resume}: checkpoint is not usable: {reason}")
        return path


def recorded_state(checkpoint: Path) -> TrainState | None:
    """The TrainState a tagged checkpoint recorded (None where complete.json holds none, as in a universal
    checkpoint: it is read when loaded)."""
    marker = read_marker(checkpoint)
    return TrainState.saved(marker["train_state"]) if marker and "train_state" in marker else None


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
