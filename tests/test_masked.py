"""Masked statistics against hand-computed values (the arithmetic is in each docstring)."""

import math
import threading

import pytest
import torch

from prefalign.masked import last_token_index, masked_mean, masked_var, masked_whiten

T = torch.tensor
# Kept entries: 1, 2 (row 0) and 5 (row 1); 3, 4, 6 are outside the mask.
X = T([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
MASK = T([[True, True, False], [False, True, False]])


def test_masked_mean_by_hand():
    """(1 + 2 + 5) / 3 = 8/3; per row: (1 + 2) / 2 = 1.5 and 5 / 1 = 5; an empty mask gives 0
    (the count is clamped to 1); nan and inf outside the mask never reach the result."""
    assert masked_mean(X, MASK).item() == pytest.approx(8 / 3)
    assert masked_mean(X, MASK, dim=1).tolist() == pytest.approx([1.5, 5.0])
    assert masked_mean(X, torch.zeros_like(MASK)).item() == 0.0
    poisoned = X.masked_fill(~MASK, float("nan"))
    poisoned[0, 2] = float("inf")
    assert masked_mean(poisoned, MASK).item() == pytest.approx(8 / 3)


def test_masked_var_by_hand():
    """Mean 8/3; squared deviations (5/3)^2 + (2/3)^2 + (7/3)^2 = 78/9 = 26/3;
    biased 26/9, unbiased (Bessel, n - 1 = 2) 13/3."""
    assert masked_var(X, MASK, unbiased=False).item() == pytest.approx(26 / 9)
    assert masked_var(X, MASK).item() == pytest.approx(13 / 3)


def test_masked_whiten_by_hand():
    """(x - 8/3) / sqrt(13/3) on the mask, 0 elsewhere; shift_mean=False adds 8/3 back."""
    scale = math.sqrt(13 / 3)
    expected = [[(1 - 8 / 3) / scale, (2 - 8 / 3) / scale, 0.0], [0.0, (5 - 8 / 3) / scale, 0.0]]
    assert masked_whiten(X, MASK).tolist() == [pytest.approx(r, abs=1e-6) for r in expected]
    kept = masked_whiten(X, MASK, shift_mean=False)
    assert kept[MASK].tolist() == pytest.approx([v + 8 / 3 for v in (-5 / 3 / scale,
                                                 -2 / 3 / scale, 7 / 3 / scale)], abs=1e-6)
    assert kept[~MASK].tolist() == [0.0, 0.0, 0.0]


def test_statistics_across_processes_equal_one_process():
    """Two 'processes' (threads) holding row 0 and row 1, reduce summing over both: mean,
    variance and whitening equal one process holding both rows."""
    slots, barrier = [None, None], threading.Barrier(2)
    out = [None, None]

    def run(rank):
        def reduce(t):
            slots[rank] = t.clone()
            barrier.wait()
            total = slots[0] + slots[1]
            barrier.wait()  # both have read before either writes its next value
            return total

        x, mask = X[rank : rank + 1], MASK[rank : rank + 1]
        out[rank] = (masked_mean(x, mask, reduce=reduce), masked_var(x, mask, reduce=reduce),
                     masked_whiten(x, mask, reduce=reduce))

    threads = [threading.Thread(target=run, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=10)
    for rank in range(2):
        assert out[rank][0].item() == pytest.approx(8 / 3)
        assert out[rank][1].item() == pytest.approx(13 / 3)
    torch.testing.assert_close(torch.cat([out[0][2], out[1][2]]), masked_whiten(X, MASK))


def test_last_token_index_by_hand():
    """Rows [T T F] -> 1, [F F F] -> 0 (none), [F T T] -> 2, [T F F] -> 0."""
    mask = T([[True, True, False], [False, False, False], [False, True, True],
              [True, False, False]])
    assert last_token_index(mask).tolist() == [1, 0, 2, 0]
