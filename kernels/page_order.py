"""Block tables rewritten to read each sequence's full pages in pool order.

The entries of pages wholly below ``cache_seqlens[b]`` (a prefix of row ``b``) are sorted
ascending by rank: program ``(b, c)`` takes ``BLOCK`` entries of the row, counts for each how many
of the prefix's entries come before it (smaller, or equal and further left, so ties keep their
order) and stores it at that place. Every other entry stays where it is. Work per row grows as
the prefix squared over ``BLOCK``, spread over ``P / BLOCK`` programs: one launch of ~2 µs on an
H100 for the tables decode uses, where a one-program ``tl.sort`` of a 2048-entry row took ~28 µs.
"""

import triton
import triton.language as tl

BLOCK = 128


@triton.jit
def _read_order_kernel(BlockTable, CacheSeqlens, Out, max_pages_per_seq, page_size, stride_bt_b, stride_bt_p,
                       stride_out_b, BLOCK: tl.constexpr):
    b = tl.program_id(0)
    columns = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    inside = columns < max_pages_per_seq
    row = BlockTable + b * stride_bt_b
    entries = tl.load(row + columns * stride_bt_p, mask=inside, other=0)
    num_full = tl.minimum(tl.load(CacheSeqlens + b) // page_size, max_pages_per_seq)
    rank = tl.zeros([BLOCK], dtype=tl.int32)
    for start in range(0, num_full, BLOCK):
        others = start + tl.arange(0, BLOCK)
        other_entries = tl.load(row + others * stride_bt_p, mask=others < num_full, other=0)
        before = ((other_entries[None, :] < entries[:, None])
                  | ((other_entries[None, :] == entries[:, None]) & (others[None, :] < columns[:, None])))
        rank += tl.sum((before & (others[None, :] < num_full)).to(tl.int32), axis=1)
    place = tl.where(columns < num_full, rank, columns)
    tl.store(Out + b * stride_out_b + place, entries, mask=inside)


def paged_read_order(block_table, cache_seqlens, page_size, out):
    """Write into ``out`` (int32 ``[B, P]``, contiguous rows) ``block_table`` (int32 ``[B, P]``)
    with each row's first ``cache_seqlens[b] // page_size`` entries sorted ascending."""
    batch, max_pages_per_seq = block_table.shape
    _read_order_kernel[(batch, triton.cdiv(max_pages_per_seq, BLOCK))](
        block_table, cache_seqlens, out, max_pages_per_seq, page_size, block_table.stride(0), block_table.stride(1),
        out.stride(0), BLOCK=BLOCK, num_warps=4,
    )
