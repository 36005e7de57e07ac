"""What the report's cells say, shared by its Markdown and HTML renderings.

Values with their 95% intervals ("value ± h"), the metric columns and their labels, the
tags of a model's row (baseline, reference) and the line under each example response.
"""

from __future__ import annotations

import math
from typing import Any

FINISH_LABELS = {"eos": "EOS", "stop": "stop string", "length": "cut at max tokens"}


def finite_number(value: Any) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value))


def fmt(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def interval(report: dict[str, Any], model: str, key: str) -> list[float] | None:
    ci = ((report.get("intervals") or {}).get(model) or {}).get(key, {}).get("ci95")
    return ci if ci and all(finite_number(x) for x in ci) else None


def cell(report: dict[str, Any], model: str, key: str) -> str:
    """A table cell: the value, and "± h" (h half the 95% interval's width) when it has one."""
    value = report.get("metrics", {}).get(model, {}).get(key)
    ci = interval(report, model, key)
    if value is None or ci is None:
        return fmt(value)
    return f"{fmt(value)} ± {(ci[1] - ci[0]) / 2:.2g}"


def interval_note(report: dict[str, Any]) -> str | None:
    """What ± means, when some cell has one."""
    if not any(interval(report, name, k) for name in report.get("metrics", {})
               for k in report.get("metrics", {})[name]):
        return None
    b = report.get("bootstrap") or {}
    how = (f", {b['resamples']} resamples, seed {b['seed']}"
           if "resamples" in b and "seed" in b else "")
    return ("± is half the width of the 95% percentile bootstrap interval over prompts (all "
            f"samples of a prompt resampled together{how}); the interval can be asymmetric, "
            "and report.json holds its ends [lo, hi].")


def columns(report: dict[str, Any]) -> list[str]:
    """Metric names in metric_info order that some model has a value for."""
    metrics = report.get("metrics", {})
    names = list(report.get("metric_info", {})) or sorted({k for m in metrics.values() for k in m})
    return [k for k in names if any(m.get(k) is not None for m in metrics.values())]


def metric_label(report: dict[str, Any], key: str) -> str:
    return report.get("metric_info", {}).get(key, {}).get("label", key)


def model_tags(report: dict[str, Any], name: str) -> list[str]:
    settings = report.get("settings", {})
    tags = []
    if settings.get("baseline") == name:
        tags.append("baseline")
    if (settings.get("reference") or {}).get("name") == name:
        tags.append("reference")
    return tags


def response_meta(response: dict[str, Any]) -> str:
    parts = [f"{key} {fmt(response[key])}" for key in ("reward", "score") if key in response]
    if "length" in response:
        parts.append(f"{response['length']} tokens")
    if "finish_reason" in response:
        parts.append(FINISH_LABELS.get(response["finish_reason"], response["finish_reason"]))
    return " · ".join(parts)
