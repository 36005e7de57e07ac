"""Expected calibration error of a reward model's preference probabilities.

A function of the whole evaluation set's bins: the mean of per-batch ECEs is not the ECE,
so reward training scores the eval set once more after training to report it.
"""

from __future__ import annotations

import torch
from torch import Tensor

ECE_BINS = 10


def expected_calibration_error(chosen: Tensor, rejected: Tensor, bins: int = ECE_BINS) -> float:
    """ECE of the preference probabilities p_i = sigmoid(r_c,i - r_r,i) over a whole set.

    The model predicts "chosen is preferred" when p_i > 1/2, with confidence
    c_i = max(p_i, 1 - p_i) in [1/2, 1]; the prediction is correct when r_c,i > r_r,i (the
    `accuracy` metric's rule; a tie is wrong). [1/2, 1] is cut into `bins` equal-width bins
    B_k = [1/2 + k w, 1/2 + (k+1) w), w = 1 / (2 bins), the last one closed. Then

        ECE = sum_k (|B_k| / N) * | mean_{i in B_k} correct_i - mean_{i in B_k} c_i |

    (Guo et al. 2017, arXiv:1706.04599, Eq. 3, over the binary prediction's confidence.)
    chosen, rejected (N,); every pair counts once (row weights are ignored).
    """
    diff = chosen.double() - rejected.double()
    p = torch.sigmoid(diff)
    confidence = torch.maximum(p, 1 - p)
    correct = (diff > 0).double()
    width = 0.5 / bins
    index = ((confidence - 0.5) / width).floor().long().clamp(0, bins - 1)
    n = diff.numel()
    gaps = torch.zeros(bins, dtype=torch.float64).index_add_(0, index, correct - confidence)
    return float(gaps.abs().sum() / max(n, 1))  # sum_k |sum_{B_k} (correct - c)| / N
