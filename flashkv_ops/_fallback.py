"""Pure-PyTorch implementation of the ops, used for CPU tensors when Triton is not interpreting.

Same semantics as the kernels (key ranges, bottom-right causal, GQA by head mapping, zeros for
rows that see no key, out-of-range slots and pages skipped); computed in float32 or wider.
"""

import torch


def _gather_paged(pages: torch.Tensor, block_table: torch.Tensor) -> torch.Tensor:
    """pages [num_pages, H_kv, page_size, D] + block_table [B, P] -> [B, H_kv, P * page_size, D]."""
    num_pages, num_kv_heads, page_size, head_dim = pages.shape
    batch, max_pages = block_table.shape
    safe = block_table.long().clamp(0, num_pages - 1)
    gathered = pages[safe]  # [B, P, H_kv, page_size, D]
    return gathered.permute(0, 2, 1, 3, 4).reshape(batch, num_kv_heads, max_pages * page_size, head_dim)


def _page_valid(block_table: torch.Tensor, num_pages: int, page_size: int) -> torch.Tensor:
    """[B, P * page_size] bool: positions whose page index lies inside the pool."""
    ok = (block_table >= 0) & (block_table < num_pages)
    return ok.repeat_interleave(page_size, dim=1)


def attention(q, k, v, out, key_start, key_end, key_end_offset, block_table, causal, scale):
    """Fill out [B, H_q, S_q, D] with attention of q over keys [key_start, key_end + key_end_offset)."""
    batch, num_q_heads, seqlen_q, head_dim = q.shape
    num_kv_heads = k.shape[1]
    if block_table is not None:
        valid_pages = _page_valid(block_table, k.shape[0], k.shape[2])
        k = _gather_paged(k, block_table)
        v = _gather_paged(v, block_table)
    capacity = k.shape[2]
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    positions = torch.arange(capacity, device=q.device)
    end = torch.full((batch,), capacity, device=q.device, dtype=torch.long)
    if key_end is not None:
        end = (key_end.long() + key_end_offset).clamp(max=capacity)
    start = key_start.long().clamp(min=0) if key_start is not None else torch.zeros_like(end)
    visible = (positions[None, :] >= start[:, None]) & (positions[None, :] < end[:, None])  # [B, S_k]
    if block_table is not None:
        visible = visible & valid_pages
    # slots outside the range may hold anything (NaN included): 0 * NaN would leak through
    in_range = visible[:, None, :, None]
    k = torch.where(in_range, k, 0).to(compute)
    v = torch.where(in_range, v, 0).to(compute)
    visible = visible[:, None, :].expand(batch, seqlen_q, capacity)
    if causal:
        rows = torch.arange(seqlen_q, device=q.device)
        limit = rows[None, :] + (end[:, None] - seqlen_q)  # [B, S_q]
        visible = visible & (positions[None, None, :] <= limit[:, :, None])
    group = num_q_heads // num_kv_heads
    qg = q.to(compute).reshape(batch, num_kv_heads, group, seqlen_q, head_dim)
    scores = torch.einsum("bhgqd,bhkd->bhgqk", qg, k) * scale
    mask = visible[:, None, None, :, :]
    scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # rows with no key -> 0
    result = torch.einsum("bhgqk,bhkd->bhgqd", probs, v)
    out.copy_(result.reshape(batch, num_q_heads, seqlen_q, head_dim))


def append_kv(k_new, v_new, k_cache, v_cache, cache_seqlens, block_table):
    """Write k_new/v_new [B, H_kv, S_q, D] at cache_seqlens[b] + 0..S_q-1, skipping unsafe slots."""
    seqlen_new = k_new.shape[2]
    positions = cache_seqlens.long()[:, None] + torch.arange(seqlen_new, device=k_new.device)  # [B, S_q]
    if block_table is None:
        ok = (positions >= 0) & (positions < k_cache.shape[2])
        b, t = ok.nonzero(as_tuple=True)
        pos = positions[b, t]
        k_cache[b, :, pos] = k_new[b, :, t]  # [N, H_kv, D] rows
        v_cache[b, :, pos] = v_new[b, :, t]
        return
    num_pages, _, page_size, _ = k_cache.shape
    ok = (positions >= 0) & (positions < block_table.shape[1] * page_size)
    b, t = ok.nonzero(as_tuple=True)
    pos = positions[b, t]
    page = block_table[b, pos // page_size].long()
    inside = (page >= 0) & (page < num_pages)  # never write outside the pool
    b, t, pos, page = b[inside], t[inside], pos[inside], page[inside]
    k_cache[page, :, pos % page_size] = k_new[b, :, t]
    v_cache[page, :, pos % page_size] = v_new[b, :, t]


def paged_read_order(block_table, cache_seqlens, page_size):
    """``block_table`` with each row's first ``cache_seqlens[b] // page_size`` entries sorted."""
    columns = torch.arange(block_table.shape[1], device=block_table.device)
    full = columns < (cache_seqlens.long() // page_size)[:, None]  # a prefix of each row
    entries = block_table.long()
    ordered = torch.sort(torch.where(full, entries, torch.iinfo(torch.int64).max), dim=1).values
    return torch.where(full, ordered, entries).to(torch.int32)
