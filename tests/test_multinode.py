"""Training in several processes: 2-rank DeepSpeed runs, two "nodes" on this machine (two launchers
without ssh sharing one run directory), SLURM's per-node mode through local `srun`/`scontrol` shims,
mpirun, and the start-up checks every rank must agree on. All slow: each starts launchers and ranks."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import assert_converts_with_parity, run_cli, snapshot

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow

# The 2-rank reference: the GPU presets' engine (ZeRO-3, bf16) on the tiny model, checkpoints at steps 8 and 16.
SETTINGS = ["--set", "train.steps=16", "--set", "train.save_every=8", "--set", "train.eval_every=8",
            "--set", "train.precision=bf16", "--set", "topk.anneal_ratio=1.0",
            "--set", "train.ds_config=ds_configs/zero3_bf16.json"]

# srun as `srun --nodes=N ... CMD` would run it with one task per node, here all on this machine
SRUN = """#!/usr/bin/env bash
nodes=1
while [[ $1 == --* ]]; do [[ $1 == --nodes=* ]] && nodes=${1#--nodes=}; shift; done
pids=()
for ((i = 0; i < nodes; i++)); do SLURM_NODEID=$i SLURM_PROCID=$i SLURM_LOCALID=0 "$@" & pids+=($!); done
rc=0
for p in "${pids[@]}"; do wait "$p" || rc=$?; done
exit $rc
"""
SCONTROL = """#!/usr/bin/env bash
[[ "$1 $2" == "show hostnames" ]] && printf '127.0.0.1\\nlocalhost\\n'
"""


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def two_rank_run(synthetic_data, tmp_path_factory):
    run = tmp_path_factory.mktemp("two_ranks") / "run"
    proc = subprocess.run(["deepspeed", "--num_gpus", "2", "--master_port", "29633", "--module", "topk_ds.train",
                           "--config", "tiny", *SETTINGS, "--set", f"data.path={synthetic_data[1]}",
                           "--set", f"train.out_dir={run}"], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run


def test_two_ranks_zero3_bf16_then_universal_resume_on_one_rank(two_rank_run, synthetic_data, tmp_path):
    run = two_rank_run
    two = metrics(run)
    assert len(two) == 16 and two[-1]["loss"] < two[0]["loss"] - 0.5 and two[0]["tokens"] == 16 * 64
    assert len(list((run / "checkpoints/global_step8").glob("*zero_pp_rank_*_optim_states.pt"))) == 2
    assert_converts_with_parity(run / "checkpoints/global_step16", tmp_path / "hf")  # fp32 master weights

    resumed_run = tmp_path / "one_rank"
    shutil.copytree(run, resumed_run)
    shutil.rmtree(resumed_run / "checkpoints/global_step16")
    universal = resumed_run / "checkpoints/global_step8_universal"
    subprocess.run([sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder",
                    str(resumed_run / "checkpoints/global_step8"), "--output_folder", str(universal)], check=True,
                   capture_output=True, timeout=300)
    proc = run_cli("train", "--config", "tiny", *SETTINGS, "--set", f"data.path={synthetic_data[1]}",
                   "--set", f"train.out_dir={resumed_run}", "--set", "train.grad_accum=2", "--resume", universal,
                   check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one = metrics(resumed_run)
    assert [r["step"] for r in one] == list(range(1, 17))
    for a, b in zip(two[8:], one[8:]):  # same samples, same alpha; bf16 sums in another order
        assert a["alpha"] == b["alpha"] and a["tokens"] == b["tokens"]
        assert abs(a["loss"] - b["loss"]) < 0.02
    assert abs(two[8]["loss"] - one[8]["loss"]) < 2e-3


def test_a_zero_checkpoint_resumed_on_another_number_of_ranks_points_to_the_conversion(two_rank_run, synthetic_data,
                                                                                         tmp_path, train_here):
    """In this process, one rank (the global batch kept by grad_accum 2): one line naming both rank counts and
    DeepSpeed's universal conversion, and the run untouched."""
    run = tmp_path / "run"
    shutil.copytree(two_rank_run, run)
    before = snapshot(run)
    code, err = train_here("--config", "tiny", *SETTINGS, "--set", f"data.path={synthetic_data[1]}", "--set",
                           f"train.out_dir={run}", "--set", "train.grad_accum=2", "--resume", "auto")
    assert code == 2 and len(err) == 1, err
    assert (f"the checkpoint {run}/checkpoints/global_step16 was written by 2 data-parallel ranks and this run has 1"
            in err[0] and "python -m deepspeed.checkpoint.ds_to_universal --input_folder" in err[0]), err
    assert snapshot(run) == before


def test_two_nodes_preempted_then_resumed_through_slurm_per_node_equal_one_node(two_rank_run, synthetic_data,
                                                                                 tmp_path):
    """Two launchers (launchers/per_node.sh: deepspeed --hostfile --no_ssh --node_rank R), one rank each,
    one shared run directory; SIGUSR1 to both preempts them (each saves, the launchers do not SIGKILL);
    slurm.sbatch MODE=per-node resumes with --resume auto; every step equals the 2-rank single-node run."""
    run, data = tmp_path / "run", synthetic_data[1]
    trainer = [*SETTINGS, "--set", f"data.path={data}", "--set", f"train.out_dir={run}"]
    hostfile = tmp_path / "hosts"
    hostfile.write_text("localhost slots=1\n127.0.0.1 slots=1\n")
    env = {**os.environ, "HOSTFILE": str(hostfile), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29655",
           "CONFIG": "tiny", "RESUME": "none"}
    nodes = [subprocess.Popen(["bash", str(REPO / "launchers/per_node.sh"), *trainer], env={**env, "NODE_RANK": str(r)},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
             for r in (0, 1)]
    started = time.time()
    while not ((run / "metrics.jsonl").exists() and len(metrics(run)) >= 2):
        assert all(n.poll() is None for n in nodes), [n.communicate()[1][-2000:] for n in nodes]
        assert time.time() - started < 600, "timed out"
        time.sleep(0.1)
    for node in nodes:
        os.killpg(node.pid, signal.SIGUSR1)
    logs = [node.communicate(timeout=300) for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], [err[-2000:] for _, err in logs]
    stopped = metrics(run)[-1]["step"]
    assert 2 <= stopped < 16 and (run / f"checkpoints/global_step{stopped}/complete.json").exists()
    assert f"SIGUSR1: saved {run}/checkpoints/global_step{stopped}" in (run / "train.log").read_text()
    # under a launcher stderr is no terminal: plain progress lines, no carriage-return frames
    assert all("\r" not in out + err for out, err in logs)
    assert re.search(r"^train: \d+/16 step", logs[0][1], re.M)

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("srun", SRUN), ("scontrol", SCONTROL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    slurm = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "MODE": "per-node",
             "SLURM_JOB_NODELIST": "node[1-2]", "SLURM_NNODES": "2", "SLURM_JOB_ID": "7", "GPUS_PER_NODE": "1",
             "MASTER_PORT": "29656", "CONFIG": "tiny", "RESUME": "auto", "TMPDIR": str(tmp_path)}
    proc = subprocess.run(["bash", str(REPO / "launchers/slurm.sbatch"), *trainer], env=slurm, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"resumed from {run}/checkpoints/global_step{stopped}" in (run / "train.log").read_text()
    resumed, reference = metrics(run), metrics(two_rank_run)
    assert [r["step"] for r in resumed] == list(range(1, 17))
    fields = ("loss", "lr", "alpha", "grad_norm", "tokens", "val_loss")
    assert [[r.get(f) for f in fields] for r in resumed] == [[r.get(f) for f in fields] for r in reference]


def test_ranks_that_do_not_share_the_run_directory_stop_with_one_line(synthetic_data, tmp_path):
    """Two ranks started by hand in different working directories with a relative train.out_dir: as two
    nodes whose run directories are not one shared directory."""
    env = {**os.environ, "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29657"}
    procs = []
    for r in (0, 1):
        (tmp_path / f"node{r}").mkdir()
        procs.append(subprocess.Popen([sys.executable, "-m", "topk_ds.train", "--config", "tiny", "--set",
                                       f"data.path={synthetic_data[1]}", "--set", "train.out_dir=run"],
                                      cwd=tmp_path / f"node{r}", env={**env, "RANK": str(r)}, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    errors = [p.communicate(timeout=300)[1] for p in procs]
    assert [p.returncode for p in procs] == [2, 2]
    line = errors[0].strip().splitlines()
    assert len(line) == 1 and "rank 1 on" in line[0] and "does not see the run directory run that rank 0 writes" in line[0]
    assert errors[1].strip() == ""  # every rank stops; rank 0 says why
    assert not (tmp_path / "node0/run").exists() and not (tmp_path / "node1/run").exists()  # nothing half-made


def test_mpirun_launcher_two_ranks(synthetic_data, tmp_path):
    env = {**os.environ, "NP": "2", "MPIRUN_ARGS": "--allow-run-as-root --oversubscribe", "CONFIG": "tiny",
           "RESUME": "none", "MASTER_PORT": "29644", "PYTHON": sys.executable}
    proc = subprocess.run(["bash", str(REPO / "launchers/mpirun.sh"), "--set", f"data.path={synthetic_data[1]}",
                           "--set", f"train.out_dir={tmp_path}", "--set", "train.steps=6", "--set", "train.eval_every=3"],
                          capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = metrics(tmp_path)
    assert len(records) == 6 and records[-1]["tokens"] == 6 * 2 * 8 * 64  # two ranks x micro-batch 8
    assert "2 ranks" in (tmp_path / "train.log").read_text()
