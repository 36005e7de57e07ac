"""Sampling with a KV cache: equality with HF generate, batching invariance, stops, log-probs."""

import copy
import math

import pytest
import torch
from tokenizers.processors import TemplateProcessing

from prefalign.data.collate import collate_prompts
from prefalign.errors import ConfigError, DataError
from prefalign.generation import (
    SamplingConfig,
    collate_generations,
    generate,
    render_prompts,
)
from prefalign.logprobs import completion_logps
from prefalign.lora import apply_lora, disable_adapters, lora_layers
from prefalign.token_sampling import filter_logits, row_seed, sample_tokens

PROMPTS = [
    "The film was",
    "Hi",
    [{"role": "user", "content": "What is the capital of France?"}],
    "Please write a short poem about the sea. The sea is",
    "def add(a, b):",
]


def greedy(**kwargs):
    return SamplingConfig(**{"max_new_tokens": 10, "temperature": 0.0, **kwargs})


def responses(gens):
    return [g.response_ids for g in gens]


def hf_greedy(model, prompt_ids, max_new_tokens, **kwargs):
    """HF's own greedy search on the same left-padded batch: (B, max_new_tokens) lists."""
    batch = collate_prompts(prompt_ids, model.generation_config.pad_token_id)
    out = model.generate(**batch, do_sample=False, max_new_tokens=max_new_tokens, **kwargs)
    return out[:, batch["input_ids"].shape[1] :].tolist()


# --- pure functions -------------------------------------------------------------------


def test_top_p_and_top_k_filter_hand_checked():
    """probs 0.05, 0.5, 0.15, 0.3 (shuffled so the scatter back to vocab order is tested).

    Sorted: 0.5, 0.3, 0.15, 0.05 with mass ahead 0, 0.5, 0.8, 0.95.
    top_p=0.4: drop where ahead >= 0.4 -> keep {0.5}.  top_p=0.7 -> keep {0.5, 0.3}.
    top_p=0.85 -> keep {0.5, 0.3, 0.15}.  top_p=1 -> keep all.
    top_k=2 -> {0.5, 0.3}; top_k=3 then top_p=0.6 on the renormalised 0.5/0.95, 0.3/0.95,
    0.15/0.95 (ahead 0, 0.526, 0.842) -> keep {0.5, 0.3}.
    """
    logits = torch.tensor([[0.05, 0.5, 0.15, 0.3]]).log()

    def kept(**kw):
        return torch.isfinite(filter_logits(logits, **kw))[0].tolist()

    assert kept(top_p=0.4) == [False, True, False, False]
    assert kept(top_p=0.7) == [False, True, False, True]
    assert kept(top_p=0.85) == [False, True, True, True]
    assert kept(top_p=1.0) == [True] * 4
    assert kept(top_k=2) == [False, True, False, True]
    assert kept(top_k=3, top_p=0.6) == [False, True, False, True]
    assert kept(top_k=10) == [True] * 4
    # Kept logits are unchanged, so the softmax renormalises over the kept tokens.
    assert filter_logits(logits, top_p=0.7)[0, 1] == logits[0, 1]


def test_inverse_cdf_sampling_hand_checked():
    """probs 0.1, 0 (filtered), 0.6, 0.3 -> cdf 0.1, 0.1, 0.7, 1.0: u in [0, 0.1) -> 0,
    [0.1, 0.7) -> 2, [0.7, 1) -> 3; the zero-probability token 1 is never picked."""
    logits = torch.tensor([0.1, 1.0, 0.6, 0.3]).log()
    logits[1] = float("-inf")
    u = torch.tensor([0.0, 0.09, 0.11, 0.69, 0.71, 0.999999], dtype=torch.float64)
    picked = sample_tokens(logits.expand(len(u), -1), u)
    assert picked.tolist() == [0, 0, 2, 2, 3, 3]


def test_inverse_cdf_frequencies_follow_the_distribution():
    probs = torch.tensor([0.2, 0.5, 0.3])
    u = torch.rand(20000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    picked = sample_tokens(probs.log().expand(len(u), -1), u)
    freq = torch.bincount(picked, minlength=3).float() / len(u)
    torch.testing.assert_close(freq, probs, atol=0.015, rtol=0)


def test_row_seeds_are_distinct():
    seeds = {row_seed(s, i, j) for s in range(3) for i in range(50) for j in range(4)}
    assert len(seeds) == 3 * 50 * 4 and all(0 <= x < 2**63 for x in seeds)


def test_config_is_validated():
    for bad in ({"top_p": 0.0}, {"temperature": -1}, {"n": 0}, {"stop_strings": [""]}):
        with pytest.raises(ConfigError, match=next(iter(bad))):
            SamplingConfig(**bad)
    assert SamplingConfig(n=3).num_return_sequences == 3


# --- prompt rendering -----------------------------------------------------------------


def test_prompts_render_like_data_tokenize(tokenizer):
    messages = PROMPTS[2]
    bos_tok = copy.deepcopy(tokenizer)
    bos_tok.backend_tokenizer.post_processor = TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", bos_tok.bos_token_id)])
    text_ids = tokenizer("The film was", add_special_tokens=False)["input_ids"]
    chat_text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    chat_ids = tokenizer(chat_text, add_special_tokens=False)["input_ids"]
    assert chat_text.endswith("<|assistant|>\n")
    assert render_prompts(tokenizer, ["The film was", messages, [5, 6]]) == [
        text_ids, chat_ids, [5, 6]]
    # A tokenizer that adds BOS gets it on text prompts; the template writes its own.
    assert render_prompts(bos_tok, ["The film was", messages]) == [
        [bos_tok.bos_token_id] + text_ids, chat_ids]
    with pytest.raises(DataError, match="prompt 1"):
        render_prompts(tokenizer, ["ok", ""])
    with pytest.raises(DataError, match="prompt 0"):
        render_prompts(tokenizer, [3.5])


# --- the decoding loop ----------------------------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_greedy_equals_hf_generate(make_model, tokenizer, arch):
    model = make_model(arch)
    gens = generate(model, tokenizer, PROMPTS, greedy(max_new_tokens=12, batch_size=5))
    expected = hf_greedy(model, [g.prompt_ids for g in gens], 12)
    for g, ref in zip(gens, expected):
        assert g.response_ids == ref[: len(g.response_ids)]
        assert len(g.response_ids) == 12 or g.response_ids[-1] == tokenizer.eos_token_id
        assert len(g.logprobs) == len(g.response_ids)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_padding_never_changes_a_prompt_result(make_model, tokenizer, arch):
    """"Hi" alone (no padding) and next to longer prompts (left-padded by many columns)."""
    model = make_model(arch)
    alone = generate(model, tokenizer, ["Hi"], greedy())[0]
    batched = generate(model, tokenizer, [PROMPTS[3], "Hi", PROMPTS[2]], greedy(batch_size=3))[1]
    assert batched.response_ids == alone.response_ids
    torch.testing.assert_close(batched.logprobs, alone.logprobs, atol=1e-5, rtol=0)


def test_sampling_is_seeded_and_independent_of_grouping(make_model, tokenizer):
    """Each (prompt, candidate) row draws from its own generator, so batch size (1, 2, 5)
    and the rows that finish early change nothing; the global RNG is never touched."""
    model = make_model("llama")
    cfg = dict(max_new_tokens=8, temperature=1.0, top_p=0.95, top_k=100, n=3, seed=7,
               stop_strings=["e"])
    rng = torch.get_rng_state()
    runs = [generate(model, tokenizer, PROMPTS, SamplingConfig(batch_size=b, **cfg))
            for b in (1, 2, 5)]  # equal across groupings, so a rerun repeats itself too
    assert torch.equal(torch.get_rng_state(), rng)
    first = runs[0]
    assert [(g.prompt_index, g.candidate) for g in first] == [(i, j) for i in range(5)
                                                              for j in range(3)]
    for other in runs[1:]:
        assert responses(other) == responses(first)
        assert [g.text for g in other] == [g.text for g in first]
        for a, b in zip(first, other):
            torch.testing.assert_close(a.logprobs, b.logprobs, atol=1e-5, rtol=0)
    assert {g.finish_reason for g in first} == {"stop", "length"}  # rows left early
    other_seed = generate(model, tokenizer, PROMPTS, SamplingConfig(**{**cfg, "seed": 8}))
    assert responses(other_seed) != responses(first)
    assert len({tuple(g.response_ids) for g in first[:3]}) > 1  # candidates differ


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_logprobs_equal_completion_logps(make_model, tokenizer, arch):
    """The stored log-probs are log softmax(logits / T) of the sampled tokens over the full
    vocabulary: a fresh forward through completion_logps(temperature=T) gives them back."""
    model = make_model(arch)
    for cfg in (SamplingConfig(max_new_tokens=8, temperature=0.7, top_p=0.9, n=2, batch_size=2),
                greedy(max_new_tokens=8)):
        gens = generate(model, tokenizer, PROMPTS, cfg)
        batch = collate_generations(gens, tokenizer.pad_token_id)
        with torch.no_grad():
            ref = completion_logps(model, batch["input_ids"], batch["attention_mask"],
                                   batch["completion_mask"], temperature=cfg.temperature or 1.0)
        assert torch.equal(ref.mask, batch["completion_mask"])
        torch.testing.assert_close(batch["token_logps"], ref.token_logps, atol=1e-4, rtol=0)


def test_eos_ends_a_response_like_hf(make_model, tokenizer):
    """Take a token greedy decoding emits as EOS: responses stop right after its first
    occurrence (EOS kept), finished; rows without it run to max_new_tokens."""
    model = make_model("llama")
    full = responses(generate(model, tokenizer, PROMPTS, greedy()))
    eos = full[0][4]
    gens = generate(model, tokenizer, PROMPTS, greedy(eos_token_ids=[eos], batch_size=2))
    hf = hf_greedy(model, [g.prompt_ids for g in gens], 10, eos_token_id=eos)
    for g, ids, ref in zip(gens, full, hf):
        cut = ids.index(eos) + 1 if eos in ids else len(ids)
        assert g.response_ids == ids[:cut] == ref[:cut]
        assert g.finished == (eos in ids) and g.finish_reason == ("eos" if eos in ids else "length")
        assert g.text == tokenizer.decode(ids[:cut], skip_special_tokens=True)
    assert gens[0].response_ids == full[0][: full[0].index(eos) + 1]


def test_default_eos_and_special_token_stop(make_model, tokenizer):
    """A logit bias makes one token certain: the tokenizer's EOS ends with "eos"; a special
    token given as a stop string (absent from skip-special text) ends with "stop"."""
    model = make_model("llama")
    head = model.lm_head
    model.lm_head = torch.nn.Linear(head.in_features, head.out_features, bias=True)
    model.lm_head.weight.data.copy_(head.weight.data)
    for token, stops, reason in ((tokenizer.eos_token, [], "eos"),
                                 ("<|user|>", ["<|user|>"], "stop"),
                                 ("<|user|>", [], "length")):
        token_id = tokenizer.convert_tokens_to_ids(token)
        model.lm_head.bias.data.zero_()
        model.lm_head.bias.data[token_id] = 1e4
        g = generate(model, tokenizer, ["Hi"], greedy(max_new_tokens=3, stop_strings=stops))[0]
        length = 3 if reason == "length" else 1
        assert g.response_ids == [token_id] * length and g.finish_reason == reason
        assert g.text == "" and g.logprobs == pytest.approx([0.0] * length, abs=1e-6)


def test_stop_strings_cut_after_the_completing_token(make_model, tokenizer):
    """Brute force: the response keeps the shortest prefix whose text contains a stop string;
    the text is cut just before the earliest one."""
    model = make_model("llama")
    full_gens = generate(model, tokenizer, PROMPTS, greedy(max_new_tokens=16))
    text = full_gens[0].text
    stops = [text[6:9], text[3:5], "never appears \x00"]
    gens = generate(model, tokenizer, PROMPTS, greedy(max_new_tokens=16, stop_strings=stops))
    for g, full in zip(gens, full_gens):
        ids = full.response_ids
        ends = [k for k in range(1, len(ids) + 1)
                if any(s in tokenizer.decode(ids[:k], skip_special_tokens=True) for s in stops)]
        if not ends:
            assert g.response_ids == ids and g.finish_reason == "length" and not g.finished
            continue
        k = ends[0]
        prefix = tokenizer.decode(ids[:k], skip_special_tokens=True)
        assert g.response_ids == ids[:k] and g.finish_reason == "stop" and g.finished
        assert g.text == prefix[: min(prefix.find(s) for s in stops if s in prefix)]
        assert len(g.logprobs) == k
    assert gens[0].finish_reason == "stop" and len(gens[0].response_ids) < 16
    assert text.startswith(gens[0].text) and len(gens[0].text) <= 3


def test_lora_policy_and_disabled_adapters(make_model, tokenizer):
    """Adapters apply; inside disable_adapters the base model's tokens come back; dropout is
    off while sampling and the training mode is restored afterwards."""
    model = make_model("llama")
    cfg = SamplingConfig(max_new_tokens=8, temperature=1.0, n=2, seed=3)
    base = responses(generate(model, tokenizer, PROMPTS[:3], cfg))
    apply_lora(model, r=4, dropout=0.5)
    g = torch.Generator().manual_seed(0)
    for layer in lora_layers(model).values():
        w = layer.lora_B.weight
        w.data = torch.randn(w.shape, generator=g)
    model.train()
    policy = responses(generate(model, tokenizer, PROMPTS[:3], cfg))
    assert policy != base
    assert responses(generate(model, tokenizer, PROMPTS[:3], cfg)) == policy  # no dropout
    with disable_adapters(model):
        assert responses(generate(model, tokenizer, PROMPTS[:3], cfg)) == base
    assert model.training and all(m.training for m in model.modules())


def test_progress_bar_can_be_disabled(make_model, tokenizer, capsys):
    model = make_model("gpt2")
    cfg = greedy(max_new_tokens=2, batch_size=1)
    generate(model, tokenizer, PROMPTS[:2], cfg, progress=False)
    assert "generate" not in capsys.readouterr().err
    generate(model, tokenizer, PROMPTS[:2], cfg, progress=True)
    assert "generate" in capsys.readouterr().err


@pytest.mark.gpu
def test_on_gpu_matches_hf_and_recomputed_logprobs(make_model, tokenizer):
    model = make_model("llama").cuda()
    gens = generate(model, tokenizer, PROMPTS, greedy(max_new_tokens=12))
    expected = hf_greedy(model, [g.prompt_ids for g in gens], 12)
    assert [ref[: len(g.response_ids)] for g, ref in zip(gens, expected)] == responses(gens)
    cfg = SamplingConfig(max_new_tokens=12, temperature=0.8, top_p=0.9, n=2, batch_size=2)
    gens = generate(model, tokenizer, PROMPTS, cfg)
    batch = {k: v.cuda() for k, v in collate_generations(gens, tokenizer.pad_token_id).items()}
    with torch.no_grad():
        ref = completion_logps(model, batch["input_ids"], batch["attention_mask"],
                               batch["completion_mask"], temperature=0.8)
    torch.testing.assert_close(batch["token_logps"], ref.token_logps, atol=1e-4, rtol=0)
    assert all(math.isfinite(x) for g in gens for x in g.logprobs)
