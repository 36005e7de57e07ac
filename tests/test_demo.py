"""`prefalign demo --quick` end to end: every stage, the report, and stage reuse."""

import json

import pytest

from prefalign.cli import main

# The demo's methods besides DPO and PPO: main-run model name -> (title in the findings,
# frontier label, the quick run's sweep points).
NEW_METHODS = {"grpo": ("GRPO", "GRPO (beta sweep)", ["beta=0.05", "beta=1"]),
               "rloo": ("RLOO", "RLOO (beta sweep)", ["beta=0.05", "beta=0.2"]),
               "online-dpo": ("Online DPO", "Online DPO (beta sweep)", ["beta=0.1", "beta=0.5"])}


@pytest.mark.slow
def test_quick_demo_runs_the_whole_pipeline_and_reuses_stages(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--output-dir", str(out)]) == 0
    printed = capsys.readouterr().out
    report = json.loads((out / "report" / "report.json").read_text())
    assert set(report["metrics"]) >= {"base", "sft", "dpo", "ppo", *NEW_METHODS}
    # reward model, five gains, five frontier comparisons, time
    assert len(report["findings"]) == 12
    assert report["findings"][0].startswith("Reward model accuracy on")
    curves = report["frontier"]["curves"]
    assert set(curves) == {"DPO (beta sweep)", "PPO (KL-coefficient sweep)",
                           *(curve for _, curve, _ in NEW_METHODS.values())}
    assert all(len(points) >= 2 for points in curves.values())
    for name in ("report.html", "report.md", "frontier.png"):
        assert (out / "report" / name).is_file(), name
    assert f"report: {(out / 'report' / 'report.html').resolve()}" in printed
    # every number in the findings comes from the run's own table
    sft_score = report["metrics"]["sft"]["score/mean"]
    assert f"SFT {sft_score:.3f}" in report["findings"][1]
    # The pipeline learns: the targets (0.85, +0.25, +0.25) are met on the reference machine;
    # the slack here allows for another CPU's rounding.
    assert report["demo"]["reward_model"]["heldout_accuracy"] >= 0.8
    for name in ("dpo", "ppo"):
        assert report["metrics"][name]["score/mean"] - sft_score >= 0.2, name
        # a policy that gains by running on past the token limit has not learned the task
        assert report["metrics"][name]["finished_rate"] >= 0.9, name
    # the frontiers are compared where both sweeps have points
    kls = {label: [p["kl"] for p in points] for label, points in curves.items()}
    dpo_kl, ppo_kl = kls["DPO (beta sweep)"], kls["PPO (KL-coefficient sweep)"]
    assert min(dpo_kl) <= max(ppo_kl) and min(ppo_kl) <= max(dpo_kl)
    assert "comparable points" in report["findings"][3]
    # GRPO, RLOO and online DPO: trained against the learned reward model, each a sweep of
    # its beta drawn on the frontier plot, each a gain over SFT and its frontier compared
    assert {p["id"] for p in report["plots"]} >= {"frontier", *(f"run/{n}" for n in NEW_METHODS)}
    for i, (name, (title, curve, labels)) in enumerate(NEW_METHODS.items()):
        assert {p["label"] for p in curves[curve]} == set(labels), name
        # joined in KL order, as compare_frontiers reads a curve
        assert [p["kl"] for p in curves[curve]] == sorted(p["kl"] for p in curves[curve]), name
        row = report["metrics"][name]
        assert any(p["kl"] == row["kl"] and p["reward"] == row["score/mean"]
                   for p in curves[curve]), name
        assert row["score/mean"] - sft_score >= 0.2, name
        assert row["finished_rate"] >= 0.9, name
        assert report["findings"][4 + i].startswith(f"{title} mean ground-truth score"), name
        assert f"vs SFT {sft_score:.3f}: " in report["findings"][4 + i], name
    assert all("comparable points" in line or "do not overlap" in line
               for line in report["findings"][7:11])
    pairs = ("GRPO vs PPO. ", "RLOO vs PPO. ", "GRPO vs RLOO. ", "Online DPO vs DPO. ")
    assert [line[: len(p)] for line, p in zip(report["findings"][7:11], pairs)] == list(pairs)

    assert main(["demo", "--quick", "--output-dir", str(out)]) == 0
    again = capsys.readouterr().out
    assert again.count(": reused ") == 14  # base, sft, pairs, reward, 2 points of 5 methods


def test_curve_at_interpolates_in_kl_order_and_never_extrapolates():
    from prefalign.demo.findings import curve_at

    points = [(4.0, 0.6), (2.0, 0.4)]            # given out of order
    assert curve_at(points, 3.0) == pytest.approx(0.5)
    assert curve_at(points, 2.0) == pytest.approx(0.4)
    assert curve_at(points, 1.9) is None and curve_at(points, 4.1) is None
    assert curve_at([(1.0, 0.3)], 1.0) == 0.3


def test_frontier_comparison_is_point_by_point():
    from prefalign.demo.findings import compare_frontiers

    dpo = [(2.0, 0.5, "beta=0.5"), (6.0, 0.7, "beta=0.1")]
    ppo = [(3.0, 0.4, "kl=0.2"), (5.0, 0.8, "kl=0.05"), (9.0, 0.9, "kl=0.02")]
    line = compare_frontiers(("DPO", "PPO"), (dpo, ppo))
    # PPO at KL 3: DPO's curve there is 0.55 > 0.4; at KL 5: 0.65 < 0.8; KL 9 outside DPO's.
    # DPO at KL 2: outside PPO's range; at KL 6: PPO's curve is 0.825 > 0.7.
    assert "the frontiers cross: DPO higher at 1, PPO at 2 of 3 comparable points" in line
    assert "PPO kl=0.2 (KL 3.00): PPO 0.400 vs DPO 0.550, DPO higher" in line
    assert "DPO beta=0.1 (KL 6.00): DPO 0.700 vs PPO 0.825, PPO higher" in line
    assert "PPO kl=0.02 (KL 9.00) outside DPO's KL range" in line
    above = [(k, r + 1, lab) for k, r, lab in ppo]
    assert "PPO's frontier is higher at 3 of 3 comparable points (" in compare_frontiers(
        ("DPO", "PPO"), (dpo, above))
    far = [(20.0, 0.9, "kl=0.001")]
    assert "do not overlap" in compare_frontiers(("DPO", "PPO"), (dpo, far))


def test_a_frontier_difference_inside_its_interval_is_not_distinguishable():
    from prefalign.demo.findings import compare_frontiers

    # hand-made 95% intervals, each +-0.02: a difference's interval is +-0.02*sqrt(2) = 0.028
    dpo = [(2.0, 0.50, "beta=0.5", [0.48, 0.52]), (6.0, 0.70, "beta=0.1", [0.68, 0.72])]
    ppo = [(3.0, 0.54, "kl=0.2", [0.52, 0.56]), (5.0, 0.80, "kl=0.05", [0.78, 0.82])]
    # DPO's curve: 0.55 at KL 3 (PPO 0.54: -0.01, inside), 0.65 at KL 5 (PPO 0.80: outside)
    line = compare_frontiers(("DPO", "PPO"), (dpo, ppo))
    assert ("PPO kl=0.2 (KL 3.00): PPO 0.540 vs DPO 0.550, not distinguishable (difference "
            "-0.010 within its 95% interval +-0.028)") in line
    assert "PPO kl=0.05 (KL 5.00): PPO 0.800 vs DPO 0.650, PPO higher" in line
    assert "PPO's frontier is higher at 1 of 2 comparable points and not distinguishable at 1" in line
    # the same point 0.04 below DPO's curve: outside its interval, a win for DPO
    lower = [(3.0, 0.51, "kl=0.2", [0.49, 0.53]), ppo[1]]
    line = compare_frontiers(("DPO", "PPO"), (dpo, lower))
    assert "PPO kl=0.2 (KL 3.00): PPO 0.510 vs DPO 0.550, DPO higher" in line
    assert "the frontiers cross: DPO higher at 1, PPO at 1 of 2 comparable points" in line
    wide = [(k, r, lab, [r - 0.5, r + 0.5]) for k, r, lab, _ in ppo]
    assert "not distinguishable at any of the 2 comparable points" in compare_frontiers(
        ("DPO", "PPO"), (dpo, wide))


def test_frontier_points_carry_the_evaluations_intervals():
    from prefalign.demo.findings import frontiers

    table = {name: {"kl": kl, "score/mean": 0.5} for name, kl in
             (("dpo", 1.0), ("ppo", 2.0), ("ppo-kl0.2", 3.0))}
    intervals = {"dpo": {"score/mean": {"value": 0.5, "ci95": [0.45, 0.56]}},
                 "ppo": {"score/mean": {"value": 0.5, "ci95": [0.4, 0.6]}}}
    front = frontiers(table, {"DPO (beta sweep)": [("beta=0.1", "dpo")],
                              "PPO (KL-coefficient sweep)": [("kl=0.05", "ppo"),
                                                             ("kl=0.2", "ppo-kl0.2")]},
                      intervals)
    assert front["DPO (beta sweep)"] == [(1.0, 0.5, "beta=0.1", [0.45, 0.56])]
    assert front["PPO (KL-coefficient sweep)"] == [(2.0, 0.5, "kl=0.05", [0.4, 0.6]),
                                                   (3.0, 0.5, "kl=0.2", None)]


def test_findings_give_each_methods_gain_then_the_chosen_frontier_comparisons():
    from prefalign.demo.findings import findings

    table = {"sft": {"score/mean": 0.4, "kl": 0.0, "finished_rate": 1.0},
             "a": {"score/mean": 0.7, "kl": 2.0, "finished_rate": 1.0},
             "b": {"score/mean": 0.62, "kl": 3.0, "finished_rate": 0.95},
             "c": {"score/mean": 0.66, "kl": 2.5, "finished_rate": 1.0}}
    front = {"A sweep": [(1.0, 0.6, "x=1"), (2.0, 0.7, "x=0.5")],
             "B sweep": [(1.5, 0.5, "y=1"), (3.0, 0.62, "y=0.5")],
             "C sweep": [(2.5, 0.66, "z=1")]}
    intervals = {"a": {"score/mean": {"value": 0.7, "ci95": [0.68, 0.72]}}}
    lines = findings(table, {"heldout_accuracy": 0.9, "heldout_pairs": 10}, front, 12.3,
                     intervals, methods={"a": ("A", "A sweep"), "b": ("B", "B sweep"),
                                         "c": ("C", "C sweep")},
                     comparisons=(("a", "b", "The A paper found A ahead."), ("c", "a", "")))
    assert len(lines) == 7
    assert lines[1] == ("A mean ground-truth score on held-out prompts 0.700 (95% interval "
                        "0.680-0.720) vs SFT 0.400: +0.300 (target >= +0.25: met), KL to SFT "
                        "2.00 nats, 100.0% of responses finished before the token limit.")
    # no interval: none shown; a gain under the target is said to be one
    assert lines[2].startswith("B mean ground-truth score on held-out prompts 0.620 vs SFT "
                               "0.400: +0.220 (target >= +0.25: NOT met), KL to SFT 3.00")
    # the first comparison follows its two methods, then the others' gains and comparisons
    assert lines[3].startswith("A vs B. Reward-vs-KL frontiers")
    assert "B y=0.5 (KL 3.00) outside A's KL range" in lines[3]
    assert lines[3].endswith(" The A paper found A ahead.")
    assert lines[4].startswith("C mean ground-truth score")
    # C at KL 2.5 is outside A's range (1-2); A's points are outside C's single point
    assert "do not overlap" in lines[5] and lines[5].endswith(").")
    assert lines[6].startswith("The pipeline's stages took 12 s")


def test_the_frontier_plot_draws_each_sweep_once_and_a_far_base_model_off_scale(monkeypatch):
    """The report's plot: every sweep a curve; a model that is a sweep's point is drawn on
    it (with its intervals), not again as a star; the base model, 40x further from SFT than
    any sweep point, at the right edge marked off scale."""
    from prefalign.evaluation import report as report_module
    from prefalign.evaluation.plots import frontier_figure

    metrics = {"base": {"kl": 159.0, "score/mean": 0.50}, "sft": {"kl": 0.0, "score/mean": 0.45},
               "dpo": {"kl": 4.0, "score/mean": 0.80}, "grpo": {"kl": 3.0, "score/mean": 0.78},
               "grpo-beta1": {"kl": 1.0, "score/mean": 0.60}}
    curves = report_module.normalize_frontier(
        {"DPO (beta sweep)": [(4.0, 0.80, "beta=0.1", "dpo")],
         "GRPO (beta sweep)": [(1.0, 0.60, "beta=1", "grpo-beta1"), (3.0, 0.78, "beta=0.05", "grpo")]})
    report = {"metrics": metrics, "frontier": {"y": "score/mean", "curves": curves},
              "intervals": {"grpo": {"score/mean": {"ci95": [0.75, 0.8]}}}}
    drawn = {}
    monkeypatch.setattr(report_module, "frontier_png",
                        lambda points, curves, label: drawn.update(points=points, curves=curves))
    report_module.make_plots(report)
    assert [p[0] for p in drawn["points"]] == ["base", "sft"]
    assert drawn["curves"]["GRPO (beta sweep)"][1]["reward_ci"] == [0.75, 0.8]
    assert drawn["curves"]["GRPO (beta sweep)"][0]["reward_ci"] is None

    ax = frontier_figure(drawn["points"], drawn["curves"], "score").axes[0]
    assert ax.get_legend_handles_labels()[1] == [
        "DPO (beta sweep)", "GRPO (beta sweep)", "base (KL 159, off scale)", "sft"]
    assert 4.0 < ax.get_xlim()[1] < 10.0
    # without the far model, matplotlib chooses the axis
    near = frontier_figure(drawn["points"][1:], drawn["curves"], "score").axes[0]
    assert near.get_legend_handles_labels()[1][-1] == "sft"
