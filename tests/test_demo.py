"""`prefalign demo --quick` end to end: every stage, the report, and stage reuse."""

import json

import pytest

from prefalign.cli import main


@pytest.mark.slow
def test_quick_demo_runs_the_whole_pipeline_and_reuses_stages(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--output-dir", str(out)]) == 0
    printed = capsys.readouterr().out
    report = json.loads((out / "report" / "report.json").read_text())
    assert set(report["metrics"]) >= {"base", "sft", "dpo", "ppo"}
    assert len(report["findings"]) == 5
    assert report["findings"][0].startswith("Reward model accuracy on")
    curves = report["frontier"]["curves"]
    assert set(curves) == {"DPO (beta sweep)", "PPO (KL-coefficient sweep)"}
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

    assert main(["demo", "--quick", "--output-dir", str(out)]) == 0
    again = capsys.readouterr().out
    assert again.count(": reused ") == 8  # base, sft, pairs, reward, 2 DPO, 2 PPO


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
    front = frontiers(table, {0.1: "dpo"}, {0.05: "ppo", 0.2: "ppo-kl0.2"}, intervals)
    assert front["DPO (beta sweep)"] == [(1.0, 0.5, "beta=0.1", [0.45, 0.56])]
    assert front["PPO (KL-coefficient sweep)"] == [(2.0, 0.5, "kl=0.05", [0.4, 0.6]),
                                                   (3.0, 0.5, "kl=0.2", None)]
