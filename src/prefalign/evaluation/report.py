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
    frontier: {y: metric name or None, curves: {label: [{kl, reward, label, model?}]}}
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

import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from prefalign.errors import ConfigError, DataError, write_files, writing
from prefalign.evaluation.plots import curves_png, frontier_png
from prefalign.evaluation.report_html import render_html
from prefalign.evaluation.report_markdown import render_markdown
from prefalign.evaluation.report_table import finite_number, interval

# Metrics of each trainer worth a panel, in panel order; other keys (lr, grad_norm) are not.
CURVE_KEYS = ("loss", "eval/loss", "rewards/margins", "rewards/accuracies", "accuracy",
              "margin", "eval/accuracy", "eval/ece", "token_accuracy", "objective/scores",
              "objective/kl", "objective/rlhf_reward", "kl_coef", "reward", "kl")


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
                  if finite_number(r.get(key))]
        if points:
            curves[key] = points
    return {"path": str(p), "curves": curves}


def normalize_frontier(frontier: Mapping[str, Sequence[Sequence]] | None
                       ) -> dict[str, list[dict[str, Any]]]:
    """{label: [(kl, reward[, point label[, model]]), ...]} -> {label: [{kl, reward, label}]}
    (+ "model" when given: the evaluated model the point is, drawn on its curve only).

    A sweep (DPO's beta, PPO's KL coefficient) is one label with one point per setting;
    points are joined in the order given, so pass them sorted to draw a curve.
    """
    curves = {}
    for label, points in (frontier or {}).items():
        curve = []
        for p in points:
            if isinstance(p, str) or len(p) not in (2, 3, 4):
                raise ConfigError(f"frontier {label!r}: a point is (kl, reward), "
                                  f"(kl, reward, label) or (kl, reward, label, model), got {p!r}")
            point = {"kl": float(p[0]), "reward": float(p[1]),
                     "label": str(p[2]) if len(p) >= 3 and p[2] is not None else None}
            if len(p) == 4:
                point["model"] = str(p[3])
            curve.append(point)
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


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-") or "run"


def make_plots(report: dict[str, Any]) -> list[dict[str, Any]]:
    """[{id, file, title, png}] for the frontier (when there is anything to place on it)
    and for every run with curves."""
    plots = []
    frontier = report.get("frontier") or {}
    y = frontier.get("y")
    curves = frontier.get("curves") or {}
    # A model that is a point of a sweep is drawn there, not again apart, with its reward's
    # interval (what the sweeps are compared by; KL bars on every point would hide them).
    swept = {p["model"] for curve in curves.values() for p in curve if p.get("model")}
    points = [(name, m["kl"], m[y], interval(report, name, "kl"), interval(report, name, y))
              for name, m in report.get("metrics", {}).items()
              if y and name not in swept and m.get("kl") is not None and m.get(y) is not None]
    curves = {label: [{**p, "reward_ci": interval(report, p["model"], y)}
                      if p.get("model") and y else p for p in curve]
              for label, curve in curves.items()}
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
