"""Long context: RoPE scaling (parity with transformers), ..."""

import json
import os
import subprocess
import sys

import pytest
import torch
from transformers import LlamaConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from conftest import run_cli
from test_model import V, copy_into_hf_llama, tiny
from topk_ds.model import TopKConfig, Transformer
from topk_ds.model.llama import rope_frequencies
from topk_ds.train.distributed import free_port

# Each scheme as transformers names and parameterises it, stretching a 16-token training context to 64.
SCALINGS = {
    "linear": {"rope_type": "linear", "factor": 4.0},
    "llama3": {"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16},
    "yarn-mscale": {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 16, "mscale": 0.7,
                    "mscale_all_dim": 1.0, "beta_fast": 16, "truncate": False},
}


@pytest.mark.parametrize("name", SCALINGS)
def test_rope_frequencies_are_transformers(name):
    scaling = SCALINGS[name]
    config = LlamaConfig(hidden_size=64, num_attention_heads=4, max_position_embeddings=64,
                         rope_parameters={"rope_theta": 500.0, **scaling})
    theirs, their_factor = ROPE_INIT_FUNCTIONS[scaling["rope_type"]](config, "cpu")
    ours, our_factor = rope_frequencies(16, 500.0, scaling)
    assert torch.equal(ours, theirs) and our_factor == their_factor
    assert not torch.equal(ours, rope_frequencies(16, 500.0)[0])  # the scaling did something


@pytest.mark.parametrize("name", SCALINGS)
def test_dense_with_rope_scaling_matches_transformers_llama(name):
    model = Transformer(tiny(max_seq_len=64, rope_scaling=SCALINGS[name], n_kv_heads=2)).eval()
    hf = copy_into_hf_llama(model)
    tokens = torch.randint(0, V, (2, 64))  # four times the "training" context
    with torch.no_grad():
        assert (model(tokens) - hf(tokens).logits).abs().max().item() <= 1e-4


def test_exported_topk_model_with_rope_scaling_in_plain_transformers(tmp_path):
    """A TopK LM stretched with YaRN, exported as `topk-ds convert` does, loads in a process that cannot
    import topk_ds, with transformers' own rope_parameters in config.json, the same logits as ours and
    the same greedy continuation with and without the KV cache."""
    from topk_ds.model.hf import TopKLlamaConfig, TopKLlamaForCausalLM

    model_cfg = tiny(max_seq_len=64, rope_scaling=SCALINGS["yarn"])
    config = TopKLlamaConfig.from_args(model_cfg, TopKConfig(k=8))
    model = TopKLlamaForCausalLM(config).eval()
    for p in model.parameters():
        p.data.add_(0.05 * torch.randn_like(p))
    model.config.register_for_auto_class()
    model.register_for_auto_class("AutoModelForCausalLM")
    model.save_pretrained(tmp_path / "hf")
    saved = json.loads((tmp_path / "hf/config.json").read_text())
    assert saved["rope_parameters"] == {"rope_theta": 10000.0, **SCALINGS["yarn"]}
    tokens = torch.randint(0, V, (1, 60))
    torch.save(tokens, tmp_path / "tokens.pt")
    script = f"""
import sys
sys.modules["topk_ds"] = None  # any import of the package now fails
import torch
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained({str(tmp_path / "hf")!r}, trust_remote_code=True).eval()
assert not type(model).__module__.startswith("topk_ds"), type(model).__module__
tokens = torch.load({str(tmp_path / "tokens.pt")!r})
with torch.no_grad():
    torch.save(model(tokens).logits, {str(tmp_path / "logits.pt")!r})
kw = dict(do_sample=False, max_new_tokens=20, min_new_tokens=20)
a, b = model.generate(tokens[:, :40], use_cache=True, **kw), model.generate(tokens[:, :40], use_cache=False, **kw)
assert torch.equal(a, b), (a, b)
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, timeout=300,
                          env={**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules")})
    assert proc.returncode == 0, proc.stderr[-3000:]
    reference = Transformer(model_cfg, TopKConfig(k=8)).eval()
    reference.load_state_dict({k.removeprefix("model."): v for k, v in model.state_dict().items()})
    with torch.no_grad():
        assert torch.equal(torch.load(tmp_path / "logits.pt"), reference(tokens))


@pytest.mark.parametrize("scaling, message", [
    ("{rope_type: dynamic, factor: 4}", "rope_type='dynamic' is not supported; choose one of linear, llama3, yarn"),
    ("{rope_type: yarn, factor: 4}", "missing original_max_position_embeddings"),
    ("{rope_type: linear, factor: 4, beta_fast: 2}", "unknown beta_fast"),
    ("{rope_type: linear, factor: 0.5}", "factor=0.5 must be >= 1"),
    ("8", "model.rope_scaling must be a mapping"),
])
def test_bad_rope_scaling_is_one_line(scaling, message, capsys):
    from topk_ds.cli import main

    with pytest.raises(SystemExit) as e:
        main(["config", "show", "--config", "tiny", "--set", f"model.rope_scaling={scaling}"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and len(err.strip().splitlines()) == 1 and message in err


# --- sequence parallelism (DeepSpeed-Ulysses) -------------------------------------------------------------

def test_ulysses_gives_the_whole_sequence_loss_and_gradients_and_topk_adds_no_communication():
    from topk_ds.train.distributed import free_port

    from ulysses_worker import run

    torch.multiprocessing.spawn(run, args=(free_port(),), nprocs=2)


def metrics(run) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("overrides, message", [
    (["train.sequence_parallel=3"], "train.sequence_parallel=3 must divide model.n_heads=4"),
    (["model.n_kv_heads=1", "train.sequence_parallel=2"], "train.sequence_parallel=2 must divide model.n_kv_heads=1"),
    (["data.seq_len=63", "train.sequence_parallel=2"], "train.sequence_parallel=2 must divide data.seq_len=63"),
    (["train.sequence_parallel=0"], "train.sequence_parallel=0 must be >= 1"),
])
def test_bad_sequence_parallel_degree_is_one_line(overrides, message, capsys):
    from topk_ds.cli import main

    with pytest.raises(SystemExit) as e:
        main(["config", "show", "--config", "tiny", *[a for o in overrides for a in ("--set", o)]])
    err = capsys.readouterr().err
    assert e.value.code == 2 and len(err.strip().splitlines()) == 1 and message in err


def test_sequence_parallel_degree_must_divide_the_ranks_and_needs_zero(synthetic_data, tmp_path, monkeypatch, capsys):
    from topk_ds.cli import main
    from topk_ds.config import load_config
    from topk_ds.errors import UserError
    from topk_ds.train.engine import resolve_ds_config

    for name, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                        "MASTER_PORT": "29500"}.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(SystemExit) as e:  # refused before any process group or file exists
        main(["train", "--config", "tiny", "--set", f"data.path={synthetic_data[1]}", "--set",
              f"train.out_dir={tmp_path / 'run'}", "--set", "train.sequence_parallel=2"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.strip() == ("topk-ds: error: train.sequence_parallel=2 does not divide the 1 ranks; "
                                                 "launch a multiple of 2 ranks or choose a divisor of 1")
    assert not (tmp_path / "run").exists()
    zero0 = tmp_path / "zero0.json"
    zero0.write_text("{}")
    with pytest.raises(UserError, match="train.sequence_parallel needs ZeRO stage 1, 2 or 3"):
        resolve_ds_config(load_config("tiny", ["train.sequence_parallel=2", f"train.ds_config={zero0}"]), 1)


@pytest.mark.parametrize("given, message", [
    ("nowhere", "train.init_from=nowhere: expected a run directory, its checkpoints/ or a global_stepN"),
])
def test_bad_init_from_is_one_line(given, message):
    from topk_ds.errors import UserError
    from topk_ds.train.checkpoint import warm_start_tag

    with pytest.raises(UserError, match=message):
        warm_start_tag(given)


def metrics(run) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_long_context_recipe_on_cpu(synthetic_data, tmp_path):
    """The README recipe, small: a TopK LM and its dense twin trained at 64 tokens on long documents, continued
    at 256 with sequence parallelism over 2 ranks and YaRN x4, then compared by `eval --suite long`. The TopK
    continuation also resumes bit for bit from its checkpoint, and through a universal checkpoint on one rank
    without sequence parallelism, with the losses and gradient norms of the 2-rank run within fp32 tolerance."""
    import shutil

    corpus, data = tmp_path / "corpus", tmp_path / "data"
    run_cli("corpus", "synth", "--long", "--out", corpus, "--docs", 120, "--length", 300, "--facts", 6)
    run_cli("data", "prepare", "--input", corpus / "corpus.jsonl", "--tokenizer", synthetic_data[1] / "tokenizer",
            "--out", data, "--val-tokens", 4000)
    common = ["--set", f"data.path={data}", "--set", "train.eval_every=4", "--set", "train.eval_batches=1"]
    long = ["--set", "model.max_seq_len=256", "--set", "data.seq_len=256", "--set",
            "model.rope_scaling={rope_type: yarn, factor: 4, original_max_position_embeddings: 64}", "--set",
            "train.sequence_parallel=2", "--set", "topk.anneal_ratio=0", "--set", "train.steps=8", "--set",
            "train.save_every=4", "--set", "train.micro_batch=4"]

    def continued(config, out, *extra):
        proc = subprocess.run(["deepspeed", "--num_gpus", "2", "--master_port", str(free_port()), "--module",
                               "topk_ds.train", "--config", config, *common, *long, "--set", f"train.out_dir={out}",
                               *extra], capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return metrics(out)

    runs = {}
    for config in ("tiny", "tiny-dense"):
        short = tmp_path / f"{config}-64"
        run_cli("train", "--config", config, *common, "--set", f"train.out_dir={short}", "--set", "train.steps=40",
                "--set", "train.save_every=40")
        runs[config] = tmp_path / f"{config}-256"
        records = continued(config, runs[config], "--set", f"train.init_from={short}")
        assert records[0]["loss"] < metrics(short)[0]["loss"] - 1.0  # it starts from the trained weights
        assert all(r["tokens"] == (i + 1) * 4 * 256 for i, r in enumerate(records))  # 4 sequences of 256 a step
        log = (runs[config] / "train.log").read_text()
        assert "started from the weights of" in log and "2 ranks (1 data-parallel x 2 sequence-parallel)" in log

    out = tmp_path / "eval"
    run_cli("eval", *runs.values(), "--suite", "long", "--out", out, "--limit", 6)
    results = [json.loads((out / f"{config}-256-step8.json").read_text()) for config in runs]
    assert (out / "table.md").is_file() and (out / "retention.png").stat().st_size > 0
    for r in results:  # both models on the same documents: facts 64-256 tokens back, perplexity of positions 0-256
        assert r["max_length"] == 256 and [d["asked"] for d in r["distance"]] == [d["asked"] for d in results[0]["distance"]]
        assert r["distance"][0]["asked"] + r["distance"][1]["asked"] > 0 and r["position"][0]["tokens"] == 6 * 255
        assert 1 < r["position"][0]["perplexity"] < 2000 and all(d["asked"] == 0 for d in r["distance"][2:])

    straight, resumed = metrics(runs["tiny"]), tmp_path / "resumed"
    shutil.copytree(runs["tiny"], resumed)
    shutil.rmtree(resumed / "checkpoints/global_step8")
    assert [(r["loss"], r["grad_norm"]) for r in continued("tiny", resumed, "--resume", "auto")] == \
        [(r["loss"], r["grad_norm"]) for r in straight]

    universal = tmp_path / "universal"
    shutil.copytree(resumed, universal)
    shutil.rmtree(universal / "checkpoints/global_step8")
    subprocess.run([sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--inject_missing_state",
                    "--input_folder", str(universal / "checkpoints/global_step4"), "--output_folder",
                    str(universal / "checkpoints/global_step4_universal")], check=True, capture_output=True, timeout=300)
    run_cli("train", "--config", "tiny", *common, *long, "--set", f"train.out_dir={universal}", "--set",
            "train.sequence_parallel=1", "--resume", universal / "checkpoints/global_step4_universal")
    one = metrics(universal)
    assert [r["step"] for r in one] == list(range(1, 9))
    for a, b in zip(straight[4:], one[4:]):
        assert a["tokens"] == b["tokens"] and ("val_loss" in a) == ("val_loss" in b)
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5) and a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
        assert a.get("val_loss", 0) == pytest.approx(b.get("val_loss", 0), rel=1e-5)  # validation over the group too


def test_planner_divides_activations_and_adds_the_all_to_alls():
    """tiny on 8 GPUs: N-way sequence parallelism holds seq_len / N positions per GPU (activations / N),
    data-parallel GPUs = 8 / N, and adds Ulysses' 4 all-to-alls per layer and pass, the same for TopK and
    dense: per layer, micro 8 x 64/N positions x (2 x 4 + 2 x 4 heads) x 16 dims, bf16, (N - 1)/N sent."""
    from topk_ds.config import load_config
    from topk_ds.errors import UserError
    from topk_ds.plan import plan

    def of(config, sp, *extra):
        return plan(load_config(config, ["model.vocab_size=512", f"train.sequence_parallel={sp}", *extra]), 4, 2)

    one, two, dense = of("tiny", 1), of("tiny", 2), of("tiny-dense", 2)
    assert two["batch"]["global_batch"] == one["batch"]["global_batch"] // 2 == 8 * 4
    assert two["memory"]["plain"]["activations_saved"] * 2 == one["memory"]["plain"]["activations_saved"]
    rows = [r for r in two["communication"]["collectives"] if "all-to-all" in r["name"]]
    per_layer = 2 * 8 * 32 * (2 * 4 + 2 * 4) * 16 / 2
    assert [(r["calls"], r["nvlink_bytes"], r["ib_bytes"]) for r in rows] == [(16, 4 * per_layer, 0.0)] * 2
    assert rows == [r for r in dense["communication"]["collectives"] if "all-to-all" in r["name"]]
    assert not [r for r in one["communication"]["collectives"] if "all-to-all" in r["name"]]
    spans = plan(load_config("tiny", ["model.vocab_size=512", "train.sequence_parallel=4"]), 2, 2)
    rows = [r for r in spans["communication"]["collectives"] if "all-to-all" in r["name"]]
    assert rows[0]["ib_bytes"] == 2 * rows[0]["nvlink_bytes"]  # 2 nodes of 2: 2 of a GPU's 3 peers are off-node
    with pytest.raises(UserError, match="train.sequence_parallel=4 does not divide the 6 GPUs"):
        plan(load_config("tiny", ["model.vocab_size=512", "train.sequence_parallel=4"]), 3, 2)
