"""docs/architecture.md's recipes work: the loss, trainer and scorer it shows are run here,
through the registries and the run skeleton they plug into."""

import re
from pathlib import Path

import pytest
import torch

from helpers import preference_rows, write_jsonl
from prefalign.losses import PREFERENCE_LOSSES, LossParams, PairLogps, preference_loss
from prefalign.scoring import BUILTINS, load_scorer
from prefalign.train.config import TrainConfig

DOC = Path(__file__).resolve().parents[1] / "docs" / "architecture.md"
BLOCK = re.compile(r"^```python\n(.*?)^```$", re.S | re.M)


def recipe(heading: str) -> str:
    """The python block under `## heading`."""
    text = DOC.read_text(encoding="utf-8")
    section = text.split(f"## {heading}\n", 1)[1].split("\n## ", 1)[0]
    (block,) = BLOCK.findall(section)
    return block


@pytest.fixture
def namespace(monkeypatch):
    # The recipes register into the real registries; undo that after each test.
    monkeypatch.setitem(PREFERENCE_LOSSES, "squared", None)
    monkeypatch.setitem(BUILTINS, "words", None)
    return {"__name__": "architecture_doc"}


@pytest.mark.parametrize("heading, most", [("Adding a loss", 10), ("Adding a trainer", 13),
                                           ("Adding a scorer", 10)])
def test_each_recipe_is_about_ten_lines_of_code(heading, most):
    code = [line for line in recipe(heading).splitlines()
            if line.strip() and not line.lstrip().startswith(("import ", "from ", "#", '"""'))]
    assert len(code) <= most, code


def test_the_loss_recipe_registers_a_working_loss(namespace):
    exec(recipe("Adding a loss"), namespace)
    logps = PairLogps(chosen=torch.tensor([-1.0]), rejected=torch.tensor([-2.0]),
                      ref_chosen=torch.tensor([-1.5]), ref_rejected=torch.tensor([-1.5]))
    result = preference_loss("squared", logps, LossParams(beta=0.5))
    # h = 0.5 - (-0.5) = 1; (1 - 0.5 * 1)^2 = 0.25
    assert result.losses.tolist() == [0.25]
    assert result.chosen_rewards.tolist() == [0.25] and result.rejected_rewards.tolist() == [-0.25]


def test_the_scorer_recipe_is_usable_by_name_with_checked_parameters(namespace):
    exec(recipe("Adding a scorer"), namespace)
    scorer = load_scorer("words(max=2)")
    assert scorer(["p", "p"], ["two words", "three words here"]) == [1.0, 0.0]
    with pytest.raises(Exception, match="max"):
        load_scorer("words(maxx=2)")


def test_the_trainer_recipe_trains(namespace, tmp_path, tiny_model_dir):
    exec(recipe("Adding a trainer"), namespace)
    data = write_jsonl(tmp_path / "prefs.jsonl", preference_rows(8))
    config = TrainConfig(
        model=str(tiny_model_dir), data=data, output_dir=str(tmp_path / "out"), batch_size=2,
        grad_accum=1, max_steps=3, learning_rate=1e-2, lora_r=4, logging_steps=1,
        warmup_ratio=0.0)
    namespace["run_chosen_nll"](config)
    losses = [row["loss"] for row in map(__import__("json").loads,
              (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()) if "loss" in row]
    assert len(losses) == 3 and all(loss > 0 for loss in losses)
    assert (tmp_path / "out" / "final" / "adapter_model.safetensors").is_file()
