"""Faults a user or the machine causes, outside training and the analysis internals: an output that is the
wrong kind of thing or cannot be written, a full disk, a file-size limit, SIGTERM, a stale temporary of a
killed run, a binary config, an unparsable input line, a failed demo. Each ends in one line naming the path
or value and the cause, exit != 0, and nothing half-written.

The mechanisms, and where a machine cannot provide them:
- unwritable: `chmod` for a normal user; CI runs as root, whom permissions do not stop, so there the
  immutable attribute (`chattr +i`, needs CAP_LINUX_IMMUTABLE) — skipped, saying so, where neither works;
- disk full: a small tmpfs (`mount -t tmpfs`, needs CAP_SYS_ADMIN) — skipped, saying so, where it cannot be
  mounted; the file-size-limit tests (RLIMIT_FSIZE, available everywhere) cover the same write paths;
- SIGTERM needs a real process; everything else runs in this process (`cli_main`).
"""

import contextlib
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml
from conftest import DATA_VOCAB, RUN_STEPS, assert_one_error, cli_main, run_cli, snapshot

from topk_ds.io import HOST, atomic_output

OUT = "{out}"


@contextlib.contextmanager
def unwritable(folder):
    """`folder` made unwritable for this process (see the module's docstring)."""
    folder.mkdir(exist_ok=True)
    if os.geteuid() != 0:
        folder.chmod(0o555)
        try:
            yield folder
        finally:
            folder.chmod(0o755)
        return
    made = subprocess.run(["chattr", "+i", str(folder)], capture_output=True, text=True) if shutil.which("chattr") else None
    if made is None or made.returncode != 0:
        pytest.skip("root cannot be kept from writing a directory on this machine: chattr +i is unavailable ("
                    f"{made.stderr.strip() if made else 'no chattr'}; it needs CAP_LINUX_IMMUTABLE)")
    try:
        yield folder
    finally:
        subprocess.run(["chattr", "-i", str(folder)], check=True)


@contextlib.contextmanager
def small_disk(folder, size="256k"):
    """A `size` tmpfs mounted at `folder`: a disk that fills up."""
    folder.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"no tmpfs can be mounted here ({mounted.stderr.strip()}; needs CAP_SYS_ADMIN): a full disk is "
                    "tested through the file-size limit instead")
    try:
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], check=True)


@contextlib.contextmanager
def file_size_limit(nbytes):
    """RLIMIT_FSIZE for this process: a write past `nbytes` fails with EFBIG (Python ignores SIGXFSZ)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))


def leftovers(folder):
    return sorted(p.name for p in folder.rglob("*") if ".tmp" in p.name)


# Every command that writes outside training, with the kind of output it writes; inputs are dummies where
# the output is checked before any input is read, which is the point: nothing is computed for nothing.
COMMANDS = {
    "corpus synth": ("dir", ["corpus", "synth", "--out", OUT, "--docs", 2]),
    "tokenizer train": ("dir", ["tokenizer", "train", "--input", "in.jsonl", "--vocab-size", 300, "--out", OUT]),
    "tokenizer import": ("dir", ["tokenizer", "import", "{tmp}/tokenizer.model", "--out", OUT]),
    "data prepare": ("dir", ["data", "prepare", "--input", "in.jsonl", "--tokenizer", "tok", "--out", OUT]),
    "convert": ("dir", ["convert", "{tmp}/w.pt", OUT, "--config", "tiny"]),
    "analyze stats": ("dir", ["analyze", "stats", "model", "--data", "data", "--out", OUT]),
    "analyze neuron --json": ("file", ["analyze", "neuron", "stats", "0:1", "--json", OUT]),
    "analyze entropy --compare": ("file", ["analyze", "entropy", "stats", "--compare", OUT]),
    "analyze browse": ("dir", ["analyze", "browse", "stats", "--out", OUT]),
    "analyze trace": ("dir", ["analyze", "trace", "run", "--entropy", "--out", OUT]),
    "analyze export": ("dir", ["analyze", "export", "stats", "--format", "neuronpedia", "--out", OUT]),
    "steer": ("file", ["steer", "model", "--neuron", "0:1", "--offset", 1, "--out", OUT]),
    "eval": ("dir", ["eval", "model", "--suite", "local", "--out", OUT]),
    "eval-make-local": ("dir", ["eval-make-local", "--out", OUT]),
    "demo": ("dir", ["demo", "--out", OUT]),
}


def command(name, tmp_path, out):
    (tmp_path / "tokenizer.model").write_bytes(b"")
    (tmp_path / "w.pt").write_bytes(b"")
    return [str(a).format(out=out, tmp=tmp_path) for a in COMMANDS[name][1]]


@pytest.mark.parametrize("name", COMMANDS)
def test_output_of_the_wrong_kind_is_refused(name, tmp_path, capsys):
    kind = COMMANDS[name][0]
    out = tmp_path / "taken"
    if kind == "dir":
        out.write_text("a file of the user's")
    else:
        (out / "sub").mkdir(parents=True)
    line = assert_one_error(cli_main(capsys, *command(name, tmp_path, out)), str(out))
    assert ("is a file" if kind == "dir" else "is a directory") in line
    assert (out.read_text() == "a file of the user's") if kind == "dir" else [p.name for p in out.iterdir()] == ["sub"]
    assert not leftovers(tmp_path)


@pytest.mark.parametrize("name", COMMANDS)
def test_unwritable_output_is_refused(name, tmp_path, capsys):
    with unwritable(tmp_path / "locked") as locked:
        out = locked / "out"
        line = assert_one_error(cli_main(capsys, *command(name, tmp_path, out)), str(out), "not writable")
        assert not out.exists() and not leftovers(locked)
    assert line.startswith("topk-ds: error: cannot write")


def test_corpus_synth_refuses_a_directory_holding_other_files(tmp_path, capsys):
    (tmp_path / "corpus.jsonl").write_text("my own data\n")
    assert_one_error(cli_main(capsys, "corpus", "synth", "--out", tmp_path, "--docs", 2), str(tmp_path), "not empty")
    assert [p.name for p in tmp_path.iterdir()] == ["corpus.jsonl"] and (tmp_path / "corpus.jsonl").read_text() == "my own data\n"


def test_a_negative_count_names_the_bound_it_misses(tmp_path, capsys):
    assert_one_error(cli_main(capsys, "corpus", "synth", "--out", tmp_path / "c", "--docs", -5), "--docs", ">= 1, got -5")


# --- a full disk and a file-size limit: the line names the output and the cause; nothing is left -------

@pytest.fixture(scope="module")
def state_dict(tmp_path_factory, data_tokenizer):
    """A tiny TopK model's weights as a bare state dict, its config and tokenizer: `convert` input (~1.3 MB)."""
    from topk_ds.config import load_config
    from topk_ds.model import Transformer

    root = tmp_path_factory.mktemp("weights")
    (root / "config.yaml").write_text(yaml.safe_dump({"preset": "tiny", "model": {"vocab_size": DATA_VOCAB}}))
    cfg = load_config(str(root / "config.yaml"))
    torch.save(Transformer(cfg.model, cfg.topk).state_dict(), root / "w.pt")
    return ["convert", root / "w.pt", OUT, "--config", root / "config.yaml", "--tokenizer", data_tokenizer]


@pytest.fixture(scope="module")
def big_corpus(data_corpus, tmp_path_factory):
    """The test corpus ten times over: ~800 KB of text, ~600 KB of tokens."""
    path = tmp_path_factory.mktemp("big") / "corpus.jsonl"
    path.write_text(data_corpus.read_text() * 10)
    return path


WRITERS = {  # each writes more than a 256 KiB disk holds, in files of more than 64 KiB
    "corpus synth": lambda corpus, tokenizer, weights: ["corpus", "synth", "--out", OUT, "--docs", 300],
    "data prepare": lambda corpus, tokenizer, weights: ["data", "prepare", "--input", corpus, "--tokenizer", tokenizer,
                                                        "--out", OUT, "--val-tokens", 0],
    "convert": lambda corpus, tokenizer, weights: weights,
    "eval-make-local": lambda corpus, tokenizer, weights: ["eval-make-local", "--out", OUT],
}


def writer(name, big_corpus, data_tokenizer, state_dict, out):
    return [str(a).format(out=out) for a in WRITERS[name](big_corpus, data_tokenizer, state_dict)]


@pytest.mark.parametrize("name", WRITERS)
def test_file_size_limit_ends_in_one_line(name, big_corpus, data_tokenizer, state_dict, tmp_path, capsys):
    out = tmp_path / "out"
    argv = writer(name, big_corpus, data_tokenizer, state_dict, out)
    with file_size_limit(64 * 1024):
        result = cli_main(capsys, *argv)
    assert_one_error(result, str(out), "File too large")
    assert (not out.exists() or name == "eval-make-local") and not leftovers(tmp_path)


@pytest.mark.parametrize("name", ["corpus synth", "data prepare", "convert"])
def test_full_disk_ends_in_one_line(name, big_corpus, data_tokenizer, state_dict, tmp_path, capsys):
    with small_disk(tmp_path / "small") as disk:
        out = disk / "out"
        assert_one_error(cli_main(capsys, *writer(name, big_corpus, data_tokenizer, state_dict, out)), str(out),
                         "No space left on device")
        assert not list(disk.iterdir())


def test_a_checkpoint_save_past_the_file_size_limit_stops_with_one_line_and_keeps_the_run(tiny_run, tmp_path):
    """A real process under RLIMIT_FSIZE (SIGXFSZ ignored, so the write fails with EFBIG) resumes the tiny run for
    one step; its checkpoint's optimizer shard (5 MB) exceeds the limit, its model file (1.7 MB) does not. A rerun
    without the limit resumes where the run was."""
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run, ignore=shutil.ignore_patterns("hf"))
    before = snapshot(run / "checkpoints")
    data = yaml.safe_load((run / "config.yaml").read_text())["data"]["path"]
    args = [sys.executable, "-m", "topk_ds.cli", "train", "--config", "tiny", "--set", f"data.path={data}", "--set",
            f"train.out_dir={run}", "--set", f"train.steps={RUN_STEPS + 1}", "--set", "train.eval_every=100",
            "--resume", "auto"]

    def limited():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (4 << 20, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))

    proc = subprocess.run(args, capture_output=True, text=True, timeout=600, preexec_fn=limited)
    tag = run / f"checkpoints/global_step{RUN_STEPS + 1}"
    assert_one_error(proc, f"saving the checkpoint of step {RUN_STEPS + 1} failed", "File too large", str(tag))
    assert not tag.exists() and snapshot(run / "checkpoints") == before  # the earlier checkpoints untouched
    resumed = run_cli(*args[3:])
    assert f"resumed from {run}/checkpoints/global_step{RUN_STEPS}" in resumed.stdout
    assert (tag / "complete.json").is_file()


def test_train_refuses_an_out_dir_it_cannot_use_and_writes_nothing(prepared_data, tmp_path, train_here):
    common = ["--config", "tiny", "--set", f"data.path={prepared_data}", "--set", "train.eval_every=0"]
    taken = tmp_path / "taken"
    taken.write_text("a file of the user's")
    code, err = train_here(*common, "--set", f"train.out_dir={taken}")
    assert code == 2 and len(err) == 1 and f"{taken} is a file" in err[0], err
    assert taken.read_text() == "a file of the user's"
    with unwritable(tmp_path / "locked") as locked:
        code, err = train_here(*common, "--set", f"train.out_dir={locked / 'run'}")
        assert code == 2 and len(err) == 1 and f"cannot write {locked / 'run'}" in err[0] and "not writable" in err[0], err
        assert not list(locked.iterdir())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["locked", "taken"]


# --- signals and what killed runs leave ------------------------------------------------------------------

def test_sigterm_during_prepare_leaves_nothing(data_corpus, data_tokenizer, tmp_path):
    big = tmp_path / "big.jsonl"
    big.write_text(data_corpus.read_text() * 300)  # ~25 MB: seconds of tokenizing, so the signal lands mid-run
    out = tmp_path / "d"
    proc = subprocess.Popen([sys.executable, "-m", "topk_ds.cli", "data", "prepare", "--input", big, "--tokenizer",
                             data_tokenizer, "--out", out], stderr=subprocess.PIPE, text=True)
    while proc.poll() is None and not list(tmp_path.glob(".d.tmp-*/train-00000.bin")):
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    err = proc.communicate(timeout=60)[1]
    assert proc.returncode == 143, err
    assert [line for line in err.splitlines() if line.startswith("topk-ds")] == [
        "topk-ds: terminated; nothing half-written was left"]
    assert not out.exists() and not leftovers(tmp_path)


def test_temporaries_of_dead_processes_are_removed(tmp_path):
    dead = subprocess.Popen(["true"])
    dead.wait()
    out = tmp_path / "d"
    stale = [tmp_path / f".d.tmp-{HOST}-{dead.pid}", tmp_path / f".d.tmp-{dead.pid}"]  # this and the older naming
    kept = [tmp_path / f".d.tmp-{HOST}-{os.getppid()}", tmp_path / f".d.tmp-elsewhere-{dead.pid}"]  # alive; another host
    for p in stale + kept:
        p.mkdir()
        (p / "train-00000.bin").write_bytes(b"\0" * 100)
    with atomic_output(out) as tmp:
        tmp.write_text("done")
    assert out.read_text() == "done"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["d"] + [p.name for p in kept])


# --- bad inputs ------------------------------------------------------------------------------------------

def test_binary_yaml_config(tmp_path, capsys):
    (tmp_path / "c.yaml").write_bytes(bytes(range(256)) * 4)
    assert_one_error(cli_main(capsys, "config", "show", "--config", tmp_path / "c.yaml"), str(tmp_path / "c.yaml"),
                     "not a YAML text file", "UTF-8")


def test_unparsable_jsonl_line_is_one_line(data_corpus, data_tokenizer, tmp_path, capfd):
    source = tmp_path / "a.jsonl"
    source.write_text("".join(data_corpus.read_text().splitlines(keepends=True)[:5]) + "{not json\n")
    out = tmp_path / "d"
    # capfd: `datasets` logs through a handler made at import, which writes past sys.stderr to fd 2
    result = cli_main(capfd, "data", "prepare", "--input", source, "--tokenizer", data_tokenizer, "--out", out)
    assert_one_error(result, str(source))
    assert "Failed to load" not in result[2] and not out.exists() and not leftovers(tmp_path)


def test_failed_demo_stage_does_not_hold_a_rerun_to_its_settings(tmp_path, capsys):
    from topk_ds.demo import Demo, DemoSettings
    from topk_ds.errors import UserError

    out = tmp_path / "demo"
    assert_one_error(cli_main(capsys, "demo", "--out", out, "--docs", 20, "--vocab", 100_000), "100000")
    assert json.loads((out / "demo.json").read_text()) == {"docs": 20, "seed": 0}  # the corpus stage finished
    Demo(out, DemoSettings(docs=20, vocab=300)).check_settings()  # the corrected command is accepted
    with pytest.raises(UserError, match=r"other settings \(docs=20 \(now 21\)\)"):
        Demo(out, DemoSettings(docs=21, vocab=300)).check_settings()  # a finished stage's setting may not change
