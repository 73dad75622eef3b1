"""Long context: RoPE scaling (parity with transformers), sequence parallelism (DeepSpeed-Ulysses), the
long-range ground truth (`corpus synth --long`, `eval --suite long`) and the recipe that joins them."""

import json
import os
import random
import re
import shutil
import subprocess
import sys

import pytest
import torch
from transformers import LlamaConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from conftest import assert_one_error, cli_main, run_cli
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


# --- long-range ground truth (corpus synth --long, eval --suite long) ------------------------------------

def test_every_planted_fact_points_at_its_value_and_is_restated_far_enough():
    from topk_ds.corpus.long import MIN_DISTANCE, fact_sentence, long_document

    for seed in range(3):
        doc = long_document(random.Random(seed), length=400, facts=8)
        text = doc["text"]
        assert len(text.split()) >= 400 and len({f["key"] for f in doc["facts"]}) == 8
        for fact in doc["facts"]:
            assert re.fullmatch(r"\d{4}", fact["value"]) and len(fact["spans"]) == 2  # stated, then once more
            for a, b in fact["spans"]:
                assert text[a:b] == fact["value"]
                assert text[:b + 1].endswith(fact_sentence(fact["key"], fact["value"]))
            (fact_at, _), (restated_at, _) = fact["spans"]
            assert len(text[:restated_at].split()) - len(text[:fact_at].split()) >= MIN_DISTANCE


def test_long_corpus_is_the_same_bytes_for_the_same_seed(tmp_path):
    from topk_ds.corpus.long import write_long_corpus

    def written(name, seed):
        path = write_long_corpus(tmp_path / name, docs=3, seed=seed, length=200, facts=4, progress=False)
        return path.read_bytes(), json.loads((tmp_path / name / "concepts.json").read_text())

    (first, concepts), (again, _), (other, _) = written("a", 0), written("b", 0), written("c", 1)
    assert first == again and first != other
    assert concepts["long"] == {"length": 200, "facts": 4}
    for line in first.decode().splitlines():
        doc = json.loads(line)
        assert all(doc["text"][a:b] == f["value"] for f in doc["facts"] for a, b in f["spans"])


@pytest.fixture(scope="module")
def long_tokenizer(synthetic_data):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(synthetic_data[1] / "tokenizer")


def test_long_documents_fill_the_context_and_point_at_the_values_by_token_distance(long_tokenizer):
    from topk_ds.evaluate.long import DISTANCE_BUCKETS, bucket, documents

    assert [bucket(d, DISTANCE_BUCKETS) for d in (63, 64, 127, 128, 8191, 8192)] == [None, 0, 0, 1, 6, None]
    docs = documents(long_tokenizer, 300, 3)
    assert len(docs) == 3 and sum(len(q) for _, q in docs) > 0
    for ids, queries in docs:
        assert ids.shape == (300,)
        for tokens, distance in queries:
            assert distance >= DISTANCE_BUCKETS[0] and tokens[-1] < 300
            assert tokens == list(range(tokens[0], tokens[0] + len(tokens)))
            assert torch.equal(ids[tokens], ids[[t - distance for t in tokens]])  # the fact's value, back there
            assert re.fullmatch(r"\d{4}", long_tokenizer.decode(ids[tokens]).strip(" ."))
    assert [torch.equal(a[0], b[0]) for a, b in zip(docs, documents(long_tokenizer, 300, 3))] == [True] * 3


class Predicts(torch.nn.Module):
    """Logits that make the true next token the greedy prediction except at `wrong` positions (uniform: all)."""

    def __init__(self, vocab: int, wrong=(), uniform=False):
        super().__init__()
        self.vocab, self.wrong, self.uniform = vocab, set(wrong), uniform
        self.unused = torch.nn.Parameter(torch.zeros(1))

    def forward(self, ids, use_cache=False):
        logits = torch.zeros(*ids.shape, self.vocab)
        if not self.uniform:
            logits[:, :-1].scatter_(2, ids[:, 1:, None], 20.0)  # logits[:, t] predict token t + 1
            for t in self.wrong:
                logits[:, t - 1] = 0.0
        return type("Output", (), {"logits": logits})


def test_score_buckets_recall_by_distance_and_perplexity_by_position():
    from topk_ds.evaluate.long import score

    ids = torch.randint(1, 50, (1100,))
    queries = [([300, 301], 100), ([500], 700), ([600], 40), ([900, 901], 300)]  # 40: nearer than any bucket
    result = score(Predicts(50, wrong=[901]), [(ids, queries)])
    assert [(d["asked"], d["recalled"]) for d in result["distance"]] == \
        [(1, 1), (0, 0), (1, 0), (1, 1), (0, 0), (0, 0), (0, 0)]  # 901 was not predicted: that value is missed
    assert [p["tokens"] for p in result["position"]] == [255, 768, 76, 0]  # positions 1-255, 256-1023, 1024-1099
    assert result["position"][3]["perplexity"] is None and result["distance"][1]["accuracy"] is None
    uniform = score(Predicts(50, uniform=True), [(ids, queries), (ids, queries)], batch_size=2)
    assert [p["perplexity"] for p in uniform["position"][:3]] == [pytest.approx(50.0)] * 3
    assert sum(d["recalled"] for d in uniform["distance"]) == 0 and uniform["position"][0]["tokens"] == 2 * 255


@pytest.fixture
def long_model(synthetic_data, long_tokenizer, tmp_path):
    """An untrained TopK LM with a context of 256, saved like a converted directory with the corpus' tokenizer."""
    from topk_ds.model.hf import TopKLlamaConfig, TopKLlamaForCausalLM

    out = tmp_path / "long-model"
    config = TopKLlamaConfig.from_args(tiny(vocab_size=len(long_tokenizer), max_seq_len=256), TopKConfig(k=8))
    TopKLlamaForCausalLM(config).save_pretrained(out)
    for name in ("tokenizer.model", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy2(synthetic_data[1] / "tokenizer" / name, out / name)
    return out


def test_eval_long_states_its_memory_and_cost_then_writes_its_results(long_model, tmp_path, capsys, monkeypatch):
    import topk_ds.devices

    out = tmp_path / "eval"
    code, _, err = cli_main(capsys, "eval", long_model, "--suite", "long", "--limit", 2, "--out", out)
    assert code == 0, err
    assert "eval --suite long long-model needs" in err and "available" in err
    assert "eval --suite long long-model: 512 tokens x" in err and "FLOP" in err  # 2 documents of 256 tokens
    result = json.loads((out / "long-model.json").read_text())
    assert result["max_length"] == 256 and result["position"][0]["tokens"] == 2 * 255
    monkeypatch.setattr(topk_ds.devices, "available_memory", lambda device: 2**20)
    refused = tmp_path / "refused"
    assert_one_error(cli_main(capsys, "eval", long_model, "--suite", "long", "--out", refused),
                     "eval --suite long long-model needs", "1 MiB available", "not enough", "--batch-size")
    assert not refused.exists()


@pytest.mark.parametrize("argv, words", [
    (["corpus", "synth", "--long", "--facts", "0"], ["--facts", ">= 1"]),
    (["corpus", "synth", "--long", "--facts", "65"], ["--facts must be in [1, 64]"]),
    (["corpus", "synth", "--long", "--length", "100"], ["--length must be at least 128 words"]),
    (["corpus", "synth", "--length", "300"], ["--length and --facts shape the documents of --long"]),
    (["eval", "MODEL", "--suite", "long", "--max-length", "100"], ["--max-length 100 is too short", "at least 128"]),
    (["eval", "MODEL", "--suite", "long", "--tasks", "lambada"], ["--suite long has no --tasks"]),
])
def test_bad_long_input_is_one_line_and_writes_nothing(argv, words, tmp_path, capsys):
    argv = [str(tmp_path / "model") if a == "MODEL" else a for a in argv]
    assert_one_error(cli_main(capsys, *argv, "--out", tmp_path / "out"), *words)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_long_context_recipe_on_cpu(synthetic_data, tmp_path):
    """The README recipe, small: a TopK LM and its dense twin trained at 64 tokens on long documents, continued
    at 256 with sequence parallelism over 2 ranks and YaRN x4, then compared by `eval --suite long`. The TopK
    continuation also resumes bit for bit from its checkpoint, and through a universal checkpoint on one rank
    without sequence parallelism, with the losses and gradient norms of the 2-rank run within fp32 tolerance."""
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
