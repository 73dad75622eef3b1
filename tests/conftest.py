import os
import sys
from pathlib import Path

import pytest
import torch

# The launchers (`deepspeed`, `mpirun`) live beside this interpreter: reachable as in an activated venv.
os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Threads fixed, not the machine's core count: reduction order (hence a trained fixture) then depends only on the CPU.
os.environ["OMP_NUM_THREADS"] = "2"
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# Data pipeline fixtures (topk_ds.data): a small synthetic corpus, a tokenizer trained on it once per
# session, and a prepared data directory (shards of 4,000 tokens so windows cross shard boundaries).
DATA_DOCS, DATA_VOCAB = 60, 512


@pytest.fixture(scope="session")
def data_corpus(tmp_path_factory):
    from topk_ds.corpus import write_synthetic_corpus

    return write_synthetic_corpus(tmp_path_factory.mktemp("corpus"), docs=DATA_DOCS, seed=0, progress=False)


@pytest.fixture(scope="session")
def data_tokenizer(data_corpus, tmp_path_factory):
    from topk_ds.data.tokenizer import train_tokenizer

    out = tmp_path_factory.mktemp("tok") / "tokenizer"
    train_tokenizer([str(data_corpus)], DATA_VOCAB, out, progress=False)
    return out


@pytest.fixture(scope="session")
def prepared_data(data_corpus, data_tokenizer, tmp_path_factory):
    from topk_ds.data.prepare import prepare

    out = tmp_path_factory.mktemp("data") / "prepared"
    prepare([str(data_corpus)], data_tokenizer, out, val_tokens=2000, shard_tokens=4000, progress=False)
    return out


# A trained tiny model, shared by the training, conversion, evaluation and analysis tests: the
# synthetic corpus with a vocabulary big enough that topic words are whole tokens, prepared shards,
# one real `topk-ds train` run (1 rank, DeepSpeed on CPU) with checkpoints to trace, and its conversion.
RUN_DOCS, RUN_VOCAB = 800, 2000
RUN_STEPS, RUN_SAVE_EVERY = 300, 100


def run_cli(*args, check=True, timeout=900, env=None, cwd=None):
    """Run `python -m topk_ds.cli ARGS` in a fresh process; returns the CompletedProcess."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "topk_ds.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})}, cwd=cwd)
    if check and proc.returncode != 0:
        raise AssertionError(f"topk-ds {' '.join(map(str, args))} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc


@pytest.fixture(scope="session")
def synthetic_data(tmp_path_factory):
    """(corpus directory with corpus.jsonl + concepts.json, prepared data directory)."""
    from topk_ds.corpus import write_synthetic_corpus
    from topk_ds.data.prepare import prepare
    from topk_ds.data.tokenizer import train_tokenizer

    root = tmp_path_factory.mktemp("synthetic")
    corpus = write_synthetic_corpus(root / "corpus", docs=RUN_DOCS, seed=0, progress=False)
    train_tokenizer([str(corpus)], RUN_VOCAB, root / "tokenizer", progress=False)
    prepare([str(corpus)], root / "tokenizer", root / "data", val_tokens=20000, progress=False)
    return root / "corpus", root / "data"


def train_tiny(data, out, *overrides, config="tiny", resume="none"):
    return run_cli("train", "--config", config, "--set", f"data.path={data}", "--set", f"train.out_dir={out}",
                   "--resume", resume, *[a for o in overrides for a in ("--set", o)])


@pytest.fixture(scope="session")
def tiny_run(synthetic_data, tmp_path_factory):
    """A finished TopK run of the tiny preset: checkpoints at steps 100, 200, 300."""
    out = tmp_path_factory.mktemp("runs") / "tiny"
    train_tiny(synthetic_data[1], out, f"train.steps={RUN_STEPS}", f"train.save_every={RUN_SAVE_EVERY}",
               "train.eval_every=100")
    return out


@pytest.fixture(scope="session")
def tiny_hf(tiny_run):
    """The tiny run's last checkpoint converted to a Hugging Face directory."""
    run_cli("convert", tiny_run)
    return tiny_run / "hf" / f"global_step{RUN_STEPS}"


# The concept-forming pair: the demo preset's TopK model (D=128, k=16) and its dense twin, each trained on one
# rank for 400 steps of 16 x 128 tokens at a constant learning rate after warmup (long enough for topic neurons
# to form; the tiny run's 300 x 8 x 64 tokens are not), with checkpoints at steps 200 and 400, converted.
CONCEPT_STEPS, STATS_TOKENS = 800, 64_000  # statistics over whole windows of 64


def train_concept_model(data, root, config):
    train_tiny(data, root / "run", f"train.steps={CONCEPT_STEPS}", "train.micro_batch=16", "train.min_lr_ratio=1.0",
               f"train.save_every={CONCEPT_STEPS // 2}", "train.eval_every=0", config=config)
    run_cli("convert", root / "run", root / "hf")
    return root / "hf"


@pytest.fixture(scope="session")
def concept_model(synthetic_data, tmp_path_factory):
    """The TopK model, with statistics. Returns (converted model, statistics); its run is beside them."""
    root = tmp_path_factory.mktemp("concept")
    hf = train_concept_model(synthetic_data[1], root, "demo")
    run_cli("analyze", "stats", hf, "--data", synthetic_data[1], "--tokens", STATS_TOKENS, "--seq-len", 128,
            "--out", root / "stats")
    return hf, root / "stats"


@pytest.fixture(scope="session")
def concept_dense(synthetic_data, tmp_path_factory):
    """The TopK model's dense twin (`config="demo-dense"`). Returns the converted model; its run is beside it."""
    return train_concept_model(synthetic_data[1], tmp_path_factory.mktemp("concept-dense"), "demo-dense")


def hooked_outputs(modules, layers, width: int, run) -> dict:
    """{l: (N, width) every output of modules[l] while run() runs}, recorded by plain forward hooks."""
    outputs = {l: [] for l in layers}
    handles = [modules[l].register_forward_hook(lambda m, a, out, l=l: outputs[l].append(out.reshape(-1, width)))
               for l in layers]
    try:
        with torch.no_grad():
            run()
    finally:
        for h in handles:
            h.remove()
    return {l: torch.cat(outs) for l, outs in outputs.items()}


def assert_converts_with_parity(tag, out):
    """`topk-ds convert` of one DeepSpeed tag; the converted model's logits equal the training model
    class's (Transformer) with the checkpoint's fp32 weights as DeepSpeed consolidates them."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from topk_ds import load
    from topk_ds.config import load_config
    from topk_ds.model import Transformer

    run_cli("convert", tag, out)
    cfg = load_config(str(tag.parents[1] / "config.yaml"))
    reference = Transformer(cfg.model, cfg.topk).eval()
    reference.load_state_dict(get_fp32_state_dict_from_zero_checkpoint(str(tag.parent), tag=tag.name))
    converted, _ = load(out)
    assert converted.config.topk_alpha == 0.0 and converted.config.train_step == int(tag.name.removeprefix("global_step"))
    ids = torch.randint(0, cfg.model.vocab_size, (2, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected, got = reference(ids), converted(ids).logits
    assert got.dtype == torch.float32 and (got - expected).abs().max().item() <= 1e-5


def cli_main(capsys, *args) -> tuple[int, str, str]:
    """`topk-ds ARGS` in this process (no interpreter start-up, for tests of what a command says):
    (exit status, stdout, stderr). Use run_cli where a real process matters (signals, limits, launchers)."""
    from topk_ds.cli import main

    capsys.readouterr()
    try:
        main([str(a) for a in args])
        code = 0
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def snapshot(run: Path) -> dict:
    """Every file of a run directory with its bytes' digest and modification time (but the lock, which
    any start takes before it checks anything)."""
    from topk_ds.io import sha256_file

    return {str(p.relative_to(run)): (sha256_file(p), p.stat().st_mtime_ns) for p in sorted(run.rglob("*"))
            if p.is_file() and p.name != ".lock"}


@pytest.fixture
def train_here(monkeypatch, capsys):
    """`topk-ds train ARGS` in this process (rank 0 of 1), for starts that are refused before training:
    returns (exit code, stderr lines). The process group it opens is closed afterwards."""
    import logging

    import torch.distributed as dist

    from topk_ds.cli import main

    launcher = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    monkeypatch.setattr(os, "environ", {k: v for k, v in os.environ.items() if k not in launcher})
    # DeepSpeed's log handler may still hold an earlier test's captured (closed) stdout: no report of that
    monkeypatch.setattr(logging, "raiseExceptions", False)

    def train(*args):
        with pytest.raises(SystemExit) as e:
            main(["train", *map(str, args)])
        return e.value.code, capsys.readouterr().err.strip().splitlines()

    yield train
    if dist.is_initialized():
        dist.destroy_process_group()


def assert_one_error(result, *words) -> str:
    """A failed command (from cli_main or run_cli): exit != 0, no traceback, exactly one error line on stderr,
    ours, naming every word (progress lines may come before it). Returns that line."""
    code, out, err = (result.returncode, result.stdout, result.stderr) if hasattr(result, "returncode") else result
    assert code not in (0, None), out
    errors = [line for line in err.splitlines() if "error" in line.lower()]
    assert "Traceback" not in err and len(errors) == 1 and errors[0].startswith("topk-ds"), err
    for word in words:
        assert word in errors[0], errors[0]
    return errors[0]


SAE_TOKENS = 20_000


@pytest.fixture(scope="session")
def sae_dir(tiny_hf, synthetic_data, tmp_path_factory):
    """`topk-ds sae train` on the tiny model's TopK-site layers (defaults: k and width of the TopK LM)."""
    from topk_ds.cli import main

    out = tmp_path_factory.mktemp("sae") / "tiny"
    main([str(a) for a in ("sae", "train", tiny_hf, "--data", synthetic_data[1], "--tokens", SAE_TOKENS, "--seq-len", 64,
                           "--out", out)])
    return out


@pytest.fixture(scope="session")
def stats_dir(tiny_hf, synthetic_data, tmp_path_factory):
    """`topk-ds analyze stats` of the tiny run's converted model over its training data."""
    out = tmp_path_factory.mktemp("stats") / "tiny"
    proc = run_cli("analyze", "stats", tiny_hf, "--data", synthetic_data[1], "--tokens", STATS_TOKENS, "--seq-len", 64,
                   "--out", out)
    assert f"over {STATS_TOKENS:,} tokens" in proc.stdout
    return out
