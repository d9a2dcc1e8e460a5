"""Split-KV ("flash-decoding") attention for few-token queries, GQA-packed.

Stage 1, grid (split, batch * kv_head): every query row of one KV group (group_size heads x
seqlen_q tokens) is packed into one [BLOCK_M, D] tile, so each K/V block is read from memory
once per group, and one split of the sequence's key blocks is reduced with online softmax into
a partial output plus its log-sum-exp. Stage 2 merges the splits; with one split, stage 1 writes
the output itself and stage 2 is not launched. On contiguous caches split s takes key blocks s,
s + splits, ... (the splits of a sequence read neighbouring blocks at the same time); on paged
pools each split is one slice of consecutive blocks.

Appending this step's k/v (``attention_with_kv_cache(..., k, v)``) costs no launch of its own:
stage 1 stops before the new slots, and stage 2 scores the new tokens from the inputs as one
more "split" and writes them into the cache; with one split, stage 1 does both itself (its
program is the only reader of that sequence and KV head). Where it pays (``write_first`` in
`attention_decode`: most paged pools, contiguous caches with one split and more programs than
SMs), the stage 1 program whose slice holds the new tokens writes them into the cache first,
behind a barrier (one split past one wave at D > 64: into pages picked out of the table row read
with the lengths), and reads its slice to the end like any other; one wave of lone programs on
a paged pool at D <= 64 instead gathers the new tokens from the inputs in its loop
(``new_rows``) and stores them after it. On Hopper both stages use programmatic dependent
launch: each starts while the kernel before it drains and waits
(``gdc_wait``) before reading; stage 1 lets the next kernel launch once it has waited, stage 2
at once (nothing it launches reads before waiting for it to end).

Paged pools gather K/V rows through the block table, which stage 1 reads one key block ahead
of the block it gathers (``TABLE_AHEAD``), so the software pipeline can issue each block's copies
stages early instead of waiting on the table; the table lines of each program's slice are asked
of the L2 before the wait on the previous kernel, and the entries of its first block (of its
first two, for whole-SM split programs in table order) are read next to the lengths. With one
wave of programs (but one split appending at D <= 64), each one works out before that wait the
order to visit its slice's pages in (ascending pool address, so all programs sweep the pool
together whatever order the allocator left the pages in; at D <= 64 after its first block,
which keeps table order so its hints need not wait) and, after it, takes the pages in that
order from registers.

One wave of programs launched early (contiguous caches and 16-bit pools) gets key blocks large
enough that each program takes a whole SM; each then starts as the program before it on that SM
ends, and asks the L2 for its first block before the wait on the previous kernel (so do programs
past one wave that take a whole SM). Bulk copies read a slice's partial last block as the block
ending at the slice's end, inside the slice's one pipelined loop (``SHIFT_TAIL``): with one wave
of programs always, past one wave at D <= 64 in 64-key blocks only when the last block is
partial (a second compiled loop, unmasked, takes slices of whole blocks).

Where whole splits cannot spread the (sequence, KV head) groups of a contiguous cache evenly
over the SMs (`_key_balanced`: one split leaving SMs idle, split grids of a wave and a fraction,
groups just past one wave), stage 1 is `_decode_balanced_kernel` instead: one such whole-SM
program per SM, each taking an equal share of all groups' key blocks in group order (a share
may end one group and start the next), one partial result per piece; stage 2 finds each
group's pieces from the same arithmetic.

16-bit caches whose groups run just past one wave of SMs (`_tail_groups`: up to 1.22 waves at
D <= 64; at D=128 1.5 on pools, 1.1 contiguous) take two stage-1 launches instead: the first
gives each of the first wave's groups one whole-SM program that writes its output directly; the
second splits the groups left over into 4-8 slices, whose programs start beside the first
wave's at once (they fit in the shared memory those leave) and merge their own results: the
last of a group's programs to end (a count per group, zeroed by the first launch before it lets
the second launch) merges the group's partial results, scores and stores this step's tokens,
and writes the output. The second launch waits on the kernel before only as it ends (it reads
nothing the first launch writes), so the next kernel's wait still covers both.

The number of splits is fixed from static information (batch, heads, capacity, SM count), so
a captured CUDA graph stays valid as lengths grow; each program derives its slice from the
device-side length, so work is proportional to the tokens each sequence holds.
"""

import functools

import torch
import triton
import triton.language as tl

from .attention_fwd import LOG2_E
from .cache_append import load_new_tokens, new_row_offsets, store_new_rows
from .common import (
    async_proxy_fence,
    device_capability,
    dot_precision,
    interpreting,
    kv_descriptors,
    kv_geometry,
    key_range,
    kv_head_base,
    l2_prefetch,
    next_power_of_2,
    online_softmax_blocks,
    online_softmax_step,
    page_entries,
    page_rows,
    paged_row_flags,
    prefetch_kv_to_l2,
    prefetch_rows_to_l2,
)


@triton.jit
def _slice_keys(span, num_splits, BLOCK_N: tl.constexpr):
    """Keys of each split's slice of ``span`` keys, in whole blocks (`_capacity_slice_keys` on the host)."""
    return tl.cdiv(tl.cdiv(span, num_splits), BLOCK_N) * BLOCK_N


@triton.jit
def _visit_plan(bt_row, guess_lo, cap_chunk, page_size: tl.constexpr, num_pages, max_pages_per_seq, first_slots,
                BLOCK_N: tl.constexpr, SORT_PAGES: tl.constexpr):
    """A program's slice (as a full sequence places it: ``guess_lo``, ``cap_chunk`` keys) read from
    the table row past the L1 (".cg", where no line read before the wait could linger) and put in
    visiting order (`_visit_order`, its first ``first_slots`` slots kept in place): (slots [SORT_PAGES],
    in-slice mask, the entries as read, the entries in visiting order, the first block's entries one
    per key [BLOCK_N], for the loop to start from without a table read)."""
    visit_slots = guess_lo // page_size + tl.arange(0, SORT_PAGES)
    slot_in = (tl.arange(0, SORT_PAGES) < cap_chunk // page_size) & (visit_slots < max_pages_per_seq)
    seen_entries = tl.load(bt_row + visit_slots, mask=slot_in, other=-1, cache_modifier=".cg")
    visit_entries = tl.gather(seen_entries, _visit_order(seen_entries, cap_chunk // page_size, num_pages, first_slots,
                                                         SORT_PAGES), 0)
    visit_first = tl.gather(visit_entries, tl.minimum(tl.arange(0, BLOCK_N) // page_size, SORT_PAGES - 1), 0)
    return visit_slots, slot_in, seen_entries, visit_entries, visit_first


@triton.jit
def _visit_order(entries, slice_pages, num_pages, first_slots, SORT_PAGES: tl.constexpr):
    """The slots of a slice's block-table entries ([SORT_PAGES], entry j for the slice's page slot
    j) in the order to visit them: the first ``first_slots`` slots where they are, whole pages in
    pool order (entries outside the pool where `page_rows` reads them, as page 0), then the slice's
    last page, which keeps its place at the end (the only one a length can leave partly filled,
    masked by its position), then the slots past the slice. A sort of keys (page + 1) * SORT_PAGES
    + j (page -1 for the slots kept in place): distinct, and each names its slot."""
    j = tl.arange(0, SORT_PAGES)
    page = tl.where((entries >= 0) & (entries < num_pages), entries, 0)
    page = tl.where(j < slice_pages - 1, page, tl.where(j == slice_pages - 1, num_pages, num_pages + 1))
    page = tl.where(j < tl.minimum(first_slots, slice_pages - 1), -1, page)
    return tl.sort((page + 1) * SORT_PAGES + j) % SORT_PAGES


@triton.jit
def _fold_new_key(acc, l_i, m_i, q, k_new, v_new, stored, qk_scale):
    """Fold one key (k_new, v_new: [1, BLOCK_D]; stored: [1], whether it exists) into the running
    softmax (acc, l, m) of every packed row of q [BLOCK_M, BLOCK_D]: elementwise products and row
    sums in the accumulator's own layout, where a [BLOCK_M, 16] tensor-core tile for the one key
    staged its operands through shared memory (1.2 us more per call at 16x8/8x2048x64, NOTES.md)."""
    score = tl.sum(q.to(tl.float32) * k_new.to(tl.float32), 1) * qk_scale
    score = tl.where(tl.max(stored.to(tl.int32), 0) > 0, score, float("-inf"))
    m_new = tl.maximum(m_i, score)
    m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)  # nothing seen yet and no key: shift by 0
    alpha = tl.math.exp2(m_i - m_shift)
    p = tl.math.exp2(score - m_shift)
    acc = acc * alpha[:, None] + p[:, None] * tl.sum(v_new.to(tl.float32), 0)[None, :]
    return acc, l_i * alpha + p, m_new


@triton.jit
def _packed_query(Q, b, kv_h, group_size, seqlen_q, stride_q_b, stride_q_h, stride_q_s, HEAD_DIM: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """The packed query tile of sequence ``b``, KV head ``kv_h``: row r is query head
    kv_h * group_size + r // seqlen_q, token r % seqlen_q. Returns (q [BLOCK_M, BLOCK_D], each row's
    head, its token, whether it exists)."""
    rows = tl.arange(0, BLOCK_M)
    row_ok = rows < group_size * seqlen_q
    h = kv_h * group_size + rows // seqlen_q
    query_index = rows % seqlen_q
    offs_d = tl.arange(0, BLOCK_D)
    q_ptrs = Q + b.to(tl.int64) * stride_q_b + h[:, None] * stride_q_h + query_index[:, None] * stride_q_s + offs_d[None, :]
    q = tl.load(q_ptrs, mask=row_ok[:, None] & (offs_d < HEAD_DIM)[None, :], other=0.0)
    return q, h, query_index, row_ok


@triton.jit
def _whole_blocks_end(lo, hi, diag, CAUSAL: tl.constexpr, BLOCK_N: tl.constexpr):
    """The end of the whole key blocks from ``lo`` that every packed row sees entirely: ``hi``
    (causal: no further than the last row's diagonal ``diag``) rounded down to a block from lo."""
    full_hi = hi
    if CAUSAL:
        full_hi = tl.minimum(full_hi, diag + 1)
    return lo + tl.maximum(full_hi - lo, 0) // BLOCK_N * BLOCK_N


@triton.jit
def _first_partial(b, h, query_index, num_q_heads, seqlen_q, num_splits):
    """Index of each packed row's split 0 in the partial buffers, contiguous [B, H_q, S_q, num_splits,
    (HEAD_DIM)]."""
    return ((b.to(tl.int64) * num_q_heads + h) * seqlen_q + query_index) * num_splits


@triton.jit
def _store_partial(PartialOut, PartialLse, out, lse, b, h, query_index, row_ok, num_q_heads, seqlen_q, num_splits,
                   split, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    """Store one split's normalised rows ``out`` [BLOCK_M, BLOCK_D] and their log-sum-exp ``lse`` as
    split ``split`` of the partial buffers (`_first_partial`)."""
    offs_d = tl.arange(0, BLOCK_D)
    partial_row = _first_partial(b, h, query_index, num_q_heads, seqlen_q, num_splits) + split
    tl.store(PartialLse + partial_row, lse, mask=row_ok)
    tl.store(PartialOut + partial_row[:, None] * HEAD_DIM + offs_d[None, :], out,
             mask=row_ok[:, None] & (offs_d < HEAD_DIM)[None, :])


@triton.jit
def _store_output(Out, acc, l_i, b, h, query_index, row_ok, stride_o_b, stride_o_h, stride_o_s,
                  HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    """Store the packed rows' online-softmax state normalised, acc / l (0 for rows that saw no key),
    into the output [B, H_q, S_q, HEAD_DIM]."""
    offs_d = tl.arange(0, BLOCK_D)
    out = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]
    o_ptrs = (Out + b.to(tl.int64) * stride_o_b + h[:, None] * stride_o_h + query_index[:, None] * stride_o_s
              + offs_d[None, :])
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=row_ok[:, None] & (offs_d < HEAD_DIM)[None, :])


@triton.jit
def _launch_dependents_after(value):
    """Let the next kernel launch (programmatic dependent launch) once ``value`` (a scalar int32,
    such as an atomic's result) has arrived: the trigger takes it as an operand."""
    tl.inline_asm_elementwise("griddepcontrol.launch_dependents; mov.u32 $0, $1;", "=r,r", [value], dtype=tl.int32,
                              is_pure=False, pack=1)


@triton.jit
def _attend_new_tokens(acc, l_i, m_i, q, k_new, v_new, stored, rows_t, query_index, seqlen_new, seqlen_q, qk_scale,
                       CAUSAL: tl.constexpr, BLOCK_T: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Fold this step's tokens (`load_new_tokens`: ``k_new``, ``v_new`` [BLOCK_T, BLOCK_D], ``stored``
    which are real) into the online-softmax state of the packed rows: one key elementwise, several
    as one more masked key block through the tensor cores (causal: token t is visible to query
    row i when t <= i + seqlen_new - seqlen_q)."""
    if BLOCK_T == 1:
        acc, l_i, m_i = _fold_new_key(acc, l_i, m_i, q, k_new, v_new, stored, qk_scale)
    else:
        visible = stored[None, :]
        if CAUSAL:
            visible = visible & (rows_t[None, :] <= query_index[:, None] + seqlen_new - seqlen_q)
        acc, l_i, m_i = online_softmax_step(acc, l_i, m_i, q, k_new.T, v_new, visible, qk_scale, True, DOT_PRECISION)
    return acc, l_i, m_i


@triton.jit
def _merge_partials(PartialOut, PartialLse, first_partial, row_ok, num_splits, HEAD_DIM: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_SPLITS: tl.constexpr,
                    MERGE_CHUNK: tl.constexpr):
    """Every split's partial result of the packed rows as one online-softmax state (acc, l, m).

    first_partial: [BLOCK_M] index of each row's split 0 in the partial buffers. Loads bypass the
    L1 (other SMs wrote these lines); splits are summed in index order whichever program merges.
    """
    offs_d = tl.arange(0, BLOCK_D)
    offs_s = tl.arange(0, BLOCK_SPLITS)
    lse = tl.load(PartialLse + first_partial[:, None] + offs_s[None, :],
                  mask=row_ok[:, None] & (offs_s < num_splits)[None, :], other=float("-inf"), cache_modifier=".cg")
    m = tl.max(lse, 1)
    m_shift = tl.where(m == float("-inf"), 0.0, m)  # rows no split saw: weights 0, the state stays empty
    l_i = tl.sum(tl.math.exp2(lse - m_shift[:, None]), 1)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for chunk in range(0, tl.cdiv(num_splits, MERGE_CHUNK)):
        offs_c = chunk * MERGE_CHUNK + tl.arange(0, MERGE_CHUNK)
        ok = row_ok[:, None] & (offs_c < num_splits)[None, :]
        lse_c = tl.load(PartialLse + first_partial[:, None] + offs_c[None, :], mask=ok, other=float("-inf"),
                        cache_modifier=".cg")
        weight = tl.math.exp2(lse_c - m_shift[:, None])  # [BLOCK_M, MERGE_CHUNK], 0 where a split saw nothing
        partial = tl.load(PartialOut + (first_partial[:, None, None] + offs_c[None, :, None]) * HEAD_DIM
                          + offs_d[None, None, :],
                          mask=ok[:, :, None] & (offs_d < HEAD_DIM)[None, None, :], other=0.0, cache_modifier=".cg")
        acc += tl.sum(partial * weight[:, :, None], 1)
    return acc, l_i, m


@triton.jit
def _decode_split_kernel(
    # -- pointers
    Q,
    K,
    V,
    KDesc,  # TMA descriptors of K and V when TMA (else unused)
    VDesc,
    PartialOut,  # [B, H_q, S_q, num_splits, HEAD_DIM] fp32, normalised per split
    PartialLse,  # [B, H_q, S_q, num_splits] fp32, log2 domain, -inf where the split saw nothing
    Out,  # DIRECT (one split): the output [B, H_q, S_q, HEAD_DIM], written here (else unused)
    KeyStart,
    KeyEnd,
    BlockTable,
    KNew,  # APPEND with DIRECT, WRITE_FIRST or FUSED_MERGE: this step's K/V [B, H_kv, seqlen_new, D] (else unused)
    VNew,
    Counters,  # ZERO_COUNTERS / FUSED_MERGE: int32 [tail_groups], programs of each tail group done
    # -- sizes
    group_base,  # the (sequence, KV head) group of grid row 0
    tail_groups,  # ZERO_COUNTERS: the groups of the tail launch after this one
    num_kv_heads,
    group_size,
    seqlen_q,
    seqlen_new,
    key_capacity,
    key_end_offset,
    qk_scale,
    page_size: tl.constexpr,  # 1 for contiguous caches; a constant so page arithmetic is shifts and masks
    num_pages,
    max_pages_per_seq,
    num_splits,
    # -- strides
    stride_q_b, stride_q_h, stride_q_s,
    stride_k_b, stride_k_h, stride_k_s,
    stride_v_b, stride_v_h, stride_v_s,
    stride_kn_b, stride_kn_h, stride_kn_s,
    stride_vn_b, stride_vn_h, stride_vn_s,
    stride_bt_b,
    stride_o_b, stride_o_h, stride_o_s,
    # -- meta-parameters
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_T: tl.constexpr,
    CAUSAL: tl.constexpr,
    HAS_KEY_START: tl.constexpr,
    HAS_KEY_END: tl.constexpr,
    PAGED: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    TMA: tl.constexpr,
    APPEND: tl.constexpr,
    DIRECT: tl.constexpr,
    PDL: tl.constexpr,
    SHARED_ROWS: tl.constexpr,
    WIDE_ROWS: tl.constexpr,
    PREFETCH: tl.constexpr,
    PREFETCH_LINES: tl.constexpr,
    PREFETCH_LINE_ELEMS: tl.constexpr,
    TABLE_AHEAD: tl.constexpr,
    TABLE_LINES: tl.constexpr,
    SHIFT_TAIL: tl.constexpr,
    TABLE_GUESS: tl.constexpr,
    INTERLEAVED: tl.constexpr,
    SORT_PAGES: tl.constexpr,
    EARLY_PREFETCH: tl.constexpr,
    GUESS_NEXT: tl.constexpr,
    BIAS_MASK: tl.constexpr,
    WRITE_FIRST: tl.constexpr,
    NEW_ROWS: tl.constexpr,
    SLOT_PAGES: tl.constexpr,
    TAIL_BRANCH: tl.constexpr,
    WAIT_LAST: tl.constexpr,
    ZERO_COUNTERS: tl.constexpr,
    FUSED_MERGE: tl.constexpr,
    BLOCK_SPLITS: tl.constexpr,
    MERGE_CHUNK: tl.constexpr,
    FIRST_IN_ORDER: tl.constexpr,
):
    split = tl.program_id(0)
    pid = tl.program_id(1) + group_base
    b = pid // num_kv_heads
    kv_h = pid % num_kv_heads
    bt_row = BlockTable + b.to(tl.int64) * stride_bt_b  # stride 0 when not PAGED
    # this program's slice as a full sequence places it (the lengths cannot be read before the wait)
    cap_chunk = _slice_keys(key_capacity, num_splits, BLOCK_N)
    guess_lo = split * cap_chunk
    if PAGED and TABLE_LINES > 0 and key_capacity > 0:
        # The block-table lines of this program's slice (placed as if every sequence were full:
        # the lengths cannot be read yet), asked of the L2 while the kernel before this one drains.
        # A hint only: it moves nothing into registers and stays inside the table.
        l2_prefetch(bt_row + tl.minimum(guess_lo // page_size + tl.arange(0, TABLE_LINES) * 32, max_pages_per_seq - 1))
    if SORT_PAGES > 0 and not FIRST_IN_ORDER:
        # The order to visit the slice's pages in, worked out while the kernel before this one
        # drains, from the table as it reads now (compared with the table after the wait): pool
        # order, so every program sweeps the pool from low to high addresses at about the same
        # pace (randomly placed 16-key pages, 1x32/8x32768x128: 48.8 -> 47.5 us on the H100, NOTES.md
        # twelfth round). FIRST_IN_ORDER (D <= 64): after the first block's hints, below, that
        # block kept in table order, so the hints do not wait on the sort (8x32/4x8192x64: 26.2-26.3
        # -> 25.9-26.1 us, NOTES.md thirtieth round).
        visit_slots, slot_in, seen_entries, visit_entries, visit_first = _visit_plan(
            bt_row, guess_lo, cap_chunk, page_size, num_pages, max_pages_per_seq, 0, BLOCK_N, SORT_PAGES)
    if EARLY_PREFETCH:
        # One program per SM (its shared memory takes more than half of one): it starts as the
        # program before it on this SM ends, so the rows of its first block (as a full sequence
        # places it) are asked of the L2 now, while the kernel before drains and DRAM idles
        # (1x32/8x32768x128 paged: 49.4 -> 47.5 us, NOTES.md eleventh round; 8x32/4x8192x64
        # contiguous 25.8 -> 24.9, twelfth; with programs sharing an SM it starts too early and
        # cost 1 us). Hints only, inside the cache (`page_rows`, positions clamped to the capacity).
        offs_t = tl.arange(0, BLOCK_N)
        first_pos = tl.minimum((split * BLOCK_N if INTERLEAVED else guess_lo) + offs_t, key_capacity - 1)
        if PAGED:
            if SORT_PAGES > 0 and not FIRST_IN_ORDER:
                first_pages = visit_first
            else:
                first_pages = tl.load(bt_row + first_pos // page_size, cache_modifier=".cg")
            k_rows, _ = page_rows(first_pages, first_pos, stride_k_b, stride_k_s, page_size, num_pages, WIDE_ROWS)
            v_rows = k_rows
            if not SHARED_ROWS:
                v_rows, _ = page_rows(first_pages, first_pos, stride_v_b, stride_v_s, page_size, num_pages, WIDE_ROWS)
        else:
            k_rows = first_pos * stride_k_s
            v_rows = first_pos * stride_v_s
        prefetch_rows_to_l2(kv_head_base(K, b, kv_h, stride_k_b, stride_k_h, PAGED),
                            kv_head_base(V, b, kv_h, stride_v_b, stride_v_h, PAGED), k_rows, v_rows, PREFETCH_LINES,
                            PREFETCH_LINE_ELEMS)
    if SORT_PAGES > 0 and FIRST_IN_ORDER:
        visit_slots, slot_in, seen_entries, visit_entries, visit_first = _visit_plan(
            bt_row, guess_lo, cap_chunk, page_size, num_pages, max_pages_per_seq, BLOCK_N // page_size, BLOCK_N,
            SORT_PAGES)
    if PDL:
        # launched early (programmatic dependent launch): wait for the kernels before this one,
        # then let the next kernel launch (once every program here has passed this point) and
        # wait in its turn
        # (a tail launch, WAIT_LAST, waits only as it ends; ZERO_COUNTERS lets the next kernel
        # launch only after the lengths are asked for, below)
        if not WAIT_LAST:
            tl.extra.cuda.gdc_wait()
    zeroed = 0
    if ZERO_COUNTERS:
        # the tail launch's count of finished programs per group, zeroed here; the exchange returns
        # while the lengths are read, and the tail launch may start only after that (below)
        if tl.program_id(1) < tail_groups:
            zeroed = tl.atomic_xchg(Counters + tl.program_id(1), 0, sem="relaxed", scope="gpu")
    if PDL and not ZERO_COUNTERS:
        tl.extra.cuda.gdc_launch_dependents()
    # Paged: the table entries of this program's first block, at its slice start as if the sequence
    # were full (the lengths are being read next to them); the cache loop takes them when the guess
    # holds (always with one split), saving one table round trip before the first gathers.
    # (with a key start the slices do not start at the guess: nothing is read for it)
    USE_GUESS: tl.constexpr = PAGED and TABLE_AHEAD and TABLE_GUESS and not HAS_KEY_START
    guessed_pages = tl.zeros([BLOCK_N], dtype=tl.int32)
    if USE_GUESS:
        guess_pos = guess_lo + tl.arange(0, BLOCK_N)
        guessed_pages = page_entries(bt_row, guess_pos, guess_pos < key_capacity, page_size, max_pages_per_seq)
    # GUESS_NEXT: the second block's entries too, so its gathers need not wait on a table read
    # either (pools whose pages ascend through the pool, 8x32/4x8192x64: 25.7-26.0 -> 25.0 us on the
    # H100, level on random pages, NOTES.md thirteenth round)
    guessed_next = guessed_pages
    if USE_GUESS and GUESS_NEXT:
        guessed_next = page_entries(bt_row, guess_pos + BLOCK_N, guess_pos + BLOCK_N < key_capacity, page_size,
                                    max_pages_per_seq)
    if SORT_PAGES > 0:
        now_entries = tl.load(bt_row + visit_slots, mask=slot_in, other=-1, cache_modifier=".cg")
    if PREFETCH and not EARLY_PREFETCH and split == 0 and not HAS_KEY_START and key_capacity > 0 and num_pages > 0:
        # Split 0 starts at key 0 whatever the lengths: ask the L2 for its first block before
        # reading them, so the first bulk copies do not wait on that load (-0.4 to -0.6 us on
        # 67-134 MB caches, NOTES.md). Slots past the length are valid memory, merely unused.
        prefetch_kv_to_l2(kv_head_base(K, b, kv_h, stride_k_b, stride_k_h, PAGED),
                          kv_head_base(V, b, kv_h, stride_v_b, stride_v_h, PAGED),
                          bt_row,
                          tl.minimum(tl.arange(0, BLOCK_N), key_capacity - 1), stride_k_b, stride_k_s, stride_v_b,
                          stride_v_s, page_size, num_pages, max_pages_per_seq, PREFETCH_LINES, PREFETCH_LINE_ELEMS,
                          PAGED, SHARED_ROWS, WIDE_ROWS)

    q, h, query_index, row_ok = _packed_query(Q, b, kv_h, group_size, seqlen_q, stride_q_b, stride_q_h, stride_q_s,
                                              HEAD_DIM, BLOCK_M, BLOCK_D)

    key_start, key_end = key_range(KeyStart, KeyEnd, b, key_end_offset, key_capacity, HAS_KEY_START, HAS_KEY_END)
    diag = key_end - seqlen_q
    if PDL and ZERO_COUNTERS:
        # the next launch (the tail) lets its programs count on zeroed counts: it launches once
        # every program here has passed the trigger, which waits on the exchange's return
        _launch_dependents_after(zeroed)
    if APPEND and (DIRECT or WRITE_FIRST or FUSED_MERGE):
        # fused append with one split (after the cache loop, below): this step's tokens are loaded
        # now, so their latency hides behind the cache stream instead of adding to the kernel's tail
        # (WRITE_FIRST: they are written before the loop, next to the first table and length reads)
        rows_t = tl.arange(0, BLOCK_T)
        pos_t, stored, k_new, v_new = load_new_tokens(
            KNew, VNew, KeyEnd, b, kv_h, rows_t, seqlen_new, key_capacity,
            stride_kn_b, stride_kn_h, stride_kn_s, stride_vn_b, stride_vn_h, stride_vn_s, HEAD_DIM, BLOCK_D)
    if APPEND and DIRECT and not WRITE_FIRST:
        # and where they go (paged: a table read), so the store at the end waits on no load
        # (NEW_ROWS: the loop gathers them from the inputs; they are only stored at the end)
        new_k_rows, new_k_ok, new_v_rows, new_v_ok = new_row_offsets(
            bt_row, pos_t, stored, stride_k_b, stride_k_s, stride_v_b, stride_v_s, page_size, num_pages,
            max_pages_per_seq, PAGED)

    # -- this program's slice of [key_start, key_end), in whole blocks
    span = tl.maximum(key_end - key_start, 0)
    chunk = _slice_keys(span, num_splits, BLOCK_N)
    lo = key_start + split * chunk
    hi = tl.minimum(lo + chunk, key_end)
    stride_blocks = 1
    if INTERLEAVED:
        # contiguous caches: split s takes blocks s, s + num_splits, ... of the whole range instead,
        # so the splits of a sequence stream neighbouring blocks at the same time (8x32/4x8192x64
        # 26.24 -> 25.82 us, 1x32/8x32768x128 47.43 -> 47.07 on the H100, NOTES.md)
        lo = key_start + split * BLOCK_N
        hi = key_end
        stride_blocks = num_splits

    k_base = kv_head_base(K, b, kv_h, stride_k_b, stride_k_h, PAGED)
    v_base = kv_head_base(V, b, kv_h, stride_v_b, stride_v_h, PAGED)

    # whole blocks that every packed row sees run unmasked; the tail (sequence end, causal
    # diagonal of a multi-token query) is masked
    cache_hi = hi
    cache_end = key_end
    if APPEND and WRITE_FIRST:
        # This step's tokens inside this program's slice are written into the pool before the loop
        # reads it, so the slice is read to its end like any other (the new tokens are not scored
        # apart, and a slice ending where they do runs unmasked); no other program's slice holds
        # them. The barrier orders the stores before the loop's loads by the program's other
        # threads; only programs that write anything wait on it. Split 0 also writes tokens before
        # the key start, which no program reads.
        tl.static_assert(not INTERLEAVED, "interleaved splits do not own one slice")
        mine = stored & (pos_t >= tl.where(split == 0, 0, lo)) & (pos_t < hi)
        if SLOT_PAGES > 0:
            # the sequence's whole table row, read next to the lengths (not after them), and the
            # slots' pages picked out of it: the store waits on one load, not two in a row (a
            # position past the row picks nothing, and lies past the capacity: not `mine`)
            slot_ids = tl.arange(0, SLOT_PAGES)
            row_entries = tl.load(bt_row + slot_ids, mask=slot_ids < max_pages_per_seq, other=-1)
            slot_pages = tl.sum(tl.where((pos_t // page_size)[:, None] == slot_ids[None, :], row_entries[None, :], 0), 1)
            new_k_rows, new_in_pool = page_rows(slot_pages, pos_t, stride_k_b, stride_k_s, page_size, num_pages, True)
            new_v_rows, _ = page_rows(slot_pages, pos_t, stride_v_b, stride_v_s, page_size, num_pages, True)
            new_k_ok = mine & new_in_pool
            new_v_ok = new_k_ok
        else:
            new_k_rows, new_k_ok, new_v_rows, new_v_ok = new_row_offsets(
                bt_row, pos_t, mine, stride_k_b, stride_k_s, stride_v_b, stride_v_s, page_size, num_pages,
                max_pages_per_seq, PAGED)
        if tl.max(mine.to(tl.int32), 0) > 0:
            store_new_rows(k_new, v_new, k_base, v_base, new_k_rows, new_k_ok, new_v_rows, new_v_ok, HEAD_DIM,
                           BLOCK_D)
            if TMA:
                async_proxy_fence(split)  # the loop's bulk copies read through the async proxy
            tl.debug_barrier()
    elif APPEND and NEW_ROWS:
        # One split on a paged pool: the sequence is read to its end, this step's tokens gathered
        # from the inputs (the loop picks their rows there by position), so nothing waits on
        # their store, which comes after the loop.
        tl.static_assert(DIRECT and PAGED and TABLE_AHEAD, "new rows are gathered by a lone paged program")
        new_lo = tl.load(KeyEnd + b)
    elif APPEND:
        # Fused append: cache slots from cache_seqlens[b] on are this step's new tokens, which
        # the merge kernel writes and attends to; here the slices stop before the first one
        # (the causal diagonal still counts them)
        new_lo = tl.load(KeyEnd + b)
        cache_hi = tl.maximum(tl.minimum(hi, new_lo), lo)
        cache_end = tl.minimum(key_end, new_lo)
    full_hi = _whole_blocks_end(lo, cache_hi, diag, CAUSAL, BLOCK_N)

    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    # Fused append of one token with one split: paged pools fold the new key in before the cache
    # loop, where its layout conversions overlap the first gathers (16x8/8x2048x64 append: 26.03 ->
    # 25.75 us on the H100); after the loop, bulk copies keep it out of their pipeline's start
    # (24.38 against 24.65-24.72 before it, NOTES.md sixteenth round)
    FOLD_FIRST: tl.constexpr = APPEND and DIRECT and BLOCK_T == 1 and PAGED and not WRITE_FIRST and not NEW_ROWS
    if FOLD_FIRST:
        acc, l_i, m_i = _fold_new_key(acc, l_i, m_i, q, k_new, v_new, stored, qk_scale)
    # Each loop below costs its software pipeline's fill and drain (H100: 0.2-0.3 us on 67 MB
    # contiguous caches, 0.7-2.5 us paged, NOTES.md), so a loop with nothing to do is skipped, and
    # a partial last block does not get a second loop where it can be helped. Bulk copies
    # (SHIFT_TAIL): one loop for the whole slice, its partial last block read as the block ending at
    # cache_hi (every key from 0 to there is a real one: no NaN garbage reaches V) and masked in the
    # scores only, where a masked V would cost a trip through registers in every iteration.
    # Paged gathers with a partial block at the end run the whole slice masked in one loop (masked
    # gathers cost no more).
    ONE_LOOP: tl.constexpr = TMA and SHIFT_TAIL and not HAS_KEY_START
    unmasked_hi = full_hi
    if ONE_LOOP:
        unmasked_hi = cache_hi
    elif TABLE_AHEAD:
        unmasked_hi = tl.where(cache_hi > full_hi, lo, full_hi)
    # the whole blocks [lo, unmasked_hi) unmasked, then the rest [unmasked_hi, cache_hi) masked
    # (ONE_LOOP: the first loop is the whole slice and no masked loop is compiled)
    if SORT_PAGES > 0:
        # The loop takes the pages in visiting order from registers (`tl.gather`; a scratch row
        # written behind a barrier cost 0.4-0.5 us more at D=128, NOTES.md thirtieth round) when the
        # table did not change since the order was worked out and the slice is the full-sequence one
        # with whole pages up to its last (only that one is masked by position, and it kept its place)
        stale = tl.max((now_entries != seen_entries).to(tl.int32), 0)
        sorted_ok = (stale == 0) & (lo == guess_lo) & (cache_hi > lo + cap_chunk - page_size)
        if APPEND and NEW_ROWS:
            # new tokens are picked by position, which the visiting order keeps on the last page only
            sorted_ok = sorted_ok & (new_lo >= lo + cap_chunk - page_size)
        guessed_pages = tl.where(sorted_ok, visit_first, guessed_pages)
    else:
        visit_entries = 0
        sorted_ok = False
    for MASKED in tl.static_range(1 if ONE_LOOP else 2):
        seg_lo = lo
        seg_hi = unmasked_hi
        if TAIL_BRANCH:
            # Bulk copies past one wave of programs at D <= 64, 64-key blocks: a slice of whole
            # blocks runs the unmasked loop; one whose last block is partial (lengths off a block
            # boundary) runs instead as a single loop reading that block as the one ending at
            # cache_hi (the SHIFT_TAIL loop, second pass here), not as a second, masked loop with
            # its own pipeline fill. Both loops are compiled and one runs: the shifted one on every
            # slice pays its scores' tile at full length (H100, NOTES.md twenty-eighth round).
            if MASKED:
                seg_hi = tl.where(full_hi < cache_hi, cache_hi, lo)
            else:
                seg_hi = tl.where(full_hi < cache_hi, lo, cache_hi)
        elif MASKED:
            # the first of this program's blocks at or after unmasked_hi: unmasked_hi itself when
            # the blocks are consecutive. The rounding is compiled for interleaved programs only:
            # a no-op elsewhere, it still made Triton 3.6 schedule the paged kernel 1.6 us slower
            # (8x32/4x8192x64, NOTES.md tenth round)
            seg_lo = unmasked_hi
            if INTERLEAVED:
                step = BLOCK_N * stride_blocks
                seg_lo = lo + tl.cdiv(tl.maximum(unmasked_hi - lo, 0), step) * step
            seg_hi = cache_hi
        if seg_hi > seg_lo:
            acc, l_i, m_i = online_softmax_blocks(
                acc, l_i, m_i, q, k_base, v_base, KDesc, VDesc, b, kv_h, bt_row, stride_k_b, stride_k_s, stride_v_b,
                stride_v_s, page_size, num_pages, max_pages_per_seq, query_index, key_start, cache_end, diag,
                seg_lo, seg_hi, qk_scale,
                HEAD_DIM, BLOCK_N, BLOCK_D, CAUSAL, MASKED == 1 and not TAIL_BRANCH, PAGED, DOT_PRECISION, TMA,
                SHARED_ROWS, WIDE_ROWS, TABLE_AHEAD, ONE_LOOP or (TAIL_BRANCH and MASKED == 1), guess_lo,
                guessed_pages, USE_GUESS, stride_blocks, guessed_next,
                USE_GUESS and GUESS_NEXT, BIAS_MASK, new_lo if APPEND and NEW_ROWS else 0,
                KNew + b.to(tl.int64) * stride_kn_b + kv_h * stride_kn_h,
                VNew + b.to(tl.int64) * stride_vn_b + kv_h * stride_vn_h,
                stride_kn_s, stride_vn_s, APPEND and NEW_ROWS, visit_entries, sorted_ok, SORT_PAGES > 0)
    if APPEND and DIRECT and not WRITE_FIRST and not NEW_ROWS and not FOLD_FIRST:
        # Fused append, one split: this program is its (sequence, KV head)'s only one, so it also
        # attends to this step's tokens (one token on a paged pool: before the loop, above) and
        # writes them into the cache after its own reads, as the merge kernel does when there are
        # splits.
        acc, l_i, m_i = _attend_new_tokens(acc, l_i, m_i, q, k_new, v_new, stored, rows_t, query_index, seqlen_new,
                                           seqlen_q, qk_scale, CAUSAL, BLOCK_T, DOT_PRECISION)
    if APPEND and DIRECT and not WRITE_FIRST:
        store_new_rows(k_new, v_new, k_base, v_base, new_k_rows, new_k_ok, new_v_rows, new_v_ok, HEAD_DIM, BLOCK_D)
    if DIRECT:
        # a single split: its normalised result is the output, no merge pass
        _store_output(Out, acc, l_i, b, h, query_index, row_ok, stride_o_b, stride_o_h, stride_o_s, HEAD_DIM, BLOCK_D)
    else:
        seen = l_i > 0.0
        out = acc / tl.where(seen, l_i, 1.0)[:, None]
        lse = tl.where(seen, m_i + tl.math.log2(tl.where(seen, l_i, 1.0)), float("-inf"))
        _store_partial(PartialOut, PartialLse, out, lse, b, h, query_index, row_ok, num_kv_heads * group_size,
                       seqlen_q, num_splits, split, HEAD_DIM, BLOCK_D)
        if FUSED_MERGE:
            # The last of this group's programs to end merges every split's result: all threads'
            # partial stores are ordered before the count (a barrier, then the one thread's release),
            # and the last one reads them past the L1 after its acquire. The counts were zeroed by
            # the launch before this one (ZERO_COUNTERS). Appending, the new tokens are one more key
            # block (the slices stopped before them), written into the cache here.
            tl.debug_barrier()
            done = tl.atomic_add(Counters + tl.program_id(1), 1, sem="acq_rel", scope="gpu")
            if done == num_splits - 1:
                first_partial = _first_partial(b, h, query_index, num_kv_heads * group_size, seqlen_q, num_splits)
                acc, l_i, m_i = _merge_partials(PartialOut, PartialLse, first_partial, row_ok, num_splits, HEAD_DIM,
                                                BLOCK_M, BLOCK_D, BLOCK_SPLITS, MERGE_CHUNK)
                if APPEND and not WRITE_FIRST:
                    acc, l_i, m_i = _attend_new_tokens(acc, l_i, m_i, q, k_new, v_new, stored, rows_t, query_index,
                                                       seqlen_new, seqlen_q, qk_scale, CAUSAL, BLOCK_T, DOT_PRECISION)
                    new_k_rows, new_k_ok, new_v_rows, new_v_ok = new_row_offsets(
                        bt_row, pos_t, stored, stride_k_b, stride_k_s, stride_v_b, stride_v_s, page_size, num_pages,
                        max_pages_per_seq, PAGED)
                    store_new_rows(k_new, v_new, k_base, v_base, new_k_rows, new_k_ok, new_v_rows, new_v_ok,
                                   HEAD_DIM, BLOCK_D)
                _store_output(Out, acc, l_i, b, h, query_index, row_ok, stride_o_b, stride_o_h, stride_o_s, HEAD_DIM,
                              BLOCK_D)
    if PDL and WAIT_LAST:
        # a tail launch (`_tail_groups`): it read only what the kernels before the one before it
        # wrote, and waits on that one only now, so the next kernel's wait covers both
        tl.extra.cuda.gdc_wait()


@triton.jit
def _decode_balanced_kernel(
    Q, K, V, KDesc, VDesc,  # contiguous caches; TMA descriptors of K and V when TMA (else unused)
    PartialOut, PartialLse, KeyEnd,
    num_groups,  # batch * num_kv_heads
    num_pieces,  # partial results per group in the buffers (`_balanced_pieces`)
    num_kv_heads, group_size, seqlen_q, key_capacity, key_end_offset, qk_scale,
    stride_q_b, stride_q_h, stride_q_s,
    stride_k_b, stride_k_h, stride_k_s,
    stride_v_b, stride_v_h, stride_v_s,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_KEY_END: tl.constexpr, DOT_PRECISION: tl.constexpr, TMA: tl.constexpr,
    APPEND: tl.constexpr, PDL: tl.constexpr, EARLY_PREFETCH: tl.constexpr, PREFETCH_LINES: tl.constexpr,
    PREFETCH_LINE_ELEMS: tl.constexpr,
    SEGMENTS: tl.constexpr,  # the most (sequence, KV head) groups one program's share touches
):
    """Stage 1 with the key blocks of all (sequence, KV head) groups shared out evenly (contiguous
    caches, `_balanced_pieces`): each group is P units wide (P programs), program p takes units
    [p * num_groups, (p + 1) * num_groups) of them all in group order, and of each group it touches
    the matching share of that sequence's key blocks (its lengths read on the device), as piece
    p - first(group) of that group's partial results (first(g) = g * P // num_groups).

    One whole-SM program per SM: each asks the L2 for its first block (as a full sequence places
    it) before the wait on the kernel before it, and reads a partial last block as the block
    ending at its slice's end (`online_softmax_blocks`' SHIFT_TAIL, TMA)."""
    p = tl.program_id(0)
    num_programs = tl.num_programs(0)
    unit_lo = p * num_groups
    unit_hi = unit_lo + num_groups
    first_group = unit_lo // num_programs
    ONE_LOOP: tl.constexpr = TMA
    if EARLY_PREFETCH:
        b0 = first_group // num_kv_heads
        h0 = first_group % num_kv_heads
        first_block = tl.cdiv(key_capacity, BLOCK_N) * (unit_lo - first_group * num_programs) // num_programs
        first_pos = tl.minimum(first_block * BLOCK_N + tl.arange(0, BLOCK_N), key_capacity - 1)
        prefetch_rows_to_l2(kv_head_base(K, b0, h0, stride_k_b, stride_k_h, False),
                            kv_head_base(V, b0, h0, stride_v_b, stride_v_h, False), first_pos * stride_k_s,
                            first_pos * stride_v_s, PREFETCH_LINES, PREFETCH_LINE_ELEMS)
    if PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    for piece in tl.static_range(SEGMENTS):
        g = first_group + piece
        # this program's units of group g, in [0, num_programs]
        a = tl.maximum(unit_lo, g * num_programs) - g * num_programs
        c = tl.minimum(unit_hi, (g + 1) * num_programs) - g * num_programs
        if (c > a) & (g < num_groups):
            b = g // num_kv_heads
            kv_h = g % num_kv_heads
            q, h, query_index, row_ok = _packed_query(Q, b, kv_h, group_size, seqlen_q, stride_q_b, stride_q_h,
                                                      stride_q_s, HEAD_DIM, BLOCK_M, BLOCK_D)
            key_start, key_end = key_range(KeyEnd, KeyEnd, b, key_end_offset, key_capacity, False, HAS_KEY_END)
            diag = key_end - seqlen_q
            blocks = tl.cdiv(key_end, BLOCK_N)
            lo = (blocks * a // num_programs) * BLOCK_N
            hi = tl.minimum((blocks * c // num_programs) * BLOCK_N, key_end)
            cache_hi = hi
            cache_end = key_end
            if APPEND:
                # this step's tokens are scored and written by the merge kernel (`attention_decode`)
                new_lo = tl.load(KeyEnd + b)
                cache_hi = tl.maximum(tl.minimum(hi, new_lo), lo)
                cache_end = tl.minimum(key_end, new_lo)
            unmasked_hi = cache_hi
            if not ONE_LOOP:
                unmasked_hi = _whole_blocks_end(lo, cache_hi, diag, CAUSAL, BLOCK_N)
            acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
            l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
            m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
            k_base = kv_head_base(K, b, kv_h, stride_k_b, stride_k_h, False)
            v_base = kv_head_base(V, b, kv_h, stride_v_b, stride_v_h, False)
            for MASKED in tl.static_range(1 if ONE_LOOP else 2):
                seg_lo = lo
                seg_hi = unmasked_hi
                if MASKED:
                    seg_lo = unmasked_hi
                    seg_hi = cache_hi
                if seg_hi > seg_lo:
                    acc, l_i, m_i = online_softmax_blocks(
                        acc, l_i, m_i, q, k_base, v_base, KDesc, VDesc, b, kv_h, K, stride_k_b, stride_k_s,
                        stride_v_b, stride_v_s, 1, 0, 0, query_index, key_start, cache_end, diag, seg_lo, seg_hi,
                        qk_scale, HEAD_DIM, BLOCK_N, BLOCK_D, CAUSAL, MASKED == 1, False, DOT_PRECISION, TMA, False,
                        False, False, ONE_LOOP)
            seen = l_i > 0.0
            out = acc / tl.where(seen, l_i, 1.0)[:, None]
            lse = tl.where(seen, m_i + tl.math.log2(tl.where(seen, l_i, 1.0)), float("-inf"))
            _store_partial(PartialOut, PartialLse, out, lse, b, h, query_index, row_ok, num_kv_heads * group_size,
                           seqlen_q, num_pieces, p - g * num_programs // num_groups, HEAD_DIM, BLOCK_D)


@triton.jit
def _decode_merge_kernel(
    PartialOut,
    PartialLse,
    Out,
    Q,  # APPEND only (else unused): the query, this step's K/V and the cache they go into
    KNew,
    VNew,
    KCache,
    VCache,
    CacheSeqlens,
    BlockTable,
    num_q_heads,
    group_size,
    seqlen_q,
    num_splits,
    seqlen_new,
    key_capacity,
    qk_scale,
    page_size: tl.constexpr,
    num_pages,
    max_pages_per_seq,
    stride_o_b, stride_o_h, stride_o_s,
    stride_q_b, stride_q_h, stride_q_s,
    stride_kn_b, stride_kn_h, stride_kn_s,
    stride_vn_b, stride_vn_h, stride_vn_s,
    stride_kc_b, stride_kc_h, stride_kc_s,
    stride_vc_b, stride_vc_h, stride_vc_s,
    stride_bt_b,
    balanced_programs,  # BALANCED: the grid of `_decode_balanced_kernel` (else unused)
    balanced_groups,  # BALANCED: the (sequence, KV head) groups it shared out (else unused)
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_SPLITS: tl.constexpr,
    BLOCK_T: tl.constexpr,
    CAUSAL: tl.constexpr,
    APPEND: tl.constexpr,
    PAGED: tl.constexpr,
    PDL: tl.constexpr,
    BALANCED: tl.constexpr,
):
    row = tl.program_id(0)  # flattened (b, h, i)
    i = row % seqlen_q
    h = (row // seqlen_q) % num_q_heads
    b = row // (seqlen_q * num_q_heads)
    offs_s = tl.arange(0, BLOCK_SPLITS)
    offs_d = tl.arange(0, BLOCK_D)
    s_ok = offs_s < num_splits
    if BALANCED:
        # this group's pieces: one from each program between the ones holding its first and last units
        g = b * (num_q_heads // group_size) + h // group_size
        first = g * balanced_programs // balanced_groups
        last = ((g + 1) * balanced_programs - 1) // balanced_groups
        s_ok = offs_s < last - first + 1
    d_ok = offs_d < HEAD_DIM
    if APPEND:
        # Fused append: this step's tokens are one more "split", scored here from the inputs (the
        # split kernel stopped before their slots) and written into the cache below. The inputs
        # come from kernels before the split kernel, which had waited for them before letting
        # this one launch: they are read before the wait on it.
        kv_h = h // group_size
        rows_t = tl.arange(0, BLOCK_T)
        q_row = tl.load(Q + b.to(tl.int64) * stride_q_b + h * stride_q_h + i * stride_q_s + offs_d, mask=d_ok,
                        other=0.0)
        pos_t, stored, k_new, v_new = load_new_tokens(
            KNew, VNew, CacheSeqlens, b, kv_h, rows_t, seqlen_new, key_capacity,
            stride_kn_b, stride_kn_h, stride_kn_s, stride_vn_b, stride_vn_h, stride_vn_s, HEAD_DIM,
            BLOCK_D)  # k_new, v_new: [BLOCK_T, BLOCK_D]
        # one program per (sequence, KV head), the one with h % group_size == 0 and i == 0,
        # writes the new tokens (an integer test: other programs' rows all fail it); where they
        # go is read now too (paged: the block table, also written before the split kernel)
        writer = rows_t + (h % group_size + i) * BLOCK_T < BLOCK_T
        bt_row = BlockTable + b.to(tl.int64) * stride_bt_b  # stride 0 when not PAGED
        new_k_rows, new_k_ok, new_v_rows, new_v_ok = new_row_offsets(
            bt_row, pos_t, stored & writer, stride_kc_b, stride_kc_s, stride_vc_b, stride_vc_s, page_size,
            num_pages, max_pages_per_seq, PAGED)
    if PDL:
        # the next kernel may launch at once: it waits for this one to end before it reads
        # anything (0.0-0.1 us on 8x32/4x8192x64, NOTES.md)
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()  # the split kernel's partial results
    lse = tl.load(PartialLse + row.to(tl.int64) * num_splits + offs_s, mask=s_ok, other=float("-inf"))
    partial = tl.load(PartialOut + (row.to(tl.int64) * num_splits + offs_s[:, None]) * HEAD_DIM + offs_d[None, :],
                      mask=s_ok[:, None] & d_ok[None, :], other=0.0)
    m = tl.max(lse, 0)
    if APPEND:
        visible = stored
        if CAUSAL:
            visible = visible & (rows_t <= i + seqlen_new - seqlen_q)
        scores = tl.sum(k_new.to(tl.float32) * q_row.to(tl.float32)[None, :], 1) * qk_scale
        scores = tl.where(visible, scores, float("-inf"))
        m_new = tl.max(scores, 0)
        p_new = tl.math.exp2(scores - tl.where(m_new == float("-inf"), 0.0, m_new))  # 0 where not visible
        m = tl.maximum(m, m_new)
    m_shift = tl.where(m == float("-inf"), 0.0, m)
    weight = tl.math.exp2(lse - m_shift)  # 0 for splits that saw nothing
    numerator = tl.sum(partial * weight[:, None], 0)
    total = tl.sum(weight, 0)
    if APPEND:
        scale_new = tl.math.exp2(m_new - m_shift)  # 0 when no new token is visible
        numerator += scale_new * tl.sum(p_new[:, None] * tl.where(visible[:, None], v_new.to(tl.float32), 0.0), 0)
        total += scale_new * tl.sum(p_new, 0)
        store_new_rows(k_new, v_new,
                       kv_head_base(KCache, b, kv_h, stride_kc_b, stride_kc_h, PAGED),
                       kv_head_base(VCache, b, kv_h, stride_vc_b, stride_vc_h, PAGED),
                       new_k_rows, new_k_ok, new_v_rows, new_v_ok, HEAD_DIM, BLOCK_D)
    out = numerator / tl.where(total > 0.0, total, 1.0)
    o_ptrs = Out + b.to(tl.int64) * stride_o_b + h * stride_o_h + i * stride_o_s + offs_d
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=d_ok)


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _split_count(programs: int, sm_count: int, past_one_wave: bool = False) -> int:
    """Splits of each (sequence, KV head) so the grid fills the SMs about once.

    One program per SM streaming with deep pipelining beat two or three (H100 sweeps, NOTES.md):
    no merge pass when ``programs`` already fills the GPU, and otherwise the fewest splits whose
    programs use >= 90% of a whole number of SM waves. ``past_one_wave``: grids of ``programs`` >=
    ``sm_count`` that leave many SMs with one program fewer than the others (< 88% of whole waves
    of SM-sized groups, such as 136 or 288 programs on 132 SMs) get the split count of 1-3 that
    evens them out best (16-bit caches of 84-336 MB on the H100, 136-320 programs: 70-95% ->
    85-97% of 3.0 TB/s, NOTES.md twenty-fifth round).
    """

    def use(splits: int) -> float:
        total = programs * splits
        return total / (sm_count * triton.cdiv(total, sm_count))

    if programs >= sm_count:
        if not past_one_wave or use(1) >= 0.88:
            return 1
        return max((1, 2, 3), key=lambda s: (use(s), -s))

    choices = range(max(1, sm_count // programs), triton.cdiv(2 * sm_count, programs) + 1)
    return next((s for s in choices if use(s) >= 0.9), max(choices, key=lambda s: (use(s), -s)))


@functools.lru_cache(maxsize=None)
def _config(batch: int, num_kv_heads: int, packed_rows: int, key_capacity: int, head_dim: int,
            dtype: torch.dtype, paged: bool, sm_count: int, interpret: bool, early_launch: bool = False,
            smem_per_sm: int = 228 * 1024, balance_waves: bool = True, wave_tiles: bool = True,
            key_balanced: bool = True) -> dict:
    """Tile sizes and the split count, from static information only (never from lengths).
    ``early_launch``: the split kernel launches before the kernel ahead of it ends (programmatic
    dependent launch); ``smem_per_sm``: shared memory bytes per SM; ``balance_waves``: grids of
    more programs than SMs chosen to spread evenly over them (`_split_count`, and the D <= 64
    paged tile below); ``wave_tiles``: D <= 64 grids of 1.15 to 2.5 waves of programs (contiguous)
    or 2 to 2.5 (paged) take one split of 64-key blocks instead, and contiguous caches read by
    pointer loads past one wave 128-key blocks; ``key_balanced``: contiguous 16-bit caches at D=64 or
    128, launched early, where `_key_balanced` says so, get one whole-SM program per SM sharing all
    key blocks out evenly (``BALANCED``: that many programs)."""
    block_d = max(16, next_power_of_2(head_dim))
    block_m = max(16, next_power_of_2(packed_rows))
    # paged 16-bit pools read the block table one key block ahead (float32 ones measured faster
    # with synchronous gathers, see below)
    table_ahead = paged and dtype != torch.float32
    if interpret:
        block_n = 16
        num_splits = min(4, triton.cdiv(key_capacity, block_n))
        return dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, NUM_SPLITS=max(1, num_splits),
                    TABLE_AHEAD=table_ahead, num_warps=4, num_stages=1)
    warps = 4
    programs = batch * num_kv_heads
    wide = dtype == torch.float32 or block_d > 128  # 4-byte elements or long rows: small blocks
    if key_balanced and early_launch and not paged and not wide and 64 <= block_d == head_dim and _key_balanced(
            programs, sm_count, block_d):
        block_n = next((n for n in (64, 128, 256) if _whole_sm(3, n, block_d, dtype.itemsize, smem_per_sm)), 0)
        if block_n and key_capacity >= 2 * block_n:
            return dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, NUM_SPLITS=1, TABLE_AHEAD=False,
                        num_warps=warps, num_stages=3, BALANCED=sm_count)
    # about one program per SM with three stages (two were 1% faster on full B=32, H_kv=8
    # contiguous caches but 9% slower on ragged ones, whose last long sequences stream alone)
    # (contiguous caches read by pointer loads, D not a power of two, measured faster unsplit)
    num_splits = _split_count(programs, sm_count, balance_waves and not wide and (paged or block_d == head_dim))
    stages = 2 if wide else 3
    block_n = 32 if wide else 128 if block_d <= 64 else 64
    if table_ahead:
        # gathers with the table read a block ahead pipeline like the bulk copies: three stages
        # (two leave a single buffer), 128-key blocks up to D=128 (H100 sweeps, NOTES.md)
        stages = 3
        if not wide:
            block_n = 128
        if balance_waves and not wide and block_d <= 64 and sm_count < programs <= 2 * sm_count:
            # D <= 64 between one and two waves of programs: no splits (the merge costs more than
            # the uneven waves up to 1.5 programs per SM), and from 1.5 on 64-key blocks with four
            # stages (H100, 56-64x32/4x2048x64 and 28-32x32/8x2048x64: 75-81% -> 87-91% of
            # 3.0 TB/s, NOTES.md twenty-fifth round)
            num_splits = 1
            if 2 * programs > 3 * sm_count:
                block_n, stages = 64, 4
        if wave_tiles and not wide and block_d <= 64 and 2 * sm_count < programs <= 2.5 * sm_count:
            # and from two to 2.5 waves, 64-key blocks with three stages and no splits (H100,
            # 36-40x32/8x2048x64: 88-89% -> 90-93%, NOTES.md twenty-sixth round)
            num_splits, block_n, stages = 1, 64, 3
    elif paged:
        # float32 pools: synchronous gathers, ~3 programs per SM to keep loads in flight (2-5% faster
        # than the table read ahead there)
        num_splits, stages = triton.cdiv(3 * sm_count, programs), 2
    elif wave_tiles and not wide and block_d == head_dim <= 64 and 1.15 * sm_count <= programs <= 2.5 * sm_count:
        # contiguous caches at D <= 64 from 1.15 to 2.5 waves of programs: 64-key blocks and no
        # splits, four stages up to 1.4 waves and three from there (H100, 19-22x32/8x2048x64:
        # 85-87% -> 85-90% of 3.0 TB/s; 24-40x32/8x2048x64, 28x32/8x4096x64, 36x32/8x8192x64,
        # 72x32/4x2048x64: 89-96% -> 91-101%; at 2.67 waves 94 -> 77%, NOTES.md twenty-sixth round)
        num_splits, block_n = 1, 64
        if programs < 1.4 * sm_count:
            stages = 4
    elif wave_tiles and not wide and block_d != head_dim and programs >= sm_count:
        # contiguous caches read by pointer loads (D not a power of two) past one wave of programs:
        # 128-key blocks (H100, 8-16x32/32x4096x96, Phi-3-mini: 88-85% -> 98-100% of 3.0 TB/s;
        # 8x32/32x4096x80 74 -> 86%; level at one wave, NOTES.md twenty-sixth round)
        block_n = 128
    # never slices shorter than two blocks
    num_splits = max(1, min(num_splits, triton.cdiv(key_capacity, 2 * block_n), 128))
    if early_launch and not wide and (table_ahead or not paged) and batch * num_kv_heads * num_splits <= sm_count:
        # One wave of programs launched early: blocks large enough that each program takes a whole
        # SM, so it starts only as the program before it there ends, and its first block asked of
        # the L2 before the wait then fills DRAM while the kernel before drains (EARLY_PREFETCH;
        # H100, 8x32/4x8192x64: contiguous 25.8 -> 24.9 us, paged 26.9 -> 26.3; the same blocks
        # without the hint 0.4-1.4 us slower than the smaller ones, NOTES.md twelfth round).
        # Slices keep two blocks at least.
        block_n = next((n for n in (block_n, 2 * block_n) if _whole_sm(stages, n, block_d, dtype.itemsize, smem_per_sm)
                        and key_capacity >= 2 * n * num_splits), block_n)
    return dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, NUM_SPLITS=num_splits, TABLE_AHEAD=table_ahead,
                num_warps=warps, num_stages=stages)


# Stage 1 reads K/V through TMA descriptors where kv_descriptors allows (Hopper, contiguous cache)
DECODE_TMA = True
# CUDA: split 0 of each sequence asks the L2 for its first key block before reading the lengths
DECODE_PREFETCH = True
# Hopper and newer: launch both kernels with programmatic dependent launch, so each one's launch
# overlaps the tail of the kernel before it (each waits on it before reading anything)
DECODE_PDL = True
# Paged caches: read the block-table entries of each program's first block at the capacity-based
# guess of its slice start right after the wait, next to the lengths (used when the guess holds)
DECODE_TABLE_GUESS = True
# Paged caches, one wave of whole-SM split programs not sorting their pages: the second block's
# entries are read next to the lengths too (the first table read of the loop skipped)
DECODE_TABLE_GUESS_NEXT = True
# Paged caches: ask the L2 for each program's block-table lines before waiting on the kernel before
DECODE_TABLE_PREFETCH = True
# Bulk copies: a partial last block read as the whole block ending at the slice's end, in the
# main pipelined loop (one pipeline, not a second masked loop)
DECODE_SHIFT_TAIL = True
# Bulk copies past one wave of programs at D <= 64 in 64-key blocks: a slice whose last block is
# partial runs as one loop reading that block as the one ending at the slice's end (SHIFT_TAIL), a
# slice of whole blocks unmasked; both loops compiled, one run (`_decode_split_kernel`'s
# TAIL_BRANCH). H100, lengths off a block boundary, 160-256 programs: 0.4-0.9 us faster
# (20x32/8x2048x64 84.7 -> 86.9% of 3.0 TB/s); whole blocks level to 0.15 slower (NOTES.md
# twenty-eighth round)
DECODE_TAIL_BRANCH = True
# Contiguous caches with splits: split s takes key blocks s, s + splits, ... instead of one slice
# (paged pools keep slices: interleaved blocks measured slower there, NOTES.md)
DECODE_INTERLEAVED = True

# Paged 16-bit pools, one wave of programs with programmatic dependent launch: each program visits
# its slice's pages in pool order, worked out before the wait on the kernel before it (`_sort_pages`)
DECODE_SORT_PAGES = True
# One wave of programs launched early (contiguous caches, 16-bit pools): blocks that make each
# program take a whole SM, and every program asks the L2 for its first block before the wait on
# the kernel before it (else split 0 asks after it)
DECODE_EARLY_PREFETCH = True
# ... and past one wave of programs too, where they take a whole SM (16-bit pools at D=128, 136-512
# programs: 0.4-1.4 us faster on the H100; contiguous caches and D=64 pools level, NOTES.md
# twenty-eighth round): each asks for its first block as it starts, before its wait
DECODE_EARLY_PAST_WAVE = True
# Paged 16-bit pools at D <= 64 read a block ahead, no causal diagonal: the masked loop (a slice whose
# last block is partial, as at most lengths) hides keys past the length by the tile the dot starts
# from, not by a select after it (H100, 8x32/4x8192x64 appending step 26.5 -> 26.3 us; 0.6-0.9 us
# slower at D=128, NOTES.md twenty-first round)
DECODE_BIAS_MASK = True
# Appending (paged 16-bit pools read a block ahead; contiguous caches with one split and more
# programs than SMs): the program whose slice holds this step's tokens writes them into the cache
# before reading it, and reads the slice to its end (the merge kernel, or with one split the
# program itself, then neither scores nor writes them separately)
DECODE_WRITE_FIRST = True
# Appending with one wave of one-split programs on paged 16-bit pools read a block ahead, at
# D <= 64: each program gathers this step's tokens from the inputs, not from their slots, reads
# the sequence to its end, and stores them after its loop (no store and barrier before the loop,
# as writing first needs)
DECODE_NEW_ROWS = True
# Paged pools at D > 64 writing first with one split past one wave, table rows of <= 256 entries:
# the new tokens' pages picked out of the whole row, read next to the lengths
DECODE_SLOT_PAGES = True
# More programs than SMs: split counts and (D <= 64 paged pools) tiles that spread them evenly
DECODE_BALANCED_WAVES = True
# D <= 64 grids of 1.15-2.5 waves of programs (contiguous caches) or 2-2.5 (paged pools): one
# split of 64-key blocks; contiguous caches read by pointer loads past one wave: 128-key blocks
DECODE_WAVE_TILES = True
# Contiguous caches whose (sequence, KV head) groups whole splits cannot spread over one wave of
# SMs, launched early: key blocks shared out evenly over one whole-SM program per SM
# (`_key_balanced`, `_decode_balanced_kernel`)
DECODE_KEY_BALANCED = True


# 16-bit caches just past one wave of (sequence, KV head) groups, launched early (`_tail_groups`):
# one whole-SM program for each of the first sm_count groups, writing its output directly, and the
# groups left over split into short slices by a second launch whose programs run beside the
# first wave's and merge their own results (the last of a group's programs to end, on counts the
# first launch zeroes). H100 (NOTES.md twenty-ninth round): 136-160 groups at D=64 and 136-192
# at D=128 paged, 136-160 at D=64 and 136 at D=128 contiguous, 82-88% -> 88-101% of 3.0 TB/s
DECODE_TAIL_LAUNCH = True
# under the interpreter (one SM): the groups of the tail launch's first wave (0: no tail launch)
TAIL_INTERPRET_WAVE = 0
# fp32 elements of partial results a merging program holds at once (64 registers a thread at 4 warps)
MERGE_TILE_ELEMS = 8192


def _tail_groups(groups: int, sm_count: int, cfg: dict, paged: bool, element_size: int, early_hint: bool,
                 no_key_start: bool) -> int:
    """Groups left to a second stage-1 launch past the first ``sm_count`` ones (0: one launch).

    16-bit caches up to D=128 launched early (the second launch's programs start beside the
    first's, which take more than half an SM's shared memory: two of them fit at D <= 64, one
    at D=128), no key start, from one wave of groups to 1.22 waves at D <= 64 and, at D=128, 1.5
    waves on pools or 1.1 on contiguous caches (past those, measured level or slower: H100,
    21x32/8x2048x64 (168 groups), contiguous 19-20x32/8x4096x128 and 24x32/8x2048x128, NOTES.md
    twenty-ninth round). Pools: those read a block ahead (16-bit)."""
    layout_ok = cfg["TABLE_AHEAD"] if paged else element_size == 2
    if not (layout_ok and early_hint and no_key_start and cfg["BLOCK_D"] <= 128):
        return 0
    waves = 1.22 if cfg["BLOCK_D"] <= 64 else 1.5 if paged else 1.1
    return groups - sm_count if sm_count < groups <= waves * sm_count else 0


def _tail_config(cfg: dict, key_capacity: int, wave: int, tail: int, interpret: bool = False) -> dict:
    """Tiles and split count of the tail launch (`_tail_groups`): 64-key blocks at D <= 64 and 32
    at D=128, three stages, and eight slices a group where eight times the tail's groups fit
    beside the first wave at once (two programs an SM at D <= 64, one at D=128), else four
    (H100: four, eight and sixteen slices at 136-192 groups, S=2048-8192, NOTES.md twenty-ninth
    round); slices of two blocks at least (16-key blocks under the interpreter)."""
    narrow = cfg["BLOCK_D"] <= 64
    block_n = 16 if interpret else 64 if narrow else 32
    pieces = 8 if tail * 8 <= (2 if narrow else 1) * wave else 4
    splits = max(1, min(pieces, triton.cdiv(key_capacity, 2 * block_n)))
    return dict(BLOCK_M=cfg["BLOCK_M"], BLOCK_N=block_n, BLOCK_D=cfg["BLOCK_D"], NUM_SPLITS=splits,
                TABLE_AHEAD=cfg["TABLE_AHEAD"], num_warps=4, num_stages=3)


def _partials(q: torch.Tensor, num_splits: int):
    """Stage 1's partial outputs [B, H_q, S_q, num_splits, D] and log-sum-exps [B, H_q, S_q, num_splits]."""
    batch, num_q_heads, seqlen_q, head_dim = q.shape
    return (torch.empty((batch, num_q_heads, seqlen_q, num_splits, head_dim), dtype=torch.float32, device=q.device),
            torch.empty((batch, num_q_heads, seqlen_q, num_splits), dtype=torch.float32, device=q.device))


def _key_balanced(groups: int, sm_count: int, block_d: int) -> bool:
    """Whether a contiguous cache's (sequence, KV head) groups take `_decode_balanced_kernel`: one
    whole-SM program per SM, each an equal share of all groups' key blocks.

    Where whole splits (`_split_count`) cannot spread the groups evenly: one split per group that
    leaves more than 10% of the SMs idle, split grids past one wave that are not whole waves, and
    groups just past one wave (up to 1.16 waves at D=64, where the 64-key tiles of `_config` take
    over, and 1.5 at D=128; the two launches of `_tail_groups`, where they apply, take precedence).
    H100, contiguous caches, lengths off a block boundary and appending steps (NOTES.md
    twenty-seventh round): 96 and 112 groups at S=4096, D=128 (one split, 73% and 85% of the SMs)
    89% -> 96% and 94% -> 97% of 3.0 TB/s; 28-80 groups in 1.6-1.9 waves of splits
    75-89% -> 81-93%; 136-152 groups at D=64 81-85% -> 86-88%, 136-192 at D=128 89-96% -> 92-98%;
    level or better at full length. One wave of several splits per group (24, 40 and 56 groups),
    two whole waves (88) and 160 groups at D=64 measured slower.
    """
    if groups <= sm_count:
        splits = _split_count(groups, sm_count)
        total = groups * splits
        if total <= sm_count:
            return splits == 1 and total < 0.9 * sm_count
        return total % sm_count != 0
    return groups < (1.16 if block_d <= 64 else 1.5) * sm_count


def _capacity_slice_keys(key_capacity: int, num_splits: int, block_n: int) -> int:
    """Keys of each split's slice of a full sequence, in whole blocks (`_slice_keys` in the kernel)."""
    return triton.cdiv(triton.cdiv(key_capacity, num_splits), block_n) * block_n


def _sort_pages(early: bool, lone_or_tail: bool, has_key_start: bool, diagonal_in_cache: bool, key_capacity: int,
                num_splits: int, block_n: int, block_d: int, page_size: int, num_pages: int,
                interpret: bool = False) -> int:
    """Table entries each program sorts to visit its pages in pool order (`_visit_order`), a power
    of two covering the slice a full sequence gives it; 0 for none. None: the flag off; no early
    start to hide the sort in (``early``: a pool read a block ahead, 16-bit, with one wave of
    programs launched early); at D <= 64 one split appending, or the first launch of a tail launch
    (``lone_or_tail``), where it does not pay (the interpreter sorts there too, to test it); a key
    start or a causal diagonal inside the cache (masks by position on pages other than the last);
    pages that do not tile a key block; more than 256 pages a slice; sort keys past 31 bits.

    Visiting the pages in pool order, H100: at D=128 1x32/8x32768x128 48.8 -> 47.3 us; at D=64,
    8x32/4x8192x64 26.2-26.3 -> 25.9-26.1 and 16x8/8x2048x64 at full length 25.1-25.3 -> 24.8, but
    appending with one split 25.2 -> 25.7 and 17x32/8x2048x64's first launch 26.9 -> 27.3; pools whose
    rows already ascend (`paged_read_order`) lose 0.4 at 8x32/4x8192x64 (NOTES.md twelfth and
    thirtieth rounds)."""
    if (not (DECODE_SORT_PAGES and early) or (lone_or_tail and block_d <= 64 and not interpret) or has_key_start
            or diagonal_in_cache or block_n % page_size):
        return 0
    slice_pages = _capacity_slice_keys(key_capacity, num_splits, block_n) // page_size
    entries = max(2, next_power_of_2(slice_pages))
    return entries if entries <= 256 and (num_pages + 3) * entries < 2**31 else 0


def _whole_sm(num_stages: int, block_n: int, block_d: int, element_size: int, smem_per_sm: int) -> bool:
    """Whether one split program's K/V buffers (``num_stages - 1`` blocks of K and of V in flight)
    take more than half of an SM's shared memory, so no program of the next kernel fits beside it."""
    return 2 * (num_stages - 1) * block_n * block_d * element_size * 2 > smem_per_sm


@functools.lru_cache(maxsize=None)
def _smem_per_sm(device_index: int) -> int:
    props = torch.cuda.get_device_properties(device_index)
    return getattr(props, "shared_memory_per_multiprocessor", 228 * 1024)


def _prefetch_lines(head_dim: int, element_size: int) -> dict:
    """128-byte L2 lines per K/V row (a power of two, at most the row) and the elements in each."""
    line_elems = max(1, 128 // element_size)
    lines = max(1, head_dim // line_elems)
    return dict(PREFETCH_LINES=1 << (lines.bit_length() - 1), PREFETCH_LINE_ELEMS=line_elems)


def _table_lines(key_capacity: int, num_splits: int, block_n: int, page_size: int) -> int:
    """128-byte lines of block-table entries (32 int32) covering one program's slice (`_slice_keys`
    of the capacity), a power of two (one more line for a slice that starts mid-line), at most 64."""
    slice_keys = _capacity_slice_keys(key_capacity, num_splits, block_n)
    return min(64, next_power_of_2(triton.cdiv(triton.cdiv(slice_keys, page_size), 32) + 1))


def decode_packed_rows(num_q_heads: int, num_kv_heads: int, seqlen_q: int) -> int:
    """Rows of the packed (query heads of a group x query tokens) tile."""
    return (num_q_heads // num_kv_heads) * seqlen_q


def attention_decode(q, k, v, out, key_start, key_end, key_end_offset, block_table, causal, scale,
                     k_new=None, v_new=None):
    """Launch split-KV decode. Same arguments as `attention_forward`, plus the fused append.

    k_new, v_new: [B, H_kv, S_q, D] or None. When given, ``key_end`` is ``cache_seqlens`` and
    ``key_end_offset`` is S_q: the split kernel reads the cache up to ``cache_seqlens[b]``, and the
    merge kernel (the split kernel itself when there is one split) attends to the new tokens from
    the inputs and writes them into the cache at ``cache_seqlens[b] + t`` (masked like
    `append_kv`): no separate launch, no re-read.
    """
    batch, num_q_heads, seqlen_q, head_dim = q.shape
    num_kv_heads = k.shape[1]
    # one query token sees every key in its range: the causal mask is that range already
    causal = causal and seqlen_q > 1
    paged = block_table is not None
    append = k_new is not None
    geometry = kv_geometry(k, block_table)
    num_pages, page_size, max_pages_per_seq, key_capacity, stride_bt_b = geometry
    interpret = interpreting()
    sm_count = 1 if interpret or q.device.type != "cuda" else _sm_count(q.device.index or 0)
    pdl = DECODE_PDL and not interpret and device_capability(q.device)[0] >= 9
    l2_hints = not interpret and q.device.type == "cuda" and torch.version.hip is None  # PTX prefetches
    early_hint = DECODE_EARLY_PREFETCH and pdl and l2_hints and key_capacity > 0 and num_pages > 0
    smem = _smem_per_sm(q.device.index or 0) if early_hint else 0
    cfg = _config(batch, num_kv_heads, decode_packed_rows(num_q_heads, num_kv_heads, seqlen_q), key_capacity,
                  head_dim, q.dtype, paged, sm_count, interpret, early_hint, smem, DECODE_BALANCED_WAVES,
                  DECODE_WAVE_TILES, DECODE_KEY_BALANCED and key_start is None)
    dummy = key_end if key_end is not None else q  # never read when its flag is off
    new_k, new_v = (k_new, v_new) if append else (k, v)
    groups = batch * num_kv_heads
    merge = functools.partial(_merge, out, q, new_k, new_v, k, v, dummy, block_table, geometry, scale,
                              cfg["BLOCK_D"], causal, pdl)
    # the interpreter (one SM) tests the tail launch with as many groups in its first wave as it is told
    wave = TAIL_INTERPRET_WAVE if interpret else sm_count
    tail = (_tail_groups(groups, wave, cfg, paged, q.element_size(), early_hint or (interpret and wave > 0),
                         key_start is None) if DECODE_TAIL_LAUNCH else 0)
    # stage 1 may share all key blocks out evenly (`_config`: contiguous caches, no key start)
    balanced = cfg.get("BALANCED", 0) if not paged and key_start is None and not tail else 0
    if balanced:
        cfg = {key: value for key, value in cfg.items() if key not in ("BALANCED", "NUM_SPLITS", "TABLE_AHEAD")}
        num_splits = _balanced_pieces(balanced, groups)
        partial_out, partial_lse = _partials(q, num_splits)
        descriptors = kv_descriptors(k, v, block_table, cfg["BLOCK_N"], cfg["BLOCK_D"]) if DECODE_TMA else None
        _decode_balanced_kernel[(balanced,)](
            q, k, v, *(descriptors or (k, v)), partial_out, partial_lse, dummy,
            groups, num_splits, num_kv_heads, num_q_heads // num_kv_heads, seqlen_q, key_capacity,
            key_end_offset, scale * LOG2_E,
            q.stride(0), q.stride(1), q.stride(2),
            k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2),
            HEAD_DIM=head_dim, CAUSAL=causal, HAS_KEY_END=key_end is not None, DOT_PRECISION=dot_precision(q.dtype),
            TMA=descriptors is not None, APPEND=append, PDL=pdl, EARLY_PREFETCH=early_hint,
            **_prefetch_lines(head_dim, k.element_size()),
            SEGMENTS=triton.cdiv(groups - 1, balanced) + 1,
            **cfg,
            **({"launch_pdl": True} if pdl else {}),
        )
        merge(partial_out, partial_lse, num_splits, append, balanced_programs=balanced, balanced_groups=groups)
        return

    def split_pass(cfg, group_count, group_base, wait_last, tail_groups=0, counters=None):
        """Stage 1 over ``group_count`` (sequence, KV head) groups from ``group_base`` on, with the
        tiles and split count of ``cfg``; ``wait_last``: waits on the kernel before only as it ends
        (see `_tail_groups`). Returns the split count, the partial results and whether the new
        tokens were written here."""
        cfg = {key: value for key, value in cfg.items() if key != "BALANCED"}
        num_splits = cfg.pop("NUM_SPLITS")
        direct = num_splits == 1  # stage 1 writes the output (and, appending, the new tokens)
        partial_out, partial_lse = (out, out) if direct else _partials(q, num_splits)
        descriptors = kv_descriptors(k, v, block_table, cfg["BLOCK_N"], cfg["BLOCK_D"]) if DECODE_TMA else None
        # the tail launch merges its own splits (the last of a group's programs to end), on counters
        # this launch's programs zero
        fused_merge = wait_last and counters is not None and not direct
        splits_tile = max(2, next_power_of_2(num_splits))
        merge_chunk = min(splits_tile, max(1, MERGE_TILE_ELEMS // (cfg["BLOCK_M"] * cfg["BLOCK_D"])))
        bias_mask = DECODE_BIAS_MASK and paged and cfg["TABLE_AHEAD"] and cfg["BLOCK_D"] <= 64 and not causal
        interleaved = DECODE_INTERLEAVED and not paged and not direct
        fits_sms = group_count * num_splits <= sm_count  # one wave of programs
        # One wave of lone programs at D <= 64 on paged pools read a block ahead, causal or not: each
        # gathers the new tokens from the inputs by position and stores them after its loop, with no
        # store and barrier ahead of its first loads (H100 appending steps against writing first:
        # 16x8/8x2048x64 25.22-25.44 -> 25.04-25.21 us, the cost of full length; at D=128, with
        # splits and past one wave it lost 0.25-3.2, NOTES.md twenty-fifth round). The interpreter
        # (one SM) tests it past one wave too.
        new_rows = (DECODE_NEW_ROWS and append and paged and cfg["TABLE_AHEAD"] and direct
                    and (fits_sms or interpret) and cfg["BLOCK_D"] <= 64)
        # Elsewhere, the new tokens written before the slice holding them is read (one split, or the slices of
        # paged pools; not under a causal diagonal, which would then lie inside the cache read, where
        # the pool-order visit needs every page but a slice's last one unmasked). It delays the
        # writing program's first loads by the store (after the slot's table read, paged) and a
        # barrier, which pays where the other path costs more: on paged pools read a block ahead,
        # except for split programs whose masked slice costs little (the bias tile); on contiguous
        # caches with one split, where other programs on the same SM stream meanwhile (more programs
        # than SMs). H100 appending steps: 1x32/8x32768x128 paged -0.3 us, one split paged -0.1 to
        # -0.55, contiguous -1.1 to -1.5; 8x32/4x8192x64 paged +0.06, 16x8/8x2048x64 contiguous +0.17
        # (NOTES.md twenty-third round). Not with the four-stage pipeline of 64-key blocks that D <= 64
        # pools take past 1.5 waves of programs (`_config`), where it cost 2.2-3.2 us against scoring
        # the new token apart (28x32/8x2048x64, 56-64x32/4x2048x64, NOTES.md twenty-sixth round).
        write_first = DECODE_WRITE_FIRST and append and not causal and not new_rows and (
            (paged and cfg["TABLE_AHEAD"] and (direct or not bias_mask) and cfg["num_stages"] <= 3)
            or (not paged and direct and not fits_sms))
        # One split past one wave of programs writing first at D > 64 into a pool whose table rows
        # hold <= 256 entries: the whole row is read next to the lengths and the new tokens' pages
        # picked out of it, so their store waits on one load instead of the lengths' and then the
        # table's (H100 appending steps, 28x32/8x2048x128, 64x32/8x2048x128, 32x32/8x4096x128,
        # 5x32/32x4096x96: -0.4 to -1.2 us; +0.1 with one wave, +0.25 to +2 at D=64, +0.5 at
        # 17x32/8x2048x128 with splits, NOTES.md twenty-sixth round). The interpreter tests it everywhere.
        slot_pages = (max(2, next_power_of_2(max_pages_per_seq)) if DECODE_SLOT_PAGES and write_first and paged
                      and max_pages_per_seq <= 256
                      and ((direct and not fits_sms and cfg["BLOCK_D"] > 64) or interpret) else 0)
        # the split kernel's own new tokens: written first or gathered by the loop (stored only), or
        # with one split one key folding in elementwise, several forming a tl.dot operand (>= 16 rows)
        seqlen_new = new_k.shape[2]
        block_t = (next_power_of_2(seqlen_new) if write_first or new_rows
                   else 1 if append and seqlen_new == 1 else max(16, next_power_of_2(seqlen_new)))
        # paged pools read a block ahead, one wave of programs launched early: work before the wait on
        # the kernel before hides behind it (the interpreter runs that work too, to test it)
        early_wave = pdl and fits_sms  # and launched early
        early = paged and cfg["TABLE_AHEAD"] and (interpret or early_wave)
        # programs that take a whole SM start as the ones before them end: each asks the L2 for its
        # first block before the wait (contiguous caches, and pools read a block ahead; one wave of
        # programs, or more with DECODE_EARLY_PAST_WAVE)
        early_prefetch = (early_hint and (early_wave or DECODE_EARLY_PAST_WAVE) and (not paged or cfg["TABLE_AHEAD"])
                          and _whole_sm(cfg["num_stages"], cfg["BLOCK_N"], cfg["BLOCK_D"], k.element_size(), smem))
        sort_pages = _sort_pages(early, (direct and append) or tail_groups > 0, key_start is not None,
                                 causal and (new_rows or not append), key_capacity, num_splits, cfg["BLOCK_N"],
                                 cfg["BLOCK_D"], page_size, num_pages, interpret)
        # one wave of whole-SM split programs reading the pool in table order: the second block's table
        # entries read next to the lengths as well (with the pool-order sort, from the sorted row, it
        # measured level to 0.1 us slower at D=128; one split per sequence, 16x8/8x2048x64 on random
        # pages, 0.1-0.45 slower); the interpreter tests it where it does not sort
        guess_next = (DECODE_TABLE_GUESS_NEXT and paged and cfg["TABLE_AHEAD"] and not sort_pages and not direct
                      and (interpret or early_prefetch))
        _decode_split_kernel[(num_splits, group_count)](
            q, k, v, *(descriptors or (k, v)), partial_out, partial_lse, out,
            key_start if key_start is not None else dummy,
            dummy,
            block_table if paged else dummy,
            new_k, new_v, counters if counters is not None else dummy,
            group_base, tail_groups, num_kv_heads, num_q_heads // num_kv_heads, seqlen_q, seqlen_new, key_capacity,
            key_end_offset,
            scale * LOG2_E, page_size, num_pages, max_pages_per_seq, num_splits,
            q.stride(0), q.stride(1), q.stride(2),
            k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2),
            new_k.stride(0), new_k.stride(1), new_k.stride(2),
            new_v.stride(0), new_v.stride(1), new_v.stride(2),
            stride_bt_b,
            out.stride(0), out.stride(1), out.stride(2),
            HEAD_DIM=head_dim,
            BLOCK_T=block_t,
            CAUSAL=causal,
            HAS_KEY_START=key_start is not None,
            HAS_KEY_END=key_end is not None,
            PAGED=paged,
            DOT_PRECISION=dot_precision(q.dtype),
            TMA=descriptors is not None,
            APPEND=append,
            DIRECT=direct,
            PDL=pdl,
            **paged_row_flags(k, v, block_table),
            PREFETCH=DECODE_PREFETCH and l2_hints,
            **_prefetch_lines(head_dim, k.element_size()),
            TABLE_LINES=_table_lines(key_capacity, num_splits, cfg["BLOCK_N"], page_size)
            if paged and DECODE_TABLE_PREFETCH and l2_hints and not sort_pages else 0,
            # one wave of programs (its pipeline fill is not hidden behind other programs); with more,
            # the smaller shared-memory footprint lets a third program share an SM (D=128, 256
            # programs: 179 -> 209 us)
            SHIFT_TAIL=DECODE_SHIFT_TAIL and fits_sms,
            # past one wave at D <= 64 with 64-key blocks (`_config`'s wave tiles): whole slices
            # unmasked, a partial last block as the shifted loop (with 128-key blocks, 512 programs,
            # both loops compiled cost 2.5 us at every length, NOTES.md twenty-eighth round)
            TAIL_BRANCH=(DECODE_TAIL_BRANCH and descriptors is not None and not fits_sms and key_start is None
                         and cfg["BLOCK_D"] <= 64 and cfg["BLOCK_N"] <= 64),
            TABLE_GUESS=DECODE_TABLE_GUESS,
            INTERLEAVED=interleaved,
            SORT_PAGES=sort_pages,
            EARLY_PREFETCH=early_prefetch,
            GUESS_NEXT=guess_next,
            BIAS_MASK=bias_mask,
            WRITE_FIRST=write_first,
            NEW_ROWS=new_rows,
            SLOT_PAGES=slot_pages,
            WAIT_LAST=wait_last and pdl,
            ZERO_COUNTERS=tail_groups > 0 and counters is not None,
            FUSED_MERGE=fused_merge,
            BLOCK_SPLITS=max(2, next_power_of_2(num_splits)),
            MERGE_CHUNK=merge_chunk,
            # D <= 64: the first block in table order, its hints not waiting on the sort (at D=128
            # 0.2-0.3 us slower, NOTES.md thirtieth round)
            FIRST_IN_ORDER=sort_pages > 0 and cfg["BLOCK_D"] <= 64,
            **cfg,
            **({"launch_pdl": True} if pdl else {}),
        )
        return num_splits, partial_out, partial_lse, write_first

    if tail:
        rows_per_group = decode_packed_rows(num_q_heads, num_kv_heads, seqlen_q)
        head_cfg = dict(_config(wave, 1, rows_per_group, key_capacity, head_dim, q.dtype, paged, sm_count, interpret,
                                early_hint, smem, DECODE_BALANCED_WAVES, DECODE_WAVE_TILES, False), NUM_SPLITS=1)
        counters = torch.empty((tail,), dtype=torch.int32, device=q.device)
        split_pass(head_cfg, wave, 0, False, tail, counters)
        split_pass(_tail_config(cfg, key_capacity, wave, tail, interpret), tail, wave, True, 0, counters)
        return
    num_splits, partial_out, partial_lse, write_first = split_pass(cfg, groups, 0, False)
    if num_splits > 1:
        merge(partial_out, partial_lse, num_splits, append and not write_first)


def _balanced_pieces(programs: int, groups: int) -> int:
    """Partial results per (sequence, KV head) group when ``programs`` share out ``groups`` groups'
    key blocks (`_decode_balanced_kernel`): a group spans at most this many programs' shares."""
    return (programs - 1) // groups + 2


def _merge(out, q, new_k, new_v, k, v, dummy, block_table, geometry, scale, block_d, causal, pdl, partial_out,
           partial_lse, num_splits, append, balanced_programs=0, balanced_groups=1):
    """Launch stage 2 over ``num_splits`` partial results per row (``geometry``: `kv_geometry` of
    the cache; ``append``: scoring this step's tokens and writing them into the cache too;
    ``balanced_programs``: the partial results of `_decode_balanced_kernel`, which shared out
    ``balanced_groups`` groups)."""
    batch, num_q_heads, seqlen_q, head_dim = q.shape
    num_pages, page_size, max_pages_per_seq, key_capacity, stride_bt_b = geometry
    paged = block_table is not None
    seqlen_new = new_k.shape[2]
    _decode_merge_kernel[(batch * num_q_heads * seqlen_q,)](
        partial_out, partial_lse, out, q, new_k, new_v, k, v, dummy, block_table if paged else dummy,
        num_q_heads, num_q_heads // k.shape[1], seqlen_q, num_splits, seqlen_new, key_capacity,
        scale * LOG2_E, page_size, num_pages, max_pages_per_seq,
        out.stride(0), out.stride(1), out.stride(2),
        q.stride(0), q.stride(1), q.stride(2),
        new_k.stride(0), new_k.stride(1), new_k.stride(2),
        new_v.stride(0), new_v.stride(1), new_v.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        stride_bt_b, balanced_programs, balanced_groups,
        HEAD_DIM=head_dim, BLOCK_D=block_d,
        BLOCK_SPLITS=max(2, next_power_of_2(num_splits)),
        BLOCK_T=max(2, next_power_of_2(seqlen_new)),
        CAUSAL=causal,
        APPEND=append,
        PAGED=paged,
        PDL=pdl,
        BALANCED=balanced_programs > 0,
        num_warps=4 if block_d * num_splits >= 4096 else 1,
        **({"launch_pdl": True} if pdl else {}),
    )
