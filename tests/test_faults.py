"""Faults: kill -9 mid-checkpoint then --resume, a full disk or read-only output folder,
and generation / judging / annotation outputs cut mid-write."""

import errno
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import ScriptedJudge, preference_rows, write_jsonl
from prefalign.cli import main
from prefalign.errors import PrefalignError
from prefalign.preferences.annotate import annotate
from prefalign.preferences.judge import judge_preferences
from prefalign.train.checkpoint import list_checkpoints
from prefalign.train.metrics import read_metrics

STEPS = 6


def dpo_args(model_dir, data, out):
    """A 6-step LoRA DPO run with a checkpoint every step; dropout > 0 (and kept on), so an
    exact resume also needs the RNG state back."""
    return ["dpo", "--model", str(model_dir), "--data", data, "--output-dir", str(out),
            "--max-steps", str(STEPS), "--batch-size", "2", "--grad-accum", "1",
            "--lora-r", "4", "--lora-dropout", "0.1", "--no-disable-dropout",
            "--learning-rate", "1e-3",
            "--warmup-ratio", "0", "--logging-steps", "1", "--save-steps", "1",
            "--save-total-limit", "2", "--seed", "7"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("faults") / "prefs.jsonl", preference_rows(24))


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_model_dir, data):
    """The uninterrupted run: (metrics records, final adapter weights)."""
    out = tmp_path_factory.mktemp("reference") / "out"
    assert main(dpo_args(tiny_model_dir, data, out)) == 0
    return read_metrics(out / "metrics.jsonl"), adapter(out)


def adapter(out):
    return load_file(str(out / "final" / "adapter_model.safetensors"))


def assert_same_run(out, reference):
    """metrics.jsonl (but elapsed_s) and the final adapter equal the uninterrupted run's."""
    ref_metrics, ref_adapter = reference
    metrics = read_metrics(out / "metrics.jsonl")
    assert [m["step"] for m in metrics] == list(range(1, STEPS + 1))
    for got, want in zip(metrics, ref_metrics):
        assert set(got) == set(want)
        for key in set(want) - {"elapsed_s"}:
            assert got[key] == pytest.approx(want[key], abs=1e-6), (want["step"], key)
    got = adapter(out)
    assert set(got) == set(ref_adapter)
    for key, value in ref_adapter.items():
        torch.testing.assert_close(got[key], value, atol=1e-6, rtol=0, msg=key)


# ---- kill -9, then --resume ---------------------------------------------------------------

# `prefalign dpo` whose save of checkpoint STALL_AT hangs once its weights are in the temp
# dir: the test kills it there, in the middle of a checkpoint, every time.
STALLING_CLI = """
import os, sys, time
import prefalign.train.checkpoint as checkpoint
from prefalign.cli import main
from prefalign.errors import PrefalignError
write = checkpoint.save_file
def stall(tensors, path):
    write(tensors, path)
    if os.path.basename(os.path.dirname(path)).startswith(".step-%07d-" % int(os.environ["STALL_AT"])):
        time.sleep(600)
checkpoint.save_file = stall
sys.exit(main(sys.argv[1:]))
"""


def wait_for(condition, proc, timeout=120.0):
    """Poll until condition() holds; fail with the child's stderr if it exits first."""
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            pytest.fail(f"the run exited ({proc.returncode}) before it was killed")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail("timed out waiting for the checkpoint")
        time.sleep(0.02)


def test_kill_9_mid_checkpoint_then_resume_equals_uninterrupted(tmp_path, tiny_model_dir, data,
                                                                reference, capsys):
    """SIGKILL while checkpoint 4 is half written (weights in its temp dir, nothing else),
    a torn last metrics line and an incomplete step-0000005 dir (no trainer_state.json, junk
    weights) left behind: --resume continues from step 3, the newest complete checkpoint,
    and the metrics and final adapter equal the uninterrupted run's."""
    out = tmp_path / "out"
    ckpts = out / "checkpoints"
    # The child uses as many threads as this process, so its arithmetic is the same.
    env = {**os.environ, "STALL_AT": "4", "OMP_NUM_THREADS": str(torch.get_num_threads()),
           "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    with open(tmp_path / "child.log", "wb") as log:
        proc = subprocess.Popen([sys.executable, "-c", STALLING_CLI,
                                 *dpo_args(tiny_model_dir, data, out)],
                                env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_for(lambda: any(ckpts.glob(".step-0000004-*/trainable.safetensors")), proc)
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert [p.name for p in list_checkpoints(ckpts)] == ["step-0000002", "step-0000003"]
    assert not (out / "final").exists()
    (ckpts / "step-0000005").mkdir()
    (ckpts / "step-0000005" / "trainable.safetensors").write_bytes(b"\0" * 64)
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "lo')

    assert main([*dpo_args(tiny_model_dir, data, out), "--resume"]) == 0
    assert f"resumed from {ckpts / 'step-0000003'} at step 3" in capsys.readouterr().out
    assert_same_run(out, reference)
    assert [p.name for p in list_checkpoints(ckpts)] == ["step-0000005", "step-0000006"]
    assert not list(ckpts.glob(".step-*"))  # the killed save's temp dir is cleaned up


# ---- full disk, read-only folder ----------------------------------------------------------


def fail_writes(monkeypatch, site, out):
    """Make one kind of write of a training run fail, as a full disk or a folder that
    became read-only would (tests run as root, which chmod does not stop). -> the path and
    the reason the error must name."""
    enospc = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    if site == "config":  # the folder is read-only from the start
        def save_config(config, path):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))

        monkeypatch.setattr("prefalign.train.run.save_config", save_config)
        return out / "config.yaml", os.strerror(errno.EROFS)
    if site == "checkpoint":  # the disk fills up while checkpoint 3 is written
        import prefalign.train.checkpoint as checkpoint

        real = checkpoint.save_file

        def save_file(tensors, path):
            if Path(path).parent.name.startswith(".step-0000003-"):
                raise enospc
            return real(tensors, path)

        monkeypatch.setattr(checkpoint, "save_file", save_file)
        return out / "checkpoints" / "step-0000003", enospc.strerror
    if site == "metrics":  # ... while the metrics of step 4 are appended
        real_open = Path.open
        appends = []

        def open_(self, mode="r", *args, **kwargs):
            if self.name == "metrics.jsonl" and "a" in mode:
                appends.append(self)
                if len(appends) == 4:
                    raise enospc
            return real_open(self, mode, *args, **kwargs)

        monkeypatch.setattr(Path, "open", open_)
        return out / "metrics.jsonl", enospc.strerror
    # site == "final": ... while the final adapter is written, one file already out
    def save_policy(model, tokenizer, directory, *args, **kwargs):
        (Path(directory) / "adapter_config.json").write_text("{}", "utf-8")
        raise enospc

    monkeypatch.setattr("prefalign.train.run.save_policy", save_policy)
    return out / "final", enospc.strerror


@pytest.mark.parametrize(("site", "kept"), [("config", []), ("checkpoint", [1, 2]),
                                            ("metrics", [2, 3]), ("final", [5, 6])])
def test_full_disk_or_read_only_folder_is_one_line_and_keeps_checkpoints(
        site, kept, tmp_path, tiny_model_dir, data, reference, monkeypatch, capsys):
    """A failed write stops the CLI with exit code 2 and one line naming the path, the
    reason and what to do; no temp dir is left, the earlier checkpoints are complete, and
    --resume from them (once writes work again) ends as the uninterrupted run."""
    out = tmp_path / "out"
    path, reason = fail_writes(monkeypatch, site, out)
    assert main(dpo_args(tiny_model_dir, data, out)) == 2
    err = capsys.readouterr().err  # progress bars, then the error
    line = err[err.index("prefalign: error: "):]
    assert line.count("\n") == 1 and line.startswith(f"prefalign: error: cannot write {path}: ")
    assert reason in line and "free disk space or choose a writable --output-dir" in line
    ckpts = out / "checkpoints"
    assert [p.name for p in list_checkpoints(ckpts)] == [f"step-{s:07d}" for s in kept]
    assert not list(ckpts.glob(".step-*"))
    # The final model is complete or absent: the half-written one went with its temp dir.
    assert not (out / "final").exists() and not list(out.glob(".final.*"))
    monkeypatch.undo()
    assert main([*dpo_args(tiny_model_dir, data, out), "--resume"]) == 0
    assert_same_run(out, reference)


# ---- generation and judging: the Journal ---------------------------------------------------


def test_rows_written_but_not_committed_are_dropped_on_resume(tmp_path):
    """A crash after an item's rows reached the output files but before its commit line
    (preferences.journal.Journal, shared by generate and judge): the rerun cuts the files
    back to the last commit and writes the item once. The torn-line case is in test_best_of_n."""
    rows = [{"prompt": f"q{i}", "candidates": [f"a{i}", f"b{i}"]} for i in range(5)]
    data = write_jsonl(tmp_path / "c.jsonl", rows)
    out, judgments = tmp_path / "pairs.jsonl", tmp_path / "pairs.judgments.jsonl"
    with pytest.raises(KeyboardInterrupt):
        judge_preferences(data, out, ScriptedJudge(fail_at=3), batch_size=1, progress=False)
    # Item 2's rows, whole, as the crashed run would have written them before committing.
    with open(out, "a") as f:
        f.write(json.dumps({"prompt": "q2", "chosen": "b2", "rejected": "a2"}) + "\n")
    with open(judgments, "a") as f:
        f.write(json.dumps({"index": 2, "status": "judged"}) + "\n")
    report = judge_preferences(data, out, ScriptedJudge(), batch_size=2, progress=False)
    assert report.items_done_before == 2
    pairs = [json.loads(line) for line in out.read_text().splitlines()]
    assert [p["prompt"] for p in pairs] == [f"q{i}" for i in range(5)]
    assert [json.loads(line)["index"] for line in judgments.read_text().splitlines()] == \
        list(range(5))


def test_full_disk_while_judging_is_one_line_and_the_rerun_completes(tmp_path, monkeypatch):
    """The disk fills up in the second commit, after the pairs were written and before the
    judgments: a one-line error naming the file; the rerun writes every item once."""
    import prefalign.preferences.journal as journal

    rows = [{"prompt": f"q{i}", "candidates": [f"a{i}", f"b{i}"]} for i in range(4)]
    data = write_jsonl(tmp_path / "c.jsonl", rows)
    out, judgments = tmp_path / "pairs.jsonl", tmp_path / "pairs.judgments.jsonl"
    real, writes = journal._write_synced, []

    def write_synced(handle, payload):
        writes.append(handle.name)
        if writes.count(str(judgments)) == 2:  # in commit 2, after its pairs
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(handle, payload)

    monkeypatch.setattr(journal, "_write_synced", write_synced)
    with pytest.raises(PrefalignError) as error:
        judge_preferences(data, out, ScriptedJudge(), batch_size=2, progress=False)
    message = str(error.value)
    assert "\n" not in message and message.startswith(f"cannot write {judgments}: ")
    assert "No space left on device; free disk space or choose a writable --output" in message
    monkeypatch.undo()
    report = judge_preferences(data, out, ScriptedJudge(), batch_size=2, progress=False)
    assert report.items_done_before == 2
    assert [json.loads(line)["prompt"] for line in out.read_text().splitlines()] == \
        [f"q{i}" for i in range(4)]


# ---- annotation --------------------------------------------------------------------------


def test_annotation_output_cut_mid_write_is_rebuilt_on_resume(tmp_path):
    """A crash between writing the progress record and the output (a torn output, its temp
    file left behind): the next session rebuilds the output from the record, so no pair is
    lost or written twice, and continues at the first undecided item."""
    rows = [{"prompt": f"Q{i}", "candidates": [f"a{i}", f"b{i}"]} for i in range(3)]
    path, output = write_jsonl(tmp_path / "in.jsonl", rows), tmp_path / "out.jsonl"
    annotate(path, output, stdin=io.StringIO("b a\na b\nq\n"), stdout=io.StringIO(), width=80)
    whole = output.read_text()
    assert whole.count("\n") == 2
    output.write_text(whole[: len(whole) // 2 + 3])
    (tmp_path / "out.jsonl.tmp").write_text('{"prompt": "Q0", "cho')
    annotate(path, output, stdin=io.StringIO("b a\n\n"), stdout=io.StringIO(), width=80)
    pairs = [json.loads(line) for line in output.read_text().splitlines()]
    assert [(p["prompt"], p["chosen"]) for p in pairs] == [("Q0", "b0"), ("Q1", "a1"),
                                                           ("Q2", "b2")]


def test_a_directory_is_replaced_whole_or_not_at_all(tmp_path):
    """replaced_whole (the final model's writer): a failed write leaves the earlier
    directory exactly as it was; a finished one replaces it; no temp dir stays behind."""
    from prefalign.train.checkpoint import replaced_whole

    final = tmp_path / "final"
    final.mkdir()
    (final / "model.safetensors").write_text("old", "utf-8")
    with pytest.raises(OSError), replaced_whole(final) as tmp:
        (tmp / "model.safetensors").write_text("new, half", "utf-8")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    assert [p.name for p in tmp_path.iterdir()] == ["final"]
    assert (final / "model.safetensors").read_text("utf-8") == "old"
    with replaced_whole(final) as tmp:
        (tmp / "adapter_model.safetensors").write_text("new", "utf-8")
    assert [p.name for p in tmp_path.iterdir()] == ["final"]
    assert [p.name for p in final.iterdir()] == ["adapter_model.safetensors"]
