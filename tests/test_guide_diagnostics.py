"""The guide's troubleshooting table: LoRA weights that get no gradient are named after the
first backward pass; chosen == rejected rows are dropped; near-identical pairs are found."""

import math

import torch
from torch import nn

from helpers import preference_rows, regression_batch, write_jsonl
from prefalign.algorithms.dpo import DPO, DPOConfig, run_dpo
from prefalign.cli import main
from prefalign.data.formats import DROP_SAME, normalize_rows
from prefalign.data.sources import load_rows
from prefalign.lora import apply_lora, disable_adapters, lora_parameters, merge_lora
from prefalign.train.config import TrainConfig
from prefalign.train.diagnostics import (
    detached_loss_problem,
    lora_gradient_problem,
    near_identical_pairs,
)
from prefalign.train.loop import Trainer


def lora_mlp():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 1))
    return apply_lora(model, ["0"], r=2, alpha=4)


def backward(model):
    model(torch.randn(4, 3)).pow(2).mean().backward()


# -- the pure function -------------------------------------------------------------------

def test_healthy_lora_has_no_problem():
    model = lora_mlp()
    backward(model)
    a, b = lora_parameters(model)
    assert not a.grad.any() and b.grad.any()  # B = 0 at the start: only B's gradient is non-zero
    assert lora_gradient_problem(model, lora_parameters(model)) is None


def test_frozen_lora_weights():
    model = lora_mlp()
    for p in lora_parameters(model):
        p.requires_grad_(False)
    model[2].requires_grad_(True)
    backward(model)
    problem = lora_gradient_problem(model, list(model[2].parameters()))
    assert problem.startswith("none of the 2 LoRA weights is being trained")
    assert "2 of them have requires_grad=False" in problem


def test_lora_weights_left_out_of_the_optimizer():
    model = lora_mlp()
    backward(model)
    problem = lora_gradient_problem(model, list(model[2].parameters()))
    assert "not in the optimizer's param groups" in problem
    a, b = lora_parameters(model)
    assert "1 of 2 LoRA weights are not being trained" in lora_gradient_problem(model, [a])


def test_no_gradient_reaches_the_adapters():
    model = lora_mlp()
    model[2].requires_grad_(True)  # something else trains, so backward itself works
    optimized = lora_parameters(model) + list(model[2].parameters())
    with disable_adapters(model):
        backward(model)
    problem = lora_gradient_problem(model, optimized)
    assert problem.startswith("no gradient reached the 2 LoRA weights")
    assert "disable_adapters()" in problem
    merged = lora_mlp()
    merged[2].requires_grad_(True)
    merge_lora(merged)
    backward(merged)
    assert "merged or disabled" in lora_gradient_problem(merged, lora_parameters(merged))


def test_detached_loss_problem_names_the_cause():
    model = lora_mlp()
    assert "does not depend on any trainable parameter" in detached_loss_problem(model)
    assert "disable_adapters()" in detached_loss_problem(model)
    merge_lora(model)
    assert "merged or disabled" in detached_loss_problem(model)


def test_a_model_without_lora_is_not_checked():
    model = nn.Linear(3, 1)
    assert lora_gradient_problem(model, list(model.parameters())) is None


# -- through the training loop ---------------------------------------------------------

class Regression:
    progress_keys = ()

    def collate(self, features):
        return regression_batch(features)

    def units(self, features):
        return float(len(features))

    def compute_loss(self, model, batch):
        return ((model(batch["x"]).squeeze(-1) - batch["y"]) ** 2).mean(), {}


def run_regression(tmp_path, model):
    g = torch.Generator().manual_seed(0)
    rows = [{"x": x.tolist(), "y": float(x.sum())} for x in torch.randn(16, 3, generator=g)]
    config = TrainConfig(model="toy", output_dir=str(tmp_path), batch_size=4, grad_accum=1,
                         max_steps=3, learning_rate=0.1, logging_steps=1, lora_r=0)
    return Trainer(config, model, Regression(), rows).train()


def test_loop_warns_once_when_lora_weights_are_frozen(tmp_path, capsys):
    model = lora_mlp()
    for p in lora_parameters(model):
        p.requires_grad_(False)
    model[2].requires_grad_(True)  # the head still trains, so the run itself goes on
    run_regression(tmp_path, model)
    warnings = [line for line in capsys.readouterr().out.splitlines() if "warning:" in line]
    assert len(warnings) == 1 and "none of the 2 LoRA weights is being trained" in warnings[0]


def test_loop_is_silent_on_a_healthy_lora_run(tmp_path, capsys):
    run_regression(tmp_path, lora_mlp())
    assert "warning:" not in capsys.readouterr().out


def test_dpo_with_bypassed_adapters_stops_naming_the_cause(tmp_path, tiny_model_dir,
                                                          monkeypatch, capsys):
    """The guide's "DPO loss stuck at 0.693": the policy pass bypasses the adapters, so
    policy == reference and no gradient can reach LoRA; the first step stops with one line
    instead of torch's "element 0 of tensors does not require grad"."""
    original = DPO.compute_loss

    def bypassed(self, model, batch):
        with disable_adapters(model.model):
            loss, metrics = original(self, model, batch)
        assert abs(loss.item() - math.log(2)) < 1e-6
        return loss, metrics

    monkeypatch.setattr(DPO, "compute_loss", bypassed)
    data = write_jsonl(tmp_path / "prefs.jsonl", preference_rows(8))
    code = main(["dpo", "--model", str(tiny_model_dir), "--data", data, "--output-dir",
                 str(tmp_path / "out"), "--max-steps", "2", "--batch-size", "4",
                 "--grad-accum", "1", "--lora-r", "4"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    lines = [line for line in err.splitlines() if "trainable parameter" in line]
    assert len(lines) == 1 and "does not depend on any trainable parameter" in lines[0]
    assert err.rstrip().endswith(lines[0])  # the last line, after the progress bars


def test_dpo_healthy_run_has_no_warning(tmp_path, tiny_model_dir, capsys):
    data = write_jsonl(tmp_path / "prefs.jsonl", preference_rows(8))
    config = DPOConfig(model=str(tiny_model_dir), data=data, output_dir=str(tmp_path / "out"),
                       batch_size=4, grad_accum=1, max_steps=1, learning_rate=1e-2, lora_r=4,
                       logging_steps=1, warmup_ratio=0.0)
    run_dpo(config)
    assert "warning: no gradient" not in capsys.readouterr().out


# -- accuracy stuck at 50%: pairs without a preference -------------------------------------

def test_chosen_equal_to_rejected_is_dropped_and_near_identical_pairs_found():
    rows = [{"prompt": "Q", "chosen": " yes", "rejected": " yes"},
            {"prompt": "Q", "chosen": " Yes  please", "rejected": " yes please"},
            {"prompt": "Q", "chosen": " yes", "rejected": " no"}]
    examples, report = normalize_rows(load_rows(rows))
    assert report.dropped[DROP_SAME] == 1 and len(examples) == 2
    assert near_identical_pairs(examples) == [0]
    chat = [{"prompt": [{"role": "user", "content": "Q"}],
             "chosen": [{"role": "assistant", "content": "OK."}],
             "rejected": [{"role": "assistant", "content": "ok."}]}]
    assert near_identical_pairs(normalize_rows(load_rows(chat))[0]) == [0]
