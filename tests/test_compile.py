"""The registered ops under ``torch.library.opcheck`` and ``torch.compile(fullgraph=True)``.

On CPU the compile uses the Inductor CPU backend around the (interpreted) Triton kernels, so
this file compiles exactly once: one function calls every public entry point.
"""

import pytest
import torch

import flashkv_ops as fkv
from reference import bit_equal, kv_cache_ref, max_err, randn

GPU = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
DEVICES = ["cpu", pytest.param("cuda", marks=GPU)]


def _to(device, *tensors):
    return [None if t is None else t.to(device) for t in tensors]


def _small(g, dtype=torch.float32):
    return dict(
        q=randn((2, 4, 3, 16), dtype, generator=g),
        k_cache=randn((2, 2, 16, 16), dtype, generator=g),
        v_cache=randn((2, 2, 16, 16), dtype, generator=g),
        cache_seqlens=torch.tensor([2, 7], dtype=torch.int32),
        k=randn((2, 2, 3, 16), dtype, generator=g),
        v=randn((2, 2, 3, 16), dtype, generator=g),
    )


def test_ops_are_registered_with_contract_argument_names():
    s = torch.ops.flashkv.attention.default._schema
    assert [a.name for a in s.arguments] == ["q", "k", "v", "causal", "scale"]
    s = torch.ops.flashkv.attention_with_kv_cache.default._schema
    assert [a.name for a in s.arguments] == ["q", "k_cache", "v_cache", "cache_seqlens", "k", "v",
                                             "causal", "scale", "block_table"]
    mutated = {a.name for a in s.arguments if a.alias_info is not None and a.alias_info.is_write}
    assert mutated == {"k_cache", "v_cache"}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_opcheck_attention(dtype, device):
    g = torch.Generator().manual_seed(0)
    q = randn((1, 4, 5, 16), dtype, device, generator=g, bshd=True)
    k = randn((1, 2, 7, 16), dtype, device, generator=g)
    v = randn((1, 2, 7, 16), dtype, device, generator=g)
    torch.library.opcheck(torch.ops.flashkv.attention.default, (q, k, v),
                          {"causal": True, "scale": None})
    torch.library.opcheck(torch.ops.flashkv.attention.default, (q, k, v),
                          {"causal": False, "scale": 0.5})


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_attention_with_kv_cache(device):
    g = torch.Generator().manual_seed(1)
    a = {n: t.to(device) for n, t in _small(g).items()}
    args = (a["q"], a["k_cache"], a["v_cache"], a["cache_seqlens"], a["k"], a["v"])
    torch.library.opcheck(torch.ops.flashkv.attention_with_kv_cache.default, args,
                          {"causal": True, "scale": None, "block_table": None})
    # without new tokens (k=None, v=None): read-only attention over the cache
    args = (a["q"], a["k_cache"], a["v_cache"], a["cache_seqlens"], None, None)
    torch.library.opcheck(torch.ops.flashkv.attention_with_kv_cache.default, args,
                          {"causal": False, "scale": None, "block_table": None})


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_attention_with_kv_cache_paged(device):
    g = torch.Generator().manual_seed(2)
    k_pages = randn((6, 2, 4, 16), torch.float32, generator=g)
    v_pages = randn((6, 2, 4, 16), torch.float32, generator=g)
    table = torch.tensor([[4, 1, -1], [0, 5, 2]], dtype=torch.int32)
    lens = torch.tensor([3, 8], dtype=torch.int32)
    q = randn((2, 4, 2, 16), torch.float32, generator=g)
    k = randn((2, 2, 2, 16), torch.float32, generator=g)
    v = randn((2, 2, 2, 16), torch.float32, generator=g)
    k_pages, v_pages, table, lens, q, k, v = _to(device, k_pages, v_pages, table, lens, q, k, v)
    torch.library.opcheck(torch.ops.flashkv.attention_with_kv_cache.default,
                          (q, k_pages, v_pages, lens, k, v),
                          {"causal": True, "scale": None, "block_table": table})


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_attention_with_key_ranges(device):
    g = torch.Generator().manual_seed(3)
    q = randn((2, 4, 3, 16), torch.float32, generator=g)
    k = randn((2, 2, 9, 16), torch.float32, generator=g)
    v = randn((2, 2, 9, 16), torch.float32, generator=g)
    ks = torch.tensor([0, 4], dtype=torch.int32)
    ke = torch.tensor([9, 7], dtype=torch.int32)
    q, k, v, ks, ke = _to(device, q, k, v, ks, ke)
    torch.library.opcheck(torch.ops.flashkv.attention_with_key_ranges.default, (q, k, v, ks, ke),
                          {"causal": True, "scale": None})


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_paged_read_order(device):
    table = torch.tensor([[4, 1, 3, -1], [0, 5, 2, 6]], dtype=torch.int32)
    lens = torch.tensor([9, 16], dtype=torch.int32)
    table, lens = _to(device, table, lens)
    torch.library.opcheck(torch.ops.flashkv.paged_read_order.default, (table, lens, 4))


def _everything(q, k_cache, v_cache, cache_seqlens, k, v, q2, k2, v2, key_start, key_end,
                k_pages, v_pages, block_table):
    # prefill-style attention, a cache step, a key-range call, a paged step and a paged read
    # through the read-order table in one graph
    a = fkv.attention(q2, k2, v2, causal=True)
    b = fkv.attention_with_kv_cache(q, k_cache, v_cache, cache_seqlens, k, v)
    c = fkv.attention_with_key_ranges(q2, k2, v2, key_start, key_end, causal=True)
    d = fkv.attention_with_kv_cache(q, k_pages, v_pages, cache_seqlens, k, v,
                                    block_table=block_table)
    ordered = fkv.paged_read_order(block_table, cache_seqlens, k_pages.shape[2])
    e = fkv.attention_with_kv_cache(q, k_pages, v_pages, cache_seqlens, causal=False, block_table=ordered)
    return a * 2, b + 1, c, d, e, ordered


@pytest.mark.parametrize("device", DEVICES)
def test_compile_fullgraph_matches_eager_and_mutates_cache(device):
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(4)
    a = _small(g)
    q2 = randn((2, 4, 6, 16), torch.float32, generator=g)
    k2 = randn((2, 2, 6, 16), torch.float32, generator=g)
    v2 = randn((2, 2, 6, 16), torch.float32, generator=g)
    ks = torch.tensor([1, 0], dtype=torch.int32)
    ke = torch.tensor([6, 4], dtype=torch.int32)
    k_pages = randn((8, 2, 4, 16), torch.float32, generator=g)
    v_pages = randn((8, 2, 4, 16), torch.float32, generator=g)
    table = torch.tensor([[7, 2, -1, -1], [3, 0, 5, 1]], dtype=torch.int32)
    args = _to(device, a["q"], a["k_cache"], a["v_cache"], a["cache_seqlens"], a["k"], a["v"],
               q2, k2, v2, ks, ke, k_pages, v_pages, table)
    a = dict(zip(["q", "k_cache", "v_cache", "cache_seqlens", "k", "v"], args[:6]))
    k_pages, v_pages = args[11], args[12]

    eager_args = [t.clone() for t in args]
    want = _everything(*eager_args)
    _, want_k, want_v = kv_cache_ref(a["q"], a["k_cache"], a["v_cache"], a["cache_seqlens"],
                                     a["k"], a["v"])

    compiled = torch.compile(_everything, fullgraph=True)
    got = compiled(*args)
    for x, y in zip(got, want):
        assert max_err(x, y) < 1e-5
    # the in-place cache writes are visible in the caller's tensors
    assert bit_equal(a["k_cache"], want_k) and bit_equal(a["v_cache"], want_v)
    assert bit_equal(k_pages, eager_args[11]) and bit_equal(v_pages, eager_args[12])
    assert torch.equal(a["cache_seqlens"], eager_args[3])

    # a second call with grown lengths (updated in place) reuses the graph and stays correct
    a["cache_seqlens"].add_(3)  # in place: args[3] is the same tensor
    eager_args = [t.clone() for t in args]
    want = _everything(*eager_args)
    got = compiled(*args)
    for x, y in zip(got, want):
        assert max_err(x, y) < 1e-5
    assert bit_equal(a["k_cache"], eager_args[1]) and bit_equal(k_pages, eager_args[11])
