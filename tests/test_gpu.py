"""Tests that need a CUDA GPU (marked `gpu`; skipped elsewhere; run by benchmarks/gpu_check.py).

The CPU suite checks the numbers; these check that the same code paths hold on CUDA,
where kernels, bf16 autocast and the caching allocator differ.
"""

import copy

import pytest
import torch

from prefalign.logprobs import completion_logps
from prefalign.losses import LossParams, PairLogps, preference_loss
from test_logprobs import make_batch, naive

pytestmark = pytest.mark.gpu


def dpo_loss(policy, reference, ids, attn, comp):
    """Mean sigmoid-DPO loss of pairs (row i, row i + B/2), as the DPO trainer computes it."""
    half = ids.shape[0] // 2
    out = completion_logps(policy, ids, attn, comp)
    with torch.no_grad():
        ref = completion_logps(reference, ids, attn, comp).logps
    logps = PairLogps(chosen=out.logps[:half], rejected=out.logps[half:],
                      ref_chosen=ref[:half], ref_rejected=ref[half:])
    return preference_loss("sigmoid", logps, LossParams(beta=0.1)).losses.mean()


def test_bf16_dpo_step_matches_fp32(make_model):
    """One DPO loss and gradient under bf16 autocast against fp32 on the same weights.

    The policy is nudged away from the reference so that the log-ratios, and with them
    the loss's slope, are not trivially zero. bf16 keeps about 3 significant digits: the
    loss must agree to 2e-2 and the gradient point the same way (cosine > 0.99).
    """
    reference = make_model("llama", seed=0).cuda().eval()
    policy = copy.deepcopy(reference).train()
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.02 * torch.randn_like(p))
    ids, attn, comp = (t.cuda() for t in make_batch(reference.config.vocab_size,
                                                    lengths=(12, 10, 12, 9)))
    losses, grads = [], []
    for autocast in (False, True):
        policy.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            loss = dpo_loss(policy, reference, ids, attn, comp)
        loss.backward()
        losses.append(loss.item())
        grads.append(torch.cat([p.grad.flatten().float() for p in policy.parameters()]))
    assert abs(losses[0] - 0.6931) > 1e-3  # the nudge moved the loss off log 2
    assert losses[1] == pytest.approx(losses[0], abs=2e-2)
    assert torch.nn.functional.cosine_similarity(grads[0], grads[1], dim=0) > 0.99


def test_chunked_logps_on_cuda_equal_and_smaller(make_model):
    """Chunked, unchunked and the naive full log_softmax give the same log-probs and
    gradients on CUDA; with a 32k vocabulary the chunked head's peak memory is lower."""
    model = make_model("llama", vocab_size=32000).cuda()
    ids, attn, comp = (t.cuda() for t in make_batch(32000, lengths=(256, 200, 256, 180),
                                                    prompt=16))
    results = {}
    for name in ("naive", "unchunked", "chunked"):
        model.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        if name == "naive":
            token_logps = naive(model, ids, attn, comp)[0]
        else:
            token_logps = completion_logps(model, ids, attn, comp,
                                           chunk_size=64 if name == "chunked" else None).token_logps
        token_logps.sum().backward()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
        grad = model.get_output_embeddings().weight.grad.clone()
        results[name] = (token_logps.detach(), grad, peak)
    for name in ("unchunked", "chunked"):
        torch.testing.assert_close(results[name][0], results["naive"][0], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(results[name][1], results["naive"][1], atol=1e-5, rtol=1e-3)
    assert results["chunked"][2] < results["unchunked"][2] < results["naive"][2]


def test_generation_kv_cache_matches_recompute_in_bf16(make_model, tokenizer):
    """Greedy decoding with the KV cache on CUDA in bf16 picks the tokens a full
    recomputation of every prefix picks, wherever the top two logits are not a near-tie."""
    from prefalign.generation import SamplingConfig, generate

    model = make_model("llama").cuda().to(torch.bfloat16).eval()
    prompts = ["The film was", "A book about", "Our trip to the"]
    cfg = SamplingConfig(max_new_tokens=10, temperature=0.0, n=1, batch_size=3)
    gens = generate(model, tokenizer, prompts, cfg, progress=False)
    checked = 0
    for g in gens:
        ids = list(g.prompt_ids)
        for token in g.response_ids:
            with torch.no_grad():
                logits = model(torch.tensor([ids], device="cuda")).logits[0, -1].float()
            top2 = logits.topk(2)
            if top2.values[0] - top2.values[1] > 0.05:  # bf16 rounding cannot flip it
                assert token == top2.indices[0].item()
                checked += 1
            ids.append(token)
    assert checked >= 5
