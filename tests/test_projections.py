"""fused_projections: q/k/v and gate/up as one GEMM each, the model unchanged afterwards."""

from __future__ import annotations

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")
from transformers import (  # noqa: E402
    LlamaConfig,
    LlamaForCausalLM,
    Phi3Config,
    Phi3ForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from flashkv_ops.model_patches.projections import fused_projections  # noqa: E402

TINY = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=128, pad_token_id=0, bos_token_id=1, eos_token_id=2)


def _model(cls, config_cls, **overrides):
    torch.manual_seed(0)
    return cls(config_cls(**{**TINY, **overrides})).eval()


def _state(model):
    return {name: t.clone() for name, t in model.state_dict().items()}


@pytest.mark.parametrize("cls,config_cls,groups", [
    (LlamaForCausalLM, LlamaConfig, 4),  # q/k/v and gate/up in 2 layers
    (Qwen2ForCausalLM, Qwen2Config, 4),  # q/k/v with biases
    (Phi3ForCausalLM, Phi3Config, 0),  # already fused (qkv_proj, gate_up_proj): left alone
])
def test_fused_matches_separate_and_restores(cls, config_cls, groups):
    model = _model(cls, config_cls)
    ids = torch.randint(0, 128, (2, 9))
    before = _state(model)
    modules_before = dict(model.named_modules())
    with torch.no_grad():
        expected = model(ids).logits
        with fused_projections(model) as fused:
            assert fused == groups
            got = model(ids).logits
        after = model(ids).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(after, expected)
    # same modules, same parameter names and values
    assert dict(model.named_modules()) == modules_before
    assert set(model.state_dict()) == set(before)
    for name, t in model.state_dict().items():
        assert torch.equal(t, before[name]), name


def test_weights_stored_once_and_reused():
    model = _model(LlamaForCausalLM, LlamaConfig, attention_bias=True)
    attn = model.model.layers[0].self_attn
    params = [attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]
    with fused_projections(model):
        member = attn.q_proj
        joined = member.group.weight
    # the same Parameter objects, now consecutive row slices of one buffer
    assert [attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight] == params
    assert joined.shape == (sum(p.shape[0] for p in params), 64)
    offsets = [p.data_ptr() - joined.data_ptr() for p in params]
    row = joined.stride(0) * joined.element_size()
    assert offsets == [0, params[0].shape[0] * row, (params[0].shape[0] + params[1].shape[0]) * row]
    assert attn.q_proj.bias.data_ptr() + attn.q_proj.bias.numel() * 4 == attn.k_proj.bias.data_ptr()
    with fused_projections(model):
        # a second context moves nothing and hands out the same members (compiled code guards on them)
        assert attn.q_proj is member
        assert attn.q_proj.group.weight.data_ptr() == joined.data_ptr()


def test_member_called_alone_and_hooks_left_alone():
    model = _model(LlamaForCausalLM, LlamaConfig)
    attn = model.model.layers[0].self_attn
    mlp = model.model.layers[1].mlp
    mlp.up_proj.register_forward_hook(lambda *args: None)  # e.g. an adapter or offloading hook
    x = torch.randn(3, 64)
    with torch.no_grad():
        k_expected = attn.k_proj(x)
        with fused_projections(model) as fused:
            assert fused == 3
            assert type(mlp.gate_proj) is nn.Linear  # its group has a hooked member
            assert torch.equal(attn.k_proj(x), k_expected)  # no preceding q_proj(x): computes alone


def test_fullgraph_compile():
    model = _model(LlamaForCausalLM, LlamaConfig)
    ids = torch.randint(0, 128, (2, 5))
    with torch.no_grad():
        expected = model(ids).logits
        with fused_projections(model):
            compiled = torch.compile(lambda t: model(t).logits, fullgraph=True, backend="aot_eager")
            got = compiled(ids)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
