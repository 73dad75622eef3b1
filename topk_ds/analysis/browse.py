"""A static neuron browser: plain HTML files with inline CSS and a few lines of inline JavaScript
(no network, no CDN), so the site opens from file:// and can be copied anywhere.

    OUT/index.html          the model, the data, one row per layer with its summary
    OUT/layer{l}.html       every neuron of layer l, sortable by entropy, frequency, label, topic...
    OUT/neurons/{l}_{i}.html  one neuron: top tokens, top contexts, entropies, steering samples
"""

import json
from html import escape
from pathlib import Path

from ..errors import UserError
from ..progress import progress as progress_of
from ..io import atomic_output
from .concepts import Concepts
from .report import LayerReport, kind_label
from .stats import Stats

STYLE = """body{font-family:sans-serif;margin:1.5em;max-width:75em}table{border-collapse:collapse}
td,th{padding:.2em .6em;border-bottom:1px solid #ddd;text-align:left}th{cursor:pointer;background:#f4f4f4}
mark{background:#ffd54f;font-weight:bold}.ctx{font-family:monospace;white-space:pre-wrap}.num{text-align:right}"""

SORT = """<script>
document.querySelectorAll("th").forEach(function (th, col) {
  th.addEventListener("click", function () {
    var body = th.closest("table").tBodies[0], up = th.dataset.up !== "1";
    th.dataset.up = up ? "1" : "0";
    var rows = Array.from(body.rows), key = function (r) { return r.cells[col].dataset.v; };
    var numeric = rows.every(function (r) { return key(r) === "" || !isNaN(parseFloat(key(r))); });
    rows.sort(function (a, b) {
      var x = key(a), y = key(b);
      if (x === "" || y === "") return (x === "") - (y === "");
      var c = numeric ? parseFloat(x) - parseFloat(y) : x.localeCompare(y);
      return up ? c : -c;
    });
    rows.forEach(function (r) { body.appendChild(r); });
  });
});
</script>"""

COLUMNS = [("neuron", "index", "{}"), ("token entropy", "token_entropy", "{:.2f}"),
           ("semantic entropy", "semantic_entropy", "{:.2f}"), ("|S|", "selected", "{}"),
           ("frequency", "frequency", "{:.3%}"), ("top mean", "top_mean", "{:.3f}"),
           ("max", "max_activation", "{:.3f}"), ("label", "label", "{}")]
TOPIC_COLUMNS = [("topic", "topic", "{}"), ("precision", "precision", "{:.2f}"), ("recall", "recall", "{:.2f}")]


def _page(title: str, body: str, script: str = "") -> str:
    return (f"<!DOCTYPE html><html><head><meta charset=\"utf-8\"><title>{escape(title)}</title>"
            f"<style>{STYLE}</style></head><body>{body}{script}</body></html>\n")


def _cell(value, fmt: str) -> str:
    if value is None:
        return '<td data-v="">n/a</td>'
    sort = f"{value:.6g}" if isinstance(value, float) else value
    cls = ' class="num"' if isinstance(value, (int, float)) else ""
    return f'<td data-v="{escape(str(sort))}"{cls}>{escape(fmt.format(value))}</td>'


def _table(rows: list[dict], columns, link) -> str:
    head = "".join(f"<th>{escape(name)}</th>" for name, _, _ in columns)
    body = []
    for r in rows:
        cells = [_cell(r[key], fmt) for _, key, fmt in columns]
        cells[0] = f'<td data-v="{r["index"]}"><a href="{link(r)}">{escape(r["neuron"])}</a></td>'
        body.append(f"<tr>{''.join(cells)}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _steering(stats_dir: Path) -> dict[str, list[dict]]:
    """Steering results saved beside the statistics (`topk-ds steer --stats DIR`), by neuron."""
    found = {}
    for path in sorted((stats_dir / "steering").glob("*.json")):
        try:
            result = json.loads(path.read_text())
            found.setdefault(result["neuron"], []).append(result)
        except (OSError, ValueError, KeyError, TypeError):
            raise UserError(f"{path} is not a steering result of `topk-ds steer --stats`; remove it") from None
    return found


def _neuron_page(r: dict, steering: list[dict]) -> str:
    facts = [("kind", r["kind"]), ("fires on", f"{r['frequency']:.3%} of {r['tokens']:,} tokens"),
             ("token entropy", "n/a" if r["token_entropy"] is None else f"{r['token_entropy']:.3f}"),
             ("semantic entropy", "n/a (|S| < 2)" if r["semantic_entropy"] is None else f"{r['semantic_entropy']:.3f}"),
             ("|S| (tokens above θ)", f"{r['selected']} (θ = {r['theta']:.3f})"),
             ("max activation", f"{r['max_activation']:.3f}"), ("label", r["label"])]
    if "topic" in r:
        facts.append(("topic", f"{r['topic'] or 'none'} (precision {r['precision']:.2f}, recall {r['recall']:.2f})"))
    body = [f"<p><a href=\"../layer{r['layer']}.html\">layer {r['layer']}</a> · <a href=\"../index.html\">index</a></p>",
            f"<h1>{escape(r['unit'])} {escape(r['neuron'])}</h1><table>",
            *(f"<tr><th>{escape(k)}</th><td>{escape(str(v))}</td></tr>" for k, v in facts), "</table>",
            "<h2>top tokens</h2><table><tr><th>token</th><th>mean activation</th><th>count</th></tr>",
            *(f"<tr><td class=\"ctx\">{escape(repr(t['token']))}</td><td class=\"num\">{t['mean']:.3f}</td>"
              f"<td class=\"num\">{t['count']:,}</td></tr>" for t in r["top_tokens"]), "</table>",
            "<h2>top contexts</h2><table><tr><th>activation</th><th>context</th></tr>",
            *(f"<tr><td class=\"num\">{c['activation']:.3f}</td><td class=\"ctx\">{escape(c['before'])}"
              f"<mark>{escape(c['token'])}</mark>{escape(c['after'])}</td></tr>" for c in r["contexts"]), "</table>"]
    for result in steering:
        body.append(f"<h2>steering from {escape(repr(result['prompt']))} (seed {result['seed']})</h2>")
        for row in result["offsets"]:
            share = f" · {row['share']:.1%} of content words in '{escape(result['topic'])}'" if "share" in row else ""
            body.append(f"<h3>offset {row['offset']:+g}{' (unsteered)' if not row['offset'] else ''}{share}</h3><ol>")
            body += [f"<li class=\"ctx\">{escape(t)}</li>" for t in row["texts"]]
            body.append("</ol>")
    return _page(f"{r['unit']} {r['neuron']}", "".join(body))


def build_site(stats_dir, out, concepts: Concepts | None = None, contexts: int = 10, progress: bool = True) -> int:
    """Write the site to `out` (replaced as a whole); returns the number of neuron pages."""
    stats = Stats.load(stats_dir)
    steering = _steering(Path(stats_dir))
    meta = stats.meta
    columns = COLUMNS + (TOPIC_COLUMNS if concepts is not None else [])
    pages = 0
    with atomic_output(Path(out)) as tmp:
        (tmp / "neurons").mkdir(parents=True)
        layer_rows = []
        for l in progress_of(sorted(stats.layers), desc="browse", unit="layer", enabled=progress):
            view = LayerReport(stats, l, concepts)
            rows = [view.summary(i) for i in range(stats.layers[l].dim)]
            for r in rows:
                report = view.neuron(r["index"], contexts)
                (tmp / "neurons" / f"{l}_{r['index']}.html").write_text(_neuron_page(report, steering.get(r["neuron"], [])))
            pages += len(rows)
            title = f"layer {l} ({kind_label(view.row)})"
            body = (f"<p><a href=\"index.html\">index</a></p><h1>{escape(title)}</h1>"
                    f"<p>{len(rows)} {meta.get('units', 'neuron')}s; click a column header to sort.</p>"
                    + _table(rows, columns, lambda r: f"neurons/{r['layer']}_{r['index']}.html"))
            (tmp / f"layer{l}.html").write_text(_page(title, body, SORT))
            layer_rows.append(view.row | {"index": l, "neuron": f"layer {l}"})
        summary = [("layer", "index", "{}"), ("kind", "kind", "{}"), ("L0", "l0", "{:.2f}"), ("dead", "dead", "{}"),
                   ("token entropy", "token_entropy_mean", "{:.2f}"), ("semantic entropy", "semantic_entropy_mean", "{:.2f}")]
        fp = meta["fingerprint"]
        title = meta.get("description") or "TopK LM neurons"
        body = (f"<h1>{escape(title)}</h1><p>model weights {escape(fp['weights'])} (step {fp.get('train_step')}, "
                f"alpha {fp['alpha']:g}); {meta['tokens']:,} tokens of {escape(str(meta.get('data')))}; "
                f"activations: {escape(meta['activation'])}.</p>"
                + _table(layer_rows, summary, lambda r: f"layer{r['index']}.html"))
        (tmp / "index.html").write_text(_page(title, body, SORT))
    return pages
