"""LoRA: init, counts, freezing, merge/unmerge, disable, unload, and PEFT interoperability.

Tiny models (conftest): hidden 64, 2 layers, 4 heads. Llama has 2 KV heads of dim 16, so
q_proj/o_proj are 64 -> 64 and k_proj/v_proj are 64 -> 32; GPT-2's c_attn is a Conv1D
64 -> 192 (fused q, k, v) and attn.c_proj a Conv1D 64 -> 64.
"""

import json
import math

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers.pytorch_utils import Conv1D

from prefalign.lora import (
    LoRALinear,
    apply_lora,
    default_target_modules,
    disable_adapters,
    find_target_modules,
    has_lora,
    load_adapter,
    lora_layers,
    lora_parameters,
    merge_lora,
    print_trainable_parameters,
    save_adapter,
    unload_lora,
    unmerge_lora,
)

ARCHS = ["llama", "gpt2"]


@pytest.fixture
def ids(tokenizer):
    texts = ["The film was a delight from start to finish.", "Bad terrible awful boring."]
    return tokenizer(texts, return_tensors="pt", padding=True).input_ids


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def randomize_b(model, seed=1, std=0.2):
    """A nonzero B, so the adapter changes the output (B = 0 at init)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            w = layer.lora_B.weight
            w.copy_(torch.randn(w.shape, generator=gen) * std)
    return model


def test_default_targets_resolve_to_attention_only(make_model):
    llama, gpt2 = make_model("llama"), make_model("gpt2")
    assert default_target_modules(llama) == ["q_proj", "k_proj", "v_proj", "o_proj"]
    names = find_target_modules(llama, default_target_modules(llama))
    assert len(names) == 2 * 4 and all(".self_attn." in n for n in names)
    names = find_target_modules(gpt2, default_target_modules(gpt2))
    assert names == [f"transformer.h.{i}.attn.{p}" for i in (0, 1) for p in ("c_attn", "c_proj")]
    # A bare "c_proj" also hits the MLP's output projection: why the default is "attn.c_proj".
    assert "transformer.h.0.mlp.c_proj" in find_target_modules(gpt2, ["c_proj"])
    # Matching is by whole name components, never a substring.
    assert find_target_modules(llama, ["proj"]) == []
    assert find_target_modules(llama, r".*\.0\.self_attn\.q_proj") == ["model.layers.0.self_attn.q_proj"]
    assert "lm_head" not in find_target_modules(llama, "all-linear")
    assert len(find_target_modules(llama, "all-linear")) == 2 * 7


class _Custom(nn.Module):
    def __init__(self, name):
        super().__init__()
        self.config = type("Config", (), {"model_type": "mystery"})()
        self.block = nn.ModuleDict({name: nn.Linear(4, 4), "fc": nn.Linear(4, 4)})


def test_default_targets_fallback_and_error():
    assert default_target_modules(_Custom("query")) == ["query"]
    with pytest.raises(ValueError, match="'mystery'.*explicitly.*fc"):
        default_target_modules(_Custom("dense"))


def test_apply_lora_refuses_no_match_and_twice(make_model):
    model = make_model("llama")
    with pytest.raises(ValueError, match="no nn.Linear/Conv1D module matches.*q_proj"):
        apply_lora(model, ["nonexistent"])
    assert not has_lora(model)
    apply_lora(model)
    with pytest.raises(ValueError, match="already has LoRA"):
        apply_lora(model)


@pytest.mark.parametrize("arch", ARCHS)
def test_zero_b_init_gives_exact_base_output(make_model, ids, arch):
    model = make_model(arch)
    base = logits(model, ids)
    apply_lora(model, r=4, alpha=8)
    assert torch.equal(logits(model, ids), base)


@pytest.mark.parametrize("arch", ARCHS)
def test_shapes_and_kaiming_bound(make_model, arch):
    """kaiming_uniform(a=sqrt(5)): gain = sqrt(2 / (1 + 5)), bound = gain * sqrt(3 / fan_in)
    = 1 / sqrt(in) = 1 / 8 = 0.125 for in = 64. With r * in = 512 uniform draws the largest
    |A| is below 0.9 * bound with probability 0.9 ** 512 ~ 4e-24."""
    model = apply_lora(make_model(arch), r=8)
    expected_out = {"q_proj": 64, "k_proj": 32, "v_proj": 32, "o_proj": 64, "c_attn": 192, "c_proj": 64}
    for name, layer in lora_layers(model).items():
        out = expected_out[name.rsplit(".", 1)[-1]]
        assert layer.lora_A.weight.shape == (8, 64)
        assert layer.lora_B.weight.shape == (out, 8)
        assert layer.is_conv1d == (arch == "gpt2")
        assert not layer.lora_B.weight.any()
        a = layer.lora_A.weight.abs()
        assert a.max() <= 0.125 and a.max() > 0.9 * 0.125
        assert layer.scaling == 16 / 8


@pytest.mark.parametrize("arch", ARCHS)
def test_parameter_counts_and_freezing(make_model, arch, capsys):
    """A LoRA layer has r * (in + out) parameters. r = 8, 2 layers:
    llama: q 8*(64+64)=1024, k 8*(64+32)=768, v 768, o 1024 -> 3584 per layer -> 7168;
    gpt2: c_attn 8*(64+192)=2048, attn.c_proj 8*(64+64)=1024 -> 3072 per layer -> 6144."""
    model = make_model(arch)
    base_total = sum(p.numel() for p in model.parameters())
    apply_lora(model, r=8)
    lora = {"llama": 7168, "gpt2": 6144}[arch]
    trainable, total = print_trainable_parameters(model)
    assert (trainable, total) == (lora, base_total + lora)
    assert sum(p.numel() for p in lora_parameters(model)) == lora
    printed = capsys.readouterr().out
    assert printed.strip() == (
        f"trainable params: {lora:,d} || all params: {base_total + lora:,d} || "
        f"trainable%: {100 * lora / (base_total + lora):.4f}"
    )
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert names and all(n.endswith((".lora_A.weight", ".lora_B.weight")) for n in names)
    assert len(names) == len(lora_parameters(model))


@pytest.mark.parametrize("arch", ARCHS)
def test_one_step_changes_only_lora(make_model, ids, arch):
    """The optimizer gets every parameter; frozen ones receive no grad and stay bit-identical.
    With B = 0, dL/dA = scaling * B^T (dL/dh) x^T = 0, so only B moves on the first step."""
    model = apply_lora(make_model(arch), r=4)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    after = model.state_dict()
    for key, value in before.items():
        if key.endswith("lora_B.weight"):
            assert not torch.equal(after[key], value), key
        else:
            assert torch.equal(after[key], value), key


@pytest.mark.parametrize("arch", ARCHS)
def test_merge_unmerge_equivalence(make_model, ids, arch):
    model = randomize_b(apply_lora(make_model(arch), r=4))
    weights = {n: m.base_layer.weight.clone() for n, m in lora_layers(model).items()}
    unmerged = logits(model, ids)
    merge_lora(model)
    merged_weights = {n: m.base_layer.weight.clone() for n, m in lora_layers(model).items()}
    assert all(not torch.equal(merged_weights[n], w) for n, w in weights.items())
    calls = []
    for layer in lora_layers(model).values():
        layer.lora_A.register_forward_hook(lambda *args: calls.append(1))
    torch.testing.assert_close(logits(model, ids), unmerged, atol=1e-5, rtol=0)
    assert calls == []  # merged forward runs no LoRA matmul
    merge_lora(model)  # second merge: no-op
    for n, m in lora_layers(model).items():
        assert torch.equal(m.base_layer.weight, merged_weights[n])
    unmerge_lora(model)
    unmerge_lora(model)  # second unmerge: no-op
    for n, m in lora_layers(model).items():
        torch.testing.assert_close(m.base_layer.weight, weights[n], atol=1e-6, rtol=0)
    torch.testing.assert_close(logits(model, ids), unmerged, atol=1e-5, rtol=0)


def test_hand_computed_delta_and_merge():
    """in = out = 2, r = 1, alpha = 2 -> scaling 2. A = [[1, 2]], B = [[3], [4]], x = [1, 1]:
    A x = 3, B A x = [9, 12], times 2 = [18, 24]; merged W = W0 + 2 B A = W0 + [[6, 12], [8, 16]]."""
    base = nn.Linear(2, 2)
    layer = LoRALinear(base, r=1, alpha=2)
    with torch.no_grad():
        layer.lora_A.weight.copy_(torch.tensor([[1.0, 2.0]]))
        layer.lora_B.weight.copy_(torch.tensor([[3.0], [4.0]]))
    x = torch.ones(1, 2)
    w0 = base.weight.detach().clone()
    torch.testing.assert_close(layer(x) - base(x), torch.tensor([[18.0, 24.0]]))
    layer.merge()
    torch.testing.assert_close(base.weight.detach(), w0 + torch.tensor([[6.0, 12.0], [8.0, 16.0]]))
    rs = LoRALinear(nn.Linear(2, 2), r=4, alpha=2, use_rslora=True)
    assert rs.scaling == 2 / math.sqrt(4)


def test_conv1d_matches_linear_reference():
    """Conv1D computes x @ W + b with W (in, out); an nn.Linear with weight W^T is the same map,
    so both LoRA layers with the same A, B must agree unmerged and merged."""
    torch.manual_seed(0)
    conv = Conv1D(nf=6, nx=5)
    with torch.no_grad():
        conv.bias.normal_()
    linear = nn.Linear(5, 6)
    with torch.no_grad():
        linear.weight.copy_(conv.weight.T)
        linear.bias.copy_(conv.bias)
    lc, ll = LoRALinear(conv, r=3, alpha=6), LoRALinear(linear, r=3, alpha=6)
    assert (lc.in_features, lc.out_features) == (ll.in_features, ll.out_features) == (5, 6)
    with torch.no_grad():
        ll.lora_A.weight.copy_(lc.lora_A.weight)
        for m in (lc, ll):
            m.lora_B.weight.copy_(torch.arange(18.0).reshape(6, 3) / 10)
    x = torch.randn(2, 4, 5)
    ref = linear(x) + (x @ ll.lora_A.weight.T @ ll.lora_B.weight.T) * 2.0
    torch.testing.assert_close(lc(x), ref)
    torch.testing.assert_close(ll(x), ref)
    lc.merge(), ll.merge()
    torch.testing.assert_close(conv.weight.T, linear.weight)
    torch.testing.assert_close(lc(x), ref, atol=1e-5, rtol=1e-5)


def test_dropout_only_on_lora_path_and_dtype():
    base = nn.Linear(4, 3)
    layer = LoRALinear(base, r=2, alpha=4, dropout=1.0)  # p = 1 drops every LoRA input
    with torch.no_grad():
        layer.lora_B.weight.fill_(1.0)
    x = torch.randn(5, 4)
    layer.train()
    assert torch.equal(layer(x), base(x))  # base path untouched by dropout
    layer.eval()
    assert not torch.allclose(layer(x), base(x))
    half = LoRALinear(nn.Linear(4, 3).to(torch.bfloat16), r=2, alpha=4)
    assert half.lora_A.weight.dtype == torch.float32  # small updates survive in fp32
    assert half(torch.randn(5, 4, dtype=torch.bfloat16)).dtype == torch.bfloat16


@pytest.mark.parametrize("arch", ARCHS)
def test_disable_adapters_gives_base_output(make_model, ids, arch):
    model = make_model(arch)
    base = logits(model, ids)
    randomize_b(apply_lora(model, r=4))
    adapted = logits(model, ids)
    assert not torch.allclose(adapted, base, atol=1e-3)
    with disable_adapters(model):
        assert torch.equal(logits(model, ids), base)
        with disable_adapters(model):
            pass
        assert torch.equal(logits(model, ids), base)  # the inner exit kept the outer state
    assert torch.equal(logits(model, ids), adapted)
    merge_lora(model)
    with pytest.raises(RuntimeError, match="merged.*unmerge_lora"):
        with disable_adapters(model):
            pass
    assert not any(m.disabled for m in lora_layers(model).values())


@pytest.mark.parametrize("arch", ARCHS)
def test_unload_gives_plain_model(make_model, ids, arch, tmp_path):
    original = make_model(arch)
    original.save_pretrained(tmp_path / "orig")
    model = randomize_b(apply_lora(make_model(arch), r=4))
    adapted = logits(model, ids)
    unload_lora(model, merge=True)
    assert not has_lora(model) and not hasattr(model, "lora_settings")
    assert model.state_dict().keys() == original.state_dict().keys()
    torch.testing.assert_close(logits(model, ids), adapted, atol=1e-5, rtol=0)
    model.save_pretrained(tmp_path / "merged")
    keys = load_file(tmp_path / "merged" / "model.safetensors").keys()
    assert keys == load_file(tmp_path / "orig" / "model.safetensors").keys()
    # merge=False drops the adapter and keeps the base weights bit-identical...
    plain = unload_lora(randomize_b(apply_lora(make_model(arch), r=4)), merge=False)
    for key, value in original.state_dict().items():
        assert torch.equal(plain.state_dict()[key], value), key
    # ...or, from a merged model, restores them up to rounding.
    plain = unload_lora(merge_lora(randomize_b(apply_lora(make_model(arch), r=4))), merge=False)
    for key, value in original.state_dict().items():
        torch.testing.assert_close(plain.state_dict()[key], value, atol=1e-6, rtol=0)


@pytest.mark.parametrize("arch", ARCHS)
def test_peft_loads_prefalign_adapter(make_model, ids, arch, tmp_path):
    from peft import PeftModel

    model = randomize_b(apply_lora(make_model(arch), r=4, alpha=8))
    save_adapter(model, tmp_path, base_model_name_or_path="tiny-base")
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM"
    assert (config["r"], config["lora_alpha"], config["bias"]) == (4, 8, "none")
    assert config["fan_in_fan_out"] is (arch == "gpt2")
    assert config["base_model_name_or_path"] == "tiny-base"
    keys = load_file(tmp_path / "adapter_model.safetensors").keys()
    first = next(iter(lora_layers(model)))
    assert f"base_model.model.{first}.lora_A.weight" in keys
    assert len(keys) == 2 * len(lora_layers(model))
    peft_model = PeftModel.from_pretrained(make_model(arch), tmp_path).eval()
    torch.testing.assert_close(logits(peft_model, ids), logits(model, ids), atol=1e-5, rtol=0)
    assert not torch.allclose(logits(make_model(arch), ids), logits(model, ids), atol=1e-3)


@pytest.mark.parametrize(
    "arch,targets,rslora",
    [("llama", ["q_proj", "v_proj", "down_proj"], False), ("llama", ["o_proj"], True),
     ("gpt2", ["c_attn", "mlp.c_fc"], False)],
)
def test_prefalign_loads_peft_adapter(make_model, ids, arch, targets, rslora, tmp_path):
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=4, lora_alpha=12, target_modules=targets, use_rslora=rslora,
                        task_type="CAUSAL_LM")
    peft_model = get_peft_model(make_model(arch), config)
    torch.manual_seed(3)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.2)
    peft_model.eval().save_pretrained(tmp_path)
    model = load_adapter(make_model(arch), tmp_path)
    assert len(lora_layers(model)) == len(find_target_modules(make_model(arch), targets))
    expected = (12 / math.sqrt(4)) if rslora else 12 / 4
    assert all(m.scaling == expected for m in lora_layers(model).values())
    torch.testing.assert_close(logits(model, ids), logits(peft_model, ids), atol=1e-5, rtol=0)
    assert all(p.requires_grad for p in lora_parameters(model))


def test_prefalign_round_trip(make_model, ids, tmp_path):
    model = randomize_b(apply_lora(make_model("gpt2"), r=2, alpha=4))
    save_adapter(model, tmp_path)
    loaded = load_adapter(make_model("gpt2"), tmp_path, trainable=False)
    assert torch.equal(logits(loaded, ids), logits(model, ids))
    assert not any(p.requires_grad for p in loaded.parameters())
    # Files that keep PEFT's adapter name in the keys ("lora_A.default.weight") load too.
    weights = load_file(tmp_path / "adapter_model.safetensors")
    renamed = {k.replace(".weight", ".default.weight"): v for k, v in weights.items()}
    save_file(renamed, tmp_path / "adapter_model.safetensors")
    assert torch.equal(logits(load_adapter(make_model("gpt2"), tmp_path), ids), logits(model, ids))


def test_load_adapter_errors(make_model, tmp_path):
    model = randomize_b(apply_lora(make_model("llama"), r=4))
    save_adapter(model, tmp_path)
    config_path = tmp_path / "adapter_config.json"
    good = json.loads(config_path.read_text())

    def expect_error(config, match, weights=None):
        config_path.write_text(json.dumps(config))
        if weights is not None:
            save_file(weights, tmp_path / "adapter_model.safetensors")
        fresh = make_model("llama")
        with pytest.raises(ValueError, match=match):
            load_adapter(fresh, tmp_path)
        assert not has_lora(fresh)  # checked before the model is touched

    expect_error({**good, "use_dora": True}, r"unsupported LoRA options \['use_dora'\]")
    expect_error({**good, "rank_pattern": {"q_proj": 2}}, "rank_pattern")
    expect_error({**good, "peft_type": "IA3"}, "only LORA")
    expect_error({**good, "r": 2}, "mismatched shapes")
    expect_error({**good, "target_modules": ["q_proj", "k_proj"]}, "unexpected keys")
    weights = load_file(tmp_path / "adapter_model.safetensors")
    dropped = next(k for k in weights if k.endswith("lora_B.weight"))
    expect_error(good, "missing keys.*" + dropped.removeprefix("base_model.model."),
                 {k: v for k, v in weights.items() if k != dropped})
    with pytest.raises(ValueError, match="already has LoRA"):
        load_adapter(model, tmp_path)


def test_lora_layers_follow_the_models_mode(make_model):
    """A model in eval mode gets LoRA layers in eval mode: no dropout at inference."""
    from prefalign.lora import apply_lora, lora_layers

    model = make_model("llama").eval()
    apply_lora(model, r=4, dropout=0.5)
    assert not any(layer.training for layer in lora_layers(model).values())
    model.train()
    assert all(layer.training for layer in lora_layers(model).values())
