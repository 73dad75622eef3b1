"""What a run reports: one JSON object per optimizer step in metrics.jsonl, the same figures as
DeepSpeed monitor events (tensorboard / wandb / csv), a rank-0 progress bar, a log file, and the
health of every TopK layer (mean L0 per token, share of neurons that never fired in a window)."""

import json
import math
import time
from pathlib import Path

import torch

from ..progress import progress
from .health import TopKHealth

# Dense bf16 peak of one GPU (FLOP/s), by a substring of torch.cuda.get_device_name().
GPU_PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12}


def measured_peak(device: torch.device, dtype: torch.dtype, n: int = 1024, repeats: int = 5) -> float:
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    a @ b  # warm up
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return 2 * n**3 * repeats / (time.perf_counter() - start)


def peak_flops(device: torch.device, precision: str) -> tuple[float, str]:
    """FLOP/s one device can reach, and where the figure comes from."""
    if device.type == "cuda" and precision == "bf16":
        name = torch.cuda.get_device_name(device)
        for key, peak in GPU_PEAK_BF16.items():
            if key in name:
                return peak, f"{key} datasheet, dense bf16"
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    return measured_peak(device, dtype), f"measured {precision} matmul on {device.type}"


def truncate_metrics(path: Path, step: int) -> None:
    """Drop records after `step` (written by a run that died after its last checkpoint)."""
    if not path.exists():
        return
    kept = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    tmp.replace(path)


class Monitor:
    def __init__(self, run_dir: Path, model, write_events, *, total_steps: int, start_step: int,
                 global_batch: int, seq_len: int, flops_per_token: float, peak: tuple[float, str], world: int,
                 health_window: int, log_every: int, is_rank0: bool):
        self.write_events, self.is_rank0 = write_events, is_rank0
        self.global_batch, self.tokens_per_step = global_batch, global_batch * seq_len
        self.flops_per_token = flops_per_token
        self.peak, self.world = peak, world
        self.health = TopKHealth(model, health_window)
        self.metrics = open(run_dir / "metrics.jsonl", "a") if is_rank0 else None
        self.logfile = open(run_dir / "train.log", "a") if is_rank0 else None
        self.bar = progress(total=total_steps, initial=start_step, desc="train", unit="step", every=log_every,
                            enabled=is_rank0)
        self.log(f"MFU relative to {peak[0] / 1e12:.3g} TFLOP/s per device ({peak[1]})")

    def log(self, message: str) -> None:
        if self.is_rank0:
            self.bar.write(message)
            self.logfile.write(time.strftime("%Y-%m-%d %H:%M:%S ") + message + "\n")
            self.logfile.flush()

    def step(self, step: int, loss: float, *, step_time: float, lr: float, alpha: float, grad_norm,
             applied: bool, skipped_total: int, tokens: int, extra: dict | None = None) -> dict:
        tokens_per_s = self.tokens_per_step / step_time
        record = {"step": step, "loss": loss, "lr": lr, "alpha": alpha,
                  "grad_norm": None if grad_norm is None or not math.isfinite(grad_norm) else float(grad_norm),
                  "tokens": tokens, "tokens_per_s": tokens_per_s,
                  "mfu": self.flops_per_token * tokens_per_s / (self.peak[0] * self.world),
                  "step_applied": applied, "skipped_steps": skipped_total}
        record |= self.health.collect(step) | (extra or {})
        if self.is_rank0:
            self.metrics.write(json.dumps(record) + "\n")
            self.metrics.flush()
            # indexed by samples seen, like DeepSpeed's own events (wandb needs one monotonic x-axis)
            samples = step * self.global_batch
            self.write_events([(f"train/{k}", float(v), samples) for k, v in record.items()
                               if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)])
            self.bar.set_postfix(loss=f"{loss:.3f}", alpha=f"{alpha:.2f}", tok_s=f"{tokens_per_s:,.0f}",
                                 mfu=f"{record['mfu']:.1%}", refresh=False)
            self.bar.update(1)
        return record

    def close(self) -> None:
        self.bar.close()
        for f in (self.metrics, self.logfile):
            if f is not None:
                f.close()
