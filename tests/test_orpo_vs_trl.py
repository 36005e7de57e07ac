"""prefalign's ORPO against TRL's ORPOTrainer on the same tiny model and batch (fp32): the
loss (NLL of prompt + chosen tokens plus the odds-ratio term), rewards, log-odds metrics,
nll_loss and gradients; `nll_tokens: completion` keeps the NLL on completion tokens only."""

import copy
import tempfile
import warnings

import pytest
import torch

from helpers import preference_rows
from prefalign.algorithms.dpo import DPO, DPOConfig
from prefalign.config import build_config
from prefalign.data import collate_preferences, load_preferences
from prefalign.errors import ConfigError
from prefalign.logprobs import LogpsModel

pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")
orpo = pytest.importorskip("trl.experimental.orpo")

BETA = 0.25
METRICS = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
           "nll_loss", "log_odds_ratio", "log_odds_chosen")


def trl_trainer(model, rows, tokenizer):
    args = orpo.ORPOConfig(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=len(rows),
                           report_to="none", beta=BETA, use_cpu=True, bf16=False, seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return orpo.ORPOTrainer(model=model, args=args, processing_class=tokenizer,
                                train_dataset=datasets.Dataset.from_list(rows))


def trl_batch(batch):
    """collate_preferences' (2B, T) batch in ORPOTrainer's chosen_* / rejected_* keys;
    labels are -100 except on completion tokens, as its tokenize_row makes them."""
    half = batch["input_ids"].shape[0] // 2
    labels = torch.where(batch["completion_mask"].bool(), batch["input_ids"], -100)
    out = {}
    for name, rows in (("chosen", slice(None, half)), ("rejected", slice(half, None))):
        out[f"{name}_input_ids"] = batch["input_ids"][rows]
        out[f"{name}_attention_mask"] = batch["attention_mask"][rows]
        out[f"{name}_labels"] = labels[rows]
    return out


def ours(model, features, tokenizer, **options):
    config = DPOConfig(model="x", data="x", loss_type="orpo", beta=BETA, lora_r=0, **options)
    dpo = DPO(config, tokenizer.pad_token_id, None)
    batch = dpo.collate(features)
    loss, metrics = dpo.compute_loss(LogpsModel(model), batch)
    loss.backward()
    return loss, metrics, batch


@pytest.fixture(params=["llama", "gpt2"])
def setup(request, make_model, tokenizer):
    rows = preference_rows(5, seed=3)
    features, _ = load_preferences(rows, tokenizer)
    model = make_model(request.param, seed=2).train()
    for module in model.modules():  # as ORPOConfig.disable_dropout does to TRL's copy
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    return model, rows, features, tokenizer


def test_loss_metrics_and_gradients_equal_trl_orpo(setup):
    model, rows, features, tokenizer = setup
    trainer = trl_trainer(copy.deepcopy(model), rows, tokenizer)
    theirs_model = trainer.model.train()
    batch = collate_preferences(features, tokenizer.pad_token_id)
    trl_loss = trainer.compute_loss(theirs_model, trl_batch(batch))
    trl_loss.backward()
    trl_metrics = {k: v[-1] for k, v in trainer._stored_metrics["train"].items()}

    loss, metrics, _ = ours(model, features, tokenizer)
    assert loss.item() == pytest.approx(trl_loss.item(), abs=1e-5)
    for name in METRICS:
        assert float(metrics[name]) == pytest.approx(trl_metrics[name], abs=1e-5), name
    for (name, p), theirs in zip(model.named_parameters(), theirs_model.parameters()):
        torch.testing.assert_close(p.grad, theirs.grad, atol=1e-5, rtol=1e-4, msg=name)


def test_nll_covers_prompt_and_chosen_tokens(make_model, tokenizer):
    """Hand check of the NLL term: every token of the chosen sequences after the first,
    prompt included, averaged over the batch; completion-only on request."""
    rows = preference_rows(4, seed=5)
    features, _ = load_preferences(rows, tokenizer)
    model = make_model("llama", seed=4)
    batch = collate_preferences(features, tokenizer.pad_token_id)
    half = len(features)
    ids, attn = batch["input_ids"][:half], batch["attention_mask"][:half]
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=attn).logits.float()
    token_logps = logits[:, :-1].log_softmax(-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    every = attn[:, 1:].bool()
    completion = batch["completion_mask"][:half, 1:].bool()
    assert (every & ~completion).any()  # prompts add tokens: the two NLLs differ

    _, sequence, _ = ours(copy.deepcopy(model), features, tokenizer)
    _, only, _ = ours(copy.deepcopy(model), features, tokenizer, nll_tokens="completion")
    _, auto_seq, _ = ours(copy.deepcopy(model), features, tokenizer, nll_tokens="sequence")
    expected = -token_logps[every].mean()
    assert float(sequence["nll_loss"]) == pytest.approx(float(expected), abs=1e-5)
    assert float(auto_seq["nll_loss"]) == pytest.approx(float(expected), abs=1e-5)
    assert float(only["nll_loss"]) == pytest.approx(float(-token_logps[completion].mean()),
                                                     abs=1e-5)
    # The odds-ratio term reads completion tokens only, whatever the NLL covers.
    for name in ("rewards/chosen", "rewards/rejected", "log_odds_chosen", "logps/chosen",
                 "logits/chosen"):
        assert float(sequence[name]) == pytest.approx(float(only[name]), abs=1e-6), name


def test_prefix_sharing_gives_the_same_orpo_numbers(make_model, tokenizer):
    rows = preference_rows(4, seed=6)
    features, _ = load_preferences(rows, tokenizer)
    model = make_model("llama", seed=1)
    plain, shared = copy.deepcopy(model), copy.deepcopy(model)
    loss_a, metrics_a, _ = ours(plain, features, tokenizer)
    loss_b, metrics_b, batch = ours(shared, features, tokenizer, prefix_sharing=True)
    assert any(key.startswith("packed_") for key in batch)
    assert loss_b.item() == pytest.approx(loss_a.item(), abs=1e-5)
    assert float(metrics_b["nll_loss"]) == pytest.approx(float(metrics_a["nll_loss"]), abs=1e-5)
    for p, q in zip(plain.parameters(), shared.parameters()):
        torch.testing.assert_close(q.grad, p.grad, atol=1e-5, rtol=1e-4)


def test_nll_tokens_without_an_nll_term_is_refused():
    with pytest.raises(ConfigError, match="nll_tokens.*no effect"):
        build_config(DPOConfig, {"model": "x", "data": "x", "nll_tokens": "sequence"})
    config = build_config(DPOConfig, {"model": "x", "data": "x", "rpo_alpha": 0.5,
                                      "nll_tokens": "sequence"})
    assert config.nll_covers_prompt
    assert not build_config(DPOConfig, {"model": "x", "data": "x", "rpo_alpha": 0.5}
                            ).nll_covers_prompt
