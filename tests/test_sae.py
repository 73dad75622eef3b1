"""Post-hoc SAEs (EleutherAI's sparsify behind topk_ds/sae) as analysis units: training and loading with the
library's own loader, latent statistics against a brute-force recomputation from the SAE's own encode,
steering by exactly c * W_dec[i], Hungarian matching, the three-way comparison on the concept-forming
pair, and bad inputs."""

import json
import math

import pytest
import torch

from conftest import CONCEPT_STEPS, RUN_SAVE_EVERY, SAE_TOKENS, assert_one_error, cli_main, hooked_outputs
from topk_ds.cli import main


def cli(*args):
    main([str(a) for a in args])


def test_sae_trains_and_loads_with_the_librarys_loader(sae_dir, tiny_hf, capsys):
    import sparsify

    from topk_ds import load
    from topk_ds.analysis.units import model_fingerprint

    saes = sparsify.SparseCoder.load_many(str(sae_dir), local=True)
    assert sorted(saes) == ["layers.0", "layers.1"]  # the blocks a TopK layer sparsifies
    for sae in saes.values():
        assert (sae.d_in, sae.num_latents, sae.cfg.k) == (64, 64, 8)  # D, expansion 1, the TopK LM's k
    record = json.loads((sae_dir / "topk_ds.json").read_text())
    model, _ = load(tiny_hf)
    assert record["model_fingerprint"] == model_fingerprint(model)
    assert record["tokens"] >= SAE_TOKENS and record["seconds"] > 0 and record["flops"] > 0
    assert record["library"].startswith("eai-sparsify")


def test_latent_statistics_equal_a_brute_force_recomputation(sae_dir, tiny_hf, synthetic_data):
    """collect() over an SAE's latents (accumulated sparsely, k per token) equals a plain dense accumulation
    of the SAE's own encode of the block outputs, recorded by hooks over the same batches."""
    import sparsify

    from topk_ds import load
    from topk_ds.analysis.data import token_batches
    from topk_ds.analysis.stats import collect
    from topk_ds.sae import Latents

    model, tok = load(tiny_hf)
    units = Latents(model, sae_dir)
    batches = list(token_batches(synthetic_data[1], tok, model.config.vocab_size, 64, 8192, 16))
    stats = collect(units, tok, batches, 8192, progress=False)
    assert [r["kind"] for r in stats.meta["layers"]] == ["sae", "sae"] and stats.meta["units"] == "latent"
    assert stats.meta["fingerprint"]["sae"]["layers"] == [0, 1]

    outputs = hooked_outputs(model.model.layers, (0, 1), 64, lambda: [model.model(b) for b in batches])
    tokens = torch.cat([b.reshape(-1) for b in batches])
    for l, out in outputs.items():
        sae = sparsify.SparseCoder.load_from_disk(sae_dir / f"layers.{l}")
        with torch.no_grad():
            top_acts, top_idx, _ = sae.encode(out)
        acts = torch.zeros(len(tokens), sae.num_latents).scatter_(1, top_idx, top_acts)
        torch.testing.assert_close(stats.layers[l].sums, torch.zeros(stats.meta["vocab_size"], 64).index_add_(0, tokens, acts))
        assert torch.equal(stats.layers[l].fires, (acts > 0).sum(0))
        torch.testing.assert_close(stats.layers[l].top_values, acts.topk(20, dim=0).values.T)


def test_sae_steering_adds_exactly_c_times_the_decoder_row(sae_dir, tiny_hf):
    """Steering latent 1:i adds c * W_dec[i] to the output of block 1, and nothing else there or before it: on a
    forward pass, and at every step of generation under the KV cache."""
    from topk_ds import load
    from topk_ds.sae import Latents

    model, tok = load(tiny_hf)
    units = Latents(model, sae_dir)
    i, c = 5, 3.0
    direction = units.directions(1)[i]
    prompt = tok("The chef", return_tensors="pt").input_ids

    def outputs(context):
        """Every block's output, seen by hooks registered after the steering one."""
        seen = {}
        with torch.no_grad(), context:
            handles = [b.register_forward_hook(lambda m, a, out, l=l: seen.setdefault(l, out.clone()))
                       for l, b in enumerate(model.model.layers)]
            model.model(prompt)
        for h in handles:
            h.remove()
        return seen

    import contextlib

    plain, steered = outputs(contextlib.nullcontext()), outputs(units.steered(1, i, c))
    assert torch.equal(plain[0], steered[0])  # the block before is untouched
    torch.testing.assert_close(steered[1] - plain[1], (c * direction).expand_as(plain[1]), rtol=0, atol=1e-6)

    before, after = [], []
    block = model.model.layers[1]
    first = block.register_forward_hook(lambda m, a, out: before.append(out.clone()))
    with units.steered(1, i, c):  # registered between the two observers
        last = block.register_forward_hook(lambda m, a, out: after.append(out.clone()))
        with torch.no_grad():
            model.generate(prompt, do_sample=False, max_new_tokens=4, min_new_tokens=4)
        last.remove()
    first.remove()
    assert [t.shape[1] for t in after] == [prompt.shape[1], 1, 1, 1]
    for b, a in zip(before, after):
        torch.testing.assert_close(a - b, (c * direction).expand_as(b), rtol=0, atol=1e-6)
    with torch.no_grad():
        assert torch.equal(outputs(contextlib.nullcontext())[1], plain[1])  # the hook is gone


def test_sae_commands_report_steer_and_trace_a_latent(sae_dir, tiny_hf, tiny_run, synthetic_data, tmp_path, capsys):
    """The --sae commands' success paths on the latent that fires most on one topic word: `analyze neuron` of the
    SAE's statistics reports it as a latent; `steer` writes the offsets with topic shares as neuron steering
    writes them; `analyze trace` of the run the SAE's model came from finds, at its final checkpoint, the mean
    activation the statistics measured on the same tokens."""
    from topk_ds.analysis.concepts import Concepts
    from topk_ds.analysis.stats import Stats
    from topk_ds.analysis.trace import token_id
    from topk_ds.convert.hf_export import load

    stats_dir, word, tokens = tmp_path / "stats", "chef", 4096
    cli("analyze", "stats", tiny_hf, "--sae", sae_dir, "--data", synthetic_data[1], "--tokens", tokens, "--seq-len", 64,
        "--top-contexts", 2, "--out", stats_dir)
    stats = Stats.load(stats_dir)
    v = token_id(load(tiny_hf)[1], word)
    abar = stats.abar(0)[v]
    i = int(abar.argmax())
    assert stats.counts[v] > 0 and abar[i] > 0

    capsys.readouterr()
    cli("analyze", "neuron", stats_dir, f"0:{i}", "--sae", sae_dir, "--json", tmp_path / "report.json")
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["unit"] == "latent" and report["neuron"] == f"0:{i}" and report["kind"] == "SAE k=8"
    assert report["tokens"] == tokens and report["fires"] > 0 and capsys.readouterr().out.startswith(f"latent 0:{i} (")

    concepts = Concepts.load(synthetic_data[0] / "concepts.json")
    topic = next(t for t, words in concepts.topics.items() if word in words)
    peak = float(stats.layers[0].top_values[i, 0])
    offsets = [round(peak, 3), round(10 * peak, 3)]
    cli("steer", tiny_hf, "--sae", sae_dir, "--neuron", f"0:{i}", *[a for c in offsets for a in ("--offset", c)],
        "--greedy", "--max-new-tokens", 12, "--stats", stats_dir, "--concepts", concepts.path, "--topic", topic)
    result = json.loads((stats_dir / "steering" / f"0_{i}.json").read_text())
    assert result["units"] == "latent" and result["neuron"] == f"0:{i}" and result["topic"] == topic
    assert [r["offset"] for r in result["offsets"]] == [0.0, *offsets]
    for r in result["offsets"]:
        assert len(r["texts"]) == 1 and 0 <= r["topic_words"] <= r["content_words"]
        assert r["share"] == (r["topic_words"] / r["content_words"] if r["content_words"] else 0.0)
    assert result["offsets"][-1]["ids"] != result["offsets"][0]["ids"]  # 10x its peak along W_dec[i] changes the text

    cli("analyze", "trace", tiny_run, "--sae", sae_dir, "--neuron", f"0:{i}", "--token", word, "--tokens", tokens,
        "--seq-len", 64, "--out", tmp_path / "trace")
    trace = json.loads((tmp_path / "trace" / f"sae-trace-{i}-{word}.json").read_text())
    assert trace["units"] == "latent" and trace["layers"] == [0, 1] and trace["steps"] == [100, 200, 300]
    assert trace["count"] == int(stats.counts[v]) and (tmp_path / "trace" / f"sae-trace-{i}-{word}.png").is_file()
    assert trace["mean"][0][-1] == pytest.approx(float(abar[i]), rel=1e-4)  # the checkpoint the SAE's model is


def test_hungarian_matching_recovers_a_planted_permutation():
    from topk_ds.analysis.compare import match

    g = torch.Generator().manual_seed(3)
    a = torch.nn.functional.normalize(torch.randn(50, 16, generator=g), dim=1)
    perm = torch.randperm(50, generator=g)
    b = 2.0 * a[perm] + 0.05 * torch.randn(50, 16, generator=g)  # scaled and noisy: cosine, not dot product
    j, cos = match(a, b)
    assert torch.equal(perm[j], torch.arange(50))  # row i of a is matched to the row of b made from it
    assert (cos > 0.9).all() and (cos <= 1).all()
    j, cos = match(a, b[:30])  # fewer rows on the other side: the rest stay unmatched
    assert (j >= 0).sum() == 30 and cos.isnan().sum() == 20


def _finite(value, where=""):
    if isinstance(value, dict):
        for k, v in value.items():
            _finite(v, f"{where}.{k}")
    elif isinstance(value, list):
        for k, v in enumerate(value):
            _finite(v, f"{where}[{k}]")
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        assert math.isfinite(value), where


@pytest.mark.slow
def test_comparison_reports_three_contenders_with_every_metric_finite(concept_model, concept_dense, synthetic_data,
                                                                      tmp_path, capsys):
    dense_hf = concept_dense
    cli("sae", "train", dense_hf, "--data", synthetic_data[1], "--tokens", 32_000, "--seq-len", 128,
        "--out", tmp_path / "sae")
    out = tmp_path / "compare"
    cli("analyze", "compare", "--topk", concept_model[0].parent / "run", "--dense", dense_hf.parent / "run",
        "--sae", tmp_path / "sae", "--data", synthetic_data[1], "--tokens", 32_000, "--seq-len", 128,
        "--val-tokens", 8192, "--seeds", 2, "--steer-units", 2, "--samples", 2, "--max-new-tokens", 16, "--out", out)
    out_text, err = capsys.readouterr()
    assert "(3 contenders)" in out_text and "sae train: 32,000 tokens x" in err
    result = json.loads((out / "compare.json").read_text())
    cs = result["contenders"]
    assert [c["kind"] for c in cs] == ["topk", "dense", "sae"] and result["layers"] == [0, 1]
    for c in cs:
        assert c["layers"] == [0, 1] and c["units"] == 256
        assert 0 <= c["topics_recovered"] <= len(result["topics"]) and 0 <= c["mean_best_f1"] <= 1
        assert 0 <= c["steering_success"] <= 1 and c["steering"]["n"] == 2
        stability = c["checkpoint_stability"]
        assert [p["step"] for p in stability["checkpoints"]] == [CONCEPT_STEPS // 2]
        assert stability["final_step"] == CONCEPT_STEPS
        assert 0 <= stability["share"] <= 1
        for key in ("mean", "std"):
            assert c["token_entropy"][key] is not None and c["semantic_entropy"][key] is not None
        assert c["cost"]["seconds_vs_dense"] > 0 and c["cost"]["flops_vs_dense"] > 0
        _finite(c, c["name"])
    topk, dense, sae = cs
    assert dense["cost"]["seconds_vs_dense"] == 1.0 and sae["cost"]["seconds_vs_dense"] > 1.0
    assert sae["checkpoint_stability"]["checkpoints"][0]["matched_cosine"]["median"] < 1.0  # a new SAE, matched
    assert topk["checkpoint_stability"]["checkpoints"][0]["matched_cosine"]["median"] == 1.0  # neurons keep their index
    assert topk["seeds"] is None and 0 <= sae["seeds"]["shared"] <= 1
    validation = sae["cost"]["validation"]
    assert validation["split"] == "val" and all(v >= validation["loss"] - 0.05 for v in validation["loss_spliced"].values())
    assert topk["cost"]["validation"]["loss_spliced"]["0"] == topk["cost"]["validation"]["loss"]  # its own code
    md = (out / "compare.md").read_text()
    assert "| topics recovered" in md and "## What it says" in md and "SAE 1x" in md
    assert (out / "compare.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / "saes" / f"sae-1x-step{CONCEPT_STEPS // 2}" / "layers.0" / "sae.safetensors").is_file()


# --- bad input: one line, exit != 0 ----------------------------------------------------------------

def _fake_sae(path, d_in: int, layers: list[int], like):
    """An SAE directory in the library's format with a record copied from a real one, of another width/layers."""
    import sparsify

    for l in layers:
        sparsify.SparseCoder(d_in, sparsify.SaeConfig(k=4, expansion_factor=1)).save_to_disk(path / f"layers.{l}")
    record = json.loads((like / "topk_ds.json").read_text()) | {"layers": layers, "d_in": d_in}
    (path / "topk_ds.json").write_text(json.dumps(record))
    return path


def test_bad_saes_and_layers_end_in_one_line(sae_dir, tiny_hf, tiny_run, synthetic_data, tmp_path, capsys):
    def fails(*args, words):
        assert_one_error(cli_main(capsys, *args), *words)

    data = ("--data", synthetic_data[1])
    wide = _fake_sae(tmp_path / "wide", 32, [0], sae_dir)
    fails("analyze", "stats", tiny_hf, "--sae", wide, *data, "--out", tmp_path / "s", words=["32-wide", "64 wide"])
    deep = _fake_sae(tmp_path / "deep", 64, [7], sae_dir)
    fails("steer", tiny_hf, "--sae", deep, "--neuron", "7:0", "--offset", 1, words=["layer 7", "0..3"])
    (tmp_path / "empty").mkdir()
    fails("analyze", "neuron", tiny_hf, "0:1", "--sae", tmp_path / "empty", *data, words=["not an SAE directory"])
    fails("steer", tiny_hf, "--sae", sae_dir, "--neuron", "0:64", "--offset", 1,
          words=["latent index 64 is out of range", "0..63"])
    fails("analyze", "trace", tiny_run, "--sae", sae_dir, "--neuron", "3:1", "--token", "chef", "--out", tmp_path / "t",
          words=["layer 3 has no units", "0, 1"])
    fails("sae", "train", tiny_hf, *data, "--layers", "0,9", "--out", tmp_path / "x", words=["layer 9 does not exist", "0..3"])
    fails("sae", "train", tiny_hf, *data, "--k", 65, "--out", tmp_path / "x", words=["--k 65", "64 latents"])
    fails("analyze", "browse", tmp_path / "empty", "--sae", sae_dir, "--out", tmp_path / "site", words=["holds no statistics"])
    fails("analyze", "compare", "--topk", tiny_run, "--dense", tiny_run / "checkpoints" / f"global_step{RUN_SAVE_EVERY}",
          "--sae", sae_dir, *data, "--concepts", synthetic_data[0], "--out", tmp_path / "c",
          words=["trained on another model", f"step {RUN_SAVE_EVERY}"])
    assert not any(p.name.startswith(".") or p.name in ("s", "t", "x", "site", "c") for p in tmp_path.iterdir())


def test_statistics_of_another_sae_are_refused(sae_dir, tiny_hf, synthetic_data, tmp_path, capsys):
    cli("analyze", "stats", tiny_hf, "--sae", sae_dir, "--data", synthetic_data[1], "--tokens", 4096, "--seq-len", 64,
        "--top-contexts", 2, "--out", tmp_path / "stats")
    cli("sae", "train", tiny_hf, "--data", synthetic_data[1], "--tokens", 4096, "--seq-len", 64, "--seed", 1,
        "--out", tmp_path / "other")
    capsys.readouterr()
    assert_one_error(cli_main(capsys, "analyze", "browse", tmp_path / "stats", "--sae", tmp_path / "other", "--out",
                              tmp_path / "site"), "of another SAE")
    assert_one_error(cli_main(capsys, "analyze", "neuron", tiny_hf, "0:1", "--sae", tmp_path / "other", "--stats",
                              tmp_path / "stats"), "come from another SAE")
    cli("analyze", "browse", tmp_path / "stats", "--sae", sae_dir, "--out", tmp_path / "site")
    assert "latent browser (128 latent pages)" in capsys.readouterr().out
    assert "latents of the SAE in" in (tmp_path / "site" / "index.html").read_text()
