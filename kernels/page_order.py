"""Block tables rewritten to read each sequence's full pages in pool order.

One program per sequence sorts the row's entries of pages wholly below ``cache_seqlens[b]``
(``tl.sort`` on one tile) and copies the rest unchanged. Rows wider than ``MAX_SORTED_PAGES``
are left to the caller's ``torch.sort`` path.
"""

import triton
import triton.language as tl

from .common import next_power_of_2

# widest row one program sorts in registers
MAX_SORTED_PAGES = 8192


@triton.jit
def _read_order_kernel(BlockTable, CacheSeqlens, Out, max_pages_per_seq, page_size, stride_bt_b, stride_bt_p,
                       stride_len, stride_out_b, BLOCK_P: tl.constexpr):
    b = tl.program_id(0)
    columns = tl.arange(0, BLOCK_P)
    inside = columns < max_pages_per_seq
    entries = tl.load(BlockTable + b * stride_bt_b + columns * stride_bt_p, mask=inside, other=0)
    full = inside & (columns < tl.load(CacheSeqlens + b * stride_len) // page_size)
    # The full pages form a prefix of the row; every other entry sorts after them and is put back.
    keys = tl.where(full, entries.to(tl.int64), 0x7FFFFFFFFFFFFFFF)
    ordered = tl.sort(keys)
    tl.store(Out + b * stride_out_b + columns, tl.where(full, ordered, entries.to(tl.int64)).to(tl.int32),
             mask=inside)


def paged_read_order(block_table, cache_seqlens, page_size, out):
    """Write into ``out`` (int32 ``[B, P]``) ``block_table`` (int32 ``[B, P]``, any strides) with
    each row's first ``cache_seqlens[b] // page_size`` entries sorted ascending (``cache_seqlens``:
    int32 ``[B]``, any stride). Needs ``P <= MAX_SORTED_PAGES``."""
    batch, max_pages_per_seq = block_table.shape
    assert max_pages_per_seq <= MAX_SORTED_PAGES
    block_p = max(16, next_power_of_2(max_pages_per_seq))
    _read_order_kernel[(batch,)](
        block_table, cache_seqlens, out, max_pages_per_seq, page_size, block_table.stride(0), block_table.stride(1),
        cache_seqlens.stride(0), out.stride(0),
        BLOCK_P=block_p, num_warps=4 if block_p <= 1024 else 8,
    )
