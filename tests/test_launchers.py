"""Launcher templates: syntax, knobs from the environment, the exact command each would run, and
bad hostfiles and node ranks as one line. (They run for real in test_multinode.py.)"""

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


def dry_run_fails(script, *args, **env):
    proc = subprocess.run(["bash", str(LAUNCHERS / script), *args], capture_output=True, text=True,
                          env={"PATH": os.environ["PATH"], "DRY_RUN": "1", **env})
    assert proc.returncode == 2 and not proc.stdout
    return proc.stderr.strip().splitlines()


@pytest.mark.parametrize("script", ["single_node.sh", "multi_node.sh", "per_node.sh", "slurm.sbatch", "mpirun.sh",
                                    "sweep.sh"])
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
    assert dry_run_fails("multi_node.sh", HOSTFILE=str(tmp_path / "none")) == [
        f"multi_node.sh: no hostfile at {tmp_path / 'none'} (see launchers/hostfile.example)"]


@pytest.mark.parametrize("text, problem", [
    ("node-a slots=8\nnode-b 8\n", 'line 2 "node-b 8" is not HOST slots=N (N >= 1)'),
    ("node-a slots=0\n", 'line 1 "node-a slots=0" is not HOST slots=N (N >= 1)'),
    ("node-a slots=8\n\nnode-a slots=8\n", "line 3 lists host node-a a second time"),
    ("# no nodes yet\n", "lists no host"),
])
def test_a_hostfile_that_does_not_parse_is_one_line(tmp_path, text, problem):
    hostfile = tmp_path / "hosts"
    hostfile.write_text(text)
    for script, env in (("multi_node.sh", {}), ("per_node.sh", {"NODE_RANK": "0"}), ("mpirun.sh", {})):
        assert dry_run_fails(script, HOSTFILE=str(hostfile), **env) == [f"{script}: hostfile {hostfile}: {problem}"]


def test_per_node_starts_this_nodes_launcher_without_ssh(tmp_path):
    hostfile = tmp_path / "hosts"
    hostfile.write_text("node-a slots=8\nnode-b slots=8  # second rack\n")
    assert dry_run("per_node.sh", "--set", "train.steps=10", HOSTFILE=str(hostfile), NODE_RANK="1") == [
        f"deepspeed --hostfile {hostfile} --no_ssh --node_rank 1 --master_addr node-a --master_port 29500 "
        "--module topk_ds.train --config paper-2048x24 --resume auto --set train.steps=10"]
    for rank in ("2", "-1", "one", ""):
        assert dry_run_fails("per_node.sh", HOSTFILE=str(hostfile), NODE_RANK=rank) == [
            f"per_node.sh: NODE_RANK='{rank}' must be 0 ... 1: the line of this node in {hostfile}"]
    text = (LAUNCHERS / "per_node.sh").read_text()
    assert "trap '' USR1; exec" in text and "trap '' USR1; exec" in (LAUNCHERS / "single_node.sh").read_text()


def test_slurm_per_gpu_and_per_node():
    env = {"SLURM_JOB_NODELIST": "gpu[01-02]", "SLURM_NNODES": "2", "MASTER_ADDR": "gpu01"}
    assert dry_run("slurm.sbatch", "--set", "data.path=/d", **env) == [
        "srun --kill-on-bad-exit=1 python -m topk_ds.train --config paper-2048x24 --resume auto --set data.path=/d"]
    per_node = dry_run("slurm.sbatch", "--set", "data.path=/d d", MODE="per-node", **env)
    # one task per node, the trainer arguments after the script (never inside its text)
    assert per_node[0].startswith("srun --nodes=2 --ntasks=2 --ntasks-per-node=1 ")
    assert per_node[-1].endswith('"$@" per-node --set data.path=/d d')
    text = (LAUNCHERS / "slurm.sbatch").read_text()
    assert "#SBATCH --signal=USR1@" in text  # ranks are asked to checkpoint before the time limit


def test_slurm_rank_discovery_maps_slurm_variables(monkeypatch):
    from topk_ds.train.distributed import discover_ranks

    # a private environment: discover_ranks writes RANK, WORLD_SIZE, ... which must not leak into later tests
    launcher = {"SLURM_PROCID": "11", "SLURM_NTASKS": "16", "SLURM_LOCALID": "3", "MASTER_ADDR": "gpu01"}
    monkeypatch.setattr(os, "environ", {k: v for k, v in os.environ.items() if not k.endswith(("RANK", "WORLD_SIZE",
                                        "MASTER_PORT")) and not k.startswith(("OMPI_", "PMI_", "SLURM_"))} | launcher)
    discover_ranks()
    assert (os.environ["RANK"], os.environ["WORLD_SIZE"], os.environ["LOCAL_RANK"], os.environ["MASTER_ADDR"]) == (
        "11", "16", "3", "gpu01")


def test_mpirun_master_and_forwarded_variables(tmp_path):
    assert dry_run("mpirun.sh", NP="16", HOSTS="n1:8,n2:8", MPIRUN_ARGS="--bind-to none", NCCL_IB_HCA="mlx5",
                   NCCL_SOCKET_IFNAME="ib0", EXPORT="WANDB_MODE") == [
        "mpirun -np 16 -H n1:8,n2:8 --bind-to none -x MASTER_ADDR=n1 -x MASTER_PORT=29500 -x PATH "
        "-x NCCL_IB_HCA -x NCCL_SOCKET_IFNAME -x WANDB_MODE python -m topk_ds.train --config paper-1024x8 --resume auto"]
    hostfile = tmp_path / "hosts"
    hostfile.write_text("n3 slots=8\nn4 slots=8\n")
    assert dry_run("mpirun.sh", NP="16", HOSTFILE=str(hostfile)) == [
        f"mpirun -np 16 --hostfile {hostfile} -x MASTER_ADDR=n3 -x MASTER_PORT=29500 -x PATH "
        "python -m topk_ds.train --config paper-1024x8 --resume auto"]
    assert dry_run("mpirun.sh", NP="2")[0].startswith("mpirun -np 2 -x MASTER_ADDR=127.0.0.1 ")  # this node alone


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
