"""The GPU check's dry mode: every step runs on the CPU with tiny shapes, so the script that
a GPU machine runs now and then cannot rot in between (benchmarks/gpu_check.py)."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

from gpu_check import STEPS  # noqa: E402
from gpu_results import markdown  # noqa: E402


# About 52 s on a quiet 2-core machine: a dozen fresh interpreters, each importing torch
# (most also TRL), is the price of running every step as the GPU machine does.
def test_dry_run_records_every_step(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--dry",
                           "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads((out / "gpu-check.json").read_text())
    steps = report["steps"]
    assert list(steps) == list(STEPS)
    assert report["dry"] is True and report["finished"]
    assert steps["install"]["status"] == "skipped"
    failed = {k: v.get("reason") for k, v in steps.items() if v["status"] not in ("ok", "skipped")}
    assert not failed
    # The gpu-marked tests are listed (skipped here: no CUDA).
    assert "tests.test_gpu::test_bf16_dpo_step_matches_fp32" in steps["pytest_gpu"]["tests"]
    # Both frameworks ran in the trainer benchmarks, with LoRA and full fine-tuning.
    assert set(steps["dpo"]["results"]) == {"prefalign+full", "trl-fast"}
    assert set(steps["reward"]["results"]) == {"prefalign", "trl-fast+full"}
    assert all(r["tokens_per_s"] > 0 for s in ("dpo", "reward") for r in steps[s]["results"].values())
    assert steps["fsdp"]["fsdp"] == "skipped: no CUDA"
    assert len(steps["fsdp"]["plain"]["loss"]) == steps["fsdp"]["steps"]
    points = steps["memory"]["points"]
    assert {p["path"] for p in points} == {"prefalign-chunked", "prefalign", "trl"}
    # The three log-prob paths compute the same numbers (fp32 on the CPU).
    assert all(p["max_logps_gap"] < 1e-3 for p in points)
    assert "$ python3 --version" in (out / "gpu-check.log").read_text()
    section = markdown(report)
    assert section.startswith("### GPU check, ") and "| dpo | ok |" in section
