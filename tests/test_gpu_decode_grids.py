"""GPU-only: decode's tiles and grids at the SM count of the GPU it runs on (written for an
H100's 132 SMs): partial last blocks with NaN past the lengths (contiguous caches and paged
pools), grids past one wave of programs, and groups that whole splits cannot spread.

The references run on the GPU in float64 (tests/reference.py); the low-precision yardstick is
PyTorch's own fp16/bf16 math on the caches as the call leaves them.
"""

import pytest
import torch

import flashkv_ops as fkv
from reference import assert_close_to_ref, bit_equal, build_paged, kv_cache_ref, lowp_kv_ref, randn

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

DEVICE = "cuda"


@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("s_q, with_new", [(1, True), (1, False), (4, True), (4, False)])
@pytest.mark.parametrize("s_max", [4096, 16384])
def test_gpu_partial_last_block_with_nan_past_the_lengths(head_dim, s_q, with_new, s_max):
    # Bulk copies read a slice's partial last block as the whole block ending at the slice end
    # (from before key 0 when the sequence is shorter than a block): lengths shorter than a block,
    # one off block boundaries, uneven over the splits (14 sequence-heads: several splits on an
    # H100), NaN in every slot past them; causal multi-token queries see the diagonal. At 16384
    # slots the blocks are the ones that take a whole SM (the first asked of the L2 before the wait)
    b, hq, hkv, dt = 7, 16, 2, torch.float16
    g = torch.Generator().manual_seed(head_dim * 10 + s_q)
    lens_list = [0, 1, 2, 63, 129, 1153, s_max - s_q] if with_new else [s_q, s_q + 1, 63, 127, 129, 1153, s_max]
    d = head_dim
    k_cache = randn((b, hkv, s_max, d), dt, DEVICE, generator=g)
    v_cache = randn((b, hkv, s_max, d), dt, DEVICE, generator=g)
    for i, n in enumerate(lens_list):
        k_cache[i, :, n:] = float("nan")
        v_cache[i, :, n:] = float("nan")
    q = randn((b, hq, s_q, d), dt, DEVICE, generator=g)
    k = randn((b, hkv, s_q, d), dt, DEVICE, generator=g) if with_new else None
    v = randn((b, hkv, s_q, d), dt, DEVICE, generator=g) if with_new else None
    lens = torch.tensor(lens_list, dtype=torch.int32, device=DEVICE)
    want, want_k, want_v = kv_cache_ref(q, k_cache, v_cache, lens, k, v)
    out = fkv.attention_with_kv_cache(q, k_cache, v_cache, lens, k, v)
    assert bit_equal(k_cache, want_k) and bit_equal(v_cache, want_v)
    total = [n + (s_q if with_new else 0) for n in lens_list]
    assert_close_to_ref(out, want, lowp_kv_ref(q, want_k, want_v, total, True), what=f"lens {lens_list}")


@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("shape", [(7, 16, 2), (16, 8, 8)])
@pytest.mark.parametrize("s_q, with_new, causal", [(1, True, True), (1, False, True), (4, True, False),
                                                   (4, True, True)])
def test_gpu_paged_partial_blocks_with_nan_past_the_lengths(head_dim, shape, s_q, with_new, causal):
    # Paged pools (random page order, page_size 16) hide the keys past a length inside a slice's
    # partial last block, by the tile the dot starts from at D=64 (no causal diagonal) and by a
    # select elsewhere, while the rows were loaded masked: NaN in every slot past the lengths and
    # in the spare pages must not leak (table entries past a sequence's pages are -1). 14
    # sequence-heads get several splits on an H100, 128 one.
    b, hq, hkv = shape
    s_max, dt = 2048, torch.float16
    g = torch.Generator().manual_seed(head_dim + 10 * s_q + b)
    lens_list = ([0, 1, 17, 255, 257, 1153, s_max - s_q] * 3)[:b]
    if not with_new:
        lens_list = [max(n, s_q) for n in lens_list]
    k_cache = randn((b, hkv, s_max, head_dim), dt, generator=g)
    v_cache = randn((b, hkv, s_max, head_dim), dt, generator=g)
    k_pages, v_pages, table = (t.to(DEVICE) for t in build_paged(
        k_cache, v_cache, lens_list, s_q, 16, g, extra_pages=5, with_new=with_new, garbage="nan"))
    q = randn((b, hq, s_q, head_dim), dt, DEVICE, generator=g)
    k = randn((b, hkv, s_q, head_dim), dt, DEVICE, generator=g) if with_new else None
    v = randn((b, hkv, s_q, head_dim), dt, DEVICE, generator=g) if with_new else None
    lens = torch.tensor(lens_list, dtype=torch.int32, device=DEVICE)
    want, want_k, want_v = kv_cache_ref(q, k_pages, v_pages, lens, k, v, causal=causal, block_table=table)
    out = fkv.attention_with_kv_cache(q, k_pages, v_pages, lens, k, v, causal=causal, block_table=table)
    assert bit_equal(k_pages, want_k) and bit_equal(v_pages, want_v)
    total = [n + (s_q if with_new else 0) for n in lens_list]
    assert_close_to_ref(out, want, lowp_kv_ref(q, want_k, want_v, total, causal, table),
                        what=f"lens {lens_list}")


@pytest.mark.parametrize("shape", [(17, 32, 8, 128), (28, 32, 8, 128), (18, 32, 8, 64), (20, 32, 8, 64),
                                   (32, 32, 8, 64), (36, 32, 8, 64), (8, 32, 32, 96)])
@pytest.mark.parametrize("paged", [False, True])
@pytest.mark.parametrize("s_q", [1, 4])
def test_gpu_decode_grids_past_one_wave(shape, paged, s_q):
    # More (sequence, KV head) programs than SMs: on an H100 (132 SMs) 136 groups at D=128 and
    # 144 and 160 at D=64 take the tail launch (`_tail_groups`: the first 132 groups one program
    # each, the rest split beside them, merged by the last of each group's programs); 224 at D=128
    # one split (on a pool, writing the new tokens first into the pages picked out of the table
    # row); at D=64 one split of 64-key blocks: 256 on a pool with four stages (scoring one new
    # token apart), 256 contiguous and 288 with three; 256 at D=96 (no group), contiguous, pointer
    # loads of 128-key blocks.
    check_uneven_grid(shape, paged, s_q)


@pytest.mark.parametrize("shape", [(12, 32, 8, 128), (12, 32, 8, 64), (7, 28, 4, 128), (9, 32, 8, 128)])
@pytest.mark.parametrize("paged", [False, True])
@pytest.mark.parametrize("s_q", [1, 4])
def test_gpu_decode_grids_splits_cannot_spread(shape, paged, s_q):
    # Fewer (sequence, KV head) groups than SMs that whole splits spread badly over an H100's 132
    # SMs: 96 groups (one split: 73% of the SMs), 28 and 72 (nine and three splits: 1.9 and 1.6
    # waves). Contiguous caches share their key blocks out over 132 programs (a program's share
    # crossing into the next group, or up to six programs on one group); pools keep the splits.
    check_uneven_grid(shape, paged, s_q)


@pytest.mark.parametrize("shape", [(20, 32, 8, 64), (32, 32, 8, 64), (40, 32, 4, 64), (64, 32, 8, 64)])
@pytest.mark.parametrize("paged", [False, True])
@pytest.mark.parametrize("s_q", [1, 4])
def test_gpu_decode_past_one_wave_reading_only(shape, paged, s_q):
    # No new tokens: lengths off a block boundary end a slice in a partial block, which bulk
    # copies past one wave at D=64 read as the block ending at the slice end (the shifted loop)
    # and whole-block slices unmasked; 160-512 programs, one split, 64- and 128-key blocks.
    check_uneven_grid(shape, paged, s_q, with_new=False)


@pytest.mark.parametrize("shape", [(17, 32, 8, 64), (17, 32, 8, 128), (24, 32, 8, 128)])
@pytest.mark.parametrize("paged", [False, True])
def test_gpu_decode_tail_launch_taken(monkeypatch, shape, paged):
    # Groups just past one wave of the GPU's SMs take the tail launch: a first grid of one program
    # per SM, then the leftover groups in 4-8 slices each, no merge kernel (136 groups at D=64
    # and 128, 192 at D=128 on a pool; contiguous caches at D=128 only up to 1.1 waves)
    from flashkv_ops.kernels import decode
    from reference import record_launches

    splits = record_launches(monkeypatch, decode, "_decode_split_kernel")
    merges = record_launches(monkeypatch, decode, "_decode_merge_kernel")
    check_uneven_grid(shape, paged, 1)
    b, _, hkv, d = shape
    sms = decode._sm_count(torch.cuda.current_device())
    tail = b * hkv - sms
    waves = 1.22 if d <= 64 else 1.5 if paged else 1.1
    if torch.cuda.get_device_capability()[0] < 9 or not 0 < tail <= (waves - 1) * sms:
        assert not any(kw["FUSED_MERGE"] for _, kw in splits), "a tail launch where none belongs"
        return
    assert len(splits) == 2 and splits[0][0] == (1, sms) and merges == []
    assert splits[1][0][1] == tail and splits[1][0][0] in (4, 8) and splits[1][1]["FUSED_MERGE"]
    # the first launch's programs visit their pages in table order at D=64 (the pool-order sort
    # cost 0.4 us there), in pool order at D=128
    assert (splits[0][1]["SORT_PAGES"] > 0) == (paged and d > 64), splits[0][1]["SORT_PAGES"]


@pytest.mark.parametrize("shape,s_max,with_new,sorts,first_in_order", [
    ((8, 32, 4, 64), 4096, True, True, True),     # four splits a (sequence, KV head), appending
    ((8, 32, 4, 64), 4096, False, True, True),
    ((16, 8, 8, 64), 2048, False, True, True),    # one split, reading
    ((16, 8, 8, 64), 2048, True, False, False),   # one split appending at D=64: table order
    ((2, 32, 8, 128), 8192, True, True, False),
])
def test_gpu_decode_pool_order_taken(monkeypatch, shape, s_max, with_new, sorts, first_in_order):
    # One wave of paged programs launched early visits its slice's pages in pool order, taken from
    # registers (at D=64 after a first block kept in table order), but one split appending at D=64;
    # lengths that fill every slice but the last (a page partly filled, masked by position) and
    # one whose slices are short (visited in table order), NaN in every slot no sequence holds
    from flashkv_ops.kernels import decode
    from reference import record_launches

    splits = record_launches(monkeypatch, decode, "_decode_split_kernel")
    lens_list = [s_max - (1 if with_new else 0) - 16 * i - i for i in range(shape[0])]
    lens_list[-1] = s_max // 3
    check_uneven_grid(shape[:4], True, 1, with_new, s_max, lens_list)
    if torch.cuda.get_device_capability()[0] < 9:
        return
    assert len(splits) == 1 and splits[0][1]["PAGED"]
    kw = splits[0][1]
    assert (kw["SORT_PAGES"] > 0, kw["FIRST_IN_ORDER"]) == (sorts, first_in_order), (kw["SORT_PAGES"],
                                                                                     kw["FIRST_IN_ORDER"])


def check_uneven_grid(shape, paged, s_q, with_new=True, s_max=2048, lens_list=None):
    """Decode against the reference with uneven lengths (full, empty, mid-block; or ``lens_list``),
    this step's tokens appended (``with_new``), NaN in every slot no sequence holds."""
    b, hq, hkv, d = shape
    dt = torch.bfloat16 if s_q > 1 else torch.float16
    g = torch.Generator().manual_seed(b + d + s_q)
    if lens_list is None:
        lens_list = torch.randint(1, s_max - s_q, (b,), generator=g).tolist()
        lens_list[:3] = [s_max - s_q, 0, 1000]
        if not with_new:
            # every query sees a key; one sequence full, one a block and one key long
            lens_list[:3] = [s_max, 65, 1001]
            lens_list = [max(n, s_q) for n in lens_list]
    k_cache = randn((b, hkv, s_max, d), dt, generator=g)
    v_cache = randn((b, hkv, s_max, d), dt, generator=g)
    table = None
    if paged:
        k_cache, v_cache, table = build_paged(k_cache, v_cache, lens_list, s_q, 16, g, extra_pages=3,
                                              with_new=with_new, garbage="nan")
        table = table.to(DEVICE)
    else:
        for i, n in enumerate(lens_list):
            k_cache[i, :, n:] = float("nan")
            v_cache[i, :, n:] = float("nan")
    k_cache, v_cache = k_cache.to(DEVICE), v_cache.to(DEVICE)
    q = randn((b, hq, s_q, d), dt, DEVICE, generator=g)
    k = randn((b, hkv, s_q, d), dt, DEVICE, generator=g) if with_new else None
    v = randn((b, hkv, s_q, d), dt, DEVICE, generator=g) if with_new else None
    lens = torch.tensor(lens_list, dtype=torch.int32, device=DEVICE)
    want, want_k, want_v = kv_cache_ref(q, k_cache, v_cache, lens, k, v, block_table=table)
    out = fkv.attention_with_kv_cache(q, k_cache, v_cache, lens, k, v, block_table=table)
    assert bit_equal(k_cache, want_k) and bit_equal(v_cache, want_v)
    total = [n + (s_q if with_new else 0) for n in lens_list]
    assert_close_to_ref(out, want, lowp_kv_ref(q, want_k, want_v, total, True, table),
                        what=f"{shape} paged={paged} lens {lens_list[:6]}")
