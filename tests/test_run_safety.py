"""Runs that lost or mixed work: an output dir over an input, a new run in an earlier run's
folder, --resume with other settings, and a damaged newest checkpoint."""

import re
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from helpers import preference_rows, write_jsonl
from prefalign.cli import main
from prefalign.train.checkpoint import list_checkpoints
from prefalign.train.metrics import read_metrics
from prefalign.train.output_dir import GROW_ON_RESUME, SAFE_ON_RESUME


def error_line(capsys) -> str:
    """The one error line the CLI printed (exit code 2 is checked by the caller)."""
    err = capsys.readouterr().err
    line = err[err.index("prefalign: error: "):]
    assert line.count("\n") == 1, line
    assert "Traceback" not in err
    return line


def tree(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*"))
            if p.is_file()}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("safety") / "prefs.jsonl", preference_rows(16))


def dpo_args(model, data, out, *extra):
    return ["dpo", "--model", str(model), "--data", str(data), "--output-dir", str(out),
            "--max-steps", "3", "--batch-size", "2", "--grad-accum", "1", "--lora-r", "4",
            "--lora-dropout", "0.0", "--learning-rate", "1e-3", "--warmup-ratio", "0",
            "--logging-steps", "1", "--save-steps", "1", "--save-total-limit", "3",
            "--seed", "5", *map(str, extra)]


# ---- 1. an output dir that equals, holds or lies in an input --------------------------------


@pytest.fixture
def sft_run(tmp_path, tiny_model_dir):
    """runs/sft/final: a model a later stage reads (a copy of the tiny model)."""
    final = tmp_path / "runs" / "sft" / "final"
    shutil.copytree(tiny_model_dir, final)
    return final


TRAINER_ARGS = {
    "sft": [], "dpo": [], "kto": [], "reward": [], "ppo": ["--reward-fn", "length(max=10)"],
    "iterate": ["--scorer", "length(max=1)"],
}


@pytest.mark.parametrize("trainer", sorted(TRAINER_ARGS))
def test_every_trainer_refuses_an_output_dir_holding_its_model(trainer, sft_run, data, capsys):
    """`--model runs/sft/final --output-dir runs/sft` overwrote the SFT model with one that
    named itself as its base; now it stops before writing anything."""
    before = tree(sft_run.parent)
    argv = [trainer, "--model", str(sft_run), "--data", data, "--output-dir",
            str(sft_run.parent), "--max-steps", "1", *TRAINER_ARGS[trainer]]
    assert main(argv) == 2
    line = error_line(capsys)
    assert f"--output-dir {sft_run.parent} contains the input --model {sft_run}" in line
    assert "choose an --output-dir outside it" in line
    assert tree(sft_run.parent) == before


@pytest.mark.parametrize("case", ["equal", "inside", "symlink", "relative", "ref_model",
                                  "data_in_dir", "eval_data_equal", "value_model"])
def test_overlap_with_any_input_is_refused_however_spelled(case, sft_run, tmp_path, data,
                                                           tiny_model_dir, capsys, monkeypatch):
    runs = sft_run.parent.parent
    model, extra = str(tiny_model_dir), []
    if case == "equal":
        model, out, label = str(sft_run), sft_run, "is the input --model"
    elif case == "inside":
        model, out, label = str(sft_run), sft_run / "sub", "lies inside the input --model"
    elif case == "symlink":  # a link to runs/sft is runs/sft
        (tmp_path / "link").symlink_to(runs / "sft")
        model, out, label = str(sft_run), tmp_path / "link", "contains the input --model"
    elif case == "relative":
        monkeypatch.chdir(runs)
        model, out, label = "sft/final", Path("./sft/../sft"), "contains the input --model"
    elif case == "ref_model":
        extra, out, label = ["--ref-model", sft_run], runs, "contains the input --ref-model"
    elif case == "data_in_dir":
        data = write_jsonl(runs / "sft" / "pairs.jsonl", preference_rows(4))
        out, label = runs / "sft", "contains the input --data"
    elif case == "eval_data_equal":
        evals = write_jsonl(tmp_path / "eval.jsonl", preference_rows(4))
        extra, out, label = ["--eval-data", evals], Path(evals), "is the input --eval-data"
    else:
        argv = ["ppo", "--model", model, "--data", data, "--output-dir", str(runs),
                "--reward-fn", "length(max=10)", "--value-model", str(sft_run)]
        assert main(argv) == 2
        assert "contains the input --value-model" in error_line(capsys)
        return
    before = tree(runs)
    assert main(dpo_args(model, data, out, *extra)) == 2
    assert label in error_line(capsys)
    assert tree(runs) == before


def test_evaluate_refuses_an_output_dir_inside_a_model(sft_run, tmp_path, capsys):
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "The film 2:"}])
    before = tree(sft_run)
    argv = ["evaluate", "--models", f"sft={sft_run}", "--prompts", prompts,
            "--output-dir", str(sft_run / "report"), "--max-new-tokens", "2"]
    assert main(argv) == 2
    assert f"lies inside the input --models sft {sft_run}" in error_line(capsys)
    assert tree(sft_run) == before


# ---- 2. a new run in a used output dir --------------------------------------------------------


@pytest.fixture(scope="module")
def run_a(tmp_path_factory, tiny_model_dir, data):
    """A finished 3-step DPO run with checkpoints 1-3: its folder's files, by name."""
    out = tmp_path_factory.mktemp("run-a") / "out"
    assert main(dpo_args(tiny_model_dir, data, out)) == 0
    return out, tree(out)


@pytest.fixture
def used(tmp_path, run_a):
    out = tmp_path / "out"
    shutil.copytree(run_a[0], out)
    return out


def test_a_new_run_in_a_used_folder_is_refused_and_changes_nothing(used, tiny_model_dir,
                                                                   data, capsys):
    before = tree(used)
    assert main(dpo_args(tiny_model_dir, data, used, "--beta", "0.5")) == 2
    line = error_line(capsys)
    assert f"--output-dir {used} already holds a run (checkpoints/, config.yaml, final/, " \
           "metrics.jsonl)" in line
    assert "continue it with --resume, start over with --overwrite" in line
    assert tree(used) == before


def test_overwrite_removes_the_earlier_run_naming_what_and_starts_clean(used, tiny_model_dir,
                                                                        data, capsys):
    old_metrics = read_metrics(used / "metrics.jsonl")
    args = dpo_args(tiny_model_dir, data, used, "--beta", "0.5", "--max-steps", "2",
                    "--overwrite")
    assert main(args) == 0
    out = capsys.readouterr().out
    assert (f"--overwrite: removing the earlier run's checkpoints/, config.yaml, final/, "
            f"metrics.jsonl from {used}\n") in out
    assert [p.name for p in list_checkpoints(used / "checkpoints")] == [
        "step-0000001", "step-0000002"]  # B's own, none of A's step 3
    metrics = read_metrics(used / "metrics.jsonl")
    assert [m["step"] for m in metrics] == [1, 2] and metrics != old_metrics[:2]
    assert yaml.safe_load((used / "config.yaml").read_text())["beta"] == 0.5


@pytest.mark.parametrize("overwrite", [False, True])
def test_files_no_run_writes_are_never_removed(overwrite, used, tiny_model_dir, data, capsys):
    (used / "notes.txt").write_text("mine")
    before = tree(used)
    extra = ["--overwrite"] if overwrite else []
    assert main(dpo_args(tiny_model_dir, data, used, *extra)) == 2
    line = error_line(capsys)
    assert "notes.txt" in line and "move them away or choose an empty or new --output-dir" in line
    assert tree(used) == before


def test_overwrite_and_resume_exclude_each_other(used, tiny_model_dir, data, capsys):
    assert main(dpo_args(tiny_model_dir, data, used, "--overwrite", "--resume")) == 2
    assert "config key 'overwrite' and resume exclude each other" in error_line(capsys)


def test_an_empty_existing_folder_is_fine(tmp_path, tiny_model_dir, data):
    (tmp_path / "empty").mkdir()
    assert main(dpo_args(tiny_model_dir, data, tmp_path / "empty", "--max-steps", "1")) == 0


# ---- 3. --resume with other settings -------------------------------------------------------


def test_resume_with_changed_settings_names_each_key_and_changes_nothing(used, tmp_path,
                                                                         tiny_model_dir, data,
                                                                         capsys):
    other = write_jsonl(tmp_path / "other.jsonl", preference_rows(16, seed=1))
    before = tree(used)
    args = dpo_args(tiny_model_dir, other, used, "--beta", "0.5", "--learning-rate", "2e-3",
                    "--loss-type", "ipo", "--resume")
    assert main(args) == 2
    line = error_line(capsys)
    assert f"--resume with other settings than {used / 'config.yaml'}" in line
    for change in (f"data: '{data}' -> '{other}'", "beta: 0.1 -> 0.5",
                   "learning_rate: 0.001 -> 0.002", "loss_type: 'sigmoid' -> 'ipo'"):
        assert change in line
    assert tree(used) == before


def test_resume_with_fewer_steps_is_refused(used, tiny_model_dir, data, capsys):
    assert main(dpo_args(tiny_model_dir, data, used, "--max-steps", "2", "--resume")) == 2
    assert "max_steps: 3 -> 2" in error_line(capsys)


def test_resume_with_safe_changes_continues(used, tiny_model_dir, data, capsys, monkeypatch):
    """More steps, other logging/saving, the same data spelled another way: allowed."""
    shutil.rmtree(used / "final")
    monkeypatch.chdir(Path(data).parent)
    args = dpo_args(tiny_model_dir, f"./{Path(data).name}", used, "--resume", "--max-steps",
                    "4", "--logging-steps", "2", "--save-total-limit", "4")
    assert main(args) == 0
    assert f"resumed from {used / 'checkpoints' / 'step-0000003'} at step 3" in \
        capsys.readouterr().out
    assert [m["step"] for m in read_metrics(used / "metrics.jsonl")] == [1, 2, 3, 4]


def test_the_safe_keys_are_documented():
    text = Path(__file__).parents[1].joinpath("docs", "reliability.md").read_text()
    section = text[text.index("## Resuming"):]
    for key in SAFE_ON_RESUME | GROW_ON_RESUME:
        assert f"`{key}`" in section, key


# ---- 4. a damaged newest checkpoint ---------------------------------------------------------


def cut(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


DAMAGE = {
    "safetensors cut": (lambda c: cut(c / "trainable.safetensors"),
                        "trainable.safetensors is cut short"),
    "trainer_state cut": (lambda c: cut(c / "trainer_state.json"),
                          "trainer_state.json is cut short or not JSON"),
    "optimizer cut": (lambda c: cut(c / "optimizer.pt", 0.9), "optimizer.pt is cut short"),
    "rng missing": (lambda c: (c / "rng.pt").unlink(), "rng.pt is missing"),
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_resume_skips_a_damaged_newest_checkpoint_and_ends_as_uninterrupted(
        damage, used, run_a, tiny_model_dir, data, capsys):
    """Checkpoint 3 damaged, 2 intact: --resume says why it skips 3, continues from 2, and
    step 3 is trained again to the same adapter as the uninterrupted run's."""
    ckpts = used / "checkpoints"
    hurt, why = DAMAGE[damage]
    hurt(ckpts / "step-0000003")
    shutil.rmtree(used / "final")
    assert main(dpo_args(tiny_model_dir, data, used, "--resume")) == 0
    out = capsys.readouterr().out
    assert f"skipped checkpoint {ckpts / 'step-0000003'}: {why}" in out
    assert f"resumed from {ckpts / 'step-0000002'} at step 2" in out
    want = load_file(str(run_a[0] / "final" / "adapter_model.safetensors"))
    got = load_file(str(used / "final" / "adapter_model.safetensors"))
    assert set(got) == set(want)
    for key in want:
        torch.testing.assert_close(got[key], want[key], atol=1e-6, rtol=0, msg=key)


def test_no_intact_checkpoint_is_one_line_naming_each(used, tiny_model_dir, data, capsys):
    ckpts = used / "checkpoints"
    for step in (1, 2, 3):
        cut(ckpts / f"step-{step:07d}" / "trainable.safetensors")
    assert main(dpo_args(tiny_model_dir, data, used, "--resume")) == 2
    line = error_line(capsys)
    assert f"no intact checkpoint in {ckpts}: step-0000003 (" in line
    assert re.search(r"step-0000002 \(trainable.safetensors is cut short .*\), step-0000001", line)


def test_resume_from_a_damaged_checkpoint_says_why(used, tiny_model_dir, data, capsys):
    path = used / "checkpoints" / "step-0000002"
    cut(path / "scheduler.pt")
    assert main(dpo_args(tiny_model_dir, data, used, "--resume-from", path)) == 2
    assert f"checkpoint {path} cannot be loaded: scheduler.pt is cut short" in error_line(capsys)

