"""Bad inputs at the public boundary: the right exception type (ValueError for shapes, values and
lengths; TypeError for dtypes), a message naming the offending argument, and nothing written.

Every case builds small valid float32 CPU inputs, breaks exactly one thing, and checks that the
caches and ``cache_seqlens`` are bit-identical afterwards.
"""

import re

import pytest
import torch

import flashkv_ops as fkv
from reference import bit_equal

B, HQ, HKV, S_Q, S_MAX, D = 2, 4, 2, 3, 16, 16


def names_argument(message, names):
    """True if ``message`` mentions any of ``names`` as a whole identifier (so "S_q" or "q_len"
    do not count as naming ``q``)."""
    return any(re.search(rf"(?<![A-Za-z0-9_]){re.escape(n)}(?![A-Za-z0-9_])", message)
               for n in names)


def valid_cache_inputs(dtype=torch.float32):
    g = torch.Generator().manual_seed(0)

    def r(*shape):
        return torch.randn(*shape, generator=g).to(dtype)

    return dict(
        q=r(B, HQ, S_Q, D), k_cache=r(B, HKV, S_MAX, D), v_cache=r(B, HKV, S_MAX, D),
        cache_seqlens=torch.tensor([5, 9], dtype=torch.int32),
        k=r(B, HKV, S_Q, D), v=r(B, HKV, S_Q, D),
    )


def call_cache(a):
    return fkv.attention_with_kv_cache(a["q"], a["k_cache"], a["v_cache"], a["cache_seqlens"],
                                       a.get("k"), a.get("v"), **a.get("kwargs", {}))


def expect_error(a, exc_type, names):
    """Call the cache op on inputs ``a``; check exception type, message and no writes."""
    snapshot = {n: a[n].clone() for n in ("k_cache", "v_cache", "cache_seqlens")
                if isinstance(a.get(n), torch.Tensor)}
    with pytest.raises(exc_type) as info:
        call_cache(a)
    msg = str(info.value)
    assert names_argument(msg, names), f"message does not name any of {names}: {msg!r}"
    for n, before in snapshot.items():
        assert bit_equal(a[n], before), f"{n} was modified by a rejected call"


# -- the valid baseline really is valid ------------------------------------------------------

def test_baseline_inputs_are_accepted():
    a = valid_cache_inputs()
    out = call_cache(a)
    assert out.shape == (B, HQ, S_Q, D)


# -- attention_with_kv_cache --------------------------------------------------------------------

def _set(name, value):
    def mutate(a):
        a[name] = value(a) if callable(value) else value
    return mutate


CACHE_CASES = {
    # shapes / ranks
    "q_rank3": (_set("q", lambda a: a["q"][0]), ValueError, ["q"]),
    "k_cache_rank5": (_set("k_cache", lambda a: a["k_cache"][None]), ValueError, ["k_cache"]),
    "cache_seqlens_2d": (_set("cache_seqlens", lambda a: a["cache_seqlens"][:, None]),
                         ValueError, ["cache_seqlens"]),
    "cache_seqlens_wrong_len": (_set("cache_seqlens", torch.tensor([1, 2, 3], dtype=torch.int32)),
                                ValueError, ["cache_seqlens"]),
    "heads_not_divisible": (_set("q", lambda a: torch.randn(B, 3, S_Q, D)), ValueError,
                            ["q", "k_cache", "num_q_heads", "num_kv_heads"]),
    "new_k_heads_differ_from_cache": (
        lambda a: a.update(k=torch.randn(B, 1, S_Q, D), v=torch.randn(B, 1, S_Q, D)),
        ValueError, ["k", "v", "k_cache"]),
    "head_dim_mismatch_q": (_set("q", lambda a: torch.randn(B, HQ, S_Q, 32)), ValueError,
                            ["q", "k_cache", "head_dim"]),
    "v_cache_shape_mismatch": (_set("v_cache", lambda a: torch.randn(B, HKV, S_MAX + 1, D)),
                               ValueError, ["v_cache"]),
    "batch_mismatch": (_set("q", lambda a: torch.randn(B + 1, HQ, S_Q, D)), ValueError,
                       ["q", "k_cache", "cache_seqlens", "batch"]),
    "k_without_v": (_set("v", None), ValueError, ["k", "v"]),
    # flags
    "causal_none": (_set("kwargs", {"causal": None}), TypeError, ["causal"]),
    "causal_string": (_set("kwargs", {"causal": "yes"}), TypeError, ["causal"]),
    "scale_string": (_set("kwargs", {"scale": "0.25"}), TypeError, ["scale"]),
    "scale_nan": (_set("kwargs", {"scale": float("nan")}), ValueError, ["scale"]),
    "scale_bool": (_set("kwargs", {"scale": True}), TypeError, ["scale"]),
    "v_without_k": (_set("k", None), ValueError, ["k", "v"]),
    "new_tokens_len_differs_from_s_q": (
        lambda a: a.update(k=torch.randn(B, HKV, S_Q + 1, D), v=torch.randn(B, HKV, S_Q + 1, D)),
        ValueError, ["k"]),
    "v_len_differs_from_k": (_set("v", lambda a: torch.randn(B, HKV, S_Q - 1, D)), ValueError,
                             ["v"]),
    # unsupported head_dim everywhere (consistent shapes otherwise)
    "head_dim_12": (lambda a: a.update({n: a[n][..., :12].contiguous()
                                        for n in ("q", "k_cache", "v_cache", "k", "v")}),
                    ValueError, ["head_dim", "q"]),
    # dtypes
    "cache_seqlens_int64": (_set("cache_seqlens", lambda a: a["cache_seqlens"].long()),
                            TypeError, ["cache_seqlens"]),
    "cache_seqlens_float": (_set("cache_seqlens", lambda a: a["cache_seqlens"].float()),
                            TypeError, ["cache_seqlens"]),
    "q_dtype_differs": (_set("q", lambda a: a["q"].half()), TypeError, ["q", "k_cache"]),
    "v_cache_dtype_differs": (_set("v_cache", lambda a: a["v_cache"].half()), TypeError,
                              ["v_cache"]),
    "new_k_dtype_differs": (lambda a: a.update(k=a["k"].half(), v=a["v"].half()), TypeError,
                            ["k", "v"]),
    "int_tensors": (lambda a: a.update({n: a[n].to(torch.int32)
                                        for n in ("q", "k_cache", "v_cache", "k", "v")}),
                    TypeError, ["q", "k_cache"]),
    "float64_tensors": (lambda a: a.update({n: a[n].double()
                                            for n in ("q", "k_cache", "v_cache", "k", "v")}),
                        TypeError, ["q", "k_cache"]),
    # values (eager-mode checks)
    "negative_length": (_set("cache_seqlens", torch.tensor([-1, 3], dtype=torch.int32)),
                        ValueError, ["cache_seqlens"]),
    "overflow_by_one": (_set("cache_seqlens", torch.tensor([5, S_MAX - S_Q + 1], dtype=torch.int32)),
                        ValueError, ["cache_seqlens"]),
    "overflow_far": (_set("cache_seqlens", torch.tensor([1000, 0], dtype=torch.int32)),
                     ValueError, ["cache_seqlens"]),
    "overflow_without_new_tokens": (
        lambda a: a.update(k=None, v=None, cache_seqlens=torch.tensor([S_MAX + 1, 0],
                                                                       dtype=torch.int32)),
        ValueError, ["cache_seqlens"]),
}


@pytest.mark.parametrize("case", sorted(CACHE_CASES))
def test_kv_cache_rejects(case):
    mutate, exc_type, names = CACHE_CASES[case]
    a = valid_cache_inputs()
    mutate(a)
    expect_error(a, exc_type, names)


def test_head_dim_264_rejected():
    a = valid_cache_inputs()
    g = torch.Generator().manual_seed(1)
    for n in ("q", "k_cache", "v_cache", "k", "v"):
        shape = list(a[n].shape)
        shape[-1] = 264
        a[n] = torch.randn(*shape, generator=g)
    expect_error(a, ValueError, ["head_dim", "q"])


def test_overflow_message_is_specific():
    # DESIGN.md's example: the message says S_max and which batch entry overflowed.
    a = valid_cache_inputs()
    a["cache_seqlens"] = torch.tensor([0, S_MAX - 1], dtype=torch.int32)
    with pytest.raises(ValueError) as info:
        call_cache(a)
    msg = str(info.value)
    assert "cache_seqlens" in msg and str(S_MAX) in msg, msg


def test_exact_fit_is_not_overflow():
    a = valid_cache_inputs()
    a["cache_seqlens"] = torch.tensor([S_MAX - S_Q, 0], dtype=torch.int32)
    call_cache(a)
    a = valid_cache_inputs()
    a.update(k=None, v=None, cache_seqlens=torch.tensor([S_MAX, 0], dtype=torch.int32))
    call_cache(a)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("moved", ["q", "k_cache", "cache_seqlens", "k"])
def test_kv_cache_rejects_mixed_devices(moved):
    a = valid_cache_inputs()
    for n in ("q", "k_cache", "v_cache", "cache_seqlens", "k", "v"):
        if n != moved:
            a[n] = a[n].cuda()
    expect_error(a, ValueError, [moved, "device"])


# -- attention ----------------------------------------------------------------------------------

def valid_attention_inputs():
    g = torch.Generator().manual_seed(2)
    return dict(q=torch.randn(B, HQ, S_Q, D, generator=g),
                k=torch.randn(B, HKV, 7, D, generator=g),
                v=torch.randn(B, HKV, 7, D, generator=g))


ATTENTION_CASES = {
    "q_rank3": ("q", lambda a: a["q"][0], ValueError, ["q"]),
    "k_rank5": ("k", lambda a: a["k"][None], ValueError, ["k"]),
    "heads_not_divisible": ("k", lambda a: torch.randn(B, 3, 7, D), ValueError,
                            ["q", "k", "num_q_heads", "num_kv_heads"]),
    "v_heads_differ": ("v", lambda a: torch.randn(B, 1, 7, D), ValueError, ["v"]),
    "v_len_differs": ("v", lambda a: torch.randn(B, HKV, 6, D), ValueError, ["v"]),
    "head_dim_mismatch": ("k", lambda a: torch.randn(B, HKV, 7, 32), ValueError,
                          ["k", "head_dim"]),
    "batch_mismatch": ("k", lambda a: torch.randn(B + 1, HKV, 7, D), ValueError,
                       ["k", "batch"]),
    "k_dtype_differs": ("k", lambda a: a["k"].half(), TypeError, ["k"]),
    "v_dtype_differs": ("v", lambda a: a["v"].bfloat16(), TypeError, ["v"]),
    "q_int": ("q", lambda a: a["q"].to(torch.int64), TypeError, ["q"]),
}


@pytest.mark.parametrize("case", sorted(ATTENTION_CASES))
def test_attention_rejects(case):
    name, make, exc_type, names = ATTENTION_CASES[case]
    a = valid_attention_inputs()
    a[name] = make(a)
    with pytest.raises(exc_type) as info:
        fkv.attention(a["q"], a["k"], a["v"])
    assert names_argument(str(info.value), names), str(info.value)


@pytest.mark.parametrize("head_dim", [12, 4, 264])
def test_attention_rejects_unsupported_head_dim(head_dim):
    q = torch.randn(1, 2, 3, head_dim)
    k = torch.randn(1, 2, 5, head_dim)
    with pytest.raises(ValueError) as info:
        fkv.attention(q, k, k.clone())
    assert names_argument(str(info.value), ["head_dim", "q"]), str(info.value)


def test_attention_all_int_rejected_as_type_error():
    q = torch.ones(1, 2, 3, 16, dtype=torch.int32)
    with pytest.raises(TypeError) as info:
        fkv.attention(q, q.clone(), q.clone())
    assert names_argument(str(info.value), ["q", "k", "v"]), str(info.value)


# -- attention_with_key_ranges --------------------------------------------------------------------

def valid_range_inputs():
    a = valid_attention_inputs()
    a["key_start"] = torch.tensor([0, 2], dtype=torch.int32)
    a["key_end"] = torch.tensor([7, 5], dtype=torch.int32)
    return a


RANGE_CASES = {
    "key_start_int64": ("key_start", lambda a: a["key_start"].long(), TypeError, ["key_start"]),
    "key_end_float": ("key_end", lambda a: a["key_end"].float(), TypeError, ["key_end"]),
    "key_start_wrong_len": ("key_start", lambda a: torch.zeros(3, dtype=torch.int32),
                            ValueError, ["key_start"]),
    "key_end_2d": ("key_end", lambda a: a["key_end"][:, None], ValueError, ["key_end"]),
    # the window must lie inside [0, S_k]; reading past S_k would be out of bounds
    "key_end_past_s_k": ("key_end", lambda a: torch.tensor([8, 5], dtype=torch.int32),
                         ValueError, ["key_end"]),
    "key_start_negative": ("key_start", lambda a: torch.tensor([-1, 0], dtype=torch.int32),
                           ValueError, ["key_start"]),
    "q_dtype_differs": ("q", lambda a: a["q"].half(), TypeError, ["q", "k"]),
}


@pytest.mark.parametrize("case", sorted(RANGE_CASES))
def test_key_ranges_rejects(case):
    name, make, exc_type, names = RANGE_CASES[case]
    a = valid_range_inputs()
    fkv.attention_with_key_ranges(a["q"], a["k"], a["v"], a["key_start"], a["key_end"])
    a[name] = make(a)
    with pytest.raises(exc_type) as info:
        fkv.attention_with_key_ranges(a["q"], a["k"], a["v"], a["key_start"], a["key_end"])
    assert names_argument(str(info.value), names), str(info.value)


def test_numpy_flags_are_taken_as_python_ones():
    import numpy as np
    a = valid_cache_inputs()
    want = fkv.attention(a["q"], a["k_cache"], a["v_cache"], causal=True, scale=0.25)
    got = fkv.attention(a["q"], a["k_cache"], a["v_cache"], causal=np.True_, scale=np.float32(0.25))
    assert torch.equal(got, want)
    with pytest.raises(TypeError, match="causal"):
        fkv.attention_with_key_ranges(a["q"], a["k_cache"], a["v_cache"], a["cache_seqlens"] * 0,
                                      a["cache_seqlens"], causal=None)
