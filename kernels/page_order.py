"""Block tables rewritten to read each sequence's full pages in pool order.

The entries of pages wholly below ``cache_seqlens[b]`` (a prefix of row ``b``) are put in ascending
order; every other entry stays where it is. Rows of up to ``SORT_MAX_PAGES`` entries: one program
per row sorts its tile (``tl.sort``). Wider rows, where that sort network's steps add up (28 us
for 2048 entries on an H100, benchmarks/NOTES.md), are ordered by rank: program ``(b, c)`` takes
``BLOCK`` entries of the row, counts for each how many of the prefix's entries come before it
(smaller, or equal and further left, so ties keep their order: the result is always a permutation
of the row) and stores it at that place. The prefix is compared ``OTHERS`` entries at a time;
only the chunk holding the program's own entries needs positions for ties (on equality, entries
of the chunks to its left all come before, those to its right never), so elsewhere an entry
costs one comparison. A row's work grows as its prefix squared, spread over one program per
``BLOCK`` entries: one launch for any width, and no sort network.
"""

import triton
import triton.language as tl

from .common import next_power_of_2

_LAST = tl.constexpr(2147483647)  # entries past the prefix, loaded as the largest int32: never before anything


@triton.jit
def _count_before(rank, row, stride_bt_p, entries, columns, start, num_full, OTHERS: tl.constexpr,
                  TIES: tl.constexpr):
    """rank + for each of ``entries`` the prefix entries among ``start .. start + OTHERS`` before it:
    smaller, or (TIES 1: all of them left of it; TIES 2: by position) equal and left of it."""
    others = start + tl.arange(0, OTHERS)
    other_entries = tl.load(row + others * stride_bt_p, mask=others < num_full, other=_LAST)
    if TIES == 0:
        before = other_entries[None, :] < entries[:, None]
    elif TIES == 1:
        before = other_entries[None, :] <= entries[:, None]
    else:
        before = tl.where(others[None, :] < columns[:, None], other_entries[None, :] <= entries[:, None],
                          other_entries[None, :] < entries[:, None])
    return rank + tl.sum(before.to(tl.int32), axis=1)


@triton.jit
def _read_order_kernel(BlockTable, CacheSeqlens, Out, max_pages_per_seq, page_size, stride_bt_b, stride_bt_p,
                       stride_len, stride_out_b, BLOCK: tl.constexpr, OTHERS: tl.constexpr):
    b = tl.program_id(0)
    first = tl.program_id(1) * BLOCK
    columns = first + tl.arange(0, BLOCK)
    inside = columns < max_pages_per_seq
    row = BlockTable + b.to(tl.int64) * stride_bt_b
    entries = tl.load(row + columns * stride_bt_p, mask=inside, other=0)
    num_full = tl.minimum(tl.load(CacheSeqlens + b * stride_len) // page_size, max_pages_per_seq)
    rank = tl.zeros([BLOCK], dtype=tl.int32)
    if first < num_full:  # blocks wholly past the prefix are copied as they are
        # OTHERS is a multiple of BLOCK: the program's entries lie inside one chunk, `own`
        own = first // OTHERS * OTHERS
        for start in range(0, own, OTHERS):
            rank = _count_before(rank, row, stride_bt_p, entries, columns, start, num_full, OTHERS, 1)
        rank = _count_before(rank, row, stride_bt_p, entries, columns, own, num_full, OTHERS, 2)
        for start in range(own + OTHERS, num_full, OTHERS):
            rank = _count_before(rank, row, stride_bt_p, entries, columns, start, num_full, OTHERS, 0)
    place = tl.where(columns < num_full, rank, columns)
    tl.store(Out + b.to(tl.int64) * stride_out_b + place, entries, mask=inside)


@triton.jit
def _sorted_rows_kernel(BlockTable, CacheSeqlens, Out, max_pages_per_seq, page_size, stride_bt_b, stride_bt_p,
                        stride_len, stride_out_b, BLOCK_P: tl.constexpr):
    b = tl.program_id(0)
    columns = tl.arange(0, BLOCK_P)
    inside = columns < max_pages_per_seq
    entries = tl.load(BlockTable + b.to(tl.int64) * stride_bt_b + columns * stride_bt_p, mask=inside, other=0)
    full = inside & (columns < tl.load(CacheSeqlens + b * stride_len) // page_size)
    # the full pages form a prefix of the row; every other entry sorts after them and is put back
    keys = tl.where(full, entries.to(tl.int64), 0x7FFFFFFFFFFFFFFF)
    ordered = tl.sort(keys)
    tl.store(Out + b.to(tl.int64) * stride_out_b + columns,
             tl.where(full, ordered, entries.to(tl.int64)).to(tl.int32), mask=inside)


# Rows up to this width are sorted by one program each: 2.1-2.5 us on the H100 for rows of 128-256
# entries, 0.4-1.7 us less than by rank with the tile below (benchmarks/NOTES.md)
SORT_MAX_PAGES = 256
# by rank: entries each program places, prefix entries compared per step, warps (H100 sweep, NOTES.md)
ORDER_BLOCK = 16
ORDER_OTHERS = 512
ORDER_WARPS = 4


def paged_read_order(block_table, cache_seqlens, page_size, out, block=None, others=None, num_warps=None):
    """Write into ``out`` (int32 ``[B, P]``, contiguous) ``block_table`` (int32 ``[B, P]``, any
    strides) with each row's first ``min(cache_seqlens[b] // page_size, P)`` entries in ascending
    order (``cache_seqlens``: int32 ``[B]``, any stride). ``block``, ``others``, ``num_warps``: the
    rank kernel's tile sizes, powers of two with ``others`` a multiple of ``block``; when all are None,
    rows of at most ``SORT_MAX_PAGES`` entries are sorted by one program each instead."""
    batch, max_pages_per_seq = block_table.shape
    default_tiles = block is None and others is None and num_warps is None
    if default_tiles and max_pages_per_seq <= SORT_MAX_PAGES:
        _sorted_rows_kernel[(batch,)](
            block_table, cache_seqlens, out, max_pages_per_seq, page_size, block_table.stride(0),
            block_table.stride(1), cache_seqlens.stride(0), out.stride(0),
            BLOCK_P=max(16, next_power_of_2(max_pages_per_seq)), num_warps=4)
        return
    block, others = block or ORDER_BLOCK, others or ORDER_OTHERS
    assert others % block == 0
    _read_order_kernel[(batch, triton.cdiv(max_pages_per_seq, block))](
        block_table, cache_seqlens, out, max_pages_per_seq, page_size, block_table.stride(0), block_table.stride(1),
        cache_seqlens.stride(0), out.stride(0),
        BLOCK=block, OTHERS=others, num_warps=num_warps or ORDER_WARPS,
    )
