"""Data parallelism on the CPU: 2 processes equal 1 process on the same global batch.

One `accelerate launch --config_file configs/accelerate/ddp_cpu.yaml` (gloo) runs every
2-process scenario in a row, since starting processes and importing torch is most of the
cost here; each test compares one scenario with 1-process runs made in this process,
batch_size 2B there for B per process, the same grad_accum. Data sizes are chosen so that
a window's last micro-batch has fewer rows than processes: one process then runs a
zero-weight stand-in, and the launch has a timeout in case that ever hangs.
"""

import json
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from accelerate.utils import DistributedType
from safetensors.torch import load_file

from helpers import preference_rows, write_jsonl
from prefalign.algorithms.dpo import DPOConfig, run_dpo
from prefalign.algorithms.kto import KTOConfig, run_kto
from prefalign.algorithms.reward import RewardConfig, run_reward
from prefalign.algorithms.sft import SFTConfig, run_sft
from prefalign.errors import PrefalignError
from prefalign.train import distributed
from prefalign.train.checkpoint import STATE_FILE, load_checkpoint
from prefalign.train.metrics import MetricWindow, read_metrics
from prefalign.train.window import split_window

ROOT = Path(__file__).parents[1]
LAUNCH_TIMEOUT_S = 300
CONFIGS = {"dpo": DPOConfig, "kto": KTOConfig, "reward": RewardConfig, "sft": SFTConfig}
RUNS = {"dpo": run_dpo, "kto": run_kto, "reward": run_reward, "sft": run_sft}

SCRIPT = '''\
"""Every process runs the scenarios of a JSON file in order: {name: [config, ...]}."""
import json
import sys
from pathlib import Path

import torch
from accelerate import PartialState

from prefalign.algorithms.dpo import DPOConfig, run_dpo
from prefalign.algorithms.kto import KTOConfig, run_kto
from prefalign.algorithms.ppo import PPOConfig, run_ppo
from prefalign.algorithms.reward import RewardConfig, run_reward
from prefalign.algorithms.sft import SFTConfig, run_sft

torch.set_num_threads(1)
RUNNERS = {"dpo": (DPOConfig, run_dpo), "kto": (KTOConfig, run_kto), "ppo": (PPOConfig, run_ppo),
           "reward": (RewardConfig, run_reward), "sft": (SFTConfig, run_sft)}
for name, runs in json.loads(Path(sys.argv[1]).read_text()).items():
    for config in runs:
        cls, run = RUNNERS[config.pop("kind")]
        result = run(cls(**config))
    record = {"history": result.history, "processes": PartialState().num_processes}
    Path(config["output_dir"], f"history-{PartialState().process_index}.json").write_text(
        json.dumps(record))
    print("done", name, flush=True)
'''

pytestmark = pytest.mark.distributed


def thumbs(n):
    return [{"prompt": p["prompt"], "completion": p["chosen" if i % 2 == 0 else "rejected"],
             "label": i % 2 == 0} for i, p in enumerate(preference_rows(n))]


def instructions(n):
    # Completions of unequal length: the token mean must not depend on how rows are shared.
    return [{"prompt": r["prompt"], "completion": r["chosen"] + " Yes." * (i % 3)}
            for i, r in enumerate(preference_rows(n))]


def scenarios(root: Path, model_dir: Path) -> dict[str, list[dict]]:
    """Per-process configs. 13 pairs at 8 per step: windows 8 and 5, the 5 cut into micro-
    batches of 4 and 1 (a stand-in); 9 rows at 4 per step: windows 4, 4, 1 (a stand-in)."""
    def data(name, rows):
        return write_jsonl(root / f"{name}.jsonl", rows)

    common = dict(model=str(model_dir), learning_rate=1e-3, lora_r=4, lora_dropout=0.0,
                  logging_steps=1, warmup_ratio=0.0, seed=7, batch_size=2, grad_accum=1)
    pairs9 = data("pairs9", preference_rows(9, seed=1))
    return {
        "dpo": [dict(common, kind="dpo", data=data("pairs13", preference_rows(13)),
                     eval_data=data("pairs5", preference_rows(5, seed=2)), grad_accum=2,
                     epochs=2, eval_steps=2)],
        "dpo_full_precompute": [dict(common, kind="dpo", data=pairs9, lora_r=0,
                                     learning_rate=1e-4, precompute_ref=True)],
        "reward": [dict(common, kind="reward", data=pairs9)],
        "kto": [dict(common, kind="kto", data=data("thumbs9", thumbs(9)))],
        "sft": [dict(common, kind="sft", data=data("sft9", instructions(9)))],
        # Dropout on (DPO switches it off by default): a resumed run must restore each
        # process's own RNG state.
        "resume_full": [dict(common, kind="dpo", data=data("pairs24", preference_rows(24)),
                             lora_dropout=0.1, disable_dropout=False, lr_scheduler="constant",
                             max_steps=4, save_steps=2)],
        "resume": [dict(common, kind="dpo", data=str(root / "pairs24.jsonl"), lora_dropout=0.1,
                        disable_dropout=False, lr_scheduler="constant", max_steps=2,
                        save_steps=2),
                   dict(common, kind="dpo", data=str(root / "pairs24.jsonl"), lora_dropout=0.1,
                        disable_dropout=False, lr_scheduler="constant", max_steps=4,
                        save_steps=2, resume=True)],
        # 5 prompts at 4 per step: the second window (1 prompt) is topped up to 2.
        "ppo": [dict(common, kind="ppo", data=data("prompts5", [{"prompt": f"Review {i}:"}
                                                                  for i in range(5)]),
                     reward_fn="length(min=1,max=6)", max_steps=2, max_new_tokens=4,
                     ppo_epochs=2, temperature=1.0, target_kl=1.0, whiten_rewards=True)],
    }


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def launched(tmp_path_factory, tiny_model_dir):
    """Runs every scenario under 2 processes once -> (root, scenarios)."""
    root = tmp_path_factory.mktemp("distributed")
    plan = scenarios(root, tiny_model_dir)
    for name, runs in plan.items():
        for config in runs:
            config["output_dir"] = str(root / "two" / name)
    (root / "plan.json").write_text(json.dumps(plan))
    (root / "run.py").write_text(SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               str(ROOT / "configs" / "accelerate" / "ddp_cpu.yaml"), "--main_process_port",
               str(free_port()), str(root / "run.py"), str(root / "plan.json")]
    try:
        done = subprocess.run(command, env=env, capture_output=True, text=True,
                              timeout=LAUNCH_TIMEOUT_S)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"2-process runs did not finish in {LAUNCH_TIMEOUT_S} s (a hang?): "
                    f"{(exc.stdout or '')[-2000:]}{(exc.stderr or '')[-3000:]}")
    if done.returncode != 0:
        pytest.fail(f"2-process runs failed:\n{done.stdout[-2000:]}\n{done.stderr[-6000:]}")
    return root, plan


def two_process(launched, name):
    root, _ = launched
    records = [json.loads((root / "two" / name / f"history-{r}.json").read_text())
               for r in range(2)]
    assert [r["processes"] for r in records] == [2, 2]
    histories = [[{k: v for k, v in step.items() if k != "elapsed_s"} for step in r["history"]]
                 for r in records]
    assert histories[0] == histories[1]  # metrics are reduced: every process sees the same
    return histories[0], root / "two" / name


def one_process(launched, name, tmp_path, **overrides):
    """The scenario on one process with twice the per-process batch: the same global batch."""
    _, plan = launched
    (config,) = [dict(c) for c in plan[name]]
    kind = config.pop("kind")
    config.update(output_dir=str(tmp_path / name), batch_size=2 * config["batch_size"],
                  **overrides)
    return RUNS[kind](CONFIGS[kind](**config)).history, tmp_path / name


def assert_same_history(one, two, keys, abs_tol=1e-5):
    assert [r["step"] for r in one] == [r["step"] for r in two]
    for a, b in zip(one, two):
        for key in keys:
            if key in a or key in b:
                assert a[key] == pytest.approx(b[key], abs=abs_tol, rel=1e-6), (a["step"], key)


def assert_same_weights(a: dict, b: dict, atol=1e-5):
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=atol, rtol=1e-4, msg=key)


# -- 2 processes against 1 -------------------------------------------------------------


def test_dpo_two_processes_equal_one(launched, tmp_path):
    """LoRA DPO, an uneven last window, evaluation with shards of 3 and 2 pairs."""
    two, out2 = two_process(launched, "dpo")
    one, out1 = one_process(launched, "dpo", tmp_path)
    assert [r["step"] for r in two if "eval/loss" in r] == [2, 4]
    assert_same_history(one, two, ("loss", "rewards/margins", "rewards/accuracies",
                                   "logps/chosen", "grad_norm", "epoch", "eval/loss",
                                   "eval/rewards/margins"))
    weights = "final/adapter_model.safetensors"
    assert_same_weights(load_file(str(out1 / weights)), load_file(str(out2 / weights)))
    assert [r["step"] for r in read_metrics(out2 / "metrics.jsonl")] == [1, 2, 3, 4]


def test_full_finetuning_with_precomputed_reference(launched, tmp_path):
    """The reference log-probs are computed half on each process, cached by the main one."""
    two, out2 = two_process(launched, "dpo_full_precompute")
    one, out1 = one_process(launched, "dpo_full_precompute", tmp_path)
    assert len(list((out2 / "cache").glob("ref_logps-*.safetensors"))) == 1
    cached = load_file(str(next((out2 / "cache").glob("*.safetensors"))))["logps"]
    expected = load_file(str(next((out1 / "cache").glob("*.safetensors"))))["logps"]
    torch.testing.assert_close(cached, expected, atol=1e-5, rtol=0)
    assert_same_history(one, two, ("loss", "rewards/margins", "grad_norm"))
    weights = "final/model.safetensors"
    assert_same_weights(load_file(str(out1 / weights)), load_file(str(out2 / weights)))


def test_reward_two_processes_equal_one(launched, tmp_path):
    two, out2 = two_process(launched, "reward")
    one, out1 = one_process(launched, "reward", tmp_path)
    assert len(two) == 3
    assert_same_history(one, two, ("loss", "accuracy", "margin", "rewards/chosen", "grad_norm"))
    weights = "final/model.safetensors"
    assert_same_weights(load_file(str(out1 / weights)), load_file(str(out2 / weights)))


def test_sft_token_mean_two_processes_equal_one(launched, tmp_path):
    two, out2 = two_process(launched, "sft")
    one, out1 = one_process(launched, "sft", tmp_path)
    assert_same_history(one, two, ("loss", "token_accuracy", "perplexity", "grad_norm"))
    weights = "final/adapter_model.safetensors"
    assert_same_weights(load_file(str(out1 / weights)), load_file(str(out2 / weights)))


def test_kto_two_processes_complete(launched, tmp_path):
    """z0 gathers both processes' KL rows, but each process pairs completions within its own
    share, so the runs agree exactly while z0 is 0 (the first step: policy == reference)."""
    two, _ = two_process(launched, "kto")
    one, _ = one_process(launched, "kto", tmp_path, max_steps=1)
    assert len(two) == 3 and all(torch.isfinite(torch.tensor(r["loss"])) for r in two)
    assert two[0]["kl"] == pytest.approx(0.0, abs=1e-6) and one[0]["kl"] == pytest.approx(0.0, abs=1e-6)
    assert_same_history(one[:1], two[:1], ("loss", "rewards/chosen", "rewards/rejected"))


def test_resume_under_two_processes_equals_uninterrupted(launched):
    """Stopped by max_steps after step 2, resumed to step 4: the same weights and metrics."""
    full, out_full = two_process(launched, "resume_full")
    resumed, out = two_process(launched, "resume")
    checkpoint = out / "checkpoints" / "step-0000002"
    assert {"rng.pt", "rng-1.pt", "trainable.safetensors"} <= {p.name for p in checkpoint.iterdir()}
    assert json.loads((checkpoint / STATE_FILE).read_text())["format"] == "safetensors"
    weights = "final/adapter_model.safetensors"
    assert_same_weights(load_file(str(out_full / weights)), load_file(str(out / weights)), atol=0)
    records = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert_same_history(read_metrics(out_full / "metrics.jsonl"), records,
                        ("loss", "rewards/margins", "grad_norm", "lr"), abs_tol=1e-6)


def test_ppo_two_processes_complete(launched):
    """Rollouts per process, global whitening and KL control, a topped-up last window."""
    history, out = two_process(launched, "ppo")
    assert [r["step"] for r in history] == [1, 2]
    for key in ("objective/scores", "objective/kl", "kl_coef", "policy/approxkl", "loss"):
        assert all(torch.isfinite(torch.tensor(float(r[key]))) for r in history), key
    assert history[1]["kl_coef"] != history[0]["kl_coef"]  # the controller saw the global KL
    assert (out / "final" / "value_head.safetensors").is_file()


# -- pieces, without launching -----------------------------------------------------------


def test_split_window_shares_differ_by_one_row_and_empty_ones_only_at_the_tail():
    assert split_window(list(range(5)), batch_size=2, procs=4) == [[[0, 1], [2], [3], [4]]]
    assert split_window(list(range(11)), batch_size=2, procs=4) == [
        [[0, 1], [2, 3], [4, 5], [6, 7]], [[8], [9], [10], []]]


def test_metric_window_reduce_sums_every_process():
    """Process 0: loss 1.0 on 3 rows; process 1: loss 4.0 on 1 row, and a metric only it saw.
    Global mean loss = (3 * 1 + 1 * 4) / 4 = 1.75, the same on both."""
    windows = [MetricWindow(), MetricWindow()]
    windows[0].add({"loss": torch.tensor(1.0)}, weight=3)
    windows[1].add({"loss": torch.tensor(4.0), "rewards/chosen": 2.0}, weight=1)
    slots, barrier = [None, None], threading.Barrier(2)

    def all_gather(rank):  # what gather_object does across processes, across two threads
        def gather(obj):
            slots[rank] = obj
            barrier.wait()
            return list(slots)
        return gather

    threads = [threading.Thread(target=w.reduce, args=(all_gather(r),))
               for r, w in enumerate(windows)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=10)
    for window in windows:
        assert window.means() == pytest.approx({"loss": 1.75, "rewards/chosen": 2.0})


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_meta_copy_holds_whole_weights_after_loading_a_state_dict(make_model, arch):
    """What the main process does with gathered FSDP / ZeRO-3 weights for the artifact."""
    model = make_model(arch)
    shell = distributed.meta_copy(model)
    assert all(p.device.type == "meta" for p in shell.parameters())
    whole = distributed._materialize(shell)
    whole.load_state_dict(model.state_dict())
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert (whole.get_output_embeddings().weight is whole.get_input_embeddings().weight) == tied
    ids = torch.tensor([[5, 6, 7, 8]])
    torch.testing.assert_close(whole(ids).logits, model(ids).logits, atol=0, rtol=0)


def fake_accelerator(kind, stage=None, processes=2):
    plugin = SimpleNamespace(zero_stage=stage)
    return SimpleNamespace(distributed_type=kind, num_processes=processes, is_fsdp2=False,
                           state=SimpleNamespace(deepspeed_plugin=plugin))


@pytest.mark.parametrize("kind, stage, name, states, params", [
    (DistributedType.NO, None, "single", False, False),
    (DistributedType.MULTI_GPU, None, "ddp", False, False),
    (DistributedType.FSDP, None, "fsdp", True, True),
    (DistributedType.DEEPSPEED, 2, "deepspeed-zero2", True, False),
    (DistributedType.DEEPSPEED, 3, "deepspeed-zero3", True, True),
])
def test_engine_decides_checkpoint_format_and_gathering(kind, stage, name, states, params):
    acc = fake_accelerator(kind, stage, processes=1 if name == "single" else 2)
    assert distributed.engine_name(acc) == name
    assert distributed.sharded_states(acc) is states  # accelerate save_state checkpoints
    assert distributed.shards_parameters(acc) is params  # weights gathered for the artifact


def test_checkpoint_of_another_engine_is_refused(tmp_path):
    (tmp_path / STATE_FILE).write_text(json.dumps({"step": 2, "format": "accelerate"}))
    with pytest.raises(PrefalignError, match="FSDP or DeepSpeed.*one process or DDP"):
        load_checkpoint(tmp_path, torch.nn.Linear(2, 2), None, None)


def test_cpu_only_launch_asks_accelerate_for_gloo(monkeypatch):
    monkeypatch.setattr(distributed, "has_accelerator_device", lambda: False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert distributed.cpu_only_launch()
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert not distributed.cpu_only_launch()


@pytest.mark.parametrize("name", sorted(p.name for p in (ROOT / "configs" / "accelerate").iterdir()))
def test_shipped_accelerate_configs_load(name):
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(ROOT / "configs" / "accelerate" / name))
    assert config.num_processes == 2 and config.mixed_precision in ("no", "bf16")


class ThreadedAccelerator:
    """Two 'processes' as two threads: reduce sums a tensor over both, as all_reduce does."""

    slots: list = [None, None]
    barrier = threading.Barrier(2)

    def __init__(self, rank):
        self.process_index, self.num_processes, self.device = rank, 2, torch.device("cpu")

    def reduce(self, tensor, reduction="sum"):
        self.slots[self.process_index] = tensor.clone()
        self.barrier.wait()
        total = self.slots[0] + self.slots[1]
        self.barrier.wait()  # both have read before either writes its next value
        return total


def test_ppo_whitening_uses_every_process_rollouts():
    """Advantages whitened per process with global statistics equal one process whitening
    all rollouts: rows 0-1 on process 0, rows 2-4 on process 1, ragged masks."""
    from prefalign.algorithms.ppo import PPO, PPOConfig
    from prefalign.masked import masked_whiten

    x = torch.randn(5, 6, generator=torch.Generator().manual_seed(0))
    mask = torch.rand(5, 6, generator=torch.Generator().manual_seed(1)) > 0.3
    parts, out = [(x[:2], mask[:2]), (x[2:], mask[2:])], [None, None]

    def run(rank):
        ppo = PPO(PPOConfig(model="m", data="d", reward_fn="x"), 0, ThreadedAccelerator(rank))
        out[rank] = masked_whiten(*parts[rank], reduce=ppo.sum_across)

    threads = [threading.Thread(target=run, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=10)
    torch.testing.assert_close(torch.cat(out), masked_whiten(x, mask), atol=1e-6, rtol=1e-5)
