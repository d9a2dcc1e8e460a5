"""Independent float64 references for the flashkv ops, in plain PyTorch.

Written from the contract in ``shared/docs/DESIGN.md`` only, deliberately naive: an explicit
visibility mask per (query row, key column), explicit query-head -> KV-head mapping, no
``repeat_interleave`` tricks shared with the library. Everything is computed in float64 on the
device of the inputs, so the same functions serve the CPU suite and the GPU-marked suite.

Semantics encoded here
----------------------
* Layout ``[batch, heads, seq, head_dim]``; query head ``h`` reads KV head
  ``h // (num_q_heads // num_kv_heads)``.
* Key ranges: row ``i`` of batch ``b`` sees key ``j`` iff ``key_start[b] <= j < key_end[b]``
  and, when causal, ``j <= i + key_end[b] - S_q`` (bottom-right alignment to the end of the
  visible range; plain ``attention`` is the special case ``key_start=0, key_end=S_k``).
* A row that sees no key is all zeros.
"""

from __future__ import annotations

import torch


def visibility_mask(num_queries, num_keys, key_start, key_end, causal, device=None):
    """Boolean mask ``[S_q, S_k]``: True where query row i may attend key column j."""
    rows = torch.arange(num_queries, device=device).unsqueeze(1)  # [S_q, 1]
    cols = torch.arange(num_keys, device=device).unsqueeze(0)  # [1, S_k]
    mask = ((cols >= key_start) & (cols < key_end)).expand(num_queries, num_keys)
    if causal:
        mask = mask & (cols <= rows + (key_end - num_queries))
    return mask


def attention_ref(q, k, v, *, causal=False, scale=None, key_start=None, key_end=None,
                  query_chunk=1024):
    """float64 attention with GQA by head mapping and optional per-batch key ranges.

    Parameters
    ----------
    q : Tensor ``[B, H_q, S_q, D]``
    k, v : Tensor ``[B, H_kv, S_k, D]``
    causal : bool
        Bottom-right aligned to ``key_end[b]`` (``S_k`` when no ranges are given).
    scale : float, optional
        Defaults to ``D ** -0.5``.
    key_start, key_end : sequence of int or int Tensor ``[B]``, optional
        Visible key window per batch entry; defaults ``0`` and ``S_k``.
    query_chunk : int
        Query rows processed at once (bounds memory at long sequence lengths).

    Returns
    -------
    Tensor ``[B, H_q, S_q, D]`` float64 on q's device.
    """
    batch, num_q_heads, num_queries, head_dim = q.shape
    num_kv_heads, num_keys = k.shape[1], k.shape[2]
    assert num_q_heads % num_kv_heads == 0
    group = num_q_heads // num_kv_heads
    if scale is None:
        scale = head_dim ** -0.5
    starts = [0] * batch if key_start is None else [int(x) for x in key_start]
    ends = [num_keys] * batch if key_end is None else [int(x) for x in key_end]

    # Explicit head mapping: query head h -> KV head h // group.
    kv_head_of = torch.arange(num_q_heads, device=q.device) // group
    out = torch.zeros(batch, num_q_heads, num_queries, head_dim, dtype=torch.float64,
                      device=q.device)
    if num_keys == 0:
        return out  # no key anywhere: every row is zero
    for b in range(batch):
        kb = k[b].to(torch.float64)[kv_head_of]  # [H_q, S_k, D]
        vb = v[b].to(torch.float64)[kv_head_of]  # [H_q, S_k, D]
        mask = visibility_mask(num_queries, num_keys, starts[b], ends[b], causal, q.device)
        for r0 in range(0, num_queries, query_chunk):
            r1 = min(num_queries, r0 + query_chunk)
            qb = q[b, :, r0:r1].to(torch.float64)  # [H_q, rows, D]
            scores = torch.matmul(qb, kb.transpose(-1, -2)) * scale
            m = mask[r0:r1].unsqueeze(0)  # [1, rows, S_k]
            scores = scores.masked_fill(~m, float("-inf"))
            row_max = scores.amax(dim=-1, keepdim=True)
            # Rows with no visible key have max -inf; make them produce exact zeros.
            row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
            p = torch.exp(scores - row_max).masked_fill(~m, 0.0)
            denom = p.sum(dim=-1, keepdim=True)
            p = p / torch.where(denom > 0, denom, torch.ones_like(denom))
            out[b, :, r0:r1] = torch.matmul(p, vb)
    return out


def lowp_attention_torch(q, k, v, *, causal=False, scale=None, key_start=None, key_end=None,
                         query_chunk=1024):
    """What plain PyTorch gets in the inputs' own dtype: repeated KV, matmul + masked softmax
    in q.dtype. Used as the yardstick for the low-precision accuracy criterion.

    Returns Tensor ``[B, H_q, S_q, D]`` in q.dtype.
    """
    batch, num_q_heads, num_queries, head_dim = q.shape
    num_kv_heads, num_keys = k.shape[1], k.shape[2]
    group = num_q_heads // num_kv_heads
    if scale is None:
        scale = head_dim ** -0.5
    starts = [0] * batch if key_start is None else [int(x) for x in key_start]
    ends = [num_keys] * batch if key_end is None else [int(x) for x in key_end]
    kv_head_of = torch.arange(num_q_heads, device=q.device) // group
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    for b in range(batch):
        kb, vb = k[b][kv_head_of], v[b][kv_head_of]  # [H_q, S_k, D], q.dtype
        mask = visibility_mask(num_queries, num_keys, starts[b], ends[b], causal, q.device)
        for r0 in range(0, num_queries, query_chunk):
            r1 = min(num_queries, r0 + query_chunk)
            scores = torch.matmul(q[b, :, r0:r1], kb.transpose(-1, -2)) * scale  # q.dtype
            scores = scores.masked_fill(~mask[r0:r1], float("-inf"))
            p = torch.softmax(scores, dim=-1)
            p = torch.nan_to_num(p, nan=0.0)  # fully masked rows
            out[b, :, r0:r1] = torch.matmul(p, vb)
    return out


def kv_cache_ref(q, k_cache, v_cache, cache_seqlens, k=None, v=None, *, causal=True,
                 scale=None, block_table=None):
    """Reference for ``attention_with_kv_cache``.

    Works on copies; returns ``(out float64 [B, H_q, S_q, D], k_cache_after, v_cache_after)``
    where the caches are what the op must leave behind (same dtype/layout as the inputs:
    contiguous ``[B, H_kv, S_max, D]`` or paged ``[num_pages, H_kv, page_size, D]``).
    """
    num_queries = q.shape[2]
    lens = [int(x) for x in cache_seqlens]
    batch = q.shape[0]
    k_after, v_after = k_cache.clone(), v_cache.clone()
    if k is not None:
        if block_table is None:
            for b in range(batch):
                k_after[b, :, lens[b]:lens[b] + num_queries] = k[b]
                v_after[b, :, lens[b]:lens[b] + num_queries] = v[b]
        else:
            page_size = k_cache.shape[2]
            for b in range(batch):
                for t in range(num_queries):
                    pos = lens[b] + t
                    page = int(block_table[b, pos // page_size])
                    k_after[page, :, pos % page_size] = k[b, :, t]
                    v_after[page, :, pos % page_size] = v[b, :, t]
    total = [n + (num_queries if k is not None else 0) for n in lens]
    k_lin, v_lin = linearize(k_after, v_after, total, block_table)
    out = attention_ref(q, k_lin, v_lin, causal=causal, scale=scale,
                        key_start=[0] * batch, key_end=total)
    return out, k_after, v_after


def linearize(k_cache, v_cache, total, block_table=None):
    """Per-sequence contiguous copies ``[B, H_kv, S, D]`` of (possibly paged) caches, with every
    slot at or past ``total[b]`` zeroed: those slots are invisible, and may hold NaN garbage on
    purpose, which must not leak into the reference through 0 * NaN."""
    if block_table is None:
        k_lin, v_lin = k_cache.clone(), v_cache.clone()
    else:
        k_lin, v_lin = gather_pages(k_cache, block_table), gather_pages(v_cache, block_table)
    for b, n in enumerate(total):
        k_lin[b, :, n:] = 0
        v_lin[b, :, n:] = 0
    return k_lin, v_lin


def lowp_kv_ref(q, k_cache, v_cache, total, causal, block_table=None):
    """PyTorch's own low-precision attention of q ``[B, H_q, S_q, D]`` over the first ``total[b]``
    keys of each sequence of (possibly paged) caches, as they are after the call (`linearize`):
    the yardstick of `assert_close_to_ref` for decode."""
    k_lin, v_lin = linearize(k_cache, v_cache, total, block_table)
    return lowp_attention_torch(q, k_lin, v_lin, causal=causal, key_start=[0] * q.shape[0], key_end=total)


def gather_pages(pages, block_table):
    """Linearise a paged cache: ``[num_pages, H, P, D]`` + table ``[B, M]`` -> ``[B, H, M*P, D]``."""
    batch, max_pages = block_table.shape
    num_heads, page_size, head_dim = pages.shape[1], pages.shape[2], pages.shape[3]
    idx = block_table.long().clamp(0, pages.shape[0] - 1)  # [B, M]
    gathered = pages[idx.reshape(-1)]  # [B*M, H, P, D]
    gathered = gathered.reshape(batch, max_pages, num_heads, page_size, head_dim)
    return gathered.permute(0, 2, 1, 3, 4).reshape(batch, num_heads, max_pages * page_size,
                                                   head_dim)


def max_err(a, b):
    """Max absolute difference, computed in float64."""
    if a.numel() == 0:
        return 0.0
    return (a.to(torch.float64) - b.to(torch.float64)).abs().max().item()


# Floors for the low-precision criterion: ours <= 2 * torch_err + floor.
LOWP_FLOOR = {torch.float16: 1e-3, torch.bfloat16: 1e-2}
FP32_ATOL = 1e-4


def assert_close_to_ref(out, ref64, torch_lowp=None, *, what=""):
    """Accuracy criterion of the project.

    float32: max |out - ref| <= 1e-4 (scaled up mildly for large-magnitude outputs).
    float16/bfloat16: max |out - ref| <= 2 * max |torch_lowp - ref| + floor.
    """
    assert torch.isfinite(out).all(), f"{what}: output has NaN/Inf"
    err = max_err(out, ref64)
    if out.dtype == torch.float32:
        mag = max(1.0, ref64.abs().max().item()) if ref64.numel() else 1.0
        tol = FP32_ATOL * mag
        assert err <= tol, f"{what}: float32 max err {err:.3g} > {tol:.3g}"
    else:
        assert torch_lowp is not None
        torch_err = max_err(torch_lowp, ref64)
        tol = 2 * torch_err + LOWP_FLOOR[out.dtype]
        assert err <= tol, (f"{what}: {out.dtype} max err {err:.3g} > 2*torch err "
                            f"{torch_err:.3g} + floor {LOWP_FLOOR[out.dtype]}")


def randn(shape, dtype, device="cpu", *, generator=None, bshd=False, scale=1.0):
    """Random normal tensor ``shape`` = ``[B, H, S, D]``; with ``bshd=True`` it is a transposed
    view of a ``[B, S, H, D]`` buffer (the non-contiguous layout transformers passes)."""
    if bshd:
        b, h, s, d = shape
        base = torch.randn((b, s, h, d), generator=generator, dtype=torch.float32) * scale
        return base.to(dtype=dtype, device=device).transpose(1, 2)
    base = torch.randn(shape, generator=generator, dtype=torch.float32) * scale
    return base.to(dtype=dtype, device=device)


def build_paged(k_cache, v_cache, lens, s_q, page_size, generator, *, extra_pages=0,
                extra_columns=0, unused="minus_one", with_new=True, garbage="randn"):
    """Scatter contiguous caches ``[B, H, S_max, D]`` into a pool with a random page permutation.

    Each sequence gets the pages for ``lens[b] + s_q`` tokens. Pool slots not holding a valid
    token get fresh random garbage. Returns ``(k_pages, v_pages, block_table)``.
    """
    batch, heads, _, head_dim = k_cache.shape
    need = [-(-(n + (s_q if with_new else 0)) // page_size) for n in lens]
    num_pages = sum(need) + extra_pages
    num_pages = max(num_pages, 1)
    perm = torch.randperm(num_pages, generator=generator).tolist()
    max_pages = max(max(need), 1) + extra_columns
    table = torch.full((batch, max_pages), -1, dtype=torch.int32)
    if unused == "random":
        table = torch.randint(0, num_pages, (batch, max_pages), generator=generator,
                              dtype=torch.int32)
    k_pages = randn((num_pages, heads, page_size, head_dim), k_cache.dtype, generator=generator)
    v_pages = randn((num_pages, heads, page_size, head_dim), k_cache.dtype, generator=generator)
    if garbage == "nan":  # uninitialised memory: invisible slots must not leak into results
        k_pages.fill_(float("nan"))
        v_pages.fill_(float("nan"))
    it = iter(perm)
    for b in range(batch):
        for i in range(need[b]):
            table[b, i] = next(it)
        for pos in range(lens[b]):
            page, slot = int(table[b, pos // page_size]), pos % page_size
            k_pages[page, :, slot] = k_cache[b, :, pos]
            v_pages[page, :, slot] = v_cache[b, :, pos]
    return k_pages, v_pages, table


def bit_equal(a, b):
    """Bitwise equality (NaN payloads included), for 'exactly these slots changed' checks."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    return torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))


def record_launches(monkeypatch, module, name):
    """Launches of the Triton kernel ``module.<name>`` while the test runs: the returned list fills
    with one (grid, keyword arguments) pair per launch; each launch still runs the real kernel."""
    launches = []
    real = getattr(module, name)

    class Recorder:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                launches.append((grid, kwargs))
                return real[grid](*args, **kwargs)
            return launch

    monkeypatch.setattr(module, name, Recorder())
    return launches
