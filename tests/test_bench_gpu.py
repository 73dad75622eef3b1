"""The GPU benchmark's CPU-runnable parts: `bench/bench_gpu.py --dry-run` runs every part but CUDA at
tiny sizes, and `bench/gpu_setup.sh` picks a CUDA build of torch that the driver supports."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_dry_run_exercises_every_part(synthetic_data, tmp_path):
    out = tmp_path / "results-gpu.md"
    proc = subprocess.run([sys.executable, "bench/bench_gpu.py", "--dry-run", "--out", str(out), "--data",
                           str(synthetic_data[1])], cwd=REPO, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    text = out.read_text()
    assert "not a GPU measurement" in text and "FAILED" not in text
    for section in ("## correctness", "## TopK op", "## model vs transformers", "## engine", "## analysis and evaluation"):
        assert section in text
    correctness = text.split("## correctness")[1].split("\n## ")[0]
    assert correctness.count("| yes |") == 3 and "| NO |" not in correctness
    assert "killed after step 3 and resumed: steps 4-6 equal the uninterrupted run's | yes" in correctness
    for run in ("ZeRO-1", "ZeRO-2", "ZeRO-3", "ZeRO-3, compiled blocks", "ZeRO-3, zero3_2048x24.json"):
        assert f"| TopK step, {run}, D=64" in text and f"| MFU of the TopK step, {run} |" in text


def setup(tmp_path, cuda: str | None, *args):
    """bench/gpu_setup.sh with DRY_RUN=1 and a stand-in nvidia-smi reporting `cuda` (None: no driver)."""
    shim = tmp_path / "bin"
    shim.mkdir(exist_ok=True)
    if cuda:
        (shim / "nvidia-smi").write_text(f"#!/bin/sh\necho '| NVIDIA-SMI 570.86  Driver Version: 570.86  CUDA Version: {cuda}  |'\n")
        (shim / "nvidia-smi").chmod(0o755)
    path = f"{shim}:/usr/bin:/bin"
    return subprocess.run(["bash", str(REPO / "bench/gpu_setup.sh"), *args], capture_output=True, text=True,
                          env={**os.environ, "PATH": path, "DRY_RUN": "1"}, timeout=60)


def test_setup_tries_only_cuda_builds_the_driver_supports(tmp_path):
    proc = setup(tmp_path, "12.8", "bench/bench_gpu.py")
    assert proc.returncode == 0, proc.stderr
    assert "driver supports CUDA 12.8; CUDA builds to try after PyPI's: cu128 cu126 cu124" in proc.stdout
    assert "whl/{cu128,cu126,cu124}" in proc.stdout and "run bench/bench_gpu.py" in proc.stdout
    assert "to try after PyPI's: cu130 cu129 cu128 cu126 cu124\n" in setup(tmp_path, "13.0").stdout


def test_setup_without_a_driver_is_one_line(tmp_path):
    proc = setup(tmp_path, None)
    assert proc.returncode == 1 and len(proc.stderr.strip().splitlines()) == 1
    assert "no nvidia-smi" in proc.stderr and "--dry-run" in proc.stderr
