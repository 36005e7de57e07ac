"""A full disk or a read-only folder under every command that writes: one line naming the
path (exit code 2 from the CLI), no temp file left, earlier outputs as they were.

Each case runs twice: on a real file system ("real": a 5 MB tmpfs, or an ext2 loop image,
that the test fills up or remounts read-only; needs root, as in CI) and with the failure
injected at the lowest level ("injected": the file object's write raises ENOSPC after half
of its bytes, or the open raises EROFS), so the path is covered where nothing can be
mounted too.
"""

import builtins
import errno
import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError

from helpers import ScriptedJudge, preference_rows, write_jsonl
from prefalign.cli import main
from prefalign.errors import OutputError, disk_error
from prefalign.generation import SamplingOptions
from prefalign.preferences.best_of_n import generate_preferences
from prefalign.preferences.judge import judge_preferences
from prefalign.scoring import batched
from prefalign.train import checkpoint
from prefalign.train.checkpoint import checkpoint_problem, save_checkpoint

ENOSPC, EROFS = os.strerror(errno.ENOSPC), os.strerror(errno.EROFS)
SIZE_MB = 5
COMMAND_TIMEOUT = 20  # seconds for each mount, umount and mkfs


def _sh(*cmd: str) -> str | None:
    """Run a mount tool -> None on success, else why it failed."""
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=COMMAND_TIMEOUT)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"{cmd[0]}: {exc}"
    return None if done.returncode == 0 else f"{' '.join(cmd)}: {done.stderr.strip()}"


@pytest.fixture
def small_fs(tmp_path):
    """A real 5 MB file system mounted at tmp_path/disk: a tmpfs, else an ext2 loop image;
    the test is skipped, with the reason, when neither can be mounted. It is unmounted
    whatever the test does (lazily if something still holds it)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a small file system needs root")
    why = [_sh("mount", "-t", "tmpfs", "-o", f"size={SIZE_MB}m", "tmpfs", str(mount))]
    if why[0] is not None:
        image = tmp_path / "disk.img"
        with open(image, "wb") as handle:
            handle.truncate(SIZE_MB << 20)
        why += [_sh("mkfs.ext2", "-q", "-F", str(image))
                or _sh("mount", "-o", "loop", str(image), str(mount))]
        if why[1] is not None:
            pytest.skip("cannot mount a small file system: " + "; ".join(why))
    try:
        yield mount
    finally:
        if _sh("umount", str(mount)) is not None:
            _sh("umount", "-l", str(mount))


class Disk:
    """Where a test writes, and how that place breaks: `kind` "full" or "read-only", `how`
    "real" (small_fs) or "injected" (FaultyOpen on builtins.open for paths under `root`)."""

    def __init__(self, kind, how, root, monkeypatch):
        self.kind, self.how, self.root = kind, how, root
        self.reason = ENOSPC if kind == "full" else EROFS
        if how == "injected":
            self.faults = FaultyOpen(root, kind)
            monkeypatch.setattr(builtins, "open", self.faults)

    def break_(self):
        if self.how == "injected":
            self.faults.armed = True
        elif self.kind == "full":
            _fill(self.root)
        else:
            assert _sh("mount", "-o", "remount,ro", str(self.root)) is None

    def fix(self):
        if self.how == "injected":
            self.faults.armed = False
        elif self.kind == "full":
            (self.root / ".filler").unlink()
        else:
            assert _sh("mount", "-o", "remount,rw", str(self.root)) is None

    def temp_files(self):
        return sorted(p for p in self.root.rglob("*") if p.name.endswith(".tmp")
                      or ".tmp-" in p.name or p.name.startswith(".step-"))


def _fill(root: Path) -> None:
    """Write zeros to root/.filler until the file system is full."""
    chunk = bytes(1 << 16)
    with open(root / ".filler", "wb", buffering=0) as handle:
        try:
            while True:
                handle.write(chunk)
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
    assert os.statvfs(root).f_bavail == 0


class FaultyOpen:
    """builtins.open for files opened for writing under `root`: once `armed`, an open
    fails with EROFS ("read-only"), and a write puts out half of its bytes and fails with
    ENOSPC ("full") or fails with EROFS, in files opened before too (a disk that fills, or
    a file system that turns read-only, mid-run)."""

    def __init__(self, root: Path, kind: str, armed: bool = False):
        self.root, self.kind, self.armed, self.real = root, kind, armed, builtins.open

    def __call__(self, file, mode="r", *args, **kwargs):
        handle = None
        if (not isinstance(file, int) and any(c in mode for c in "wax+")
                and Path(os.path.abspath(file)).is_relative_to(self.root)):
            if self.armed and self.kind == "read-only":
                raise OSError(errno.EROFS, EROFS, str(file))
            handle = _FailingFile(self.real(file, mode, *args, **kwargs), self)
        return handle or self.real(file, mode, *args, **kwargs)


class _FailingFile:
    def __init__(self, handle, faults):
        self._handle, self._faults = handle, faults

    def write(self, data):
        if not self._faults.armed:
            return self._handle.write(data)
        if self._faults.kind == "read-only":
            raise OSError(errno.EROFS, EROFS)
        self._handle.write(data[: len(data) // 2])
        raise OSError(errno.ENOSPC, ENOSPC)

    def __getattr__(self, name):
        return getattr(self._handle, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._handle.close()


@pytest.fixture(params=[("full", "real"), ("read-only", "real"), ("full", "injected"),
                        ("read-only", "injected")], ids=lambda p: "-".join(p))
def disk(request, tmp_path, monkeypatch):
    kind, how = request.param
    if how == "real":
        root = request.getfixturevalue("small_fs")
    else:
        root = tmp_path / "out"
        root.mkdir()
    return Disk(kind, how, root, monkeypatch)


def one_error_line(capsys, path, reason, flag):
    """The command's stderr is one line naming `path`, `reason` and the fix."""
    err = capsys.readouterr().err
    line = err[err.index("prefalign: error: "):]
    assert line.count("\n") == 1, err
    assert line.startswith(f"prefalign: error: cannot write {path}: {reason}; "), line
    assert f"free disk space or choose a writable {flag}" in line
    return line


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p.name != ".filler"}


# ---- checkpoints: torch's and safetensors' own writers on a real full disk --------------


def _train_state():
    """A model of 256 KB of weights and an Adam optimizer after one step (512 KB)."""
    torch.manual_seed(0)
    model = torch.nn.Linear(256, 256, bias=False)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    model(torch.randn(2, 256)).sum().backward()
    optimizer.step()
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    return model, optimizer, scheduler


@pytest.mark.parametrize("fails_in", ["optimizer.pt", "trainable.safetensors"])
def test_checkpoint_on_a_real_full_disk(fails_in, small_fs, monkeypatch):
    """The disk fills up in the middle of torch.save(optimizer.pt) (torch's zip writer) or
    of save_file(trainable.safetensors) (safetensors' writer): a one-line OutputError
    naming the checkpoint and the reason, the temp dir gone, the earlier checkpoint whole
    and the space back."""
    model, optimizer, scheduler = _train_state()
    root = small_fs / "checkpoints"
    save_checkpoint(root, 1, model, optimizer, scheduler, {}, keep=2)
    free = _free(small_fs)
    weights = (root / "step-0000001" / "trainable.safetensors").stat().st_size
    state = (root / "step-0000001" / "optimizer.pt").stat().st_size
    # Leave room for the weights and half of the optimizer, or for half of the weights.
    leave = weights + state // 2 if fails_in == "optimizer.pt" else weights // 2
    with open(small_fs / ".filler", "wb") as handle:
        handle.write(bytes(free - leave))
    started = []
    for name in ("save_file", "_save_torch"):
        real = getattr(checkpoint, name)
        monkeypatch.setattr(checkpoint, name, lambda obj, path, real=real: (
            started.append(Path(path).name), real(obj, path))[1])
    with pytest.raises(OutputError) as error:
        save_checkpoint(root, 2, model, optimizer, scheduler, {}, keep=2)
    assert started[-1] == fails_in  # the write that failed was that file's, mid-write
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith(f"cannot write {root / 'step-0000002'}: {ENOSPC}; free disk")
    assert "earlier checkpoints are intact" in message
    assert [p.name for p in root.iterdir()] == ["step-0000001"]
    assert checkpoint_problem(root / "step-0000001") is None
    assert torch.load(root / "step-0000001" / "optimizer.pt", weights_only=True)["state"]
    (small_fs / ".filler").unlink()
    assert abs(_free(small_fs) - free) <= 64 << 10  # what the failed save wrote is freed


def _free(path):
    stat = os.statvfs(path)
    return stat.f_bavail * stat.f_frsize


def test_dpo_on_a_real_disk_that_fills_mid_checkpoint(small_fs, tmp_path, tiny_model_dir,
                                                     monkeypatch, capsys):
    """`prefalign dpo` whose disk fills up once checkpoint 3's weights are written, so that
    torch's writer fails on optimizer.pt: exit code 2, one line naming the checkpoint, no
    temp dir, checkpoints 1 and 2 whole; with space again, --resume finishes the run."""
    data = write_jsonl(tmp_path / "prefs.jsonl", preference_rows(16))
    out = small_fs / "run"
    args = ["dpo", "--model", str(tiny_model_dir), "--data", data, "--output-dir", str(out),
            "--max-steps", "4", "--batch-size", "2", "--grad-accum", "1", "--lora-r", "4",
            "--logging-steps", "1", "--save-steps", "1", "--save-total-limit", "2"]
    real = checkpoint.save_file

    def save_file(tensors, path):
        real(tensors, path)
        if Path(path).parent.name.startswith(".step-0000003-"):
            _fill(small_fs)

    monkeypatch.setattr(checkpoint, "save_file", save_file)
    assert main(args) == 2
    step = out / "checkpoints" / "step-0000003"
    one_error_line(capsys, step, ENOSPC, "--output-dir")
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-0000001",
                                                                      "step-0000002"]
    assert all(checkpoint_problem(p) is None for p in (out / "checkpoints").iterdir())
    (small_fs / ".filler").unlink()
    monkeypatch.undo()
    assert main([*args, "--resume"]) == 0
    assert "resumed from" in capsys.readouterr().out
    assert (out / "final" / "adapter_model.safetensors").is_file()


def test_checkpoint_with_the_real_exception_types_injected(tmp_path, monkeypatch):
    """Where nothing can be mounted: torch.save writes through a file whose write fails
    with ENOSPC part way (/dev/full, then a half write), and safetensors raises its own
    SafetensorError for ENOSPC; each is one line and leaves only the earlier checkpoint."""
    model, optimizer, scheduler = _train_state()
    root = tmp_path / "checkpoints"
    save_checkpoint(root, 1, model, optimizer, scheduler, {}, keep=2)
    with pytest.raises(OSError) as error:  # a real device that is always full
        checkpoint._save_torch({"x": torch.zeros(4)}, Path("/dev/full"))
    assert error.value.errno == errno.ENOSPC
    cases = {
        "torch": lambda: monkeypatch.setattr(builtins, "open", FaultyOpen(root, "full", True)),
        "safetensors": lambda: monkeypatch.setattr(checkpoint, "save_file", _raise(
            SafetensorError("Error while serializing: I/O error: No space left on device "
                            "(os error 28)"))),
    }
    for name, inject in cases.items():
        inject()
        with pytest.raises(OutputError) as error:
            save_checkpoint(root, 2, model, optimizer, scheduler, {}, keep=2)
        monkeypatch.undo()
        assert str(error.value).startswith(f"cannot write {root / 'step-0000002'}: {ENOSPC};"), name
        assert [p.name for p in root.iterdir()] == ["step-0000001"], name
        assert checkpoint_problem(root / "step-0000001") is None


def _raise(exc):
    def fail(*args, **kwargs):
        raise exc
    return fail


def test_torch_and_safetensors_write_errors_are_recognised_and_bugs_are_not():
    """disk_error: torch.save to a path that fails (a real full device) and safetensors'
    I/O errors are a failed write; any other RuntimeError is a bug and keeps its type."""
    with pytest.raises(RuntimeError) as torch_error:
        torch.save({"x": torch.zeros(1000)}, "/dev/full")
    found = disk_error(torch_error.value)
    assert isinstance(found, OSError) and found.strerror
    found = disk_error(SafetensorError("Error while serializing: I/O error: Read-only file "
                                       "system (os error 30) at path \"/x/.tmp1\""))
    assert found.errno == errno.EROFS and found.strerror == EROFS
    found = disk_error(RuntimeError("basic_ios::clear: iostream error"))  # torch, a full disk
    assert isinstance(found, OSError) and found.strerror
    assert disk_error(RuntimeError("size mismatch for weight")) is None
    assert disk_error(SafetensorError("invalid header")) is None


# ---- data merge, score, evaluate, annotate -----------------------------------------------


def test_data_merge(disk, tmp_path, capsys):
    a = write_jsonl(tmp_path / "a.jsonl", preference_rows(12))
    b = write_jsonl(tmp_path / "b.jsonl", preference_rows(12, seed=1))
    out = disk.root / "merged.jsonl"
    args = ["data", "merge", "--output", str(out), "--val-fraction", "0.25"]
    assert main([*args, a]) == 0
    before = snapshot(disk.root)
    assert set(before) == {"merged.jsonl", "merged.val.jsonl"}
    disk.break_()
    assert main([*args, a, b]) == 2
    one_error_line(capsys, out, disk.reason, "--output")
    assert disk.temp_files() == [] and snapshot(disk.root) == before
    disk.fix()
    assert main([*args, a, b]) == 0


@pytest.fixture(scope="module")
def reward_model_dir(tmp_path_factory, tokenizer):
    from prefalign.models import RewardModel
    from prefalign.tiny import build_model

    path = tmp_path_factory.mktemp("rm") / "rm"
    RewardModel.from_causal_lm(build_model(tokenizer, seed=2),
                               tokenizer.pad_token_id).save_pretrained(path, tokenizer)
    return str(path)


def test_score(disk, tmp_path, reward_model_dir, capsys):
    data = write_jsonl(tmp_path / "p.jsonl", preference_rows(6))
    out = disk.root / "scored.jsonl"
    args = ["score", "--reward-model", reward_model_dir, "--output", str(out)]
    assert main([*args, "--data", data]) == 0
    before = snapshot(disk.root)
    disk.break_()
    more = write_jsonl(tmp_path / "q.jsonl", preference_rows(9))
    assert main([*args, "--data", more]) == 2
    one_error_line(capsys, out, disk.reason, "--output")
    assert disk.temp_files() == [] and snapshot(disk.root) == before


def test_evaluate(disk, tmp_path, tiny_model_dir, capsys):
    """The report's files (plots, report.json/md/html, samples.jsonl) are written all or
    none: the earlier report stays whole."""
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "The film 1:"},
                                                       {"prompt": "My day 2:"}])
    out = disk.root / "report"
    args = ["evaluate", "--models", f"a={tiny_model_dir}", f"b={tiny_model_dir}", "--prompts",
            prompts, "--output-dir", str(out), "--max-new-tokens", "4", "--device", "cpu"]
    assert main([*args, "--seed", "1"]) == 0
    before = snapshot(disk.root)
    assert {"report/report.html", "report/report.json", "report/samples.jsonl"} <= set(before)
    disk.break_()
    assert main([*args, "--seed", "2"]) == 2
    one_error_line(capsys, out / "samples.jsonl", disk.reason, "--output-dir")  # the first
    assert disk.temp_files() == [] and snapshot(disk.root) == before


def test_annotate(disk, tmp_path, monkeypatch, capsys):
    """Each decision is saved as made; a save that fails stops the session with one line,
    and the decisions saved before it are there for the next session."""
    import io
    import sys

    rows = [{"prompt": f"Q{i}", "candidates": [f"a{i}", f"b{i}"]} for i in range(3)]
    path = write_jsonl(tmp_path / "in.jsonl", rows)
    out = disk.root / "pairs.jsonl"
    monkeypatch.setattr(sys, "stdin", io.StringIO("b a\nq\n"))
    assert main(["annotate", "--input", path, "--output", str(out)]) == 0
    before = snapshot(disk.root)
    assert len(out.read_text().splitlines()) == 1
    disk.break_()
    monkeypatch.setattr(sys, "stdin", io.StringIO("a b\nq\n"))
    assert main(["annotate", "--input", path, "--output", str(out)]) == 2
    err = capsys.readouterr().err
    line = err[err.index("prefalign: error: "):]
    assert line.count("\n") == 1 and f": {disk.reason}; free disk space" in line
    assert line.startswith(f"prefalign: error: cannot write {out}")  # the output or its record
    assert "decisions recorded before are kept" in line
    assert disk.temp_files() == [] and snapshot(disk.root) == before
    disk.fix()
    monkeypatch.setattr(sys, "stdin", io.StringIO("a b\nb a\n\n"))
    assert main(["annotate", "--input", path, "--output", str(out)]) == 0
    assert [json.loads(r)["chosen"] for r in out.read_text().splitlines()] == ["b0", "a1", "b2"]


# ---- generate and judge: a failed commit keeps the committed rows, the rerun completes ----

# Each commit needs new blocks on a real disk (rows over a page) but stays under the 8 KB
# buffer of a buffered file, whose close would then retry the failed write.
BIG = "x" * 1500


class BreakingJudge(ScriptedJudge):
    """Breaks the disk when asked about the second batch, after the first was committed."""

    def __init__(self, disk):
        super().__init__()
        self.disk = disk

    def __call__(self, texts, attempt):
        if self.calls == 1 and self.disk is not None:
            self.disk.break_()
        return super().__call__(texts, attempt)


def test_judge(disk, tmp_path):
    if (disk.kind, disk.how) == ("read-only", "real"):
        pytest.skip("a file system with files open for writing cannot be remounted "
                    "read-only; the injected case covers EROFS mid-run")
    rows = [{"prompt": f"q{i}", "candidates": [f"a{i}{BIG}", f"b{i}{BIG}"]} for i in range(4)]
    data = write_jsonl(tmp_path / "c.jsonl", rows)
    out = disk.root / "pairs.jsonl"
    with pytest.raises(OutputError) as error:
        judge_preferences(data, out, BreakingJudge(disk), batch_size=2, progress=False)
    message = str(error.value)
    assert "\n" not in message and message.startswith(f"cannot write {out}")
    assert f": {disk.reason}; free disk space" in message and "committed so far" in message
    assert disk.temp_files() == []
    disk.fix()
    report = judge_preferences(data, out, ScriptedJudge(), batch_size=2, progress=False)
    assert report.items_done_before == 2
    assert [json.loads(line)["prompt"] for line in out.read_text().splitlines()] == \
        [f"q{i}" for i in range(4)]


def test_generate(disk, tmp_path, tiny_model_dir):
    if disk.how == "real" and disk.kind == "read-only":
        pytest.skip("a file system with files open for writing cannot be remounted read-only")
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": f"The film {i}:"} for i in range(4)])
    out = disk.root / "pairs.jsonl"
    calls = []

    @batched
    def scorer(prompts, responses):
        calls.append(1)
        if len(calls) == 2:  # the second batch, after the first was committed
            disk.break_()
        return [float(len(r)) for r in responses]

    settings = dict(num_candidates=3, sampling=SamplingOptions(max_new_tokens=4), batch_size=2,
                    seed=1, progress=False, keep_candidates=True,
                    candidate_fields=lambda gens: [{"pad": BIG}] * 2)
    with pytest.raises(OutputError) as error:
        generate_preferences(str(tiny_model_dir), prompts, out, scorer, **settings)
    message = str(error.value)  # the pairs, the candidates or the progress file
    assert "\n" not in message and message.startswith(f"cannot write {disk.root / 'pairs.'}")
    assert f": {disk.reason}; free disk space" in message
    assert disk.temp_files() == []
    disk.fix()
    report = generate_preferences(str(tiny_model_dir), prompts, out, scorer, **settings)
    assert report.prompts_done_before == 2
    whole = disk.root / "whole.jsonl"
    generate_preferences(str(tiny_model_dir), prompts, whole, scorer, **settings)
    assert out.read_bytes() == whole.read_bytes()
