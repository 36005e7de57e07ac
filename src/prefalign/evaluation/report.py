"""The evaluation report: report.json, report.md (+ PNG files) and a self-contained report.html.

Everything is rendered from one JSON-able dict (what evaluate() builds and report.json
holds), so a caller can add findings or sweep curves to a saved report.json and render it
again with `write_report(json.loads(...), output_dir)`:

    title, created, settings      free text / the run's settings (shown as JSON)
    findings: [str]               lines shown first, in both md and html
    metrics: {model: {name: x}}   the comparison table; a column that is None for every
    metric_info: {name: {label, description}}   model is left out
    intervals: {model: {name: {value, ci95: [lo, hi]}}}   shown as "value ± h", h half
    bootstrap: {resamples, seed, level, ...}            the interval's width; optional
    frontier: {y: metric name or None, curves: {label: [{kl, reward, label}]}}
    runs: {name: {path, curves: {metric: [[step, value], ...]}}}
    examples: [{prompt_index, prompt, responses: {model: {text, reward?, score?, ...}}}]

report.html needs nothing but a browser: plots are base64 PNG data URIs, the CSS is inline,
and a Content-Security-Policy meta tag forbids every request that is not a data: image, so
the page cannot load anything from the network even by mistake. All model text is escaped;
the one script (allowed by its hash, so no injected script could run) marks the body with
data-images="ok N" once every image has decoded, or "broken K/N" otherwise: a headless
browser's --dump-dom shows whether the plots rendered.
"""

from __future__ import annotations

import base64
import hashlib
import html
import json
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from prefalign.errors import ConfigError, DataError, write_files, writing
from prefalign.evaluation.plots import curves_png, frontier_png

# Metrics of each trainer worth a panel, in panel order; other keys (lr, grad_norm) are not.
CURVE_KEYS = ("loss", "eval/loss", "rewards/margins", "rewards/accuracies", "accuracy",
              "margin", "eval/accuracy", "eval/ece", "token_accuracy", "objective/scores",
              "objective/kl", "objective/rlhf_reward", "kl_coef")

FINISH_LABELS = {"eos": "EOS", "stop": "stop string", "length": "cut at max tokens"}

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


def load_run_curves(path: str | Path, keys: tuple[str, ...] = CURVE_KEYS) -> dict[str, Any]:
    """{path, curves: {key: [[step, value], ...]}} from a run directory or its metrics.jsonl;
    non-numeric values ("nan" written as text) are skipped."""
    from prefalign.train.metrics import read_metrics

    p = Path(path)
    file = p / "metrics.jsonl" if p.is_dir() else p
    if not file.is_file():
        raise DataError(f"run {path}: no metrics.jsonl found ({file})")
    records = read_metrics(file)
    curves = {}
    for key in keys:
        points = [[r.get("step", i), float(r[key])] for i, r in enumerate(records)
                  if _number(r.get(key))]
        if points:
            curves[key] = points
    return {"path": str(p), "curves": curves}


def normalize_frontier(frontier: Mapping[str, Sequence[Sequence]] | None
                       ) -> dict[str, list[dict[str, Any]]]:
    """{label: [(kl, reward[, point label]), ...]} -> {label: [{kl, reward, label}]}.

    A sweep (DPO's beta, PPO's KL coefficient) is one label with one point per setting;
    points are joined in the order given, so pass them sorted to draw a curve.
    """
    curves = {}
    for label, points in (frontier or {}).items():
        curve = []
        for p in points:
            if isinstance(p, str) or len(p) not in (2, 3):
                raise ConfigError(f"frontier {label!r}: a point is (kl, reward) or "
                                  f"(kl, reward, label), got {p!r}")
            curve.append({"kl": float(p[0]), "reward": float(p[1]),
                          "label": str(p[2]) if len(p) == 3 and p[2] is not None else None})
        curves[str(label)] = curve
    return curves


def example_table(samples: Mapping[str, Sequence[Mapping[str, Any]]], prompts: Sequence[str],
                  count: int) -> list[dict[str, Any]]:
    """The first `count` prompts (display text) with every model's first sample."""
    out = []
    for i in range(min(count, len(prompts))):
        responses = {}
        for name, rows in samples.items():
            row = next(r for r in rows if r["prompt_index"] == i and r["candidate"] == 0)
            responses[name] = {k: row[k] for k in ("text", "reward", "score", "length",
                                                   "finish_reason") if k in row}
        out.append({"prompt_index": i, "prompt": prompts[i], "responses": responses})
    return out


def _number(value: Any) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value))


def fmt(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _interval(report: dict[str, Any], model: str, key: str) -> list[float] | None:
    ci = ((report.get("intervals") or {}).get(model) or {}).get(key, {}).get("ci95")
    return ci if ci and all(_number(x) for x in ci) else None


def cell(report: dict[str, Any], model: str, key: str) -> str:
    """A table cell: the value, and "± h" (h half the 95% interval's width) when it has one."""
    value = report.get("metrics", {}).get(model, {}).get(key)
    ci = _interval(report, model, key)
    if value is None or ci is None:
        return fmt(value)
    return f"{fmt(value)} ± {(ci[1] - ci[0]) / 2:.2g}"


def interval_note(report: dict[str, Any]) -> str | None:
    """What ± means, when some cell has one."""
    if not any(_interval(report, name, k) for name in report.get("metrics", {})
               for k in report.get("metrics", {})[name]):
        return None
    b = report.get("bootstrap") or {}
    how = (f", {b['resamples']} resamples, seed {b['seed']}"
           if "resamples" in b and "seed" in b else "")
    return ("± is half the width of the 95% percentile bootstrap interval over prompts (all "
            f"samples of a prompt resampled together{how}); the interval can be asymmetric, "
            "and report.json holds its ends [lo, hi].")


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-") or "run"


def make_plots(report: dict[str, Any]) -> list[dict[str, Any]]:
    """[{id, file, title, png}] for the frontier (when there is anything to place on it)
    and for every run with curves."""
    plots = []
    frontier = report.get("frontier") or {}
    y = frontier.get("y")
    points = [(name, m["kl"], m[y], _interval(report, name, "kl"), _interval(report, name, y))
              for name, m in report.get("metrics", {}).items()
              if y and m.get("kl") is not None and m.get(y) is not None]
    curves = frontier.get("curves") or {}
    if points or curves:
        label = report.get("metric_info", {}).get(y, {}).get("description", y) if y else "reward"
        plots.append({"id": "frontier", "file": "frontier.png", "title": "Reward vs KL",
                      "png": frontier_png(points, curves, label or "reward")})
    used = set()
    for name, run in (report.get("runs") or {}).items():
        if not run.get("curves"):
            continue
        file = f"curves-{_slug(name)}.png"
        while file in used:
            file = file[:-4] + "-1.png"
        used.add(file)
        plots.append({"id": f"run/{name}", "file": file, "title": name,
                      "png": curves_png(name, run["curves"])})
    return plots


def _columns(report: dict[str, Any]) -> list[str]:
    """Metric names in metric_info order that some model has a value for."""
    metrics = report.get("metrics", {})
    names = list(report.get("metric_info", {})) or sorted({k for m in metrics.values() for k in m})
    return [k for k in names if any(m.get(k) is not None for m in metrics.values())]


def _label(report: dict[str, Any], key: str) -> str:
    return report.get("metric_info", {}).get(key, {}).get("label", key)


def _tags(report: dict[str, Any], name: str) -> list[str]:
    settings = report.get("settings", {})
    tags = []
    if settings.get("baseline") == name:
        tags.append("baseline")
    if (settings.get("reference") or {}).get("name") == name:
        tags.append("reference")
    return tags


def _response_meta(response: dict[str, Any]) -> str:
    parts = [f"{key} {fmt(response[key])}" for key in ("reward", "score") if key in response]
    if "length" in response:
        parts.append(f"{response['length']} tokens")
    if "finish_reason" in response:
        parts.append(FINISH_LABELS.get(response["finish_reason"], response["finish_reason"]))
    return " · ".join(parts)


# -- Markdown --------------------------------------------------------------------------


def md_text(text: str) -> str:
    """Model text safe inside a Markdown table cell: HTML escaped (Markdown passes raw HTML
    through), Markdown punctuation backslash-escaped, newlines as <br>."""
    text = html.escape(text, quote=False)
    text = re.sub(r"([\\`*_\[\]|#])", r"\\\1", text)
    return text.replace("\r\n", "\n").replace("\n", "<br>")


def render_markdown(report: dict[str, Any], plots: list[dict[str, Any]]) -> str:
    lines = [f"# {md_text(report.get('title', 'Evaluation report'))}", ""]
    if report.get("created"):
        lines += [f"Created {report['created']}.", ""]
    if report.get("findings"):
        lines += ["## Findings", ""] + [f"- {md_text(f)}" for f in report["findings"]] + [""]
    cols = _columns(report)
    lines += ["## Comparison", "", "| model | " + " | ".join(_label(report, c) for c in cols) + " |",
              "|---|" + "---:|" * len(cols)]
    for name in report.get("metrics", {}):
        tags = _tags(report, name)
        head = md_text(name) + (f" ({', '.join(tags)})" if tags else "")
        lines.append(f"| {head} | " + " | ".join(cell(report, name, c) for c in cols) + " |")
    lines += [""] + [f"- **{_label(report, c)}**: {report['metric_info'][c]['description']}"
                     for c in cols if c in report.get("metric_info", {})] + [""]
    note = interval_note(report)
    if note:
        lines += [note, ""]
    for plot in plots:
        if plot["id"] == "frontier":
            lines += ["## Reward vs KL", "", f"![Reward vs KL]({plot['file']})", ""]
    run_plots = [p for p in plots if p["id"].startswith("run/")]
    if run_plots:
        lines += ["## Training curves", ""]
        for plot in run_plots:
            lines += [f"### {md_text(plot['title'])}", "",
                      f"![{md_text(plot['title'])} training curves]({plot['file']})", ""]
    if report.get("examples"):
        lines += ["## Example generations", ""]
        for ex in report["examples"]:
            names = list(ex["responses"])
            lines += [f"### Prompt {ex['prompt_index'] + 1}", "",
                      "> " + md_text(ex["prompt"]).replace("<br>", "<br>\n> "), "",
                      "| " + " | ".join(md_text(n) for n in names) + " |",
                      "|" + "---|" * len(names),
                      "| " + " | ".join(_md_response(ex["responses"][n]) for n in names) + " |",
                      ""]
    lines += ["## Settings", "", "```json", json.dumps(report.get("settings", {}), indent=2),
              "```", ""]
    return "\n".join(lines)


def _md_response(response: dict[str, Any]) -> str:
    meta = _response_meta(response)
    return md_text(response.get("text", "")) + (f"<br>*{md_text(meta)}*" if meta else "")


# -- HTML ------------------------------------------------------------------------------


def _e(text: Any) -> str:
    return html.escape(str(text), quote=True)


def _data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _html_table(report: dict[str, Any]) -> str:
    cols = _columns(report)
    info = report.get("metric_info", {})
    head = "".join(f'<th title="{_e(info.get(c, {}).get("description", c))}">'
                   f"{_e(_label(report, c))}</th>" for c in cols)
    rows = []
    for name in report.get("metrics", {}):
        tags = _tags(report, name)
        tag = f' <span class="tag">({_e(", ".join(tags))})</span>' if tags else ""
        cells = "".join(_html_cell(report, name, c) for c in cols)
        rows.append(f"<tr><td>{_e(name)}{tag}</td>{cells}</tr>")
    notes = "".join(f"<dt>{_e(_label(report, c))}</dt><dd>{_e(info[c]['description'])}</dd>"
                    for c in cols if c in info)
    note = interval_note(report)
    note_html = f'<p class="sub" id="interval-note">{_e(note)}</p>' if note else ""
    return (f'<div class="scroll"><table class="metrics" id="comparison-table"><thead><tr>'
            f"<th>model</th>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table></div>"
            f'{note_html}<dl class="notes">{notes}</dl>')


def _html_cell(report: dict[str, Any], model: str, key: str) -> str:
    """A table cell; with an interval, its ends in the tooltip."""
    ci = _interval(report, model, key)
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
            meta = _response_meta(r)
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


def write_report(report: dict[str, Any], output_dir: str | Path,
                 extra: dict[str, str | bytes] | None = None) -> dict[str, Path]:
    """Write the plots (PNG), report.json, report.md and report.html -> their paths.

    report["plots"] is set to the written plot files ({id, file, title}). extra: more
    files of the report, name -> content. All files are written, or none: a full disk or a
    read-only folder leaves an earlier report as it was, no temp file, and raises a
    one-line OutputError naming the file.
    """
    out = Path(output_dir)
    with writing(out):
        out.mkdir(parents=True, exist_ok=True)
    plots = make_plots(report)
    report["plots"] = [{k: p[k] for k in ("id", "file", "title")} for p in plots]
    paths = {"json": out / "report.json", "md": out / "report.md", "html": out / "report.html"}
    files: dict[Path, str | bytes] = {out / name: content for name, content in (extra or {}).items()}
    files.update({out / plot["file"]: plot["png"] for plot in plots})
    files[paths["json"]] = json.dumps(report, indent=2) + "\n"
    files[paths["md"]] = render_markdown(report, plots)
    files[paths["html"]] = render_html(report, plots)  # last: the page a reader opens
    write_files(files)
    for plot in plots:
        paths[plot["id"]] = out / plot["file"]
    return paths
