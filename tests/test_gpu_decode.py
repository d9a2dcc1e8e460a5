"""GPU-only: the property suite at real sizes, and decode captured once in a CUDA graph (raw
``torch.cuda.CUDAGraph`` and ``torch.compile(mode="reduce-overhead")``) replayed while the
sequences grow from ~5 to past 4000 tokens.

The references run on the GPU in float64 (tests/reference.py); the low-precision yardstick is
PyTorch's own fp16/bf16 math on repeated K/V.
"""

import logging

import pytest
import torch
import triton
import triton.language as tl
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import flashkv_ops as fkv
from reference import (assert_close_to_ref, attention_ref, bit_equal, kv_cache_ref, linearize, lowp_attention_torch,
                       lowp_kv_ref, max_err, randn)

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

DEVICE = "cuda"
LOWP = [torch.float16, torch.bfloat16]
HEAD_DIMS = [64, 80, 96, 128, 256]
# (num_q_heads, num_kv_heads) of real models: Llama-3 32:8, Qwen2 28:4 (7:1), 8:1, MHA, 40:8 (5:1),
# 12:2 (6:1)
HEADS = [(32, 8), (28, 4), (8, 1), (32, 32), (40, 8), (12, 2), (16, 16)]
GPU_PROPERTY = settings(deadline=None, max_examples=25, print_blob=True,
                        suppress_health_check=[HealthCheck.too_slow])


# -- property suite at real sizes ----------------------------------------------------------------

@st.composite
def gpu_attention_cases(draw):
    hq, hkv = draw(st.sampled_from(HEADS))
    head_dim = draw(st.sampled_from(HEAD_DIMS))
    # keep the fp64 reference's [H_q, S, S] score tiles in memory
    s_cap = 8192 if hq <= 8 else 4096
    return dict(
        batch=draw(st.integers(1, 2)), hq=hq, hkv=hkv, head_dim=head_dim,
        s_q=draw(st.sampled_from([1, 7, 64, 333, 1024, 2048, s_cap])),
        s_k=draw(st.sampled_from([1, 100, 1024, 2049, s_cap])),
        causal=draw(st.booleans()), dtype=draw(st.sampled_from(LOWP)),
        q_bshd=draw(st.booleans()), seed=draw(st.integers(0, 2**31 - 1)),
    )


@GPU_PROPERTY
@given(case=gpu_attention_cases())
def test_gpu_attention_real_sizes(case):
    g = torch.Generator().manual_seed(case["seed"])
    b, dt, d = case["batch"], case["dtype"], case["head_dim"]
    q = randn((b, case["hq"], case["s_q"], d), dt, DEVICE, generator=g, bshd=case["q_bshd"])
    k = randn((b, case["hkv"], case["s_k"], d), dt, DEVICE, generator=g, bshd=True)
    v = randn((b, case["hkv"], case["s_k"], d), dt, DEVICE, generator=g, bshd=True)
    out = fkv.attention(q, k, v, causal=case["causal"])
    ref = attention_ref(q, k, v, causal=case["causal"])
    lowp = lowp_attention_torch(q, k, v, causal=case["causal"])
    assert_close_to_ref(out, ref, lowp, what=str(case))


@st.composite
def gpu_cache_cases(draw):
    hq, hkv = draw(st.sampled_from(HEADS))
    batch = draw(st.integers(1, 4))
    s_q = draw(st.sampled_from([1, 1, 2, 4, 16, 100, 512]))
    lens = [draw(st.sampled_from([0, 1, 63, 64, 65, 1000, 4095, 4096, 4097, 8000]))
            for _ in range(batch)]
    with_new = draw(st.sampled_from([True, True, False]))
    s_max = max(lens) + (s_q if with_new else 0) + draw(st.sampled_from([0, 5, 200]))
    return dict(batch=batch, hq=hq, hkv=hkv, head_dim=draw(st.sampled_from(HEAD_DIMS)),
                s_q=s_q, lens=lens, s_max=s_max, with_new=with_new,
                causal=draw(st.sampled_from([True, True, False])),
                dtype=draw(st.sampled_from(LOWP)), seed=draw(st.integers(0, 2**31 - 1)))


@GPU_PROPERTY
@given(case=gpu_cache_cases())
def test_gpu_kv_cache_real_sizes(case):
    g = torch.Generator().manual_seed(case["seed"])
    b, dt, d, s_q = case["batch"], case["dtype"], case["head_dim"], case["s_q"]
    k_cache = randn((b, case["hkv"], case["s_max"], d), dt, DEVICE, generator=g)
    v_cache = randn((b, case["hkv"], case["s_max"], d), dt, DEVICE, generator=g)
    q = randn((b, case["hq"], s_q, d), dt, DEVICE, generator=g, bshd=True)
    k = v = None
    if case["with_new"]:
        k = randn((b, case["hkv"], s_q, d), dt, DEVICE, generator=g, bshd=True)
        v = randn((b, case["hkv"], s_q, d), dt, DEVICE, generator=g, bshd=True)
    lens = torch.tensor(case["lens"], dtype=torch.int32, device=DEVICE)
    lens0 = lens.clone()
    want, want_k, want_v = kv_cache_ref(q, k_cache, v_cache, lens, k, v, causal=case["causal"])
    out = fkv.attention_with_kv_cache(q, k_cache, v_cache, lens, k, v, causal=case["causal"])
    assert torch.equal(lens, lens0)
    assert bit_equal(k_cache, want_k) and bit_equal(v_cache, want_v), str(case)
    total = [n + (s_q if k is not None else 0) for n in case["lens"]]
    lowp = lowp_kv_ref(q, want_k, want_v, total, case["causal"])
    assert_close_to_ref(out, want, lowp, what=str(case))


@st.composite
def gpu_paged_cases(draw):
    hq, hkv = draw(st.sampled_from([(32, 8), (28, 4), (8, 1)]))
    batch = draw(st.integers(1, 4))
    return dict(batch=batch, hq=hq, hkv=hkv, head_dim=draw(st.sampled_from([64, 128, 80])),
                s_q=draw(st.sampled_from([1, 1, 3, 37])),
                lens=[draw(st.integers(0, 5000)) for _ in range(batch)],
                page_size=draw(st.sampled_from([1, 16, 64, 256, 7])),
                dtype=draw(st.sampled_from(LOWP)), seed=draw(st.integers(0, 2**31 - 1)))


@settings(deadline=None, max_examples=15, print_blob=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(case=gpu_paged_cases())
def test_gpu_paged_matches_contiguous(case):
    g = torch.Generator().manual_seed(case["seed"])
    b, dt, d, s_q, p = case["batch"], case["dtype"], case["head_dim"], case["s_q"], case["page_size"]
    lens_list = case["lens"]
    need = [-(-(n + s_q) // p) for n in lens_list]
    num_pages = sum(need) + 3
    max_pages = max(need) + 1
    perm = torch.randperm(num_pages, generator=g).tolist()
    table = torch.full((b, max_pages), -1, dtype=torch.int32)
    it = iter(perm)
    for i in range(b):
        for j in range(need[i]):
            table[i, j] = next(it)
    table = table.to(DEVICE)
    k_pages = randn((num_pages, case["hkv"], p, d), dt, DEVICE, generator=g)
    v_pages = randn((num_pages, case["hkv"], p, d), dt, DEVICE, generator=g)
    q = randn((b, case["hq"], s_q, d), dt, DEVICE, generator=g)
    k = randn((b, case["hkv"], s_q, d), dt, DEVICE, generator=g)
    v = randn((b, case["hkv"], s_q, d), dt, DEVICE, generator=g)
    lens = torch.tensor(lens_list, dtype=torch.int32, device=DEVICE)
    want, want_kp, want_vp = kv_cache_ref(q, k_pages, v_pages, lens, k, v, block_table=table)
    # the same logical contents as a contiguous cache
    total = [n + s_q for n in lens_list]
    k_lin, v_lin = linearize(k_pages, v_pages, lens_list, table)
    out = fkv.attention_with_kv_cache(q, k_pages, v_pages, lens, k, v, block_table=table)
    contig = fkv.attention_with_kv_cache(q, k_lin, v_lin, lens, k, v)
    assert bit_equal(k_pages, want_kp) and bit_equal(v_pages, want_vp), str(case)
    lowp = lowp_kv_ref(q, want_kp, want_vp, total, True, table)
    assert_close_to_ref(out, want, lowp, what=str(case))
    assert max_err(out, contig) <= (2e-3 if dt == torch.float16 else 2e-2), str(case)


def test_gpu_paged_pool_past_int32_offsets():
    # a 2**31 + element pool (4.3 GB per fp16 pool): pages at its far end need 64-bit offsets
    page_size, hkv, hq, d = 16, 1, 4, 128
    num_pages = 2**31 // (hkv * page_size * d) + 8
    g = torch.Generator(device=DEVICE).manual_seed(3)
    k_pages = torch.randn((num_pages, hkv, page_size, d), generator=g, device=DEVICE, dtype=torch.float16)
    v_pages = torch.randn((num_pages, hkv, page_size, d), generator=g, device=DEVICE, dtype=torch.float16)
    from flashkv_ops.kernels.common import paged_row_flags
    table = torch.tensor([[num_pages - 1, 0, num_pages - 5], [3, num_pages - 2, 1]], dtype=torch.int32,
                         device=DEVICE)
    assert paged_row_flags(k_pages, v_pages, table)["WIDE_ROWS"]
    lens = torch.tensor([40, 21], dtype=torch.int32, device=DEVICE)
    q = randn((2, hq, 1, d), torch.float16, DEVICE)
    k = randn((2, hkv, 1, d), torch.float16, DEVICE)
    v = randn((2, hkv, 1, d), torch.float16, DEVICE)
    lin_k, lin_v = linearize(k_pages, v_pages, [48, 48], table)
    want = fkv.attention_with_kv_cache(q, lin_k.clone(), lin_v.clone(), lens, k, v)
    out = fkv.attention_with_kv_cache(q, k_pages, v_pages, lens, k, v, block_table=table)
    assert max_err(out, want) <= 2e-3
    # the new tokens landed at the far pages: slot 40 of sequence 0 is page num_pages - 5, slot 8
    assert bit_equal(k_pages[num_pages - 5, :, 8], k[0, :, 0])
    assert bit_equal(v_pages[num_pages - 2, :, 21 - 16], v[1, :, 0])
    lin_k, lin_v = linearize(k_pages, v_pages, [48, 48], table)  # now holding the new tokens
    for s_q in (1, 5):
        q2 = randn((2, hq, s_q, d), torch.float16, DEVICE)
        got = fkv.attention_with_kv_cache(q2, k_pages, v_pages, lens, block_table=table)
        ref = fkv.attention_with_kv_cache(q2, lin_k, lin_v, lens)
        assert max_err(got, ref) <= 2e-3, s_q


@pytest.mark.parametrize("s_q", [1, 2, 100])
def test_gpu_cache_of_capacity_zero(s_q):
    # S_max = 0 and no new tokens: nothing to attend, zeros out (no TMA descriptor over an empty
    # dimension); with new tokens the cache must hold them, so capacity 0 is a clear error
    q = randn((1, 32, s_q, 64), torch.float16, DEVICE)
    k_cache = torch.empty((1, 8, 0, 64), dtype=torch.float16, device=DEVICE)
    v_cache = torch.empty_like(k_cache)
    lens = torch.zeros(1, dtype=torch.int32, device=DEVICE)
    out = fkv.attention_with_kv_cache(q, k_cache, v_cache, lens)
    assert torch.equal(out, torch.zeros_like(out))
    out = fkv.attention(q, k_cache, v_cache, causal=False)
    assert torch.equal(out, torch.zeros_like(out))


# -- acceptance: GQA cache memory ------------------------------------------------------------

def test_gpu_gqa_cache_is_not_repeated_in_memory():
    # 32:8 at 32k tokens: the op must not materialise repeated K/V (4x the cache)
    b, hq, hkv, s, d = 1, 32, 8, 32768, 128
    g = torch.Generator().manual_seed(0)
    k_cache = randn((b, hkv, s + 16, d), torch.float16, DEVICE, generator=g)
    v_cache = randn((b, hkv, s + 16, d), torch.float16, DEVICE, generator=g)
    q = randn((b, hq, 1, d), torch.float16, DEVICE, generator=g)
    k = randn((b, hkv, 1, d), torch.float16, DEVICE, generator=g)
    v = randn((b, hkv, 1, d), torch.float16, DEVICE, generator=g)
    lens = torch.tensor([s], dtype=torch.int32, device=DEVICE)
    fkv.attention_with_kv_cache(q, k_cache, v_cache, lens, k, v)  # warm up (JIT, workspaces)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = fkv.attention_with_kv_cache(q, k_cache, v_cache, lens, k, v)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    cache_bytes = k_cache.nbytes + v_cache.nbytes
    assert extra < 0.25 * cache_bytes, f"op allocated {extra} bytes for a {cache_bytes}-byte cache"
    # the cache already holds the appended token at position s: attend over s + 1 tokens
    want, _, _ = kv_cache_ref(q, k_cache, v_cache, lens + 1, None, None)
    assert max_err(out, want) < 1e-2


# -- CUDA graphs: capture at ~5 tokens, replay past 4000 ----------------------------------------

B, HQ, HKV, D, S_MAX = 4, 32, 8, 128, 4608
START_LENS = [5, 3, 6, 1]


def length_schedule(start, limit, generator):
    """Yield per-step increments: single tokens for a while, then uneven jumps, until every
    sequence is past ``limit`` (a sequence already past it grows by 1, so none outruns the
    cache). Each yielded list is how much each sequence grows after that step."""
    lens = list(start)
    step = 0
    while min(lens) <= limit:
        if step < 24:
            inc = [1] * len(lens)
        else:
            jumps = torch.randint(40, 160, (len(lens),), generator=generator).tolist()
            inc = [1 if n > limit else j for n, j in zip(lens, jumps)]
        yield inc
        lens = [n + i for n, i in zip(lens, inc)]
        step += 1


def refill(generator, *tensors):
    """Fresh random values for a captured graph's inputs, in place (same draws as ``randn``)."""
    for t in tensors:
        t.copy_(randn(tuple(t.shape), t.dtype, t.device, generator=generator))


def check_step(out, q, k_cache_before, v_cache_before, lens_before, k, v, k_cache, v_cache,
               block_table=None, what=""):
    want, want_k, want_v = kv_cache_ref(q, k_cache_before, v_cache_before, lens_before, k, v,
                                        block_table=block_table)
    assert bit_equal(k_cache, want_k) and bit_equal(v_cache, want_v), f"{what}: cache writes"
    total = [int(n) + q.shape[2] for n in lens_before]
    lowp = lowp_kv_ref(q, want_k, want_v, total, True, block_table)
    assert_close_to_ref(out, want, lowp, what=what)


@pytest.mark.parametrize("s_q", [1, 4])
@pytest.mark.parametrize("dtype", LOWP)
@pytest.mark.parametrize("batch", [B, 12, 17])
def test_cuda_graph_decode_replayed_as_lengths_grow(s_q, dtype, batch):
    # batch 12: 96 (sequence, KV head) groups, whose key blocks an H100's 132 SMs share out evenly
    # (`_decode_balanced_kernel`); batch 17: 136 groups, the first 132 one program each and the
    # last four split by a second launch that merges its own results on counts the first zeroes
    # (`_tail_groups`); batch 4: split programs
    g = torch.Generator().manual_seed(s_q)
    start = (START_LENS * 5)[:batch]
    k_cache = randn((batch, HKV, S_MAX, D), dtype, DEVICE, generator=g)
    v_cache = randn((batch, HKV, S_MAX, D), dtype, DEVICE, generator=g)
    lens = torch.tensor(start, dtype=torch.int32, device=DEVICE)
    q_in = randn((batch, HQ, s_q, D), dtype, DEVICE, generator=g)
    k_in = randn((batch, HKV, s_q, D), dtype, DEVICE, generator=g)
    v_in = randn((batch, HKV, s_q, D), dtype, DEVICE, generator=g)

    # warm up on a side stream (JIT compilation, autotuning), as CUDA graph capture requires
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            fkv.attention_with_kv_cache(q_in, k_cache, v_cache, lens, k_in, v_in)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fkv.attention_with_kv_cache(q_in, k_cache, v_cache, lens, k_in, v_in)

    checked = 0
    for i, inc in enumerate(length_schedule(start, 4000, g)):
        refill(g, q_in, k_in, v_in)
        check = i < 3 or i % 7 == 0 or int(lens.min()) > 3900
        if check:
            snap = (k_cache.clone(), v_cache.clone(), lens.clone())
        graph.replay()
        if check:
            torch.cuda.synchronize()
            check_step(out, q_in, snap[0], snap[1], snap[2], k_in, v_in, k_cache, v_cache,
                       what=f"replay {i} lens={snap[2].tolist()}")
            checked += 1
        lens.add_(torch.tensor(inc, dtype=torch.int32, device=DEVICE))  # in place
    assert int(lens.min()) > 4000 and checked >= 10


@pytest.mark.parametrize("batch", [B, 17])
def test_cuda_graph_paged_decode_replayed_as_lengths_grow(batch):
    # batch 17: 136 (sequence, KV head) groups, past one wave of an H100's SMs (`_tail_groups`)
    page_size, dtype = 16, torch.float16
    max_pages = S_MAX // page_size
    g = torch.Generator().manual_seed(7)
    start = (START_LENS * 5)[:batch]
    cache = fkv.PagedKVCache(batch * max_pages + 8, page_size, HKV, D, num_layers=1,
                             max_batch_size=batch, max_pages_per_seq=max_pages, dtype=dtype,
                             device=DEVICE)
    cache.k_pages[0].copy_(randn(tuple(cache.k_pages[0].shape), dtype, DEVICE, generator=g))
    cache.v_pages[0].copy_(randn(tuple(cache.v_pages[0].shape), dtype, DEVICE, generator=g))
    for seq, n in enumerate(start):
        cache.reserve(seq, n + 1)
        cache.advance(seq, n)
    table_ptr, lens_ptr = cache.block_table.data_ptr(), cache.seqlens.data_ptr()
    q_in = randn((batch, HQ, 1, D), dtype, DEVICE, generator=g)
    k_in = randn((batch, HKV, 1, D), dtype, DEVICE, generator=g)
    v_in = randn((batch, HKV, 1, D), dtype, DEVICE, generator=g)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            cache.attention(0, q_in, k_in, v_in)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = cache.attention(0, q_in, k_in, v_in)

    checked = 0
    for i, inc in enumerate(length_schedule(start, 4000, g)):
        refill(g, q_in, k_in, v_in)
        check = i < 3 or i % 7 == 0 or int(cache.seqlens.min()) > 3900
        if check:
            snap = (cache.k_pages[0].clone(), cache.v_pages[0].clone(), cache.seqlens.clone(),
                    cache.block_table.clone())
        graph.replay()
        if check:
            torch.cuda.synchronize()
            check_step(out, q_in, snap[0], snap[1], snap[2], k_in, v_in, cache.k_pages[0],
                       cache.v_pages[0], block_table=snap[3], what=f"paged replay {i}")
            checked += 1
        # grow each sequence: the token just written plus (inc - 1) skipped-over tokens, then
        # reserve the slot for the next step (new pages land in block_table in place)
        for seq, n in enumerate(inc):
            cache.advance(seq, 1)
            cache.reserve(seq, n)
            cache.advance(seq, n - 1)
    assert cache.block_table.data_ptr() == table_ptr and cache.seqlens.data_ptr() == lens_ptr
    assert int(cache.seqlens.min()) > 4000 and checked >= 10


@pytest.mark.parametrize("max_pages", [1, 7, 256, 257, 512, 4608, 8192, 8193, 20000])
def test_gpu_paged_read_order_matches_the_torch_path(max_pages):
    # a sort per row up to SORT_MAX_PAGES entries, ranks past it (prefixes ending inside a chunk of
    # the rank kernel's compared entries, a repeated entry)
    from flashkv_ops import _fallback

    g = torch.Generator().manual_seed(max_pages)
    table = torch.randperm(3 * max_pages + 9, generator=g)[:3 * max_pages].view(3, max_pages).to(torch.int32)
    table[2, -1] = table[2, 0]
    lens = torch.tensor([0, 5 * max_pages // 2, 4 * max_pages + 3], dtype=torch.int32)
    got = fkv.paged_read_order(table.to(DEVICE), lens.to(DEVICE), 4)
    assert torch.equal(got.cpu(), _fallback.paged_read_order(table, lens, 4))


@pytest.mark.parametrize("page_size, head_dim", [(16, 64), (16, 128), (1, 64)])
def test_cuda_graph_paged_read_order_on_random_pages(page_size, head_dim):
    # A random table (every sequence's pages scattered over the pool); each replay works out the
    # read order on the device and attends through it while the lengths grow past 4000: every
    # replay matches the reference over the logical table, the same slots written. page_size 1
    # gives rows of 4608 pages.
    dtype = torch.float16
    max_pages = -(-S_MAX // page_size)
    g = torch.Generator().manual_seed(11 + page_size)
    num_pages = B * max_pages + 5
    table = torch.randperm(num_pages, generator=g)[:B * max_pages].view(B, max_pages).to(torch.int32).to(DEVICE)
    k_pages = randn((num_pages, HKV, page_size, head_dim), dtype, DEVICE, generator=g)
    v_pages = randn((num_pages, HKV, page_size, head_dim), dtype, DEVICE, generator=g)
    lens = torch.tensor(START_LENS, dtype=torch.int32, device=DEVICE)
    q_in = randn((B, HQ, 1, head_dim), dtype, DEVICE, generator=g)
    k_in = randn((B, HKV, 1, head_dim), dtype, DEVICE, generator=g)
    v_in = randn((B, HKV, 1, head_dim), dtype, DEVICE, generator=g)

    def step():
        ordered = fkv.paged_read_order(table, lens, page_size)
        return fkv.attention_with_kv_cache(q_in, k_pages, v_pages, lens, k_in, v_in, block_table=ordered), ordered

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out, ordered = step()

    checked = sorted_rows = 0
    for i, inc in enumerate(length_schedule(START_LENS, 4000, g)):
        refill(g, q_in, k_in, v_in)
        check = i < 3 or i % 7 == 0 or int(lens.min()) > 3900
        if check:
            snap = (k_pages.clone(), v_pages.clone(), lens.clone())
        graph.replay()
        if check:
            torch.cuda.synchronize()
            check_step(out, q_in, snap[0], snap[1], snap[2], k_in, v_in, k_pages, v_pages, block_table=table,
                       what=f"read-order replay {i}")
            for row, n, got in zip(table.tolist(), snap[2].tolist(), ordered.tolist()):
                full = n // page_size
                assert got == sorted(row[:full]) + row[full:], f"replay {i}: read order"
                sorted_rows += got != row
            checked += 1
        lens += torch.tensor(inc, dtype=torch.int32, device=DEVICE)
    assert int(lens.min()) > 4000 and checked >= 10 and sorted_rows > 0


@triton.jit
def _rewrite_table_late(Table, NewTable, n, delay_ns, BLOCK: tl.constexpr):
    """Let the next kernel launch at once, wait ``delay_ns``, then copy NewTable over Table: a
    kernel before the decode that rewrites the block table while the decode is already running
    the part before its wait (programmatic dependent launch)."""
    tl.extra.cuda.gdc_launch_dependents()
    start = tl.inline_asm_elementwise("mov.u64 $0, %globaltimer;", "=l,r", [n], dtype=tl.int64, is_pure=False,
                                      pack=1)
    now = start
    while now - start < delay_ns:
        now = tl.inline_asm_elementwise("mov.u64 $0, %globaltimer;", "=l,r", [n], dtype=tl.int64,
                                        is_pure=False, pack=1)
    for i in range(0, n, BLOCK):
        offs = i + tl.arange(0, BLOCK)
        tl.store(Table + offs, tl.load(NewTable + offs, mask=offs < n), mask=offs < n)


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 9,
                    reason="programmatic dependent launch needs Hopper")
def test_paged_decode_table_rewritten_while_it_starts():
    # Paged decode works out each program's page order before waiting on the kernel before it,
    # from the table as it reads then. Here that kernel rewrites the table after letting the decode
    # start: the table read early maps to one copy of the cache, the final table to another. The
    # decode must notice the change after its wait and read the final table's pages.
    page_size, dtype, batch, hq, hkv, d, s = 16, torch.float16, 8, 32, 4, 64, 2048
    pages_per_seq = s // page_size
    n_pages = batch * pages_per_seq
    g = torch.Generator().manual_seed(11)
    want_k, want_v, old_k, old_v = (randn((batch, hkv, s, d), dtype, DEVICE, generator=g) for _ in range(4))
    final = torch.randperm(n_pages, generator=g).view(batch, pages_per_seq).to(torch.int32).to(DEVICE)
    early = (torch.randperm(n_pages, generator=g).view(batch, pages_per_seq) + n_pages).to(torch.int32).to(DEVICE)
    k_pages = torch.empty((2 * n_pages, hkv, page_size, d), dtype=dtype, device=DEVICE)
    v_pages = torch.empty_like(k_pages)
    def as_pages(x):  # [B, H, S, D] -> the pages of each sequence in order, [B * S / page_size, H, page_size, D]
        return x.view(batch, hkv, pages_per_seq, page_size, d).transpose(1, 2).reshape(n_pages, hkv, page_size, d)

    for table, k_src, v_src in ((final, want_k, want_v), (early, old_k, old_v)):
        k_pages[table.flatten().long()] = as_pages(k_src)
        v_pages[table.flatten().long()] = as_pages(v_src)
    q = randn((batch, hq, 1, d), dtype, DEVICE, generator=g)
    lens = torch.full((batch,), s, dtype=torch.int32, device=DEVICE)
    live = early.clone()

    def step():
        _rewrite_table_late[(1,)](live, final, live.numel(), 50_000, BLOCK=1024)
        return fkv.attention_with_kv_cache(q, k_pages, v_pages, lens, block_table=live)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            live.copy_(early)
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()  # captured: no eager checks that would wait for the rewrite
    with torch.cuda.graph(graph):
        out = step()
    want, _, _ = kv_cache_ref(q, want_k, want_v, lens)
    lowp = lowp_kv_ref(q, want_k, want_v, [s] * batch, True)
    for i in range(5):
        live.copy_(early)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(live, final)
        assert_close_to_ref(out, want, lowp, what=f"replay {i}")


class _Collect(logging.Handler):
    def __init__(self):
        super().__init__(level=logging.DEBUG)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def test_compile_reduce_overhead_decode_no_cudagraph_skips():
    from torch._dynamo.utils import counters

    dtype = torch.bfloat16
    g = torch.Generator().manual_seed(9)
    k_cache = randn((B, HKV, S_MAX, D), dtype, DEVICE, generator=g)
    v_cache = randn((B, HKV, S_MAX, D), dtype, DEVICE, generator=g)
    torch._dynamo.mark_static_address(k_cache)
    torch._dynamo.mark_static_address(v_cache)
    lens = torch.tensor(START_LENS, dtype=torch.int32, device=DEVICE)

    def decode_step(q, k, v, k_cache, v_cache, cache_seqlens):
        return fkv.attention_with_kv_cache(q, k_cache, v_cache, cache_seqlens, k, v)

    torch._dynamo.reset()
    counters.clear()
    handler = _Collect()
    torch_logger = logging.getLogger("torch")
    torch._logging.set_logs(cudagraphs=True, perf_hints=True)
    torch_logger.addHandler(handler)
    try:
        step = torch.compile(decode_step, mode="reduce-overhead", fullgraph=True)
        checked = 0
        for i, inc in enumerate(length_schedule(START_LENS, 4000, g)):
            q = randn((B, HQ, 1, D), dtype, DEVICE, generator=g)
            k = randn((B, HKV, 1, D), dtype, DEVICE, generator=g)
            v = randn((B, HKV, 1, D), dtype, DEVICE, generator=g)
            check = i < 4 or i % 7 == 0 or int(lens.min()) > 3900
            if check:
                snap = (k_cache.clone(), v_cache.clone(), lens.clone())
            torch.compiler.cudagraph_mark_step_begin()
            out = step(q, k, v, k_cache, v_cache, lens).clone()
            if check:
                torch.cuda.synchronize()
                check_step(out, q, snap[0], snap[1], snap[2], k, v, k_cache, v_cache,
                           what=f"compiled step {i}")
                checked += 1
            lens.add_(torch.tensor(inc, dtype=torch.int32, device=DEVICE))
    finally:
        torch_logger.removeHandler(handler)
        torch._logging.set_logs()
    skips = [m for m in handler.messages if "skipping cudagraphs" in m]
    assert not skips, skips
    assert counters["inductor"]["cudagraph_skips"] == 0
    assert checked >= 10 and int(lens.min()) > 4000
    # a graph was really recorded by the cudagraph-tree manager
    from torch._inductor import cudagraph_trees
    manager = cudagraph_trees.get_manager(torch.cuda.current_device(),
                                          create_if_none_exists=False)
    assert manager is not None
    assert sum(len(nodes) for nodes in manager.roots.values()) >= 1
