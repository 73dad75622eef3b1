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

from conftest import RUN_SAVE_EVERY, RUN_STEPS, run_cli, snapshot, train_tiny

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
    # warmup from the first step: step s of the W warmup steps runs at s/W of the peak (no update at lr 0)
    warmup = round(0.05 * RUN_STEPS)
    assert [r["lr"] for r in records[:3]] == pytest.approx([3e-3 * s / warmup for s in (1, 2, 3)])
    tags = sorted(p.name for p in (tiny_run / "checkpoints").iterdir() if p.name.startswith("global_step"))
    assert tags == [f"global_step{s}" for s in range(RUN_SAVE_EVERY, RUN_STEPS + 1, RUN_SAVE_EVERY)]
    marker = json.loads((tiny_run / f"checkpoints/global_step{RUN_STEPS}/complete.json").read_text())
    assert marker["train_state"]["step"] == RUN_STEPS and marker["train_state"]["global_batch"] == 8
    assert set(marker["files"]) == {"mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt"}
    assert all(len(e["sha256"]) == 64 for e in marker["files"].values())
    assert f"saved {tiny_run}/checkpoints/global_step{RUN_STEPS} (" in (tiny_run / "train.log").read_text()


def test_kill9_then_resume_gives_the_same_losses(synthetic_data, tmp_path):
    data = synthetic_data[1]
    common = ("train.steps=24", "train.save_every=8", "train.eval_every=8", "topk.anneal_ratio=1.0")
    train_tiny(data, tmp_path / "straight", *common)
    proc = start_training(data, tmp_path / "killed", *common)
    marker = tmp_path / "killed/checkpoints/global_step16/complete.json"
    wait_for(marker.exists, proc)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert json.loads((tmp_path / "killed/.lock").read_text())["pid"] == proc.pid  # the dead run's lock: taken over
    with open(tmp_path / "killed/metrics.jsonl", "a") as f:
        f.write('{"step": 99, "loss": 3.')  # what kill -9 in the middle of a write leaves
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


def damage(path: Path) -> None:
    """Zeros in the middle of a file, its size unchanged (what a bad disk or a bad copy leaves)."""
    with open(path, "r+b") as f:
        f.seek(path.stat().st_size // 2)
        f.write(bytes(4096))


def test_damaged_latest_checkpoint_falls_back_to_the_previous(tiny_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run, ignore=shutil.ignore_patterns("hf"))
    latest = run / f"checkpoints/global_step{RUN_STEPS}"
    damage(latest / "mp_rank_00_model_states.pt")
    out = train_tiny(synthetic_data_dir(run), run, f"train.steps={RUN_STEPS}", f"train.save_every={RUN_SAVE_EVERY}",
                     "train.eval_every=100", resume="auto")
    assert (f"checkpoint {latest} is not usable: mp_rank_00_model_states.pt does not match its sha256" in out.stdout)
    assert "resumed from" in (run / "train.log").read_text() and "global_step200" in (run / "train.log").read_text()
    records = metrics(run)
    assert [r["step"] for r in records] == list(range(1, RUN_STEPS + 1))
    # the redone steps 201..300 reproduce the original run
    original = metrics(tiny_run)
    assert [r["loss"] for r in records[200:]] == [r["loss"] for r in original[200:]]


def test_convert_and_trace_pass_over_damaged_checkpoints_and_say_which(tiny_run, tmp_path, capsys, monkeypatch):
    from topk_ds.cli import main
    from topk_ds.convert.hf_export import run_checkpoints
    from topk_ds.train.checkpoint import problem

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run, ignore=shutil.ignore_patterns("hf", "metrics.jsonl", "train.log"))
    damage(run / "checkpoints/global_step300/zero_pp_rank_0_mp_rank_00_optim_states.pt")
    shard = run / "checkpoints/global_step200/mp_rank_00_model_states.pt"
    os.truncate(shard, shard.stat().st_size - 1)
    main(["convert", str(run), str(tmp_path / "hf")])
    err = capsys.readouterr().err
    assert f"checkpoint {run}/checkpoints/global_step300 is not usable: zero_pp_rank_0" in err and "sha256" in err
    assert f"checkpoint {run}/checkpoints/global_step200 is not usable: mp_rank_00" in err and "truncated" in err
    assert json.loads((tmp_path / "hf/config.json").read_text())["train_step"] == 100
    with pytest.raises(SystemExit) as e:
        main(["convert", str(run), str(tmp_path / "hf300"), "--tag", "global_step300"])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and "does not match its sha256" in err[0]
    assert not (tmp_path / "hf300").exists()
    assert [step for step, _ in run_checkpoints(run)] == [100]  # what `analyze trace` reads
    assert capsys.readouterr().err.count("left out") == 2
    monkeypatch.setenv("TOPK_DS_SKIP_CHECKSUMS", "1")  # sizes only, for checkpoints too large to read twice
    assert problem(run / "checkpoints/global_step300") is None


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


@pytest.mark.parametrize("change, expected", [
    (["--config", "tiny-dense"], "(topk.enabled: True -> False)"),
    (["--config", "tiny", "--set", "topk.k=2"], "(topk.k: 8 -> 2)"),
    (["--config", "tiny", "--set", "model.dim=128", "--set", "train.lr=0.001"],
     "(model.dim: 64 -> 128; train.lr: 0.003 -> 0.001)"),
    (["--config", "tiny", "--set", "train.micro_batch=4"], "global batch of 8 sequences, this run has 4"),
])
def test_a_resume_that_changes_the_run_is_refused_and_writes_nothing(tiny_run, tmp_path, train_here, change, expected):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run, ignore=shutil.ignore_patterns("hf"))
    before = snapshot(run)
    code, err = train_here(*change, "--set", f"data.path={synthetic_data_dir(run)}", "--set", f"train.out_dir={run}",
                           "--set", f"train.steps={RUN_STEPS}", "--resume", "auto")
    assert code == 2 and len(err) == 1 and expected in err[0], err
    assert snapshot(run) == before


def test_resume_from_a_checkpoint_of_another_shape_is_one_line_and_makes_no_run_directory(tiny_run, tmp_path,
                                                                                          train_here):
    common = ["--config", "tiny", "--set", "model.dim=128", "--set", f"data.path={synthetic_data_dir(tiny_run)}"]
    new = tmp_path / "new"
    code, err = train_here(*common, "--set", f"train.out_dir={new}", "--resume", tiny_run / "checkpoints/global_step100")
    assert code == 2 and len(err) == 1 and "model.dim: 64 -> 128" in err[0] and not new.exists()
    moved = tmp_path / "moved/global_step100"  # no config.yaml beside it: the shapes themselves are compared
    shutil.copytree(tiny_run / "checkpoints/global_step100", moved)
    code, err = train_here(*common, "--set", f"train.out_dir={new}", "--resume", moved)
    assert code == 2 and len(err) == 1 and f"the checkpoint {moved} does not fit this model (size mismatch" in err[0]
    assert not new.exists()


def test_a_second_start_cannot_join_a_live_run(tiny_run, tmp_path, train_here):
    import fcntl

    run, fresh = tmp_path / "run", tmp_path / "fresh"
    shutil.copytree(tiny_run, run, ignore=shutil.ignore_patterns("hf"))
    fresh.mkdir()
    common = ["--config", "tiny", "--set", f"data.path={synthetic_data_dir(run)}", "--set", f"train.steps={RUN_STEPS}"]
    for directory, resume in ((run, "auto"), (fresh, "none")):  # a live run, with checkpoints or not yet any
        held = open(directory / ".lock", "w")
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        held.write(json.dumps({"host": "node-7", "pid": 4242, "since": "2026-12-03 10:00:00", "nonce": "x"}))
        held.flush()
        before = snapshot(directory)
        code, err = train_here(*common, "--set", f"train.out_dir={directory}", "--resume", resume)
        held.close()
        assert code == 2 and len(err) == 1, err
        assert f"{directory} is in use by a live run (pid 4242 on node-7 since 2026-12-03 10:00:00)" in err[0]
        assert snapshot(directory) == before


def test_truncating_metrics_drops_a_torn_last_line_only(tmp_path):
    from topk_ds.errors import UserError
    from topk_ds.train.monitor import truncate_metrics

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": 2}\n{"step": 3}\n{"step": 4, "lo')
    truncate_metrics(path, 2)
    assert path.read_text() == '{"step": 1}\n{"step": 2}\n'
    path.write_text('{"step": 1}\n{"st\n{"step": 3}\n')
    with pytest.raises(UserError, match="line 2 is not JSON"):
        truncate_metrics(path, 3)


def test_a_dense_model_reports_no_alpha_in_plain_lines(tmp_path, capsys):
    """Also the log of a run whose stderr is no terminal (a SLURM .out, nohup): whole lines, no carriage return."""
    from topk_ds.model import ModelConfig, TopKConfig, Transformer
    from topk_ds.train.monitor import Monitor

    events = []
    model = Transformer(ModelConfig(dim=32, n_layers=2, n_heads=2, ffn_dim=64, vocab_size=50), TopKConfig(enabled=False))
    monitor = Monitor(tmp_path, model, events.extend, total_steps=1, start_step=0, global_batch=1, seq_len=4,
                      flops_per_token=1.0, peak=(1e9, "test"), world=1, health_window=1, log_every=1, is_rank0=True)
    monitor.log("started at step 0 of 1")
    monitor.step(1, 2.0, step_time=0.1, lr=1e-3, alpha=1.0, grad_norm=1.0, applied=True, skipped_total=0, tokens=4)
    monitor.log("saved a checkpoint")
    monitor.close()
    assert "alpha" not in metrics(tmp_path)[0] and "loss" in metrics(tmp_path)[0]
    assert "train/alpha" not in {name for name, _, _ in events} and "train/loss" in {name for name, _, _ in events}
    out, err = capsys.readouterr()
    assert "\r" not in out + err and "alpha" not in err
    assert "started at step 0 of 1\n" in out and "saved a checkpoint\n" in out and "train: 1/1 step (100%)" in err


def test_training_draws_no_random_numbers():
    """Why a checkpoint holds no RNG state: a TopK model's training step (mid-annealing) and the sampler
    leave the global generator untouched, so a resume on any number of ranks has nothing to restore."""
    from topk_ds.data.dataset import GlobalSampler
    from topk_ds.model import ModelConfig, TopKConfig, Transformer

    model = Transformer(ModelConfig(dim=32, n_layers=3, n_heads=2, ffn_dim=64, vocab_size=50), TopKConfig(k=4, n_nontopk=1))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    tokens = torch.arange(40).reshape(2, 20) % 50
    before = torch.get_rng_state()
    for m in model.topk_modules():
        m.alpha = 0.5
    model.train()
    model(tokens[:, :-1], tokens[:, 1:]).backward()
    optimizer.step()
    GlobalSampler(1000, 8, seed=0).next_step(0, 1, 8)
    assert torch.equal(torch.get_rng_state(), before)


def _write_many(target: Path, writer: int) -> None:
    from topk_ds.io import write_json

    for _ in range(100):
        write_json(target, {"writer": writer, "payload": "x" * 1000})


def test_concurrent_json_writers_never_share_a_temporary(tmp_path):
    """Processes writing one file (rank 0 of every node did, for complete.json) each rename their own
    temporary: with one shared temporary name this raised FileNotFoundError."""
    import multiprocessing

    target = tmp_path / "complete.json"
    context = multiprocessing.get_context("fork")
    writers = [context.Process(target=_write_many, args=(target, i)) for i in range(4)]
    for w in writers:
        w.start()
    for w in writers:
        w.join()
    assert [w.exitcode for w in writers] == [0, 0, 0, 0]
    assert json.loads(target.read_text())["payload"] == "x" * 1000
    assert [p.name for p in tmp_path.iterdir()] == ["complete.json"]


def test_checkpoints_of_an_older_topk_ds_are_still_checked_and_loaded(tmp_path):
    """Before checksums, complete.json held sizes alone and the TrainState an RNG entry: such runs still resume."""
    from topk_ds.train.checkpoint import TrainState, problem, recorded_state

    tag = tmp_path / "global_step8"
    tag.mkdir()
    (tag / "mp_rank_00_model_states.pt").write_bytes(bytes(100))
    (tag / "complete.json").write_text(json.dumps({"step": 8, "files": {"mp_rank_00_model_states.pt": 100}}))
    assert problem(tag) is None and recorded_state(tag) is None
    os.truncate(tag / "mp_rank_00_model_states.pt", 99)
    assert "has 99 bytes, expected 100 (truncated?)" in problem(tag)
    saved = {"step": 8, "tokens": 64, "sampler": {"epoch": 0, "index": 64}, "global_batch": 8, "rng": {"torch": [1]}}
    assert TrainState.saved(saved) == TrainState(step=8, tokens=64, sampler={"epoch": 0, "index": 64}, global_batch=8)
