"""Public attention functions: validate at the boundary, then call the registered ops.

Causal alignment is bottom-right (FlashAttention >= 2.1): with S_q queries over S_k keys,
query row i sees keys j <= i + S_k - S_q::

    S_q=3, S_k=5, causal          keys 0 1 2 3 4
                          query 0      x x x . .
                          query 1      x x x x .
                          query 2      x x x x x

A row that sees no key (S_q > S_k, or an empty key range) returns zeros.
"""

from typing import Optional

import torch
from torch import Tensor

from . import _validation as check
from . import ops  # noqa: F401  (registers torch.ops.flashkv.*)


def _contiguous_last_dim(t: Tensor) -> Tensor:
    # inputs that are only read may be copied; caches (written in place) may not
    return t if t.stride(-1) == 1 else t.contiguous()


def attention(q: Tensor, k: Tensor, v: Tensor, *, causal: bool = False, scale: Optional[float] = None) -> Tensor:
    """Multi-head / grouped-query attention (FlashAttention-2 style forward).

    Parameters
    ----------
    q : Tensor
        ``[batch_size, num_q_heads, seqlen_q, head_dim]``; float16, bfloat16 or float32.
    k, v : Tensor
        ``[batch_size, num_kv_heads, seqlen_k, head_dim]``, same dtype and device as ``q``;
        ``num_q_heads % num_kv_heads == 0`` and query head ``h`` reads KV head
        ``h // (num_q_heads // num_kv_heads)`` (K/V are never repeated in memory).
    causal : bool
        Bottom-right aligned causal mask (see the module docstring).
    scale : float, optional
        Softmax scale; defaults to ``head_dim ** -0.5``.

    Returns
    -------
    Tensor
        ``[batch_size, num_q_heads, seqlen_q, head_dim]`` in ``q``'s dtype (softmax and
        accumulation in float32).

    Examples
    --------
    >>> q = torch.randn(1, 32, 128, 128, device="cuda", dtype=torch.bfloat16)
    >>> k = v = torch.randn(1, 8, 128, 128, device="cuda", dtype=torch.bfloat16)
    >>> out = flashkv_ops.attention(q, k, v, causal=True)  # [1, 32, 128, 128]
    """
    check.check_query_kv(q, k, v)
    causal, scale = check.check_causal_scale(causal, scale)
    if k.shape[0] != q.shape[0]:
        raise ValueError(f"k has batch size {k.shape[0]} but q has {q.shape[0]}")
    q, k, v = (_contiguous_last_dim(t) for t in (q, k, v))
    return torch.ops.flashkv.attention(q, k, v, causal=causal, scale=scale)


def attention_with_key_ranges(q: Tensor, k: Tensor, v: Tensor, key_start: Tensor, key_end: Tensor, *,
                              causal: bool = True, scale: Optional[float] = None) -> Tensor:
    """Attention where each sequence sees only its own key range (left-padded batches).

    Parameters
    ----------
    q : Tensor
        ``[batch_size, num_q_heads, seqlen_q, head_dim]``.
    k, v : Tensor
        ``[batch_size, num_kv_heads, seqlen_k, head_dim]``.
    key_start, key_end : Tensor
        int32 ``[batch_size]``: query row ``i`` of sequence ``b`` sees keys ``j`` with
        ``key_start[b] <= j < key_end[b]`` and, if ``causal``, ``j <= i + key_end[b] - seqlen_q``.
        Needs ``0 <= key_start[b] <= key_end[b] <= seqlen_k`` (checked in eager mode).
    causal : bool
        Bottom-right causal mask aligned to each sequence's ``key_end``.
    scale : float, optional
        Softmax scale; defaults to ``head_dim ** -0.5``.

    Returns
    -------
    Tensor
        ``[batch_size, num_q_heads, seqlen_q, head_dim]``; rows that see no key are zero.
    """
    check.check_query_kv(q, k, v)
    causal, scale = check.check_causal_scale(causal, scale)
    batch = q.shape[0]
    if k.shape[0] != batch:
        raise ValueError(f"k has batch size {k.shape[0]} but q has {batch}")
    check.check_lengths_tensor("key_start", key_start, batch, q.device)
    check.check_lengths_tensor("key_end", key_end, batch, q.device)
    if check.value_checks_enabled(q):
        check.check_key_range_values(key_start, key_end, k.shape[2])
    q, k, v = (_contiguous_last_dim(t) for t in (q, k, v))
    # kernels index lengths with stride 1 (an expanded view would be read past its storage)
    key_start, key_end = key_start.contiguous(), key_end.contiguous()
    return torch.ops.flashkv.attention_with_key_ranges(q, k, v, key_start, key_end, causal=causal, scale=scale)


def attention_with_kv_cache(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    cache_seqlens: Tensor,
    k: Optional[Tensor] = None,
    v: Optional[Tensor] = None,
    *,
    causal: bool = True,
    scale: Optional[float] = None,
    block_table: Optional[Tensor] = None,
) -> Tensor:
    """Attention against a KV cache, appending new tokens in place first.

    Parameters
    ----------
    q : Tensor
        ``[batch_size, num_q_heads, seqlen_q, head_dim]``: 1 token for decode, a few for
        speculative decoding, many for chunked prefill.
    k_cache, v_cache : Tensor
        ``[batch_size, num_kv_heads, max_seqlen, head_dim]``, or with ``block_table`` a page pool
        ``[num_pages, num_kv_heads, page_size, head_dim]``. Written in place when ``k``/``v``
        are given; last dimension contiguous.
    cache_seqlens : Tensor
        int32 ``[batch_size]``: tokens already in each sequence's cache. Never modified.
    k, v : Tensor, optional (together)
        ``[batch_size, num_kv_heads, seqlen_q, head_dim]`` new tokens, written at positions
        ``cache_seqlens[b] .. cache_seqlens[b] + seqlen_q - 1`` before attending.
    causal : bool
        Bottom-right causal mask: query ``i`` sees cache positions
        ``j <= i + cache_seqlens[b] + (seqlen_q if k is given else 0) - seqlen_q``.
    scale : float, optional
        Softmax scale; defaults to ``head_dim ** -0.5``.
    block_table : Tensor, optional
        int32 ``[batch_size, max_pages_per_seq]``: position ``p`` of sequence ``b`` lives in page
        ``block_table[b, p // page_size]``, slot ``p % page_size``. Any ``page_size >= 1``.

    Returns
    -------
    Tensor
        ``[batch_size, num_q_heads, seqlen_q, head_dim]`` over cache positions
        ``[0, cache_seqlens[b] + (seqlen_q if k is given else 0))``. Work per sequence is
        proportional to its own length, not to ``max_seqlen``.

    Raises
    ------
    ValueError, TypeError
        Before anything is written, naming the argument: shapes, dtypes, devices; in eager mode
        also negative lengths, cache overflow and block-table entries outside the pool.
    """
    check.check_query_kv(q, k_cache, v_cache, "k_cache", "v_cache")
    causal, scale = check.check_causal_scale(causal, scale)
    check.check_last_dim_contiguous("k_cache", k_cache)
    check.check_last_dim_contiguous("v_cache", v_cache)
    batch, _, seqlen_q, _ = q.shape
    check.check_lengths_tensor("cache_seqlens", cache_seqlens, batch, q.device)
    check.check_new_tokens(q, k_cache, k, v)
    if block_table is not None:
        check.check_block_table(block_table, batch, q.device)
        num_pages, _, page_size, _ = k_cache.shape
        capacity = block_table.shape[1] * page_size
    else:
        if k_cache.shape[0] != batch:
            raise ValueError(f"k_cache has batch size {k_cache.shape[0]} but q has {batch}")
        num_pages, page_size, capacity = 0, 1, k_cache.shape[2]
    if check.value_checks_enabled(q):
        check.check_cache_values(cache_seqlens, seqlen_q if k is not None else 0, capacity, block_table,
                                 num_pages, page_size)
    q = _contiguous_last_dim(q)
    if k is not None:
        k, v = _contiguous_last_dim(k), _contiguous_last_dim(v)
    # kernels index lengths and table rows with stride 1 (no-ops for the usual contiguous tensors)
    cache_seqlens = cache_seqlens.contiguous()
    if block_table is not None:
        block_table = block_table.contiguous()
    return torch.ops.flashkv.attention_with_kv_cache(
        q, k_cache, v_cache, cache_seqlens, k, v, causal=causal, scale=scale, block_table=block_table)
