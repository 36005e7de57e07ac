"""Turn gpu-check.json (benchmarks/gpu_check.py) into a dated markdown section for RESULTS.md.

    python benchmarks/gpu_results.py gpu-check-out/gpu-check.json            # prints it
    python benchmarks/gpu_results.py OUT/gpu-check.json --append benchmarks/RESULTS.md
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def _num(value, digits: int = 2, scale: float = 1.0, suffix: str = "") -> str:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return f"{value * scale:.{digits}f}{suffix}"
    return "-" if value is None else str(value)


def _trainer_table(step: dict) -> list[str]:
    rows = ["| mode | tokens/s | peak GB (max allocated) | MFU |", "|---|---|---|---|"]
    for mode, r in step.get("results", {}).items():
        if "error" in r:
            rows.append(f"| {mode} | failed: {' '.join(r['error'])[:120]} | | |")
        else:
            rows.append(f"| {mode} | {_num(r['tokens_per_s'], 0)} | {_num(r['peak_mem_gb'])} "
                        f"| {_num(r['mfu'], 1, 100, '%')} |")
    return rows


def _memory_table(step: dict) -> list[str]:
    points = step.get("points", [])
    paths = list(dict.fromkeys(p["path"] for p in points))
    rows = ["| vocabulary | length | " + " | ".join(f"{p} GB" for p in paths) + " |",
            "|---|---|" + "---|" * len(paths)]
    for key in dict.fromkeys((p["vocab"], p["length"]) for p in points):
        cells = {p["path"]: p for p in points if (p["vocab"], p["length"]) == key}
        rows.append(f"| {key[0]:,} | {key[1]:,} | " + " | ".join(
            _num(cells[p].get("peak_gb")) if p in cells else "" for p in paths) + " |")
    return rows


def _fsdp_lines(step: dict) -> list[str]:
    lines = []
    for run in ("plain", "fsdp"):
        value = step.get(run)
        if isinstance(value, dict) and "loss" in value:
            lines.append(f"- {run} loss per step: {', '.join(f'{x:.5f}' for x in value['loss'])}")
        elif value is not None:
            lines.append(f"- {run}: {value.get('error') if isinstance(value, dict) else value}")
    if "max_abs_diff" in step:
        verdict = "equal" if step.get("equal") else "NOT equal"
        lines.append(f"- largest difference {step['max_abs_diff']}: {verdict} within "
                     f"{step['tolerance']}")
    return lines


def markdown(report: dict) -> str:
    """The section: a status line per step, then each step's figures."""
    steps = report.get("steps", {})
    date = report.get("started", "")[:10]
    what = ", ".join(str(x) for x in (report.get("device"), report.get("python") and
                                      f"Python {report['python']}", report.get("torch") and
                                      f"torch {report['torch']}") if x)
    out = [f"### GPU check, {date} ({what}{', dry run' if report.get('dry') else ''})", "",
           "| step | status | seconds | note |", "|---|---|---|---|"]
    for name, step in steps.items():
        out.append(f"| {name} | {step['status']} | {step.get('seconds', '')} | "
                   f"{step.get('reason', '')[:160]} |")
    if "pytest_gpu" in steps:
        tests = steps["pytest_gpu"].get("tests", {})
        out += ["", f"gpu-marked tests: {steps['pytest_gpu'].get('counts', {})}"]
        out += [f"- {name}: {outcome}" for name, outcome in tests.items()]
    for name, title in (("dpo", "DPO vs TRL DPOTrainer"), ("reward", "reward model vs TRL "
                                                                     "RewardTrainer")):
        if steps.get(name, {}).get("results"):
            s = steps[name]
            out += ["", f"{title} ({_num(s.get('per_pair'), 0)} tokens per pair, "
                        f"{_num(s.get('flops_per_step'), 3, 1e-12)} TFLOP per step):", ""]
            out += _trainer_table(s)
    if "fsdp" in steps:
        out += ["", f"FSDP full shard (1 process) vs a plain run, {steps['fsdp'].get('model', '')}:"]
        out += _fsdp_lines(steps["fsdp"])
    if steps.get("memory", {}).get("points"):
        m = steps["memory"]
        out += ["", f"Peak memory of one log-prob forward+backward, {m['rows']} rows, "
                    f"{m['layers']} layer of hidden {m['hidden']} ({m['peak_memory']}):", ""]
        out += _memory_table(m)
    return "\n".join(out) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json", help="gpu-check.json")
    parser.add_argument("--append", help="append the section to this markdown file")
    args = parser.parse_args()
    section = markdown(json.loads(Path(args.json).read_text()))
    if args.append:
        with open(args.append, "a") as handle:
            handle.write("\n" + section)
    print(section, end="")


if __name__ == "__main__":
    main()
