"""What the demo's report says: its findings and the comparisons of the frontiers.

A sweep's frontier is its points (KL to SFT, mean ground-truth score); two methods'
frontiers are compared point by point, each point with the other method's curve at the
same KL, never with an extrapolation, and a difference counts only when it is larger than
its 95% bootstrap interval (the intervals `evaluate` puts in report.json).
"""

from __future__ import annotations

import math
from typing import Any


def curve_at(points: list[tuple[float, float]], kl: float) -> float | None:
    """The curve through `points` (kl, reward), joined in KL order, at `kl`: linear
    between neighbours; None outside the curve's KL range (no extrapolation)."""
    pts = sorted(points)
    if not pts or not pts[0][0] <= kl <= pts[-1][0]:
        return None
    for (k1, r1), (k2, r2) in zip(pts, pts[1:]):
        if k1 <= kl <= k2:
            return r1 if k2 == k1 else r1 + (r2 - r1) * (kl - k1) / (k2 - k1)
    return pts[0][1]  # a single point, at exactly its KL


def half_width(interval: Any) -> float:
    """Half the width of a [lo, hi] interval; 0 when there is none (no bootstrap)."""
    return 0.0 if interval is None else (interval[1] - interval[0]) / 2


def _curve_margin(points: list[tuple], kl: float) -> float:
    """The half-width of the curve's 95% interval at `kl`, interpolated between the
    neighbouring points' half-widths as curve_at interpolates their values."""
    pts = sorted((p[0], half_width(p[3] if len(p) > 3 else None)) for p in points)
    return curve_at(pts, kl) or 0.0


def _difference(name: str, other: str, reward: float, at: float, margin: float) -> str:
    """The outcome of one comparison: a win only when the difference is larger than the
    half-width of its interval."""
    if margin and abs(reward - at) <= margin:
        return (f"not distinguishable (difference {reward - at:+.3f} within its 95% "
                f"interval +-{margin:.3f})")
    return f"{name if reward > at else other} higher"


def compare_frontiers(names: tuple[str, str], curves: tuple[list, list]) -> str:
    """Point by point: each sweep point against the other method's curve at the same KL.

    curves: two lists of (kl, reward, label) or (kl, reward, label, [lo, hi]), the last the
    reward's 95% bootstrap interval. A point outside the other curve's KL range is reported
    as not comparable rather than compared with an extrapolation. A difference is a win only
    when it is larger than its interval's half-width: the two half-widths combined as
    independent errors, sqrt(a^2 + b^2) (the models share their prompts, so the true
    interval is, if anything, narrower: this errs toward "not distinguishable")."""
    parts, wins, compared = [], {n: 0 for n in names}, 0
    for i, (name, points) in enumerate(zip(names, curves)):
        other_name, other = names[1 - i], curves[1 - i]
        for point in points:
            kl, reward, label = point[:3]
            at = curve_at([(p[0], p[1]) for p in other], kl)
            if at is None:
                parts.append(f"{name} {label} (KL {kl:.2f}) outside {other_name}'s KL range")
                continue
            compared += 1
            own = half_width(point[3] if len(point) > 3 else None)
            outcome = _difference(name, other_name, reward, at,
                                  math.hypot(own, _curve_margin(other, kl)))
            if outcome.endswith(" higher"):
                wins[outcome.removesuffix(" higher")] += 1
            parts.append(f"{name} {label} (KL {kl:.2f}): {name} {reward:.3f} vs "
                         f"{other_name} {at:.3f}, {outcome}")
    return (f"Reward-vs-KL frontiers, point by point, a difference counting only when it is "
            f"larger than its 95% bootstrap interval: {_verdict(names, wins, compared)} "
            f"({'; '.join(parts)}).")


def _verdict(names: tuple[str, str], wins: dict[str, int], compared: int) -> str:
    same = compared - wins[names[0]] - wins[names[1]]
    if not compared:
        return "the two sweeps' KL ranges do not overlap: the frontiers cannot be compared"
    if same == compared:
        return f"the frontiers are not distinguishable at any of the {compared} comparable points"
    if wins[names[0]] + same == compared or wins[names[1]] + same == compared:
        top = max(names, key=lambda n: wins[n])
        return (f"{top}'s frontier is higher at {wins[top]} of {compared} comparable points"
                + (f" and not distinguishable at {same}" if same else ""))
    return (f"the frontiers cross: {names[0]} higher at {wins[names[0]]}, {names[1]} at "
            f"{wins[names[1]]}" + (f", not distinguishable at {same}" if same else "")
            + f" of {compared} comparable points")


def findings(table: dict, reward: dict, front: dict, seconds: float,
             intervals: dict | None = None, *, methods: dict[str, tuple[str, str]],
             comparisons: tuple[tuple[str, str, str], ...]) -> list[str]:
    """The report's opening lines: the reward model's accuracy, each method's gain over
    SFT (target met or not), the first comparison's frontiers, the other methods' gains,
    the other comparisons, the time.

    methods: {model name of the main run: (title, frontier label)} in report order;
    comparisons: (method, method, what the literature found or ""); intervals: report.json's
    `intervals`, each main run's 95% bootstrap interval of its score."""
    acc = reward["heldout_accuracy"]
    lines = [
        f"Reward model accuracy on {reward['heldout_pairs']} held-out pairs labelled by the "
        f"noiseless scorer: {acc:.3f} (target >= 0.85: {'met' if acc >= 0.85 else 'NOT met'}).",
    ]
    compared = [_comparison(front, methods, pair) for pair in comparisons]
    gains = [_gain_line(table, intervals or {}, name, title)
             for name, (title, _) in methods.items()]
    # The first comparison (DPO against PPO) follows its two methods' lines, as before the
    # other methods joined: readers of earlier reports find it in the same place.
    lines += gains[:2] + compared[:1] + gains[2:] + compared[1:]
    lines.append(f"The pipeline's stages took {seconds:.0f} s in all on this machine "
                 "(reused stages count with the time they took when they ran).")
    return lines


def _gain_line(table: dict, intervals: dict, name: str, title: str) -> str:
    """One main run against SFT: its score with its 95% interval, the gain, the target."""
    score, sft = table[name]["score/mean"], table["sft"]["score/mean"]
    ci = ((intervals.get(name) or {}).get("score/mean") or {}).get("ci95")
    within = f" (95% interval {ci[0]:.3f}-{ci[1]:.3f})" if ci else ""
    gain = score - sft
    return (f"{title} mean ground-truth score on held-out prompts {score:.3f}{within} vs SFT "
            f"{sft:.3f}: {gain:+.3f} (target >= +0.25: {'met' if gain >= 0.25 else 'NOT met'}), "
            f"KL to SFT {table[name]['kl']:.2f} nats, {table[name]['finished_rate']:.1%} of "
            "responses finished before the token limit.")


def _comparison(front: dict, methods: dict[str, tuple[str, str]],
                pair: tuple[str, str, str]) -> str:
    first, second, literature = pair
    (a, a_curve), (b, b_curve) = methods[first], methods[second]
    # named first: five of these lines read alike until their verdict
    line = f"{a} vs {b}. " + compare_frontiers((a, b), (front[a_curve], front[b_curve]))
    return f"{line} {literature}" if literature else line


def frontiers(table: dict, sweeps: dict[str, list[tuple[str, str]]],
              intervals: dict | None = None) -> dict[str, list[tuple]]:
    """(KL, mean ground-truth score, label, its 95% interval [lo, hi] or None) of each sweep
    point, by frontier label. sweeps: {frontier label: [(point label, model name)]} in the
    order the curve joins them; intervals: report.json's `intervals` ({model: {metric:
    {"ci95"}}})."""

    def point(name: str, label: str) -> tuple:
        ci = ((intervals or {}).get(name) or {}).get("score/mean")
        return (table[name]["kl"], table[name]["score/mean"], label, ci and ci["ci95"])

    return {curve: [point(name, label) for label, name in points]
            for curve, points in sweeps.items()}
