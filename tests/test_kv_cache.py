"""``flashkv_ops.attention_with_kv_cache`` (contiguous caches): outputs against the float64
reference, in-place append semantics, prefill + decode, and the split-KV decode path (S_q small)
around its split boundaries.
"""

import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import flashkv_ops as fkv
from reference import (assert_close_to_ref, attention_ref, bit_equal, kv_cache_ref, linearize,
                       lowp_attention_torch, max_err, randn, record_launches)

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
GQA_RATIOS = [1, 2, 4, 7, 8]
PROPERTY = settings(deadline=None, max_examples=25, print_blob=True,
                    suppress_health_check=[HealthCheck.too_slow])


def run_and_check(q, k_cache, v_cache, cache_seqlens, k=None, v=None, *, causal=True,
                  scale=None, what=""):
    """Run the op on the given caches and check output, cache contents and lengths.

    Checks: output within the accuracy criterion of the fp64 reference; the caches afterwards
    are bit-identical to "old caches with exactly the new slots overwritten"; cache_seqlens
    untouched; q/k/v untouched. Returns the output.
    """
    want_out, want_k, want_v = kv_cache_ref(q, k_cache, v_cache, cache_seqlens, k, v,
                                            causal=causal, scale=scale)
    lens0 = cache_seqlens.clone()
    q0 = q.clone()
    out = fkv.attention_with_kv_cache(q, k_cache, v_cache, cache_seqlens, k, v,
                                      causal=causal, scale=scale)
    assert out.shape == q.shape and out.dtype == q.dtype, what
    assert torch.equal(cache_seqlens, lens0), f"{what}: cache_seqlens was modified"
    assert cache_seqlens.dtype == torch.int32
    assert torch.equal(q, q0), f"{what}: q was modified"
    assert bit_equal(k_cache, want_k), f"{what}: k_cache slots differ from expected append"
    assert bit_equal(v_cache, want_v), f"{what}: v_cache slots differ from expected append"
    lowp = None
    if q.dtype != torch.float32:
        total = [int(n) + (q.shape[2] if k is not None else 0) for n in lens0]
        k_lin, v_lin = linearize(want_k, want_v, total)
        lowp = lowp_attention_torch(q, k_lin, v_lin, causal=causal, scale=scale,
                                    key_start=[0] * q.shape[0], key_end=total)
    assert_close_to_ref(out, want_out, lowp, what=what)
    return out


def make_cache(batch, num_kv_heads, s_max, head_dim, dtype, generator, *, poison="randn"):
    """Caches ``[B, H_kv, S_max, D]`` filled entirely with garbage: random values (so any stray
    write or read of an invisible slot shows up), or NaN."""
    if poison == "nan":
        k_cache = torch.full((batch, num_kv_heads, s_max, head_dim), float("nan"), dtype=dtype)
        return k_cache, k_cache.clone()
    k_cache = randn((batch, num_kv_heads, s_max, head_dim), dtype, generator=generator)
    v_cache = randn((batch, num_kv_heads, s_max, head_dim), dtype, generator=generator)
    return k_cache, v_cache


# -- property test -------------------------------------------------------------------------------

@st.composite
def cache_cases(draw):
    head_dim = draw(st.sampled_from([8, 16, 40, 64] * 3 + [80, 96, 128, 256]))
    big = head_dim > 64
    ratio = draw(st.sampled_from(GQA_RATIOS))
    batch = draw(st.integers(1, 2 if big else 3))
    s_q = draw(st.integers(1, 16 if big else 40))
    max_len = 16 if big else 64
    lens = [draw(st.integers(0, max_len)) for _ in range(batch)]
    with_new = draw(st.sampled_from([True, True, True, False]))
    slack = draw(st.integers(0, 8))
    s_max = max(lens) + (s_q if with_new else 0) + slack
    s_max = max(s_max, 1)
    return dict(
        batch=batch, num_kv_heads=draw(st.integers(1, 1 if big or ratio >= 7 else 4)),
        ratio=ratio, head_dim=head_dim, s_q=s_q, lens=lens, s_max=s_max, with_new=with_new,
        causal=draw(st.booleans()), dtype=draw(st.sampled_from(DTYPES)),
        q_bshd=draw(st.booleans()), kv_bshd=draw(st.booleans()),
        custom_scale=draw(st.booleans()), seed=draw(st.integers(0, 2**31 - 1)),
    )


@PROPERTY
@given(case=cache_cases())
def test_kv_cache_matches_reference(case):
    g = torch.Generator().manual_seed(case["seed"])
    b, hkv, d, s_q, dtype = (case["batch"], case["num_kv_heads"], case["head_dim"], case["s_q"],
                             case["dtype"])
    hq = hkv * case["ratio"]
    k_cache, v_cache = make_cache(b, hkv, case["s_max"], d, dtype, g)
    q = randn((b, hq, s_q, d), dtype, generator=g, bshd=case["q_bshd"])
    k = v = None
    if case["with_new"]:
        k = randn((b, hkv, s_q, d), dtype, generator=g, bshd=case["kv_bshd"])
        v = randn((b, hkv, s_q, d), dtype, generator=g, bshd=case["kv_bshd"])
    lens = torch.tensor(case["lens"], dtype=torch.int32)
    run_and_check(q, k_cache, v_cache, lens, k, v, causal=case["causal"],
                  scale=0.2 if case["custom_scale"] else None, what=str(case))


# -- split-KV decode (few query tokens) ----------------------------------------------------------

# Split sizes are an implementation detail, so lengths sit at every power-of-two boundary +-1.
BOUNDARY_LENGTHS = [0, 1, 2, 15, 16, 17, 31, 32, 33, 63, 64, 65, 127, 128, 129, 255, 256, 257,
                    511, 512, 513, 767, 1000, 1019]


@st.composite
def decode_cases(draw):
    s_q = draw(st.integers(1, 4))
    batch = draw(st.integers(1, 3))
    s_max = draw(st.sampled_from([260, 520, 1024, 1040]))
    fits = [n for n in BOUNDARY_LENGTHS if n + s_q <= s_max]
    lens = [draw(st.sampled_from(fits)) for _ in range(batch)]
    return dict(
        batch=batch, s_q=s_q, s_max=s_max, lens=lens,
        num_kv_heads=draw(st.integers(1, 2)), ratio=draw(st.sampled_from(GQA_RATIOS)),
        causal=draw(st.booleans()), dtype=draw(st.sampled_from(DTYPES)),
        with_new=draw(st.sampled_from([True, True, False])),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


@settings(deadline=None, max_examples=15, print_blob=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(case=decode_cases())
def test_split_kv_decode_boundaries(case):
    g = torch.Generator().manual_seed(case["seed"])
    b, hkv, s_q, dtype, d = case["batch"], case["num_kv_heads"], case["s_q"], case["dtype"], 16
    hq = hkv * case["ratio"]
    k_cache, v_cache = make_cache(b, hkv, case["s_max"], d, dtype, g)
    q = randn((b, hq, s_q, d), dtype, generator=g)
    k = v = None
    if case["with_new"]:
        k = randn((b, hkv, s_q, d), dtype, generator=g)
        v = randn((b, hkv, s_q, d), dtype, generator=g)
    lens = torch.tensor(case["lens"], dtype=torch.int32)
    run_and_check(q, k_cache, v_cache, lens, k, v, causal=case["causal"], what=str(case))


@pytest.mark.parametrize("lens", [[0, 1, 64, 1019], [129, 0, 1000, 2], [1022, 1022, 1022, 1022]])
@pytest.mark.parametrize("s_q", [1, 2])
def test_split_kv_decode_uneven_batch(lens, s_q):
    # Very different per-sequence lengths in one launch (the grid is fixed by S_max=1024, so
    # most splits of the short sequences are empty and must contribute nothing).
    g = torch.Generator().manual_seed(sum(lens) + s_q)
    d, hkv, hq = 16, 2, 8
    k_cache, v_cache = make_cache(len(lens), hkv, 1024, d, torch.float32, g)
    q = randn((len(lens), hq, s_q, d), torch.float32, generator=g)
    k = randn((len(lens), hkv, s_q, d), torch.float32, generator=g)
    v = randn((len(lens), hkv, s_q, d), torch.float32, generator=g)
    run_and_check(q, k_cache, v_cache, torch.tensor(lens, dtype=torch.int32), k, v,
                  what=f"lens={lens}")


def test_decode_empty_cache_without_new_tokens_gives_zeros():
    # length 0 and no k/v: nothing to attend -> exact zeros, not NaN.
    g = torch.Generator().manual_seed(11)
    k_cache, v_cache = make_cache(2, 1, 64, 16, torch.float16, g)
    q = randn((2, 4, 1, 16), torch.float16, generator=g)
    lens = torch.tensor([0, 5], dtype=torch.int32)
    out = run_and_check(q, k_cache, v_cache, lens, causal=True, what="empty")
    assert torch.equal(out[0], torch.zeros_like(out[0]))


@pytest.mark.parametrize("num_splits", [1, 3])
@pytest.mark.parametrize("s_q,with_new", [(1, False), (1, True), (2, True), (16, True)])
def test_decode_with_the_split_counts_gpus_pick(monkeypatch, num_splits, s_q, with_new):
    # On a GPU the split count follows the SM count: one split (stage 1 writes the output, no
    # merge) when the batch fills the GPU, else a few; force both here, with uneven lengths.
    from flashkv_ops.kernels import decode

    real = decode._config

    def config(*args):
        return dict(real(*args), NUM_SPLITS=num_splits)

    monkeypatch.setattr(decode, "_config", config)
    run_and_check(*uneven_decode_case(s_q, with_new, torch.float32, num_splits * 10 + s_q),
                  what=f"splits={num_splits} s_q={s_q}")


def uneven_decode_case(s_q, with_new, dtype, seed, nan_past_lengths=False):
    """(q, k_cache, v_cache, cache_seqlens, k, v) of four sequences (empty, one token, mid-block,
    nearly full) of 8 query and 2 KV heads of 16, capacity 1024; k, v None unless ``with_new``;
    ``nan_past_lengths``: NaN in every slot no sequence holds."""
    lens = [0, 1, 129, 1019 - s_q]
    g = torch.Generator().manual_seed(seed)
    d, hkv, hq = 16, 2, 8
    k_cache, v_cache = make_cache(len(lens), hkv, 1024, d, dtype, g)
    if nan_past_lengths:
        for b, n in enumerate(lens):
            k_cache[b, :, n:] = v_cache[b, :, n:] = float("nan")
    q = randn((len(lens), hq, s_q, d), dtype, generator=g)
    k = v = None
    if with_new:
        k = randn((len(lens), hkv, s_q, d), dtype, generator=g)
        v = randn((len(lens), hkv, s_q, d), dtype, generator=g)
    return q, k_cache, v_cache, torch.tensor(lens, dtype=torch.int32), k, v


def force_key_balanced(monkeypatch, programs):
    """Make every decode configuration ask for the key-balanced kernel over ``programs`` programs;
    returns that kernel's launches (`record_launches`), filled as the test runs."""
    from flashkv_ops.kernels import decode

    real = decode._config
    monkeypatch.setattr(decode, "_config", lambda *args: dict(real(*args), BALANCED=programs))
    return record_launches(monkeypatch, decode, "_decode_balanced_kernel")


@pytest.mark.parametrize("programs", [3, 8, 13])
@pytest.mark.parametrize("s_q,with_new", [(1, False), (1, True), (4, True)])
def test_decode_with_key_blocks_shared_out_evenly(monkeypatch, programs, s_q, with_new):
    # Contiguous caches just past one wave of (sequence, KV head) groups: stage 1 shares every
    # group's key blocks out over a fixed number of programs, whose shares cross group boundaries
    # (3 programs for 8 groups: up to four groups each) or cut a group in pieces (13), and the
    # merge finds each group's pieces. Forced here, with empty, one-token and uneven lengths.
    launches = force_key_balanced(monkeypatch, programs)
    # NaN in every slot no sequence holds, which no share may read
    run_and_check(*uneven_decode_case(s_q, with_new, torch.float16, programs * 10 + s_q, nan_past_lengths=True),
                  what=f"programs={programs} s_q={s_q}")
    if os.environ.get("TRITON_INTERPRET") == "1":  # the kernels ran (else the PyTorch fallback did)
        assert [grid for grid, _ in launches] == [(programs,)]


def test_key_ranges_keep_the_split_kernel_where_keys_would_be_shared_out(monkeypatch):
    # Shares start at key 0: a few-token call with key ranges (left-padded batches) runs the
    # split kernel even where the configuration asks for the key-balanced one.
    balanced = force_key_balanced(monkeypatch, 3)
    g = torch.Generator().manual_seed(5)
    q = randn((3, 8, 2, 16), torch.float16, generator=g)
    k = randn((3, 2, 96, 16), torch.float16, generator=g)
    v = randn((3, 2, 96, 16), torch.float16, generator=g)
    key_start = torch.tensor([0, 7, 40], dtype=torch.int32)
    key_end = torch.tensor([96, 50, 41], dtype=torch.int32)
    out = fkv.attention_with_key_ranges(q, k, v, key_start, key_end)
    ranges = dict(causal=True, key_start=key_start.tolist(), key_end=key_end.tolist())
    assert_close_to_ref(out, attention_ref(q, k, v, **ranges), lowp_attention_torch(q, k, v, **ranges),
                        what="key ranges")
    assert balanced == []


def test_key_balanced_decode_where_splits_cannot_spread_the_groups():
    from flashkv_ops.kernels.decode import _config, _key_balanced

    smem = 228 * 1024

    def config(batch, head_dim=64, paged=False, dtype=torch.float16, early=True, kv_heads=8):
        return _config(batch, kv_heads, 4, 2048, head_dim, dtype, paged, 132, False, early, smem)

    # groups on 132 SMs (at D=128): one split leaving over 10% of the SMs idle (96, 112), split
    # grids of 1.6-1.9 waves (28-80), just past one wave (136-192); not one wave of several splits
    # (24, 40, 56), two whole waves (88), one split filling >= 90% of the SMs (120, 128, 132)
    balanced = {g for g in range(1, 260) if _key_balanced(g, 132, 128)}
    assert {28, 36, 46, 48, 72, 80, 96, 112, 136, 160, 192} <= balanced
    assert not balanced & {8, 16, 24, 32, 40, 56, 64, 88, 120, 128, 132, 200}
    assert {g for g in range(133, 260) if _key_balanced(g, 132, 64)} == set(range(133, 154))
    # one program per SM, blocks that fill an SM's shared memory
    for batch, head_dim, block_n in ((17, 64, 256), (19, 64, 256), (12, 64, 256), (17, 128, 128), (24, 128, 128)):
        cfg = config(batch, head_dim)
        assert (cfg["BALANCED"], cfg["BLOCK_N"], cfg["num_stages"]) == (132, block_n, 3), (batch, head_dim)
    # paged pools, float32, pointer loads (D=96), no early launch: the split kernel
    for cfg in (config(16), config(20), config(25, 128), config(17, paged=True), config(17, dtype=torch.float32),
                config(17, head_dim=96), config(17, early=False), config(4, kv_heads=32)):
        assert "BALANCED" not in cfg, cfg


def test_tail_launch_rule_from_static_shapes():
    # the groups past one wave of 132 SMs that a second launch takes (`_tail_groups`), and its
    # slices (`_tail_config`): up to 1.22 waves at D <= 64; at D=128 1.5 on pools, 1.1 contiguous;
    # 16-bit, launched early, no key start; eight slices a group where eight times the tail's
    # groups fit beside the wave (two programs an SM at D <= 64, one at D=128), else four
    from flashkv_ops.kernels.decode import _config, _tail_config, _tail_groups

    smem = 228 * 1024

    def tail(groups, head_dim=64, paged=True, dtype=torch.float16, early=True, key_start=False):
        cfg = _config(groups, 1, 4, 2048, head_dim, dtype, paged, 132, False, early, smem)
        return _tail_groups(groups, 132, cfg, paged, dtype.itemsize, early, not key_start)

    assert {g for g in range(1, 400) if tail(g)} == set(range(133, 162))
    assert {g for g in range(1, 400) if tail(g, paged=False)} == set(range(133, 162))
    assert {g for g in range(1, 400) if tail(g, 128)} == set(range(133, 199))
    assert {g for g in range(1, 400) if tail(g, 128, paged=False)} == set(range(133, 146))
    assert tail(136, 96) == 4 and tail(136, 80, paged=False) == 4
    for kwargs in (dict(dtype=torch.float32), dict(dtype=torch.float32, paged=False), dict(early=False),
                   dict(key_start=True), dict(head_dim=256)):
        assert tail(136, **kwargs) == 0, kwargs
    for head_dim, groups, block_n, pieces in ((64, 136, 64, 8), (64, 160, 64, 8), (128, 136, 32, 8),
                                              (128, 148, 32, 8), (128, 152, 32, 4), (128, 192, 32, 4)):
        cfg = _tail_config(_config(groups, 1, 4, 2048, head_dim, torch.float16, True, 132, False, True, smem),
                           2048, 132, groups - 132)
        assert (cfg["BLOCK_N"], cfg["NUM_SPLITS"], cfg["num_stages"]) == (block_n, pieces, 3), (head_dim, groups)
    # slices of two blocks at least
    cfg = _config(136, 1, 4, 200, 64, torch.float16, True, 132, False, True, smem)
    assert _tail_config(cfg, 200, 132, 4)["NUM_SPLITS"] == 2


def test_split_count_fills_the_sms_about_once():
    from flashkv_ops.kernels.decode import _split_count

    # the H100's 132 SMs, 8 KV heads: batch 1, 2, 3, 4, 5, 8, 12, 16, 32
    programs = (8, 16, 24, 32, 40, 64, 96, 128, 256)
    assert [_split_count(p, 132) for p in programs] == [16, 8, 5, 4, 3, 2, 1, 1, 1]
    for programs in range(1, 300):
        splits = _split_count(programs, 132)
        if programs >= 132:
            assert splits == 1
        else:
            # every SM that can get a whole program gets one; never much past two per SM
            assert 132 // programs <= splits and programs * splits <= 2 * 132 + programs, programs


def test_split_count_evens_out_grids_past_one_wave():
    from flashkv_ops.kernels.decode import _split_count

    def use(programs, splits):  # share of whole waves of 132 programs the grid fills
        total = programs * splits
        return total / (132 * -(-total // 132))

    # 8 KV heads, batch 17, 20, 24, 25, 28, 32, 36, 40, 44, 64: grids that leave many SMs a program
    # short get 2-3 splits; those that fill >= 88% of their last wave keep one
    programs = (136, 160, 192, 200, 224, 256, 288, 320, 352, 512)
    assert [_split_count(p, 132, True) for p in programs] == [3, 3, 2, 3, 1, 1, 3, 2, 1, 1]
    for programs in range(132, 1200):
        splits = _split_count(programs, 132, True)
        assert 1 <= splits <= 3
        if use(programs, 1) >= 0.88:
            assert splits == 1, programs
        else:  # the best-filled of 1-3 splits, the fewest on a tie
            best = max(use(programs, s) for s in (1, 2, 3))
            assert use(programs, splits) == best and all(use(programs, s) < best for s in range(1, splits))
    # below one wave the rule is the same either way
    assert all(_split_count(p, 132, True) == _split_count(p, 132) for p in range(1, 132))


def test_decode_tile_choices_from_static_shapes():
    import torch as _torch

    from flashkv_ops.kernels.decode import _config, _prefetch_lines

    # the L2 prefetch touches whole 128-byte lines inside each row, never past it
    assert _prefetch_lines(64, 2) == dict(PREFETCH_LINES=1, PREFETCH_LINE_ELEMS=64)
    assert _prefetch_lines(128, 2) == dict(PREFETCH_LINES=2, PREFETCH_LINE_ELEMS=64)
    assert _prefetch_lines(96, 2) == dict(PREFETCH_LINES=1, PREFETCH_LINE_ELEMS=64)
    assert _prefetch_lines(192, 2) == dict(PREFETCH_LINES=2, PREFETCH_LINE_ELEMS=64)
    assert _prefetch_lines(32, 2) == dict(PREFETCH_LINES=1, PREFETCH_LINE_ELEMS=64)
    assert _prefetch_lines(128, 4) == dict(PREFETCH_LINES=4, PREFETCH_LINE_ELEMS=32)
    for d in range(8, 260, 8):
        for size in (2, 4):
            lines = _prefetch_lines(d, size)
            assert lines["PREFETCH_LINES"] * lines["PREFETCH_LINE_ELEMS"] <= max(d, lines["PREFETCH_LINE_ELEMS"])

    # H100 (132 SMs), 16-bit paged pools: the table read a block ahead, about one program per SM
    # like contiguous caches, 128-key blocks up to D=128, three stages
    args = (1, 8, 4, 32768, 128, _torch.float16)
    assert _config(*args, True, 132, False) == dict(BLOCK_M=16, BLOCK_N=128, BLOCK_D=128, NUM_SPLITS=16,
                                                    TABLE_AHEAD=True, num_warps=4, num_stages=3)
    assert _config(*args, False, 132, False) == dict(BLOCK_M=16, BLOCK_N=64, BLOCK_D=128, NUM_SPLITS=16,
                                                     TABLE_AHEAD=False, num_warps=4, num_stages=3)
    assert _config(16, 8, 1, 2048, 64, _torch.float16, True, 132, False)["NUM_SPLITS"] == 1
    assert _config(8, 4, 8, 8192, 64, _torch.bfloat16, True, 132, False)["NUM_SPLITS"] == 4
    assert _config(4, 1, 8, 4096, 256, _torch.float16, True, 132, False)["BLOCK_N"] == 32
    # float32 pools keep synchronous gathers, ~3 programs per SM, two stages
    fp32 = _config(1, 8, 4, 32768, 128, _torch.float32, True, 132, False)
    assert (fp32["TABLE_AHEAD"], fp32["BLOCK_N"], fp32["NUM_SPLITS"], fp32["num_stages"]) == (False, 32, 50, 2)
    # one wave of programs launched early (programmatic dependent launch, 228 KB of shared memory
    # per SM): blocks that make each program take a whole SM (it then asks the L2 for its first
    # block before the wait), where slices keep two of them; more programs than SMs, float32 and
    # D=256 keep theirs
    early = (True, 228 * 1024)
    assert _config(8, 4, 8, 8192, 64, _torch.float16, True, 132, False, *early)["BLOCK_N"] == 256
    assert _config(16, 8, 1, 2048, 64, _torch.bfloat16, False, 132, False, *early)["BLOCK_N"] == 256
    assert _config(*args, False, 132, False, *early) == dict(BLOCK_M=16, BLOCK_N=128, BLOCK_D=128, NUM_SPLITS=16,
                                                              TABLE_AHEAD=False, num_warps=4, num_stages=3)
    assert _config(32, 8, 4, 4096, 128, _torch.float16, False, 132, False, *early)["BLOCK_N"] == 64
    assert _config(1, 8, 4, 384, 128, _torch.float16, False, 132, False, *early)["BLOCK_N"] == 64
    assert _config(4, 1, 8, 4096, 256, _torch.float16, True, 132, False, *early)["BLOCK_N"] == 32
    assert _config(1, 8, 4, 32768, 128, _torch.float32, True, 132, False, *early) == fp32
    # past one wave of programs (H100, 132 SMs): split counts that even the grid out (17 x 8 KV
    # heads = 136 programs: three splits), except for D <= 64 pools read a block ahead up to two
    # waves, which keep one split, and past 1.5 waves take 64-key blocks and four stages; caches
    # read by pointer loads at a head_dim that is not a power of two keep one split
    assert _config(17, 8, 4, 2048, 128, _torch.float16, False, 132, False)["NUM_SPLITS"] == 3
    assert _config(17, 8, 4, 2048, 128, _torch.float16, True, 132, False)["NUM_SPLITS"] == 3
    assert _config(17, 8, 4, 2048, 128, _torch.float16, True, 132, False, balance_waves=False)["NUM_SPLITS"] == 1
    assert _config(36, 8, 4, 2048, 64, _torch.float16, False, 132, False, wave_tiles=False)["NUM_SPLITS"] == 3
    narrow = _config(17, 8, 4, 2048, 64, _torch.float16, True, 132, False)
    assert (narrow["NUM_SPLITS"], narrow["BLOCK_N"], narrow["num_stages"]) == (1, 128, 3)
    narrow = _config(32, 8, 4, 2048, 64, _torch.bfloat16, True, 132, False)
    assert (narrow["NUM_SPLITS"], narrow["BLOCK_N"], narrow["num_stages"]) == (1, 64, 4)
    # D <= 64 from two to 2.5 waves on pools (288 programs), from 1.15 to 2.5 on contiguous caches
    # (160: four stages, from 1.4 three; 352 programs and 17 x 8 keep the split counts)
    narrow = _config(36, 8, 4, 2048, 64, _torch.float16, True, 132, False)
    assert (narrow["NUM_SPLITS"], narrow["BLOCK_N"], narrow["num_stages"]) == (1, 64, 3)
    narrow = _config(36, 8, 4, 2048, 64, _torch.float16, True, 132, False, wave_tiles=False)
    assert (narrow["NUM_SPLITS"], narrow["BLOCK_N"], narrow["num_stages"]) == (3, 128, 3)
    wave_tiles = {20: (1, 64, 4), 28: (1, 64, 3), 36: (1, 64, 3), 40: (1, 64, 3), 44: (1, 128, 3), 17: (3, 128, 3)}
    for batch, tile in wave_tiles.items():
        narrow = _config(batch, 8, 4, 2048, 64, _torch.bfloat16, False, 132, False)
        assert (narrow["NUM_SPLITS"], narrow["BLOCK_N"], narrow["num_stages"]) == tile, batch
    assert _config(5, 32, 1, 4096, 96, _torch.float16, False, 132, False)["NUM_SPLITS"] == 1
    # and past one wave (8 x 32 KV heads) read 128-key blocks, 64 below it
    assert _config(8, 32, 1, 4096, 96, _torch.float16, False, 132, False)["BLOCK_N"] == 128
    assert _config(8, 32, 1, 4096, 96, _torch.float16, False, 132, False, wave_tiles=False)["BLOCK_N"] == 64
    assert _config(4, 32, 1, 4096, 80, _torch.float16, False, 132, False)["BLOCK_N"] == 64
    assert _config(5, 32, 1, 4096, 96, _torch.float16, True, 132, False)["NUM_SPLITS"] == 3
    assert _config(17, 8, 4, 2048, 128, _torch.float32, False, 132, False)["NUM_SPLITS"] == 1
    # the interpreter takes the same path choice
    assert _config(2, 2, 1, 64, 16, _torch.float16, True, 1, True)["TABLE_AHEAD"]
    assert not _config(2, 2, 1, 64, 16, _torch.float32, True, 1, True)["TABLE_AHEAD"]


def test_block_table_prefetch_covers_each_slice():
    from flashkv_ops.kernels.decode import _table_lines

    # lines of 32 entries from the slice's first entry: enough for every page the slice touches
    # (one more when it starts mid-line), a power of two, never more than 64
    def ceil_div(a, b):
        return -(-a // b)

    for capacity, splits, block_n, page_size in [(2048, 1, 128, 16), (8192, 4, 128, 16), (32768, 16, 128, 16),
                                                  (4096, 1, 128, 1), (100, 3, 32, 7), (16, 1, 128, 16)]:
        lines = _table_lines(capacity, splits, block_n, page_size)
        slice_keys = ceil_div(ceil_div(capacity, splits), block_n) * block_n
        pages = ceil_div(slice_keys, page_size)
        assert lines & (lines - 1) == 0 and 1 <= lines <= 64
        assert lines * 32 >= min(pages + 31, 64 * 32)
    assert _table_lines(2048, 1, 128, 16) == 8  # 128 entries: 4 lines + 1 for the offset, rounded up
    assert _table_lines(4096, 1, 128, 1) == 64  # capped


# -- in-place append semantics -----------------------------------------------------------------

@pytest.mark.parametrize("s_q", [1, 3, 24])
def test_nan_garbage_beyond_lengths_does_not_leak(s_q):
    # Uninitialised cache memory can hold NaN; slots beyond each length must be neither read
    # into the result (0 * NaN = NaN) nor written, and exactly the new slots must change.
    g = torch.Generator().manual_seed(12 + s_q)
    d, hkv, hq = 16, 2, 4
    lens = torch.tensor([0, 7, 33], dtype=torch.int32)
    k_cache, v_cache = make_cache(3, hkv, 33 + s_q + 5, d, torch.float16, g, poison="nan")
    # valid prefix: finite values
    for b, n in enumerate(lens.tolist()):
        k_cache[b, :, :n] = randn((hkv, n, d), torch.float16, generator=g) if n else 0
        v_cache[b, :, :n] = randn((hkv, n, d), torch.float16, generator=g) if n else 0
    q = randn((3, hq, s_q, d), torch.float16, generator=g)
    k = randn((3, hkv, s_q, d), torch.float16, generator=g)
    v = randn((3, hkv, s_q, d), torch.float16, generator=g)
    out = run_and_check(q, k_cache, v_cache, lens, k, v, causal=True, what=f"nan s_q={s_q}")
    assert not torch.isnan(out).any()
    # the untouched tail is still NaN (bit_equal inside run_and_check already checked this)
    assert torch.isnan(k_cache[0, :, s_q:]).all()


def test_cache_in_bshd_layout_view():
    # A cache stored [B, S_max, H, D] and passed as a transposed view: strides are arbitrary
    # with a contiguous last dim, and the append must go through those strides.
    g = torch.Generator().manual_seed(13)
    b, hkv, hq, s_max, d, s_q = 2, 2, 4, 20, 16, 3
    k_cache = randn((b, hkv, s_max, d), torch.float32, generator=g, bshd=True)
    v_cache = randn((b, hkv, s_max, d), torch.float32, generator=g, bshd=True)
    q = randn((b, hq, s_q, d), torch.float32, generator=g)
    k = randn((b, hkv, s_q, d), torch.float32, generator=g)
    v = randn((b, hkv, s_q, d), torch.float32, generator=g)
    run_and_check(q, k_cache, v_cache, torch.tensor([4, 17], dtype=torch.int32), k, v,
                  what="bshd cache")


def test_append_fills_cache_to_exact_capacity():
    g = torch.Generator().manual_seed(14)
    k_cache, v_cache = make_cache(2, 1, 10, 8, torch.float32, g)
    q = randn((2, 2, 4, 8), torch.float32, generator=g)
    k = randn((2, 1, 4, 8), torch.float32, generator=g)
    v = randn((2, 1, 4, 8), torch.float32, generator=g)
    run_and_check(q, k_cache, v_cache, torch.tensor([6, 0], dtype=torch.int32), k, v,
                  what="to capacity")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prefill_then_decode_equals_full_causal_attention(dtype):
    g = torch.Generator().manual_seed(15)
    b, hkv, hq, d, prompt, steps = 2, 2, 8, 32, 11, 6
    total = prompt + steps
    q = randn((b, hq, total, d), dtype, generator=g)
    k = randn((b, hkv, total, d), dtype, generator=g)
    v = randn((b, hkv, total, d), dtype, generator=g)
    k_cache = torch.zeros(b, hkv, total + 3, d, dtype=dtype)
    v_cache = torch.zeros_like(k_cache)
    lens = torch.zeros(b, dtype=torch.int32)
    outs = [fkv.attention_with_kv_cache(q[:, :, :prompt], k_cache, v_cache, lens,
                                        k[:, :, :prompt], v[:, :, :prompt])]
    for t in range(prompt, total):
        lens.fill_(t)
        outs.append(fkv.attention_with_kv_cache(q[:, :, t:t + 1], k_cache, v_cache, lens,
                                                k[:, :, t:t + 1], v[:, :, t:t + 1]))
    got = torch.cat(outs, dim=2)
    assert torch.equal(k_cache[:, :, :total], k) and torch.equal(v_cache[:, :, :total], v)
    ref = attention_ref(q, k, v, causal=True)
    lowp = None if dtype == torch.float32 else lowp_attention_torch(q, k, v, causal=True)
    assert_close_to_ref(got, ref, lowp, what="prefill+decode")
    # and the same as the library's own full causal attention
    full = fkv.attention(q, k, v, causal=True)
    assert max_err(got, full) <= (1e-5 if dtype == torch.float32 else 2e-2)


def test_gqa_32_to_8_cache_holds_kv_heads_only():
    # The cache keeps H_kv=8 heads for 32 query heads: 4x less memory than repeated K/V, and
    # the results equal attention over the repeated heads.
    g = torch.Generator().manual_seed(16)
    b, hq, hkv, d, s_max = 1, 32, 8, 16, 24
    k_cache, v_cache = make_cache(b, hkv, s_max, d, torch.float16, g)
    repeated_bytes = b * hq * s_max * d * k_cache.element_size()
    assert k_cache.numel() * k_cache.element_size() * 4 == repeated_bytes
    q = randn((b, hq, 2, d), torch.float16, generator=g)
    k = randn((b, hkv, 2, d), torch.float16, generator=g)
    v = randn((b, hkv, 2, d), torch.float16, generator=g)
    lens = torch.tensor([9], dtype=torch.int32)
    out = run_and_check(q, k_cache, v_cache, lens, k, v, what="32:8")
    kr = k_cache[:, :, :11].float().repeat_interleave(4, dim=1)
    vr = v_cache[:, :, :11].float().repeat_interleave(4, dim=1)
    want = attention_ref(q.float(), kr, vr, causal=True)
    assert max_err(out, want) < 2e-3


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_kv_cache_huge_scores_stay_finite(dtype):
    g = torch.Generator().manual_seed(17)
    k_cache, v_cache = make_cache(1, 1, 40, 16, dtype, g)
    k_cache.mul_(100)
    q = randn((1, 4, 1, 16), dtype, generator=g, scale=100.0)
    k = randn((1, 1, 1, 16), dtype, generator=g, scale=100.0)
    v = randn((1, 1, 1, 16), dtype, generator=g)
    lens = torch.tensor([30], dtype=torch.int32)
    want, _, _ = kv_cache_ref(q, k_cache, v_cache, lens, k, v)
    out = fkv.attention_with_kv_cache(q, k_cache, v_cache, lens, k, v)
    assert torch.isfinite(out).all()
    assert max_err(out, want) < (1e-3 if dtype == torch.float32 else 2e-2)


# -- the unchecked path (torch.compile / CUDA graphs skip value checks): stores stay in bounds --


@pytest.mark.parametrize("s_q", [3, 20])  # split-KV decode with its fused append; forward kernel
def test_op_without_checks_writes_only_slots_inside_the_cache(s_q):
    torch.manual_seed(0)
    batch, heads, s_max, dim = 3, 2, 24, 16
    k_cache = torch.randn(batch, heads, s_max, dim)
    v_cache = torch.randn_like(k_cache)
    before_k, before_v = k_cache.clone(), v_cache.clone()
    q = torch.randn(batch, 4, s_q, dim)
    k, v = torch.randn(batch, heads, s_q, dim), torch.randn(batch, heads, s_q, dim)
    # overflowing, negative and in-range lengths: the public function would refuse the first two
    seqlens = torch.tensor([s_max - 1, -2, 1], dtype=torch.int32)
    out = torch.ops.flashkv.attention_with_kv_cache(q, k_cache, v_cache, seqlens, k, v)
    assert torch.isfinite(out[2]).all()
    expected_k, expected_v = before_k.clone(), before_v.clone()
    for b, start in enumerate(seqlens.tolist()):
        for t in range(s_q):
            if 0 <= start + t < s_max:
                expected_k[b, :, start + t] = k[b, :, t]
                expected_v[b, :, start + t] = v[b, :, t]
    assert torch.equal(k_cache, expected_k) and torch.equal(v_cache, expected_v)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])  # decode: synchronous gathers / table ahead
@pytest.mark.parametrize("s_q", [1, 20])
def test_op_without_checks_never_writes_outside_the_page_pool(s_q, dtype):
    torch.manual_seed(1)
    num_pages, heads, page_size, dim = 6, 2, 4, 16
    pool = torch.randn(num_pages + 2, heads, page_size, dim).to(dtype)  # the last two pages lie outside
    k_pages, v_pages = pool[:num_pages], pool.clone()[:num_pages]
    before_pool, before_v = pool.clone(), v_pages.clone()
    # sequence 0 maps its pages outside the pool (past the end, negative); sequence 1 is valid
    table = torch.tensor([[num_pages, num_pages + 1, -1, 7, 9, 10], [0, 1, 2, 3, 4, 5]], dtype=torch.int32)
    q = torch.randn(2, 2, s_q, dim).to(dtype)
    k, v = torch.randn(2, heads, s_q, dim).to(dtype), torch.randn(2, heads, s_q, dim).to(dtype)
    seqlens = torch.tensor([2, 1], dtype=torch.int32)
    out = torch.ops.flashkv.attention_with_kv_cache(q, k_pages, v_pages, seqlens, k, v, block_table=table)
    assert torch.isfinite(out[1]).all()  # the valid sequence still gets a finite result
    # nothing of sequence 0 landed anywhere, in the pool or beyond it
    assert torch.equal(pool[num_pages:], before_pool[num_pages:])
    changed = (pool[:num_pages] != before_pool[:num_pages]).flatten(1).any(1).nonzero().flatten().tolist()
    touched = sorted({(1 + t) // page_size for t in range(s_q) if 1 + t < 6 * page_size})
    assert changed == touched
    assert (v_pages != before_v).flatten(1).any(1).nonzero().flatten().tolist() == touched
