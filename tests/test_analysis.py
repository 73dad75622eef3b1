"""The interpretability toolkit: entropies against a naive re-implementation, sparse against dense
accumulation, saved statistics, and ground truth on the tiny TopK run (a concept neuron that matches
a planted topic, and steering with it), tracing over checkpoints, the browser, and bad inputs."""

import json
import math
import re

import numpy as np
import pytest
import torch

from conftest import RUN_SAVE_EVERY, RUN_STEPS, STATS_TOKENS, hooked_outputs, run_cli
from test_eval import assert_clean_failure


# --- entropies against a naive reference -----------------------------------------------------------

def naive_token_entropy(abar: np.ndarray) -> np.ndarray:
    out = []
    for column in abar.T:
        if column.sum() == 0:
            out.append(math.nan)
            continue
        p = column / column.sum()
        out.append(-sum(x * math.log(x) for x in p if x > 0))
    return np.array(out)


def naive_semantic_entropy(abar, freq, emb, q=99.0, ratio=0.7, bins=100):
    out, sizes = [], []
    for column in abar.T:
        theta = ratio * np.percentile(column, q)
        s = [v for v in range(len(column)) if column[v] > theta]
        sizes.append(len(s))
        if len(s) < 2:
            out.append(math.nan)
            continue
        hist = np.zeros(bins)
        for u in s:
            for v in s:
                if u != v:
                    cos = emb[u] @ emb[v] / (np.linalg.norm(emb[u]) * np.linalg.norm(emb[v]))
                    hist[min(int((cos + 1) / 2 * bins), bins - 1)] += freq[u] * freq[v]
        p = hist / hist.sum()
        out.append(-sum(x * math.log(x) for x in p if x > 0))
    return np.array(out), np.array(sizes)


@pytest.fixture
def random_layer():
    """abar (V, D) with dead, single-token and ordinary neurons; corpus counts; an embedding."""
    g = torch.Generator().manual_seed(1)
    V, D, E = 80, 14, 16
    abar = torch.rand(V, D, generator=g) * (torch.rand(V, D, generator=g) < 0.3)
    abar[:, 0] = 0  # never fired
    abar[:, 1] = 0
    abar[5, 1] = 2.0  # one token only: |S| = 1
    freq = torch.randint(1, 50, (V,), generator=g)
    emb = torch.randn(V, E, generator=g)
    return abar, freq, emb


def test_token_entropy_matches_naive(random_layer):
    from topk_ds.analysis.entropy import token_entropy

    abar, _, _ = random_layer
    ours, ref = token_entropy(abar).numpy(), naive_token_entropy(abar.double().numpy())
    assert np.isnan(ours[0]) and np.isnan(ref[0]) and ours[1] == 0.0
    np.testing.assert_allclose(ours[2:], ref[2:], rtol=1e-5)
    assert (ours[2:] <= math.log(len(abar)) + 1e-6).all()


@pytest.mark.parametrize("q, ratio, bins", [(99.0, 0.7, 100), (90.0, 0.5, 20)])
def test_semantic_entropy_matches_naive(random_layer, q, ratio, bins):
    from topk_ds.analysis.entropy import semantic_entropy

    abar, freq, emb = random_layer
    ours, size, theta = semantic_entropy(abar, freq, emb, q, ratio, bins)
    blocked, _, _ = semantic_entropy(abar, freq, emb, q, ratio, bins, block=3)  # |S| x |S| pairs in row blocks
    torch.testing.assert_close(blocked, ours, equal_nan=True)
    ref, ref_size = naive_semantic_entropy(abar.double().numpy(), freq.numpy(), emb.double().numpy(), q, ratio, bins)
    np.testing.assert_array_equal(size.numpy(), ref_size)
    assert np.isnan(ours[1].item()) and size[1] == 1  # |S| < 2: no semantic entropy
    np.testing.assert_allclose(ours.numpy(), ref, rtol=1e-5, equal_nan=True)
    assert np.nanmax(ours.numpy()) <= math.log(bins)
    np.testing.assert_allclose(theta.numpy(), ratio * np.percentile(abar.numpy(), q, axis=0), rtol=1e-5)


def test_top_tokens_are_only_tokens_the_neuron_fires_on():
    """A neuron that fires on two words has two top tokens, precision over those two, and a dead neuron
    has none (not the lowest token ids)."""
    from topk_ds.analysis.concepts import Concepts, label, top_tokens

    pieces = ["<unk>", "<s>", "</s>", "▁chef", "▁soup", "▁king", "▁the", "▁war"]
    abar = torch.zeros(8, 3)
    abar[3, 0], abar[4, 0] = 2.0, 1.0  # neuron 0: chef, soup (food)
    abar[5, 1], abar[7, 1], abar[6, 1] = 3.0, 2.0, 1.0  # neuron 1: king, war (history), the
    counts = torch.full((8,), 10)
    values, ids = top_tokens(abar, counts, n=5, min_count=1)
    assert label(ids[:, 0], values[:, 0], pieces) == "chef/soup" and label(ids[:, 2], values[:, 2], pieces) == "-"
    concepts = Concepts({"food": {"chef", "soup"}, "history": {"king", "war"}}, {"the"})
    scores = concepts.score(abar, counts, torch.full((3,), 0.5), pieces, values, ids)
    assert scores["topic"] == ["food", "history", None]
    torch.testing.assert_close(scores["precision"], torch.tensor([1.0, 2 / 3, 0.0]))
    torch.testing.assert_close(scores["recall"], torch.tensor([1.0, 1.0, 0.0]))


# --- accumulation ------------------------------------------------------------------------------------

def accumulate(k, acts_batches, tokens_batches, top=5, before=1, after=1):
    """Each batch one sequence, so a context window stops at its batch's ends."""
    from topk_ds.analysis.stats import LayerStats, windows

    V, D = 30, acts_batches[0].shape[1]
    ls = LayerStats.empty(0, V, D, k, top=top, context=before + 1 + after)
    for acts, tokens in zip(acts_batches, tokens_batches):
        ls.update(acts, tokens, lambda pos, T=len(acts): windows(pos, T, before, after))
    return ls


def test_sparse_and_dense_accumulation_agree_with_brute_force():
    """A TopK layer's output accumulated on its k indices only equals the dense accumulation, and the
    streamed top contexts (tokens and the neuron's activation at each) equal those of the best activations
    over all positions; the histogram counts every non-zero activation in its bin."""
    from topk_ds.analysis.stats import histogram_edges
    from topk_ds.model.topk import topk_activation

    g = torch.Generator().manual_seed(2)
    N, D, k, V = 400, 48, 6, 30
    acts = topk_activation(torch.randn(N, D, generator=g) * 3, k)  # <= k non-zeros per row
    tokens = torch.randint(0, V, (N,), generator=g)
    batches = [slice(0, 70), slice(70, 250), slice(250, N)]
    sparse = accumulate(k, [acts[b] for b in batches], [tokens[b] for b in batches])
    dense = accumulate(None, [acts[b] for b in batches], [tokens[b] for b in batches])

    expected = torch.zeros(V, D).index_add_(0, tokens, acts)
    torch.testing.assert_close(sparse.sums, expected)
    torch.testing.assert_close(dense.sums, expected)
    assert torch.equal(sparse.fires, (acts > 0).sum(0)) and torch.equal(dense.fires, sparse.fires)
    edges = histogram_edges()
    for d in range(D):  # brute force: every non-zero in the bin whose edges hold it (the ends catch the rest)
        values = acts[:, d][acts[:, d] > 0].double()
        bins = [max(0, min(len(edges) - 2, int((edges <= v).sum()) - 1)) for v in values]
        expected_hist = torch.bincount(torch.tensor(bins, dtype=torch.int64), minlength=len(edges) - 1)
        assert torch.equal(sparse.histogram[d], expected_hist) and torch.equal(dense.histogram[d], expected_hist)
    # each position's window of tokens and activations, cut at its batch's ends
    batch_of = torch.cat([torch.full((b.stop - b.start,), j) for j, b in enumerate(batches)])
    around = torch.arange(N)[:, None] + torch.arange(-1, 2)
    inside = (around >= 0) & (around < N) & (batch_of[around.clamp(0, N - 1)] == batch_of[:, None])
    best, where = acts.topk(5, dim=0)  # (5, D)
    for ls in (sparse, dense):
        torch.testing.assert_close(ls.top_values, best.T.clamp(min=0))
        live = best.T > 0
        at = where.T[live]  # (n,) positions of the live top activations
        assert torch.equal(ls.top_contexts[live], torch.where(inside[at], tokens[around[at].clamp(0, N - 1)], -1).int())
        neuron = torch.arange(D).expand(5, D).T[live]
        torch.testing.assert_close(ls.top_acts[live], torch.where(inside[at], acts[around[at].clamp(0, N - 1), neuron[:, None]], 0.0))
        assert (ls.top_contexts[~live] == -1).all() and (ls.top_acts[~live] == 0).all()


def test_stats_file_contents_and_round_trip(stats_dir, tiny_hf, synthetic_data):
    from topk_ds import load
    from topk_ds.analysis.stats import Stats
    from topk_ds.analysis.units import Neurons

    stats = Stats.load(stats_dir)
    meta = stats.meta
    assert meta["tokens"] == STATS_TOKENS and int(stats.counts.sum()) == STATS_TOKENS
    assert [row["kind"] for row in meta["layers"]] == ["topk", "topk", "dense", "dense"]
    assert [row["accumulation"] for row in meta["layers"]] == ["sparse", "sparse", "dense", "dense"]
    assert meta["concepts"] and meta["concepts"].endswith("concepts.json")  # found beside the corpus
    for row in meta["layers"][:2]:  # TopK layers: at most k = 8 non-zeros per token
        assert 0 < row["l0"] <= 8
    assert meta["layers"][2]["l0"] > 8
    model, _ = load(tiny_hf)
    stats.check_units(Neurons(model))  # the fingerprint matches the model it came from
    # saved and reloaded: equal
    copy = Stats.load(stats.save(stats_dir.parent / "copy"))
    assert copy.meta == stats.meta and copy.pieces == stats.pieces
    assert torch.equal(copy.counts, stats.counts) and torch.equal(copy.embedding, stats.embedding)
    for l, ls in stats.layers.items():
        for name in ls.TENSORS:
            torch.testing.assert_close(getattr(copy.layers[l], name), getattr(ls, name), rtol=0, atol=0, equal_nan=True)


def test_collect_equals_a_dense_reference_on_the_model(tiny_hf, synthetic_data):
    """collect() accumulates the TopK layers on their k indices only; a plain dense accumulation of the
    same layer outputs, recorded by hooks over the same batches, gives the same statistics."""
    from topk_ds import load
    from topk_ds.analysis.data import token_batches
    from topk_ds.analysis.stats import collect
    from topk_ds.analysis.units import Neurons

    model, tok = load(tiny_hf)
    batches = list(token_batches(synthetic_data[1], tok, model.config.vocab_size, 64, 8192, 16))
    stats = collect(Neurons(model), tok, batches, 8192, layers=[0, 1, 2], progress=False)
    assert [r["accumulation"] for r in stats.meta["layers"]] == ["sparse", "sparse", "dense"]

    outputs = hooked_outputs(model.model.sites(), (0, 1, 2), 64, lambda: [model.model(b) for b in batches])
    tokens = torch.cat([b.reshape(-1) for b in batches])
    for l, out in outputs.items():
        acts = out.clamp(min=0)
        torch.testing.assert_close(stats.layers[l].sums, torch.zeros(stats.meta["vocab_size"], 64).index_add_(0, tokens, acts))
        assert torch.equal(stats.layers[l].fires, (acts > 0).sum(0))
        torch.testing.assert_close(stats.layers[l].top_values, acts.topk(20, dim=0).values.T)


# --- ground truth on the synthetic corpus -----------------------------------------------------------

def layer_rows(stats_dir, layers=(0, 1)):
    """LayerReport rows of every neuron of the given layers, labelled with the planted topics."""
    from topk_ds.analysis.concepts import Concepts
    from topk_ds.analysis.report import LayerReport
    from topk_ds.analysis.stats import Stats

    stats = Stats.load(stats_dir)
    concepts = Concepts.load(stats.meta["concepts"])
    return [LayerReport(stats, l, concepts).summary(i) for l in layers for i in range(stats.layers[l].dim)], concepts


def concept_neurons(stats_dir):
    """Rows of every TopK-layer neuron whose top tokens are mostly one planted topic, strongest first."""
    rows, _ = layer_rows(stats_dir)
    return sorted((r for r in rows if r["topic"] and r["precision"] >= 0.8), key=lambda r: -r["top_mean"])


@pytest.mark.slow
def test_analysis_finds_a_planted_topic_neuron(concept_model, synthetic_data):
    _, stats_dir = concept_model
    found = concept_neurons(stats_dir)
    assert found, "no TopK neuron whose top tokens match one topic with precision >= 0.8"
    best = found[0]
    topics = json.loads((synthetic_data[0] / "concepts.json").read_text())["topics"]
    proc = run_cli("analyze", "neuron", stats_dir, best["neuron"], "--json", stats_dir.parent / "neuron.json")
    report = json.loads((stats_dir.parent / "neuron.json").read_text())
    assert report["topic"] == best["topic"] and report["precision"] >= 0.8 and 0 < report["recall"] <= 1
    words = [t["token"].strip() for t in report["top_tokens"]]
    assert sum(w in topics[best["topic"]] for w in words) >= 0.8 * len(words)
    assert report["contexts"] and report["contexts"][0]["activation"] == pytest.approx(report["max_activation"])
    assert f"topic: {best['topic']}" in proc.stdout and "top contexts" in proc.stdout


@pytest.mark.slow
def test_most_of_the_top_concept_neurons_steer_their_topic(concept_model):
    """A statement about a population, so it holds whichever CPU trained the fixture: of the five neurons
    most likely to steer (pure, strong, of a topic rare in unsteered samples; one per topic), at least half
    raise their topic's share of generated content words by >= 0.2 at 1 or 2 times their largest activation."""
    from topk_ds import load
    from topk_ds.analysis.steer import sample, steering_candidates, steering_success, topic_shares
    from topk_ds.analysis.units import Neurons

    hf, stats_dir = concept_model
    rows, concepts = layer_rows(stats_dir)
    model, tok = load(hf)
    baseline = sample(model, tok, "Once upon a time,", 6, 3, 48)
    candidates = steering_candidates(rows, concepts, topic_shares(baseline, concepts), n=5)
    assert len(candidates) == 5 and len({c["topic"] for c in candidates}) == 5
    result = steering_success(Neurons(model), tok, candidates, concepts, samples=6, seed=3, max_new_tokens=48,
                              baseline_texts=baseline, progress=False)
    assert result["success"] >= 0.5, [(u["neuron"], u["topic"], u["baseline_share"], u["shares"]) for u in result["units"]]


@pytest.mark.slow
def test_steer_command_writes_every_offset(concept_model):
    hf, stats_dir = concept_model
    best = concept_neurons(stats_dir)[0]
    offsets = [round(best["max_activation"], 1), round(2 * best["max_activation"], 1)]
    proc = run_cli("steer", hf, "--neuron", best["neuron"], "--offset", offsets[0], "--offset", offsets[1], "--samples", 3,
                   "--max-new-tokens", 16, "--seed", 3, "--stats", stats_dir)
    result = json.loads((stats_dir / "steering" / f"{best['layer']}_{best['index']}.json").read_text())
    base, *steered = result["offsets"]
    assert result["topic"] == best["topic"] and base["offset"] == 0 and [r["offset"] for r in steered] == offsets
    assert all(len(r["texts"]) == 3 and 0 <= r["share"] <= 1 for r in result["offsets"]) and base["content_words"] > 0
    assert "(unsteered)" in proc.stdout and f"wrote 3 x 3 samples of neuron {best['neuron']}" in proc.stdout


def test_steering_hook_reaches_every_generated_token(tiny_hf):
    """Under the KV cache each new token passes through the block alone; the offset must reach it."""
    from topk_ds import load
    from topk_ds.analysis.units import Neurons

    model, tok = load(tiny_hf)
    site, seen = model.model.sites()[0], []
    prompt = tok("The chef", return_tensors="pt").input_ids
    with torch.no_grad():
        plain = model.model(prompt)
        with Neurons(model).steered(0, 3, 100.0):
            # registered after the steering hook, so it sees the steered pre-activation
            handle = site.register_forward_pre_hook(lambda m, args: seen.append(args[0].clone()))
            model.generate(prompt, do_sample=False, max_new_tokens=5, min_new_tokens=5)
            handle.remove()
    assert [t.shape[1] for t in seen] == [prompt.shape[1], 1, 1, 1, 1]
    assert all((t[..., 3] > 50).all() for t in seen)
    assert torch.equal(model.model(prompt), plain)  # the hook is gone after the block


# --- tracing, figures, the browser ------------------------------------------------------------------

def test_trace_neuron_over_checkpoints_and_layers(tiny_run, tmp_path):
    proc = run_cli("analyze", "trace", tiny_run, "--neuron", "0:5", "--token", "chef", "--tokens", 4000,
                   "--out", tmp_path)
    result = json.loads((tmp_path / "trace-5-chef.json").read_text())
    assert result["steps"] == list(range(RUN_SAVE_EVERY, RUN_STEPS + 1, RUN_SAVE_EVERY))
    assert len(result["mean"]) == 4 and all(len(row) == 3 for row in result["mean"])
    assert result["count"] > 0 and all(v >= 0 for row in result["mean"] for v in row)
    assert (tmp_path / "trace-5-chef.png").read_bytes()[:4] == b"\x89PNG"
    assert "3 checkpoints" in proc.stdout


def test_trace_entropy_over_training(tiny_run, tmp_path):
    run_cli("analyze", "trace", tiny_run, "--entropy", "--tokens", 4000, "--out", tmp_path)
    result = json.loads((tmp_path / "entropy-trace.json").read_text())
    assert result["steps"] == list(range(RUN_SAVE_EVERY, RUN_STEPS + 1, RUN_SAVE_EVERY))
    assert [row["kind"] for row in result["layers"]] == ["topk", "topk", "dense", "dense"]
    for row in result["layers"]:
        assert len(row["token"]) == len(row["semantic"]) == 3
        assert all(s["p5"] <= s["mean"] <= s["p95"] for s in row["token"])
    assert (tmp_path / "entropy-trace.png").read_bytes()[:4] == b"\x89PNG"


def test_entropy_comparison_figure(stats_dir, tiny_run, synthetic_data, tmp_path):
    """Figure 3 for the converted model and an earlier checkpoint read straight from DeepSpeed."""
    early = tmp_path / "early"
    run_cli("analyze", "stats", tiny_run, "--tag", f"global_step{RUN_SAVE_EVERY}", "--data", synthetic_data[1],
            "--tokens", 20000, "--seq-len", 64, "--out", early)
    proc = run_cli("analyze", "entropy", stats_dir, early, "--names", "final", "early", "--compare", tmp_path / "fig3.png")
    assert (tmp_path / "fig3.png").read_bytes()[:4] == b"\x89PNG"
    assert "final:" in proc.stdout and "early:" in proc.stdout and "topk" in proc.stdout


def test_browser_is_self_contained(stats_dir, tmp_path):
    from topk_ds.analysis.stats import Stats

    site = tmp_path / "site"
    proc = run_cli("analyze", "browse", stats_dir, "--out", site)
    dims = [ls.dim for ls in Stats.load(stats_dir).layers.values()]
    pages = list((site / "neurons").glob("*.html"))
    assert len(pages) == sum(dims) and f"({sum(dims)} neuron pages)" in proc.stdout
    for page in [site / "index.html", site / "layer0.html", *pages[:50]]:  # every reference a file of the site
        html = page.read_text()
        assert "http://" not in html and "https://" not in html
        assert all((page.parent / ref).is_file() for ref in re.findall(r'(?:src|href)="([^"#?]+)', html))
    layer = (site / "layer0.html").read_text()
    assert '"token_entropy">token entropy</th>' in layer and '"topic">topic</th>' in layer and "neurons/0_0.html" in layer
    assert "unsteered" not in (site / "neurons" / "0_3.html").read_text()


def test_browser_shows_steering_samples(stats_dir, tiny_hf, tmp_path):
    run_cli("steer", tiny_hf, "--neuron", "0:3", "--offset", 4, "--samples", 2, "--max-new-tokens", 8, "--stats", stats_dir,
            "--topic", "food", "--concepts", json.loads((stats_dir / "stats.json").read_text())["concepts"])
    run_cli("analyze", "browse", stats_dir, "--out", tmp_path / "site")
    page = (tmp_path / "site" / "neurons" / "0_3.html").read_text()
    assert "offset +4" in page and "offset +0 (unsteered)" in page and "of content words in 'food'" in page


# --- bad input: one line, exit != 0 ----------------------------------------------------------------

def test_neuron_out_of_range_and_missing_layer(stats_dir, tiny_hf):
    assert_clean_failure(run_cli("analyze", "neuron", stats_dir, "0:64", check=False),
                         "neuron index 64 is out of range", "0..63")
    assert_clean_failure(run_cli("analyze", "neuron", stats_dir, "9:0", check=False), "layer 9 is not in the statistics")
    assert_clean_failure(run_cli("analyze", "neuron", stats_dir, "zero:1", check=False), "LAYER:INDEX")
    assert_clean_failure(run_cli("steer", tiny_hf, "--neuron", "4:0", "--offset", 1, check=False),
                         "layer 4 does not exist", "0..3")


def test_stats_from_another_model_are_refused(stats_dir, tiny_run):
    proc = run_cli("analyze", "neuron", tiny_run, "0:1", "--tag", f"global_step{RUN_SAVE_EVERY}", "--stats", stats_dir,
                   check=False)
    assert_clean_failure(proc, "come from another model", "recompute")


def test_empty_data_is_refused(tiny_hf, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    proc = run_cli("analyze", "stats", tiny_hf, "--data", empty, "--out", tmp_path / "out", check=False)
    assert_clean_failure(proc, "empty")
    short = tmp_path / "short.jsonl"
    short.write_text(json.dumps({"text": "The chef cooks."}) + "\n")
    proc = run_cli("analyze", "stats", tiny_hf, "--data", short, "--seq-len", 64, "--out", tmp_path / "out", check=False)
    assert_clean_failure(proc, "holds no tokens to analyse")
    assert not (tmp_path / "out").exists()


def test_settings_and_outputs_are_checked_before_any_work(stats_dir, tiny_hf, tiny_run, synthetic_data, tmp_path):
    keep = tmp_path / "my-run"
    keep.mkdir()
    (keep / "notes.txt").write_text("mine")
    proc = run_cli("analyze", "stats", tiny_hf, "--data", synthetic_data[1], "--out", keep, check=False)
    assert_clean_failure(proc, "holds no stats.json")
    assert [p.name for p in keep.iterdir()] == ["notes.txt"]
    proc = run_cli("analyze", "stats", tiny_hf, "--data", synthetic_data[1], "--out", tmp_path / "s", "--bins", 300,
                   check=False)
    assert_clean_failure(proc, "--bins 300 must be in [1, 255]")
    assert_clean_failure(run_cli("analyze", "entropy", stats_dir, "--percentile", 120, check=False), "--percentile 120")
    assert_clean_failure(run_cli("analyze", "browse", stats_dir, "--out", keep, check=False), "holds no index.html")
    assert_clean_failure(run_cli("steer", tiny_hf, "--neuron", "0:1", "--offset", 2, "--topic", "food", check=False),
                         "--topic needs", "--concepts")
    assert_clean_failure(run_cli("analyze", "trace", tiny_run, "--neuron", "abc", "--token", "chef", check=False),
                         "LAYER:INDEX")
    assert_clean_failure(run_cli("analyze", "trace", tiny_run, "--neuron", "0:64", "--token", "chef", "--out",
                                 tmp_path / "t", check=False), "index 64 is out of range")
    assert not (tmp_path / "t").exists() and not (tmp_path / "s").exists()
