"""The training loop on a toy regression: schedule, NaN stop, checkpoints, evaluation."""

import dataclasses
import math

import pytest
import torch

from helpers import regression_batch
from prefalign.train.checkpoint import list_checkpoints
from prefalign.train.config import TrainConfig
from prefalign.train.loop import Trainer
from prefalign.train.nonfinite import NonFiniteLoss
from prefalign.train.window import epoch_order, split_window


class Regression:
    """Mean squared error of a linear model; `poison` makes the loss NaN from that step on."""

    progress_keys = ()

    def __init__(self, poison_from=None):
        self.poison_from = poison_from
        self.calls = 0

    def collate(self, features):
        return regression_batch(features)

    def units(self, features):
        return float(len(features))

    def compute_loss(self, model, batch):
        self.calls += 1
        loss = ((model(batch["x"]).squeeze(-1) - batch["y"]) ** 2).mean()
        if self.poison_from is not None and self.calls >= self.poison_from:
            loss = loss * float("nan")
        return loss, {"y_mean": batch["y"].mean()}


def rows(n):
    g = torch.Generator().manual_seed(0)
    xs = torch.randn(n, 3, generator=g)
    return [{"x": x.tolist(), "y": float(x.sum()), "id": f"row{i}"} for i, x in enumerate(xs)]


def cfg(tmp_path, **kw):
    base = dict(model="toy", output_dir=str(tmp_path), batch_size=2, grad_accum=2, max_steps=10,
                learning_rate=0.1, lr_scheduler="cosine", warmup_ratio=0.2, logging_steps=1,
                lora_r=0)
    base.update(kw)
    return TrainConfig(**base)


def test_warmup_then_cosine_schedule(tmp_path):
    """10 steps, warmup 2: lr = 0.1*s/2 for s<2, then 0.1*0.5*(1+cos(pi*(s-2)/8))."""
    torch.manual_seed(0)
    result = Trainer(cfg(tmp_path), torch.nn.Linear(3, 1), Regression(), rows(40)).train()
    expected = [0.0, 0.05] + [0.05 * (1 + math.cos(math.pi * (s - 2) / 8)) for s in range(2, 10)]
    assert [r["lr"] for r in result.history] == pytest.approx(expected)
    assert result.history[-1]["loss"] < result.history[0]["loss"]


def test_epochs_cover_every_example_once_per_epoch(tmp_path):
    """9 examples, global batch 4: 3 steps per epoch (4, 4, 1), each epoch a new order."""
    trainer = Trainer(cfg(tmp_path, max_steps=None, epochs=2), torch.nn.Linear(3, 1),
                      Regression(), rows(9))
    assert trainer.total_steps == 6
    result = trainer.train()
    assert [r["epoch"] for r in result.history] == pytest.approx([4 / 9, 8 / 9, 1, 13 / 9, 17 / 9, 2],
                                                                 abs=1e-4)
    assert sorted(epoch_order(9, 42, 0)) == list(range(9))
    assert epoch_order(9, 42, 0) != epoch_order(9, 42, 1)


def test_group_by_length_micro_batches_hold_similar_lengths(tmp_path):
    """40 examples of lengths 1..40, batch 4: grouped micro-batches cover each example once
    per epoch and span at most a few lengths, where shuffled ones span many."""
    class Recording(Regression):
        def __init__(self):
            super().__init__()
            self.batches = []

        def collate(self, features):
            self.batches.append([len(f["prompt_input_ids"]) for f in features])
            return super().collate(features)

    data = [{**row, "prompt_input_ids": [1] * (i + 1)} for i, row in enumerate(rows(40))]
    spans = {}
    for grouped in (False, True):
        algorithm = Recording()
        Trainer(cfg(tmp_path / str(grouped), max_steps=None, epochs=2, grad_accum=1,
                    batch_size=4, group_by_length=grouped),
                torch.nn.Linear(3, 1), algorithm, data).train()
        for epoch in (algorithm.batches[:10], algorithm.batches[10:]):
            assert sorted(n for batch in epoch for n in batch) == list(range(1, 41))
        spans[grouped] = max(max(b) - min(b) for b in algorithm.batches)
    assert spans[True] == 3 and spans[False] > 10


def test_split_window_shares_micro_batches_across_processes():
    window = list(range(7))
    assert split_window(window, batch_size=2, procs=2) == [[[0, 1], [2, 3]], [[4, 5], [6]]]
    assert split_window(window, batch_size=4, procs=1) == [[[0, 1, 2, 3]], [[4, 5, 6]]]


def test_nan_loss_stops_naming_step_and_examples_and_keeps_last_checkpoint(tmp_path):
    # 2 micro-batches per step: call 7 is the first micro-batch of step 4.
    trainer = Trainer(cfg(tmp_path, save_steps=1, save_total_limit=5), torch.nn.Linear(3, 1),
                      Regression(poison_from=7), rows(40))
    with pytest.raises(NonFiniteLoss, match=r"step 4 .*row\d+.*last good checkpoint: .*step-0000003"):
        trainer.train()
    assert [p.name for p in list_checkpoints(tmp_path / "checkpoints")][-1] == "step-0000003"


def test_checkpoints_keep_newest_and_ignore_incomplete(tmp_path):
    trainer = Trainer(cfg(tmp_path, save_steps=2, save_total_limit=2), torch.nn.Linear(3, 1),
                      Regression(), rows(40))
    trainer.train()
    root = tmp_path / "checkpoints"
    assert [p.name for p in list_checkpoints(root)] == ["step-0000008", "step-0000010"]
    (root / "step-0000012").mkdir()  # a crash mid-write leaves no trainer_state.json
    (root / ".step-0000014-tmp").mkdir()
    assert list_checkpoints(root)[-1].name == "step-0000010"


def test_eval_every_n_steps_and_at_the_end(tmp_path):
    trainer = Trainer(cfg(tmp_path, max_steps=5, eval_steps=2), torch.nn.Linear(3, 1),
                      Regression(), rows(20), eval_features=rows(6))
    history = trainer.train().history
    assert [r["step"] for r in history if "eval/loss" in r] == [2, 4, 5]
    assert all(r["eval/y_mean"] == pytest.approx(history[1]["eval/y_mean"]) for r in history
               if "eval/y_mean" in r)


# ---- non-finite loss or gradient ----------------------------------------------------------


class Poisoned(Regression):
    """Every micro-batch holding one of `ids` gets a NaN loss ("loss"), or a finite loss
    whose backward turns every gradient into NaN ("grad"), as 0 * inf in backward would."""

    def __init__(self, ids, kind="loss"):
        super().__init__()
        self.ids, self.kind = set(ids), kind

    def collate(self, features):
        return dataclasses.replace(super().collate(features), ids=[f["id"] for f in features])

    def compute_loss(self, model, batch):
        loss, metrics = super().compute_loss(model, batch)
        if self.ids & set(batch["ids"]):
            if self.kind == "loss":
                loss = loss * float("nan")
            else:
                loss.register_hook(lambda grad: grad * float("nan"))
        return loss, metrics


def step_ids(step, n=40, batch=4):
    """The example ids of 1-based step `step` of epoch 0 (global batch 4: 2 x 2 accumulated)."""
    order = epoch_order(n, 42, 0)
    return [f"row{i}" for i in order[(step - 1) * batch : step * batch]]


@pytest.mark.parametrize("max_grad_norm", [1.0, 0.0])
def test_nan_gradient_behind_a_finite_loss_stops_naming_step_and_examples(tmp_path,
                                                                          max_grad_norm):
    """Clipping off (0) must not hide it: the norm is computed for the check anyway."""
    bad = step_ids(4)[0]
    trainer = Trainer(cfg(tmp_path, max_grad_norm=max_grad_norm), torch.nn.Linear(3, 1),
                      Poisoned([bad], "grad"), rows(40))
    with pytest.raises(NonFiniteLoss, match=rf"step 4 .*'{bad}'.*no checkpoint was written yet"):
        trainer.train()


def weights(path):
    from safetensors.torch import load_file

    return load_file(str(path / "trainable.safetensors"))


@pytest.mark.parametrize("kind", ["loss", "grad"])
def test_skip_drops_the_step_counts_it_and_resumes_exactly(tmp_path, kind):
    """Step 4 holds a poisoned row. Under on_nonfinite skip: no update at step 4 (the
    weights of checkpoints 3 and 4 are equal), its metrics are not logged, the schedule and
    the data move on, skipped_steps counts it, and a run resumed from checkpoint 5 ends
    with the same weights and counts as the uninterrupted one."""
    def make(out, **kw):
        config = cfg(out, on_nonfinite="skip", save_steps=1, save_total_limit=20, **kw)
        torch.manual_seed(0)
        return Trainer(config, torch.nn.Linear(3, 1), Poisoned(step_ids(4)[:1], kind), rows(40))

    full = make(tmp_path / "full")
    result = full.train()
    assert result.skipped_steps == 1
    history = result.history
    assert [r["skipped_steps"] for r in history] == [0, 0, 0] + [1] * 7
    assert "loss" not in history[3] and "grad_norm" not in history[3]
    assert all(math.isfinite(r["loss"]) for i, r in enumerate(history) if i != 3)
    expected = [0.0, 0.05] + [0.05 * (1 + math.cos(math.pi * (s - 2) / 8)) for s in range(2, 10)]
    assert [r["lr"] for r in history] == pytest.approx(expected)
    ckpts = tmp_path / "full" / "checkpoints"
    w3, w4, w5 = (weights(ckpts / f"step-000000{s}") for s in (3, 4, 5))
    assert all(torch.equal(w3[k], w4[k]) for k in w3)
    assert not all(torch.equal(w4[k], w5[k]) for k in w4)
    adam_steps = full.optimizer.state_dict()["state"][0]["step"]
    assert int(adam_steps) == 9  # 10 steps, one skipped

    resumed = make(tmp_path / "part", resume_from=str(ckpts / "step-0000005"))
    again = resumed.train()
    assert again.skipped_steps == 1 and [r["step"] for r in again.history] == list(range(6, 11))
    for a, b in zip(history[5:], again.history):
        assert a["loss"] == b["loss"] and a["skipped_steps"] == b["skipped_steps"]
    for (name, p), q in zip(full.unwrapped.named_parameters(), resumed.unwrapped.parameters()):
        assert torch.equal(p, q), name


def test_skip_stops_after_too_many_in_a_row(tmp_path):
    """Steps 2 and 4 are bad: one at a time is skipped even with max 1 in a row. Steps 2-4
    all bad with max 2 in a row: 2 and 3 are skipped, 4 stops the run."""
    apart = Trainer(cfg(tmp_path / "a", on_nonfinite="skip", max_skipped_in_a_row=1),
                    torch.nn.Linear(3, 1), Poisoned(step_ids(2)[:1] + step_ids(4)[:1]), rows(40))
    assert apart.train().skipped_steps == 2
    together = Trainer(cfg(tmp_path / "b", on_nonfinite="skip", max_skipped_in_a_row=2),
                       torch.nn.Linear(3, 1), Poisoned([step_ids(s)[0] for s in (2, 3, 4)]),
                       rows(40))
    with pytest.raises(NonFiniteLoss, match=r"step 4 .*after 2 skipped steps in a row"):
        together.train()
    assert together.skipped == 2


def test_nonfinite_options_are_checked():
    from prefalign.config import build_config
    from prefalign.errors import ConfigError

    with pytest.raises(ConfigError, match="max_skipped_in_a_row"):
        build_config(TrainConfig, {"model": "m", "max_skipped_in_a_row": 0})
    with pytest.raises(ConfigError, match="on_nonfinite.*stop, skip"):
        build_config(TrainConfig, {"model": "m", "on_nonfinite": "ignore"})
