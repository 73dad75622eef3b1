"""Where the post-training commands run (eval, analyze, steer, the SAE's): `--device` / `--dtype` resolved
once, one clear line for what this machine cannot do, the memory a command needs against what is free, and
what a pass will cost before it starts.

    device, dtype = resolve("auto", None)    # the first GPU in bf16 if there is one, else the CPU in fp32
    check_memory("analyze stats", {"model": ..., "statistics": ...}, device)
    print(cost_line("analyze stats", tokens, flops_per_token, device, dtype))

Under a multi-process launcher, "auto" and "cuda" mean the GPU of this process's LOCAL_RANK.
"""

import os

import torch

from .errors import UserError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
NAMES = {v: k for k, v in DTYPES.items()}
# Share of the device's peak a forward pass is assumed to reach in the cost line (the planner assumes 40 %
# MFU for training; inference batches of thousands of tokens do about as well). An estimate, said so.
ASSUMED_UTILISATION = 0.4
GIB = 2**30


def resolve(device="auto", dtype=None) -> tuple[torch.device, torch.dtype]:
    """(torch.device, torch.dtype) for --device auto|cpu|cuda|cuda:N (or a torch.device) and --dtype fp32|bf16
    (or a torch.dtype; None: bf16 on a GPU, fp32 on the CPU). A device or dtype that is not there: UserError."""
    name = str(device)
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            build = "a CPU-only build of torch" if torch.version.cuda is None else "no GPU is visible"
            raise UserError(f"--device {name}: CUDA is not available here ({build}); use --device cpu or auto")
        index = int(name.split(":")[1]) if ":" in name else int(os.environ.get("LOCAL_RANK", "0"))
        count = torch.cuda.device_count()
        if index >= count:
            visible = os.environ.get("CUDA_VISIBLE_DEVICES", "unset")
            raise UserError(f"--device cuda:{index}: only {count} GPU{'s' if count != 1 else ''} visible here "
                            f"(cuda:0..cuda:{count - 1}; CUDA_VISIBLE_DEVICES={visible})")
        resolved = torch.device("cuda", index)
    else:
        resolved = torch.device(name)
    if dtype is None:
        dtype = torch.bfloat16 if resolved.type == "cuda" else torch.float32
    elif not isinstance(dtype, torch.dtype):
        if dtype not in DTYPES:
            raise UserError(f"--dtype {dtype}: choose one of {', '.join(DTYPES)}")
        dtype = DTYPES[dtype]
    if dtype == torch.bfloat16 and resolved.type == "cuda" and torch.cuda.get_device_capability(resolved) < (8, 0):
        raise UserError(f"--dtype bf16: {torch.cuda.get_device_name(resolved)} ({resolved}) has no bfloat16 "
                        "arithmetic (it needs compute capability 8.0, Ampere or newer); use --dtype fp32")
    return resolved, dtype


def join_process_group(device: torch.device) -> int:
    """Under a multi-process launcher (deepspeed --num_gpus G --module ..., torchrun, mpirun, srun), join its
    process group for a data-parallel pass: nccl between GPUs, gloo between CPU processes. Returns the
    number of processes (1: none joined). Ranks come from topk_ds.train.distributed.discover_ranks."""
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
            dist.init_process_group("nccl", device_id=device)
        else:
            dist.init_process_group("gloo")
    return world


def available_memory(device: torch.device) -> int:
    """Bytes free for this process: the GPU's free memory, or the host's available memory shared by the
    processes of this node (LOCAL_WORLD_SIZE under torchrun, LOCAL_SIZE under deepspeed)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    import psutil

    local = int(os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("LOCAL_SIZE") or 1)
    return psutil.virtual_memory().available // local


def check_memory(what: str, needs: dict[str, int], device: torch.device, hint: str = "") -> str:
    """One line stating the memory `what` needs on `device` (by part) and what is free there; UserError
    (naming both) when the need exceeds it. Meta devices hold nothing."""
    total = sum(needs.values())
    parts = " + ".join(f"{name} {_gib(n)}" for name, n in needs.items() if n)
    where = "host memory" if device.type == "cpu" else str(device)
    if device.type not in ("cpu", "cuda"):
        return f"{what} needs {_gib(total)} ({parts})"
    free = available_memory(device)
    line = f"{what} needs {_gib(total)} of {where} ({parts}); {_gib(free)} available"
    if total > free:
        _agree(True)
        raise UserError(f"{line}: not enough{'; ' + hint if hint else ''}")
    if _agree(False):
        raise UserError(f"another process of this launch has not enough memory for {what} (see its message)")
    return line


def _agree(short: bool) -> bool:
    """In a process group, whether any process is short of memory: all of them stop together, none waits."""
    import torch.distributed as dist

    if not dist.is_initialized():
        return short
    from .train.distributed import any_rank

    nccl = dist.get_backend() == "nccl"
    return any_rank(short, torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu"))


def cost_line(what: str, tokens: int, flops_per_token: float, device: torch.device, dtype: torch.dtype,
              devices: int = 1) -> str:
    """What a pass over `tokens` tokens costs: tokens x FLOPs per token, and the time at ASSUMED_UTILISATION
    of the device's peak (a datasheet figure for GPUs in bf16, else a matmul measured here)."""
    from .train.monitor import peak_flops

    flops = tokens * flops_per_token
    if device.type not in ("cpu", "cuda"):
        return f"{what}: {tokens:,} tokens x {flops_per_token / 1e9:.3g} GFLOP = {flops:.3g} FLOP"
    peak, source = peak_flops(device, NAMES.get(dtype, "fp32"))
    seconds = flops / (peak * ASSUMED_UTILISATION * devices)
    on = f"{devices} x {device.type}" if devices > 1 else str(device)
    return (f"{what}: {tokens:,} tokens x {flops_per_token / 1e9:.3g} GFLOP = {flops:.3g} FLOP, about "
            f"{_duration(seconds)} on {on} at {ASSUMED_UTILISATION:.0%} of {peak / 1e12:.3g} TFLOP/s ({source}; an estimate)")


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.1f} s" if seconds < 10 else f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def free_device_memory(device: torch.device) -> None:
    """Hand cached blocks back after a model is dropped, so the next one (of several evaluated or traced in
    one process) finds the GPU as the first did."""
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _gib(n: int) -> str:
    return f"{n / 2**20:.0f} MiB" if n < GIB else f"{n / GIB:.1f} GiB"
