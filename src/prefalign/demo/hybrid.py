"""`prefalign demo --task hybrid`: the hybrid data loop on the demo's task.

best-of-N candidates from the demo's SFT model -> a local LLM judge asks every pair in both
orders (flipped pairs dropped) -> a simulated annotator (the noiseless scorer, with a
share of its pairs flipped) labels the items where the judge was least sure
(`annotate --select uncertain`) -> `judge agreement` on half of them picks the
--min-confidence that reaches the target kappa -> the judge, at that confidence, labels
the items no human saw -> `data merge` of the human and the judge pairs.

The judge is a tiny causal LM trained here (no hub model is offline), read through
LocalJudge's verdict-token probabilities like any local judge. Its prompt holds only the
two texts ("{a} | {b}"), its answer is one token ("0": the first is better), and it learns
from its own pairs of texts of the task's grammar labelled by the noisy scorer, both
orders of every pair, so the position of a text tells it nothing.

The threshold is chosen on the calibration half of the human items and judged on the
other half (the check half): the kappa "after" is measured on pairs the threshold was not
fitted to. The pairs are also checked against the noiseless scorer, which a real loop has
no access to.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prefalign.demo.pipeline import DemoSettings, Stages, build_base, train_sft
from prefalign.demo.task import (
    ground_truth_scorer,
    review_continuation,
    review_corpus,
    review_prompts,
    sentiment_score,
)

JUDGE_TEMPLATE = "{a} | {b}"
# Bump when the judge's recipe or the loop's fixed options change: cached stages rerun.
RECIPE = 1


@dataclass(frozen=True)
class HybridSettings:
    """Sizes of the loop; `demo` sizes the base and SFT stages it shares with the demo."""

    demo: DemoSettings = field(default_factory=DemoSettings)
    prompts: int = 200
    candidates: int = 4
    judge_pairs: int = 2000
    judge_steps: int = 300
    judge_noise: float = 0.1   # share of the judge's training labels flipped
    human_items: int = 60
    human_noise: float = 0.1   # share of the simulated annotator's pairs flipped
    target_kappa: float = 0.6

    def fingerprint(self) -> str:
        from dataclasses import asdict

        key = json.dumps({"recipe": RECIPE, **asdict(self)}, sort_keys=True)
        return hashlib.sha256(key.encode()).hexdigest()[:12]


def _jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def _fresh(folder: Path) -> None:
    """Empty a stage's folder: a stage that runs again starts over instead of continuing the
    journals (best-of-N, judge) of a run with other settings or cut short."""
    for path in folder.iterdir():
        if path.is_file():
            path.unlink()


def _read(path: Any) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text("utf-8").splitlines()]


def make_candidates(folder: Path, h: HybridSettings, sft: dict) -> dict[str, Any]:
    """Best-of-N candidates of the SFT model for new prompts (their pairs are not used)."""
    from prefalign.generation import SamplingOptions
    from prefalign.preferences.best_of_n import generate_preferences

    _fresh(folder)
    prompts = _jsonl(folder / "prompts.jsonl", [{"prompt": p} for p in review_prompts(
        h.prompts, seed=h.demo.seed + 31)])
    report = generate_preferences(
        sft["model"], prompts, folder / "best-of-n.jsonl", ground_truth_scorer,
        num_candidates=h.candidates, seed=h.demo.seed + 32, batch_size=64, progress=False,
        keep_candidates=True, sampling=SamplingOptions(max_new_tokens=h.demo.max_new_tokens,
                                                       temperature=1.0))
    return {"candidates": str(report.candidates), "prompts": h.prompts}


def judge_rows(h: HybridSettings) -> list[dict]:
    """The judge's training rows: pairs of continuations with different noiseless scores,
    labelled by the scorer with h.judge_noise of the labels flipped, each in both orders."""
    from prefalign.preferences.pairwise import LABELS, render_pair

    rng, rows = random.Random(h.demo.seed + 41), []
    while len(rows) < 2 * h.judge_pairs:
        a, b = review_continuation(rng), review_continuation(rng)
        if sentiment_score(a) == sentiment_score(b):
            continue
        first = (sentiment_score(a) > sentiment_score(b)) != (rng.random() < h.judge_noise)
        for x, y, verdict in ((a, b, 0 if first else 1), (b, a, 1 if first else 0)):
            rows.append({"prompt": [{"role": "user", "content": render_pair(
                JUDGE_TEMPLATE, "", x, y)}], "completion": [
                {"role": "assistant", "content": LABELS[verdict]}]})
    return rows


def train_judge(folder: Path, h: HybridSettings) -> dict[str, Any]:
    """A word-level tiny Llama (its vocabulary: the task's words and the verdicts), trained
    on judge_rows with the loss on the verdict (and its EOS) only.

    Measured on held-out pairs: 300 steps at lr 1e-3 (warmup 10%, cosine) reach accuracy
    0.83 against the noiseless scorer with 14% of verdicts flipping with the order; 200
    steps only 0.66 and 31%. Judges trained on the demo's best-of-N pairs, from scratch at
    lr 3e-3 for 30-120 steps or from the demo's SFT model at lr 1e-3 for 60-300 steps,
    learned no verdict: flat loss, every pair flipped."""
    from prefalign.algorithms.sft import SFTConfig, run_sft
    from prefalign.tiny import build_model, build_tokenizer

    s = h.demo
    tokenizer = build_tokenizer(review_corpus(s.corpus, seed=s.seed) + ["0 1 |"],
                                vocab_size=400, kind="word")
    model = build_model(tokenizer, arch="llama", hidden_size=64, num_layers=2, num_heads=4,
                        seed=s.seed + 42)
    model.save_pretrained(folder / "init")
    tokenizer.save_pretrained(folder / "init")
    data = _jsonl(folder / "train.jsonl", judge_rows(h))
    result = run_sft(SFTConfig(
        model=str(folder / "init"), data=data, output_dir=str(folder / "run"), lora_r=0,
        learning_rate=1e-3, batch_size=32, grad_accum=1, max_steps=h.judge_steps,
        warmup_ratio=0.1, lr_scheduler="cosine", logging_steps=50, seed=s.seed,
        max_length=128, max_prompt_length=120, overwrite=True))
    return {"model": str(folder / "run" / "final"), "loss": result.history[-1]["loss"]}


def simulated_annotator(items: list, noise: float, seed: int) -> list[dict]:
    """The pairs a human would write ranking `items` (annotate's rows): candidates ranked by
    the noiseless scorer, equal scores tied (no pair), then each pair flipped with
    probability `noise`, seeded by the pair's texts so a rerun labels the same way."""
    from prefalign.preferences.annotate import pair_rows

    rows = []
    for item in items:
        scores = [sentiment_score(c) for c in item.candidates]
        places = [[i for i, x in enumerate(scores) if x == level]
                  for level in sorted(set(scores), reverse=True)]
        for row in pair_rows(item, places):
            digest = hashlib.sha256(f"{seed}\0{row['chosen']}\0{row['rejected']}".encode())
            if random.Random(digest.digest()).random() < noise:
                row["chosen"], row["rejected"] = row["rejected"], row["chosen"]
                row["rank_chosen"], row["rank_rejected"] = (row["rank_rejected"],
                                                            row["rank_chosen"])
            rows.append(row)
    return rows


def truth_accuracy(rows: list[dict]) -> float | None:
    """Share of pairs whose chosen text the noiseless scorer prefers (equal scores left out)."""
    told = [sentiment_score(r["chosen"]) > sentiment_score(r["rejected"]) for r in rows
            if sentiment_score(r["chosen"]) != sentiment_score(r["rejected"])]
    return sum(told) / len(told) if told else None


def _kappa(judged: Any, human: str, target: float, seed: int) -> dict | None:
    """judge agreement's report, or None when the files share no pair."""
    from prefalign.errors import DataError
    from prefalign.preferences.judge_agreement import compare

    try:
        return compare(judged, human, target, seed)
    except DataError:  # no pair in both: nothing to compare, reported as such
        return None


def _judge(judge: Any, items: str, output: Path, min_confidence: float | None) -> Any:
    from prefalign.preferences.judge import judge_preferences

    return judge_preferences(items, output, judge, template=JUDGE_TEMPLATE, mode="pairwise",
                             on_inconsistent="drop", min_confidence=min_confidence,
                             batch_size=64, progress=False)


def run_loop(folder: Path, h: HybridSettings, candidates: dict, judge_model: dict
             ) -> dict[str, Any]:
    """The loop itself (see the module docstring); its numbers."""
    from prefalign.preferences.annotate import read_items, select_items
    from prefalign.preferences.judge_agreement import flip_rate_of
    from prefalign.preferences.local_judge import LocalJudge

    _fresh(folder)
    # Two new tokens: the verdict and EOS; a local judge's pairwise confidence comes from
    # the verdict token's probability, not from the text.
    judge = LocalJudge(judge_model["model"], max_new_tokens=2, batch_size=64)
    _judge(judge, candidates["candidates"], folder / "judged.jsonl", None)
    items = read_items(candidates["candidates"])
    asked = select_items(items, "uncertain", h.human_items,
                         folder / "judged.judgments.jsonl")
    human = _annotate(folder, h, asked)
    numbers = _calibrate(_read(folder / "judged.jsonl"), human, h)
    seen = {item.key for item in asked}
    rest = _jsonl(folder / "rest.candidates.jsonl", [
        {"prompt": it.prompt, "candidates": list(it.candidates)} for it in items
        if it.key not in seen])
    second = _judge(judge, rest, folder / "judge-rest.jsonl", numbers["threshold"])
    numbers.update(_merge(folder, human["all"], folder / "judge-rest.jsonl"))
    numbers["truth_accuracy"] = {"human": truth_accuracy(_read(human["all"])),
                                 **numbers["truth_accuracy"],
                                 "judge on the rest (merged)": truth_accuracy(
                                     _read(folder / "judge-rest.jsonl"))}
    return {"items": len(items), "human_items": len(asked), "target_kappa": h.target_kappa,
            "flip_rate": flip_rate_of(folder / "judged.jsonl"),
            "judge_below_threshold": second.below_confidence, **numbers}


def _annotate(folder: Path, h: HybridSettings, asked: list) -> dict[str, str]:
    """The simulated annotator's pairs of the asked items, alternately into a calibration
    and a check half (the selection's order: both halves as uncertain), and all together."""
    halves = [simulated_annotator(part, h.human_noise, h.demo.seed)
              for part in (asked[0::2], asked[1::2])]
    return {"calibration": _jsonl(folder / "human-calibration.jsonl", halves[0]),
            "check": _jsonl(folder / "human-check.jsonl", halves[1]),
            "all": _jsonl(folder / "human.jsonl", halves[0] + halves[1])}


def _calibrate(judged: list[dict], human: dict[str, str], h: HybridSettings) -> dict[str, Any]:
    """The threshold judge agreement suggests on the calibration half, and the judge's kappa
    on the check half with every pair (before) and with the pairs it keeps (after)."""
    fit = _kappa(judged, human["calibration"], h.target_kappa, h.demo.seed)
    threshold = fit["suggested"][0] if fit and fit["suggested"] else None
    kept = [r for r in judged if threshold is None
            or (r["confidence"] is not None and r["confidence"] >= threshold)]
    return {"threshold": threshold, "calibration": _summary(fit),
            "before": _summary(_kappa(judged, human["check"], h.target_kappa, h.demo.seed)),
            "after": _summary(_kappa(kept, human["check"], h.target_kappa, h.demo.seed)),
            "truth_accuracy": {"judge (all pairs)": truth_accuracy(judged),
                               "judge (above the threshold)": truth_accuracy(kept)}}


def _merge(folder: Path, human: str, judged: Path) -> dict[str, Any]:
    """data merge of the two sources; the pairs each contributed."""
    from prefalign.preferences.merge import merge_preferences

    merged = merge_preferences([(human, 1.0), (str(judged), 1.0)], folder / "merged.jsonl")
    return {"merged": str(folder / "merged.jsonl"),
            "pairs": {"human": merged.inputs[0].train, "judge": merged.inputs[1].train}}


def _summary(report: dict | None) -> dict | None:
    """The numbers of a judge agreement report the loop keeps."""
    if report is None:
        return None
    return {k: report.get(k) for k in ("pairs", "prompts", "accuracy", "kappa",
                                       "kappa_interval", "suggested", "with_confidence")}


def _kappa_text(r: dict | None) -> str:
    if r is None:
        return "n/a (no pair in common)"
    lo_hi = r["kappa_interval"]
    interval = f"{lo_hi[0]:.2f} to {lo_hi[1]:.2f}" if lo_hi else "n/a"
    return f"{r['kappa']:.3f} (95% interval {interval}) on {r['pairs']} pairs"


def hybrid_findings(loop: dict) -> list[str]:
    """The report's lines: kappa before and after calibration, and where the pairs came from."""
    t, fit, truth = loop["threshold"], loop["calibration"], loop["truth_accuracy"]
    if t is None:
        chosen = f"no --min-confidence (none reaches kappa {loop['target_kappa']}; all kept)"
    else:
        _, kappa, kept = fit["suggested"]
        chosen = (f"--min-confidence {t:.3f}, keeping {kept} of its {fit['with_confidence']} "
                  f"pairs at kappa {kappa:.3f} (target {loop['target_kappa']})")
    pct = {k: "n/a" if v is None else f"{v:.1%}" for k, v in truth.items()}
    flips = "n/a" if loop["flip_rate"] is None else f"{loop['flip_rate']:.1%}"
    return [
        f"Judge-human Cohen's kappa on the check half of the {loop['human_items']} items the "
        f"simulated annotator labelled: before calibration {_kappa_text(loop['before'])}; "
        f"after, {_kappa_text(loop['after'])}.",
        f"Calibration on the other half ({_kappa_text(fit)}) chose {chosen}; "
        f"{flips} of the judge's pairs flipped with the order and were dropped.",
        f"Merged preference data: {loop['pairs']['human']} pairs from the simulated annotator, "
        f"{loop['pairs']['judge']} from the calibrated judge on the other "
        f"{loop['items'] - loop['human_items']} items ({loop['judge_below_threshold']} of its "
        f"pairs under the threshold left out).",
        "Agreement with the noiseless scorer: " + ", ".join(f"{k} {v}" for k, v in pct.items())
        + ".",
    ]


def _table(loop: dict) -> dict[str, Any]:
    """The report's comparison table: the judge with every pair and with the calibrated
    threshold, against the check half's human labels (kappa with its interval) and against
    the noiseless scorer."""
    rows = {"judge, every pair": ("before", "judge (all pairs)"),
            "judge, calibrated": ("after", "judge (above the threshold)")}
    metrics, intervals = {}, {}
    for name, (key, truth) in rows.items():
        r = loop[key] or {}
        metrics[name] = {"kappa": r.get("kappa"), "accuracy": r.get("accuracy"),
                         "pairs": r.get("pairs"), "truth": loop["truth_accuracy"][truth]}
        if r.get("kappa_interval"):
            intervals[name] = {"kappa": {"value": r["kappa"], "ci95": r["kappa_interval"]}}
    info = {"kappa": ("kappa vs human", "Cohen's kappa against the simulated annotator on "
                      "the check half's pairs"),
            "accuracy": ("accuracy vs human", "share of those pairs labelled alike"),
            "pairs": ("pairs", "pairs both labelled in the check half"),
            "truth": ("accuracy vs scorer", "share of the judge's pairs, on every item, that "
                      "the noiseless scorer orders the same way (equal scores left out)")}
    return {"metrics": metrics, "intervals": intervals,
            "metric_info": {k: {"label": a, "description": b} for k, (a, b) in info.items()}}


def run_hybrid(output_dir: str = "demo-output", force: bool = False,
               settings: HybridSettings | None = None) -> Path:
    """Run (or reuse) the demo's base and SFT stages and the loop's; write the loop's report
    to OUTPUT/hybrid-report; returns its report.html."""
    from dataclasses import asdict

    from prefalign.evaluation.report import write_report

    h = settings or HybridSettings()
    root = Path(output_dir)
    shared = Stages(root, h.demo, force)  # the main demo's stages: one run serves both
    base = shared.run("base", "tokenizer and tiny Llama-style model",
                      lambda f: build_base(f, h.demo))
    sft = shared.run("sft", "SFT on synthetic reviews", lambda f: train_sft(f, h.demo, base))
    stages = Stages(root, h, force)
    stages.count = shared.count
    candidates = stages.run("hybrid-candidates", f"best-of-{h.candidates} candidates",
                            lambda f: make_candidates(f, h, sft))
    judge = stages.run("hybrid-judge", "a local judge model",
                       lambda f: train_judge(f, h))
    loop = stages.run("hybrid-loop", "judge, simulated annotator, calibration, merge",
                      lambda f: run_loop(f, h, candidates, judge))
    seconds = {**shared.seconds, **stages.seconds}
    report = {"title": "prefalign demo: the hybrid data loop", "findings": hybrid_findings(loop),
              "hybrid": loop, "settings": asdict(h), "stage_seconds": seconds,
              "bootstrap": {"resamples": 1000, "seed": h.demo.seed}, **_table(loop)}
    paths = write_report(report, root / "hybrid-report")
    for line in report["findings"]:
        print("  " + line)
    print(f"report: {paths['html'].resolve()}")
    return paths["html"]
