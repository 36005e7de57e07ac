"""The one log-prob routine against a naive log_softmax + gather, for every path."""

import pytest
import torch

from prefalign.logprobs import completion_logps, position_ids_from_mask


def naive(model, input_ids, attention_mask, completion_mask, temperature=1.0):
    """Reference: full fp32 log_softmax over the vocabulary, then gather. (B, T) aligned."""
    pos = position_ids_from_mask(attention_mask)
    logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=pos).logits
    logp = torch.log_softmax(logits.float() / temperature, -1)[:, :-1]
    tok = logp.gather(-1, input_ids[:, 1:, None]).squeeze(-1)
    mask = (completion_mask & attention_mask.bool())[:, 1:]
    return torch.nn.functional.pad(tok * mask, (1, 0)), logits


def make_batch(vocab, lengths=(7, 5, 9), prompt=3, seed=0, left=False):
    """Rows of different lengths padded to the longest; tokens after `prompt` are scored."""
    g = torch.Generator().manual_seed(seed)
    T = max(lengths)
    ids = torch.zeros(len(lengths), T, dtype=torch.long)
    attn = torch.zeros_like(ids)
    comp = torch.zeros_like(ids, dtype=torch.bool)
    for i, n in enumerate(lengths):
        sl = slice(T - n, T) if left else slice(0, n)
        ids[i, sl] = torch.randint(3, vocab, (n,), generator=g)
        attn[i, sl] = 1
        comp[i, sl] = torch.arange(n) >= prompt
    return ids, attn, comp


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("chunk_size", [None, 4])
def test_matches_naive_log_softmax(make_model, arch, chunk_size):
    model = make_model(arch)
    ids, attn, comp = make_batch(model.config.vocab_size)
    out = completion_logps(model, ids, attn, comp, chunk_size=chunk_size, stats=True)
    ref, logits = naive(model, ids, attn, comp)
    torch.testing.assert_close(out.token_logps, ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(out.logps, ref.sum(-1), atol=1e-5, rtol=0)
    # lengths: 7-3, 5-3, 9-3 completion tokens
    assert out.lengths.tolist() == [4.0, 2.0, 6.0]
    mask = out.mask[:, 1:]
    expected_mean = logits[:, :-1].float().mean(-1)[mask]
    torch.testing.assert_close(out.mean_logits[:, 1:][mask], expected_mean, atol=1e-5, rtol=0)
    p = torch.softmax(logits[:, :-1].float(), -1)
    expected_entropy = -(p * p.log()).sum(-1)[mask]
    torch.testing.assert_close(out.entropy[:, 1:][mask], expected_entropy, atol=1e-4, rtol=0)


def test_gradients_equal_naive_and_chunked(make_model):
    ids, attn, comp = make_batch(512)
    grads = []
    for chunk in (None, 3, "naive"):
        model = make_model("llama")
        if chunk == "naive":
            loss = naive(model, ids, attn, comp)[0].sum()
        else:
            loss = completion_logps(model, ids, attn, comp, chunk_size=chunk).logps.sum()
        loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    torch.testing.assert_close(grads[0], grads[2], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(grads[1], grads[2], atol=1e-5, rtol=1e-4)


def test_left_padding_equals_right_padding(make_model):
    model = make_model("llama")
    right = completion_logps(model, *make_batch(512, left=False))
    left = completion_logps(model, *make_batch(512, left=True))
    torch.testing.assert_close(left.logps, right.logps, atol=1e-5, rtol=0)


def test_temperature_and_fallback_path(make_model):
    """Soft-capped logits are not a plain LM head: the model's own logits are used."""
    model = make_model("llama")
    ids, attn, comp = make_batch(512)
    out = completion_logps(model, ids, attn, comp, temperature=0.7)
    torch.testing.assert_close(out.token_logps, naive(model, ids, attn, comp, 0.7)[0], atol=1e-5,
                               rtol=0)
    model.config.final_logit_softcapping = 30.0  # Llama ignores it; the routine must not
    fallback = completion_logps(model, ids, attn, comp, temperature=0.7)
    torch.testing.assert_close(fallback.token_logps, out.token_logps, atol=1e-5, rtol=0)


def test_return_hidden_and_first_token_never_scored(make_model):
    model = make_model("llama")
    ids, attn, _ = make_batch(512)
    everything = attn.bool()
    out = completion_logps(model, ids, attn, everything, return_hidden=True)
    assert not out.mask[:, 0].any()
    assert out.hidden_states.shape == (*ids.shape, model.config.hidden_size)
    assert (out.token_logps[:, 0] == 0).all()
