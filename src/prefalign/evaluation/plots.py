"""PNG figures for the evaluation report: the reward-vs-KL frontier and training curves.

Figures are drawn on matplotlib's Agg canvas through `Figure` directly, never pyplot: no
display is needed and the process-wide backend of a caller (a notebook) is left alone.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

DPI = 110


def _png(fig: Figure) -> bytes:
    FigureCanvasAgg(fig)
    buffer = io.BytesIO()
    # No "Software" entry: the same figure gives the same bytes on any matplotlib version.
    fig.savefig(buffer, format="png", dpi=DPI, bbox_inches="tight", metadata={"Software": None})
    return buffer.getvalue()


def error_bar(value: float, interval: Sequence[float] | None) -> list[list[float]] | None:
    """matplotlib's asymmetric error: [[below], [above]] from an interval [lo, hi] around
    value (clamped at 0: a percentile interval holds its estimate up to rounding)."""
    if interval is None:
        return None
    lo, hi = interval
    return [[max(0.0, value - lo)], [max(0.0, hi - value)]]


def frontier_png(points: Sequence[tuple], curves: Mapping[str, Sequence[Mapping]],
                 y_label: str) -> bytes:
    """frontier_figure's PNG."""
    return _png(frontier_figure(points, curves, y_label))


def frontier_figure(points: Sequence[tuple], curves: Mapping[str, Sequence[Mapping]],
                    y_label: str) -> Figure:
    """Reward against KL: each curve (label -> [{kl, reward, label, reward_ci?}],
    joined in the order given) as a line with markers, plus one labelled star per model
    point.

    A point is (name, kl, reward) or (name, kl, reward, kl interval, reward interval), an
    interval [lo, hi] or None; intervals are drawn as error bars. A point far beyond every
    curve's KL (an untrained base model) is drawn at the right edge, marked off scale with
    its KL, rather than squeezing the curves into a corner."""
    fig = Figure(figsize=(7.2, 4.8))
    ax = fig.add_subplot()
    for label, curve in curves.items():
        xs = [p["kl"] for p in curve]
        ys = [p["reward"] for p in curve]
        (line,) = ax.plot(xs, ys, marker="o", markersize=4, linewidth=1.2, alpha=0.85,
                          label=label)
        for p in curve:
            _error_bars(ax, p["kl"], p["reward"], None, p.get("reward_ci"), line.get_color())
            if p.get("label"):
                ax.annotate(p["label"], (p["kl"], p["reward"]), textcoords="offset points",
                            xytext=(4, -10), fontsize=7, color=line.get_color())
    edge = _off_scale_edge(points, curves)
    for j, (name, kl, reward, *intervals) in enumerate(points):
        # Colours continue after the curves', so a model never looks like part of a sweep.
        color = f"C{(len(curves) + j) % 10}"
        if edge is not None and kl > edge:
            ax.scatter([edge], [reward], s=70, marker=">", zorder=3, color=color,
                       label=f"{name} (KL {kl:.3g}, off scale)")
            ax.annotate(f"{name}: KL {kl:.3g}", (edge, reward), textcoords="offset points",
                        xytext=(-8, 6), fontsize=9, ha="right")
            continue
        kl_ci, reward_ci = (intervals + [None, None])[:2]
        _error_bars(ax, kl, reward, kl_ci, reward_ci, color)
        ax.scatter([kl], [reward], s=70, marker="*", zorder=3, color=color, label=name)
        ax.annotate(name, (kl, reward), textcoords="offset points", xytext=(6, 4), fontsize=9)
    if edge is not None:
        ax.set_xlim(right=edge * 1.04)
    ax.set_xlabel("KL(model || reference), nats per response")
    ax.set_ylabel(y_label)
    ax.grid(True, alpha=0.3)
    if points or curves:
        ax.legend(fontsize=7, loc="best")
    ax.set_title("Reward vs KL")
    return fig


def _error_bars(ax, kl: float, reward: float, kl_ci, reward_ci, color: str) -> None:
    if kl_ci is not None or reward_ci is not None:
        ax.errorbar([kl], [reward], xerr=error_bar(kl, kl_ci), yerr=error_bar(reward, reward_ci),
                    fmt="none", ecolor=color, elinewidth=1.0, capsize=2.5, alpha=0.7, zorder=2)


def _off_scale_edge(points: Sequence[tuple], curves: Mapping[str, Sequence[Mapping]]
                    ) -> float | None:
    """Where the x axis ends when some point lies beyond 3x the curves' largest KL; None when
    there is no curve or no such point."""
    reach = max((p["kl"] for curve in curves.values() for p in curve), default=0.0)
    if reach <= 0:
        return None
    if not any(p[1] > 3 * reach for p in points):
        return None
    near = [p[1] for p in points if p[1] <= 3 * reach]
    return 1.1 * max([reach, *near])


def curves_png(run: str, curves: Mapping[str, Sequence[Sequence[float]]]) -> bytes:
    """One small panel per metric of a training run: value against optimizer step."""
    keys = [k for k, pts in curves.items() if pts]
    cols = min(3, max(1, len(keys)))
    rows = max(1, math.ceil(len(keys) / cols))
    fig = Figure(figsize=(4.2 * cols, 2.9 * rows))
    for i, key in enumerate(keys):
        ax = fig.add_subplot(rows, cols, i + 1)
        steps = [p[0] for p in curves[key]]
        values = [p[1] for p in curves[key]]
        ax.plot(steps, values, linewidth=1.3, marker="o" if len(steps) < 30 else None,
                markersize=3)
        ax.set_title(key, fontsize=10)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=8)
        ax.grid(True, alpha=0.3)
    fig.suptitle(run, fontsize=11)
    fig.tight_layout()
    return _png(fig)
