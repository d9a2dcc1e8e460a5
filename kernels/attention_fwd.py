"""Prefill / multi-token attention: FlashAttention-2 forward with GQA, key ranges and paged K/V.

One program computes a [BLOCK_M, head_dim] tile of one query head. Key blocks are visited in
three phases so that only blocks touching a boundary (key_start, key_end, the causal diagonal)
pay for masking.
"""


import functools

import torch
import triton
import triton.language as tl

from .common import (
    device_capability,
    dot_precision,
    interpreting,
    kv_descriptors,
    kv_geometry,
    key_range,
    kv_head_base,
    next_power_of_2,
    online_softmax_blocks,
    paged_row_flags,
)

LOG2_E = 1.4426950408889634


@triton.jit
def _attention_fwd_kernel(
    # -- pointers
    Q,
    K,
    V,
    KDesc,  # TMA descriptors of K and V when TMA (else unused)
    VDesc,
    Out,
    KeyStart,
    KeyEnd,
    BlockTable,
    # -- sizes
    num_q_heads,
    group_size,
    seqlen_q,
    key_capacity,  # S_k (contiguous) or max_pages_per_seq * page_size (paged)
    key_end_offset,  # added to KeyEnd[b] (the new-token count when attending over a cache)
    qk_scale,
    page_size: tl.constexpr,  # 1 for contiguous caches
    num_pages,
    max_pages_per_seq,
    # -- strides
    stride_q_b, stride_q_h, stride_q_s,
    stride_k_b, stride_k_h, stride_k_s,
    stride_v_b, stride_v_h, stride_v_s,
    stride_o_b, stride_o_h, stride_o_s,
    stride_bt_b,
    # -- meta-parameters
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr,
    HAS_KEY_START: tl.constexpr,
    HAS_KEY_END: tl.constexpr,
    PAGED: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    TMA: tl.constexpr,
    SHARED_ROWS: tl.constexpr,
    WIDE_ROWS: tl.constexpr,
):
    tl.static_assert(BLOCK_D >= HEAD_DIM)
    # heavy (late) query blocks first so the causal tail does not straggle
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // num_q_heads
    h = pid_bh % num_q_heads
    kv_h = h // group_size

    key_start, key_end = key_range(KeyStart, KeyEnd, b, key_end_offset, key_capacity, HAS_KEY_START, HAS_KEY_END)
    diag = key_end - seqlen_q

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < seqlen_q
    d_ok = offs_d < HEAD_DIM
    q_ptrs = Q + b.to(tl.int64) * stride_q_b + h * stride_q_h + offs_m[:, None] * stride_q_s + offs_d[None, :]
    q = tl.load(q_ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)  # [BLOCK_M, BLOCK_D]

    bt_row = BlockTable + b.to(tl.int64) * stride_bt_b  # stride 0 when not PAGED
    k_base = kv_head_base(K, b, kv_h, stride_k_b, stride_k_h, PAGED)
    v_base = kv_head_base(V, b, kv_h, stride_v_b, stride_v_h, PAGED)

    # -- block ranges: [lo, hi) holds every key some row of this tile may see;
    # [full_lo, full_hi) the aligned blocks that every row sees entirely
    first_row = pid_m * BLOCK_M
    last_row = tl.minimum(first_row + BLOCK_M, seqlen_q) - 1
    hi = key_end
    full_hi = key_end
    if CAUSAL:
        hi = tl.minimum(hi, last_row + diag + 1)
        full_hi = tl.minimum(full_hi, first_row + diag + 1)
    hi = tl.maximum(hi, 0)
    full_hi = tl.maximum(full_hi, 0) // BLOCK_N * BLOCK_N
    lo = key_start // BLOCK_N * BLOCK_N
    full_lo = tl.cdiv(key_start, BLOCK_N) * BLOCK_N

    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    # phase 1: the block straddling key_start
    acc, l_i, m_i = online_softmax_blocks(
        acc, l_i, m_i, q, k_base, v_base, KDesc, VDesc, b, kv_h, bt_row, stride_k_b, stride_k_s, stride_v_b, stride_v_s,
        page_size, num_pages, max_pages_per_seq, offs_m, key_start, key_end, diag,
        lo, tl.minimum(full_lo, hi), qk_scale,
        HEAD_DIM, BLOCK_N, BLOCK_D, CAUSAL, True, PAGED, DOT_PRECISION, TMA, SHARED_ROWS, WIDE_ROWS)
    # phase 2: interior blocks, no masking
    acc, l_i, m_i = online_softmax_blocks(
        acc, l_i, m_i, q, k_base, v_base, KDesc, VDesc, b, kv_h, bt_row, stride_k_b, stride_k_s, stride_v_b, stride_v_s,
        page_size, num_pages, max_pages_per_seq, offs_m, key_start, key_end, diag,
        full_lo, full_hi, qk_scale,
        HEAD_DIM, BLOCK_N, BLOCK_D, CAUSAL, False, PAGED, DOT_PRECISION, TMA, SHARED_ROWS, WIDE_ROWS)
    # phase 3: the causal diagonal and the key_end tail
    acc, l_i, m_i = online_softmax_blocks(
        acc, l_i, m_i, q, k_base, v_base, KDesc, VDesc, b, kv_h, bt_row, stride_k_b, stride_k_s, stride_v_b, stride_v_s,
        page_size, num_pages, max_pages_per_seq, offs_m, key_start, key_end, diag,
        tl.maximum(full_hi, full_lo), hi, qk_scale,
        HEAD_DIM, BLOCK_N, BLOCK_D, CAUSAL, True, PAGED, DOT_PRECISION, TMA, SHARED_ROWS, WIDE_ROWS)

    # rows that saw no key: l = 0, acc = 0 -> output 0
    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    o_ptrs = Out + b.to(tl.int64) * stride_o_b + h * stride_o_h + offs_m[:, None] * stride_o_s + offs_d[None, :]
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])


@functools.lru_cache(maxsize=None)
def _candidates(head_dim: int, dtype: torch.dtype, capability: tuple, interpret: bool) -> list:
    """Launch configs worth timing for this head_dim/dtype/device; the first is the untuned default.

    Pruned by hand to what fits shared memory and registers on sm80/sm90 for each head_dim.
    """
    block_d = max(16, next_power_of_2(head_dim))

    def cfg(block_m, block_n, warps, stages):
        stages = min(stages, 2) if capability[0] < 8 else stages
        return dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, num_warps=warps, num_stages=stages)

    if interpret:
        return [cfg(32, 32, 4, 1)]
    if dtype == torch.float32:
        return [cfg(64, 32, 4, 2), cfg(32, 32, 4, 2)] if block_d <= 128 else [cfg(32, 32, 4, 1)]
    if block_d <= 64:
        return [cfg(128, 64, 4, 3), cfg(128, 128, 8, 3), cfg(128, 64, 8, 3), cfg(64, 64, 4, 3), cfg(64, 128, 4, 3)]
    if block_d <= 128:
        return [cfg(128, 64, 8, 3), cfg(128, 128, 8, 3), cfg(128, 128, 8, 2), cfg(128, 64, 4, 3), cfg(64, 64, 4, 3)]
    return [cfg(64, 32, 4, 2), cfg(64, 64, 8, 2), cfg(128, 64, 8, 2), cfg(64, 32, 8, 3)]


# (key) -> chosen config. Filled by timing the candidates on the first eager call with a new key;
# calls that cannot time (CUDA-graph capture, torch.compile tracing) use the cached choice or the
# default, so a captured graph never contains an autotuning run.
_TUNED: dict = {}


def _tuning_key(q, k, causal: bool, paged: bool) -> tuple:
    seqlen_q, seqlen_k = q.shape[2], k.shape[2]
    # lengths bucketed by power of two: one tuning per (head_dim, dtype, length class)
    return (q.shape[-1], q.dtype, causal, paged, next_power_of_2(min(seqlen_q, 16384)),
            next_power_of_2(min(seqlen_k, 16384)), q.device.index)


def _can_time(q) -> bool:
    return q.is_cuda and not torch.cuda.is_current_stream_capturing() and not torch.compiler.is_compiling()


def _choose_config(candidates: list, key: tuple, q, launch) -> dict:
    if len(candidates) == 1:
        return candidates[0]
    if key in _TUNED:
        return _TUNED[key]
    if not _can_time(q):
        return candidates[0]
    best, best_ms = candidates[0], float("inf")
    for cfg in candidates:
        try:
            ms = triton.testing.do_bench(lambda: launch(cfg), warmup=5, rep=20, return_mode="median")
        except Exception:  # a candidate that fails to compile or launch (out of resources) is skipped
            continue
        if ms < best_ms:
            best, best_ms = cfg, ms
    _TUNED[key] = best
    return best


def attention_forward(q, k, v, out, key_start, key_end, key_end_offset, block_table, causal, scale):
    """Launch the forward kernel.

    q: [B, H_q, S_q, D]; k, v: [B, H_kv, S_k, D] or pages [num_pages, H_kv, page_size, D] with
    block_table [B, max_pages_per_seq]; out: [B, H_q, S_q, D] (written); key_start, key_end:
    int32 [B] or None; keys of batch b are [key_start[b], key_end[b] + key_end_offset).
    """
    batch, num_q_heads, seqlen_q, head_dim = q.shape
    num_kv_heads = k.shape[1]
    paged = block_table is not None
    num_pages, page_size, max_pages_per_seq, key_capacity, stride_bt_b = kv_geometry(k, block_table)
    dummy = key_end if key_end is not None else q  # never read when the flag is off
    row_flags = paged_row_flags(k, v, block_table)

    def launch(cfg):
        grid = (triton.cdiv(seqlen_q, cfg["BLOCK_M"]), batch * num_q_heads)
        descriptors = kv_descriptors(k, v, block_table, cfg["BLOCK_N"], cfg["BLOCK_D"])
        _attention_fwd_kernel[grid](
            q, k, v, *(descriptors or (k, v)), out,
            key_start if key_start is not None else dummy,
            dummy,
            block_table if paged else dummy,
            num_q_heads, num_q_heads // num_kv_heads, seqlen_q, key_capacity, key_end_offset,
            scale * LOG2_E, page_size, num_pages, max_pages_per_seq,
            q.stride(0), q.stride(1), q.stride(2),
            k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2),
            out.stride(0), out.stride(1), out.stride(2),
            stride_bt_b,
            HEAD_DIM=head_dim,
            CAUSAL=causal,
            HAS_KEY_START=key_start is not None,
            HAS_KEY_END=key_end is not None,
            PAGED=paged,
            DOT_PRECISION=dot_precision(q.dtype),
            TMA=descriptors is not None,
            **row_flags,
            **cfg,
        )

    candidates = _candidates(head_dim, q.dtype, device_capability(q.device), interpreting())
    launch(_choose_config(candidates, _tuning_key(q, k, causal, paged), q, launch))
