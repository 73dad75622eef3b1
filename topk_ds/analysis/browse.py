"""A static neuron browser of saved statistics: plain HTML, one stylesheet and one script beside it, no
network (no CDN), so the site opens from file:// and can be copied anywhere. It reads what `analyze stats`
saved and recomputes nothing; SAE latents (statistics computed with an SAE) browse the same way.

    OUT/index.html            the model, the data, one row per layer; a search box: which units fire most
                              on a token or word (from the per-token means), or a jump to l:i
    OUT/layer{l}.html         every unit of layer l, sortable and filterable (topic, entropy, firing rate...)
    OUT/neurons/{l}_{i}.html  one unit: facts, activation histogram (inline SVG), direct logit effect, top
                              tokens, top contexts shaded token by token, steering samples where saved
    OUT/search.js             the search index: per token seen >= 3 times, the SEARCH_UNITS units of each
                              layer with the largest mean activation on it, and every unit's label
    OUT/site.css, OUT/site.js the style, table sorting and filtering, and the search
"""

import json
import math
from html import escape
from pathlib import Path

from ..errors import UserError
from ..io import atomic_output
from ..progress import progress as progress_of
from .concepts import MIN_COUNT, Concepts, show
from .report import LayerReport, kind_label
from .stats import Stats

SEARCH_UNITS = 5  # units per layer listed for a token in the search index
SHADES = 10  # levels of per-token shading

CSS = """body{font-family:sans-serif;margin:1.5em;max-width:75em}table{border-collapse:collapse}
td,th{padding:.2em .6em;border-bottom:1px solid #ddd;text-align:left;vertical-align:top}thead th{background:#f4f4f4}
thead tr:first-child th{cursor:pointer}th input{width:7em;font-size:.8em}.num{text-align:right}
.ctx{font-family:monospace;white-space:pre-wrap}.at{outline:2px solid #e65100;font-weight:bold}
.cols{display:flex;gap:3em;flex-wrap:wrap}#search{font-size:1.1em;width:30em}#results li{margin:.2em 0}
.hint{color:#666}svg text{font-size:10px;fill:#444}svg rect{fill:#fb8c00}
""" + "".join(f".h{j}{{background:rgba(255,140,0,{j / SHADES:.1f})}}" for j in range(1, SHADES + 1)) + "\n"

JS = r"""// Sortable, filterable tables; the search of the index page. No network, no libraries.
function cellValue(row, col) { return row.cells[col].dataset.v; }

function sortable(table) {
  table.querySelectorAll("thead tr:first-child th").forEach(function (th, col) {
    th.addEventListener("click", function () {
      var body = table.tBodies[0], up = th.dataset.up !== "1";
      th.dataset.up = up ? "1" : "0";
      var rows = Array.from(body.rows);
      var numeric = rows.every(function (r) { var v = cellValue(r, col); return v === "" || !isNaN(parseFloat(v)); });
      rows.sort(function (a, b) {
        var x = cellValue(a, col), y = cellValue(b, col);
        if (x === "" || y === "") return (x === "") - (y === "");
        var c = numeric ? parseFloat(x) - parseFloat(y) : x.localeCompare(y);
        return up ? c : -c;
      });
      rows.forEach(function (r) { body.appendChild(r); });
    });
  });
  var sort = new URLSearchParams(location.search).get("sort");  // layerL.html?sort=-frequency opens sorted, descending
  if (sort) table.querySelectorAll("thead tr:first-child th").forEach(function (th) {
    if (th.dataset.key !== sort.replace(/^-/, "")) return;
    th.click();
    if (sort[0] === "-") th.click();
  });
}

// A filter is text (contained, case-insensitive) or a comparison: ">2", "<=0.5", "=3", "1..2".
function matches(value, filter) {
  filter = filter.trim();
  if (!filter) return true;
  var m = filter.match(/^(<=|>=|<|>|=)\s*(-?[\d.]+(?:e-?\d+)?)$/i), x = parseFloat(value);
  if (m) {
    var y = parseFloat(m[2]);
    if (isNaN(x)) return false;
    return {"<": x < y, "<=": x <= y, ">": x > y, ">=": x >= y, "=": x === y}[m[1]];
  }
  var r = filter.match(/^(-?[\d.]+)\s*\.\.\s*(-?[\d.]+)$/);
  if (r) return !isNaN(x) && x >= parseFloat(r[1]) && x <= parseFloat(r[2]);
  return String(value).toLowerCase().indexOf(filter.toLowerCase()) >= 0;
}

function filterable(table) {
  var inputs = Array.from(table.querySelectorAll("thead input"));
  var count = document.getElementById("shown");
  function apply() {
    var shown = 0;
    Array.from(table.tBodies[0].rows).forEach(function (row) {
      var ok = inputs.every(function (input, col) { return matches(cellValue(row, col), input.value); });
      row.style.display = ok ? "" : "none";
      shown += ok ? 1 : 0;
    });
    if (count) count.textContent = shown;
  }
  var params = new URLSearchParams(location.search);  // layerL.html?topic=music&frequency=>0.01 opens filtered
  inputs.forEach(function (input) {
    input.value = params.get(input.dataset.key) || "";
    input.addEventListener("input", apply);
  });
  apply();
}

function link(l, i) { return "neurons/" + l + "_" + i + ".html"; }

function search(query) {
  var out = document.getElementById("results"), q = query.trim().toLowerCase();
  out.innerHTML = "";
  if (!q) return;
  var unit = q.match(/^(\d+):(\d+)$/);
  if (unit) {
    var l = parseInt(unit[1], 10), i = parseInt(unit[2], 10);
    if (SEARCH.layers.indexOf(l) >= 0 && i < SEARCH.width) {
      out.innerHTML = '<p><a id="jump" href="' + link(l, i) + '">' + SEARCH.unit + " " + l + ":" + i + "</a></p>";
    } else {
      out.textContent = "no " + SEARCH.unit + " " + q + " (layers " + SEARCH.layers.join(", ") + "; 0.." + (SEARCH.width - 1) + ")";
    }
    return;
  }
  var keys = SEARCH.tokens.map(function (t) { return t.trim().toLowerCase(); });
  var found = [];
  keys.forEach(function (k, j) { if (k === q) found.push(j); });
  if (!found.length) keys.forEach(function (k, j) { if (k.indexOf(q) === 0 && found.length < 20) found.push(j); });
  if (!found.length) { out.textContent = "no token seen " + SEARCH.min_count + "+ times matches '" + query + "'"; return; }
  var html = "";
  found.forEach(function (j) {
    var hits = SEARCH.hits[j], rows = {};
    for (var h = 0; h < hits.length; h += 3) (rows[hits[h]] = rows[hits[h]] || []).push([hits[h + 1], hits[h + 2]]);
    html += "<h3>" + escapeHtml(JSON.stringify(SEARCH.tokens[j])) + " (seen " + SEARCH.counts[j] + " times)</h3><ul>";
    SEARCH.layers.forEach(function (l) {
      if (!rows[l]) return;
      html += "<li>layer " + l + ": " + rows[l].map(function (t) {
        return '<a href="' + link(l, t[0]) + '" title="' + escapeHtml(SEARCH.labels[l][t[0]]) + '">' + l + ":" + t[0] +
          "</a> (" + t[1] + ")";
      }).join(", ") + "</li>";
    });
    html += "</ul>";
  });
  out.innerHTML = html;
}

function escapeHtml(s) {
  return String(s).replace(/[&<>"]/g, function (c) { return {"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;"}[c]; });
}

document.querySelectorAll("table").forEach(sortable);
document.querySelectorAll("table.filter").forEach(filterable);
var box = document.getElementById("search");
if (box) {
  box.addEventListener("input", function () { search(box.value); });
  box.addEventListener("keydown", function (e) {
    var jump = document.getElementById("jump");
    if (e.key === "Enter" && jump) location.href = jump.href;
  });
  var q = new URLSearchParams(location.search).get("q");
  if (q) { box.value = q; search(q); }
}
"""

COLUMNS = [("unit", "index", "{}"), ("token entropy", "token_entropy", "{:.2f}"),
           ("semantic entropy", "semantic_entropy", "{:.2f}"), ("|S|", "selected", "{}"),
           ("firing rate", "frequency", "{:.3%}"), ("top mean", "top_mean", "{:.3f}"),
           ("max", "max_activation", "{:.3f}"), ("label", "label", "{}")]
TOPIC_COLUMNS = [("topic", "topic", "{}"), ("precision", "precision", "{:.2f}"), ("recall", "recall", "{:.2f}")]


def _page(title: str, body: str, root: str = "") -> str:
    return (f"<!DOCTYPE html><html><head><meta charset=\"utf-8\"><title>{escape(title)}</title>"
            f"<link rel=\"stylesheet\" href=\"{root}site.css\"></head><body>{body}"
            f"<script src=\"{root}site.js\"></script></body></html>\n")


def _cell(value, fmt: str) -> str:
    if value is None:
        return '<td data-v="">n/a</td>'
    sort = f"{value:.6g}" if isinstance(value, float) else value
    cls = ' class="num"' if isinstance(value, (int, float)) else ""
    return f'<td data-v="{escape(str(sort))}"{cls}>{escape(fmt.format(value))}</td>'


def _table(rows: list[dict], columns, link, filters: bool = False) -> str:
    head = "".join(f'<th data-key="{key}">{escape(name)}</th>' for name, key, _ in columns)
    if filters:  # a second header row: one filter per column
        head += "</tr><tr>" + "".join(f'<th><input data-key="{key}" placeholder="{"music" if key in ("label", "topic") else ">0.5"}" '
                                      f'aria-label="filter {escape(name)}"></th>' for name, key, _ in columns)
    body = []
    for r in rows:
        cells = [_cell(r[key], fmt) for _, key, fmt in columns]
        cells[0] = f'<td data-v="{r["index"]}"><a href="{link(r)}">{escape(r["neuron"])}</a></td>'
        body.append(f"<tr>{''.join(cells)}</tr>")
    cls = ' class="filter"' if filters else ""
    return f"<table{cls}><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


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


def _histogram(h: dict, fires: int, tokens: int) -> str:
    """The activation histogram as an inline SVG: one bar per log-spaced bin, ticks at powers of ten."""
    counts, edges = h["counts"], h["edges"]
    if not counts:
        return "<p>never fires</p>"
    W, H, bar = 520, 130, min(40.0, 500 / len(counts))
    top = max(counts)
    parts = [f'<svg width="{W}" height="{H + 20}" role="img" aria-label="activation histogram">']
    for j, c in enumerate(counts):
        height = 0 if c == 0 else max(1.0, H * c / top)
        parts.append(f'<rect x="{10 + j * bar:.1f}" y="{H - height:.1f}" width="{max(bar - 1, 1):.1f}" height="{height:.1f}">'
                     f"<title>{edges[j]:.3g}..{edges[j + 1]:.3g}: {c:,}</title></rect>")
    for j, e in enumerate(edges):
        if abs(math.log10(e) - round(math.log10(e))) < 1e-6:  # a power of ten
            parts.append(f'<text x="{10 + j * bar:.1f}" y="{H + 14}">{e:g}</text>')
    parts.append("</svg>")
    return (f"<p>{fires:,} non-zero activations over {tokens:,} tokens, in log-spaced bins (the tallest holds "
            f"{top:,})</p>" + "".join(parts))


def _shaded(c: dict, peak: float) -> str:
    """A context, each token shaded by the unit's activation there (relative to its largest), the top one outlined."""
    out = []
    for j, (token, act) in enumerate(zip(c["tokens"], c["acts"])):
        text = escape(token.replace("\n", "⏎"))
        level = min(SHADES, round(SHADES * act / peak)) if peak > 0 and act > 0 else 0
        cls = " ".join(([f"h{level}"] if level else []) + (["at"] if j == c["at"] else []))
        out.append(f'<span class="{cls}" title="{act:.3g}">{text}</span>' if cls or act > 0 else text)
    return "".join(out)


def _unit_page(r: dict, unit: str, steering: list[dict], last: int) -> str:
    facts = [("kind", r["kind"]), ("fires on", f"{r['frequency']:.3%} of {r['tokens']:,} tokens"),
             ("token entropy", "n/a" if r["token_entropy"] is None else f"{r['token_entropy']:.3f}"),
             ("semantic entropy", "n/a (|S| < 2)" if r["semantic_entropy"] is None else f"{r['semantic_entropy']:.3f}"),
             ("|S| (tokens above θ)", f"{r['selected']} (θ = {r['theta']:.3f})"),
             ("max activation", f"{r['max_activation']:.3f}"), ("label", r["label"])]
    if "topic" in r:
        facts.append(("topic", f"{r['topic'] or 'none'} (precision {r['precision']:.2f}, recall {r['recall']:.2f})"))
    l, i = r["layer"], r["index"]
    nav = [f'<a href="../layer{l}.html">layer {l}</a>', '<a href="../index.html">index</a>']
    nav += [f'<a href="{l}_{i - 1}.html">← {l}:{i - 1}</a>'] if i > 0 else []
    nav += [f'<a href="{l}_{i + 1}.html">{l}:{i + 1} →</a>'] if i < last else []
    body = [f"<p>{' · '.join(nav)}</p><h1>{escape(unit)} {escape(r['neuron'])} <small>{escape(r['label'])}</small></h1>",
            "<table>", *(f"<tr><th>{escape(k)}</th><td>{escape(str(v))}</td></tr>" for k, v in facts), "</table>",
            "<h2>activation histogram</h2>", _histogram(r["histogram"], r["fires"], r["tokens"]),
            ("<h2>direct logit effect</h2><p class=\"hint\">its direction through the final norm's gain and the "
             "unembedding (logit lens)</p><div class=\"cols\">"),
            *(f"<table><tr><th>{name}</th><th>logit</th></tr>" + "".join(
                f'<tr><td class="ctx">{escape(repr(t["token"]))}</td><td class="num">{t["logit"]:+.3f}</td></tr>'
                for t in r[name]) + "</table>" for name in ("promoted", "suppressed")), "</div>",
            "<h2>top tokens</h2><table><tr><th>token</th><th>mean activation</th><th>count</th></tr>",
            *(f"<tr><td class=\"ctx\">{escape(repr(t['token']))}</td><td class=\"num\">{t['mean']:.3f}</td>"
              f"<td class=\"num\">{t['count']:,}</td></tr>" for t in r["top_tokens"]), "</table>",
            ("<h2>top contexts</h2><p class=\"hint\">each token shaded by the activation there; hover for the value</p>"
             "<table><tr><th>activation</th><th>context</th></tr>"),
            *(f"<tr><td class=\"num\">{c['activation']:.3f}</td><td class=\"ctx\">{_shaded(c, r['max_activation'])}</td></tr>"
              for c in r["contexts"]), "</table>"]
    for result in steering:
        how = "greedy" if not result.get("sampling", {}).get("do_sample", True) else f"seed {result['seed']}"
        body.append(f"<h2>steering from {escape(repr(result['prompt']))} ({how})</h2>")
        for row in result["offsets"]:
            share = f" · {row['share']:.1%} of content words in '{escape(result['topic'])}'" if "share" in row else ""
            body.append(f"<h3>offset {row['offset']:+g}{' (unsteered)' if not row['offset'] else ''}{share}</h3><ol>")
            body += [f"<li class=\"ctx\">{escape(t)}</li>" for t in row["texts"]]
            body.append("</ol>")
    return _page(f"{unit} {r['neuron']}", "".join(body), "../")


def search_index(stats: Stats, labels: dict[int, list[str]], n: int = SEARCH_UNITS) -> dict:
    """Per token id seen >= MIN_COUNT times: the n units of each layer with the largest mean activation on it
    (flat [layer, index, mean, ...]), and the token's text and count."""
    seen = (stats.counts >= MIN_COUNT).nonzero().flatten()
    hits = [[] for _ in seen]
    for l in sorted(stats.layers):
        values, units = stats.abar(l)[seen].topk(min(n, stats.layers[l].dim), dim=1)
        for row, (vs, us) in enumerate(zip(values.tolist(), units.tolist())):
            hits[row] += [x for v, u in zip(vs, us) if v > 0 for x in (l, u, float(f"{v:.3g}"))]
    keep = [j for j, h in enumerate(hits) if h]
    return {"unit": stats.meta.get("units", "neuron"), "layers": sorted(stats.layers), "width": stats.meta["dim"],
            "min_count": MIN_COUNT, "labels": {str(l): labels[l] for l in labels},
            "tokens": [show(stats.pieces[int(seen[j])]) for j in keep], "counts": [int(stats.counts[seen[j]]) for j in keep],
            "hits": [hits[j] for j in keep]}


def build_site(stats_dir, out, concepts: Concepts | None = None, contexts: int = 10, progress: bool = True) -> int:
    """Write the site to `out` (replaced as a whole); returns the number of unit pages."""
    stats = Stats.load(stats_dir)
    steering = _steering(Path(stats_dir))
    meta, unit = stats.meta, stats.meta.get("units", "neuron")
    columns = COLUMNS + (TOPIC_COLUMNS if concepts is not None else [])
    pages, labels, layer_rows = 0, {}, []
    with atomic_output(Path(out)) as tmp:
        (tmp / "neurons").mkdir(parents=True)
        for l in progress_of(sorted(stats.layers), desc="browse", unit="layer", enabled=progress):
            view = LayerReport(stats, l, concepts)
            rows = [view.summary(i) for i in range(stats.layers[l].dim)]
            for r in rows:
                report = view.neuron(r["index"], contexts)
                page = _unit_page(report, unit, steering.get(r["neuron"], []), len(rows) - 1)
                (tmp / "neurons" / f"{l}_{r['index']}.html").write_text(page)
            pages += len(rows)
            labels[l] = [r["label"] for r in rows]
            title = f"layer {l} ({kind_label(view.row)})"
            body = (f"<p><a href=\"index.html\">index</a></p><h1>{escape(title)}</h1>"
                    f"<p><span id=\"shown\">{len(rows)}</span> of {len(rows)} {unit}s shown. Click a column header to "
                    f"sort; filter a column by text (<code>music</code>) or a comparison (<code>&gt;0.5</code>, "
                    f"<code>&lt;=4</code>, <code>1..2</code>); both also from the address: "
                    f"<code>layer{l}.html?topic=music&amp;frequency=&gt;0.01&amp;sort=-top_mean</code>.</p>"
                    + _table(rows, columns, lambda r: f"neurons/{r['layer']}_{r['index']}.html", filters=True))
            (tmp / f"layer{l}.html").write_text(_page(title, body))
            layer_rows.append(view.row | {"index": l, "neuron": f"layer {l}"})
        summary = [("layer", "index", "{}"), ("kind", "kind", "{}"), ("L0", "l0", "{:.2f}"), ("dead", "dead", "{}"),
                   ("token entropy", "token_entropy_mean", "{:.2f}"), ("semantic entropy", "semantic_entropy_mean", "{:.2f}")]
        fp = meta["fingerprint"]
        title = meta.get("description") or f"TopK LM {unit}s"
        body = (f"<h1>{escape(title)}</h1><p>model weights {escape(fp['weights'])} (step {fp.get('train_step')}, "
                f"alpha {fp['alpha']:g}); {meta['tokens']:,} tokens of {escape(str(meta.get('data')))}; "
                f"activations: {escape(meta['activation'])}.</p>"
                + _table(layer_rows, summary, lambda r: f"layer{r['index']}.html")
                + f"<h2>search</h2><p><input id=\"search\" placeholder=\"a token or word (music), or {unit} l:i\" "
                f"aria-label=\"search\"> <span class=\"hint\">per layer, the {SEARCH_UNITS} {unit}s with the largest "
                f"mean activation on a token (hover for the label); or Enter on l:i to open that {unit}</span></p><div id=\"results\"></div>"
                "<script src=\"search.js\"></script>")
        (tmp / "index.html").write_text(_page(title, body))
        index = json.dumps(search_index(stats, labels), separators=(",", ":"), ensure_ascii=False)
        (tmp / "search.js").write_text(f"var SEARCH = {index};\n")
        (tmp / "site.css").write_text(CSS)
        (tmp / "site.js").write_text(JS)
    return pages
