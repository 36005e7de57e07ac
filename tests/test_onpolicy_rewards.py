"""Rewards of the on-policy commands: several reward functions with weights (TRL's
reward_funcs and reward_weights), each logged as rewards/<name>/mean and /std, TRL's None
("no reward for this sample"), the weight count checked in one line, the built-in
verifiable rewards in --help."""

import importlib
import math
from types import SimpleNamespace

import pytest
import torch

from helpers import run_cli, write_review_prompts
from prefalign.algorithms.onpolicy import OnPolicyTrainer
from prefalign.cli import TRAINERS
from prefalign.config import build_config
from prefalign.config.values import load_yaml
from prefalign.errors import ConfigError, PrefalignError
from prefalign.scoring import load_scorer
from prefalign.scoring.rewards import config_rewards, load_rewards, plan_rewards
from prefalign.train.metrics import MetricWindow

NAN = float("nan")


def starts_angle(prompts, completions, **kwargs):
    """TRL's form: a format reward."""
    return [float(c.startswith("<")) for c in completions]


def exact(prompts, completions, answer, **kwargs):
    """TRL's form, reading the rows' `answer` column; None where a row has no answer."""
    return [None if a is None else float(c.strip() == a) for c, a in zip(completions, answer)]


def never(prompts, completions, **kwargs):
    return [None] * len(completions)


def on_policy_commands():
    """Every trainer command whose config takes reward_fn (ppo, grpo, rloo, ...)."""
    out = []
    for name, (module, cls, _, _) in TRAINERS.items():
        config = getattr(importlib.import_module(module), cls)
        if "reward_fn" in config.__dataclass_fields__:
            out.append((name, config))
    return out


def test_weighted_terms_each_named_and_summed():
    """starts_angle * 1 + length(max=3) * 0.5 + length(min=2) * 2 (a second length,
    made unique): "<a" -> 1 + 0.5 + 2 = 3.5; "abcd" -> 0 + 0 + 2 = 2; "<" -> 1 + 0.5 + 0."""
    scorer = load_rewards([starts_angle, "length(max=3)", "length(min=2)"], [1, 0.5, 2])
    terms = scorer.reward_terms(["p"] * 3, ["<a", "abcd", "<"])
    assert terms.names == ["starts_angle", "length", "length_2"]
    assert terms.weights == [1.0, 0.5, 2.0]
    assert terms.scores == [[1.0, 0.0, 1.0], [1.0, 0.0, 1.0], [1.0, 1.0, 0.0]]
    assert terms.total() == [3.5, 2.0, 1.5]
    assert scorer(["p"] * 3, ["<a", "abcd", "<"]) == [3.5, 2.0, 1.5]  # one code path


def test_none_is_left_out_of_the_sum_as_trl_does():
    """TRL: None -> NaN per function, total = nansum(w * r); all None -> NaN (unscorable).
    rows: answer "4", none, "4"; completions "4", "<x", "5"; weights exact 2, starts_angle 1:
    row 0: 2*1 + 1*0 = 2; row 1: exact None -> 1*1 = 1; row 2: 2*0 + 0 = 0."""
    scorer = load_rewards([exact, starts_angle], [2.0, 1.0])
    terms = scorer.reward_terms(["p"] * 3, ["4", "<x", "5"], {"answer": ["4", None, "4"]})
    assert math.isnan(terms.scores[0][1])
    assert terms.total() == [2.0, 1.0, 0.0]
    alone = load_rewards([never, exact]).reward_terms(["p"] * 2, ["4", "4"],
                                                      {"answer": [None, "4"]})
    total = alone.total()
    assert math.isnan(total[0]) and total[1] == 1.0
    # Scoring outside training (best-of-N, evaluate) needs a number for every response.
    with pytest.raises(PrefalignError, match="every term returned None at position 0"):
        load_rewards([never, exact])(["p"], ["4"], {"answer": [None]})


def trainer_self(scorer, unscorable: bool):
    algorithm = SimpleNamespace(unscorable_rewards=unscorable)
    return SimpleNamespace(scorer=scorer, algorithm=algorithm, window=MetricWindow(),
                           accelerator=SimpleNamespace(num_processes=1),
                           config=SimpleNamespace(COMMAND="ppo"))


def rollout(texts, answers):
    prompts = [{"prompt": "p", "extra_columns": {"answer": a}} for a in answers]
    return SimpleNamespace(prompts=prompts, texts=texts)


def test_engine_logs_each_term_mean_and_std_and_returns_the_total():
    """exact (weight 2) scores [1, nan, 0]: mean 0.5, std of (1, 0) = 0.7071; starts_angle
    [0, 1, 0]: mean 1/3, std 0.5774 (Bessel, TRL's nanstd); totals [2, 1, 0]."""
    me = trainer_self(load_rewards([exact, starts_angle], [2.0, 1.0]), unscorable=False)
    total = OnPolicyTrainer.score(me, rollout(["4", "<x", "5"], ["4", None, "4"]))
    assert total.tolist() == [2.0, 1.0, 0.0]
    logged = me.window.means()
    assert logged["rewards/exact/mean"] == pytest.approx(0.5)
    assert logged["rewards/exact/std"] == pytest.approx(2 ** -0.5)
    assert logged["rewards/starts_angle/mean"] == pytest.approx(1 / 3)
    assert logged["rewards/starts_angle/std"] == pytest.approx(3 ** -0.5)


def test_term_statistics_are_over_every_process():
    """Process 0 scores [1, 0] (exact) and [0, 1] (starts_angle); the other process's (N, K)
    scores [[1, 1], [1, 0]] are gathered after them: exact [1, 0, 1, 1] mean 0.75,
    starts_angle [0, 1, 1, 0] mean 0.5, std sqrt(1/3)."""
    other = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    me = trainer_self(load_rewards([exact, starts_angle]), unscorable=False)
    me.accelerator = SimpleNamespace(num_processes=2, device="cpu",
                                     gather=lambda mine: torch.cat([mine, other]))
    total = OnPolicyTrainer.score(me, rollout(["4", "<x"], ["4", "4"]))
    assert total.tolist() == [1.0, 1.0]  # this process's own samples only
    logged = me.window.means()
    assert logged["rewards/exact/mean"] == pytest.approx(0.75)
    assert logged["rewards/starts_angle/mean"] == pytest.approx(0.5)
    assert logged["rewards/starts_angle/std"] == pytest.approx(3 ** -0.5)


def test_a_sample_no_function_scored_is_nan_for_grpo_and_refused_by_ppo(capsys):
    scorer = load_rewards([exact])
    me = trainer_self(scorer, unscorable=True)
    total = OnPolicyTrainer.score(me, rollout(["4", "4"], [None, "4"]))
    assert math.isnan(total[0]) and total[1] == 1.0
    assert "every reward function returned None for 1 sample" in capsys.readouterr().err
    with pytest.raises(PrefalignError, match="ppo needs a reward for every sample"):
        OnPolicyTrainer.score(trainer_self(scorer, unscorable=False),
                              rollout(["4", "4"], [None, "4"]))


def test_weights_count_and_double_weights_refused():
    with pytest.raises(ConfigError, match=r"'reward_weights': 1 weight\(s\) for 2 reward "
                                          r"function\(s\) \(length, exact\)"):
        plan_rewards(["length(max=3)", "rewards.py:exact"], [1.0])
    with pytest.raises(ConfigError, match="has its own ':W' weight"):
        plan_rewards(["length(max=3):2", "json_valid"], [1.0, 1.0])


@pytest.mark.parametrize("command, config", on_policy_commands())
def test_every_on_policy_command_repeats_reward_fn_and_checks_the_weights(
        capsys, tmp_path, command, config):
    """--reward-fn twice and one weight: exit 2 in one line, before any model loads."""
    code, _, err = run_cli(capsys, [command, "--model", tmp_path / "no-model", "--data", "d",
                                    "--output-dir", tmp_path / "o",
                                    "--reward-fn", "length(min=1,max=6)",
                                    "--reward-fn", "regex(pattern=e)", "--reward-weights", "1"])
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert "1 weight(s) for 2 reward function(s) (length, regex)" in err, err
    code, out, _ = run_cli(capsys, [command, "--help"])
    assert code == 0 and "--reward-weights" in out
    for builtin in ("math_answer", "regex(pattern=P", "command(cmd="):
        assert builtin in " ".join(out.split()), (command, builtin)


def test_yaml_list_and_yaml_string(tmp_path):
    """A YAML list gives one term per item; a YAML string holding commas stays one spec."""
    from prefalign.algorithms.grpo import GRPOConfig
    path = tmp_path / "c.yaml"
    path.write_text("model: m\ndata: d\nrewards:\n  reward_fn: ['length(min=1,max=6)', "
                    "'regex(pattern=e)']\n  reward_weights: [1, 0.5]\n")
    cfg = build_config(GRPOConfig, load_yaml(path))
    assert cfg.reward_fn == ["length(min=1,max=6)", "regex(pattern=e)"]
    scorer = config_rewards(cfg, None)
    assert scorer(["p"], ["eee"]) == [1.5]
    path.write_text("model: m\ndata: d\nreward_fn: 'length(min=1,max=6):2,regex(pattern=e)'\n")
    cfg = build_config(GRPOConfig, load_yaml(path))
    terms = config_rewards(cfg, None).reward_terms(["p"], ["eeeeeee"])
    assert (terms.names, terms.weights, terms.total()) == (["length", "regex"], [2.0, 1.0],
                                                           [1.0])


def test_reward_model_dir_named_by_its_last_component(tmp_path):
    from prefalign.scoring.base import term_name

    (tmp_path / "rm" / "final").mkdir(parents=True)
    assert term_name(str(tmp_path / "rm" / "final")) == "final"
    assert term_name("sub/rewards.py:exact") == "exact"
    assert term_name("regex(pattern='a:b')") == "regex"
    assert load_scorer("math_answer").reward_terms(["p"], ["\\boxed{3/4}"], {
        "answer": ["0.75"]}).names == ["math_answer"]


def test_grpo_logs_every_term(tmp_path, tiny_model_dir):
    """End to end: two built-in terms, weights 1 and 0.5; the logged reward is the weighted
    sum of the logged term means (no None, so the sum is linear)."""
    from prefalign.algorithms.grpo import GRPOConfig, run_grpo

    cfg = GRPOConfig(model=str(tiny_model_dir), data=write_review_prompts(tmp_path),
                     output_dir=str(tmp_path / "out"), batch_size=2, grad_accum=1,
                     max_steps=1, lora_r=4, logging_steps=1, max_new_tokens=4,
                     num_generations=2, reward_fn=["length(max=8)", "regex(pattern=e)"],
                     reward_weights=[1.0, 0.5])
    last = run_grpo(cfg).history[-1]
    for key in ("rewards/length/mean", "rewards/length/std", "rewards/regex/mean",
                "rewards/regex/std", "entropy"):
        assert key in last, key
    assert last["reward"] == pytest.approx(
        last["rewards/length/mean"] + 0.5 * last["rewards/regex/mean"], abs=1e-6)
    assert torch.isfinite(torch.tensor(last["entropy"]))


CONNECT = "```python\nimport socket\nsocket.create_connection(('1.1.1.1', 53), timeout=3)\n```"


def test_code_reward_without_network(monkeypatch):
    """command(network=false): the code runs, but cannot reach any address (even loopback
    is down in its namespace); where the namespace cannot be made it is refused in a line."""
    from prefalign.scoring import command

    try:
        command._check_no_network()
    except ConfigError:
        pytest.skip("no user namespaces on this machine")
    scorer = load_scorer("command(cmd='python {file}',timeout=20,network=false)")
    assert scorer(["p", "p"], ["```python\nx = 1\n```", CONNECT]) == [1.0, 0.0]
    assert "unreachable" in scorer.last_results[1].output
    shell = load_scorer("command(cmd='python {file} && echo ok',shell=true,network=false)")
    assert shell(["p"], ["x = 1"]) == [1.0] and "ok" in shell.last_results[0].output
    monkeypatch.setattr(command, "NO_NETWORK", ("no-such-unshare-xyz",))
    with pytest.raises(ConfigError, match="network=false needs `no-such-unshare-xyz`"):
        load_scorer("command(network=false)")
