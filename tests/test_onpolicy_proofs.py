"""Proofs of the on-policy loop for every on-policy command: groups are never split across
processes and 2 processes equal 1 on the same prompts and global batch; kill -9 while a
checkpoint is written, then --resume, equals an uninterrupted run.

The 2-process runs are `accelerate launch`es of ppo, grpo, rloo, reinforce-pp and
online-dpo (gloo on the CPU, as in test_distributed); their reward function logs which
process scored which prompt. The kill -9 harness is test_faults' (a child whose save of
checkpoint 4 hangs, killed there)."""

import importlib
import json
import os
import signal
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from helpers import write_review_prompts
from prefalign.algorithms.grpo import GRPOConfig
from prefalign.algorithms.onpolicy import OnPolicyTrainer, process_prompts
from prefalign.cli import main
from prefalign.generation_engine import HFEngine
from prefalign.train.checkpoint import list_checkpoints
from prefalign.train.metrics import read_metrics
from test_distributed import LAUNCH_TIMEOUT_S, ROOT, assert_same_history, free_port
from test_faults import STALLING_CLI, STEPS, assert_same_run, wait_for

# -- which process samples which prompt ------------------------------------------------------


def update_rows(procs, per_process_rows, window, g):
    """The global rows (prompt position, sample) of each update of a window, over `procs`
    processes that each read per_process_rows rows per update, in order."""
    shares = [[(k, j) for k in process_prompts(window, per_process_rows, g, procs, r)
               for j in range(g)] for r in range(procs)]
    updates = -(-len(shares[0]) // per_process_rows)
    return [sorted(row for rows in shares
                   for row in rows[u * per_process_rows : (u + 1) * per_process_rows])
            for u in range(updates)]


@pytest.mark.parametrize("g, per_process_rows, window", [
    (1, 2, 8), (2, 2, 8), (2, 4, 16), (4, 4, 8), (4, 8, 16), (3, 6, 12)])
def test_updates_read_the_same_rows_on_one_and_two_processes(g, per_process_rows, window):
    """G divides a process's update: 2 processes of B rows per update read, update by
    update, exactly the rows 1 process of 2B rows reads; every prompt's G rows on one
    process, as many prompts on each."""
    one = update_rows(1, 2 * per_process_rows, window, g)
    two = update_rows(2, per_process_rows, window, g)
    assert one == two
    shares = [process_prompts(window, per_process_rows, g, 2, r) for r in range(2)]
    assert len(shares[0]) == len(shares[1]) == window // 2
    assert sorted(shares[0] + shares[1]) == list(range(window))


def test_a_group_larger_than_an_update_stays_on_one_process():
    """G = 4 rows per prompt, 2 rows per update: each process takes a contiguous half."""
    assert process_prompts(6, 2, 4, 2, 0) == [0, 1, 2]
    assert process_prompts(6, 2, 4, 2, 1) == [3, 4, 5]


def rollout_trainer(model, tokenizer, procs, rank, batch_size):
    """The parts of an OnPolicyTrainer that _next_prompts and sample read, at step 5 of a
    run whose next window is 8 of 10 prompts in a shuffled order."""
    trainer = object.__new__(OnPolicyTrainer)
    trainer.config = GRPOConfig(model="m", data="d", reward_fn="x", batch_size=batch_size,
                                num_generations=2, max_new_tokens=5, seed=3)
    trainer.accelerator = SimpleNamespace(num_processes=procs, process_index=rank)
    trainer.algorithm = SimpleNamespace(samples_per_prompt=2)
    trainer.engine, trainer.global_step = HFEngine(model, tokenizer), 5
    trainer.train_features = [{"prompt": f"Review {i}: The film"} for i in range(10)]
    trainer._next_order = lambda: [7, 2, 9, 0, 4, 1, 8, 5]
    return trainer


def test_each_prompt_samples_the_same_on_one_and_two_processes(make_model, tokenizer):
    """Two processes at batch size 2 sample, prompt by prompt, the rows one process at
    batch size 4 samples (noise keyed by window position, not by process or batch); a
    prompt's G rows are consecutive on one process."""
    model = make_model("llama")
    one = rollout_trainer(model, tokenizer, 1, 0, 4)
    prompts, positions, ids = one._next_prompts()
    assert positions == list(range(8)) and ids == [7, 2, 9, 0, 4, 1, 8, 5]
    whole = one.sample(prompts, positions)
    seen = set()
    for rank in range(2):
        two = rollout_trainer(model, tokenizer, 2, rank, 2)
        prompts, positions, _ = two._next_prompts()
        share = two.sample(prompts, positions)
        assert len(share.rows) == 2 * len(positions) == 8
        for i, row in enumerate(share.rows):
            k = positions[i // 2]
            assert share.prompts[i] == whole.prompts[2 * k + i % 2]
            assert torch.equal(row["input_ids"], whole.rows[2 * k + i % 2]["input_ids"])
            assert share.texts[i] == whole.texts[2 * k + i % 2]
        seen.update(positions)
    assert seen == set(range(8))
    assert len({tuple(r["input_ids"].tolist()) for r in whole.rows[:2]}) == 2


# -- 2 processes against 1 -------------------------------------------------------------------

LOGGING_REWARD = '''\
"""letter_e, and a line per scored row naming the process that scored it."""
import importlib.util
import json
import os


def letter_e_logged(prompt, response):
    if "PROOF_LOG" in os.environ:
        with open(f"{os.environ['PROOF_LOG']}.{os.environ.get('RANK', '0')}", "a") as f:
            f.write(json.dumps(prompt) + "\\n")
    return response.count("e") / max(len(response), 1)
'''


# Each command with a reference (its KL knob at 0.1) and G = 2 samples per prompt (PPO: one,
# and one pass over each rollout: later passes shuffle each process's rows on their own).
TWO_PROCESS_FLAGS = {
    "grpo": ["--num-generations", "2", "--beta", "0.1"],
    "ppo": ["--ppo-epochs", "1", "--kl-coef", "0.1"],
    "rloo": ["--num-generations", "2", "--beta", "0.1"],
    "reinforce-pp": ["--num-generations", "2", "--kl-coef", "0.1"],
    "online-dpo": ["--beta", "0.1"],
}


def two_process_args(command, model_dir, data, out, batch_size):
    """3 iterations of 4 prompts x G = 2, LoRA, a reference at 0.1 (grpo's dapo: a token
    mean over each whole update, whatever the micro-batches)."""
    return [command, "--model", str(model_dir), "--data", data, "--output-dir", str(out),
            "--reward-fn", "proof_rewards:letter_e_logged", *TWO_PROCESS_FLAGS[command],
            "--batch-size", str(batch_size), "--grad-accum", "1",
            "--max-steps", "3", "--max-new-tokens", "6", "--temperature", "1.0",
            "--lora-r", "4", "--learning-rate", "5e-3", "--warmup-ratio", "0",
            "--lr-scheduler", "constant", "--logging-steps", "1", "--seed", "5"]


@pytest.mark.distributed
@pytest.mark.parametrize("command", sorted(TWO_PROCESS_FLAGS))
def test_two_processes_equal_one_and_keep_groups_whole(command, tmp_path, tiny_model_dir,
                                                       monkeypatch):
    """`accelerate launch` of 2 processes at batch_size 2 and one process at 4: the same
    metrics (1e-5) and final adapter; each prompt's G samples scored on one process."""
    data = write_review_prompts(tmp_path)
    (tmp_path / "proof_rewards.py").write_text(LOGGING_REWARD)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false", "PROOF_LOG": str(tmp_path / "scored"),
           "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               str(ROOT / "configs" / "accelerate" / "ddp_cpu.yaml"), "--main_process_port",
               str(free_port()), "-m", "prefalign",
               *two_process_args(command, tiny_model_dir, data, tmp_path / "two", 2)]
    try:
        done = subprocess.run(launch, env=env, capture_output=True, text=True,
                              timeout=LAUNCH_TIMEOUT_S)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"2-process {command} did not finish in {LAUNCH_TIMEOUT_S} s (a hang?): "
                    f"{(exc.stderr or '')[-3000:]}")
    assert done.returncode == 0, done.stderr[-6000:]

    monkeypatch.syspath_prepend(str(tmp_path))
    assert main(two_process_args(command, tiny_model_dir, data, tmp_path / "one", 4)) == 0
    one, two = (read_metrics(tmp_path / name / "metrics.jsonl") for name in ("one", "two"))
    assert [r["step"] for r in two] == [1, 2, 3]
    assert_same_history(one, two, sorted(set(one[0]) - {"elapsed_s"}))
    weights = "final/adapter_model.safetensors"
    a, b = (load_file(str(tmp_path / name / weights)) for name in ("one", "two"))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-5, rtol=1e-4, msg=key)

    scored = [[json.loads(line) for line in (tmp_path / f"scored.{r}").read_text().splitlines()]
              for r in range(2)]
    g = 1 if command == "ppo" else 2
    assert len(scored[0]) == len(scored[1]) == 3 * 2 * g  # steps x prompts x G per process
    assert not set(scored[0]) & set(scored[1])  # no prompt scored on both processes
    for rows in scored:
        assert all(rows.count(p) == g for p in rows)  # each prompt's G samples, together


# -- kill -9, then --resume, for every on-policy command -------------------------------------

SCORER = "length(min=1,max=6)"
# One entry per on-policy command: its flags besides the shared ones below.
COMMANDS = {
    "ppo": ["--reward-fn", SCORER, "--ppo-epochs", "2", "--target-kl", "1.0"],
    "grpo": ["--reward-fn", SCORER, "--num-generations", "2", "--beta", "0.1"],
    "rloo": ["--reward-fn", SCORER, "--num-generations", "2", "--beta", "0.1"],
    "reinforce-pp": ["--reward-fn", SCORER, "--num-generations", "2", "--kl-coef", "0.1"],
    "online-dpo": ["--reward-fn", SCORER, "--beta", "0.1"],
}


def on_policy_args(command, model_dir, data, out):
    """A 6-step LoRA run with a checkpoint every step (STEPS, as test_faults' DPO run)."""
    return [command, "--model", str(model_dir), "--data", data, "--output-dir", str(out),
            *COMMANDS[command], "--max-steps", str(STEPS), "--batch-size", "2",
            "--grad-accum", "1", "--max-new-tokens", "6", "--temperature", "1.0",
            "--lora-r", "4", "--learning-rate", "5e-3", "--warmup-ratio", "0",
            "--logging-steps", "1", "--save-steps", "1", "--save-total-limit", "2",
            "--seed", "7"]


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_kill_9_mid_checkpoint_then_resume_equals_uninterrupted(command, tmp_path,
                                                                tiny_model_dir, capsys):
    """SIGKILL while checkpoint 4 is half written; --resume continues from checkpoint 3
    and ends with the metrics (1e-6) and final adapter of the uninterrupted run: the
    rollouts after the resume sample exactly what they would have."""
    data = write_review_prompts(tmp_path)
    full = tmp_path / "full"
    assert main(on_policy_args(command, tiny_model_dir, data, full)) == 0
    reference = (read_metrics(full / "metrics.jsonl"),
                 load_file(str(full / "final" / "adapter_model.safetensors")))

    out = tmp_path / "out"
    ckpts = out / "checkpoints"
    env = {**os.environ, "STALL_AT": "4", "OMP_NUM_THREADS": str(torch.get_num_threads()),
           "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    with open(tmp_path / "child.log", "wb") as log:
        proc = subprocess.Popen([sys.executable, "-c", STALLING_CLI,
                                 *on_policy_args(command, tiny_model_dir, data, out)],
                                env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_for(lambda: any(ckpts.glob(".step-0000004-*/trainable.safetensors")), proc)
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert [p.name for p in list_checkpoints(ckpts)] == ["step-0000002", "step-0000003"]

    assert main([*on_policy_args(command, tiny_model_dir, data, out), "--resume"]) == 0
    assert f"resumed from {ckpts / 'step-0000003'} at step 3" in capsys.readouterr().out
    assert_same_run(out, reference)


def test_every_on_policy_command_is_proven():
    """A new on-policy command joins COMMANDS (its kill -9 proof) in one line."""
    from prefalign.algorithms.onpolicy import OnPolicyConfig
    from prefalign.cli import TRAINERS

    on_policy = set()
    for name, (module, config, *_rest) in TRAINERS.items():
        if issubclass(getattr(importlib.import_module(module), config), OnPolicyConfig):
            on_policy.add(name)
    assert on_policy == set(COMMANDS)
