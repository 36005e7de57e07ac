"""Which examples one training step reads, and which of them each process runs.

A step reads a window of batch_size x grad_accum x processes examples of the epoch's order
(windows never cross an epoch boundary: the last one of an epoch may be smaller), cut
into micro-batches of batch_size x processes rows, each cut into one share per process.
Every process holds all features and cuts the same windows, so no data is exchanged.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch

from prefalign.train.batching import epoch_generator

Features = list[dict[str, Any]]


class Share(NamedTuple):
    """One process's part of one micro-batch: its rows and their loss units.

    stand_in: the process's share of the micro-batch is empty (a window's last micro-batch
    with fewer rows than processes), so it runs a copy of one row instead, with 0 units:
    its loss is multiplied by 0 and its metrics are not counted, but every process runs
    as many forward/backward passes as the others (each one holds collectives).
    """

    features: Features
    units: float
    stand_in: bool = False


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The shuffled example order of one epoch: a pure function of (seed, epoch)."""
    return torch.randperm(n, generator=epoch_generator(seed, epoch)).tolist()


def split_window(window: Features, batch_size: int, procs: int) -> list[list[Features]]:
    """Cut a step's examples into micro-batches of up to batch_size x procs rows, and each
    micro-batch into one share per process, sizes differing by one row at most.

    (micro-batch k, process r) -> features. Only the last micro-batch may be smaller; when
    it has fewer rows than processes, some shares are empty (the loop runs stand-ins).
    """
    shares = []
    for start in range(0, len(window), batch_size * procs):
        chunk = window[start : start + batch_size * procs]
        size, extra = divmod(len(chunk), procs)
        bounds = [r * size + min(r, extra) for r in range(procs + 1)]
        shares.append([chunk[bounds[r] : bounds[r + 1]] for r in range(procs)])
    return shares


def process_shares(window: Features, batch_size: int, procs: int, rank: int,
                   units: Callable[[Features], float]) -> tuple[list[Share], float]:
    """Process `rank`'s share of every micro-batch of `window` (a stand-in where its share
    is empty), and the units of the whole window over every process."""
    shares = split_window(window, batch_size, procs)
    total = float(sum(units(s) for micro in shares for s in micro if s))
    mine = [micro[rank] for micro in shares]
    return ([Share(f, units(f)) if f else Share([micro[0][0]], 0.0, True)
             for f, micro in zip(mine, shares)], total)
