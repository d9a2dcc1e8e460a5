"""Paged KV cache: ``attention_with_kv_cache(..., block_table=...)`` against the contiguous cache
and the float64 reference, bad block tables, and the ``PagedKVCache`` page allocator.

Logical position ``p`` of sequence ``b`` lives in page ``block_table[b, p // page_size]``, slot
``p % page_size`` (DESIGN.md). Unused table entries are ``-1`` (the allocator's convention past a
sequence's pages), or arbitrary valid pages (the allocator's null page for idle slots): neither may
be read or written.
"""

import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import flashkv_ops as fkv
from reference import (assert_close_to_ref, bit_equal, build_paged, gather_pages, kv_cache_ref, linearize,
                       lowp_attention_torch, max_err, randn, record_launches)

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
PROPERTY = settings(deadline=None, max_examples=15, print_blob=True,
                    suppress_health_check=[HealthCheck.too_slow])


def paged_inputs(case, g):
    """A case's contiguous caches, the same tokens in a randomly permuted pool, q and new k/v."""
    b, hkv, d, s_q, dtype = (case["batch"], case["num_kv_heads"], case["head_dim"],
                             case["s_q"], case["dtype"])
    hq = hkv * case["ratio"]
    lens_list, with_new = case["lens"], case["with_new"]
    s_max = max(lens_list) + (s_q if with_new else 0) + 2
    k_cache = randn((b, hkv, s_max, d), dtype, generator=g)
    v_cache = randn((b, hkv, s_max, d), dtype, generator=g)
    k_pages, v_pages, table = build_paged(k_cache, v_cache, lens_list, s_q, case["page_size"], g,
                                          extra_pages=case["extra_pages"],
                                          extra_columns=case["extra_columns"],
                                          unused=case["unused"], with_new=with_new,
                                          garbage=case.get("garbage", "randn"))
    q = randn((b, hq, s_q, d), dtype, generator=g, bshd=case.get("q_bshd", False))
    k = v = None
    if with_new:
        k = randn((b, hkv, s_q, d), dtype, generator=g)
        v = randn((b, hkv, s_q, d), dtype, generator=g)
    lens = torch.tensor(lens_list, dtype=torch.int32)
    return k_cache, v_cache, k_pages, v_pages, table, q, k, v, lens


def check_paged_vs_contiguous(case, g):
    b, s_q, dtype = case["batch"], case["s_q"], case["dtype"]
    lens_list, with_new = case["lens"], case["with_new"]
    k_cache, v_cache, k_pages, v_pages, table, q, k, v, lens = paged_inputs(case, g)
    table0 = table.clone()
    want_out, want_kp, want_vp = kv_cache_ref(q, k_pages, v_pages, lens, k, v,
                                              causal=case["causal"], block_table=table)
    paged = fkv.attention_with_kv_cache(q, k_pages, v_pages, lens, k, v, causal=case["causal"],
                                        block_table=table)
    contig = fkv.attention_with_kv_cache(q, k_cache, v_cache, lens, k, v, causal=case["causal"])
    what = str(case)
    assert torch.equal(table, table0), f"{what}: block_table modified"
    assert torch.equal(lens, torch.tensor(lens_list, dtype=torch.int32)), what
    # the pool after the call: exactly the new tokens' slots changed, every other byte intact
    assert bit_equal(k_pages, want_kp), f"{what}: k pages differ from the expected append"
    assert bit_equal(v_pages, want_vp), f"{what}: v pages differ from the expected append"
    # mapped back through the table, the pool holds what the contiguous cache holds
    total = [n + (s_q if with_new else 0) for n in lens_list]
    lin_k = gather_pages(k_pages, table)
    lin_v = gather_pages(v_pages, table)
    for i, n in enumerate(total):
        assert bit_equal(lin_k[i, :, :n], k_cache[i, :, :n]), f"{what}: seq {i} k differs"
        assert bit_equal(lin_v[i, :, :n], v_cache[i, :, :n]), f"{what}: seq {i} v differs"
    lowp = None
    if dtype != torch.float32:
        k_lin, v_lin = linearize(want_kp, want_vp, total, table)
        lowp = lowp_attention_torch(q, k_lin, v_lin, causal=case["causal"],
                                    key_start=[0] * b, key_end=total)
    assert_close_to_ref(paged, want_out, lowp, what=what)
    same = 1e-5 if dtype == torch.float32 else (2e-3 if dtype == torch.float16 else 2e-2)
    assert max_err(paged, contig) <= same, f"{what}: paged and contiguous disagree"


@st.composite
def paged_cases(draw):
    decode = draw(st.booleans())
    s_q = draw(st.integers(1, 4)) if decode else draw(st.integers(5, 24))
    batch = draw(st.integers(1, 3))
    return dict(
        batch=batch, s_q=s_q,
        lens=[draw(st.integers(0, 60)) for _ in range(batch)],
        page_size=draw(st.sampled_from([1, 8, 16, 3])),
        num_kv_heads=draw(st.integers(1, 2)), ratio=draw(st.sampled_from([1, 2, 4, 7, 8])),
        head_dim=draw(st.sampled_from([16, 32, 64])),
        causal=draw(st.sampled_from([True, True, False])),
        dtype=draw(st.sampled_from(DTYPES)),
        with_new=draw(st.sampled_from([True, True, True, False])),
        extra_pages=draw(st.integers(0, 4)), extra_columns=draw(st.integers(0, 2)),
        unused=draw(st.sampled_from(["minus_one", "random"])),
        q_bshd=draw(st.booleans()),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


@PROPERTY
@given(case=paged_cases())
def test_paged_matches_contiguous(case):
    check_paged_vs_contiguous(case, torch.Generator().manual_seed(case["seed"]))


BASE = dict(num_kv_heads=2, ratio=4, head_dim=16, causal=True, dtype=torch.float32,
            with_new=True, extra_pages=1, extra_columns=1, unused="minus_one")


@pytest.mark.parametrize("page_size", [1, 8, 16])
@pytest.mark.parametrize("s_q,lens", [
    (1, [7, 8, 15]),     # decode: the new token is the last slot / first slot of a page
    (1, [0, 16, 31]),
    (3, [6, 14, 0]),     # multi-token append crossing a page boundary
    (20, [5, 13, 40]),   # multi-token append spanning several pages
])
def test_paged_page_boundaries(page_size, s_q, lens):
    case = dict(BASE, batch=len(lens), s_q=s_q, lens=lens, page_size=page_size,
                seed=page_size * 100 + s_q)
    check_paged_vs_contiguous(case, torch.Generator().manual_seed(case["seed"]))


@pytest.mark.parametrize("s_q", [1, 6])
def test_paged_nan_garbage_in_partial_pages_does_not_leak(s_q):
    # pages are partly filled; their tails and the spare pages hold NaN
    case = dict(BASE, batch=3, s_q=s_q, lens=[0, 5, 21], page_size=8, garbage="nan",
                unused="random", dtype=torch.float16, seed=40 + s_q)
    check_paged_vs_contiguous(case, torch.Generator().manual_seed(case["seed"]))


@pytest.fixture
def split_launches(monkeypatch):
    """(grid, keyword arguments) of every decode split-kernel launch while the test runs."""
    from flashkv_ops.kernels import decode

    return record_launches(monkeypatch, decode, "_decode_split_kernel")


@pytest.mark.parametrize("path", ["scored", "write_first", "write_first_table", "new_rows", "deep_pipeline"])
@pytest.mark.parametrize("num_splits", [1, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("s_q,causal", [(1, True), (2, True), (2, False)])
def test_paged_decode_append_with_the_split_counts_gpus_pick(monkeypatch, split_launches, path, num_splits, dtype,
                                                             s_q, causal):
    # How an appending step attends to and stores its new tokens, forced as a GPU would pick it
    # ("scored"): with one split stage 1 attends to them and writes them into the pool itself
    # (no merge launch); with several the merge kernel does. "write_first" (no causal diagonal:
    # 16-bit pools read a block ahead; the contiguous cache with one split, the interpreter
    # counting one SM): the program whose slice holds the new tokens writes them first and reads
    # them back with its slice. "new_rows" (one split, 16-bit pools read a block ahead, causal or
    # not; elsewhere as "write_first"): the program gathers them from the inputs by position and
    # stores them after its loop. The bias tile is off outside "scored", so that split programs
    # write first too; NaN fills every unwritten slot. "write_first" picks the new tokens' pages
    # out of the table row read next to the lengths, "write_first_table" reads them after the
    # lengths. "deep_pipeline": the four-stage tile of D <= 64 pools past 1.5 waves, which scores
    # the new tokens apart though writing first is allowed.
    from flashkv_ops.kernels import decode

    real = decode._config
    stages = {"num_stages": 4} if path == "deep_pipeline" else {}
    monkeypatch.setattr(decode, "_config", lambda *args: dict(real(*args), NUM_SPLITS=num_splits, **stages))
    monkeypatch.setattr(decode, "DECODE_WRITE_FIRST", path != "scored")
    monkeypatch.setattr(decode, "DECODE_SLOT_PAGES", path == "write_first")
    monkeypatch.setattr(decode, "DECODE_NEW_ROWS", path == "new_rows")
    monkeypatch.setattr(decode, "DECODE_BIAS_MASK", path == "scored")
    case = dict(BASE, batch=3, s_q=s_q, causal=causal, lens=[0, 15, 100], page_size=16, dtype=dtype,
                garbage="nan", seed=num_splits * 10 + s_q)
    check_paged_vs_contiguous(case, torch.Generator().manual_seed(case["seed"]))
    if os.environ.get("TRITON_INTERPRET") == "1":  # the kernels ran (else the PyTorch fallback did)
        new_rows = path == "new_rows" and dtype != torch.float32 and num_splits == 1
        can = path != "scored" and not (causal and s_q > 1)
        paged_first = can and dtype != torch.float32 and not new_rows and path != "deep_pipeline"
        want = {True: (paged_first, new_rows, paged_first and path == "write_first"),
                False: (can and num_splits == 1, False, False)}
        assert {kw["PAGED"] for _, kw in split_launches} == {True, False}
        assert all((kw["WRITE_FIRST"], kw["NEW_ROWS"], kw["SLOT_PAGES"] > 0) == want[kw["PAGED"]]
                   for _, kw in split_launches), \
            [(kw["PAGED"], kw["WRITE_FIRST"], kw["NEW_ROWS"], kw["SLOT_PAGES"]) for _, kw in split_launches]


@pytest.mark.parametrize("page_size", [4, 8, 16])
@pytest.mark.parametrize("s_q,with_new,lens", [
    (1, True, [127, 125, 118, 64]),   # one new token: the pool full after it, last pages partly filled
    (1, False, [128, 126, 119, 60]),
    (2, True, [126, 121, 117, 33]),   # two new tokens (causal, appended after the cache's keys)
])
@pytest.mark.parametrize("head_dim", [16, 128])
def test_paged_decode_visits_whole_pages_in_pool_order(monkeypatch, split_launches, page_size, s_q, with_new, lens,
                                                       head_dim):
    # 16-bit decode where the slice a full sequence gives each program is (nearly) full: the
    # program visits the slice's whole pages sorted by pool address (at D <= 64 after its first
    # block, which keeps table order), its last page (partly filled here) kept last and masked by
    # position, taking them from registers; shorter slices visit in slot order
    from flashkv_ops.kernels import decode

    sorts = []
    real = decode._sort_pages
    monkeypatch.setattr(decode, "_sort_pages", lambda *args: sorts.append(real(*args)) or sorts[-1])
    case = dict(BASE, batch=len(lens), s_q=s_q, lens=lens, page_size=page_size, dtype=torch.float16,
                with_new=with_new, extra_pages=3, extra_columns=0, garbage="nan", seed=page_size + 7 * s_q,
                head_dim=head_dim)
    check_paged_vs_contiguous(case, torch.Generator().manual_seed(case["seed"]))
    if os.environ.get("TRITON_INTERPRET") == "1":  # the kernels ran (else the PyTorch fallback did)
        assert sorts and sorts[0] > 0, "the paged call did not sort its pages"
        paged = [kw for _, kw in split_launches if kw["PAGED"]]
        assert paged and all(kw["SORT_PAGES"] > 0 and kw["FIRST_IN_ORDER"] == (head_dim <= 64) for kw in paged), \
            [(kw["SORT_PAGES"], kw["FIRST_IN_ORDER"]) for kw in paged]


def test_pool_order_sort_rule_from_static_shapes():
    # which one-wave paged decode programs sort their slice's pages (`_sort_pages`): 16-bit pools
    # read a block ahead and launched early, except one split appending and a tail launch's first
    # wave at D <= 64 (the interpreter sorts there too, to test it); never with a key start, a
    # causal diagonal inside the cache, pages that do not tile a key block or past 256 pages a slice
    from flashkv_ops.kernels.decode import _sort_pages

    def sort(early=True, lone_or_tail=False, key_start=False, diagonal=False, capacity=8192, splits=4, block_n=256,
             block_d=64, page_size=16, num_pages=4096, interpret=False):
        return _sort_pages(early, lone_or_tail, key_start, diagonal, capacity, splits, block_n, block_d, page_size,
                           num_pages, interpret)

    assert sort() == 128 and sort(block_d=128, block_n=128) == 128 and sort(capacity=2048, splits=1) == 128
    assert sort(lone_or_tail=True, block_d=128, block_n=128) == 128 and sort(lone_or_tail=True, interpret=True) == 128
    assert sort(page_size=8) == 256 and sort(capacity=1000, splits=4) == 16
    for kwargs in (dict(early=False), dict(lone_or_tail=True), dict(key_start=True), dict(diagonal=True),
                   dict(page_size=48), dict(page_size=4), dict(num_pages=2**24)):
        assert sort(**kwargs) == 0, kwargs


@pytest.mark.parametrize("page_size", [3, 4, 16, 32])
@pytest.mark.parametrize("s_q,with_new,lens", [
    (1, True, [127, 125, 118, 64]),   # full slices (the guess holds) and a short sequence (it does not)
    (1, False, [128, 126, 119, 60]),
    (2, True, [126, 121, 117, 33]),
])
def test_paged_decode_second_block_entries_read_with_the_lengths(monkeypatch, split_launches, page_size, s_q, with_new,
                                                                 lens):
    # 16-bit decode visiting pages in table order: each program reads the table entries of its
    # slice's first two blocks (as a full sequence places the slice) next to the lengths, and its
    # cache loop takes them where the slice starts there, instead of reading the table again
    from flashkv_ops.kernels import decode

    monkeypatch.setattr(decode, "_sort_pages", lambda *args: 0)
    case = dict(BASE, batch=len(lens), s_q=s_q, lens=lens, page_size=page_size, dtype=torch.float16,
                with_new=with_new, extra_pages=3, extra_columns=0, garbage="nan", seed=page_size + 5 * s_q)
    check_paged_vs_contiguous(case, torch.Generator().manual_seed(case["seed"]))
    if os.environ.get("TRITON_INTERPRET") == "1":  # the kernels ran (else the PyTorch fallback did)
        paged = [kw for _, kw in split_launches if kw["PAGED"]]
        assert paged and all(kw["GUESS_NEXT"] for kw in paged), "the second block's entries were not guessed"


@pytest.mark.parametrize("tail_lens", [(0, 97), (1, 48), (33, 100), (0, 19)])
@pytest.mark.parametrize("s_q,with_new,causal", [(1, True, True), (1, False, True), (3, True, True), (3, True, False)])
def test_decode_tail_launch_past_one_wave(monkeypatch, split_launches, tail_lens, s_q, with_new, causal):
    # 16-bit caches just past one wave of (sequence, KV head) groups: one launch takes the first
    # wave's groups (one program each, output written directly) and zeroes a count per leftover
    # group; a second launch splits the leftover groups, and the last of each group's programs
    # to end merges their results (and, appending, scores and stores the new tokens). The
    # interpreter is told the wave holds 10 groups; 12 here, so the last two take the tail, with
    # empty, one-token and uneven lengths and NaN in every slot no sequence holds. Paged and
    # contiguous caches both take it.
    from flashkv_ops.kernels import decode

    merges = record_launches(monkeypatch, decode, "_decode_merge_kernel")
    monkeypatch.setattr(decode, "TAIL_INTERPRET_WAVE", 10)
    lens = [5, 17, 0, 64, 31, 100, 2, 80, 15, 40, *tail_lens]
    if max(tail_lens) < 20:  # a capacity under two tail blocks: one slice a group, written directly
        lens = [n % 20 for n in lens]
    case = dict(BASE, batch=len(lens), num_kv_heads=1, s_q=s_q, causal=causal, lens=lens, page_size=16,
                dtype=torch.float16, with_new=with_new, garbage="nan", seed=sum(tail_lens) + s_q)
    check_paged_vs_contiguous(case, torch.Generator().manual_seed(case["seed"]))
    if os.environ.get("TRITON_INTERPRET") == "1":  # the kernels ran (else the PyTorch fallback did)
        # paged, then contiguous: the first launch, then the tail (the short contiguous cache in one slice)
        heads, tails = split_launches[0::2], split_launches[1::2]
        assert [grid for grid, _ in heads] == [(1, 10)] * 2 and all(kw["ZERO_COUNTERS"] for _, kw in heads)
        assert [grid for grid, _ in tails] == ([(4, 2)] * 2 if max(tail_lens) >= 20 else [(2, 2), (1, 2)])
        assert [kw["FUSED_MERGE"] for _, kw in tails] == [grid[0] > 1 for grid, _ in tails]
        assert merges == []


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_paged_split_kv_long_sequences(dtype):
    # decode over ~500-1000 tokens in pages of 16: the split-KV path walks many pages. 16-bit
    # pools read the table a block ahead: the slices of the 1000-token sequence start where the
    # capacity-based guess of each first block's table entries put them (the guess is used), those
    # of the 129-token one do not (the entries are read again).
    case = dict(BASE, batch=3, s_q=1, lens=[1000, 129, 511], page_size=16, dtype=dtype, seed=5)
    check_paged_vs_contiguous(case, torch.Generator().manual_seed(5))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_paged_k_and_v_pools_with_different_strides(dtype):
    # v pages as a view into a wider pool: the kernels address K and V with separate row offsets
    # (float32 decode gathers synchronously, 16-bit decode reads the block table a block ahead)
    g = torch.Generator().manual_seed(9)
    b, hkv, hq, d, page_size, s_q = 2, 2, 4, 32, 8, 1
    lens_list = [37, 9]
    k_cache = randn((b, hkv, 48, d), dtype, generator=g)
    v_cache = randn((b, hkv, 48, d), dtype, generator=g)
    k_pages, v_pages, table = build_paged(k_cache, v_cache, lens_list, s_q, page_size, g)
    wide = randn((v_pages.shape[0], hkv + 1, page_size, d), dtype, generator=g)
    v_view = wide[:, 1:]
    v_view.copy_(v_pages)
    assert v_view.stride() != k_pages.stride()
    q = randn((b, hq, s_q, d), dtype, generator=g)
    k = randn((b, hkv, s_q, d), dtype, generator=g)
    v = randn((b, hkv, s_q, d), dtype, generator=g)
    lens = torch.tensor(lens_list, dtype=torch.int32)
    want_out, want_kp, want_vp = kv_cache_ref(q, k_pages, v_pages, lens, k, v, block_table=table)
    out = fkv.attention_with_kv_cache(q, k_pages.clone(), v_view, lens, k, v, block_table=table)
    same = fkv.attention_with_kv_cache(q, k_pages, v_pages, lens, k, v, block_table=table)
    assert bit_equal(v_view, want_vp) and bit_equal(v_pages, want_vp)
    if dtype == torch.float32:
        assert_close_to_ref(out, want_out)
    else:
        assert max_err(out, want_out) <= 2e-3 * max(1.0, want_out.abs().max().item())
    assert max_err(out, same) == 0.0


def test_paged_row_flags_follow_strides_and_pool_size():
    from flashkv_ops.kernels.common import paged_row_flags

    table = torch.zeros((1, 1), dtype=torch.int32)
    small = torch.empty((64, 8, 16, 128), device="meta")
    assert paged_row_flags(small, small, table) == dict(SHARED_ROWS=True, WIDE_ROWS=False)
    assert paged_row_flags(small, small, None) == dict(SHARED_ROWS=False, WIDE_ROWS=False)
    strided = torch.empty((64, 9, 16, 128), device="meta")[:, 1:]
    assert paged_row_flags(small, strided, table)["SHARED_ROWS"] is False
    # one page past 2**31 elements: its last element needs 64-bit offsets
    big = torch.empty((2**31 // (8 * 16 * 128) + 1, 8, 16, 128), device="meta")
    assert paged_row_flags(big, big, table)["WIDE_ROWS"] is True
    assert paged_row_flags(big[:-1], big[:-1], table)["WIDE_ROWS"] is False


# -- bad block tables ---------------------------------------------------------------------------

def _bad_table_inputs():
    g = torch.Generator().manual_seed(21)
    num_pages, page_size, hkv, d = 6, 4, 1, 16
    k_pages = randn((num_pages, hkv, page_size, d), torch.float32, generator=g)
    v_pages = randn((num_pages, hkv, page_size, d), torch.float32, generator=g)
    table = torch.tensor([[3, 0, -1], [5, 1, 2]], dtype=torch.int32)
    lens = torch.tensor([4, 9], dtype=torch.int32)  # seq 0 appends into page table[0,1]
    q = randn((2, 2, 1, d), torch.float32, generator=g)
    k = randn((2, hkv, 1, d), torch.float32, generator=g)
    v = randn((2, hkv, 1, d), torch.float32, generator=g)
    return dict(q=q, k_pages=k_pages, v_pages=v_pages, lens=lens, k=k, v=v, table=table)


def _call(a):
    return fkv.attention_with_kv_cache(a["q"], a["k_pages"], a["v_pages"], a["lens"], a["k"],
                                       a["v"], block_table=a["table"])


def test_bad_table_baseline_is_valid():
    _call(_bad_table_inputs())


@pytest.mark.parametrize("where,value", [
    ((0, 1), 6),      # == num_pages, in the page the new token goes to
    ((1, 0), 100),    # far outside, in a page that is only read
    ((0, 0), -1),     # negative in a used slot
    ((1, 2), -7),
])
def test_bad_block_table_entry_raises_and_writes_nothing(where, value):
    a = _bad_table_inputs()
    a["table"][where] = value
    kp, vp, table0 = a["k_pages"].clone(), a["v_pages"].clone(), a["table"].clone()
    with pytest.raises(ValueError, match="block_table"):
        _call(a)
    assert bit_equal(a["k_pages"], kp) and bit_equal(a["v_pages"], vp)
    assert torch.equal(a["table"], table0)


def test_block_table_wrong_dtype_and_shape():
    a = _bad_table_inputs()
    a["table"] = a["table"].long()
    with pytest.raises(TypeError, match="block_table"):
        _call(a)
    a = _bad_table_inputs()
    a["table"] = a["table"][:1]
    with pytest.raises(ValueError, match="block_table"):
        _call(a)
    a = _bad_table_inputs()
    a["table"] = a["table"][:, :, None]
    with pytest.raises(ValueError, match="block_table"):
        _call(a)


def test_table_too_short_for_length_is_overflow():
    # capacity is max_pages_per_seq * page_size = 3 * 4 = 12; 11 + 2 tokens overflow
    a = _bad_table_inputs()
    a["lens"] = torch.tensor([0, 11], dtype=torch.int32)
    a["q"] = a["q"].expand(-1, -1, 2, -1).contiguous()
    a["k"] = a["k"].expand(-1, -1, 2, -1).contiguous()
    a["v"] = a["v"].expand(-1, -1, 2, -1).contiguous()
    kp = a["k_pages"].clone()
    with pytest.raises(ValueError, match="cache_seqlens|block_table"):
        _call(a)
    assert bit_equal(a["k_pages"], kp)


# -- paged_read_order ---------------------------------------------------------------------------

def read_order_ref(table, lens, page_size):
    """Each row's first ``lens[b] // page_size`` entries sorted ascending, the rest as they were."""
    rows = []
    for row, n in zip(table.tolist(), lens.tolist()):
        full = min(n // page_size, len(row))
        rows.append(sorted(row[:full]) + row[full:])
    return torch.tensor(rows, dtype=torch.int32)


@pytest.mark.parametrize("page_size", [1, 3, 8, 16])
@pytest.mark.parametrize("max_pages", [1, 5, 33, 300])
def test_paged_read_order_sorts_whole_pages_only(page_size, max_pages):
    # lengths inside the first page, on a page boundary (that page is then full), one short of the
    # table's end and past it; unused entries -1; a repeated entry; rows wider than 128 entries;
    # strided views of a wider table and of wider lengths
    from flashkv_ops import _fallback

    g = torch.Generator().manual_seed(page_size * 100 + max_pages)
    wide = torch.randperm(8 * max_pages + 8, generator=g)[:8 * max_pages].to(torch.int32).view(4, 2 * max_pages)
    table = wide[:, ::2]
    table[1, max_pages // 2:] = -1
    table[3, -1] = table[3, 0]
    lens = torch.tensor([0, page_size * (max_pages // 2), page_size * max_pages - 1, page_size * max_pages + 5],
                        dtype=torch.int32)
    lens[0] = page_size - 1 if page_size > 1 else 0
    want = read_order_ref(table, lens, page_size)
    table0 = table.clone()
    got = fkv.paged_read_order(table, lens, page_size)
    assert got.dtype == torch.int32 and got.shape == table.shape and got.is_contiguous()
    assert torch.equal(got, want)
    # lengths as a strided view (every other entry of a wider tensor holding other values)
    strided = torch.stack([lens, torch.full_like(lens, 2**30)], dim=1)[:, 0]
    assert torch.equal(fkv.paged_read_order(table, strided, page_size), want)
    assert torch.equal(_fallback.paged_read_order(table, lens, page_size), want)
    assert torch.equal(table, table0), "block_table modified"


@pytest.mark.skipif(not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") != "1",
                    reason="launches the kernel itself: no CUDA and no interpreter (the fallback run)")
@pytest.mark.parametrize("block, others", [(4, 8), (2, 16), (8, 8)])
def test_paged_read_order_rank_kernel_over_many_chunks(block, others):
    # the rank kernel with tiles far smaller than the rows, so a program's entries have chunks on
    # both sides of their own (compared by value only) and the prefix ends inside a chunk; repeated
    # entries, int32 extremes, lengths past the row (compiled on a GPU, else the interpreter)
    from flashkv_ops import _fallback
    from flashkv_ops.kernels import page_order

    device = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator().manual_seed(block * 100 + others)
    for trial in range(6):
        rows, width = 3, int(torch.randint(1, 60, (1,), generator=g))
        table = torch.randint(-3, width, (rows, width), generator=g, dtype=torch.int32)  # repeats
        table[0, ::3] = 2**31 - 1 if trial % 2 else -2**31
        lens = torch.randint(0, 4 * width + 8, (rows,), generator=g, dtype=torch.int32)
        out = torch.full_like(table, -99, device=device)
        page_order.paged_read_order(table.to(device), lens.to(device), 4, out, block, others, 1)
        assert torch.equal(out.cpu(), _fallback.paged_read_order(table, lens, 4)), (table, lens)


@PROPERTY
@given(case=paged_cases())
def test_paged_read_order_gives_the_same_attention_and_slots(case):
    # wherever every query sees every key below cache_seqlens, the read-order table gives the
    # logical table's result and writes the same slots
    if case["causal"] and not case["with_new"] and case["s_q"] > 1:
        case = dict(case, causal=False)
    _, _, k_pages, v_pages, table, q, k, v, lens = paged_inputs(case, torch.Generator().manual_seed(case["seed"]))
    ordered = fkv.paged_read_order(table, lens, case["page_size"])
    assert torch.equal(ordered, read_order_ref(table, lens, case["page_size"]))
    pools = [(k_pages.clone(), v_pages.clone()) for _ in range(2)]
    outs = [fkv.attention_with_kv_cache(q, kp, vp, lens, k, v, causal=case["causal"], block_table=t)
            for (kp, vp), t in zip(pools, (table, ordered))]
    assert bit_equal(pools[0][0], pools[1][0]) and bit_equal(pools[0][1], pools[1][1]), str(case)
    dtype = case["dtype"]
    same = 1e-5 if dtype == torch.float32 else (2e-3 if dtype == torch.float16 else 2e-2)
    assert max_err(outs[0], outs[1]) <= same, str(case)


@pytest.mark.parametrize("call, error, name", [
    (lambda t, n: fkv.paged_read_order(t, n, 0), ValueError, "page_size"),
    (lambda t, n: fkv.paged_read_order(t, n, 2.0), TypeError, "page_size"),
    (lambda t, n: fkv.paged_read_order(t.long(), n, 4), TypeError, "block_table"),
    (lambda t, n: fkv.paged_read_order(t[0], n, 4), ValueError, "block_table"),
    (lambda t, n: fkv.paged_read_order(t.tolist(), n, 4), TypeError, "block_table"),
    (lambda t, n: fkv.paged_read_order(t, n[:1], 4), ValueError, "cache_seqlens"),
    (lambda t, n: fkv.paged_read_order(t, n.long(), 4), TypeError, "cache_seqlens"),
])
def test_paged_read_order_arguments_are_checked(call, error, name):
    table = torch.tensor([[3, 1, 2], [0, 4, 5]], dtype=torch.int32)
    with pytest.raises(error, match=name):
        call(table, torch.tensor([8, 9], dtype=torch.int32))


# -- PagedKVCache allocator --------------------------------------------------------------------

def make_pool(num_pages=8, page_size=4, max_batch_size=3, max_pages_per_seq=4, num_layers=2):
    return fkv.PagedKVCache(num_pages, page_size, 2, 16, num_layers=num_layers,
                            max_batch_size=max_batch_size, max_pages_per_seq=max_pages_per_seq,
                            dtype=torch.float32, device="cpu")


def test_pool_layout():
    c = make_pool()
    assert len(c.k_pages) == 2 and len(c.v_pages) == 2
    # the 8 pages handed out, then the null page idle slots point at
    assert c.k_pages[0].shape == (9, 2, 4, 16) and c.k_pages[1].dtype == torch.float32
    assert c.null_page == 8 and (c.block_table == c.null_page).all()
    assert c.block_table.shape == (3, 4) and c.block_table.dtype == torch.int32
    assert c.seqlens.shape == (3,) and c.seqlens.dtype == torch.int32
    assert c.num_free_pages == 8
    assert int(c.seqlens.sum()) == 0


def test_reserve_grows_by_pages():
    c = make_pool()
    c.reserve(0, 5)  # 2 pages of 4
    assert c.num_free_pages == 6
    row = c.block_table[0].tolist()
    assert len(set(row[:2])) == 2 and all(0 <= p < 8 for p in row[:2])
    assert row[:2] == c.pages_of(0)
    c.advance(0, 5)
    assert int(c.seqlens[0]) == 5
    c.reserve(0, 3)  # room for 3 more after the 5 written: 8 tokens, still 2 pages
    assert c.num_free_pages == 6
    c.advance(0, 3)
    c.reserve(0, 1)  # 9 tokens: a third page
    assert c.num_free_pages == 5
    c.reserve(0, 1)  # reserving the same room again takes nothing
    assert c.num_free_pages == 5
    assert len(set(c.pages_of(0))) == 3


def test_allocator_hands_out_lowest_free_pages_first():
    # each sequence's pages ascend and live pages stay packed at the pool's low end, whatever
    # order sequences end in (decode reads such pools faster than scattered ones)
    c = make_pool(num_pages=8, max_pages_per_seq=5)
    c.reserve(0, 12)                       # 3 pages
    c.reserve(1, 8)                        # 2 pages
    c.reserve(2, 4)                        # 1 page
    assert (c.pages_of(0), c.pages_of(1), c.pages_of(2)) == ([0, 1, 2], [3, 4], [5])
    c.free(0)                              # pages 0-2 free again, next to 6 and 7
    c.reserve(1, 16)                       # sequence 1 grows into the lowest freed pages
    assert c.pages_of(1) == [3, 4, 0, 1]
    c.reserve(0, 12)
    assert c.pages_of(0) == [2, 6, 7] and c.num_free_pages == 0
    c.free(2)
    c.free(1)
    c.reserve(2, 12)
    assert c.pages_of(2) == [0, 1, 3]
    assert c.block_table[2, :3].tolist() == [0, 1, 3]


def test_block_table_and_seqlens_updated_in_place():
    # A captured CUDA graph holds these tensors' storage: the allocator must update in place.
    c = make_pool()
    ptrs = [t.data_ptr() for t in (c.block_table, c.read_table, c.seqlens)]
    c.reserve(1, 9)
    c.advance(1, 9)
    c.free(1)
    c.reserve(2, 3)
    assert [t.data_ptr() for t in (c.block_table, c.read_table, c.seqlens)] == ptrs


def test_read_table_keeps_full_pages_in_pool_order():
    # pages handed out out of order (sequence 1 grows into pages freed by sequence 0): read_table
    # sorts each row's full pages as advance() fills them, the page being filled and later ones kept
    c = make_pool(num_pages=8, max_pages_per_seq=5)
    c.reserve(0, 12)
    c.reserve(1, 8)
    c.free(0)
    c.reserve(1, 16)                       # pages [3, 4, 0, 1]
    assert c.read_table[0].tolist() == [c.null_page] * 5
    for written in (3, 5, 4, 1, 3):        # 3, 8 (page 2 full), 12, 13, 16 tokens
        c.advance(1, written)
        assert torch.equal(c.read_table, read_order_ref(c.block_table, c.seqlens, c.page_size))
    assert c.read_table[1].tolist() == [0, 1, 3, 4, -1]
    assert c.block_table[1].tolist() == [3, 4, 0, 1, -1]
    c.reserve(1, 4)                        # a fifth page, after the sorted ones
    assert c.read_table[1].tolist() == [0, 1, 3, 4, c.pages_of(1)[4]]


@pytest.mark.parametrize("causal, with_new", [(True, True), (True, False), (False, False)])
def test_pool_attention_reads_through_read_table_where_order_is_free(monkeypatch, causal, with_new):
    # rows whose pages are out of pool order; a causal call over 3 query tokens without new ones
    # sees keys by position, so it must read the logical table (else its result would change)
    g = torch.Generator().manual_seed(53)
    c = make_pool(num_pages=8, page_size=4, max_batch_size=2, max_pages_per_seq=4, num_layers=1)
    c.reserve(0, 8)
    c.reserve(1, 8)
    c.free(0)
    c.reserve(1, 16)                       # sequence 1: pages [2, 3, 0, 1]
    c.reserve(0, 8)
    c.k_pages[0][:c.num_pages].normal_(generator=g)
    c.v_pages[0][:c.num_pages].normal_(generator=g)
    c.advance(0, 8)
    c.advance(1, 13)
    assert c.block_table[1].tolist() == [2, 3, 0, 1] and c.read_table[1].tolist() == [0, 2, 3, 1]
    q = randn((2, 4, 3, 16), torch.float32, generator=g)
    k = randn((2, 2, 3, 16), torch.float32, generator=g) if with_new else None
    v = randn((2, 2, 3, 16), torch.float32, generator=g) if with_new else None
    if with_new:
        c.reserve(0, 3)
        c.reserve(1, 3)
    want, want_k, want_v = kv_cache_ref(q, c.k_pages[0], c.v_pages[0], c.seqlens, k, v, causal=causal,
                                        block_table=c.block_table)
    from flashkv_ops import paged

    tables = []
    real = paged.attention_with_kv_cache
    monkeypatch.setattr(paged, "attention_with_kv_cache",
                        lambda *args, **kwargs: tables.append(kwargs["block_table"]) or real(*args, **kwargs))
    out = c.attention(0, q, k, v, causal=causal)
    assert len(tables) == 1 and tables[0] is (c.block_table if causal and not with_new else c.read_table)
    assert_close_to_ref(out, want, what=f"causal={causal} with_new={with_new}")
    assert bit_equal(c.k_pages[0], want_k) and bit_equal(c.v_pages[0], want_v)


def test_pool_exhaustion_is_clear_and_changes_nothing():
    c = make_pool(num_pages=4, max_pages_per_seq=4)
    c.reserve(0, 12)  # 3 pages
    c.advance(0, 12)
    c.k_pages[0].normal_()
    c.v_pages[1].normal_()
    data = [t.clone() for t in c.k_pages + c.v_pages]
    table0, lens0, free0 = c.block_table.clone(), c.seqlens.clone(), c.num_free_pages
    with pytest.raises(RuntimeError) as info:
        c.reserve(1, 8)  # needs 2 pages, 1 free
    assert "exhaust" in str(info.value).lower() or "free" in str(info.value).lower()
    assert isinstance(info.value, fkv.PoolExhaustedError)
    assert torch.equal(c.block_table, table0) and torch.equal(c.seqlens, lens0)
    assert c.num_free_pages == free0
    assert all(torch.equal(a, b) for a, b in zip(c.k_pages + c.v_pages, data))
    c.reserve(1, 4)  # the last page still works
    assert c.num_free_pages == 0
    assert set(c.pages_of(1)).isdisjoint(c.pages_of(0))


def test_reserve_past_max_pages_per_seq_raises_value_error():
    c = make_pool(num_pages=16, max_pages_per_seq=2)  # capacity 8 tokens
    c.reserve(0, 8)
    c.advance(0, 8)
    free0 = c.num_free_pages
    with pytest.raises(ValueError):
        c.reserve(0, 1)
    assert c.num_free_pages == free0


def test_advance_past_reserved_raises():
    c = make_pool()
    c.reserve(0, 3)
    with pytest.raises(ValueError):
        c.advance(0, 4)


def test_free_returns_pages_for_reuse_and_live_pages_survive():
    g = torch.Generator().manual_seed(31)
    c = make_pool(num_pages=5, page_size=4, max_batch_size=2, max_pages_per_seq=5, num_layers=1)
    hq, d = 4, 16

    def step(tokens_by_seq):
        """Append ``tokens_by_seq[b]`` new tokens (same for both slots, per the op) and check."""
        s_q = tokens_by_seq
        for b in range(2):
            c.reserve(b, s_q)
        q = randn((2, hq, s_q, d), torch.float32, generator=g)
        k = randn((2, 2, s_q, d), torch.float32, generator=g)
        v = randn((2, 2, s_q, d), torch.float32, generator=g)
        lens = c.seqlens.clone()
        want, want_k, want_v = kv_cache_ref(q, c.k_pages[0], c.v_pages[0], lens, k, v,
                                            block_table=c.block_table)
        out = c.attention(0, q, k, v)
        assert bit_equal(c.k_pages[0], want_k) and bit_equal(c.v_pages[0], want_v)
        assert_close_to_ref(out, want, what="pool step")
        for b in range(2):
            c.advance(b, s_q)
        return k, v

    step(5)       # both sequences: 5 tokens -> 2 pages each, 1 page free
    step(1)       # 6 tokens each
    assert c.num_free_pages == 1
    live_pages = c.pages_of(1)
    live = [(c.k_pages[0][p].clone(), c.v_pages[0][p].clone()) for p in live_pages]
    with pytest.raises(fkv.PoolExhaustedError):
        c.reserve(0, 8)  # 14 tokens -> 4 pages: 2 more, only 1 free
    freed = c.pages_of(0)
    c.free(0)
    assert c.num_free_pages == 3
    assert int(c.seqlens[0]) == 0 and (c.block_table[0] == c.null_page).all()
    # sequence 0 restarts; its page comes from the freed ones or the one never handed out
    step(3)       # seq 0: 3 tokens (1 page), seq 1: 9 tokens (3 pages)
    assert c.num_free_pages == 1
    assert set(c.pages_of(0)) <= (set(freed) | set(range(5))) - set(live_pages)
    assert set(c.pages_of(0)).isdisjoint(c.pages_of(1))
    assert c.pages_of(1)[:len(live_pages)] == live_pages
    # the live sequence's 6 old tokens were not touched by the restarted one
    for i, (p, (kp, vp)) in enumerate(zip(live_pages, live)):
        n_old = max(0, min(4, 6 - 4 * i))
        assert torch.equal(c.k_pages[0][p][:, :n_old], kp[:, :n_old])
        assert torch.equal(c.v_pages[0][p][:, :n_old], vp[:, :n_old])
    # and reused memory is fully reusable: free both, the whole pool is available again
    c.free(0)
    c.free(1)
    assert c.num_free_pages == 5
    c.reserve(0, 20)
    assert sorted(c.pages_of(0)) == list(range(5))


def test_idle_and_freed_slots_take_part_without_touching_live_pages():
    # A served batch keeps its shape while slots empty: slot 1 is freed mid-stream and slot 2 is
    # never reserved, yet every step runs over all three slots, in eager mode with its checks.
    g = torch.Generator().manual_seed(37)
    c = make_pool(num_pages=6, page_size=4, max_batch_size=3, max_pages_per_seq=4, num_layers=1)
    hq, d = 4, 16
    for step, s_q in enumerate((3, 1, 1, 2)):
        if step == 2:
            c.free(1)
        c.reserve(0, s_q)
        if step < 2:
            c.reserve(1, s_q)
        q = randn((3, hq, s_q, d), torch.float32, generator=g)
        k = randn((3, 2, s_q, d), torch.float32, generator=g)
        v = randn((3, 2, s_q, d), torch.float32, generator=g)
        active = [0, 1] if step < 2 else [0]
        rows = torch.tensor(active)
        want, want_k, want_v = kv_cache_ref(q[rows], c.k_pages[0], c.v_pages[0], c.seqlens[rows], k[rows], v[rows],
                                            block_table=c.block_table[rows])
        out = c.attention(0, q, k, v)
        assert_close_to_ref(out[rows], want, what=f"step {step}")
        # every page the allocator owns holds exactly what the live sequences wrote
        owned = slice(0, c.num_pages)
        assert bit_equal(c.k_pages[0][owned], want_k[owned]) and bit_equal(c.v_pages[0][owned], want_v[owned])
        for b in active:
            c.advance(b, s_q)
    assert c.pages_of(1) == [] and c.num_free_pages == 6 - len(c.pages_of(0))
    assert (c.block_table[1:] == c.null_page).all()
    # a freed slot starts again from fresh pages, its row no longer pointing at the null page
    c.reserve(1, 5)
    assert c.block_table[1].tolist()[:2] == c.pages_of(1) and c.block_table[1].tolist()[2:] == [-1, -1]


@pytest.mark.parametrize("call, error, name", [
    (lambda c: c.advance(0, -3), ValueError, "num_tokens"),
    (lambda c: c.advance(0, 2.5), TypeError, "num_tokens"),
    (lambda c: c.reserve(0, -1), ValueError, "num_tokens"),
    (lambda c: c.reserve(1.5, 1), TypeError, "seq"),
    (lambda c: c.free(-1), ValueError, "seq"),
    (lambda c: c.attention(-1, None), ValueError, "layer"),
    (lambda c: c.attention(2, None), ValueError, "layer"),
    (lambda c: fkv.PagedKVCache(8, 4, 2, 12, device="cpu"), ValueError, "head_dim"),
    (lambda c: fkv.PagedKVCache(8, 4, 2, 16, dtype=torch.int32, device="cpu"), TypeError, "dtype"),
    (lambda c: fkv.PagedKVCache(8.0, 4, 2, 16, device="cpu"), TypeError, "num_pages"),
    (lambda c: fkv.PagedKVCache(8, 0, 2, 16, device="cpu"), ValueError, "page_size"),
])
def test_allocator_arguments_are_checked(call, error, name):
    c = make_pool()
    c.reserve(0, 2)
    c.advance(0, 2)
    table, lens = c.block_table.clone(), c.seqlens.clone()
    with pytest.raises(error, match=name):
        call(c)
    assert torch.equal(c.block_table, table) and torch.equal(c.seqlens, lens)
