"""Launcher templates: syntax, knobs from the environment, and the exact command each would run.
(The deepspeed and mpirun paths also run for real in test_train.py.)"""

import os
import subprocess
from pathlib import Path

import pytest

LAUNCHERS = Path(__file__).resolve().parents[1] / "launchers"


def dry_run(script, *args, **env):
    proc = subprocess.run(["bash", str(LAUNCHERS / script), *args], capture_output=True, text=True,
                          env={"PATH": os.environ["PATH"], "DRY_RUN": "1", **env})
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip().splitlines()


@pytest.mark.parametrize("script", ["single_node.sh", "multi_node.sh", "slurm.sbatch", "mpirun.sh", "sweep.sh"])
def test_syntax_and_documented_knobs(script):
    subprocess.run(["bash", "-n", str(LAUNCHERS / script)], check=True)
    text = (LAUNCHERS / script).read_text()
    assert "Knobs (environment variables" in text and "DRY_RUN" in text


def test_single_node():
    assert dry_run("single_node.sh", "--set", "data.path=/d") == [
        "deepspeed --num_gpus 8 --master_port 29500 --module topk_ds.train --config paper-1024x8 --resume auto --set data.path=/d"]
    assert dry_run("single_node.sh", NUM_GPUS="2", CONFIG="tiny", RESUME="none") == [
        "deepspeed --num_gpus 2 --master_port 29500 --module topk_ds.train --config tiny --resume none"]


def test_multi_node_reads_the_master_from_the_hostfile(tmp_path):
    hostfile = tmp_path / "hosts"
    hostfile.write_text("# nodes\nnode-a slots=8\nnode-b slots=8\n")
    assert dry_run("multi_node.sh", "--set", "train.steps=10", HOSTFILE=str(hostfile)) == [
        f"deepspeed --hostfile {hostfile} --launcher pdsh --master_addr node-a --master_port 29500 "
        "--module topk_ds.train --config paper-2048x24 --resume auto --set train.steps=10"]
    proc = subprocess.run(["bash", str(LAUNCHERS / "multi_node.sh")], capture_output=True, text=True,
                          env={"PATH": os.environ["PATH"], "HOSTFILE": str(tmp_path / "none")})
    assert proc.returncode == 2 and "no hostfile" in proc.stderr


def test_slurm_per_gpu_and_per_node():
    env = {"SLURM_JOB_NODELIST": "gpu[01-02]", "SLURM_NNODES": "2", "MASTER_ADDR": "gpu01"}
    assert dry_run("slurm.sbatch", "--set", "data.path=/d", **env) == [
        "srun --kill-on-bad-exit=1 python -m topk_ds.train --config paper-2048x24 --resume auto --set data.path=/d"]
    assert dry_run("slurm.sbatch", "--set", "data.path=/d", MODE="per-node", **env) == [
        "srun --ntasks-per-node=1 bash -c deepspeed --no_ssh --node_rank $SLURM_NODEID --num_nodes 2 --num_gpus 8 "
        "--master_addr gpu01 --master_port 29500 --module topk_ds.train --config paper-2048x24 --resume auto "
        "--set data.path=/d"]
    text = (LAUNCHERS / "slurm.sbatch").read_text()
    assert "#SBATCH --signal=TERM@" in text  # ranks get SIGTERM before the time limit and checkpoint


def test_slurm_rank_discovery_maps_slurm_variables(monkeypatch):
    from topk_ds.train.distributed import discover_ranks

    # a private environment: discover_ranks writes RANK, WORLD_SIZE, ... which must not leak into later tests
    launcher = {"SLURM_PROCID": "11", "SLURM_NTASKS": "16", "SLURM_LOCALID": "3", "MASTER_ADDR": "gpu01"}
    monkeypatch.setattr(os, "environ", {k: v for k, v in os.environ.items() if not k.endswith(("RANK", "WORLD_SIZE",
                                        "MASTER_PORT")) and not k.startswith(("OMPI_", "PMI_", "SLURM_"))} | launcher)
    discover_ranks()
    assert (os.environ["RANK"], os.environ["WORLD_SIZE"], os.environ["LOCAL_RANK"], os.environ["MASTER_ADDR"]) == (
        "11", "16", "3", "gpu01")


def test_mpirun():
    assert dry_run("mpirun.sh", NP="16", HOSTS="n1:8,n2:8", MASTER_ADDR="n1", MPIRUN_ARGS="--bind-to none") == [
        "mpirun -np 16 -H n1:8,n2:8 --bind-to none -x MASTER_ADDR=n1 -x MASTER_PORT=29500 -x PATH "
        "python -m topk_ds.train --config paper-1024x8 --resume auto"]


@pytest.mark.parametrize("grid, values, field", [
    ("k", ["8", "16", "32", "64", "128", "256", "512"], "topk.k"),
    ("nontopk", ["0", "1", "2"], "topk.n_nontopk"),
    ("dim", ["1024", "2048", "3072", "4096", "8192"], "model.dim"),
])
def test_sweep_grids_one_run_directory_each(grid, values, field):
    lines = dry_run("sweep.sh", "--set", "data.path=/d", GRID=grid)
    assert len(lines) == len(values)
    for line, value in zip(lines, values):
        assert f"--set {field}={value} --set train.out_dir=runs/sweep/{grid}-{value}" in line
        assert line.startswith("deepspeed --num_gpus 8") and line.endswith("--set data.path=/d")
        assert ("train.activation_checkpointing=true" in line) == (grid == "dim" and int(value) >= 4096)
