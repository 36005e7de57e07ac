"""The faster paths give the plain path's numbers: top-1 from the scored chunks, chunked
memory that does not grow with the vocabulary, prefix sharing, packing, length grouping,
quantized loading (GPU only; its CPU error here)."""

import dataclasses
import random

import pytest
import torch

from helpers import preference_rows, write_jsonl
from prefalign.algorithms.dpo import DPO, DPOConfig, run_dpo
from prefalign.algorithms.reference import AdaptersOff, FrozenCopy
from prefalign.algorithms.sft import SFT, SFTConfig, TopOneLogpsModel, run_sft
from prefalign.data import collate_preferences
from prefalign.errors import PrefalignError
from prefalign.logprobs import LogpsModel, completion_logps
from prefalign.lora import apply_lora, lora_layers
from prefalign.models import load_causal_lm, quantization_config
from prefalign.packing import PackedInputs, custom_mask_problem, pack_rows, share_prefix
from prefalign.train.batching import feature_length, length_grouped_order
from test_logprobs import make_batch, naive
from test_sft import instruction_rows


def random_pairs(n, seed=0, vocab=500):
    """Pairs with prompts of 2-6 tokens and completions of 1-7, so rows pad unevenly."""
    rng = random.Random(seed)
    ids = lambda k: [rng.randint(3, vocab - 1) for _ in range(k)]  # noqa: E731
    return [{"prompt_input_ids": ids(rng.randint(2, 6)), "chosen_input_ids": ids(rng.randint(1, 7)),
             "rejected_input_ids": ids(rng.randint(1, 7))} for _ in range(n)]


def grads(model):
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


# ---------------------------------------------------------------- top-1 and the chunked head


@pytest.mark.parametrize("chunk_size", [None, 4])
def test_top1_equals_argmax_of_full_logits(make_model, chunk_size):
    model = make_model("llama")
    ids, attn, comp = make_batch(model.config.vocab_size)
    ref, logits = naive(model, ids, attn, comp)
    expected = torch.nn.functional.pad(logits[:, :-1].argmax(-1) == ids[:, 1:], (1, 0))
    for path in ("plain", "fallback"):
        if path == "fallback":
            model.config.logit_scale = 2.0  # ignored by Llama; routes to the model's own logits
        out = completion_logps(model, ids, attn, comp, chunk_size=chunk_size, top1=True)
        assert torch.equal(out.top1, expected & out.mask), path
        torch.testing.assert_close(out.token_logps, ref, atol=1e-5, rtol=0)


def saved_for_backward(model, batch, chunk_size):
    """Bytes of the non-parameter tensors autograd keeps between forward and backward."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            kept[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = completion_logps(model, *batch, chunk_size=chunk_size, stats=True, top1=True)
    out.logps.sum().backward()
    return sum(kept.values())


def test_chunked_memory_for_backward_does_not_grow_with_vocabulary(tokenizer):
    """Vocabulary 32k -> 150k, 30 scored tokens: unchunked keeps the (30, V) fp32 logits
    (and their softmax) for backward, at least 30 * 118k * 4 B = 14 MB more; chunked keeps
    no tensor that scales with V (each chunk's logits are rebuilt in backward)."""
    from prefalign.tiny import build_model

    batch = make_batch(500, lengths=(12, 12, 12), prompt=2)
    kept = {}
    for vocab in (32_000, 150_000):
        for chunk in (None, 8):
            model = build_model(tokenizer, hidden_size=16, num_layers=1, num_heads=2,
                                vocab_size=vocab).train()
            kept[vocab, chunk] = saved_for_backward(model, batch, chunk)
    assert kept[150_000, 8] == kept[32_000, 8]
    assert kept[150_000, None] - kept[32_000, None] >= 30 * 118_000 * 4


def test_bf16_autocast_chunked_equals_unchunked(make_model):
    """Under CPU bf16 autocast the chunked values equal the unchunked ones; the weight
    gradients differ only by bf16 rounding of per-chunk partial sums (~1 ulp = 2^-8 rel.)."""
    ids, attn, comp = make_batch(512, lengths=(12, 9, 12), prompt=4)
    results = []
    for chunk in (None, 5):
        model = make_model("llama")
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = completion_logps(model, ids, attn, comp, chunk_size=chunk, stats=True, top1=True)
        out.logps.sum().backward()
        results.append((out.token_logps.detach(), out.top1, grads(model)))
    (v0, t0, g0), (v1, t1, g1) = results
    torch.testing.assert_close(v1, v0, atol=1e-5, rtol=0)
    assert torch.equal(t0, t1)
    assert (g1 - g0).abs().max() <= 2**-7 * g0.abs().max()


# ---------------------------------------------------------------- prefix sharing


@pytest.mark.parametrize("arch, impl, chunk, frozen", [
    ("llama", "sdpa", None, False), ("llama", "eager", 3, False), ("qwen2", "sdpa", None, True),
    ("gpt2", "sdpa", 3, False), ("gpt2", "eager", None, True)])
def test_prefix_sharing_equals_concatenated(make_model, arch, impl, chunk, frozen):
    """Log-probs (1e-5), DPO loss and gradients of [prompt | chosen | rejected] rows equal
    the two padded rows per pair, with a LoRA policy whose reference is the same model with
    adapters disabled, or a frozen copy of the starting model; chunked LM head or not."""
    features = random_pairs(4, seed=1)
    config = DPOConfig(model="m", data="d", rpo_alpha=0.5)
    plain_batch = collate_preferences(features, 0)
    shared_batch = dataclasses.replace(plain_batch, packed=PackedInputs.from_keys(
        share_prefix(features, 0, plain_batch.input_ids.shape[1])))
    results = []
    for batch in (plain_batch, shared_batch):
        model = make_model(arch, attn_implementation=impl)
        apply_lora(model, r=4, alpha=8)
        torch.manual_seed(3)
        for layer in lora_layers(model).values():  # B != 0: policy and reference differ
            torch.nn.init.normal_(layer.lora_B.weight, std=0.1)
        policy = LogpsModel(model.eval(), chunk_size=chunk)  # eval: no dropout (GPT-2 has some)
        out = policy(batch["input_ids"], batch["attention_mask"], batch["completion_mask"],
                     stats=True, **batch.packed_kwargs())
        reference = (FrozenCopy(make_model(arch, attn_implementation=impl, seed=1),
                                chunk_size=chunk) if frozen else AdaptersOff())
        loss, metrics = DPO(config, 0, reference).compute_loss(policy, batch)
        loss.backward()
        results.append((out, loss, metrics, grads(model)))
    (a, loss_a, m_a, g_a), (b, loss_b, m_b, g_b) = results
    torch.testing.assert_close(b.logps, a.logps, atol=1e-5, rtol=0)
    torch.testing.assert_close(b.token_logps, a.token_logps, atol=1e-5, rtol=0)
    torch.testing.assert_close(b.mean_logits, a.mean_logits, atol=1e-5, rtol=0)
    assert abs(loss_a.item() - loss_b.item()) < 1e-6
    assert m_a["rewards/margins"] != 0
    for key in m_a:
        assert float(m_b[key]) == pytest.approx(float(m_a[key]), abs=1e-5), key
    torch.testing.assert_close(g_b, g_a, atol=1e-5, rtol=1e-4)


def test_prefix_sharing_layout_by_hand():
    """Pair: prompt [5, 6], chosen [7], rejected [8, 9] -> row [5, 6, 7, 8, 9],
    positions [0, 1, 2, 2, 3]; token 8 (col 3) sees 5, 6 and itself, not 7.
    Scored layout (collate_preferences): chosen row [5, 6, 7, pad], rejected [5, 6, 8, 9].
    Token 7 (chosen col 2) is predicted from position 1; 8 (rejected col 2) from position 1
    too; 9 (rejected col 3) from position 3 (the 8)."""
    f = [{"prompt_input_ids": [5, 6], "chosen_input_ids": [7], "rejected_input_ids": [8, 9]}]
    shared = share_prefix(f, 0, 4)
    assert shared["packed_input_ids"].tolist() == [[5, 6, 7, 8, 9]]
    assert shared["packed_position_ids"].tolist() == [[0, 1, 2, 2, 3]]
    assert shared["packed_attention_mask"][0, 0, 3].tolist() == [True, True, False, True, False]
    assert shared["packed_attention_mask"][0, 0, 4].tolist() == [True, True, False, True, True]
    source = shared["packed_source"]
    assert (source[0, 2].item(), source[1, 2].item(), source[1, 3].item()) == (1, 1, 3)


def test_unsupported_attention_falls_back(make_model):
    model = make_model("llama")
    assert custom_mask_problem(model) is None
    model.config._attn_implementation = "flash_attention_2"
    assert "flash_attention_2" in custom_mask_problem(model)
    sliding = make_model("qwen2", use_sliding_window=True, sliding_window=4, layer_types=None)
    assert "sliding" in custom_mask_problem(sliding)


def test_prefix_sharing_run_equals_plain_run(tmp_path, tiny_model_dir):
    """Three DPO steps through the loop, live LoRA reference and precomputed reference."""
    data = write_jsonl(tmp_path / "prefs.jsonl", preference_rows(8))
    for precompute in (False, True):
        runs = []
        for sharing in (False, True):
            out = tmp_path / f"{precompute}-{sharing}"
            runs.append(run_dpo(DPOConfig(
                model=str(tiny_model_dir), data=data, output_dir=str(out), batch_size=4,
                grad_accum=1, max_steps=3, learning_rate=1e-2, lora_r=4, lora_dropout=0.0,
                logging_steps=1, warmup_ratio=0.0, seed=7, precompute_ref=precompute,
                prefix_sharing=sharing)))
        assert abs(runs[0].history[-1]["loss"] - 0.6931) > 1e-3  # the policy moved
        for ra, rb in zip(*(r.history for r in runs), strict=True):
            for key in ("loss", "rewards/margins", "logps/chosen", "logps/rejected", "grad_norm"):
                assert rb[key] == pytest.approx(ra[key], abs=1e-5), (precompute, key)


# ---------------------------------------------------------------- packing


def test_pack_rows_first_fit():
    """Lengths [5, 3, 4, 2, 6] into rows of 8: 5+3 | 4+2 | 6 (first fit, in order)."""
    assert pack_rows([5, 3, 4, 2, 6], 8) == [[0, 1], [2, 3], [4]]
    assert pack_rows([9, 1], 8) == [[0], [1]]  # too long: a row of its own, full


@pytest.mark.parametrize("only", [True, False])
def test_packed_sft_equals_padded(make_model, only):
    """SFT loss, token accuracy and gradients: packed rows == padded rows."""
    rng = random.Random(2)
    features = [{"prompt_input_ids": [rng.randint(3, 400) for _ in range(rng.randint(1, 5))],
                 "completion_input_ids": [rng.randint(3, 400) for _ in range(n)],
                 "completion_mask": [1] * n} for n in (3, 7, 2, 5, 4, 6)]
    features[1]["completion_mask"][2:4] = [0, 0]  # a user turn inside
    results = []
    for packing in (False, True):
        sft = SFT(SFTConfig(model="m", data="d", completion_only_loss=only, packing=packing,
                            max_length=16), pad_token_id=0)
        batch = sft.collate(features)
        model = make_model("llama")
        loss, metrics = sft.compute_loss(TopOneLogpsModel(model.train(), chunk_size=5), batch)
        loss.backward()
        results.append((batch["input_ids"].shape, loss, metrics["token_accuracy"], grads(model)))
    (shape_a, loss_a, acc_a, g_a), (shape_b, loss_b, acc_b, g_b) = results
    assert shape_b[0] < shape_a[0]  # fewer rows
    assert abs(loss_a.item() - loss_b.item()) < 1e-5
    assert acc_a.item() == pytest.approx(acc_b.item(), abs=1e-6)
    torch.testing.assert_close(g_b, g_a, atol=1e-5, rtol=1e-4)


def test_packed_sft_run_equals_padded_run(tmp_path, tiny_model_dir):
    """Three SFT steps through the loop (8 examples per step, max_length 64)."""
    data = write_jsonl(tmp_path / "sft.jsonl", instruction_rows(24))
    runs = [run_sft(SFTConfig(model=str(tiny_model_dir), data=data, max_length=64,
                              output_dir=str(tmp_path / str(packing)), batch_size=8, grad_accum=1,
                              max_steps=3, learning_rate=1e-2, lora_r=4, lora_dropout=0.0,
                              logging_steps=1, warmup_ratio=0.0, seed=7, packing=packing))
            for packing in (False, True)]
    for ra, rb in zip(*(r.history for r in runs), strict=True):
        for key in ("loss", "token_accuracy", "grad_norm"):
            assert rb[key] == pytest.approx(ra[key], abs=1e-5), key


# ---------------------------------------------------------------- length grouping


def test_length_grouped_order_is_a_deterministic_permutation_with_less_padding():
    rng = random.Random(0)
    lengths = [rng.randint(5, 300) for _ in range(403)]
    order = length_grouped_order(lengths, seed=1, epoch=2, group_size=8, megabatch_groups=10)
    assert sorted(order) == list(range(403))
    assert order == length_grouped_order(lengths, seed=1, epoch=2, group_size=8,
                                         megabatch_groups=10)
    assert order != length_grouped_order(lengths, seed=1, epoch=3, group_size=8,
                                         megabatch_groups=10)

    def padded(o):
        return sum(len(o[i:i + 8]) * max(lengths[j] for j in o[i:i + 8])
                   for i in range(0, len(o), 8))

    shuffled = torch.randperm(403, generator=torch.Generator().manual_seed(0)).tolist()
    assert padded(order) < 0.75 * padded(shuffled)
    pair = {"prompt_input_ids": [1] * 3, "chosen_input_ids": [1] * 5, "rejected_input_ids": [1] * 2}
    assert feature_length(pair) == 8


# ---------------------------------------------------------------- quantized base weights


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a CPU machine")
def test_quantized_loading_says_what_is_missing(tiny_model_dir):
    for kind in ("4bit", "8bit"):
        with pytest.raises(PrefalignError, match=f"--load-in-{kind} needs .*(bitsandbytes|CUDA)"):
            quantization_config(kind)
        with pytest.raises(PrefalignError, match="bitsandbytes|CUDA"):
            load_causal_lm(str(tiny_model_dir), quantization=kind)
    with pytest.raises(Exception, match="load_in_4bit"):
        DPOConfig(model="m", data="d", load_in_4bit=True, load_in_8bit=True).validate()
    with pytest.raises(Exception, match="lora_r"):
        DPOConfig(model="m", data="d", load_in_4bit=True, lora_r=0).validate()


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["4bit", "8bit"])
def test_lora_trains_on_quantized_base(tiny_model_dir, kind):
    pytest.importorskip("bitsandbytes")
    import bitsandbytes as bnb

    model = load_causal_lm(str(tiny_model_dir), quantization=kind)
    apply_lora(model, r=4, alpha=8)
    layers = lora_layers(model)
    base = bnb.nn.Linear4bit if kind == "4bit" else bnb.nn.Linear8bitLt
    assert layers and all(isinstance(m.base_layer, base) for m in layers.values())
    ids, attn, comp = (t.cuda() for t in make_batch(model.config.vocab_size))
    out = completion_logps(model, ids, attn, comp, chunk_size=8)
    out.logps.sum().backward()
    assert all(m.lora_A.weight.grad is not None for m in layers.values())
    assert torch.isfinite(out.logps).all()
