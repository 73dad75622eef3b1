"""Rank discovery, agreement between ranks and preemption, in plain torch.distributed (DeepSpeed is
confined to engine.py).

Launchers set ranks differently: the `deepspeed` launcher and torchrun set RANK/WORLD_SIZE/
LOCAL_RANK; OpenMPI, MPICH and SLURM set their own variables. We map those onto the first, so every
launcher reaches init the same way (and a single-node mpirun stays on the loopback address); with
no launcher at all the process is rank 0 of 1.
"""

import contextlib
import os
import signal
import socket

import torch
import torch.distributed as dist

from ..errors import UserError, describe_os_error

_SOURCES = (
    ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK"),  # OpenMPI
    ("PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID"),  # MPICH, Intel MPI
    ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID"),  # srun, one task per GPU
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def discover_ranks() -> None:
    """Fill RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT when the launcher did not."""
    env = os.environ
    if "RANK" not in env:
        for rank, size, local in _SOURCES:
            if rank in env:
                env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"] = env[rank], env[size], env.get(local, "0")
                break
        else:
            env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"] = "0", "1", "0"
            env.setdefault("MASTER_PORT", str(free_port()))
    env.setdefault("MASTER_ADDR", "127.0.0.1")
    env.setdefault("MASTER_PORT", "29500")


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def data_parallel(sequence_parallel: int) -> tuple[int, int]:
    """(this rank's data-parallel index, data-parallel ranks), from the launcher's variables (discover_ranks),
    so a bad degree is refused before any process group exists. The N ranks of a sequence-parallel group are
    consecutive, as DeepSpeed groups them, and share one index, so the sampler hands them the same sequences."""
    world, rank_ = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    if world % sequence_parallel:
        raise UserError(f"train.sequence_parallel={sequence_parallel} does not divide the {world} ranks; launch a "
                        f"multiple of {sequence_parallel} ranks or choose a divisor of {world}")
    return rank_ // sequence_parallel, world // sequence_parallel


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


_host_group = None


def close_process_group() -> None:
    """Destroy the process group and forget the groups made in it."""
    global _host_group
    if dist.is_initialized():
        dist.destroy_process_group()
    _host_group = None


def host_group():
    """A gloo group for small Python objects: the default NCCL group would need every rank's device
    set, which DeepSpeed does only once the engine is built (after the start-up checks)."""
    global _host_group
    if dist.get_backend() == "gloo":
        return None  # the default group
    if _host_group is None:
        _host_group = dist.new_group(backend="gloo")
    return _host_group


def all_gather(obj) -> list:
    """Every rank's `obj` (picklable), in rank order, on every rank."""
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj, group=host_group())
    return out


def from_rank0(make):
    """make() as rank 0 computes it, on every rank (the others do not call it)."""
    return all_gather(make() if rank() == 0 else None)[0]


class SharedError(UserError):
    """An error every rank raises alike (see `agree`): only rank 0 prints it."""


def agree(problem: str | None) -> None:
    """If any rank has a problem, every rank raises the lowest rank's (so all stop together)."""
    found = [p for p in all_gather(problem) if p is not None]
    if found:
        raise SharedError(found[0])


@contextlib.contextmanager
def together():
    """A block every rank runs, with no collective inside: a UserError or OSError on any rank is raised
    on every rank when the block ends, so no rank is left waiting for one that stopped."""
    problem = None
    try:
        yield
    except (UserError, OSError) as e:
        problem = str(e) if isinstance(e, UserError) else describe_os_error(e)
        if rank() != 0:
            problem = f"rank {rank()} on {socket.gethostname()}: {problem}"
    agree(problem)


def any_rank(flag: bool, device) -> bool:
    """True if `flag` is true on any rank (every rank gets the same answer)."""
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def mean_over_ranks(values: torch.Tensor) -> torch.Tensor:
    values = values.clone()
    if dist.is_initialized():
        dist.all_reduce(values)
        values /= dist.get_world_size()
    return values


SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)


class Preemption:
    """SIGTERM, SIGINT and SIGUSR1 set a flag instead of killing the process; the loop checks it at the
    end of every optimizer step (agreeing across ranks), saves a checkpoint and exits cleanly.

    SIGUSR1 is for launchers that kill their ranks soon after forwarding SIGTERM (the `deepspeed`
    launcher: 30 s): started with SIGUSR1 ignored (launchers/*.sh), they let it reach the ranks alone."""

    def __init__(self):
        self.requested = None

    def __enter__(self):
        self._previous = {s: signal.signal(s, self._handle) for s in SIGNALS}
        return self

    def _handle(self, signum, frame):
        self.requested = signal.Signals(signum).name

    def __exit__(self, *exc):
        for s, handler in self._previous.items():
            signal.signal(s, handler)
