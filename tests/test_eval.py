"""Evaluation (`topk-ds eval`: the local suite end to end, several models in one table, the paper
suite's validation task and its offline failure) and the converted model seen from outside
(plain transformers loading, generation, logits parity, the converter's bad inputs)."""

import json
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch
import yaml

from conftest import (RUN_SAVE_EVERY, RUN_STEPS, assert_converts_with_parity, assert_one_error, cli_main, run_cli,
                      train_tiny)

LIMIT = 60  # items per task: enough to tell a trained model from an untrained one, quick on CPU


def copy_tokenizer(src, dst):
    for name in ("tokenizer.model", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy2(src / name, dst / name)


@pytest.fixture(scope="module")
def untrained_hf(tiny_hf, tmp_path_factory):
    """The tiny run's model with fresh weights, saved like a converted directory."""
    from topk_ds.model.hf import TopKLlamaConfig, TopKLlamaForCausalLM

    config = TopKLlamaConfig.from_pretrained(tiny_hf)
    config.train_step = 0
    out = tmp_path_factory.mktemp("untrained") / "untrained"
    TopKLlamaForCausalLM(config).save_pretrained(out)
    copy_tokenizer(tiny_hf, out)
    return out


@pytest.fixture(scope="module")
def dense_llama(tiny_hf, tmp_path_factory):
    """A plain transformers Llama (not ours) with the same tokenizer: a dense baseline directory."""
    from transformers import LlamaConfig, LlamaForCausalLM

    vocab = json.loads((tiny_hf / "config.json").read_text())["vocab_size"]
    config = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=256, bos_token_id=1, eos_token_id=2)
    out = tmp_path_factory.mktemp("dense") / "dense-llama"
    LlamaForCausalLM(config).save_pretrained(out)
    copy_tokenizer(tiny_hf, out)
    return out


@pytest.fixture(scope="module")
def local_eval(tiny_run, tiny_hf, untrained_hf, dense_llama, tmp_path_factory):
    """One `topk-ds eval --suite local` over four models: the converted run, an earlier checkpoint of
    the same run (read straight from DeepSpeed), the untrained twin and a dense transformers Llama."""
    out = tmp_path_factory.mktemp("eval") / "local"
    early = tiny_run / "checkpoints" / f"global_step{RUN_SAVE_EVERY}"
    proc = run_cli("eval", tiny_hf, early, untrained_hf, dense_llama, "--suite", "local", "--out", out,
                   "--limit", LIMIT)
    return proc, out


def results(out, name):
    return json.loads((out / f"{name}.json").read_text())["results"]


def table_rows(out):
    """The cells of table.md's rows (header first, without the |---| line)."""
    lines = [line for line in (out / "table.md").read_text().splitlines() if line.startswith("| ")]
    return [[cell.strip() for cell in line.strip().strip("|").split("|")] for line in lines]


def assert_clean_failure(proc, *words):
    """Exit != 0, exactly one error line on stderr (ours, naming `words`), no traceback."""
    assert proc.returncode != 0, proc.stdout
    assert "Traceback" not in proc.stderr, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and errors[0].startswith("topk-ds: error: "), proc.stderr
    for word in words:
        assert word in errors[0], errors[0]


def no_temporaries(folder):
    assert not [p.name for p in folder.iterdir() if ".tmp" in p.name]


# --- the local suite -------------------------------------------------------------------------------

def test_local_suite_end_to_end(local_eval):
    proc, out = local_eval
    trained, untrained = results(out, f"tiny-step{RUN_STEPS}"), results(out, "untrained-step0")
    for r in (trained, untrained, results(out, f"tiny-step{RUN_SAVE_EVERY}"), results(out, "dense-llama")):
        assert set(r) == {"topk_heldout", "topk_cloze", "topk_topic_mc"}
        for key in ("word_perplexity,none", "byte_perplexity,none", "bits_per_byte,none"):
            assert math.isfinite(r["topk_heldout"][key]) and r["topk_heldout"][key] > 0
        assert math.isfinite(r["topk_cloze"]["perplexity,none"])
        for task, key in (("topk_cloze", "acc,none"), ("topk_topic_mc", "acc,none"), ("topk_topic_mc", "acc_norm,none")):
            assert 0 <= r[task][key] <= 1
        assert r["topk_heldout"]["sample_len"] == LIMIT
    assert trained["topk_heldout"]["word_perplexity,none"] < 0.2 * untrained["topk_heldout"]["word_perplexity,none"]
    assert trained["topk_cloze"]["perplexity,none"] < untrained["topk_cloze"]["perplexity,none"]
    assert proc.stdout.strip().splitlines()[-1].startswith("wrote lm-eval's results for 4 model(s)")


def test_several_models_in_one_table(local_eval):
    proc, out = local_eval
    header, *rows = table_rows(out)
    assert header == ["Model", "Step", "D", "L", "TopK", "Perplexity ↓ Held-out", "Perplexity ↓ Cloze",
                      "Accuracy ↑ Cloze", "Accuracy ↑ Topic-MC"]
    assert [r[:5] for r in rows] == [["tiny", str(RUN_STEPS), "64", "4", "✓ k=8"],
                                     ["tiny", str(RUN_SAVE_EVERY), "64", "4", "✓ k=8"],
                                     ["untrained", "0", "64", "4", "✓ k=8"], ["dense-llama", "–", "32", "2", "✗"]]
    r = results(out, f"tiny-step{RUN_STEPS}")
    expected = (r["topk_heldout"]["word_perplexity,none"], r["topk_cloze"]["perplexity,none"],
                100 * r["topk_cloze"]["acc,none"], 100 * r["topk_topic_mc"]["acc,none"])
    assert rows[0][5:] == [f"{v:.2f}" for v in expected]
    assert (out / "table.md").read_text().strip() in proc.stdout  # printed as well
    # lm-eval's own JSON per model, with the task configs it ran
    saved = json.loads((out / f"tiny-step{RUN_STEPS}.json").read_text())
    assert set(saved["configs"]) == {"topk_heldout", "topk_cloze", "topk_topic_mc"}
    assert saved["topk_ds"]["train_step"] == RUN_STEPS and saved["topk_ds"]["max_length"] == 256


def test_local_task_data_is_the_generators(tmp_path):
    """The shipped eval/local data is exactly what `topk-ds eval-make-local` writes; a copy elsewhere
    is a complete task directory."""
    from topk_ds.evaluate.local_tasks import FILES, TASK_FILES, make_local_tasks
    from topk_ds.evaluate.suites import LOCAL_DIR

    counts = make_local_tasks(tmp_path)
    for name, (_, _, n) in FILES.items():
        assert (tmp_path / name).read_bytes() == (LOCAL_DIR / name).read_bytes()
        assert counts[name] == n == len((tmp_path / name).read_text().splitlines())
    assert all((tmp_path / name).is_file() for name in TASK_FILES)
    assert sum((LOCAL_DIR / name).stat().st_size for name in FILES) < 1_000_000


def test_heldout_documents_are_not_training_documents(synthetic_data):
    from topk_ds.evaluate.suites import LOCAL_DIR

    corpus, _ = synthetic_data
    train = {json.loads(line)["text"] for line in (corpus / "corpus.jsonl").read_text().splitlines()}
    heldout = [json.loads(line)["text"] for line in (LOCAL_DIR / "heldout.jsonl").read_text().splitlines()]
    assert not train & set(heldout)


# --- the paper suite -------------------------------------------------------------------------------

def test_validation_documents_are_the_val_split(synthetic_data):
    from topk_ds.evaluate.valid import validation_documents

    corpus, data = synthetic_data
    texts = [json.loads(line)["text"] for line in (corpus / "corpus.jsonl").read_text().splitlines()]
    docs = validation_documents(data)
    manifest = json.loads((data / "manifest.json").read_text())
    assert len(docs) == manifest["documents"]["val"]
    assert all(doc in texts for doc in docs)


def test_paper_validation_perplexity_offline(tiny_run, tmp_path):
    """The Valid. column from the run's own prepared data; the other columns stay empty."""
    out = tmp_path / "paper"
    proc = run_cli("eval", tiny_run, "--suite", "paper", "--tasks", "fineweb_edu_valid", "--out", out,
                   "--limit", 20)
    valid = results(out, f"tiny-step{RUN_STEPS}")["fineweb_edu_valid"]
    assert math.isfinite(valid["word_perplexity,none"]) and valid["sample_len"] == 20
    header, row = table_rows(out)
    assert header[5:] == ["Perplexity ↓ Valid.", "Perplexity ↓ LAMBADA", "Perplexity ↓ Wikitext", "Accuracy ↑ LAMBADA",
                          "Accuracy ↑ ARC-e", "Accuracy ↑ ARC-c", "Accuracy ↑ Winogrande", "Accuracy ↑ OBQA",
                          "Accuracy ↑ HellaSwag"]
    assert row[5] == f"{valid['word_perplexity,none']:.2f}" and row[6:] == ["–"] * 8
    assert "wrote lm-eval's results for 1 model(s)" in proc.stdout


def test_paper_hub_tasks_offline_fail_in_one_line(tiny_hf, tmp_path):
    out = tmp_path / "paper"
    proc = run_cli("eval", tiny_hf, "--suite", "paper", "--tasks", "wikitext", "arc_easy", "--out", out,
                   check=False, env={"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1",
                                     "HF_DATASETS_CACHE": str(tmp_path / "empty-cache")})
    assert_clean_failure(proc, "wikitext needs EleutherAI/wikitext_document_level", "arc_easy needs allenai/ai2_arc",
                         "HF_DATASETS_OFFLINE", "--tasks")
    assert not out.exists()


# --- eval's bad inputs -----------------------------------------------------------------------------

def test_eval_unknown_task(tiny_hf, tmp_path):
    proc = run_cli("eval", tiny_hf, "--suite", "local", "--tasks", "topk_heldout", "no_such_task", "--out",
                   tmp_path / "out", check=False)
    assert_clean_failure(proc, "unknown task no_such_task", "topk_heldout, topk_cloze, topk_topic_mc")
    assert not (tmp_path / "out").exists()


def test_eval_missing_model(tiny_hf, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "table.md").write_text("earlier results\n")
    proc = run_cli("eval", tiny_hf, tmp_path / "nowhere", "--suite", "local", "--out", out, check=False)
    assert_clean_failure(proc, "nowhere: no such file or directory")
    assert [p.name for p in out.iterdir()] == ["table.md"] and (out / "table.md").read_text() == "earlier results\n"


# --- the converted model outside topk_ds -----------------------------------------------------------

def test_plain_transformers_loads_and_samples_without_the_package(tiny_hf, tmp_path):
    script = f"""
import sys
sys.modules["topk_ds"] = None  # any import of the package now fails
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
model = AutoModelForCausalLM.from_pretrained({str(tiny_hf)!r}, trust_remote_code=True)
tok = AutoTokenizer.from_pretrained({str(tiny_hf)!r}, trust_remote_code=True)
assert not type(model).__module__.startswith("topk_ds"), type(model).__module__
g = model.generation_config
assert (g.do_sample, g.temperature, g.top_p, g.top_k) == (True, 0.7, 0.9, 50), g
torch.manual_seed(0)
prompt = tok("The chef cooks", return_tensors="pt").input_ids
out = model.generate(prompt, max_new_tokens=12)
assert out.shape[1] > prompt.shape[1]
print(tok.decode(out[0]))
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, timeout=300,
                          env={**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules")})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "The chef cooks" in proc.stdout


def test_greedy_generation_same_with_and_without_cache(tiny_hf):
    from topk_ds import load

    model, tok = load(tiny_hf)
    prompt = tok("There are three chefs in the kitchen.", return_tensors="pt").input_ids
    kw = dict(do_sample=False, max_new_tokens=24, min_new_tokens=24)
    with_cache = model.generate(prompt, use_cache=True, **kw)
    without = model.generate(prompt, use_cache=False, **kw)
    assert with_cache.shape[1] == prompt.shape[1] + 24
    assert torch.equal(with_cache, without)


def test_zero2_and_zero3_checkpoints_convert_with_logits_parity(tiny_run, synthetic_data, tmp_path):
    """The tiny run (ZeRO-2, ds_configs/cpu.json) and a one-rank ZeRO-3 run of the same model."""
    assert_converts_with_parity(tiny_run / "checkpoints" / f"global_step{RUN_STEPS}", tmp_path / "zero2")
    run = tmp_path / "zero3"
    train_tiny(synthetic_data[1], run, "train.steps=6", "train.save_every=6", "train.eval_every=0",
               "train.ds_config=ds_configs/zero3_bf16.json", "topk.anneal_ratio=0.5")
    assert json.loads((run / "ds_config.json").read_text())["zero_optimization"]["stage"] == 3
    assert_converts_with_parity(run / "checkpoints" / "global_step6", tmp_path / "zero3-hf")


def test_logits_parity_training_checkpoint_vs_converted(tiny_run, tiny_hf):
    from topk_ds import load

    from_run, tok = load(tiny_run)
    converted, _ = load(tiny_hf)
    assert from_run.config.topk_alpha == converted.config.topk_alpha == 0.0
    ids = tok("Why do the chefs cook some potatoes? The soup is warm.", return_tensors="pt").input_ids
    with torch.no_grad():
        a, b = from_run(ids).logits, converted(ids).logits
    assert a.dtype == b.dtype == torch.float32
    assert (a - b).abs().max().item() <= 1e-5


# --- the converter's bad inputs: one line, exit != 0, nothing half-written -------------------------

def copy_tag(tiny_run, root, step=RUN_STEPS):
    """A copy of one checkpoint and the run's config, to damage."""
    tag = root / "run" / "checkpoints" / f"global_step{step}"
    shutil.copytree(tiny_run / "checkpoints" / tag.name, tag)
    shutil.copy2(tiny_run / "config.yaml", root / "run" / "config.yaml")
    return tag


def test_convert_not_a_checkpoint(tmp_path, capsys):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "readme.txt").write_text("not weights")
    assert_one_error(cli_main(capsys, "convert", tmp_path / "notes", tmp_path / "out"), "is not a checkpoint")
    assert not (tmp_path / "out").exists()
    no_temporaries(tmp_path)


def test_convert_missing_tag(tiny_run, tmp_path, capsys):
    assert_one_error(cli_main(capsys, "convert", tiny_run, tmp_path / "out", "--tag", "global_step999"),
                     "no checkpoint tag 'global_step999'", f"global_step{RUN_STEPS}")
    assert not (tmp_path / "out").exists()
    no_temporaries(tmp_path)


def test_convert_truncated_shard(tiny_run, tmp_path, capsys):
    tag = copy_tag(tiny_run, tmp_path)
    shard = next(tag.glob("*optim_states.pt"))
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    assert_one_error(cli_main(capsys, "convert", tag, tmp_path / "out"), shard.name, "truncated")
    assert not (tmp_path / "out").exists()
    no_temporaries(tmp_path)


def test_convert_config_does_not_match_weights(tiny_run, tmp_path, capsys):
    tag = copy_tag(tiny_run, tmp_path)
    config = tag.parents[1] / "config.yaml"
    cfg = yaml.safe_load(config.read_text())
    cfg["model"]["dim"] = 96
    config.write_text(yaml.safe_dump(cfg))
    assert_one_error(cli_main(capsys, "convert", tag, tmp_path / "out"), "does not match the weights")
    assert not (tmp_path / "out").exists()
    no_temporaries(tmp_path)


def test_convert_existing_out_needs_force(tiny_run, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "config.json").write_text("{}")  # an earlier conversion: replaced only with --force
    assert_one_error(cli_main(capsys, "convert", tiny_run, out), "already exists", "--force")
    (out / "config.json").unlink()
    (out / "mine.txt").write_text("keep me")  # not a model: never replaced, --force or not
    assert_one_error(cli_main(capsys, "convert", tiny_run, out, "--force"), "holds no config.json")
    assert [p.name for p in out.iterdir()] == ["mine.txt"] and (out / "mine.txt").read_text() == "keep me"
    no_temporaries(tmp_path)
