"""Saved statistics in the formats of the tools interpretability researchers already use. Each writer reads
what `analyze stats` saved and recomputes nothing; the SAE-library formats also need the model the
statistics came from (found through stats.json's "model", or --model; checked against the fingerprint).

    neuronpedia  Neuronpedia's import layout, the one its export script and SAEDashboard's Neuronpedia
                 exporter write: OUT/<model id>/<layer>-<source set>/ with model.jsonl, release.jsonl,
                 sourceset.jsonl, source.jsonl, features/batch-N.jsonl.gz (one record per unit: layer, index,
                 frac_nonzero, max activation, activation histogram, top promoted and suppressed logits) and
                 activations/batch-N.jsonl.gz (one record per top context: tokens, per-token values, max
                 value and its index), 128 units a batch. Works for neurons and for SAE latents alike.
    sparsify     every TopK layer as an EleutherAI sparsify SparseCoder: OUT/<site>/{cfg.json,
                 sae.safetensors} with identity encoder and decoder and the layer's k. A TopK layer *is* a
                 TopK SAE at its own site: encode(pre-activation) is the layer's output.
    saelens      the same as an SAELens TopK SAE: OUT/<site>/{cfg.json, sae_weights.safetensors}.

<site> is the TopK module's path inside the model (relative to the Hugging Face wrapper's `.model`):
`layers.L.act` (residual site) or `layers.L.feed_forward.act` (mlp site); its input is the pre-activation.
"""

import gzip
import hashlib
import json
from datetime import datetime, timezone
from itertools import pairwise
from pathlib import Path

import torch

from ..errors import UserError
from ..io import atomic_output, write_json
from .report import LayerReport
from .settings import EXPORT_FORMATS
from .stats import Stats

MARKER = "export.json"  # written at the top of every export: what was exported from where
BATCH = 128  # units per Neuronpedia batch file


def site_path(site: str, layer: int) -> str:
    """The TopK module of `layer` inside the model, relative to the Hugging Face wrapper's `.model`."""
    return f"layers.{layer}.act" if site == "residual" else f"layers.{layer}.feed_forward.act"


def export(stats_dir, fmt: str, out, model=None, layers=None, names: dict | None = None) -> list[str]:
    """Write `fmt` of the statistics in `stats_dir` to `out` (replaced as a whole); returns what was written
    (one entry per source or SAE). `names`: Neuronpedia's model id, source set, release and creator."""
    if fmt not in EXPORT_FORMATS:
        raise UserError(f"unknown export format '{fmt}'; choose one of {', '.join(EXPORT_FORMATS)}")
    stats = Stats.load(stats_dir, layers=layers)
    if layers:
        for l in layers:
            stats.layer(l)
    with atomic_output(Path(out)) as tmp:
        tmp.mkdir(parents=True)
        if fmt == "neuronpedia":
            written = _neuronpedia(stats, tmp, names or {})
        else:
            written = _sae_library(stats, tmp, fmt, model)
        write_json(tmp / MARKER, {"format": fmt, "stats": str(Path(stats_dir).resolve()), "written": written})
    return written


# --- Neuronpedia ------------------------------------------------------------------------------------

def _slug(text: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in text.lower()).strip("-")


def _width(n: int) -> str:
    return f"{n // 1024}k" if n % 1024 == 0 else str(n)


def neuronpedia_names(stats: Stats, names: dict) -> dict:
    """Model id, source set, release and creator: Neuronpedia's identifiers, defaults from the fingerprint."""
    cfg = stats.meta["fingerprint"]["config"]
    model, topk = cfg["model"], cfg["topk"]
    latents = stats.meta.get("units") == "latent"
    default_model = f"topk-llama-{model['dim']}x{model['n_layers']}" + (f"-k{topk['k']}" if topk["enabled"] else "")
    site = "mlp" if topk.get("site") == "mlp" else "res"
    return {"model_id": _slug(names.get("model_id") or default_model),
            "source_set": _slug(names.get("source_set") or f"{'sae' if latents else 'topk'}-{site}-{_width(stats.meta['dim'])}"),
            "release": _slug(names.get("release") or "topk-ds"), "creator": names.get("creator") or "topk_ds"}


def _neuronpedia(stats: Stats, out: Path, names: dict) -> list[str]:
    n = neuronpedia_names(stats, names)
    meta, created = stats.meta, datetime.now(timezone.utc).isoformat()
    unit = meta.get("units", "neuron")
    common = {"creatorId": n["creator"], "createdAt": created}
    model_row = {"id": n["model_id"], "instruct": False, "displayNameShort": n["model_id"], "displayName": n["model_id"],
                 "tlensId": None, "dimension": meta["fingerprint"]["config"]["model"]["dim"], "visibility": "PUBLIC",
                 "defaultSourceSetName": n["source_set"], "defaultSourceId": None, "inferenceEnabled": False,
                 "layers": meta["n_layers"], "neuronsPerLayer": meta["dim"], "owner": n["creator"],
                 "updatedAt": created, "website": None} | common
    release = {"name": n["release"], "description": f"{unit}s of a TopK language model, exported by topk_ds",
               "creatorName": n["creator"], "visibility": "PUBLIC", "isNewUi": False, "featured": False,
               "descriptionShort": f"TopK LM {unit}s", "urls": [], "creatorEmail": None,
               "creatorNameShort": n["creator"], "defaultSourceSetName": n["source_set"], "defaultSourceId": None,
               "defaultUmapSourceIds": []} | common
    sourceset = {"modelId": n["model_id"], "name": n["source_set"], "hasDashboards": True, "visibility": "PUBLIC",
                 "description": f"TopK LM {unit}s, {meta['dim']} per layer", "type": "", "creatorName": n["creator"],
                 "urls": [], "creatorEmail": None, "releaseName": n["release"], "defaultOfModelId": None,
                 "defaultRange": 1, "defaultShowBreaks": True, "showDfa": False, "showCorrelated": False,
                 "showHeadAttribution": False, "showUmap": False} | common
    written = []
    for l in sorted(stats.layers):
        row = next(r for r in meta["layers"] if r["layer"] == l)
        source_id = f"{l}-{n['source_set']}"
        where = out / n["model_id"] / source_id
        (where / "features").mkdir(parents=True)
        (where / "activations").mkdir()
        kind = f"TopK k={row['k']}" if row["kind"] == "topk" else row["kind"]
        source = {"id": source_id, "modelId": n["model_id"], "setName": n["source_set"], "hasDashboards": True,
                  "inferenceEnabled": False, "inferenceHosts": [], "saelensConfig": None, "saelensRelease": None,
                  "saelensSaeId": None, "hfRepoId": None, "hfFolderId": None, "visibility": "PUBLIC",
                  "defaultOfModelId": None, "hasUmap": False, "hasUmapLogSparsity": False, "hasUmapClusters": False,
                  "num_prompts": meta["tokens"] // meta["seq_len"], "num_tokens_in_prompt": meta["seq_len"],
                  "dataset": meta.get("data"), "notes": f"layer {l} ({kind}) {unit}s; activations: {meta['activation']}"
                  } | common
        for name, record in (("model", model_row), ("release", release), ("sourceset", sourceset), ("source", source)):
            (where / f"{name}.jsonl").write_text(json.dumps(record) + "\n")
        view, dim, top = LayerReport(stats, l), stats.layers[l].dim, stats.meta["top_contexts"]
        for batch, start in enumerate(range(0, dim, BATCH)):
            units = range(start, min(start + BATCH, dim))
            features, activations = zip(*(_feature(view.neuron(i, top), source_id, n, common,
                                                   meta["fingerprint"]["weights"]) for i in units))
            _write_jsonl_gz(where / "features" / f"batch-{batch}.jsonl.gz", features)
            _write_jsonl_gz(where / "activations" / f"batch-{batch}.jsonl.gz", [a for rows in activations for a in rows])
        written.append(f"{n['model_id']}/{source_id}")
    return written


def _write_jsonl_gz(path: Path, records) -> None:
    path.write_bytes(gzip.compress("".join(json.dumps(r) + "\n" for r in records).encode(), compresslevel=5))


def _round(values) -> list[float]:
    return [round(float(v), 5) for v in values]


def _feature(r: dict, source_id: str, n: dict, common: dict, fingerprint: str) -> tuple[dict, list[dict]]:
    """A unit's report (report.LayerReport.neuron) as a Neuronpedia feature record and its top contexts as
    activation records."""
    edges, peak = r["histogram"]["edges"], r["max_activation"]
    feature = {"modelId": n["model_id"], "layer": source_id, "index": str(r["index"]), "maxActApprox": peak,
               "hasVector": False, "vector": [], "vectorLabel": None, "vectorDefaultSteerStrength": peak, "hookName": None,
               "topkCosSimIndices": [], "topkCosSimValues": [], "neuron_alignment_indices": [],
               "neuron_alignment_values": [], "neuron_alignment_l1": [], "correlated_neurons_indices": [],
               "correlated_neurons_pearson": [], "correlated_neurons_l1": [], "correlated_features_indices": [],
               "correlated_features_pearson": [], "correlated_features_l1": [],
               "neg_str": [t["token"] for t in r["suppressed"]], "neg_values": _round(t["logit"] for t in r["suppressed"]),
               "pos_str": [t["token"] for t in r["promoted"]], "pos_values": _round(t["logit"] for t in r["promoted"]),
               "frac_nonzero": r["frequency"], "freq_hist_data_bar_heights": [float(c) for c in r["histogram"]["counts"]],
               "freq_hist_data_bar_values": _round((a * b) ** 0.5 for a, b in pairwise(edges)),  # bin centres
               "logits_hist_data_bar_heights": [], "logits_hist_data_bar_values": [], "decoder_weights_dist": [],
               "sourceSetName": n["source_set"]} | common
    activations = []
    for j, c in enumerate(r["contexts"]):
        values = _round(c["acts"])
        top = max(range(len(values)), key=values.__getitem__)
        key = f"{fingerprint}/{n['model_id']}/{source_id}/{r['index']}/{j}"  # a stable id, unique across exports
        activations.append({"id": "c" + hashlib.sha1(key.encode()).hexdigest()[:24], "tokens": c["tokens"],
                            "index": str(r["index"]), "layer": source_id, "modelId": n["model_id"], "maxValue": values[top],
                            "maxValueTokenIndex": top, "minValue": min(values), "values": values, "dataSource": None,
                            "dataIndex": None, "dfaValues": [], "dfaTargetIndex": None, "dfaMaxValue": None,
                            "lossValues": [], "logitContributions": None, "binMin": -1.0, "binMax": peak,
                            "binContains": -1.0, "qualifyingTokenIndex": c["at"], "zIndices": None,
                            "zValues": None} | common)
    return feature, activations


# --- SAE libraries ----------------------------------------------------------------------------------

def find_model(stats: Stats, model=None):
    """The model the statistics came from: `model`, else the one recorded in stats.json; checked against the
    statistics' fingerprint."""
    from ..convert.hf_export import load
    from .units import Neurons

    path = model or stats.meta.get("model")
    if not path or not Path(path).exists():
        recorded = f"{path} (recorded in {stats.path}/stats.json)" if path else "not recorded in the statistics"
        raise UserError(f"the model of these statistics is gone: {recorded}; pass --model DIR")
    m, _ = load(path, tag=None if model else stats.meta.get("tag"))
    stats.check_units(Neurons(m))
    return m


def _sae_library(stats: Stats, out: Path, fmt: str, model) -> list[str]:
    """Every analysed TopK layer as an identity TopK SAE of `fmt` (sparsify or saelens)."""
    from safetensors.torch import save_file

    if stats.meta.get("units", "neuron") != "neuron":
        raise UserError(f"{stats.path} holds statistics of SAE latents; a {fmt} export writes a TopK LM's own layers "
                        f"(export the statistics of the model itself)")
    topk = stats.meta["fingerprint"]["config"]["topk"]
    layers = [r["layer"] for r in stats.meta["layers"] if r["kind"] == "topk" and r["layer"] in stats.layers]
    if not layers:
        raise UserError(f"{stats.path} analysed no TopK layer: a {fmt} export writes TopK layers as SAEs")
    if topk["act"] != "relu":
        raise UserError(f"the TopK layers apply '{topk['act']}' to their k values; SAE libraries' TopK applies ReLU")
    if stats.meta["fingerprint"]["alpha"] != 0:
        raise UserError(f"the model runs at alpha = {stats.meta['fingerprint']['alpha']:g} (annealing): its layers are "
                        f"not yet TopK; export a checkpoint from after annealing")
    m = find_model(stats, model)
    width, dtype = stats.meta["dim"], m.model.norm.weight.dtype
    eye, zeros = torch.eye(width, dtype=dtype), torch.zeros(width, dtype=dtype)
    k_of = {r["layer"]: r["k"] for r in stats.meta["layers"]}
    written = []
    for l in layers:
        site, k = site_path(topk["site"], l), k_of[l]
        (out / site).mkdir()
        if fmt == "sparsify":
            cfg = {"activation": "topk", "expansion_factor": 1, "normalize_decoder": True, "num_latents": width,
                   "k": k, "multi_topk": False, "skip_connection": False, "transcode": False, "d_in": width}
            save_file({"encoder.weight": eye, "encoder.bias": zeros, "W_dec": eye.clone(), "b_dec": zeros.clone()},
                      out / site / "sae.safetensors")
        else:
            cfg = {"architecture": "topk", "d_in": width, "d_sae": width, "k": k, "dtype": str(dtype).removeprefix("torch."),
                   "device": "cpu", "apply_b_dec_to_input": False, "normalize_activations": "none",
                   "rescale_acts_by_decoder_norm": False,
                   "metadata": {"sae_lens_version": "6.0.0", "model_name": stats.meta.get("model"),
                                "hook_name": f"model.{site}", "hook_layer": l, "context_size": stats.meta["seq_len"],
                                "prepend_bos": True, "dataset_path": stats.meta.get("data")}}
            save_file({"W_enc": eye, "b_enc": zeros, "W_dec": eye.clone(), "b_dec": zeros.clone()},
                      out / site / "sae_weights.safetensors")
        (out / site / "cfg.json").write_text(json.dumps(cfg, indent=1) + "\n")
        written.append(site)
    return written
