"""The tools interpretability researchers already use: nnsight on the exported model, Neuronpedia's import
layout, a TopK layer opened as an SAE by sparsify and SAELens, and the static browser in a real browser."""

import gzip
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from conftest import assert_one_error, cli_main
from topk_ds.cli import main

PROMPT = "Once upon a time,"


def cli(*args):
    main([str(a) for a in args])


# --- nnsight ---------------------------------------------------------------------------------------------

def test_nnsight_reads_a_topk_site_and_steers_like_topk_ds_steer(tiny_hf, tmp_path):
    """LanguageModel opens the exported directory as it is; layers[l].act is the TopK site (input: the
    pre-activation, output: the k-sparse code). An offset written into one neuron's pre-activation at every
    forward pass generates, greedily, the same tokens as `topk-ds steer --greedy` with that offset.
    (dispatch=True: nnsight 0.8.1's lazy load cannot find the tokenizer of any model under transformers 5.24.)"""
    from nnsight import LanguageModel

    from topk_ds.model.topk import topk_activation

    model = LanguageModel(str(tiny_hf), trust_remote_code=True, dispatch=True)
    k, (layer, index), new = model.config.topk_k, (0, 3), 12
    with model.trace(PROMPT):
        pre = model.model.layers[layer].act.input.save()
        out = model.model.layers[layer].act.output.save()
    assert pre.shape == out.shape and pre.shape[-1] == model.config.dim
    assert ((out != 0).sum(-1) <= k).all()
    assert torch.equal(out, topk_activation(pre, k))

    peak = float(pre[..., index].detach().abs().max())
    offsets = [round(2 * peak, 3), round(8 * peak + 8, 3)]  # near the neuron's scale, and far above every other entry
    cli("steer", tiny_hf, "--neuron", f"{layer}:{index}", *[a for c in offsets for a in ("--offset", c)], "--greedy",
        "--max-new-tokens", new, "--out", tmp_path / "steer.json")
    rows = {row["offset"]: row for row in json.loads((tmp_path / "steer.json").read_text())["offsets"]}
    prompt_len = len(model.tokenizer(PROMPT).input_ids)
    for c in [0.0, *offsets]:
        with model.generate(max_new_tokens=new, do_sample=False) as tracer:
            codes = list().save()
            with tracer.invoke(PROMPT):
                for _ in tracer.all():  # the prompt's forward pass, then one per generated token
                    model.model.layers[layer].act.input[..., index] += c
                    codes.append(model.model.layers[layer].act.output[..., index])
            with tracer.invoke():  # after the loop: a loop over every step ends where the generation ends
                ids = tracer.result.save()
        assert [ids[0, prompt_len:].tolist()] == rows[c]["ids"], c
        assert [model.tokenizer.decode(ids[0, prompt_len:], skip_special_tokens=True)] == rows[c]["texts"]
        if c == offsets[-1]:  # the edit reached every position of every pass: the neuron always among the k kept
            assert len(codes) >= 2 and all((code > 0).all() for code in codes)
    assert len({tuple(rows[c]["ids"][0]) for c in rows}) > 1  # steering changed the generation


# --- statistics the exports and the browser read -----------------------------------------------------------

def test_direct_logit_effect_is_the_direction_through_the_norm_gain_and_unembedding(stats_dir, tiny_hf):
    """Residual neuron i writes e_i: its logit effect on token v is g_i * W_U[v, i] (the final RMSNorm's gain g);
    the saved promoted and suppressed tokens are the 10 largest and smallest of those."""
    from topk_ds import load
    from topk_ds.analysis.stats import Stats

    model, _ = load(tiny_hf)
    effect = (model.model.norm.weight[:, None] * model.model.output.weight.T).detach()  # (D, V)
    up, down = effect.topk(10, dim=1), effect.topk(10, dim=1, largest=False)
    stats = Stats.load(stats_dir)
    for ls in stats.layers.values():
        assert torch.equal(ls.promoted_ids.long(), up.indices) and torch.equal(ls.suppressed_ids.long(), down.indices)
        torch.testing.assert_close(ls.promoted, up.values)
        torch.testing.assert_close(ls.suppressed, down.values)


# --- Neuronpedia ------------------------------------------------------------------------------------------

OPTIONAL_STR, OPTIONAL_INT, OPTIONAL_FLOAT = (str, type(None)), (int, type(None)), (float, type(None))
STRINGS, FLOATS, INTS = ("list", str), ("list", float), ("list", int)
# Neuronpedia's records as its db models and SAEDashboard's exporter define them: field -> JSON type.
SCHEMA = {
    "model": {"id": str, "instruct": bool, "creatorId": str, "displayNameShort": str, "displayName": str,
              "tlensId": OPTIONAL_STR, "dimension": OPTIONAL_INT, "visibility": str, "defaultSourceSetName": OPTIONAL_STR,
              "defaultSourceId": OPTIONAL_STR, "inferenceEnabled": bool, "layers": int, "neuronsPerLayer": int,
              "createdAt": str, "owner": str, "updatedAt": str, "website": OPTIONAL_STR},
    "release": {"name": str, "description": str, "creatorName": str, "creatorId": str, "visibility": str, "isNewUi": bool,
                "featured": bool, "descriptionShort": OPTIONAL_STR, "urls": STRINGS, "creatorEmail": OPTIONAL_STR,
                "creatorNameShort": OPTIONAL_STR, "defaultSourceSetName": OPTIONAL_STR, "defaultSourceId": OPTIONAL_STR,
                "defaultUmapSourceIds": STRINGS, "createdAt": str},
    "sourceset": {"modelId": str, "name": str, "creatorId": str, "hasDashboards": bool, "visibility": str,
                  "description": str, "type": str, "creatorName": str, "urls": STRINGS, "creatorEmail": OPTIONAL_STR,
                  "releaseName": OPTIONAL_STR, "defaultOfModelId": OPTIONAL_STR, "defaultRange": int,
                  "defaultShowBreaks": bool, "showDfa": bool, "showCorrelated": bool, "showHeadAttribution": bool,
                  "showUmap": bool, "createdAt": str},
    "source": {"id": str, "modelId": str, "setName": str, "creatorId": str, "hasDashboards": bool,
               "inferenceEnabled": bool, "inferenceHosts": STRINGS, "saelensConfig": OPTIONAL_STR,
               "saelensRelease": OPTIONAL_STR, "saelensSaeId": OPTIONAL_STR, "hfRepoId": OPTIONAL_STR,
               "hfFolderId": OPTIONAL_STR, "visibility": str, "defaultOfModelId": OPTIONAL_STR, "hasUmap": bool,
               "hasUmapLogSparsity": bool, "hasUmapClusters": bool, "num_prompts": OPTIONAL_INT,
               "num_tokens_in_prompt": OPTIONAL_INT, "dataset": OPTIONAL_STR, "notes": OPTIONAL_STR, "createdAt": str},
    "features": {"modelId": str, "layer": str, "index": str, "creatorId": OPTIONAL_STR, "createdAt": str,
                 "maxActApprox": OPTIONAL_FLOAT, "hasVector": bool, "vector": FLOATS, "vectorLabel": OPTIONAL_STR,
                 "vectorDefaultSteerStrength": OPTIONAL_FLOAT, "hookName": OPTIONAL_STR, "topkCosSimIndices": INTS,
                 "topkCosSimValues": FLOATS, "neuron_alignment_indices": INTS, "neuron_alignment_values": FLOATS,
                 "neuron_alignment_l1": FLOATS, "correlated_neurons_indices": INTS, "correlated_neurons_pearson": FLOATS,
                 "correlated_neurons_l1": FLOATS, "correlated_features_indices": INTS,
                 "correlated_features_pearson": FLOATS, "correlated_features_l1": FLOATS, "neg_str": STRINGS,
                 "neg_values": FLOATS, "pos_str": STRINGS, "pos_values": FLOATS, "frac_nonzero": float,
                 "freq_hist_data_bar_heights": FLOATS, "freq_hist_data_bar_values": FLOATS,
                 "logits_hist_data_bar_heights": FLOATS, "logits_hist_data_bar_values": FLOATS,
                 "decoder_weights_dist": FLOATS, "sourceSetName": OPTIONAL_STR},
    "activations": {"id": str, "tokens": STRINGS, "index": str, "layer": str, "modelId": str, "maxValue": float,
                    "maxValueTokenIndex": int, "minValue": float, "values": FLOATS, "creatorId": str,
                    "dataSource": OPTIONAL_STR, "dataIndex": OPTIONAL_STR, "dfaValues": FLOATS, "dfaTargetIndex": OPTIONAL_INT,
                    "dfaMaxValue": OPTIONAL_FLOAT, "createdAt": str, "lossValues": FLOATS,
                    "logitContributions": OPTIONAL_STR, "binMin": OPTIONAL_FLOAT, "binMax": OPTIONAL_FLOAT,
                    "binContains": OPTIONAL_FLOAT, "qualifyingTokenIndex": OPTIONAL_INT,
                    "zIndices": (list, type(None)), "zValues": (list, type(None))},
}


def assert_schema(record: dict, name: str) -> None:
    schema = SCHEMA[name]
    assert set(record) == set(schema), f"{name}: {set(record) ^ set(schema)}"
    for field, kind in schema.items():
        value = record[field]
        if isinstance(kind, tuple) and kind[:1] == ("list",):
            assert isinstance(value, list) and all(isinstance(v, kind[1]) and not isinstance(v, bool) for v in value), \
                (name, field, value)
        else:
            assert isinstance(value, kind) and (kind is bool or not isinstance(value, bool)), (name, field, value)


def read_jsonl_gz(path: Path) -> list[dict]:
    """Decompress, parse every line (refusing NaN and Infinity, which are not JSON), and check the records
    survive a write-and-read round trip unchanged."""
    def refuse(constant):
        raise AssertionError(f"{path}: {constant} is not JSON")

    records = [json.loads(line, parse_constant=refuse) for line in gzip.decompress(path.read_bytes()).decode().splitlines()]
    again = gzip.decompress(gzip.compress("".join(json.dumps(r) + "\n" for r in records).encode()))
    assert [json.loads(line) for line in again.decode().splitlines()] == records
    return records


def test_neuronpedia_export_follows_the_documented_schema(stats_dir, tmp_path, capsys):
    from topk_ds.analysis.report import text_of
    from topk_ds.analysis.stats import Stats

    out = tmp_path / "np"
    cli("analyze", "export", stats_dir, "--format", "neuronpedia", "--out", out, "--model-id", "tiny-topk")
    assert "wrote 4 sources in neuronpedia format" in capsys.readouterr().out
    stats = Stats.load(stats_dir)
    sources = sorted((out / "tiny-topk").iterdir())
    assert [s.name for s in sources] == [f"{l}-topk-res-64" for l in range(4)]
    for source in sources:
        l = int(source.name.split("-")[0])
        ls = stats.layers[l]
        for name in ("model", "release", "sourceset", "source"):
            (record,) = [json.loads(line) for line in (source / f"{name}.jsonl").read_text().splitlines()]
            assert_schema(record, name)
        assert json.loads((source / "source.jsonl").read_text())["id"] == source.name
        assert sorted(p.name for p in (source / "features").iterdir()) == ["batch-0.jsonl.gz"]  # 64 units: one batch
        features = read_jsonl_gz(source / "features" / "batch-0.jsonl.gz")
        activations = read_jsonl_gz(source / "activations" / "batch-0.jsonl.gz")
        assert [f["index"] for f in features] == [str(i) for i in range(ls.dim)]
        for f in features:
            assert_schema(f, "features")
            i = int(f["index"])
            assert f["layer"] == source.name and f["modelId"] == "tiny-topk"
            assert f["frac_nonzero"] == pytest.approx(int(ls.fires[i]) / stats.tokens)
            assert f["maxActApprox"] == pytest.approx(float(ls.top_values[i, 0]))
            assert f["pos_str"] == [text_of([stats.pieces[v]]) for v in ls.promoted_ids[i].tolist()]
            assert f["pos_values"] == pytest.approx(ls.promoted[i].tolist(), abs=1e-5)
            assert sum(f["freq_hist_data_bar_heights"]) == int(ls.fires[i])
        by_unit = {}
        for a in activations:
            assert_schema(a, "activations")
            by_unit.setdefault(int(a["index"]), []).append(a)
            assert len(a["tokens"]) == len(a["values"]) and a["values"][a["maxValueTokenIndex"]] == a["maxValue"]
        assert len({a["id"] for a in activations}) == len(activations)
        for i, rows in by_unit.items():  # every live top context, best first, its top token the one it was kept for
            live = ls.top_values[i][ls.top_values[i] > 0]
            assert [r["values"][r["qualifyingTokenIndex"]] for r in rows] == pytest.approx(live.tolist(), abs=1e-4)


def test_sae_latents_export_to_neuronpedia_and_browse_like_neurons(sae_dir, tiny_hf, synthetic_data, tmp_path, capsys):
    """Statistics of an SAE's latents (`analyze stats --sae`): Neuronpedia records of the same schema, named for
    latents; browser pages that say "latent"; the SAE-library formats refuse them (the SAE already is one)."""
    stats = tmp_path / "stats"
    cli("analyze", "stats", tiny_hf, "--sae", sae_dir, "--data", synthetic_data[1], "--tokens", 8192, "--seq-len", 64,
        "--out", stats)
    cli("analyze", "export", stats, "--format", "neuronpedia", "--out", tmp_path / "np")
    (model_dir,) = [d for d in (tmp_path / "np").iterdir() if d.is_dir()]
    sources = sorted(model_dir.iterdir())
    assert [s.name for s in sources] == ["0-sae-res-64", "1-sae-res-64"]  # the SAE's layers
    for source in sources:
        features = read_jsonl_gz(source / "features" / "batch-0.jsonl.gz")
        assert len(features) == 64 and all(f["sourceSetName"] == "sae-res-64" for f in features)
        for f in features:
            assert_schema(f, "features")
        for a in read_jsonl_gz(source / "activations" / "batch-0.jsonl.gz"):
            assert_schema(a, "activations")
    assert_one_error(cli_main(capsys, "analyze", "export", stats, "--format", "sparsify", "--out", tmp_path / "sp"),
                     "statistics of SAE latents")
    cli("analyze", "browse", stats, "--out", tmp_path / "site")
    page = (tmp_path / "site" / "neurons" / "1_5.html").read_text()
    assert "<h1>latent 1:5" in page and "direct logit effect" in page and "<svg" in page
    assert '"unit":"latent"' in (tmp_path / "site" / "search.js").read_text()


# --- SAE libraries ----------------------------------------------------------------------------------------

def test_sparsify_and_saelens_open_a_topk_layer_as_an_sae(stats_dir, tiny_hf, tmp_path):
    """A TopK layer is a TopK SAE with identity encoder and decoder: each library's loader opens the export,
    and its encode of the block's pre-activation is exactly the layer's output."""
    os.environ.setdefault("SPARSIFY_DISABLE_TRITON", "1")
    from sae_lens import SAE
    from sparsify import SparseCoder

    from topk_ds import load

    for fmt in ("sparsify", "saelens"):
        cli("analyze", "export", stats_dir, "--format", fmt, "--out", tmp_path / fmt)
    coders = SparseCoder.load_many(str(tmp_path / "sparsify"), local=True)
    assert sorted(coders) == ["layers.0.act", "layers.1.act"]  # the TopK layers; the dense ones are no SAE
    model, tok = load(tiny_hf)
    ids = tok(["The chef cooked a soup in the kitchen while the band played music."], return_tensors="pt").input_ids
    seen = {}
    hooks = [model.model.layers[l].act.register_forward_hook(lambda m, a, o, l=l: seen.__setitem__(l, (a[0], o)))
             for l in (0, 1)]
    with torch.no_grad():
        model(ids)
    for h in hooks:
        h.remove()
    for l in (0, 1):
        pre, out = (x.reshape(-1, x.shape[-1]) for x in seen[l])
        coder = coders[f"layers.{l}.act"]
        assert coder.cfg.k == model.config.topk_k and coder.num_latents == model.config.dim
        with torch.no_grad():
            code = coder.encode(pre)
            sae = SAE.load_from_disk(str(tmp_path / "saelens" / f"layers.{l}.act"))
            assert sae.cfg.k == model.config.topk_k and sae.cfg.metadata.hook_name == f"model.layers.{l}.act"
            assert torch.equal(sae.encode(pre), out)
        assert torch.equal(torch.zeros_like(out).scatter(1, code.top_indices, code.top_acts), out)


def test_export_refuses_bad_input_with_one_line(stats_dir, tmp_path, capsys):
    def export(*args):
        return cli_main(capsys, "analyze", "export", *args)

    assert_one_error(export(stats_dir, "--format", "parquet", "--out", tmp_path / "x"), "invalid choice")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    assert_one_error(export(stats_dir, "--format", "neuronpedia", "--out", mine), "holds no export.json")
    assert [p.name for p in mine.iterdir()] == ["notes.txt"]
    gone = tmp_path / "stats-of-a-gone-model"
    shutil.copytree(stats_dir, gone)
    meta = json.loads((gone / "stats.json").read_text())
    (gone / "stats.json").write_text(json.dumps(meta | {"model": str(tmp_path / "deleted-model")}))
    assert_one_error(export(gone, "--format", "sparsify", "--out", tmp_path / "sp"), "the model of these statistics is gone")
    (gone / "stats.json").write_text(json.dumps(meta | {"format_version": 1}))  # statistics of an older topk_ds
    assert_one_error(export(gone, "--format", "neuronpedia", "--out", tmp_path / "np"), "format version 1")
    assert_one_error(cli_main(capsys, "steer", tmp_path, "--neuron", "0:1", "--offset", 1, "--greedy", "--samples", 3),
                     "--greedy decodes one text")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine", "stats-of-a-gone-model"]  # nothing half-written


# --- the browser in a real browser -----------------------------------------------------------------------

def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return shutil.which(name)
    why = ("no Chromium-like browser (chromium, chromium-browser, google-chrome) on PATH: .ci/run installs Debian's "
           "`chromium` package (apt-get install -y chromium, as root or through passwordless sudo)")
    if os.environ.get("CI"):  # CI installs one: a missing browser there is a broken CI machine, not a reason to skip
        pytest.fail(f"{why}, and CI is set")
    pytest.skip(f"{why}; without one the browser cannot be tested (under CI this fails)")


def render(page: str, tmp_path: Path, screenshot: str | None = None) -> tuple[str, list[str]]:
    """(DOM after the page's scripts ran, the browser's console lines) of a file:// URL in headless Chromium."""
    args = [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--enable-logging=stderr", "--v=0",
            f"--user-data-dir={tmp_path / 'chromium-profile'}", "--window-size=1280,1000", "--dump-dom", page]
    if screenshot:
        args.insert(-2, f"--screenshot={screenshot}")
    proc = subprocess.run(args, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout, [line for line in proc.stderr.splitlines() if ":CONSOLE" in line]


@pytest.mark.slow  # on the concept-forming fixture run (trained once per session, shared with test_analysis)
def test_browser_in_headless_chromium(concept_model, tmp_path):
    """The site loads in a real browser without a console message, its search finds a concept neuron of the
    run by a word of its topic, every neuron page stays under 200 KB, and a screenshot is written."""
    import re

    from topk_ds.analysis.concepts import Concepts, word_of
    from topk_ds.analysis.report import LayerReport
    from topk_ds.analysis.stats import Stats

    _, stats_dir = concept_model
    site = tmp_path / "site"
    cli("analyze", "browse", stats_dir, "--out", site)
    stats = Stats.load(stats_dir)
    concepts = Concepts.load(stats.meta["concepts"])
    rows = [LayerReport(stats, l, concepts).summary(i) for l in (0, 1) for i in range(stats.layers[l].dim)]
    known = sorted((r for r in rows if r["topic"] and r["precision"] >= 0.8 and word_of(r["top_piece"] or "")),
                   key=lambda r: -r["top_mean"])
    assert known, "the fixture run grew no concept neuron"
    best = known[0]
    word = word_of(best["top_piece"])
    dom, console = render(f"{(site / 'index.html').as_uri()}?q={word}", tmp_path, str(tmp_path / "index.png"))
    assert console == []
    results = dom[dom.index('id="results"'):]
    found = {tuple(map(int, m)) for m in re.findall(r'href="neurons/(\d+)_(\d+)\.html"', results)}
    same_topic = {(r["layer"], r["index"]) for r in known if r["topic"] == best["topic"]}
    assert found & same_topic, (word, best["neuron"], sorted(found))
    assert (tmp_path / "index.png").read_bytes()[:4] == b"\x89PNG"

    page = site / "neurons" / f"{best['layer']}_{best['index']}.html"
    dom, console = render(page.as_uri(), tmp_path, str(tmp_path / "neuron.png"))
    assert console == [] and "<svg" in dom and "direct logit effect" in dom and 'class="h10 at"' in dom
    assert (tmp_path / "neuron.png").read_bytes()[:4] == b"\x89PNG"
    l, topic = best["layer"], best["topic"]  # a layer table opened filtered and sorted by the address
    dom, console = render(f"{(site / f'layer{l}.html').as_uri()}?topic={topic}&sort=-top_mean", tmp_path)
    assert console == [] and dom.count("<input") == 11  # a filter per column, topic columns included
    expected = {r["index"]: float(f"{r['top_mean']:.6g}") for r in rows if r["layer"] == l and r["topic"] == topic}
    assert f'id="shown">{len(expected)}<' in dom and dom.count('style="display: none;"') == stats.layers[l].dim - len(expected)
    shown = [int(m) for m in re.findall(r'<tr>(?:<td data-v="(\d+)">)', dom[dom.index("<tbody>"):])]
    assert sorted(shown) == sorted(expected)  # the rows left visible: that topic's, best top mean first
    assert [expected[i] for i in shown] == sorted(expected.values(), reverse=True), shown

    pages = list((site / "neurons").glob("*.html"))
    assert len(pages) == sum(ls.dim for ls in stats.layers.values())
    assert max(p.stat().st_size for p in pages) < 200_000
    for html in [site / "index.html", site / "layer0.html", *pages]:  # self-contained: every reference is a local file
        text = html.read_text()
        assert "http://" not in text and "https://" not in text
        for ref in re.findall(r'(?:src|href)="([^"#?]+)', text):
            assert (html.parent / ref).is_file(), (html, ref)
