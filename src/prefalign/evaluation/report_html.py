"""report.html: one self-contained page that needs nothing but a browser.

Plots are base64 PNG data URIs, the CSS is inline, and a Content-Security-Policy meta tag
forbids every request that is not a data: image. All model text is escaped; the one script
(allowed by its hash) marks the body with data-images="ok N" or "broken K/N".
"""

from __future__ import annotations

import base64
import hashlib
import html
import json
from typing import Any

from prefalign.evaluation.report_table import (
    cell,
    columns,
    interval,
    interval_note,
    metric_label,
    model_tags,
    response_meta,
)

IMAGE_CHECK = (
    "window.addEventListener('load', function () {"
    " var all = Array.prototype.slice.call(document.images);"
    " var bad = all.filter(function (i) { return !(i.complete && i.naturalWidth > 0); });"
    " document.body.setAttribute('data-images',"
    " bad.length ? 'broken ' + bad.length + '/' + all.length : 'ok ' + all.length);"
    " });"
)

CSS = """
body{font:15px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:#1d2330;
 margin:0 auto;max-width:1200px;padding:24px 28px;background:#fff}
h1{font-size:26px;margin:0 0 4px}h2{font-size:20px;margin:32px 0 10px;border-bottom:1px solid
 #dde2ea;padding-bottom:4px}h3{font-size:16px;margin:20px 0 8px}
.sub{color:#5a6478;margin:0 0 12px}
.findings{background:#f3f7ff;border-left:4px solid #3b6fd8;padding:8px 16px;margin:16px 0}
.findings ul{margin:6px 0;padding-left:20px}.findings h2{margin-top:6px}
.scroll{overflow-x:auto}
table{border-collapse:collapse;font-size:14px}
th,td{border:1px solid #d5dbe5;padding:5px 9px;vertical-align:top}
th{background:#f1f4f9;text-align:left}
table.metrics td{text-align:right;font-variant-numeric:tabular-nums}
table.metrics td:first-child{text-align:left;font-weight:600}
.tag{font-size:11px;font-weight:400;color:#5a6478}
dl.notes{font-size:13px;color:#5a6478;display:grid;grid-template-columns:max-content 1fr;
 gap:2px 12px}dl.notes dt{font-weight:600}dl.notes dd{margin:0}
img.plot{max-width:100%;height:auto;border:1px solid #e3e7ee;border-radius:4px}
table.examples{table-layout:fixed;width:100%}
table.examples td{white-space:pre-wrap;word-break:break-word;font:13px/1.4 ui-monospace,
 SFMono-Regular,Menlo,Consolas,monospace}
.prompt{white-space:pre-wrap;background:#f6f7f9;border:1px solid #e3e7ee;padding:8px;
 font:13px/1.4 ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;margin:0 0 8px}
.meta{display:block;margin-top:6px;color:#5a6478;font:12px system-ui,sans-serif}
pre.settings{background:#f6f7f9;padding:10px;overflow-x:auto;font-size:12px}
"""


def _e(text: Any) -> str:
    return html.escape(str(text), quote=True)


def _data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _html_table(report: dict[str, Any]) -> str:
    cols = columns(report)
    info = report.get("metric_info", {})
    head = "".join(f'<th title="{_e(info.get(c, {}).get("description", c))}">'
                   f"{_e(metric_label(report, c))}</th>" for c in cols)
    rows = []
    for name in report.get("metrics", {}):
        tags = model_tags(report, name)
        tag = f' <span class="tag">({_e(", ".join(tags))})</span>' if tags else ""
        cells = "".join(_html_cell(report, name, c) for c in cols)
        rows.append(f"<tr><td>{_e(name)}{tag}</td>{cells}</tr>")
    notes = "".join(f"<dt>{_e(metric_label(report, c))}</dt><dd>{_e(info[c]['description'])}</dd>"
                    for c in cols if c in info)
    note = interval_note(report)
    note_html = f'<p class="sub" id="interval-note">{_e(note)}</p>' if note else ""
    return (f'<div class="scroll"><table class="metrics" id="comparison-table"><thead><tr>'
            f"<th>model</th>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table></div>"
            f'{note_html}<dl class="notes">{notes}</dl>')


def _html_cell(report: dict[str, Any], model: str, key: str) -> str:
    """A table cell; with an interval, its ends in the tooltip."""
    ci = interval(report, model, key)
    text = _e(cell(report, model, key))
    if ci is None or report.get("metrics", {}).get(model, {}).get(key) is None:
        return f"<td>{text}</td>"
    return f'<td title="95% interval [{ci[0]:.4g}, {ci[1]:.4g}]">{text}</td>'


def _html_examples(report: dict[str, Any]) -> str:
    parts = []
    for ex in report.get("examples", []):
        names = list(ex["responses"])
        head = "".join(f"<th>{_e(n)}</th>" for n in names)
        cells = []
        for n in names:
            r = ex["responses"][n]
            meta = response_meta(r)
            cells.append(f"<td>{_e(r.get('text', ''))}"
                         + (f'<span class="meta">{_e(meta)}</span>' if meta else "") + "</td>")
        parts.append(f"<h3>Prompt {ex['prompt_index'] + 1}</h3>"
                     f'<div class="prompt">{_e(ex["prompt"])}</div>'
                     f'<table class="examples"><thead><tr>{head}</tr></thead>'
                     f"<tbody><tr>{''.join(cells)}</tr></tbody></table>")
    return "".join(parts)


def render_html(report: dict[str, Any], plots: list[dict[str, Any]]) -> str:
    script_hash = base64.b64encode(hashlib.sha256(IMAGE_CHECK.encode()).digest()).decode()
    csp = (f"default-src 'none'; img-src data:; style-src 'unsafe-inline'; "
           f"script-src 'sha256-{script_hash}'")
    title = report.get("title", "Evaluation report")
    body = [f"<h1>{_e(title)}</h1>"]
    settings = report.get("settings", {})
    summary = [f"{len(report.get('metrics', {}))} models"]
    if settings.get("num_prompts") is not None:
        n = (settings.get("sampling") or {}).get("n", 1)
        summary.append(f"{settings['num_prompts']} prompts, {n} sample{'s' * (n != 1)} each")
    if report.get("created"):
        summary.append(f"created {report['created']}")
    body.append(f'<p class="sub">{_e(", ".join(summary))}</p>')
    if report.get("findings"):
        items = "".join(f"<li>{_e(f)}</li>" for f in report["findings"])
        body.append(f'<section class="findings" id="findings"><h2>Findings</h2><ul>{items}</ul>'
                    "</section>")
    body.append(f'<section id="comparison"><h2>Comparison</h2>{_html_table(report)}</section>')
    for plot in plots:
        if plot["id"] == "frontier":
            body.append(f'<section id="frontier"><h2>Reward vs KL</h2><img class="plot" '
                        f'alt="Reward vs KL" src="{_data_uri(plot["png"])}"></section>')
    run_plots = [p for p in plots if p["id"].startswith("run/")]
    if run_plots:
        body.append('<section id="training"><h2>Training curves</h2>')
        for plot in run_plots:
            body.append(f"<h3>{_e(plot['title'])}</h3><img class=\"plot\" "
                        f'alt="{_e(plot["title"])} training curves" '
                        f'src="{_data_uri(plot["png"])}">')
        body.append("</section>")
    if report.get("examples"):
        body.append(f'<section id="examples"><h2>Example generations</h2>'
                    f"{_html_examples(report)}</section>")
    body.append('<section id="settings"><h2>Settings</h2><pre class="settings">'
                f"{_e(json.dumps(settings, indent=2))}</pre></section>")
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f'<meta http-equiv="Content-Security-Policy" content="{csp}">'
            '<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{_e(title)}</title><style>{CSS}</style></head>\n"
            f'<body data-images="pending">\n' + "\n".join(body)
            + f"\n<script>{IMAGE_CHECK}</script>\n</body></html>\n")
