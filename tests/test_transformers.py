"""The ``"triton_kv"`` attention implementation inside transformers models.

Tiny random-weight LLaMA-family models (no downloads), float32 on CPU: logits against
transformers' ``eager`` attention, greedy ``generate`` with dynamic and static caches, left-padded
batches against unbatched runs, loading, and the visible fallbacks for masks that key ranges
cannot express. CPU tests use the ops' pure-PyTorch fallback (fast); the cases that request the
``triton_interpreter`` fixture run the real Triton kernels through the interpreter, so they stay
tiny. GPU-marked tests use real model shapes.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import transformers
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Phi3Config, Qwen2Config
from transformers.generation.configuration_utils import CompileConfig

import flashkv_ops
import flashkv_ops.ops
from flashkv_ops import model_patches
from flashkv_ops.model_patches import masks as mask_module

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

VOCAB = 96
PAD = 0
LONG, SHORT = 13, 6  # the two prompt lengths of the left-padded batch


# -- fixtures ----------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def _fast_cpu_ops(request, monkeypatch):
    """Run CPU ops through the pure-PyTorch fallback unless the test asks for the interpreter."""
    if "triton_interpreter" not in request.fixturenames:
        monkeypatch.setattr(flashkv_ops.ops, "_INTERPRET", False)


@pytest.fixture
def triton_interpreter():
    if not flashkv_ops.ops._INTERPRET:
        pytest.skip("TRITON_INTERPRET=1 was not set before flashkv_ops was imported")


@pytest.fixture(autouse=True)
def _fresh_warnings(monkeypatch):
    """Each test sees the once-per-process fallback warnings afresh."""
    monkeypatch.setattr(mask_module, "_warned", set())


# -- tiny models -------------------------------------------------------------------------------


def _config(family: str, **overrides):
    common = dict(
        vocab_size=VOCAB,
        intermediate_size=64,
        num_hidden_layers=2,
        max_position_embeddings=128,
        initializer_range=0.2,  # peaked logits: greedy choices are not near-ties
        pad_token_id=PAD,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
    )
    if family == "llama":  # GQA 4:2
        cfg = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16)
        return LlamaConfig(**{**common, **cfg, **overrides})
    if family == "qwen2":  # GQA 14:2, ratio 7, q/k/v biases
        cfg = dict(hidden_size=112, num_attention_heads=14, num_key_value_heads=2)
        return Qwen2Config(**{**common, **cfg, **overrides})
    if family == "mistral":  # GQA 8:2
        cfg = dict(
            hidden_size=64, num_attention_heads=8, num_key_value_heads=2, head_dim=16, sliding_window=None
        )
        return MistralConfig(**{**common, **cfg, **overrides})
    if family == "phi3":  # MHA 4:4, fused qkv
        cfg = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=4)
        return Phi3Config(**{**common, **cfg, **overrides})
    raise AssertionError(family)


FAMILIES = ["llama", "qwen2", "mistral", "phi3"]


def _pair(family: str, seed: int = 0, **overrides):
    """(eager model, triton_kv model) with identical random weights and separate configs."""
    torch.manual_seed(seed)
    ref = AutoModelForCausalLM.from_config(_config(family, **overrides), attn_implementation="eager").eval()
    # deepcopy: from_config shares the config object, and the implementation lives on it
    ours = copy.deepcopy(ref)
    ours.set_attn_implementation("triton_kv")
    assert ref.config._attn_implementation == "eager"
    assert ours.config._attn_implementation == "triton_kv"
    return ref, ours


def _padded_batch(seed: int = 1):
    """Two prompts of lengths 13 and 6, left-padded into one [2, 13] batch."""
    g = torch.Generator().manual_seed(seed)
    long_ids = torch.randint(3, VOCAB, (1, LONG), generator=g)
    short_ids = torch.randint(3, VOCAB, (1, SHORT), generator=g)
    ids = torch.full((2, LONG), PAD, dtype=torch.long)
    ids[0] = long_ids[0]
    ids[1, LONG - SHORT :] = short_ids[0]
    mask = torch.zeros(2, LONG, dtype=torch.long)
    mask[0] = 1
    mask[1, LONG - SHORT :] = 1
    return ids, mask, long_ids, short_ids


def _greedy(model, ids, mask=None, new_tokens=8, **kwargs):
    with torch.no_grad():
        out = model.generate(
            ids,
            attention_mask=mask,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,  # no early EOS: every run has the same length
            do_sample=False,
            pad_token_id=PAD,
            **kwargs,
        )
    return out[:, ids.shape[1] :]


def _max_diff_on_tokens(a, b, mask):
    """max |a - b| over real (non-pad) positions; a, b [B, S, V], mask [B, S]."""
    return (a - b)[mask.bool()].abs().max().item()


# -- numerics against eager ---------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_match_eager(family):
    ref, ours = _pair(family)
    ids, mask, _, _ = _padded_batch()
    with torch.no_grad():
        want = ref(ids, attention_mask=mask).logits
        got = ours(ids, attention_mask=mask).logits
        assert _max_diff_on_tokens(got, want, mask) <= 1e-4
        # no padding, no mask at all
        want = ref(ids[:1]).logits
        got = ours(ids[:1]).logits
        assert (got - want).abs().max().item() <= 1e-4


@pytest.mark.parametrize("cache", ["dynamic", "static"])
@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_generate_matches_eager(family, cache):
    ref, ours = _pair(family)
    ids, mask, _, _ = _padded_batch()
    kwargs = {"cache_implementation": "static"} if cache == "static" else {}
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no silent or visible fallback on this path
        got = _greedy(ours, ids, mask, **kwargs)
    want = _greedy(ref, ids, mask, **kwargs)
    assert got.tolist() == want.tolist()


@pytest.mark.parametrize("cache", ["dynamic", "static"])
@pytest.mark.parametrize("family", FAMILIES)
def test_left_padded_batch_matches_unbatched(family, cache):
    _, ours = _pair(family)
    ids, mask, long_ids, short_ids = _padded_batch()
    kwargs = {"cache_implementation": "static"} if cache == "static" else {}
    batched = _greedy(ours, ids, mask, **kwargs)
    assert batched[0].tolist() == _greedy(ours, long_ids, **kwargs)[0].tolist()
    assert batched[1].tolist() == _greedy(ours, short_ids, **kwargs)[0].tolist()


def test_left_padding_becomes_key_ranges_not_dense_masks():
    """The mask the attention function receives is two int32 [B] tensors, nothing [B, S_q, S_k]."""
    _, ours = _pair("llama")
    ids, mask, _, _ = _padded_batch()
    seen = []

    def spy(module, query, key, value, attention_mask, **kwargs):
        seen.append(attention_mask)
        return model_patches.triton_kv_attention(module, query, key, value, attention_mask, **kwargs)

    transformers.AttentionInterface.register("triton_kv_spy", spy)
    transformers.masking_utils.AttentionMaskInterface.register("triton_kv_spy", model_patches.triton_kv_mask)
    try:
        ours.set_attn_implementation("triton_kv_spy")
        _greedy(ours, ids, mask, new_tokens=2, cache_implementation="static")
    finally:
        del transformers.AttentionInterface._global_mapping["triton_kv_spy"]
        del transformers.masking_utils.AttentionMaskInterface._global_mapping["triton_kv_spy"]
    assert seen and all(isinstance(m, model_patches.KeyRangeMask) for m in seen)
    prefill, first_decode = seen[0], seen[-1]
    for m in seen:
        assert m.key_start.dtype == m.key_end.dtype == torch.int32
        assert m.key_start.shape == m.key_end.shape == (2,)
        assert m.key_start.is_contiguous() and m.key_end.stride() == (1,)  # no expanded views
        assert m.fallback_reason is None and m._dense is None
    assert prefill.key_start.tolist() == [0, LONG - SHORT]
    assert prefill.key_end.tolist() == [LONG, LONG]
    # static cache: keys are the whole max_cache_len buffer, key_end counts what is filled
    assert first_decode.key_end.tolist() == [LONG + 1, LONG + 1]


def test_mask_function_static_cache_offsets():
    """q_offset arrives as a tensor for static caches; key_end = q_offset + q_length - kv_offset."""
    attention_mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]], dtype=torch.bool)
    got = model_patches.triton_kv_mask(2, 1, 32, q_offset=torch.tensor(4), attention_mask=attention_mask)
    assert got.key_start.tolist() == [2, 0]
    assert got.key_end.tolist() == [5, 5]
    # a sliding-window cache that dropped its first 3 positions shifts both ends
    window = transformers.masking_utils.sliding_window_causal_mask_function(8)
    got = model_patches.triton_kv_mask(
        2, 1, 8, q_offset=10, kv_offset=3, mask_function=window, local_size=8,
        attention_mask=torch.ones(2, 11, dtype=torch.bool),
    )
    assert got.key_start.tolist() == [0, 0]
    assert got.key_end.tolist() == [8, 8]
    assert got.fallback_reason is None


def _range_visibility(mask, num_queries, num_keys):
    """Dense bool [B, 1, S_q, S_k] of what a KeyRangeMask lets each query row see."""
    rows = torch.arange(num_queries)[None, :, None]  # [1, S_q, 1]
    cols = torch.arange(num_keys)[None, None, :]  # [1, 1, S_k]
    start = mask.key_start.long()[:, None, None]
    end = mask.key_end.long()[:, None, None]
    visible = (cols >= start) & (cols < end) & (cols <= rows + end - num_queries)
    return visible[:, None]


@settings(deadline=None, max_examples=60)
@given(data=st.data())
def test_key_ranges_equal_transformers_dense_masks(data):
    """Property: for left padding, the key ranges see exactly what transformers' own dense mask
    (``sdpa_mask``) lets through, for dynamic, static and sliding-window cache geometries; where
    a window cuts keys off, the mask asks for the fallback instead."""
    draw = data.draw
    batch = draw(st.integers(1, 3), label="batch")
    q_length = draw(st.integers(1, 6), label="q_length")
    past = draw(st.integers(0, 10), label="past")  # tokens already cached = q_offset
    total = past + q_length
    geometry = draw(st.sampled_from(["dynamic", "static", "sliding"]), label="geometry")
    kv_offset, window = 0, None
    if geometry == "dynamic":
        kv_length = total
    elif geometry == "static":
        kv_length = total + draw(st.integers(0, 5), label="unfilled")
    else:
        window = draw(st.integers(1, 16), label="window")
        kv_offset = draw(st.integers(0, past), label="kv_offset")
        kv_length = total - kv_offset
    pads = [draw(st.integers(0, total), label="pad") for _ in range(batch)]
    padding = torch.tensor([[p <= i for i in range(total)] for p in pads])  # [B, total]
    q_offset = torch.tensor(past) if draw(st.booleans(), label="tensor q_offset") else past
    mask_function = (
        transformers.masking_utils.causal_mask_function
        if window is None
        else transformers.masking_utils.sliding_window_causal_mask_function(window)
    )
    args = dict(
        batch_size=batch, q_length=q_length, kv_length=kv_length, q_offset=q_offset, kv_offset=kv_offset,
        mask_function=mask_function, attention_mask=padding, local_size=window,
    )
    got = model_patches.triton_kv_mask(**args)
    if window is not None and total - kv_offset > window:
        assert got.fallback_reason is not None and "sliding window" in got.fallback_reason
        return
    assert got.fallback_reason is None
    got.verify()
    assert got.fallback_reason is None
    want = transformers.masking_utils.sdpa_mask(**args, allow_is_causal_skip=False)
    want = want.expand(batch, 1, q_length, kv_length)
    assert torch.equal(_range_visibility(got, q_length, kv_length), want)


@pytest.mark.parametrize(
    "row",
    [[1, 1, 1, 0, 0], [0, 1, 0, 1, 1], [1, 1, 1, 1, 0]],
    ids=["right-padded", "hole", "last-token-masked"],
)
def test_non_left_padding_is_detected(row):
    padding = torch.tensor([[1] * 5, row], dtype=torch.bool)
    mask = model_patches.triton_kv_mask(2, 5, 5, attention_mask=padding)
    assert mask.fallback_reason is None  # decided on first use, where a host read is allowed
    mask.verify()
    assert "not pure left padding" in mask.fallback_reason
    assert mask.dense().shape == (2, 1, 5, 5)


# -- masks that key ranges cannot express: visible fallback, same numbers ---------------------


def test_right_padding_falls_back_visibly():
    ref, ours = _pair("llama")
    ids, _, _, _ = _padded_batch()
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0  # right padding
    with torch.no_grad(), pytest.warns(UserWarning, match="not pure left padding"):
        got = ours(ids, attention_mask=mask).logits
    with torch.no_grad():
        want = ref(ids, attention_mask=mask).logits
    assert _max_diff_on_tokens(got, want, mask) <= 1e-4


def test_packed_sequences_fall_back_visibly():
    """position_ids restarting inside a row (packing, no cache) make transformers build a custom pattern."""
    ref, ours = _pair("llama")
    ids = torch.randint(3, VOCAB, (1, 10), generator=torch.Generator().manual_seed(3))
    position_ids = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 0, 1, 2]])
    with torch.no_grad(), pytest.warns(UserWarning, match="not a plain causal mask"):
        got = ours(ids, position_ids=position_ids, use_cache=False).logits
    with torch.no_grad():
        want = ref(ids, position_ids=position_ids, use_cache=False).logits
        unpacked = ref(ids, position_ids=position_ids, use_cache=True).logits  # plain causal
    assert (want - unpacked).abs().max().item() > 1e-2  # the pattern really differs
    assert (got - want).abs().max().item() <= 1e-4


@pytest.mark.parametrize("window", [4, 64])
def test_mistral_sliding_window(window):
    """A window shorter than the prompt falls back (warned) and stays exact; a long one does not."""
    ref, ours = _pair("mistral", sliding_window=window)
    ids, mask, _, _ = _padded_batch()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with torch.no_grad():
            got = ours(ids, attention_mask=mask).logits
        tokens = _greedy(ours, ids, mask)
    fallbacks = [w for w in caught if "sliding window" in str(w.message)]
    assert bool(fallbacks) == (window < LONG)
    with torch.no_grad():
        want = ref(ids, attention_mask=mask).logits
    assert _max_diff_on_tokens(got, want, mask) <= 1e-4
    assert tokens.tolist() == _greedy(ref, ids, mask).tolist()


def test_dense_4d_mask_is_honoured_visibly():
    ref, ours = _pair("llama")
    ids, _, _, _ = _padded_batch()
    allowed = torch.ones(2, 1, LONG, LONG, dtype=torch.bool).tril()
    allowed[:, :, 4:, 3] = False  # a hole no key range can express
    # additive float mask: the form eager attention understands (it adds the mask to scores)
    dense = torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)
    with torch.no_grad(), pytest.warns(UserWarning, match="dense attention mask"):
        got = ours(ids, attention_mask=dense).logits
    with torch.no_grad():
        want = ref(ids, attention_mask=dense).logits
    assert (got - want).abs().max().item() <= 1e-4


# -- compile --------------------------------------------------------------------------------


def test_static_cache_compiled_decode_fullgraph():
    """generate's compiled decode path (forced on CPU, aot_eager backend so it is quick)."""
    ref, ours = _pair("llama")
    ids, mask, _, _ = _padded_batch()
    compile_config = CompileConfig(fullgraph=True, backend="aot_eager", mode=None)
    compile_config._compile_all_devices = True
    torch._dynamo.reset()
    got = _greedy(ours, ids, mask, cache_implementation="static", compile_config=compile_config)
    assert hasattr(ours, "_compiled_call"), "generate did not take the compiled decode path"
    assert got.tolist() == _greedy(ref, ids, mask, cache_implementation="static").tolist()


def test_forward_traces_fullgraph_with_dynamic_cache():
    ref, ours = _pair("qwen2")
    ids, mask, _, _ = _padded_batch()
    torch._dynamo.reset()
    compiled = torch.compile(ours, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        got = compiled(ids, attention_mask=mask).logits
        want = ref(ids, attention_mask=mask).logits
    assert _max_diff_on_tokens(got, want, mask) <= 1e-4


# -- flashkv's own cache: the second mode of the attention function ---------------------------


class _ConcatCache:
    """Minimal stand-in for flashkv's cache object: keeps K/V per layer, attends causally."""

    def __init__(self):
        self.keys, self.values, self.calls = {}, {}, []

    def attend(self, layer_idx, query, key, value, scaling):
        # query [B, H_q, S_q, D]; key/value [B, H_kv, S_q, D]: only the new tokens
        self.calls.append((layer_idx, tuple(query.shape), tuple(key.shape)))
        if layer_idx in self.keys:
            key = torch.cat([self.keys[layer_idx], key], dim=2)
            value = torch.cat([self.values[layer_idx], value], dim=2)
        self.keys[layer_idx], self.values[layer_idx] = key, value
        return flashkv_ops.attention(query, key, value, causal=True, scale=scaling)


def test_flashkv_cache_mode_routes_to_cache_attend():
    ref, ours = _pair("llama")
    ids = torch.randint(3, VOCAB, (1, 7), generator=torch.Generator().manual_seed(4))
    cache = _ConcatCache()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        prefill = ours(ids, use_cache=False, flashkv_cache=cache).logits
        next_token = torch.tensor([[5]])
        step = ours(next_token, position_ids=torch.tensor([[7]]), use_cache=False, flashkv_cache=cache).logits
    assert [c[0] for c in cache.calls] == [0, 1, 0, 1]
    assert cache.calls[0][1:] == ((1, 4, 7, 16), (1, 2, 7, 16))
    assert cache.calls[2][1:] == ((1, 4, 1, 16), (1, 2, 1, 16))
    with torch.no_grad():
        want = ref(torch.cat([ids, next_token], dim=1)).logits
    assert (prefill - want[:, :7]).abs().max().item() <= 1e-4
    assert (step - want[:, 7:]).abs().max().item() <= 1e-4


def test_flashkv_cache_mode_left_padded_prefill_is_cheap_and_silent():
    """generate-style position_ids on a left-padded batch look like packing to transformers; the
    mask that follows is never used in this mode, so it must not warn or build anything dense."""
    _, ours = _pair("llama")
    ids, mask, _, _ = _padded_batch()
    position_ids = (mask.cumsum(-1) - 1).clamp_min(0)
    cache = _ConcatCache()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        ours(ids, position_ids=position_ids, use_cache=False, flashkv_cache=cache)
    assert len(cache.calls) == 2


def test_flashkv_cache_mode_traces_fullgraph():
    ref, ours = _pair("llama")
    ids = torch.randint(3, VOCAB, (1, 7), generator=torch.Generator().manual_seed(4))
    cache = _ConcatCache()
    torch._dynamo.reset()
    compiled = torch.compile(ours, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        got = compiled(ids, use_cache=False, flashkv_cache=cache).logits
        want = ref(ids).logits
    assert (got - want).abs().max().item() <= 1e-4
    assert len(cache.calls) == 2


# -- loading and switching --------------------------------------------------------------------


def test_save_pretrained_round_trip(tmp_path):
    ref, _ = _pair("llama")
    ref.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="triton_kv").eval()
    assert loaded.config._attn_implementation == "triton_kv"
    ids, mask, _, _ = _padded_batch()
    with torch.no_grad():
        got = loaded(ids, attention_mask=mask).logits
        assert _max_diff_on_tokens(got, ref(ids, attention_mask=mask).logits, mask) <= 1e-4
    assert _greedy(loaded, ids, mask).tolist() == _greedy(ref, ids, mask).tolist()


@pytest.mark.parametrize("family", FAMILIES)
def test_apply_flashkv_dispatches_on_model_type(family):
    ref, _ = _pair(family)
    model = copy.deepcopy(ref)
    assert model_patches.apply_flashkv(model) is model
    assert model.config._attn_implementation == "triton_kv"
    model = copy.deepcopy(ref)
    getattr(model_patches, f"apply_flashkv_to_{family}")(model)
    assert model.config._attn_implementation == "triton_kv"


def test_apply_flashkv_rejects_other_families():
    ref, _ = _pair("llama")
    with pytest.raises(ValueError, match="model_type='llama'"):
        model_patches.apply_flashkv_to_qwen2(ref)
    ref.config.model_type = "gpt2"  # instance attribute shadows the class one
    with pytest.raises(ValueError, match="model_type"):
        model_patches.apply_flashkv(ref)


def test_apply_flashkv_to_llama_without_model_sets_class_default():
    try:
        model_patches.apply_flashkv_to_llama()
        model_patches.apply_flashkv_to_llama()  # idempotent
        model = AutoModelForCausalLM.from_config(_config("llama"))
        assert model.config._attn_implementation == "triton_kv"
        explicit = AutoModelForCausalLM.from_config(_config("llama"), attn_implementation="eager")
        assert explicit.config._attn_implementation == "eager"
        other = AutoModelForCausalLM.from_config(_config("qwen2"))
        assert other.config._attn_implementation != "triton_kv"
    finally:
        model_patches.revert_flashkv_defaults()
    assert AutoModelForCausalLM.from_config(_config("llama")).config._attn_implementation != "triton_kv"


def test_register_is_idempotent_and_complete():
    model_patches.register_triton_kv()
    model_patches.register_triton_kv()
    assert transformers.AttentionInterface._global_mapping["triton_kv"] is model_patches.triton_kv_attention
    masks = transformers.masking_utils.AttentionMaskInterface._global_mapping
    assert masks["triton_kv"] is model_patches.triton_kv_mask


def test_old_transformers_is_refused():
    with pytest.raises(ImportError, match=r"transformers >= 5\.0.*found transformers 4\.57\.1"):
        model_patches._check_transformers_version("4.57.1")
    model_patches._check_transformers_version("5.0.0")
    model_patches._check_transformers_version("5.17.0")


def test_dropout_is_refused():
    _, ours = _pair("llama", attention_dropout=0.1)
    ours.train()
    ids, mask, _, _ = _padded_batch()
    with pytest.raises(ValueError, match="dropout"):
        ours(ids, attention_mask=mask)


# -- the real Triton kernels, through the interpreter (slow: one tiny model) ------------------


def test_triton_interpreter_tiny_llama(triton_interpreter):
    ref, ours = _pair("llama", num_hidden_layers=1, hidden_size=32, num_attention_heads=4, head_dim=8)
    ids, mask, _, _ = _padded_batch()
    with torch.no_grad():
        got = ours(ids, attention_mask=mask).logits
        want = ref(ids, attention_mask=mask).logits
    assert _max_diff_on_tokens(got, want, mask) <= 1e-4
    kwargs = {"new_tokens": 3, "cache_implementation": "static"}
    assert _greedy(ours, ids, mask, **kwargs).tolist() == _greedy(ref, ids, mask, **kwargs).tolist()


# -- GPU: real shapes --------------------------------------------------------------------------


def _gpu_model(config, dtype, seed=0):
    torch.manual_seed(seed)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=dtype)
    return model.to("cuda").eval()


def _gpu_padded_batch(lengths, vocab, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    total = max(lengths)
    ids = torch.full((len(lengths), total), PAD, dtype=torch.long, device="cuda")
    mask = torch.zeros(len(lengths), total, dtype=torch.long, device="cuda")
    for row, length in enumerate(lengths):
        ids[row, total - length :] = torch.randint(3, vocab, (length,), generator=g, device="cuda")
        mask[row, total - length :] = 1
    return ids, mask


@pytest.mark.gpu
@requires_cuda
def test_gpu_llama31_8b_shape_bf16_logits():
    """Random Llama-3.1-8B-shaped layers in bf16: |triton_kv - sdpa| <= 2 * |sdpa - eager|."""
    config = LlamaConfig(
        vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=2,
        num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192, pad_token_id=PAD,
    )
    model = _gpu_model(config, torch.bfloat16)
    ids, mask = _gpu_padded_batch([512, 300], config.vocab_size)
    logits = {}
    with torch.no_grad():
        for impl in ("sdpa", "eager", "triton_kv"):
            model.set_attn_implementation(impl)
            logits[impl] = model(ids, attention_mask=mask).logits.float()
    ours = _max_diff_on_tokens(logits["triton_kv"], logits["sdpa"], mask)
    theirs = _max_diff_on_tokens(logits["sdpa"], logits["eager"], mask)
    print(f"max |triton_kv - sdpa| = {ours:.4g}, max |sdpa - eager| = {theirs:.4g}")
    assert ours <= 2 * theirs


@pytest.fixture
def _no_tf32():
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_gpu_tinyllama_shape_fp32_greedy(cache, _no_tf32):
    """TinyLlama-shaped layers, float32: 32 greedy tokens identical to transformers' sdpa.

    With ``cache_implementation="static"`` generate compiles the decode step (inductor,
    reduce-overhead) on CUDA for both models.
    """
    config = LlamaConfig(
        vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=4,
        num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048, pad_token_id=PAD,
    )
    ref = _gpu_model(config, torch.float32)
    ours = copy.deepcopy(ref)
    ours.set_attn_implementation("triton_kv")
    ids, mask = _gpu_padded_batch([40, 23], config.vocab_size)
    kwargs = {"cache_implementation": "static"} if cache == "static" else {}
    torch._dynamo.reset()
    got = _greedy(ours, ids, mask, new_tokens=32, **kwargs)
    if cache == "static":
        assert hasattr(ours, "_compiled_call"), "generate did not compile the decode step"
    want = _greedy(ref, ids, mask, new_tokens=32, **kwargs)
    assert got.tolist() == want.tolist()
