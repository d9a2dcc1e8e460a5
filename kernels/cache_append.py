"""In-place append of new K/V tokens into a contiguous or paged cache.

Touches only the S_q new slots of each sequence (never a pass over the cache); every store is
masked against the cache capacity and, for paged caches, the pool bounds.
"""

import triton
import triton.language as tl

from .common import interpreting, kv_geometry, kv_head_base, kv_rows, next_power_of_2


@triton.jit
def load_new_tokens(KNew, VNew, CacheSeqlens, b, kv_h, rows, seqlen_new, key_capacity,
                    stride_kn_b, stride_kn_h, stride_kn_s, stride_vn_b, stride_vn_h, stride_vn_s,
                    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    """New K/V tokens ``rows`` of sequence ``b``, KV head ``kv_h`` (KNew/VNew [B, H_kv, seqlen_new, D]).

    Returns (positions, want, k_new, v_new): their cache positions (from cache_seqlens[b]), which
    of them exist and land inside the cache (the others are never written nor attended, and read
    as zeros), and the rows, each [BLOCK, BLOCK_D]. Shared by the append kernel and the decode
    kernels' fused append.
    """
    positions = tl.load(CacheSeqlens + b) + rows
    want = (rows < seqlen_new) & (positions >= 0) & (positions < key_capacity)
    offs_d = tl.arange(0, BLOCK_D)
    # the rows are loaded whatever the length (no wait on its load first), then zeroed where unwanted
    mask = (rows < seqlen_new)[:, None] & (offs_d < HEAD_DIM)[None, :]
    kn_base = KNew + b.to(tl.int64) * stride_kn_b + kv_h * stride_kn_h
    vn_base = VNew + b.to(tl.int64) * stride_vn_b + kv_h * stride_vn_h
    k_new = tl.load(kn_base + rows[:, None] * stride_kn_s + offs_d[None, :], mask=mask, other=0.0)
    v_new = tl.load(vn_base + rows[:, None] * stride_vn_s + offs_d[None, :], mask=mask, other=0.0)
    k_new = tl.where(want[:, None], k_new, 0.0)
    v_new = tl.where(want[:, None], v_new, 0.0)
    return positions, want, k_new, v_new


@triton.jit
def new_row_offsets(block_table_row_ptr, positions, want, stride_kc_page, stride_kc_seq, stride_vc_page,
                    stride_vc_seq, page_size, num_pages, max_pages_per_seq, PAGED: tl.constexpr):
    """Where `store_new_rows` writes the new rows at ``positions`` ([BLOCK]; ``want`` which of them):
    (k_rows, k_ok, v_rows, v_ok), 64-bit element offsets from the cache bases (`kv_head_base`) and
    whether each row is written (paged: its page lies inside the pool). Paged caches read the
    block table here, so kernels that store at their end take these early, and the store waits
    on no table read."""
    return kv_rows(block_table_row_ptr, positions, want, stride_kc_page, stride_kc_seq, stride_vc_page,
                   stride_vc_seq, page_size, num_pages, max_pages_per_seq, PAGED, False, True)


@triton.jit
def store_new_rows(k_new, v_new, KCacheBase, VCacheBase, k_rows, k_ok, v_rows, v_ok,
                   HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    """Store new K/V rows ([BLOCK, BLOCK_D], `load_new_tokens`) at the offsets `new_row_offsets`
    gave; rows it marked not ok (past the capacity, unwanted, pages outside the pool) are skipped.

    Shared by the append kernel and the decode kernels' fused append.
    """
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    tl.store(KCacheBase + k_rows[:, None] + offs_d[None, :], k_new, mask=k_ok[:, None] & d_ok[None, :])
    tl.store(VCacheBase + v_rows[:, None] + offs_d[None, :], v_new, mask=v_ok[:, None] & d_ok[None, :])


@triton.jit
def _append_kv_kernel(
    # -- pointers
    KNew,
    VNew,
    KCache,
    VCache,
    CacheSeqlens,
    BlockTable,
    # -- sizes
    num_kv_heads,
    seqlen_new,
    key_capacity,
    page_size: tl.constexpr,
    num_pages,
    max_pages_per_seq,
    # -- strides
    stride_kn_b, stride_kn_h, stride_kn_s,
    stride_vn_b, stride_vn_h, stride_vn_s,
    stride_kc_b, stride_kc_h, stride_kc_s,
    stride_vc_b, stride_vc_h, stride_vc_s,
    stride_bt_b,
    # -- meta-parameters
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_S: tl.constexpr,
    PAGED: tl.constexpr,
):
    pid_s = tl.program_id(0)
    pid = tl.program_id(1)
    b = pid // num_kv_heads
    kv_h = pid % num_kv_heads
    offs_s = pid_s * BLOCK_S + tl.arange(0, BLOCK_S)
    positions, want, k_new, v_new = load_new_tokens(
        KNew, VNew, CacheSeqlens, b, kv_h, offs_s, seqlen_new, key_capacity,
        stride_kn_b, stride_kn_h, stride_kn_s, stride_vn_b, stride_vn_h, stride_vn_s, HEAD_DIM, BLOCK_D)
    bt_row = BlockTable + b.to(tl.int64) * stride_bt_b  # stride 0 when not PAGED
    k_rows, k_ok, v_rows, v_ok = new_row_offsets(bt_row, positions, want, stride_kc_b, stride_kc_s, stride_vc_b,
                                                 stride_vc_s, page_size, num_pages, max_pages_per_seq, PAGED)
    store_new_rows(k_new, v_new,
                   kv_head_base(KCache, b, kv_h, stride_kc_b, stride_kc_h, PAGED),
                   kv_head_base(VCache, b, kv_h, stride_vc_b, stride_vc_h, PAGED),
                   k_rows, k_ok, v_rows, v_ok, HEAD_DIM, BLOCK_D)


def append_kv(k_new, v_new, k_cache, v_cache, cache_seqlens, block_table):
    """Write k_new/v_new [B, H_kv, S_q, D] into the caches at cache_seqlens[b] + 0..S_q-1.

    k_cache, v_cache: [B, H_kv, S_max, D], or pages [num_pages, H_kv, page_size, D] with
    block_table [B, max_pages_per_seq]. Slots past the capacity or on pages outside the pool are
    skipped, never written.
    """
    batch, num_kv_heads, seqlen_new, head_dim = k_new.shape
    paged = block_table is not None
    num_pages, page_size, max_pages_per_seq, key_capacity, stride_bt_b = kv_geometry(k_cache, block_table)
    block_s = min(16 if interpreting() else 64, max(1, next_power_of_2(seqlen_new)))
    grid = (triton.cdiv(seqlen_new, block_s), batch * num_kv_heads)
    _append_kv_kernel[grid](
        k_new, v_new, k_cache, v_cache, cache_seqlens, block_table if paged else cache_seqlens,
        num_kv_heads, seqlen_new, key_capacity, page_size, num_pages, max_pages_per_seq,
        k_new.stride(0), k_new.stride(1), k_new.stride(2),
        v_new.stride(0), v_new.stride(1), v_new.stride(2),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        stride_bt_b,
        HEAD_DIM=head_dim,
        BLOCK_D=max(16, next_power_of_2(head_dim)),
        BLOCK_S=block_s,
        PAGED=paged,
        num_warps=4,
    )

