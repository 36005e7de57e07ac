"""The learning-rate schedules give transformers' get_scheduler multipliers at every step."""

import pytest
import torch
from transformers import get_scheduler

from prefalign.train.schedule import warmup_schedule

TRANSFORMERS_NAME = {"constant": "constant_with_warmup", "linear": "linear", "cosine": "cosine"}


def lrs(scheduler, steps):
    out = []
    for _ in range(steps):
        out.append(scheduler.get_last_lr()[0])
        scheduler.optimizer.step()
        scheduler.step()
    return out


@pytest.mark.parametrize("kind", ["constant", "linear", "cosine"])
@pytest.mark.parametrize("warmup,total", [(0, 1), (0, 10), (3, 10), (10, 10), (1, 7), (5, 100)])
def test_equal_to_transformers_at_every_step(kind, warmup, total):
    def optimizer():
        return torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.5)

    ours = lrs(warmup_schedule(optimizer(), kind, warmup, total), total + 3)
    theirs = lrs(get_scheduler(TRANSFORMERS_NAME[kind], optimizer(), num_warmup_steps=warmup,
                               num_training_steps=total), total + 3)
    assert ours == pytest.approx(theirs, abs=1e-12)


def test_hand_computed_cosine():
    # W=2, T=6: warmup 0, 1/2; then (1 + cos(pi * k / 4)) / 2 for k = 0..4, times lr 1.
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    got = lrs(warmup_schedule(opt, "cosine", 2, 6), 6)
    assert got == pytest.approx([0.0, 0.5, 1.0, 0.8535534, 0.5, 0.1464466], abs=1e-6)
