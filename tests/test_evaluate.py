"""evaluate() end to end on tiny models, the CLI function, and the report files."""

import argparse
import json
import re

import pytest
import torch

from helpers import save_noisy_copy, write_jsonl
from prefalign.config import add_config_arguments, config_from_args
from prefalign.evaluation import compute_metrics, evaluate, write_report
from prefalign.evaluation.command import EvaluateConfig, parse_named, run_evaluate
from prefalign.evaluation.report_markdown import md_text
from prefalign.generation import SamplingConfig, generate
from prefalign.models import RewardModel, load_causal_lm
from prefalign.tiny import build_model

PROMPTS = ["The film 1:", "<script>alert(1)</script> says", [{"role": "user", "content": "Hi"}]]
SAMPLING = SamplingConfig(max_new_tokens=8, n=2, seed=3, batch_size=4)
CURVES = [{"step": s, "loss": 1 / s, "rewards/margins": 0.1 * s, "lr": 1e-5,
           "rewards/accuracies": "nan" if s == 2 else 0.5} for s in range(1, 6)]


@pytest.fixture(scope="module")
def dirs(tmp_path_factory, tokenizer, tiny_model_dir):
    """base (the shared tiny model), tuned (base with noise on every weight), a reward model
    built from another tiny model, and a fake DPO run."""
    root = tmp_path_factory.mktemp("eval")
    save_noisy_copy(tiny_model_dir, tokenizer, root / "tuned")
    rm = RewardModel.from_causal_lm(build_model(tokenizer, seed=2), tokenizer.pad_token_id)
    rm.save_pretrained(root / "rm", tokenizer)
    (root / "run").mkdir()
    write_jsonl(root / "run" / "metrics.jsonl", CURVES)
    return {"base": str(tiny_model_dir), "tuned": str(root / "tuned"), "rm": str(root / "rm"),
            "run": str(root / "run"), "root": root}


@pytest.fixture(scope="module")
def result(dirs):
    models = {"base": dirs["base"], "tuned": dirs["tuned"], "copy": dirs["base"]}
    return evaluate(models, PROMPTS, dirs["root"] / "out", reward_model=dirs["rm"],
                    scorer="length(max=12,falloff=12)", sampling=SAMPLING,
                    runs={"dpo": dirs["run"]}, frontier={"beta sweep": [(0.5, 0.1, "b=0.5"),
                                                                        (1.0, 0.2)]},
                    findings=["tuned <beats> base?"], progress=False)


def test_report_json_consistent(result, dirs):
    report = json.loads(result.paths["json"].read_text("utf-8"))
    m = report["metrics"]
    assert list(m) == ["base", "tuned", "copy"]
    for key in ("win_rate/reward", "win_rate/score"):
        assert m["base"][key] == 0.5  # the baseline against itself: all ties
    assert m["base"]["kl"] == 0.0 and m["copy"]["kl"] == 0.0  # reference against itself
    assert m["copy"] == m["base"]  # same weights, same seeded samples
    assert m["tuned"]["kl"] != 0.0 and m["tuned"]["self_bleu_per_prompt"] is not None
    assert m == compute_metrics(result.samples, "base")  # what the table shows = the samples
    rows = [json.loads(line) for line in result.paths["samples"].read_text("utf-8").splitlines()]
    assert len(rows) == 3 * len(PROMPTS) * SAMPLING.n
    tuned = [r for r in rows if r["model"] == "tuned"]
    assert m["tuned"]["reward/mean"] == pytest.approx(sum(r["reward"] for r in tuned) / len(tuned))
    assert report["settings"]["sampling"]["seed"] == 3
    assert report["settings"]["reference"] == {"name": "base", "path": dirs["base"]}
    assert report["findings"] == ["tuned <beats> base?"]
    assert report["frontier"]["y"] == "reward/mean"
    assert report["frontier"]["curves"]["beta sweep"][0] == {"kl": 0.5, "reward": 0.1,
                                                             "label": "b=0.5"}
    curves = report["runs"]["dpo"]["curves"]
    assert set(curves) == {"loss", "rewards/margins", "rewards/accuracies"}  # lr is no panel
    assert len(curves["rewards/accuracies"]) == 4  # the "nan" record is skipped
    assert {p["id"] for p in report["plots"]} == {"frontier", "run/dpo"}
    # 95% bootstrap intervals over prompts (default 1000 resamples, the sampling seed).
    assert report["bootstrap"]["resamples"] == 1000 and report["bootstrap"]["seed"] == 3
    ci = report["intervals"]
    assert ci == result.intervals and ci["copy"] == ci["base"]
    assert ci["base"]["kl"]["ci95"] == [0.0, 0.0]  # constant: zero width
    assert ci["base"]["win_rate/reward"]["ci95"] == [0.5, 0.5]
    for key in ("reward/mean", "score/mean", "win_rate/reward", "win_rate/score", "kl"):
        lo, hi = ci["tuned"][key]["ci95"]
        assert lo <= m["tuned"][key] == ci["tuned"][key]["value"] <= hi, key
    assert ci["tuned"]["reward/mean"]["ci95"][0] < ci["tuned"]["reward/mean"]["ci95"][1]


def test_frontier_draws_the_intervals_as_error_bars(result):
    """The same report without its intervals gives a different frontier picture (the error
    bars), and an interval becomes matplotlib's [[below], [above]] around the value."""
    from prefalign.evaluation.report import make_plots

    with_bars = make_plots(dict(result.report))
    without = make_plots({**result.report, "intervals": {}})
    assert with_bars[0]["id"] == "frontier" and with_bars[0]["png"] != without[0]["png"]
    from prefalign.evaluation.plots import error_bar

    assert error_bar(2.0, [1.5, 3.0]) == [[0.5], [1.0]] and error_bar(2.0, None) is None


def test_samples_are_the_models_own_and_kl_matches_a_direct_computation(result, dirs):
    """Regenerate the tuned model's samples with the same settings (same texts), then
    recompute log p_tuned - log p_base by a plain log_softmax over the full logits."""
    tuned, base = load_causal_lm(dirs["tuned"]), load_causal_lm(dirs["base"])
    from prefalign.models import load_tokenizer

    gens = generate(tuned, load_tokenizer(dirs["tuned"]), PROMPTS, SAMPLING, progress=False)
    samples = result.samples["tuned"]
    assert [g.text for g in gens] == [s["text"] for s in samples]
    assert [len(g.response_ids) for g in gens] == [s["length"] for s in samples]
    for g, s in list(zip(gens, samples))[:3]:
        ids = torch.tensor([g.prompt_ids + g.response_ids])
        start = len(g.prompt_ids)
        with torch.no_grad():
            own, ref = (torch.log_softmax(m(ids).logits[0, :-1].double(), -1)
                        .gather(-1, ids[0, 1:, None])[start - 1:].sum().item()
                        for m in (tuned, base))
        assert s["logp"] == pytest.approx(own, abs=1e-3)
        assert s["ref_logp"] == pytest.approx(ref, abs=1e-3)


def test_report_files_self_contained_and_escaped(result):
    html = result.paths["html"].read_text("utf-8")
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", html, re.I)
    srcs = re.findall(r'<img[^>]*\ssrc="([^"]+)"', html)
    assert len(srcs) == 2 and all(s.startswith("data:image/png;base64,") for s in srcs)
    assert html.count("<script") == 1  # only the page's own image check
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert "tuned &lt;beats&gt; base?" in html
    md = result.paths["md"].read_text("utf-8")
    assert "<script>" not in md and "tuned &lt;beats&gt; base?" in md
    for png in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md):
        assert (result.paths["md"].parent / png).read_bytes().startswith(b"\x89PNG")
    assert "| base (baseline, reference) |" in md


def test_model_text_is_escaped_in_every_format(tmp_path):
    """A response that is itself HTML/Markdown must show as text, never as markup."""
    evil = '<script>document.title="x"</script> | **bold** <img src=x onerror=alert(1)>'
    report = {"title": "t", "metrics": {"a<b>": {"kl": 0.0}}, "findings": [evil],
              "examples": [{"prompt_index": 0, "prompt": evil,
                            "responses": {"a<b>": {"text": evil, "reward": 1.0}}}]}
    paths = write_report(report, tmp_path)
    html = paths["html"].read_text("utf-8")
    assert html.count("<script") == 1 and "<img src=x" not in html and "<b>" not in html
    assert html.count("&lt;script&gt;document.title=&quot;x&quot;&lt;/script&gt;") == 3
    assert md_text("a|b\n*c*") == r"a\|b<br>\*c\*"
    assert "<img" not in paths["md"].read_text("utf-8")


def test_cli_function(dirs, tmp_path, capsys):
    parser = argparse.ArgumentParser()
    add_config_arguments(parser, EvaluateConfig)
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "The film 2:"}, {"prompt": "Hi"}])
    out = tmp_path / "report"
    args = config_from_args(EvaluateConfig, parser.parse_args([
        "--models", f"base={dirs['base']}", f"tuned={dirs['tuned']}", "--prompts", prompts,
        "--scorer", "length(max=10)", "--baseline", "tuned", "--output-dir", str(out),
        "--max-new-tokens", "4", "--seed", "1", "--num-examples", "1", "--finding", "first"]))
    path = run_evaluate(args)
    assert capsys.readouterr().out.strip() == str(out / "report.html") == str(path)
    report = json.loads((out / "report.json").read_text("utf-8"))
    assert report["metrics"]["tuned"]["win_rate/score"] == 0.5
    assert report["metrics"]["base"]["kl"] == 0.0 and report["metrics"]["tuned"]["kl"] != 0.0
    assert report["settings"]["sampling"]["max_new_tokens"] == 4
    assert len(report["examples"]) == 1 and report["plots"] == [
        {"id": "frontier", "file": "frontier.png", "title": "Reward vs KL"}]


def test_parse_named():
    assert parse_named(["a=x/y", "runs/dpo/"], "--models") == {"a": "x/y", "dpo": "runs/dpo/"}
    with pytest.raises(Exception, match="twice"):
        parse_named(["a=x", "a=y"], "--models")
