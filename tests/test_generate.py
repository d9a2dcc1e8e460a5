"""flashkv_ops.generate and StaticKVCache against transformers' own generate.

CPU tests use tiny random float32 models (1-2 layers, hidden 64). Most of them exercise the decode
loop (re-alignment of left padding, per-sequence lengths, EOS, cache reuse, restoring the model)
and run the ops' PyTorch fallback for speed; the kernels themselves are covered by
test_attention.py / test_kv_cache.py, and one test here runs the whole model through the Triton
interpreter. GPU-marked tests check the CUDA-graph decode on a TinyLlama-shape model.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import flashkv_ops
from flashkv_ops import StaticKVCache, generate

transformers = pytest.importorskip("transformers")
from transformers import (  # noqa: E402
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Phi3Config,
    Phi3ForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

# The submodule, not the function that flashkv_ops exports under the same name.
generate_module = importlib.import_module("flashkv_ops.generate")
ops_module = importlib.import_module("flashkv_ops.ops")

REPO = Path(__file__).resolve().parents[1]
VOCAB = 128
EOS, PAD = 2, 0

TINY = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=VOCAB,
    max_position_embeddings=512,
    bos_token_id=1,
    eos_token_id=EOS,
    pad_token_id=PAD,
)
FAMILIES = {
    "llama": (LlamaConfig, LlamaForCausalLM),
    "mistral": (MistralConfig, MistralForCausalLM),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM),
    "phi3": (Phi3Config, Phi3ForCausalLM),
}


def tiny_model(model_type: str = "llama", seed: int = 0, default_eos: bool = False, **overrides):
    """Random tiny model. Unless ``default_eos``, its generation config has no EOS, so that both
    libraries decode the full length (random weights emit EOS by chance, often at once)."""
    config_class, model_class = FAMILIES[model_type]
    torch.manual_seed(seed)
    model = model_class(config_class(**{**TINY, **overrides})).eval()
    if not default_eos:
        model.generation_config.eos_token_id = None
    return model


@pytest.fixture
def fallback_ops(monkeypatch):
    """Run the ops' PyTorch fallback on CPU even under TRITON_INTERPRET=1 (speed; see module doc)."""
    monkeypatch.setattr(ops_module, "_INTERPRET", False, raising=False)


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama")


def prompts(batch: int, length: int, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    # ids >= 3: no prompt contains BOS/EOS/PAD
    return torch.randint(3, VOCAB, (batch, length), generator=generator)


def left_pad(rows: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad 1-D token rows with PAD: ids [B, P] and mask [B, P]."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), PAD, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for b, row in enumerate(rows):
        ids[b, width - len(row):] = row
        mask[b, width - len(row):] = 1
    return ids, mask


def transformers_greedy(model, ids, mask=None, max_new_tokens=8, **kwargs) -> torch.Tensor:
    return model.generate(ids, attention_mask=mask if mask is not None else torch.ones_like(ids),
                          max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=PAD, **kwargs)


def assert_same_tokens(ours: torch.Tensor, reference: torch.Tensor) -> None:
    """transformers stops early when every row has finished; the rest of ours must be padding."""
    width = reference.shape[1]
    assert ours.shape[1] >= width
    assert torch.equal(ours[:, :width], reference), f"\nours:\n{ours}\ntransformers:\n{reference}"
    assert bool((ours[:, width:] == PAD).all())


# -- StaticKVCache -------------------------------------------------------------------------------


@settings(deadline=None, max_examples=10)
@given(
    num_layers=st.integers(1, 3),
    batch_size=st.integers(1, 3),
    num_kv_heads=st.integers(1, 4),
    max_seq_len=st.integers(1, 40),
    head_dim=st.sampled_from([8, 16, 80]),
    dtype=st.sampled_from([torch.float16, torch.bfloat16, torch.float32]),
)
def test_cache_memory_is_exact(num_layers, batch_size, num_kv_heads, max_seq_len, head_dim, dtype):
    cache = StaticKVCache(num_layers, batch_size, num_kv_heads, max_seq_len, head_dim, dtype=dtype)
    expected = 2 * num_layers * batch_size * num_kv_heads * max_seq_len * head_dim * dtype.itemsize
    assert cache.nbytes == expected
    assert len(cache.key_cache) == len(cache.value_cache) == num_layers
    for buffer in (*cache.key_cache, *cache.value_cache):
        assert buffer.shape == (batch_size, num_kv_heads, max_seq_len, head_dim)
        assert buffer.dtype == dtype
    assert cache.seqlens.dtype == torch.int32 and cache.seqlens.shape == (batch_size,)
    assert (cache.batch_size, cache.max_seq_len, cache.num_layers) == (batch_size, max_seq_len, num_layers)
    # buffers, not parameters, and kept out of state_dict
    assert list(cache.parameters()) == [] and cache.state_dict() == {}


def test_cache_from_config_shapes():
    config = LlamaConfig(**TINY)
    cache = StaticKVCache.from_config(config, batch_size=3, max_seq_len=20, dtype=torch.bfloat16)
    assert (cache.num_layers, cache.num_kv_heads, cache.head_dim) == (2, 2, 16)
    config = LlamaConfig(**{**TINY, "head_dim": 8})  # explicit head_dim wins over hidden / heads
    assert StaticKVCache.from_config(config, 1, 4).head_dim == 8
    model = tiny_model()
    cache = StaticKVCache.from_model(model, batch_size=2, max_seq_len=16)
    assert cache.dtype == torch.float32 and cache.batch_size == 2


def test_cache_rejects_bad_sizes():
    with pytest.raises(ValueError, match="max_seq_len"):
        StaticKVCache(1, 1, 1, 0, 8)
    with pytest.raises(TypeError, match="dtype"):
        StaticKVCache(1, 1, 1, 4, 8, dtype=torch.int32)


def test_cache_attend_writes_at_seqlens_and_advance(fallback_ops):
    torch.manual_seed(0)
    cache = StaticKVCache(2, 2, 1, 8, 8, dtype=torch.float32)
    cache.seqlens.copy_(torch.tensor([0, 3], dtype=torch.int32))
    q, k, v = torch.randn(2, 2, 2, 8), torch.randn(2, 1, 2, 8), torch.randn(2, 1, 2, 8)
    out = cache.attend(1, q, k, v)
    assert out.shape == (2, 2, 2, 8)
    assert torch.equal(cache.key_cache[1][0, :, 0:2], k[0]) and torch.equal(cache.value_cache[1][1, :, 3:5], v[1])
    assert bool((cache.key_cache[0] == 0).all())  # other layers untouched
    assert cache.seqlens.tolist() == [0, 3]  # attend never moves the lengths
    cache.advance(2)
    assert cache.seqlens.tolist() == [2, 5]
    cache.reset()
    assert cache.seqlens.tolist() == [0, 0]
    with pytest.raises(ValueError, match="layer_idx"):
        cache.attend(2, q, k, v)


# -- greedy equality with transformers ------------------------------------------------------------


@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_greedy_single_prompt_matches_transformers(model_type, fallback_ops):
    model = tiny_model(model_type)
    ids = prompts(1, 7)
    reference = transformers_greedy(model, ids, max_new_tokens=12)
    ours = generate(model, ids, max_new_tokens=12)
    assert ours.shape == (1, 7 + 12)
    assert_same_tokens(ours, reference)


def test_greedy_left_padded_batch_rows_equal_unbatched(llama, fallback_ops):
    rows = [prompts(1, n, seed=n)[0] for n in (9, 4, 6)]
    ids, mask = left_pad(rows)
    ours = generate(llama, ids, mask, max_new_tokens=10)
    assert torch.equal(ours[:, : ids.shape[1]], ids)  # prompts returned as given
    assert_same_tokens(ours, transformers_greedy(llama, ids, mask, max_new_tokens=10))
    for b, row in enumerate(rows):
        alone = generate(llama, row[None], max_new_tokens=10)
        assert torch.equal(ours[b, ids.shape[1]:], alone[0, len(row):]), f"row {b}"
        assert_same_tokens(alone, transformers_greedy(llama, row[None], max_new_tokens=10))


@settings(deadline=None, max_examples=5)
@given(lengths=st.lists(st.integers(1, 11), min_size=1, max_size=4), new_tokens=st.integers(1, 9))
def test_left_padding_patterns_are_realigned(llama, lengths, new_tokens):
    # (fixture-free variant of fallback_ops: hypothesis forbids function-scoped fixtures)
    saved = getattr(ops_module, "_INTERPRET", None)
    ops_module._INTERPRET = False
    try:
        rows = [prompts(1, n, seed=10 * b + n)[0] for b, n in enumerate(lengths)]
        ids, mask = left_pad(rows)
        batched = generate(llama, ids, mask, max_new_tokens=new_tokens, ignore_eos=True)
        for b, row in enumerate(rows):
            alone = generate(llama, row[None], max_new_tokens=new_tokens, ignore_eos=True)
            assert torch.equal(batched[b, ids.shape[1]:], alone[0, len(row):]), f"row {b} of {lengths}"
    finally:
        ops_module._INTERPRET = saved


def test_triton_kernels_through_interpreter():
    """The real kernels (under TRITON_INTERPRET=1 from conftest): prefill and decode both."""
    model = tiny_model(num_hidden_layers=1)
    ids, mask = left_pad([prompts(1, 5)[0], prompts(1, 3, seed=2)[0]])
    ours = generate(model, ids, mask, max_new_tokens=4)
    assert_same_tokens(ours, transformers_greedy(model, ids, mask, max_new_tokens=4))


def test_compiled_decode_step_matches(fallback_ops):
    model = tiny_model(num_hidden_layers=1, seed=5)
    ids, mask = left_pad([prompts(1, 5)[0], prompts(1, 3, seed=2)[0]])
    eager = generate(model, ids, mask, max_new_tokens=6)
    cache = StaticKVCache.from_model(model, batch_size=2, max_seq_len=16)
    compiled = generate(model, ids, mask, max_new_tokens=6, compile=True, cache=cache)
    assert torch.equal(compiled, eager)
    assert cache._decode_graph.forward is not generate_module._decode_forward


# -- EOS -----------------------------------------------------------------------------------------


def test_eos_stops_one_sequence_while_other_continues(llama, fallback_ops):
    ids, mask = left_pad([prompts(1, 6)[0], prompts(1, 8, seed=5)[0]])
    new = 12
    free = generate(llama, ids, mask, max_new_tokens=new, ignore_eos=True)[:, ids.shape[1]:]
    # An EOS that row 0 emits at some step >= 1 and row 1 never emits.
    step, eos = next(
        (s, int(t)) for s, t in enumerate(free[0].tolist())
        if s >= 1 and t not in free[1].tolist() and t not in free[0, :s].tolist() and t != PAD
    )
    ours = generate(llama, ids, mask, max_new_tokens=new, eos_token_id=eos, pad_token_id=PAD)
    generated = ours[:, ids.shape[1]:]
    assert torch.equal(generated[0, : step + 1], free[0, : step + 1])  # EOS itself is emitted
    assert bool((generated[0, step + 1:] == PAD).all())
    assert torch.equal(generated[1], free[1])
    reference = transformers_greedy(llama, ids, mask, max_new_tokens=new, eos_token_id=eos)
    assert_same_tokens(ours, reference)


def test_all_rows_finished_keeps_full_width(llama, fallback_ops, monkeypatch):
    monkeypatch.setattr(generate_module, "_EOS_CHECK_INTERVAL", 2)
    ids = prompts(1, 5)
    first = int(generate(llama, ids, max_new_tokens=1, ignore_eos=True)[0, -1])
    seen = []
    ours = generate(llama, ids, max_new_tokens=30, eos_token_id=[first, 9999], pad_token_id=PAD,
                    callback=lambda step, tokens, logits: seen.append(step))
    assert ours.shape == (1, 5 + 30)
    assert int(ours[0, 5]) == first and bool((ours[0, 6:] == PAD).all())
    assert len(seen) < 30  # the loop stopped early instead of decoding padding


def test_default_eos_is_generation_config(fallback_ops):
    model = tiny_model(default_eos=True)
    assert model.generation_config.eos_token_id == EOS
    # with these weights row 0 emits EOS as its first token, row 1 never does
    ids, mask = left_pad([prompts(1, 7)[0], prompts(2, 5)[0]])
    ours = generate(model, ids, mask, max_new_tokens=20)
    generated = ours[:, ids.shape[1]:]
    assert int(generated[0, 0]) == EOS and bool((generated[0, 1:] == PAD).all())
    assert not bool((generated[1] == EOS).any())
    assert_same_tokens(ours, transformers_greedy(model, ids, mask, max_new_tokens=20))


# -- cache reuse, errors, restoring the model -----------------------------------------------------


def test_two_calls_reuse_one_cache(llama, fallback_ops):
    ids, mask = left_pad([prompts(1, 5)[0], prompts(1, 7, seed=3)[0]])
    cache = StaticKVCache.from_model(llama, batch_size=2, max_seq_len=32)
    addresses = [t.data_ptr() for t in (*cache.key_cache, *cache.value_cache, cache.seqlens)]
    first = generate(llama, ids, mask, max_new_tokens=9, cache=cache)
    runner = cache._decode_graph
    second = generate(llama, ids, mask, max_new_tokens=9, cache=cache)
    assert torch.equal(first, second)
    assert cache._decode_graph is runner
    assert [t.data_ptr() for t in (*cache.key_cache, *cache.value_cache, cache.seqlens)] == addresses
    assert cache.seqlens.tolist() == [5 + 8, 7 + 8]  # the last token is never fed back


def test_implicit_cache_is_reused(fallback_ops):
    model = tiny_model(seed=3)
    ids = prompts(2, 6)
    first = generate(model, ids, max_new_tokens=5)
    cache = generate_module._implicit_caches[model]
    second = generate(model, ids[:, 1:], max_new_tokens=7)  # different lengths, same batch size
    assert generate_module._implicit_caches[model] is cache
    assert torch.equal(generate(model, ids, max_new_tokens=5), first)
    assert second.shape == (2, 5 + 7)


def test_request_longer_than_cache_is_refused(llama, fallback_ops):
    ids = prompts(1, 10)
    cache = StaticKVCache.from_model(llama, batch_size=1, max_seq_len=16)
    with pytest.raises(ValueError, match=r"10 \+ max_new_tokens|= 20 exceeds the cache capacity max_seq_len=16"):
        generate(llama, ids, max_new_tokens=10, cache=cache)
    assert generate(llama, ids, max_new_tokens=6, cache=cache).shape == (1, 16)  # exactly full is fine
    with pytest.raises(ValueError, match="max_cache_len=12"):
        generate(llama, ids, max_new_tokens=3, max_cache_len=12)
    with pytest.raises(ValueError, match="batch_size"):
        generate(llama, prompts(2, 4), max_new_tokens=2, cache=cache)


def test_sliding_window_limit_is_refused(fallback_ops):
    # The last token generated is never fed back: with a 4-token prompt and 9 new tokens the last
    # query sees 12 keys, all inside a window of 12, so the tokens are transformers' own.
    model = tiny_model("mistral", sliding_window=12)
    ids = prompts(1, 4)
    assert_same_tokens(generate(model, ids, max_new_tokens=9), transformers_greedy(model, ids, max_new_tokens=9))
    with pytest.raises(ValueError, match="sliding_window=12"):
        generate(model, ids, max_new_tokens=10)


def test_bad_arguments_are_refused(llama):
    ids = prompts(2, 4)
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(llama, ids, max_new_tokens=0)
    with pytest.raises(ValueError, match="attention_mask"):
        generate(llama, ids, torch.tensor([[1, 1, 1, 1], [0, 0, 0, 0]]), max_new_tokens=2)
    with pytest.raises(ValueError, match="attention_mask"):
        generate(llama, ids, torch.ones(2, 3), max_new_tokens=2)
    with pytest.raises(ValueError, match="input_ids"):
        generate(llama, ids[0], max_new_tokens=2)
    with pytest.raises(ValueError, match="input_ids"):
        generate(llama, ids[:0], max_new_tokens=2)
    with pytest.raises(TypeError, match="max_new_tokens"):
        generate(llama, ids, max_new_tokens=2.5)
    with pytest.raises(TypeError, match="max_new_tokens"):
        generate(llama, ids, max_new_tokens=True)
    with pytest.raises(TypeError, match="attention_mask"):
        generate(llama, ids, [[1] * 4] * 2, max_new_tokens=2)
    with pytest.raises(TypeError, match="max_cache_len"):
        generate(llama, ids, max_new_tokens=2, max_cache_len=100.0)
    with pytest.raises(TypeError, match="eos_token_id"):
        generate(llama, ids, max_new_tokens=2, eos_token_id="a")
    with pytest.raises(TypeError, match="top_p"):
        generate(llama, ids, max_new_tokens=2, do_sample=True, top_p="0.5")
    with pytest.raises(TypeError, match="temperature"):
        generate(llama, ids, max_new_tokens=2, do_sample=True, temperature="hot")
    with pytest.raises(TypeError, match="top_k"):
        generate(llama, ids, max_new_tokens=2, do_sample=True, top_k=2.5)
    with pytest.raises(ValueError, match="temperature"):
        generate(llama, ids, max_new_tokens=2, do_sample=True, temperature=0.0)
    with pytest.raises(ValueError, match="cuda_graph"):
        generate(llama, ids, max_new_tokens=2, cuda_graph=True)


@pytest.mark.parametrize("count", [np.int64(2), torch.tensor(2)])
def test_max_new_tokens_takes_any_integer_type(llama, fallback_ops, count):
    ids = prompts(2, 4)
    assert torch.equal(generate(llama, ids, max_new_tokens=count), generate(llama, ids, max_new_tokens=2))


def test_cache_attend_and_advance_name_their_arguments():
    cache = StaticKVCache(2, 2, 1, 8, 8, dtype=torch.float32)
    q, k, v = torch.randn(2, 2, 2, 8), torch.randn(2, 1, 2, 8), torch.randn(2, 1, 2, 8)
    bad_calls = [
        (lambda: cache.attend(0, q[:1], k, v), ValueError, "query"),
        (lambda: cache.attend(0, q[..., :4], k, v), ValueError, "query"),
        (lambda: cache.attend(0, q.double(), k, v), TypeError, "query"),
        (lambda: cache.attend(0, q, k[:, :, :1], v), ValueError, "key"),
        (lambda: cache.attend(0, q, k, v.double()), TypeError, "value"),
        (lambda: cache.attend(0, q, k, "v"), TypeError, "value"),
        (lambda: cache.attend(1.5, q, k, v), TypeError, "layer_idx"),
        (lambda: cache.advance(-1), ValueError, "num_tokens"),
        (lambda: cache.advance(9), ValueError, "max_seq_len"),
        (lambda: cache.advance(1.5), TypeError, "num_tokens"),
        (lambda: cache.advance(torch.tensor([1.0, 2.0])), TypeError, "num_tokens"),
        (lambda: cache.advance(torch.tensor([1, 2, 3])), ValueError, "num_tokens"),
        (lambda: StaticKVCache(1, 1, 1, 4, 12), ValueError, "head_dim"),
    ]
    for call, error, name in bad_calls:
        with pytest.raises(error, match=name):
            call()
    assert cache.seqlens.tolist() == [0, 0] and bool((cache.key_cache[0] == 0).all())
    cache.advance(torch.tensor([1, 2], dtype=torch.int32))
    cache.advance(np.int64(1))
    assert cache.seqlens.tolist() == [2, 3]


def test_runtime_rope_types_are_detected():
    # these recompute RoPE frequencies from a host read of the positions: no graph capture
    assert generate_module._runtime_rope_types(LlamaConfig(**TINY)) == []
    dynamic = LlamaConfig(**TINY, rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4})
    assert generate_module._runtime_rope_types(dynamic) == ["dynamic"]


def test_unsupported_model_is_refused():
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64, n_positions=32)).eval()
    with pytest.raises(ValueError, match="model_type='gpt2'"):
        generate(model, torch.tensor([[5, 6, 7]]), max_new_tokens=2)


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
def test_attn_implementation_is_restored(implementation, fallback_ops):
    model = tiny_model(seed=4)
    model.set_attn_implementation(implementation)
    ids, mask = left_pad([prompts(1, 5)[0], prompts(1, 3, seed=2)[0]])
    before = transformers_greedy(model, ids, mask, max_new_tokens=6)
    generate(model, ids, mask, max_new_tokens=6)
    assert model.config._attn_implementation == implementation
    assert all(m.config._attn_implementation == implementation
               for m in model.modules() if hasattr(m, "config") and hasattr(m.config, "_attn_implementation"))

    def fail(step, tokens, logits):
        raise RuntimeError("stop")

    with pytest.raises(RuntimeError, match="stop"):
        generate(model, ids, mask, max_new_tokens=6, callback=fail)
    assert model.config._attn_implementation == implementation
    assert torch.equal(transformers_greedy(model, ids, mask, max_new_tokens=6), before)


# -- sampling ------------------------------------------------------------------------------------


def test_sampling_is_seeded_and_top_k_1_is_greedy(llama, fallback_ops):
    ids = prompts(2, 5)
    greedy = generate(llama, ids, max_new_tokens=8, ignore_eos=True)
    top1 = generate(llama, ids, max_new_tokens=8, ignore_eos=True, do_sample=True, top_k=1)
    assert torch.equal(top1, greedy)
    tiny_p = generate(llama, ids, max_new_tokens=8, ignore_eos=True, do_sample=True, top_p=1e-6)
    assert torch.equal(tiny_p, greedy)
    runs = [
        generate(llama, ids, max_new_tokens=8, ignore_eos=True, do_sample=True, temperature=1.5, top_k=20,
                 top_p=0.9, generator=torch.Generator().manual_seed(7))
        for _ in range(2)
    ]
    assert torch.equal(runs[0], runs[1])
    assert bool(((runs[0] >= 0) & (runs[0] < VOCAB)).all())


# -- the main job ----------------------------------------------------------------------------------


def test_example_runs_on_cpu_with_defaults():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # as a user runs it
    env["CUDA_VISIBLE_DEVICES"] = ""
    start = time.perf_counter()
    result = subprocess.run([sys.executable, str(REPO / "examples" / "generate.py")], capture_output=True,
                            text=True, timeout=180, env=env, cwd=REPO)
    elapsed = time.perf_counter() - start
    assert result.returncode == 0, result.stderr[-3000:]
    assert "tok/s" in result.stdout and "GB/s" in result.stdout, result.stdout
    assert elapsed < 60, f"examples/generate.py took {elapsed:.0f} s on CPU"


# -- GPU: the CUDA-graph decode -------------------------------------------------------------------

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(scope="module")
def tinyllama_fp32():
    """TinyLlama-1.1B shape (4 of its 22 layers), random weights, float32 with TF32 off."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=2048, intermediate_size=5632, num_hidden_layers=4, num_attention_heads=32,
                         num_key_value_heads=4, vocab_size=32000, max_position_embeddings=2048,
                         rms_norm_eps=1e-5, eos_token_id=EOS, bos_token_id=1, pad_token_id=PAD)
    with torch.device("cuda"):
        model = LlamaForCausalLM(config).eval()
    # decode full length in both libraries: random weights hit EOS by chance
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = PAD
    yield model
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def cuda_prompts():
    rows = [prompts(1, 17, seed=1)[0], prompts(1, 9, seed=2)[0]]
    ids, mask = left_pad(rows)
    return ids.cuda(), mask.cuda()


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("batched", [False, True])
def test_gpu_graph_decode_matches_transformers_64_steps(tinyllama_fp32, batched):
    ids, mask = cuda_prompts()
    if not batched:
        ids, mask = ids[:1], mask[:1]
    ours = generate(tinyllama_fp32, ids, mask, max_new_tokens=64, cuda_graph=True)
    reference = tinyllama_fp32.generate(ids, attention_mask=mask, max_new_tokens=64, do_sample=False)
    assert torch.equal(ours, reference)


@pytest.mark.gpu
@requires_cuda
def test_gpu_graph_equals_eager_over_200_steps(tinyllama_fp32):
    ids, mask = cuda_prompts()
    captured = generate(tinyllama_fp32, ids, mask, max_new_tokens=200, cuda_graph=True)
    eager = generate(tinyllama_fp32, ids, mask, max_new_tokens=200, cuda_graph=False)
    assert torch.equal(captured, eager)


@pytest.mark.gpu
@requires_cuda
def test_gpu_compiled_graph_equals_eager(tinyllama_fp32):
    ids, mask = cuda_prompts()
    compiled = generate(tinyllama_fp32, ids, mask, max_new_tokens=64, compile=True)
    eager = generate(tinyllama_fp32, ids, mask, max_new_tokens=64, cuda_graph=False)
    assert torch.equal(compiled, eager)


@pytest.mark.gpu
@requires_cuda
def test_gpu_graph_is_captured_once_and_reused(tinyllama_fp32):
    ids, mask = cuda_prompts()
    cache = StaticKVCache.from_model(tinyllama_fp32, batch_size=2, max_seq_len=96)
    first = generate(tinyllama_fp32, ids, mask, max_new_tokens=40, cache=cache)
    graph = cache._decode_graph.graph
    assert graph is not None
    second = generate(tinyllama_fp32, ids, mask, max_new_tokens=40, cache=cache)
    assert cache._decode_graph.graph is graph
    assert torch.equal(first, second)


@pytest.mark.gpu
@requires_cuda
def test_gpu_1000_steps_memory_flat_no_nan(tinyllama_fp32):
    ids, mask = cuda_prompts()
    allocated = []
    # preallocated and written in place: appending a fresh flag tensor per step would itself grow memory
    finite = torch.zeros(1000, dtype=torch.bool, device="cuda")

    def record(step, tokens, logits):
        allocated.append(torch.cuda.memory_allocated())
        finite[step] = torch.isfinite(logits).all()  # stays on the device: no sync per step

    out = generate(tinyllama_fp32, ids, mask, max_new_tokens=1000, callback=record)
    assert out.shape == (2, ids.shape[1] + 1000)
    assert len(allocated) == 1000
    assert len(set(allocated[1:])) == 1, f"memory moved after the first step: {sorted(set(allocated[1:]))[:5]}"
    assert bool(finite.all())

