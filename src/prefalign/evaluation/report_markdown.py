"""report.md: the evaluation report as Markdown, with the plots as PNG files beside it."""

from __future__ import annotations

import html
import json
import re
from typing import Any

from prefalign.evaluation.report_table import (
    cell,
    columns,
    interval_note,
    metric_label,
    model_tags,
    response_meta,
)


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
    cols = columns(report)
    lines += ["## Comparison", "", "| model | " + " | ".join(metric_label(report, c) for c in cols) + " |",
              "|---|" + "---:|" * len(cols)]
    for name in report.get("metrics", {}):
        tags = model_tags(report, name)
        head = md_text(name) + (f" ({', '.join(tags)})" if tags else "")
        lines.append(f"| {head} | " + " | ".join(cell(report, name, c) for c in cols) + " |")
    lines += [""] + [f"- **{metric_label(report, c)}**: {report['metric_info'][c]['description']}"
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
    meta = response_meta(response)
    return md_text(response.get("text", "")) + (f"<br>*{md_text(meta)}*" if meta else "")
