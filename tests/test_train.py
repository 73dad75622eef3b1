"""The DeepSpeed training system on CPU: real runs of the tiny model through the real launchers."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import RUN_SAVE_EVERY, RUN_STEPS, assert_converts_with_parity, run_cli, train_tiny

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = Path(__file__).parent / "scripts"


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def wait_for(predicate, proc, timeout=300):
    start = time.time()
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"process ended early ({proc.returncode}): {proc.stderr.read()[-2000:]}")
        if time.time() - start > timeout:
            raise AssertionError("timed out")
        time.sleep(0.1)


def start_training(data, out, *overrides) -> subprocess.Popen:
    args = ["train", "--config", "tiny", "--set", f"data.path={data}", "--set", f"train.out_dir={out}"]
    args += [a for o in overrides for a in ("--set", o)]
    return subprocess.Popen([sys.executable, "-m", "topk_ds.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def test_one_rank_run_learns_and_reports(tiny_run):
    records = metrics(tiny_run)
    assert [r["step"] for r in records] == list(range(1, RUN_STEPS + 1))
    first, last = sum(r["loss"] for r in records[:10]) / 10, sum(r["loss"] for r in records[-10:]) / 10
    assert last < first - 1.0
    val = [r["val_loss"] for r in records if "val_loss" in r]
    assert len(val) == 3 and val[0] > val[-1]
    # alpha: 1 at the first step, linear to 0 at 20 % of the steps, logged every step
    alphas = [r["alpha"] for r in records]
    assert alphas[0] == 1.0 and all(a == 0.0 for a in alphas[int(0.2 * RUN_STEPS):])
    assert all(b <= a for a, b in zip(alphas, alphas[1:]))
    # TopK health: L0 <= k on the two TopK layers once annealing is over, dead share at window ends
    k = 8
    assert all(0 < r["topk/l0/layer0"] <= k and 0 < r["topk/l0/layer1"] <= k for r in records[70:])
    assert "topk/l0/layer2" not in records[-1]
    assert 0.0 <= records[-1]["topk/dead/layer0"] <= 1.0
    assert all(r["tokens_per_s"] > 0 and r["mfu"] > 0 and r["lr"] >= 0 for r in records)
    ds = json.loads((tiny_run / "ds_config.json").read_text())
    assert ds["train_batch_size"] == 8 and ds["scheduler"]["type"] == "WarmupCosineLR"
    assert ds["optimizer"]["params"]["betas"] == [0.9, 0.95] and ds["gradient_clipping"] == 1.0
    tags = sorted(p.name for p in (tiny_run / "checkpoints").iterdir() if p.name.startswith("global_step"))
    assert tags == [f"global_step{s}" for s in range(RUN_SAVE_EVERY, RUN_STEPS + 1, RUN_SAVE_EVERY)]
    assert all((tiny_run / "checkpoints" / t / "complete.json").exists() for t in tags)


def test_kill9_then_resume_gives_the_same_losses(synthetic_data, tmp_path):
    data = synthetic_data[1]
    common = ("train.steps=24", "train.save_every=8", "train.eval_every=8", "topk.anneal_ratio=1.0")
    train_tiny(data, tmp_path / "straight", *common)
    proc = start_training(data, tmp_path / "killed", *common)
    marker = tmp_path / "killed/checkpoints/global_step16/complete.json"
    wait_for(marker.exists, proc)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    out = train_tiny(data, tmp_path / "killed", *common, resume="auto")
    assert "resumed from" in (tmp_path / "killed/train.log").read_text()
    straight, resumed = metrics(tmp_path / "straight"), metrics(tmp_path / "killed")
    assert [r["step"] for r in resumed] == list(range(1, 25))
    for a, b in zip(straight, resumed):  # bit for bit: same loss, alpha, lr and validation at every step
        assert (a["loss"], a["alpha"], a["lr"], a.get("val_loss")) == (b["loss"], b["alpha"], b["lr"], b.get("val_loss"))
    assert 0 < resumed[17]["alpha"] < 1  # the resume happened mid-annealing
    assert "wrote checkpoints to" in out.stdout


def test_sigterm_saves_a_checkpoint_and_exits_cleanly(synthetic_data, tmp_path):
    run = tmp_path / "run"
    proc = start_training(synthetic_data[1], run, "train.steps=100000", "train.save_every=100000", "train.eval_every=0")
    wait_for(lambda: (run / "metrics.jsonl").exists() and len(metrics(run)) >= 3, proc)
    os.killpg(proc.pid, signal.SIGTERM)
    assert proc.wait(timeout=120) == 0
    step = metrics(run)[-1]["step"]
    assert (run / f"checkpoints/global_step{step}/complete.json").exists()
    assert "SIGTERM: saved" in (run / "train.log").read_text()


def test_incomplete_latest_checkpoint_falls_back_to_the_previous(tiny_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run, ignore=shutil.ignore_patterns("hf"))
    latest = run / f"checkpoints/global_step{RUN_STEPS}"
    shard = next(latest.glob("*optim_states.pt"))
    with open(shard, "r+b") as f:
        f.truncate(shard.stat().st_size // 2)
    out = train_tiny(synthetic_data_dir(run), run, f"train.steps={RUN_STEPS}", f"train.save_every={RUN_SAVE_EVERY}",
                     "train.eval_every=100", resume="auto")
    assert f"checkpoint {latest} is not usable" in out.stdout and "truncated" in out.stdout
    assert "resumed from" in (run / "train.log").read_text() and "global_step200" in (run / "train.log").read_text()
    records = metrics(run)
    assert [r["step"] for r in records] == list(range(1, RUN_STEPS + 1))
    # the redone steps 201..300 reproduce the original run
    original = metrics(tiny_run)
    assert [r["loss"] for r in records[200:]] == [r["loss"] for r in original[200:]]


def synthetic_data_dir(run: Path) -> str:
    import yaml

    return yaml.safe_load((run / "config.yaml").read_text())["data"]["path"]


def test_nan_losses_are_skipped_and_a_streak_stops_the_run(synthetic_data, tmp_path):
    run = tmp_path / "run"
    proc = subprocess.run([sys.executable, str(SCRIPTS / "train_with_nan.py"), "5,12,13,14,15,16", "tiny",
                           "--set", f"data.path={synthetic_data[1]}", "--set", f"train.out_dir={run}",
                           "--set", "train.steps=40", "--set", "train.save_every=10", "--set", "train.eval_every=0",
                           "--set", "train.max_bad_steps=3"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (
        "topk-ds: error: 3 steps in a row had a non-finite loss or gradient (up to step 14); stopping. "
        f"Last good checkpoint: {run}/checkpoints/global_step10")
    records = {r["step"]: r for r in metrics(run)}
    assert records[5]["step_applied"] is False and records[5]["skipped_steps"] == 1
    assert records[6]["lr"] == records[5]["lr"]  # DeepSpeed skipped the update and the LR schedule step
    assert records[6]["step_applied"] is True and records[11]["skipped_steps"] == 1
    assert max(records) == 14 and records[14]["skipped_steps"] == 4


def test_batch_size_mismatch_and_engine_json_errors(synthetic_data, tmp_path):
    bad = tmp_path / "ds.json"
    bad.write_text(json.dumps({"train_batch_size": 999, "zero_optimization": {"stage": 2}}))
    proc = run_cli("train", "--config", "tiny", "--set", f"data.path={synthetic_data[1]}", "--set",
                   f"train.out_dir={tmp_path / 'run'}", "--set", f"train.ds_config={bad}", check=False)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
    assert "train_batch_size=999 disagrees with train.micro_batch=8 x train.grad_accum=1 x 1 ranks" in proc.stderr
    bad.write_text(json.dumps({"optimizer": {"type": "Adam"}}))
    proc = run_cli("train", "--config", "tiny", "--set", f"data.path={synthetic_data[1]}", "--set",
                   f"train.out_dir={tmp_path / 'run'}", "--set", f"train.ds_config={bad}", check=False)
    assert proc.returncode == 2 and "'optimizer' comes from our config" in proc.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.parametrize("overrides, message", [
    (["model.vocab_size=999"], "vocab"),
    (["data.path=/no/such/data"], "/no/such/data"),
])
def test_bad_data_or_vocabulary(synthetic_data, tmp_path, overrides, message):
    args = ["train", "--config", "tiny", "--set", f"data.path={synthetic_data[1]}", "--set", f"train.out_dir={tmp_path}"]
    proc = run_cli(*args, *[a for o in overrides for a in ("--set", o)], check=False)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1 and message in proc.stderr


def test_refuses_a_run_directory_with_checkpoints_without_resume(tiny_run):
    proc = run_cli("train", "--config", "tiny", "--set", f"train.out_dir={tiny_run}", "--set",
                   f"data.path={synthetic_data_dir(tiny_run)}", check=False)
    assert proc.returncode == 2 and "pass --resume auto" in proc.stderr


@pytest.mark.slow
def test_two_ranks_zero3_bf16_then_universal_resume_on_one_rank(synthetic_data, tmp_path):
    data, run = synthetic_data[1], tmp_path / "run"
    common = ["--config", "tiny", "--set", f"data.path={data}", "--set", "train.steps=16", "--set", "train.save_every=8",
              "--set", "train.eval_every=8", "--set", "train.precision=bf16", "--set", "topk.anneal_ratio=1.0",
              "--set", "train.ds_config=ds_configs/zero3_bf16.json"]
    proc = subprocess.run(["deepspeed", "--num_gpus", "2", "--master_port", "29633", "--module", "topk_ds.train",
                           *common, "--set", f"train.out_dir={run}"], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = metrics(run)
    assert len(two) == 16 and two[-1]["loss"] < two[0]["loss"] - 0.5 and two[0]["tokens"] == 16 * 64
    assert len(list((run / "checkpoints/global_step8").glob("*zero_pp_rank_*_optim_states.pt"))) == 2
    assert_converts_with_parity(run / "checkpoints/global_step16", tmp_path / "hf")  # fp32 master weights

    universal = run / "checkpoints/global_step8_universal"
    subprocess.run([sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder",
                    str(run / "checkpoints/global_step8"), "--output_folder", str(universal)], check=True,
                   capture_output=True, timeout=300)
    resumed_run = tmp_path / "one_rank"
    shutil.copytree(run, resumed_run)
    shutil.rmtree(resumed_run / "checkpoints/global_step16")
    proc = run_cli("train", *common, "--set", f"train.out_dir={resumed_run}", "--set", "train.grad_accum=2",
                   "--resume", str(resumed_run / "checkpoints/global_step8_universal"), check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one = metrics(resumed_run)
    assert [r["step"] for r in one] == list(range(1, 17))
    for a, b in zip(two[8:], one[8:]):  # same samples, same alpha; bf16 sums in another order
        assert a["alpha"] == b["alpha"] and a["tokens"] == b["tokens"]
        assert abs(a["loss"] - b["loss"]) < 0.02
    assert abs(two[8]["loss"] - one[8]["loss"]) < 2e-3


@pytest.mark.slow
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


def test_annealing_hook_follows_the_engine_step():
    from types import SimpleNamespace

    from topk_ds.model import ModelConfig, TopKConfig, Transformer
    from topk_ds.train.engine import AnnealingHook

    model = Transformer(ModelConfig(dim=32, n_layers=3, n_heads=2, ffn_dim=64, vocab_size=50), TopKConfig(k=4, n_nontopk=1))
    engine = SimpleNamespace(global_steps=0, module=model)
    model.register_forward_pre_hook(AnnealingHook(engine, total_steps=100, ratio=0.2, kind="linear"))
    seen = []
    for step in (0, 5, 10, 19, 20, 50):
        engine.global_steps = step
        model(torch.zeros(1, 4, dtype=torch.long))
        alphas = {m.alpha for m in model.topk_modules()}
        assert len(alphas) == 1  # every TopK layer shares the step's alpha
        seen.append(alphas.pop())
    assert seen == pytest.approx([1.0, 0.75, 0.5, 0.05, 0.0, 0.0])
