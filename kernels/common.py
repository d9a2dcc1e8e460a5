"""Where a key/value token lives: contiguous caches and paged pools behind one helper.

Every kernel that reads or writes K/V goes through `kv_token_offsets` (or its two halves,
`page_entries` and `page_rows`, where decode reads the table a block ahead of the rows), so the
paged layout (`block_table[b, p // page_size]`, slot `p % page_size`) and its bounds checks are
written once.
"""

import functools

import triton
import triton.language as tl

try:
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # triton < 3.4: pointer loads only
    TensorDescriptor = None


@triton.jit
def page_entries(block_table_row_ptr, positions, valid, page_size, max_pages_per_seq):
    """block_table[b, p // page_size] of each position p: the page holding it, -1 where the caller
    does not want it or the table has no column for it."""
    page_slot = positions // page_size
    return tl.load(block_table_row_ptr + page_slot, mask=valid & (page_slot < max_pages_per_seq), other=-1)


@triton.jit
def page_rows(page, positions, stride_page, stride_seq, page_size, num_pages, WIDE: tl.constexpr):
    """Element offsets of each position's row inside its page (`page_entries`), and whether that
    page lies inside the pool; rows of pages outside it point into page 0, so they stay in the pool.
    int64 when WIDE (a pool whose last element lies past 2**31 - 1, see `paged_row_flags`)."""
    in_pool = (page >= 0) & (page < num_pages)
    page = tl.where(in_pool, page, 0)
    if WIDE:
        offsets = page.to(tl.int64) * stride_page + ((positions % page_size) * stride_seq).to(tl.int64)
    else:
        offsets = page * stride_page + (positions % page_size) * stride_seq
    return offsets, in_pool


@triton.jit
def kv_token_offsets(
    block_table_row_ptr,  # int32 pointer to block_table[b, :] (unused when not PAGED)
    positions,  # [BLOCK] logical positions within the sequence
    valid,  # [BLOCK] bool: positions the caller wants to touch
    stride_page,  # paged: stride between pages; contiguous: unused
    stride_seq,  # stride between tokens (contiguous) or slots within a page (paged)
    page_size,
    num_pages,
    max_pages_per_seq,
    PAGED: tl.constexpr,
    WIDE: tl.constexpr,
):
    """Element offsets of each token's row from the (batch, kv head) base pointer (`kv_head_base`),
    and the mask of rows that are safe to touch.

    A row is safe when the caller wants it and, for paged caches, its page index read from the
    block table lies inside the pool: a corrupt table can never address memory outside it.
    Contiguous offsets stay in int32 (one head's [S, D] slab); paged ones follow `page_rows`.
    """
    if PAGED:
        page = page_entries(block_table_row_ptr, positions, valid, page_size, max_pages_per_seq)
        offsets, safe = page_rows(page, positions, stride_page, stride_seq, page_size, num_pages, WIDE)
    else:
        safe = valid
        offsets = positions * stride_seq
    return offsets, safe


@triton.jit
def kv_rows(block_table_row_ptr, positions, valid, stride_k_page, stride_k_seq, stride_v_page, stride_v_seq,
            page_size, num_pages, max_pages_per_seq, PAGED: tl.constexpr, SHARED_ROWS: tl.constexpr,
            WIDE_ROWS: tl.constexpr):
    """`kv_token_offsets` of K and of V (one lookup when SHARED_ROWS): k_rows, k_ok, v_rows, v_ok."""
    k_rows, k_ok = kv_token_offsets(block_table_row_ptr, positions, valid, stride_k_page, stride_k_seq, page_size,
                                    num_pages, max_pages_per_seq, PAGED, WIDE_ROWS)
    if SHARED_ROWS:
        v_rows, v_ok = k_rows, k_ok
    else:
        v_rows, v_ok = kv_token_offsets(block_table_row_ptr, positions, valid, stride_v_page, stride_v_seq,
                                        page_size, num_pages, max_pages_per_seq, PAGED, WIDE_ROWS)
    return k_rows, k_ok, v_rows, v_ok


@triton.jit
def prefetch_kv_to_l2(K, V, block_table_row_ptr, positions, stride_k_page, stride_k_seq, stride_v_page, stride_v_seq,
                      page_size, num_pages, max_pages_per_seq, LINES: tl.constexpr, LINE_ELEMS: tl.constexpr,
                      PAGED: tl.constexpr, SHARED_ROWS: tl.constexpr, WIDE_ROWS: tl.constexpr):
    """Ask the L2 to start fetching the K/V rows of ``positions`` (positions inside the cache's
    capacity): LINES 128-byte lines of LINE_ELEMS elements from the start of each row. Moves
    nothing into registers, so nothing waits on it. Rows come from `kv_rows`, whose offsets for
    pages outside the pool point at page 0, so every hint stays inside the pool."""
    k_rows, _, v_rows, _ = kv_rows(block_table_row_ptr, positions, positions >= 0, stride_k_page, stride_k_seq,
                                   stride_v_page, stride_v_seq, page_size, num_pages, max_pages_per_seq, PAGED,
                                   SHARED_ROWS, WIDE_ROWS)
    prefetch_rows_to_l2(K, V, k_rows, v_rows, LINES, LINE_ELEMS)


@triton.jit
def prefetch_rows_to_l2(K, V, k_rows, v_rows, LINES: tl.constexpr, LINE_ELEMS: tl.constexpr):
    """Ask the L2 for LINES 128-byte lines of LINE_ELEMS elements from the start of each K row
    ``K + k_rows`` and V row ``V + v_rows`` (element offsets, [N]): hints that move nothing into
    registers."""
    line = tl.arange(0, LINES) * LINE_ELEMS
    l2_prefetch(K + k_rows[:, None] + line[None, :])
    l2_prefetch(V + v_rows[:, None] + line[None, :])


@triton.jit
def l2_prefetch(ptrs):
    tl.inline_asm_elementwise("prefetch.global.L2 [$1]; mov.u32 $0, 0;", "=r,l", [ptrs], dtype=tl.int32,
                              is_pure=False, pack=1)


@triton.jit
def async_proxy_fence(anchor):
    """Order this thread's earlier global stores before later bulk (TMA) copies of the CTA, which
    read through the async proxy (PTX ``fence.proxy.async.global``); a barrier must follow for other
    threads' copies. ``anchor``: any scalar int32 (inline assembly needs an operand)."""
    tl.inline_asm_elementwise("fence.proxy.async.global; mov.u32 $0, 0;", "=r,r", [anchor], dtype=tl.int32,
                              is_pure=False, pack=1)


@triton.jit
def key_range(KeyStart, KeyEnd, b, key_end_offset, key_capacity, HAS_KEY_START: tl.constexpr,
              HAS_KEY_END: tl.constexpr):
    """Keys [key_start, key_end) of sequence ``b``: key_end = KeyEnd[b] + key_end_offset clamped to
    the capacity (or the capacity), key_start = max(KeyStart[b], 0) (or 0)."""
    key_end = key_capacity
    if HAS_KEY_END:
        key_end = tl.minimum(tl.load(KeyEnd + b) + key_end_offset, key_capacity)
    key_start = 0
    if HAS_KEY_START:
        key_start = tl.maximum(tl.load(KeyStart + b), 0)
    return key_start, key_end


@triton.jit
def kv_head_base(ptr, b, kv_h, stride_b, stride_h, PAGED: tl.constexpr):
    """Pointer to the start of KV head `kv_h` of sequence `b` (contiguous) or of every page (paged)."""
    if PAGED:
        return ptr + kv_h.to(tl.int64) * stride_h
    return ptr + b.to(tl.int64) * stride_b + kv_h.to(tl.int64) * stride_h


@triton.jit
def online_softmax_blocks(
    acc,  # [BLOCK_M, BLOCK_D] fp32 running numerator
    l_i,  # [BLOCK_M] fp32 running denominator
    m_i,  # [BLOCK_M] fp32 running max, log2 domain
    q,  # [BLOCK_M, BLOCK_D] query tile
    K,  # base pointers from kv_head_base
    V,
    k_desc,  # TMA: tensor descriptors of the whole [B, H_kv, S, D] K and V (else unused)
    v_desc,
    desc_b,  # TMA: batch and KV head this program reads
    desc_h,
    block_table_row_ptr,
    stride_k_page,
    stride_k_seq,
    stride_v_page,
    stride_v_seq,
    page_size,
    num_pages,
    max_pages_per_seq,
    query_index,  # [BLOCK_M] each row's query position in [0, seqlen_q)
    key_start,
    key_end,
    diag,  # key_end - seqlen_q: row i sees keys j <= i + diag when causal
    lo,
    hi,
    qk_scale,  # softmax scale * log2(e)
    HEAD_DIM: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    CAUSAL: tl.constexpr,
    MASKED: tl.constexpr,
    PAGED: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    TMA: tl.constexpr,
    SHARED_ROWS: tl.constexpr,  # paged: K and V share strides, one offsets vector serves both
    WIDE_ROWS: tl.constexpr,  # paged: 64-bit row offsets (`paged_row_flags`)
    TABLE_AHEAD: tl.constexpr = False,  # paged: read the block table one block ahead (decode)
    SHIFT_TAIL: tl.constexpr = False,  # TMA: a last block short of hi is read as the BLOCK_N rows up to hi
    guess_lo=0,  # TABLE_GUESS: guessed_pages holds the block-table entries of keys [guess_lo, guess_lo +
    guessed_pages=0,  # BLOCK_N), read before lo was known; the first block takes them when lo == guess_lo
    TABLE_GUESS: tl.constexpr = False,
    stride_blocks=1,  # the loop takes every stride_blocks-th block from lo (decode's interleaved splits)
    guessed_next=0,  # GUESS_NEXT: the entries of keys [guess_lo + BLOCK_N, guess_lo + 2 * BLOCK_N), read
    GUESS_NEXT: tl.constexpr = False,  # with guessed_pages; the first iteration takes them (stride_blocks 1)
    BIAS_MASK: tl.constexpr = False,  # MASKED: hidden scores come from a 0 / -inf tile the dot starts from
    new_lo=0,  # NEW_ROWS: keys from new_lo on are this step's new tokens, read from the inputs: key
    k_new_row=0,  # new_lo + t from k_new_row + t * stride_kn_s (v_new_row likewise), not from the pool
    v_new_row=0,
    stride_kn_s=0,
    stride_vn_s=0,
    NEW_ROWS: tl.constexpr = False,
    visit_entries=0,  # VISIT_GATHER: [SORT_PAGES] the slice's table entries in visiting order (from guess_lo)
    visit_ok=False,  # VISIT_GATHER: whether that order holds for this call (else the table is read)
    VISIT_GATHER: tl.constexpr = False,
):
    """FlashAttention-2 inner loop over key blocks [lo, hi), shared by prefill and decode.

    MASKED=False is the fast path for blocks every row sees entirely (no start/end/causal
    masking); the caller proves that from the block bounds. With stride_blocks > 1 the blocks
    start at lo, lo + stride_blocks * BLOCK_N, ... below hi (the others belong to other programs).

    SHIFT_TAIL (bulk copies, every key in [hi - BLOCK_N, hi) a real one, not garbage): one loop
    over the whole range, whole blocks and a partial last one alike. That last block is copied
    as the BLOCK_N rows ending at hi (rows before the tensor come back as zeros), and the rows of
    earlier blocks (seen here or, interleaved, by another program) are masked out of the scores
    only, by starting their dot from -inf: V stays in shared memory, where masking it would cost
    a trip through registers, every row it holds is finite, and whole blocks pay no masking
    arithmetic after the dot (a branch choosing masked or unmasked arithmetic per block cost
    0.1-0.2 us on 67 MB caches, NOTES.md).

    BIAS_MASK (MASKED blocks): the same 0 / -inf tile hides the scores of keys outside the range
    instead of a select after the dot; the loads stay masked (slots past a length may hold NaN).
    Paged pools at D=64 run a slice with a partial last block masked throughout: 0.26-0.30 us
    over full length at 67 MB with the select, 0.06-0.11 this way (NOTES.md twenty-first round).

    NEW_ROWS (paged, TABLE_AHEAD): keys from ``new_lo`` on are gathered from this step's new
    tokens (rows of ``k_new_row`` / ``v_new_row``) instead of the pool, so a decode step can read
    them before they are stored.

    VISIT_GATHER (paged, TABLE_AHEAD): where ``visit_ok``, the slice starting at ``guess_lo`` is
    read with its pages in the order of ``visit_entries`` (decode's pool-order visit: the key at
    slice position p is read from the page of visiting slot p // page_size, at its offset in that
    page), picked out of registers instead of read from the table.
    """
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    if PAGED and TABLE_AHEAD:
        first = lo + tl.arange(0, BLOCK_N)
        if TABLE_GUESS:
            fresh = (first < hi) & (first != guess_lo + tl.arange(0, BLOCK_N))  # elementwise: lo != guess_lo
            next_pages = page_entries(block_table_row_ptr, first, fresh, page_size, max_pages_per_seq)
            next_pages = tl.where(lo == guess_lo, guessed_pages, next_pages)
        else:
            next_pages = page_entries(block_table_row_ptr, first, first < hi, page_size, max_pages_per_seq)
    step = BLOCK_N * stride_blocks
    for start_n in range(lo, hi, step):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        want = (offs_n >= key_start) & (offs_n < key_end)
        if PAGED and TABLE_AHEAD:
            # the table is read one block ahead, so the pipeliner can issue each block's gathers
            # stages early without waiting on it; rows of pages outside the pool read page 0
            # (garbage for a corrupt table, never memory outside the pool)
            pages = next_pages
            next_ok = offs_n + step < hi
            if GUESS_NEXT:
                # the first block at the guessed start: its successor's entries were read already
                # (the table read is masked off, so the pipeliner keeps it one block ahead; the
                # scalar condition is broadcast as an integer: the interpreter takes no scalar-bool mask)
                guessed = (start_n == lo) & (lo == guess_lo)
                next_ok = next_ok & (tl.where(guessed, 0, 1) + tl.zeros_like(offs_n) > 0)
            if VISIT_GATHER:
                # the pages in visiting order come from registers (the key at slice position p reads
                # the page of visiting slot p // page_size), the table only where that order fails
                table_ok = next_ok & (tl.where(visit_ok, 0, 1) + tl.zeros_like(offs_n) > 0)
                next_pages = page_entries(block_table_row_ptr, offs_n + step, table_ok, page_size, max_pages_per_seq)
                slots = tl.minimum(tl.maximum(offs_n + step - guess_lo, 0) // page_size, visit_entries.shape[0] - 1)
                next_pages = tl.where(visit_ok, tl.gather(visit_entries, slots, 0), next_pages)
            else:
                next_pages = page_entries(block_table_row_ptr, offs_n + step, next_ok, page_size, max_pages_per_seq)
            if GUESS_NEXT:
                next_pages = tl.where(guessed, guessed_next, next_pages)
            k_rows, _ = page_rows(pages, offs_n, stride_k_page, stride_k_seq, page_size, num_pages, WIDE_ROWS)
            v_rows = k_rows
            if not SHARED_ROWS:
                v_rows, _ = page_rows(pages, offs_n, stride_v_page, stride_v_seq, page_size, num_pages, WIDE_ROWS)
            rows_mask = d_ok[None, :]
            if MASKED:
                rows_mask = want[:, None] & d_ok[None, :]
            if NEW_ROWS:
                # this step's tokens come from the inputs (the caller writes their slots after
                # its loop): one pointer select per key
                new_t = tl.maximum(offs_n - new_lo, 0)
                is_new = offs_n >= new_lo
                k_ptrs = tl.where(is_new, k_new_row + new_t * stride_kn_s, K + k_rows)
                v_ptrs = tl.where(is_new, v_new_row + new_t * stride_vn_s, V + v_rows)
                k = tl.load(k_ptrs[:, None] + offs_d[None, :], mask=rows_mask, other=0.0).T
                v = tl.load(v_ptrs[:, None] + offs_d[None, :], mask=rows_mask, other=0.0)
            else:
                k = tl.load(K + k_rows[:, None] + offs_d[None, :], mask=rows_mask, other=0.0).T
                v = tl.load(V + v_rows[:, None] + offs_d[None, :], mask=rows_mask, other=0.0)
        elif TMA:
            # Hopper bulk copies; rows past S (and, SHIFT_TAIL, before 0) come back as zeros
            load_n = start_n
            if SHIFT_TAIL:
                load_n = tl.minimum(start_n, hi - BLOCK_N)
                offs_load = load_n + tl.arange(0, BLOCK_N)
            k = k_desc.load([desc_b, desc_h, load_n, 0]).reshape(BLOCK_N, BLOCK_D).T
            v = v_desc.load([desc_b, desc_h, load_n, 0]).reshape(BLOCK_N, BLOCK_D)
            if MASKED:
                # slots outside the key range may hold anything (NaN too): 0 * NaN would leak
                v = tl.where(want[:, None], v, 0.0)
        else:
            k_rows, k_ok, v_rows, v_ok = kv_rows(
                block_table_row_ptr, offs_n, want, stride_k_page, stride_k_seq, stride_v_page, stride_v_seq,
                page_size, num_pages, max_pages_per_seq, PAGED, SHARED_ROWS, WIDE_ROWS)
            if PAGED:
                # gathered rows: both tiles [BLOCK_N, BLOCK_D] from the same row offsets, K transposed
                # for the dot (one table lookup and one 32-bit address tile per block where it can:
                # 6-9% faster than separate K/V offsets on the H100, NOTES.md)
                k = tl.load(K + k_rows[:, None] + offs_d[None, :], mask=k_ok[:, None] & d_ok[None, :], other=0.0).T
                v = tl.load(V + v_rows[:, None] + offs_d[None, :], mask=v_ok[:, None] & d_ok[None, :], other=0.0)
            else:
                # k: [BLOCK_D, BLOCK_N], loaded transposed so the dot needs no permute; v: [BLOCK_N, BLOCK_D]
                k_ptrs = K + k_rows[None, :] + offs_d[:, None]
                v_ptrs = V + v_rows[:, None] + offs_d[None, :]
                if MASKED:
                    k = tl.load(k_ptrs, mask=k_ok[None, :] & d_ok[:, None], other=0.0)
                    v = tl.load(v_ptrs, mask=v_ok[:, None] & d_ok[None, :], other=0.0)
                elif BLOCK_D == HEAD_DIM:
                    k = tl.load(k_ptrs)
                    v = tl.load(v_ptrs)
                else:
                    k = tl.load(k_ptrs, mask=d_ok[:, None], other=0.0)
                    v = tl.load(v_ptrs, mask=d_ok[None, :], other=0.0)
        if MASKED and not BIAS_MASK:
            visible = want[None, :]
            if CAUSAL:
                visible = visible & (offs_n[None, :] <= query_index[:, None] + diag)
            acc, l_i, m_i = online_softmax_step(acc, l_i, m_i, q, k, v, visible, qk_scale, True, DOT_PRECISION)
        elif MASKED or SHIFT_TAIL:
            # MASKED: keys outside [key_start, key_end) are hidden (their rows were loaded as zeros, so
            # a row may see nothing in this block). SHIFT_TAIL: the rows this block was read from
            # before start_n were seen already. Causal: keys past a row's diagonal are hidden too.
            # Their scores start from -inf in the dot's accumulator, a tile built before the loads
            # land: no masking after the dot, no branch.
            offs_seen = offs_n
            visible = want[None, :]
            if not MASKED:
                offs_seen = offs_load
                visible = (offs_load >= start_n)[None, :]
            if CAUSAL:
                visible = visible & (offs_seen[None, :] <= query_index[:, None] + diag)
            bias = tl.broadcast_to(tl.where(visible, 0.0, float("-inf")), (q.shape[0], BLOCK_N))
            acc, l_i, m_i = online_softmax_step(acc, l_i, m_i, q, k, v, bias, qk_scale, False, DOT_PRECISION,
                                                True, CAUSAL or MASKED)
        else:
            acc, l_i, m_i = online_softmax_step(acc, l_i, m_i, q, k, v, offs_n, qk_scale, False, DOT_PRECISION)
    return acc, l_i, m_i


@triton.jit
def _masked_probabilities(qk, m_i, visible, qk_scale):
    """(p, new running max, the shift p was taken against) for raw scores under a mask."""
    qk = tl.where(visible, qk * qk_scale, float("-inf"))
    # a row that has seen no key yet keeps m = -inf, so shift by 0
    m_new = tl.maximum(m_i, tl.max(qk, 1))
    m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
    return tl.math.exp2(qk - m_shift[:, None]), m_new, m_shift


@triton.jit
def _unmasked_probabilities(qk, m_i, qk_scale, GUARD: tl.constexpr = False):
    """`_masked_probabilities` where no mask is applied here: the scale folds into one FMA with the
    max subtraction. GUARD: a row may still be all -inf (scores that start from a bias), so shift
    it by 0 as the masked arithmetic does."""
    m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
    m_shift = m_new
    if GUARD:
        m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
    return tl.math.exp2(qk * qk_scale - m_shift[:, None]), m_new, m_shift


@triton.jit
def online_softmax_step(
    acc,  # [BLOCK_M, BLOCK_D] fp32
    l_i,  # [BLOCK_M] fp32
    m_i,  # [BLOCK_M] fp32, log2 domain
    q,  # [BLOCK_M, BLOCK_D]
    k,  # [BLOCK_D, BLOCK_N] (transposed)
    v,  # [BLOCK_N, BLOCK_D]; zero (not NaN) wherever a key is not visible
    visible,  # MASKED: [BLOCK_M, BLOCK_N] bool, which scores count (else unused)
    qk_scale,
    MASKED: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BIASED: tl.constexpr = False,
    GUARD: tl.constexpr = False,
):
    """Fold one block of keys into the running (acc, l, m) of the online softmax.

    MASKED applies ``visible`` to the scores. BIASED takes ``visible`` as a [BLOCK_M, BLOCK_N]
    float32 tile of 0 / -inf that the dot accumulates into (the scores start from it), then the
    unmasked arithmetic; GUARD when a row may have seen no key yet (all -inf so far).
    """
    if DOT_PRECISION == "interpret-bf16":
        # the Triton interpreter multiplies bfloat16 dot operands as raw bits
        qk = tl.dot(q.to(tl.float32), k.to(tl.float32))
        if BIASED:
            qk += visible
    elif BIASED:
        qk = tl.dot(q, k, visible, input_precision=DOT_PRECISION)  # [BLOCK_M, BLOCK_N], unscaled
    else:
        qk = tl.dot(q, k, input_precision=DOT_PRECISION)
    if MASKED:
        p, m_new, m_shift = _masked_probabilities(qk, m_i, visible, qk_scale)
    else:
        p, m_new, m_shift = _unmasked_probabilities(qk, m_i, qk_scale, GUARD)
    alpha = tl.math.exp2(m_i - m_shift)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    if DOT_PRECISION == "interpret-bf16":
        # round p like the GPU path does, then multiply in float32
        acc = tl.dot(p.to(v.dtype).to(tl.float32), v.to(tl.float32), acc)
    else:
        # accumulate in place: the tensor cores add into acc, no second register tile
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
    return acc, l_i, m_new


def device_capability(device) -> tuple:
    """(major, minor) of a CUDA device, (0, 0) elsewhere; cached (launchers ask on every call)."""
    return _cuda_capability(device.index or 0) if device.type == "cuda" else (0, 0)


@functools.lru_cache(maxsize=None)
def _cuda_capability(index: int) -> tuple:
    import torch

    return torch.cuda.get_device_capability(index)


def next_power_of_2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def dot_precision(dtype) -> str:
    """float32 inputs get IEEE dots (TF32 would cost ~1e-3 relative error); 16-bit ones are exact anyway.

    "interpret-bf16" marks bfloat16 under the Triton interpreter, whose dot mishandles bfloat16.
    """
    import torch

    if dtype == torch.bfloat16 and interpreting():
        return "interpret-bf16"
    return "ieee" if dtype == torch.float32 else "tf32"


def interpreting() -> bool:
    import os

    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def kv_geometry(k_cache, block_table) -> tuple:
    """(num_pages, page_size, max_pages_per_seq, key_capacity, stride_bt_b) of a cache.

    Contiguous caches [B, H_kv, S_max, D] report capacity S_max and a dummy page geometry.
    """
    if block_table is None:
        return 1, 1, 1, k_cache.shape[2], 0
    num_pages, _, page_size, _ = k_cache.shape
    max_pages_per_seq = block_table.shape[1]
    return num_pages, page_size, max_pages_per_seq, max_pages_per_seq * page_size, block_table.stride(0)


def paged_row_flags(k, v, block_table) -> dict:
    """Constexprs of `online_softmax_blocks` for a paged pool: SHARED_ROWS when K and V have the
    same strides (one row-offsets vector addresses both), WIDE_ROWS when an element lies past
    2**31 - 1 (64-bit offsets). Contiguous caches get neither (their offsets are per head)."""
    if block_table is None:
        return dict(SHARED_ROWS=False, WIDE_ROWS=False)
    last = max(sum((n - 1) * st for n, st in zip(t.shape, t.stride())) for t in (k, v))
    return dict(SHARED_ROWS=tuple(k.stride()) == tuple(v.stride()), WIDE_ROWS=last >= 2**31)


def kv_descriptors(k, v, block_table, block_n: int, block_d: int):
    """Host TMA descriptors for K and V ([B, H_kv, S, D], any 16-byte-aligned strides), or None.

    Only on Hopper or newer CUDA devices, for contiguous (not paged) caches whose head_dim is a
    power of two: elsewhere the kernels fall back to pointer loads.
    """
    import torch

    if block_table is not None or not k.is_cuda or interpreting() or block_d != k.shape[-1]:
        return None
    if 0 in k.shape:  # a descriptor needs a positive extent in every dimension
        return None
    if TensorDescriptor is None or k.dtype not in (torch.float16, torch.bfloat16):
        return None
    if device_capability(k.device)[0] < 9:
        return None
    size = k.element_size()
    for t in (k, v):
        if t.data_ptr() % 16 or any(st * size % 16 for st in t.stride()[:3]) or t.stride(3) != 1:
            return None
    block = [1, 1, block_n, block_d]
    return (TensorDescriptor(k, list(k.shape), list(k.stride()), block),
            TensorDescriptor(v, list(v.shape), list(v.stride()), block))
