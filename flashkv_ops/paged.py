"""A paged KV cache: one pool of fixed-size pages per layer and a host-side page allocator.

Pages are handed to a sequence as it grows (``reserve``) and returned when it ends (``free``),
lowest-numbered free page first: each sequence's pages then mostly ascend through the pool and
the live pages stay packed at its low end, which decode reads faster than pages scattered by
a last-in first-out free list (H100, ``benchmarks/NOTES.md``).
The allocator is all host bookkeeping; the device sees only ``block_table`` and ``seqlens``,
which are updated in place (same storage), so a captured CUDA graph keeps reading the current
values. Slots that hold no pages are idle: the batch keeps its shape, and their rows point at a
null page past the allocator's pages, which absorbs their writes.
"""

import heapq
from typing import List, Optional

import torch
from torch import Tensor

from ._validation import check_block_table, check_count, check_index, check_lengths_tensor, check_storage
from . import ops  # noqa: F401  (registers torch.ops.flashkv.*)
from .attention import attention_with_kv_cache


def paged_read_order(block_table: Tensor, cache_seqlens: Tensor, page_size: int) -> Tensor:
    """A block table that reads each sequence's full pages in pool order: same pages, same result.

    Decode reads a pool faster when every sequence's pages ascend through it (H100, random
    16-token pages at 67 MB: ~2% faster, ``benchmarks/NOTES.md``). Attention does not depend on the
    order in which it visits keys that every query sees, so the pages wholly inside the first
    ``cache_seqlens[b]`` positions may be read in any order. This returns ``block_table`` with those
    entries of each row sorted ascending and every other entry (the partly filled page where new
    tokens land, the pages after it) unchanged. Pass it as ``block_table`` to
    ``attention_with_kv_cache`` in place of the logical table: the output is the same (up to
    floating-point summation order) and new tokens land in the same slots.

    It stays valid while the row's other entries stay as they were and ``cache_seqlens`` only grows,
    for calls whose queries all see every key below the ``cache_seqlens`` given here: decode
    (``S_q == 1``), calls that append ``k``/``v``, and ``causal=False``. A causal call with
    ``S_q > 1`` and no new tokens needs the logical table. It runs as the registered op
    ``torch.ops.flashkv.paged_read_order`` with no host sync (one Triton launch: a sort per row for
    rows of up to 256 entries, a rank by counting past that), so it can be captured in CUDA graphs
    and traced by ``torch.compile``; compute it once per decode step for all layers, or when the table changes.
    ``PagedKVCache`` keeps such a table itself (``read_table``).

    Parameters
    ----------
    block_table : Tensor
        int32 ``[B, max_pages_per_seq]``: logical page ``i`` of sequence ``b`` is pool page
        ``block_table[b, i]``.
    cache_seqlens : Tensor
        int32 ``[B]``: tokens held per sequence.
    page_size : int
        Tokens per page (``k_cache.shape[2]``).

    Returns
    -------
    Tensor
        int32 ``[B, max_pages_per_seq]``, a new tensor on ``block_table``'s device.
    """
    page_size = check_count("page_size", page_size, 1)
    check_block_table(block_table)
    check_lengths_tensor("cache_seqlens", cache_seqlens, block_table.shape[0], block_table.device)
    return torch.ops.flashkv.paged_read_order(block_table, cache_seqlens, page_size)


class PoolExhaustedError(RuntimeError):
    """The page pool has too few free pages for a request; nothing was allocated."""


class PagedKVCache:
    """Page pools ``[num_pages + 1, num_kv_heads, page_size, head_dim]`` per layer, plus an allocator.

    Parameters
    ----------
    num_pages : int
        Pages the allocator hands out from each layer's pool (which holds one more: ``null_page``).
    page_size : int
        Tokens per page (any value >= 1).
    num_kv_heads, head_dim : int
        KV heads (never repeated for GQA) and head dimension.
    num_layers : int
        Number of layers (one K and one V pool each).
    max_batch_size : int
        Rows of ``block_table`` / ``seqlens`` (sequence slots).
    max_pages_per_seq : int
        Columns of ``block_table``; a sequence holds at most ``max_pages_per_seq * page_size`` tokens.
    dtype, device :
        Storage of the pools.

    Attributes
    ----------
    k_pages, v_pages : list of Tensor
        Per layer ``[num_pages + 1, num_kv_heads, page_size, head_dim]``: pages ``0 .. num_pages - 1``
        are handed out; the last one, ``null_page``, never is.
    block_table : Tensor
        int32 ``[max_batch_size, max_pages_per_seq]``. A slot's row holds its pages, then ``-1``;
        the row of an idle slot (no pages: never reserved, or freed) is all ``null_page``.
    read_table : Tensor
        ``block_table`` with each row's pages wholly below ``seqlens`` in ascending pool order (what
        ``paged_read_order`` returns), rewritten on the device as pages fill, with no host sync.
        ``attention`` reads through it wherever that gives the same result: every call but a causal
        one with ``seqlen_q > 1`` and no new tokens. The allocator keeps both tables in step; edit
        neither by hand.
    seqlens : Tensor
        int32 ``[max_batch_size]`` tokens held per sequence slot.
    null_page : int
        ``num_pages``: the page idle slots point at. ``attention`` runs over every slot (the batch
        keeps its shape for captured graphs); an idle slot's new tokens land in this page, which no
        sequence reads, and its output rows carry no meaning.

    Examples
    --------
    >>> cache = PagedKVCache(num_pages=64, page_size=16, num_kv_heads=8, head_dim=128,
    ...                      max_batch_size=2, max_pages_per_seq=32, dtype=torch.float16, device="cuda")
    >>> cache.reserve(0, 20)                          # pages for 20 tokens of sequence 0
    >>> out = cache.attention(0, q, k_new, v_new)     # q [2, H_q, 20, 128], k_new/v_new [2, 8, 20, 128]
    >>> cache.advance(0, 20)                          # slot 1 never reserved: idle, its rows ignored
    """

    def __init__(self, num_pages: int, page_size: int, num_kv_heads: int, head_dim: int, *, num_layers: int = 1,
                 max_batch_size: int = 1, max_pages_per_seq: Optional[int] = None,
                 dtype: torch.dtype = torch.float16, device="cuda"):
        num_pages, page_size, num_kv_heads, head_dim, num_layers, max_batch_size = (
            check_count(name, value, 1) for name, value in (
                ("num_pages", num_pages), ("page_size", page_size), ("num_kv_heads", num_kv_heads),
                ("head_dim", head_dim), ("num_layers", num_layers), ("max_batch_size", max_batch_size)))
        max_pages_per_seq = num_pages if max_pages_per_seq is None else check_count("max_pages_per_seq",
                                                                               max_pages_per_seq, 1)
        check_storage(head_dim, dtype)
        self.num_pages, self.page_size = num_pages, page_size
        self.max_pages_per_seq = max_pages_per_seq
        self.null_page = num_pages
        shape = (num_pages + 1, num_kv_heads, page_size, head_dim)
        self.k_pages: List[Tensor] = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v_pages: List[Tensor] = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.block_table = torch.full((max_batch_size, max_pages_per_seq), self.null_page, dtype=torch.int32,
                                      device=device)
        self.read_table = self.block_table.clone()
        self.seqlens = torch.zeros(max_batch_size, dtype=torch.int32, device=device)
        # host mirrors: the allocator never reads device memory
        self._free: List[int] = list(range(num_pages))  # a min-heap: the lowest free page goes out first
        self._pages: List[List[int]] = [[] for _ in range(max_batch_size)]
        self._lengths: List[int] = [0] * max_batch_size
        self._reserved: List[int] = [0] * max_batch_size

    @property
    def num_free_pages(self) -> int:
        """Pages the allocator can still hand out (``null_page`` not counted)."""
        return len(self._free)

    @property
    def capacity(self) -> int:
        """Most tokens one sequence can hold."""
        return self.max_pages_per_seq * self.page_size

    def _check_seq(self, seq: int) -> int:
        return check_index("seq", seq, len(self._pages))

    def reserve(self, seq: int, num_tokens: int) -> None:
        """Make room for ``num_tokens`` more tokens of sequence slot ``seq`` (all or nothing).

        Raises ``PoolExhaustedError`` when the pool has too few free pages and ``ValueError`` when
        the sequence would exceed ``max_pages_per_seq * page_size``; in both cases nothing changes.
        """
        seq = self._check_seq(seq)
        num_tokens = check_count("num_tokens", num_tokens, 0)
        wanted = self._lengths[seq] + num_tokens
        if wanted > self.capacity:
            raise ValueError(f"sequence {seq} would hold {wanted} tokens, more than max_pages_per_seq * page_size"
                             f" = {self.capacity}")
        pages = self._pages[seq]
        needed = -(-wanted // self.page_size) - len(pages)
        if needed > len(self._free):
            raise PoolExhaustedError(f"page pool exhausted: sequence {seq} needs {needed} more pages of "
                                     f"{self.page_size} tokens, {len(self._free)} of {self.num_pages} are free")
        new_pages = [heapq.heappop(self._free) for _ in range(max(needed, 0))]
        if new_pages:
            first = len(pages)
            if not first:  # an idle slot's row pointed at the null page
                self.block_table[seq].fill_(-1)
            pages.extend(new_pages)
            self.block_table[seq, first:first + len(new_pages)] = torch.tensor(new_pages, dtype=torch.int32)
            self.read_table[seq, first:].copy_(self.block_table[seq, first:])  # device to device
        self._reserved[seq] = max(self._reserved[seq], wanted)

    allocate = reserve

    def advance(self, seq: int, num_tokens: int) -> None:
        """Record that ``num_tokens`` (>= 0) reserved tokens of ``seq`` were written (updates ``seqlens``)."""
        seq = self._check_seq(seq)
        num_tokens = check_count("num_tokens", num_tokens, 0)
        if self._lengths[seq] + num_tokens > self._reserved[seq]:
            raise ValueError(f"sequence {seq}: advancing by {num_tokens} passes the {self._reserved[seq]} "
                             "reserved tokens; call reserve() first")
        full_before = self._lengths[seq] // self.page_size
        self._lengths[seq] += num_tokens
        self.seqlens[seq] = self._lengths[seq]
        full = self._lengths[seq] // self.page_size
        if full > full_before:  # more pages are full: read them in pool order (sorted on the device, no sync)
            self.read_table[seq, :full] = torch.sort(self.block_table[seq, :full]).values

    def free(self, seq: int) -> None:
        """Return every page of sequence slot ``seq`` to the pool and reset its length to 0 (the slot
        turns idle: its row points at ``null_page``)."""
        seq = self._check_seq(seq)
        for page in self._pages[seq]:
            heapq.heappush(self._free, page)
        self._pages[seq] = []
        self._lengths[seq] = self._reserved[seq] = 0
        self.block_table[seq].fill_(self.null_page)
        self.read_table[seq].fill_(self.null_page)
        self.seqlens[seq] = 0

    def pages_of(self, seq: int) -> List[int]:
        """The pages sequence slot ``seq`` holds, in logical order."""
        seq = self._check_seq(seq)
        return list(self._pages[seq])

    def attention(self, layer: int, q: Tensor, k: Optional[Tensor] = None, v: Optional[Tensor] = None, *,
                  causal: bool = True, scale: Optional[float] = None) -> Tensor:
        """``attention_with_kv_cache`` over this pool for all ``max_batch_size`` slots.

        q: ``[max_batch_size, num_q_heads, seqlen_q, head_dim]``; k, v (optional): new tokens
        ``[max_batch_size, num_kv_heads, seqlen_q, head_dim]``, which must have been reserved.
        Returns ``[max_batch_size, num_q_heads, seqlen_q, head_dim]``; call ``advance`` afterwards.
        Idle slots (no pages) take part with their writes sent to ``null_page``; their output rows
        carry no meaning. Full pages are read in pool order (``read_table``) unless the call is
        causal over several query tokens with no new ones, where key positions matter.
        """
        layer = check_index("layer", layer, len(self.k_pages))
        positional = causal and k is None and isinstance(q, Tensor) and q.dim() == 4 and q.shape[2] > 1
        return attention_with_kv_cache(q, self.k_pages[layer], self.v_pages[layer], self.seqlens, k, v,
                                       causal=causal, scale=scale,
                                       block_table=self.block_table if positional else self.read_table)
