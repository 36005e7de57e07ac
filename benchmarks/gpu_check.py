"""The GPU check: every GPU figure of benchmarks/RESULTS.md, from one command on one GPU.

    make gpu-check            # on the GPU machine, with .gpu-wheels carried there
    make gpu-check DRY=1      # the same steps on a CPU with tiny shapes, in about a minute

Steps, in order, each in its own process with its own time limit inside one global budget
(--budget seconds): a step that fails or runs out of time is recorded as such and the
next one runs.

  environment  python3 --version, pip list, nvidia-smi, torch/CUDA (first, into the log)
  install      trl, datasets and their missing dependencies from .gpu-wheels, offline,
               into this interpreter (not a virtualenv); skipped when dry
  pytest_gpu   the tests marked `gpu`, listed with their outcomes
  dpo          bench_gpu_dpo.py: LoRA and full fine-tuning, prefalign vs TRL's DPOTrainer
  reward       bench_gpu_reward.py: the same against TRL's RewardTrainer
  fsdp         gpu_steps.py fsdp: FSDP full shard on 1 process vs a plain run, per-step loss
  memory       gpu_steps.py memory: peak memory against length and vocabulary, OOM included

Everything goes to OUT/gpu-check.json (rewritten after every step, so a run cut short
keeps what it measured) and OUT/gpu-check.log; OUT is $OUT, or ./gpu-check-out when it is
unset. `benchmarks/gpu_results.py OUT/gpu-check.json` turns the JSON into a dated section
for RESULTS.md.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
STEPS = ("environment", "install", "pytest_gpu", "dpo", "reward", "fsdp", "memory")
# Seconds per step on the GPU (each also capped by what is left of the budget).
LIMITS = {"environment": 60, "install": 150, "pytest_gpu": 120, "dpo": 240, "reward": 180,
          "fsdp": 150, "memory": 150}
# Packages the install step asks for; pip takes their dependencies from the same folder.
WANTED = ("trl", "datasets")


class Check:
    """The running check: the JSON being filled, the log, the budget."""

    def __init__(self, out: Path, dry: bool, budget: float, wheels: Path) -> None:
        self.out, self.dry, self.wheels = out, dry, wheels
        self.deadline = time.monotonic() + budget
        self.log_path = out / "gpu-check.log"
        self.log_path.write_text("")
        self.report: dict = {"started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
                             "dry": dry, "budget_s": budget, "steps": {}}
        self.env = {**os.environ, "PYTHONPATH": os.pathsep.join(
            [str(ROOT / "src"), str(HERE), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
            "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
            "PIP_BREAK_SYSTEM_PACKAGES": "1", "PIP_NO_INPUT": "1"}

    def log(self, text: str) -> None:
        with self.log_path.open("a") as handle:
            handle.write(text if text.endswith("\n") else text + "\n")

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def run(self, cmd: list[str], limit: float) -> tuple[int | None, str]:
        """Run `cmd` (its own process group) for at most `limit` seconds; (exit code or
        None on time-out, its output). The output also goes to the log."""
        self.log(f"$ {' '.join(cmd)}")
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                cwd=ROOT, env=self.env, start_new_session=True)
        try:
            output, _ = proc.communicate(timeout=max(limit, 1))
            code: int | None = proc.returncode
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the step and every process it started
            output, _ = proc.communicate()
            code = None
        self.log(output or "")
        return code, output or ""

    def step(self, name: str, body: Callable[[float], dict]) -> None:
        """Run one step within its limit and the budget; record status, seconds, results."""
        limit = min(LIMITS[name], self.left())
        started = time.monotonic()
        self.log(f"\n===== {name} (limit {limit:.0f} s) =====")
        if limit < 5:
            record = {"status": "timeout", "reason": "no time left in the budget"}
        else:
            try:
                record = body(limit)
            except Exception as error:  # a broken step must not stop the others
                record = {"status": "failed", "reason": f"{type(error).__name__}: {error}"}
        record["seconds"] = round(time.monotonic() - started, 1)
        self.report["steps"][name] = record
        self.log(f"----- {name}: {record['status']} {record.get('reason', '')}")
        self.save()

    def save(self) -> None:
        (self.out / "gpu-check.json").write_text(json.dumps(self.report, indent=2) + "\n")


def _status(code: int | None, output: str, results: dict | None = None) -> dict:
    if code is None:
        return {"status": "timeout", "reason": "ran past its time limit", **(results or {})}
    if code != 0:
        tail = [line for line in output.strip().splitlines() if line.strip()][-1:] or [""]
        return {"status": "failed", "reason": f"exit {code}: {tail[0][:300]}", **(results or {})}
    return {"status": "ok", **(results or {})}


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


# -- the steps --------------------------------------------------------------------------


def environment(check: Check, limit: float) -> dict:
    py = sys.executable
    code, version = check.run(["python3", "--version"], limit)
    check.run([py, "-m", "pip", "list"], limit)
    if _which("nvidia-smi"):
        check.run(["nvidia-smi"], limit)
    # Versions from the package metadata: importing transformers costs seconds.
    probe = ("import json, sys, torch; from importlib.metadata import version as v; "
             "c = torch.cuda.is_available(); "
             "print(json.dumps({'python': sys.version.split()[0], 'torch': torch.__version__, "
             "'cuda': torch.version.cuda, 'cuda_available': c, 'transformers': "
             "v('transformers'), 'accelerate': v('accelerate'), 'device': "
             "torch.cuda.get_device_name() if c else 'cpu', 'bf16': c and "
             "torch.cuda.is_bf16_supported()}))")
    code, output = check.run([py, "-c", probe], limit)
    facts = json.loads(output.strip().splitlines()[-1]) if code == 0 else {}
    check.report.update({k: facts.get(k) for k in ("device", "python", "torch")})
    return _status(code, output, {"python3": version.strip(), "interpreter": py, **facts})


def _which(name: str) -> bool:
    return any(os.access(os.path.join(d, name), os.X_OK)
               for d in os.environ.get("PATH", "").split(os.pathsep))


def install(check: Check, limit: float) -> dict:
    if check.dry:
        return {"status": "skipped", "reason": "dry run: this environment's packages"}
    wheels = sorted(glob.glob(str(check.wheels / "*.whl")))
    if not wheels:
        return {"status": "failed", "reason": f"no wheels in {check.wheels}: run `make "
                "gpu-wheels` on a machine with network and copy the folder along"}
    here = f"cp{sys.version_info.major}{sys.version_info.minor}"
    built = sorted({part for w in wheels for part in Path(w).name.split("-") if part.startswith("cp3")})
    if built and here not in built:
        return {"status": "failed", "reason": f"the wheels are built for {built}, this Python "
                f"is {here}: run `make gpu-wheels GPU_PYTHON={sys.version_info.major}."
                f"{sys.version_info.minor}` and copy the folder again"}
    pip = [sys.executable, "-m", "pip", "install", "--no-index", "--find-links", str(check.wheels)]
    code, output = check.run([*pip, *WANTED], limit)
    how = "resolved"
    if code != 0:
        # A pin this image cannot meet (e.g. an older huggingface_hub): the wheels alone.
        how = "--no-deps"
        code, output = check.run([*pip, "--no-deps", *wheels], check.left())
    probe = "import trl, datasets; print(trl.__version__, datasets.__version__)"
    ok, versions = check.run([sys.executable, "-c", probe], 60)
    return _status(ok, versions, {"how": how, "pip_exit": code,
                                  "versions": versions.strip().splitlines()[-1:]})


def pytest_gpu(check: Check, limit: float) -> dict:
    files = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tests").glob("test_*.py")
                   if "mark.gpu" in p.read_text())
    xml = check.out / "pytest-gpu.xml"
    code, output = check.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                              "-m", "gpu", f"--junitxml={xml}", *files], limit)
    tests = {}
    if xml.exists():
        for case in ET.parse(xml).iter("testcase"):
            kinds = [child.tag for child in case if child.tag in ("failure", "error", "skipped")]
            tests[f"{case.get('classname')}::{case.get('name')}"] = (kinds or ["passed"])[0]
    counts = {k: sum(v == k for v in tests.values()) for k in ("passed", "failed", "error", "skipped")}
    results = {"files": files, "tests": tests, "counts": counts}
    if code == 0 and not tests:
        return {"status": "failed", "reason": "no gpu-marked test ran", **results}
    return _status(code, output, results)


def _bench(check: Check, limit: float, script: str, modes: str, name: str) -> dict:
    path = check.out / f"{name}.json"
    args = ["--smoke"] if check.dry else ["--steps", "12", "--warmup", "4"]
    code, output = check.run([sys.executable, str(HERE / script), "--modes", modes,
                              "--json", str(path), *args], limit)
    results = _read_json(path)
    failed = [m for m, r in results.get("results", {}).items() if "error" in r]
    if code == 0 and failed:
        return {"status": "failed", "reason": f"modes failed: {failed}", **results}
    return _status(code, output, results)


# LoRA and full fine-tuning for both frameworks; dry, one of each framework keeps every
# code path alive at half the time.
MODES = "prefalign,trl-fast,prefalign+full,trl-fast+full"
DRY_MODES = {"dpo": "prefalign+full,trl-fast", "reward": "prefalign,trl-fast+full"}


def dpo(check: Check, limit: float) -> dict:
    return _bench(check, limit, "bench_gpu_dpo.py",
                  DRY_MODES["dpo"] if check.dry else MODES, "dpo")


def reward(check: Check, limit: float) -> dict:
    return _bench(check, limit, "bench_gpu_reward.py",
                  DRY_MODES["reward"] if check.dry else MODES, "reward")


def _gpu_step(check: Check, limit: float, name: str) -> dict:
    code, output = check.run([sys.executable, str(HERE / "gpu_steps.py"), name, "--out",
                              str(check.out), *(["--dry"] if check.dry else [])], limit)
    results = _read_json(check.out / f"{name}.json")
    status = _status(code, output, results)
    if status["status"] == "ok" and results.get("equal") is False:
        status.update(status="failed", reason=f"FSDP and plain losses differ by more than "
                      f"{results['tolerance']}: {results['max_abs_diff']}")
    return status


def fsdp(check: Check, limit: float) -> dict:
    return _gpu_step(check, limit, "fsdp")


def memory(check: Check, limit: float) -> dict:
    return _gpu_step(check, limit, "memory")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry", action="store_true", help="tiny shapes on the CPU, no install")
    parser.add_argument("--out", default=os.environ.get("OUT") or "gpu-check-out",
                        help="output folder (default: $OUT, else ./gpu-check-out)")
    parser.add_argument("--wheels", default=".gpu-wheels", help="folder of `make gpu-wheels`")
    parser.add_argument("--budget", type=float, default=480.0, help="seconds for all steps")
    parser.add_argument("--steps", default=",".join(STEPS), help="a subset, comma-separated")
    args = parser.parse_args()
    chosen = args.steps.split(",")
    unknown = sorted(set(chosen) - set(STEPS))
    if unknown:
        parser.error(f"unknown steps {unknown}: choose from {','.join(STEPS)}")
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    check = Check(out, args.dry, args.budget, (ROOT / args.wheels).resolve())
    bodies = {"environment": environment, "install": install, "pytest_gpu": pytest_gpu,
              "dpo": dpo, "reward": reward, "fsdp": fsdp, "memory": memory}
    for name in STEPS:
        if name in chosen:
            check.step(name, lambda limit, body=bodies[name]: body(check, limit))
    check.report["finished"] = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    check.save()
    for name, record in check.report["steps"].items():
        print(f"{name:<12} {record['status']:<8} {record['seconds']:>6.1f} s  "
              f"{record.get('reason', '')[:120]}")
    print(f"wrote {out / 'gpu-check.json'} and {out / 'gpu-check.log'}")


if __name__ == "__main__":
    main()
