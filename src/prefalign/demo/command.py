"""`prefalign demo`: its config and run (the stages: demo.pipeline)."""

from __future__ import annotations

from dataclasses import dataclass

from prefalign.config import Section, option

DESCRIPTION = (
    "Offline, on a built-in task (steer review continuations toward positive sentiment, "
    "scored by a fixed lexicon): build a tiny model, SFT, best-of-N pairs with noisy labels, "
    "reward model, DPO, then PPO, GRPO, RLOO and online DPO against the reward model, a "
    "sweep of each method's KL knob (PPO's KL coefficient, the others' beta), evaluation on "
    "held-out prompts, and report.html. Finished stages are reused on a second run.")


@dataclass(frozen=True)
class DemoConfig(Section):
    COMMAND = "demo"

    output_dir: str = option("demo-output", "where everything is written")
    quick: bool = option(False, "a faster variant: the same main runs, two sweep points each "
                         "instead of four for DPO and three for the others (arithmetic: a "
                         "test-sized run that checks the stages and learns little)")
    force: bool = option(False, "rerun every stage")
    seed: int = option(0, "seed")
    task: str = option("main", "main: the pipeline above; hybrid: the hybrid data loop on "
                       "the same task (best-of-N candidates, a local judge, a simulated "
                       "annotator on the judge's least certain items, the judge calibrated "
                       "to a target kappa, merge) written to OUTPUT_DIR/hybrid-report; "
                       "arithmetic: two-digit addition, SFT then GRPO with the math_answer "
                       "reward, exact-match accuracy of greedy answers on held-out problems, "
                       "written to OUTPUT_DIR/arithmetic/report",
                       choices=("main", "hybrid", "arithmetic"))


def run(config: DemoConfig) -> int:
    if config.task == "arithmetic":
        from prefalign.demo.arithmetic import ArithmeticSettings, run_arithmetic

        settings = (ArithmeticSettings.quick(config.seed) if config.quick
                    else ArithmeticSettings(seed=config.seed))
        run_arithmetic(config.output_dir, force=config.force, settings=settings)
        return 0
    if config.task == "hybrid":
        from prefalign.demo.hybrid import HybridSettings, run_hybrid
        from prefalign.demo.pipeline import DemoSettings

        demo = DemoSettings.quick(config.seed) if config.quick else DemoSettings(seed=config.seed)
        run_hybrid(config.output_dir, force=config.force, settings=HybridSettings(demo=demo))
        return 0
    from prefalign.demo.pipeline import run_demo

    run_demo(config.output_dir, quick=config.quick, force=config.force, seed=config.seed)
    return 0
