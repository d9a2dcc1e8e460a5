"""Decode attention against a KV cache: flashkv vs PyTorch SDPA vs the transformers pattern.

One query token per sequence (S_q = 1) attends over the KV cache. Decode is memory-bound, so
each provider is reported against the bandwidth limit: µs per call, bytes moved, GB/s and % of
the 3.0 TB/s the H100 reaches here, and the speedup over SDPA's cuDNN backend.

Providers (all timed in one run, by CUDA-graph replay):

- ``flashkv``: ``flashkv_ops.attention_with_kv_cache(q, k_cache, v_cache, cache_seqlens)``.
- ``flashkv+append``: the same call also writing this step's k/v into the cache in place
  (``cache_seqlens = length - 1``, so the same keys are attended): the cost of the append.
- ``flashkv+read_order``, ``flashkv+append+read_order`` (paged only): the same calls with the table
  ``flashkv_ops.paged_read_order`` returns (each sequence's full pages in pool order), worked out
  once outside the timed calls as a decode loop does once per step for all layers; the row's
  ``order_us`` is that call's own time.
- ``sdpa_cudnn`` / ``sdpa_flash``: ``F.scaled_dot_product_attention`` restricted to one backend;
  GQA through ``enable_gqa=True`` when the backend takes it, else K/V repeated once outside the
  timed region (the row's ``gqa`` field says which). They have no per-sequence lengths: in the
  variable-length case they attend all ``S_max`` keys (a timing reference, not the same result).
- ``hf_static_mask``: what transformers' static cache does: its ``sdpa_attention_forward`` over
  the whole ``S_max`` buffer with a boolean padding mask, SDPA choosing the backend.

Layouts: ``contiguous`` (every sequence full), ``varlen`` (lengths uniform in [1, S_max],
seeded) and ``paged`` (page_size 16, pages randomly permuted in a pool; flashkv only, compared
with its contiguous run). Consecutive calls use ``--cache-copies`` (3) copies of the cache in
turn, paged copies each with its own permutation: no call finds its predecessor's lines in the
L2, and the figure is not one allocation's placement (worth ±1% on a 67 MB pool).

Run ``python benchmarks/bench_decode.py --help``; rows go to ``<out>/decode.json``, the plot to
``<out>/decode.png``.
"""

from __future__ import annotations

import argparse
import functools
import math
import sys
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

if __package__ in (None, ""):
    # Run as a script: make `benchmarks` importable from the repository root.
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
import torch.nn.functional as F

from benchmarks import common

# (batch, num_q_heads, num_kv_heads, S, head_dim): the shapes issue 3 sets targets for, then
# grids of a little more than one, of 1.7 and of a little more than two waves of (sequence, KV
# head) programs on 132 SMs (Llama-3-8B at batch 17, Llama-3.2-1B at batch 17, 28 and 36).
FIXED_CONFIGS: tuple[tuple[int, int, int, int, int], ...] = (
    (16, 8, 8, 2048, 64),
    (1, 32, 8, 32768, 128),
    (32, 32, 8, 4096, 128),
    (8, 32, 4, 8192, 64),
    (64, 32, 8, 2048, 128),
    (17, 32, 8, 2048, 128),
    (17, 32, 8, 2048, 64),
    (28, 32, 8, 2048, 64),
    (36, 32, 8, 2048, 64),
)
VARLEN_CONFIG = (32, 32, 8, 4096, 128)
PAGE_SIZE = 16

FLASHKV_PROVIDERS = ("flashkv", "flashkv+append", "flashkv+read_order", "flashkv+append+read_order")
PROVIDERS = FLASHKV_PROVIDERS + ("sdpa_cudnn", "sdpa_flash", "hf_static_mask")
PAGED_PROVIDERS = FLASHKV_PROVIDERS
# Paged-only providers and the provider whose contiguous row they are compared with.
PAGED_ONLY = {"flashkv+read_order": "flashkv", "flashkv+append+read_order": "flashkv+append"}
KEY_FIELDS = (
    "batch", "num_q_heads", "num_kv_heads", "max_seqlen", "head_dim", "dtype", "layout",
    "page_size", "provider",
)
TRANSFORMERS_IMPL = "transformers sdpa_attention_forward"
# Where the tensors live; the CPU smoke test sets "cpu" to run the set-up code paths.
DEVICE = "cuda"
# A result further than this from the fp32 reference is flagged (decode outputs are O(1/sqrt(S))).
CHECK_ATOL = 2e-2


@dataclass(frozen=True)
class DecodeCase:
    """One decode shape and cache layout.

    ``layout`` is ``"contiguous"`` (all sequences hold ``max_seqlen`` tokens), ``"varlen"``
    (lengths drawn uniformly from [1, max_seqlen]) or ``"paged"`` (full sequences stored in
    ``page_size``-token pages scattered over a pool).
    """

    batch: int
    num_q_heads: int
    num_kv_heads: int
    max_seqlen: int
    head_dim: int
    layout: str = "contiguous"
    page_size: int | None = None

    @property
    def name(self) -> str:
        return (
            f"B{self.batch} H{self.num_q_heads}/{self.num_kv_heads} "
            f"S{self.max_seqlen} D{self.head_dim}"
        )

    def fields(self, dtype_name: str) -> dict[str, Any]:
        return {
            "bench": "decode",
            "config": self.name,
            "batch": self.batch,
            "num_q_heads": self.num_q_heads,
            "num_kv_heads": self.num_kv_heads,
            "max_seqlen": self.max_seqlen,
            "head_dim": self.head_dim,
            "dtype": dtype_name,
            "layout": self.layout,
            "page_size": self.page_size,
        }


def default_cases(include_paged: bool = True) -> list[DecodeCase]:
    """The issue-3 set: fixed-length shapes, the variable-length case, paged twins."""
    cases = [DecodeCase(*shape) for shape in FIXED_CONFIGS]
    cases.append(DecodeCase(*VARLEN_CONFIG, layout="varlen"))
    if include_paged:
        cases += [DecodeCase(*shape, layout="paged", page_size=PAGE_SIZE)
                  for shape in FIXED_CONFIGS]
    return cases


# --------------------------------------------------------------------------------------------
# pure helpers (tested on CPU)
# --------------------------------------------------------------------------------------------


def make_lengths(case: DecodeCase, seed: int = 0) -> torch.Tensor:
    """Per-sequence cache lengths, int32 ``[batch]`` on the CPU.

    Full (``max_seqlen``) for contiguous and paged layouts; uniform in [1, max_seqlen] from a
    generator seeded with ``seed`` for ``varlen``, so every run draws the same lengths.
    """
    if case.layout == "varlen":
        generator = torch.Generator().manual_seed(seed)
        return torch.randint(1, case.max_seqlen + 1, (case.batch,), generator=generator,
                             dtype=torch.int32)
    return torch.full((case.batch,), case.max_seqlen, dtype=torch.int32)


def decode_bytes(
    total_tokens: int,
    batch: int,
    num_q_heads: int,
    num_kv_heads: int,
    head_dim: int,
    elem_bytes: int,
    *,
    append: bool = False,
) -> int:
    """Bytes a decode step must move at least.

    K and V of every cached token (``total_tokens`` summed over the batch, ``num_kv_heads``
    heads, never repeated), plus reading q and writing the output (``[batch, num_q_heads, 1,
    head_dim]`` each). With ``append`` the new k/v (``[batch, num_kv_heads, 1, head_dim]``
    each) are read once and written into the cache once more.
    """
    kv = 2 * total_tokens * num_kv_heads * head_dim * elem_bytes
    q_and_out = 2 * batch * num_q_heads * head_dim * elem_bytes
    new_kv = 2 * 2 * batch * num_kv_heads * head_dim * elem_bytes if append else 0
    return kv + q_and_out + new_kv


def bandwidth_figures(us: float, nbytes: int) -> dict[str, float]:
    """GB/s and % of the 3.0 TB/s ceiling for ``nbytes`` moved in ``us`` microseconds."""
    bytes_per_s = nbytes / (us * 1e-6)
    return {
        "gbps": bytes_per_s / 1e9,
        "pct_bw": 100.0 * bytes_per_s / common.H100_BANDWIDTH_BYTES_PER_S,
    }


def random_block_table(batch: int, pages_per_seq: int, seed: int = 0) -> torch.Tensor:
    """int32 ``[batch, pages_per_seq]``: a random permutation of pool pages, one per slot."""
    generator = torch.Generator().manual_seed(seed)
    pages = torch.randperm(batch * pages_per_seq, generator=generator)
    return pages.to(torch.int32).view(batch, pages_per_seq)


def to_paged(cache: torch.Tensor, block_table: torch.Tensor, page_size: int) -> torch.Tensor:
    """Scatter a contiguous cache into a page pool laid out as ``block_table`` says.

    Parameters
    ----------
    cache : Tensor
        ``[batch, num_kv_heads, S_max, head_dim]``.
    block_table : Tensor
        int ``[batch, pages_per_seq]`` with ``pages_per_seq * page_size >= S_max``.
    page_size : int

    Returns
    -------
    Tensor
        ``[batch * pages_per_seq, num_kv_heads, page_size, head_dim]``: position ``p`` of
        sequence ``b`` in page ``block_table[b, p // page_size]``, slot ``p % page_size``.
    """
    batch, heads, max_seqlen, head_dim = cache.shape
    pages_per_seq = block_table.shape[1]
    padded = pages_per_seq * page_size
    if padded < max_seqlen:
        raise ValueError(f"block_table covers {padded} positions, the cache holds {max_seqlen}")
    if padded > max_seqlen:
        cache = F.pad(cache, (0, 0, 0, padded - max_seqlen))
    # [B, H, P, page, D] -> [B, P, H, page, D] -> [B*P, H, page, D]
    pages = cache.view(batch, heads, pages_per_seq, page_size, head_dim).permute(0, 2, 1, 3, 4)
    pages = pages.reshape(batch * pages_per_seq, heads, page_size, head_dim)
    pool = torch.empty_like(pages)
    pool[block_table.reshape(-1).long().to(pool.device)] = pages
    return pool


def reference_decode(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, lengths: torch.Tensor
) -> torch.Tensor:
    """fp32 decode attention over the first ``lengths[b]`` cache positions.

    ``q``: ``[B, H_q, 1, D]``; caches ``[B, H_kv, S_max, D]``; returns ``[B, H_q, 1, D]`` fp32.
    """
    batch, num_q_heads, _, head_dim = q.shape
    num_kv_heads = k_cache.shape[1]
    group = num_q_heads // num_kv_heads
    out = torch.empty(batch, num_q_heads, 1, head_dim, dtype=torch.float32, device=q.device)
    # One sequence at a time keeps the fp32 copies of the cache small.
    for b in range(batch):
        length = int(lengths[b])
        qg = q[b, :, 0].float().view(num_kv_heads, group, head_dim)  # [H_kv, G, D]
        keys = k_cache[b, :, :length].float()  # [H_kv, L, D]
        values = v_cache[b, :, :length].float()
        scores = torch.einsum("hgd,hld->hgl", qg, keys) * head_dim**-0.5
        probs = torch.softmax(scores, dim=-1)
        out[b, :, 0] = torch.einsum("hgl,hld->hgd", probs, values).reshape(num_q_heads, head_dim)
    return out


# --------------------------------------------------------------------------------------------
# table
# --------------------------------------------------------------------------------------------


def _peer_key(row: dict[str, Any], layout: str) -> tuple:
    return (row["batch"], row["num_q_heads"], row["num_kv_heads"], row["max_seqlen"],
            row["head_dim"], row["dtype"], layout)


def decode_sort_key(row: dict[str, Any]) -> tuple:
    """Order rows as the issue lists them: layout, shape, then provider."""
    layouts = ("contiguous", "varlen", "paged")
    shape = (row.get("batch"), row.get("num_q_heads"), row.get("num_kv_heads"),
             row.get("max_seqlen"), row.get("head_dim"))
    shapes = list(FIXED_CONFIGS) + [VARLEN_CONFIG]
    providers = PROVIDERS + ("setup",)
    return (
        str(row.get("dtype")),
        layouts.index(row["layout"]) if row.get("layout") in layouts else len(layouts),
        shapes.index(shape) if shape in shapes else len(shapes),
        str(shape),
        providers.index(row["provider"]) if row.get("provider") in providers else len(providers),
    )


def decode_table(rows: Sequence[dict[str, Any]]) -> str:
    """Markdown table of decode rows: µs, GB/s, % of 3.0 TB/s, speedup over SDPA cuDNN.

    Paged rows are compared with SDPA cuDNN on the contiguous cache of the same shape, and
    their notes give the ratio to flashkv's contiguous time.
    """
    by_key: dict[tuple, dict[str, dict[str, Any]]] = {}
    for row in rows:
        by_key.setdefault(_peer_key(row, row["layout"]), {})[row["provider"]] = row

    def time_of(key: tuple, provider: str) -> float | None:
        row = by_key.get(key, {}).get(provider)
        return None if row is None or row.get("error") else row.get("us")

    body = []
    for row in sorted(rows, key=decode_sort_key):
        notes = []
        peer_layout = "contiguous" if row["layout"] == "paged" else row["layout"]
        cudnn_us = time_of(_peer_key(row, peer_layout), "sdpa_cudnn")
        speedup = None
        if row.get("error"):
            notes.append("error: " + str(row["error"])[:80])
        else:
            if cudnn_us and row.get("us"):
                speedup = cudnn_us / row["us"]
            if row["layout"] == "paged":
                contiguous_us = time_of(_peer_key(row, "contiguous"),
                                        PAGED_ONLY.get(row["provider"], row["provider"]))
                if contiguous_us and row.get("us"):
                    notes.append(f"{contiguous_us / row['us']:.2f}× its contiguous speed")
            if row.get("gqa") and row["gqa"] not in ("none", "enable_gqa"):
                notes.append(f"gqa: {row['gqa']}")
            if row.get("impl") and row["impl"] != TRANSFORMERS_IMPL:
                notes.append(row["impl"])
            if row.get("note"):
                notes.append(row["note"])
            if row.get("max_abs_diff") is not None and row["max_abs_diff"] > CHECK_ATOL:
                notes.append(f"MISMATCH max|Δ|={row['max_abs_diff']:.3g}")
            if row.get("timing") and row["timing"] != "cuda_graph":
                notes.append(f"timing: {row['timing']}")
        layout = row["layout"]
        if layout == "varlen" and row.get("mean_len") is not None:
            layout = f"varlen (mean {row['mean_len']:.0f})"
        elif layout == "paged":
            layout = f"paged {row.get('page_size')}"
        body.append([
            row["config"],
            layout,
            row["dtype"],
            row["provider"],
            common.fmt(row.get("us"), 1),
            common.fmt(row.get("gbps"), 0),
            common.fmt(row.get("pct_bw"), 1),
            "-" if speedup is None else f"{speedup:.2f}×",
            "; ".join(notes),
        ])
    headers = ["config (B, Hq/Hkv, S, D)", "layout", "dtype", "provider", "µs", "GB/s",
               f"% of {common.BANDWIDTH_LABEL}", "vs cuDNN", "notes"]
    return common.markdown_table(headers, body)


# --------------------------------------------------------------------------------------------
# providers
# --------------------------------------------------------------------------------------------


def transformers_sdpa_call(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor
) -> tuple[Callable[[], torch.Tensor], str]:
    """The static-cache decode step of transformers: its own SDPA wrapper with a padding mask.

    ``mask``: bool ``[B, 1, 1, S_max]``. Returns the call (output ``[B, 1, H_q, D]``, as
    transformers returns it) and a note naming the implementation used.
    """
    group = q.shape[1] // k.shape[1]
    scale = q.shape[-1] ** -0.5
    try:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward
    except ImportError:
        sdpa_attention_forward = None
    if sdpa_attention_forward is not None:
        # The attributes transformers' wrapper reads from the attention module.
        module = types.SimpleNamespace(num_key_value_groups=group, is_causal=True, layer_idx=0,
                                       training=False)

        def call():
            return sdpa_attention_forward(module, q, k, v, mask, scaling=scale)[0]

        return call, TRANSFORMERS_IMPL

    # Older transformers: the same recipe by hand (repeat K/V, masked SDPA), repeat timed too.
    def call():
        key = k.repeat_interleave(group, dim=1) if group > 1 else k
        value = v.repeat_interleave(group, dim=1) if group > 1 else v
        out = F.scaled_dot_product_attention(q, key, value, attn_mask=mask, scale=scale)
        return out.transpose(1, 2).contiguous()

    return call, "repeat_kv + masked SDPA (transformers wrapper not importable)"


def _max_abs_diff(out: torch.Tensor, expected: torch.Tensor) -> float:
    return float((out.float() - expected).abs().max())


def run_case(case: DecodeCase, args: argparse.Namespace, sink: common.RowSink) -> None:
    """Measure every requested provider on one case and add the rows to ``sink``."""
    dtype = common.DTYPES[args.dtype]
    elem_bytes = torch.finfo(dtype).bits // 8
    device = torch.device(DEVICE)
    B, Hq, Hkv, S, D = (case.batch, case.num_q_heads, case.num_kv_heads, case.max_seqlen,
                        case.head_dim)
    lengths_cpu = make_lengths(case, seed=args.seed)
    total_tokens = int(lengths_cpu.sum())
    config = case.fields(args.dtype)
    config["mean_len"] = total_tokens / B
    held_bytes = decode_bytes(total_tokens, B, Hq, Hkv, D, elem_bytes)
    full_bytes = decode_bytes(B * S, B, Hq, Hkv, D, elem_bytes)
    common.log(f"--- {case.name} {case.layout} {args.dtype}: KV held "
               f"{held_bytes / 1e6:.0f} MB (S_max buffer {full_bytes / 1e6:.0f} MB)")

    torch.manual_seed(args.seed)
    q = torch.randn(B, Hq, 1, D, device=device, dtype=dtype)
    k_cache = torch.randn(B, Hkv, S, D, device=device, dtype=dtype)
    v_cache = torch.randn(B, Hkv, S, D, device=device, dtype=dtype)
    lengths = lengths_cpu.to(device)
    expected = reference_decode(q, k_cache, v_cache, lengths_cpu)
    graph_kwargs = {"calls_per_graph": args.graph_calls, "replays": args.replays}

    def timed(call, nbytes: int, out_to_bhsd=lambda out: out, check=True) -> dict[str, Any]:
        out = call()  # first call: compilation/autotune and the correctness check
        common.sync()
        figures: dict[str, Any] = {
            "max_abs_diff": _max_abs_diff(out_to_bhsd(out), expected) if check else None,
        }
        us, clock = common.time_us(call, method=args.timing, **graph_kwargs)
        figures.update({"us": us, "bytes": nbytes, "timing": clock})
        figures.update(bandwidth_figures(us, nbytes))
        return figures

    # New k/v equal to what the cache holds at position length-1, with cache_seqlens one less:
    # the append rewrites identical values, so every replay attends the same keys.
    batch_index = torch.arange(B, device=device)
    last = (lengths - 1).long()
    k_new = k_cache[batch_index, :, last].unsqueeze(2)  # [B, H_kv, 1, D]
    v_new = v_cache[batch_index, :, last].unsqueeze(2)
    seqlens_before = (lengths - 1).to(torch.int32)

    # args.cache_copies copies of the cache (equal contents, separate allocations; paged copies
    # with their own page permutation), used in turn by consecutive calls: no call finds the
    # previous one's lines in the L2, and no single allocation's placement decides the figure.
    config["cache_copies"] = args.cache_copies
    if case.layout == "paged":
        pages_per_seq = math.ceil(S / case.page_size)
        tables = [random_block_table(B, pages_per_seq, seed=args.seed + index).to(device)
                  for index in range(args.cache_copies)]
        flashkv_stores = [(to_paged(k_cache, table, case.page_size),
                           to_paged(v_cache, table, case.page_size), {"block_table": table})
                          for table in tables]
        copies = []  # SDPA providers do not run on paged layouts
    else:
        copies = [(k_cache, v_cache)] + [(k_cache.clone(), v_cache.clone())
                                         for _ in range(args.cache_copies - 1)]
        flashkv_stores = [(k_copy, v_copy, {}) for k_copy, v_copy in copies]

    providers = [p for p in args.providers
                 if (p in PAGED_PROVIDERS if case.layout == "paged" else p not in PAGED_ONLY)]
    for provider in providers:
        def body(provider=provider) -> dict[str, Any]:
            if provider in FLASHKV_PROVIDERS:
                import flashkv_ops

                append = "+append" in provider
                seqlens = seqlens_before if append else lengths
                new_tokens = (k_new, v_new) if append else ()
                stores = flashkv_stores
                if provider.endswith("+read_order"):  # worked out once, as a decode loop does per step
                    stores = [(k_store, v_store, {"block_table": flashkv_ops.paged_read_order(
                        paged_kwargs["block_table"], seqlens, case.page_size)})
                        for k_store, v_store, paged_kwargs in flashkv_stores]
                figures = timed(common.rotating([
                    functools.partial(flashkv_ops.attention_with_kv_cache, q, k_store, v_store, seqlens,
                                      *new_tokens, **paged_kwargs)
                    for k_store, v_store, paged_kwargs in stores]),
                    decode_bytes(total_tokens, B, Hq, Hkv, D, elem_bytes, append=append))
                notes = ["writes this step's k/v in place"] if append else []
                if stores is not flashkv_stores:
                    figures["order_us"], _ = common.time_us(
                        functools.partial(flashkv_ops.paged_read_order, flashkv_stores[0][2]["block_table"],
                                          seqlens, case.page_size), method=args.timing, **graph_kwargs)
                    notes.append(f"table from paged_read_order ({figures['order_us']:.1f} µs, once per step)")
                if notes:
                    figures["note"] = "; ".join(notes)
                return figures
            if provider in ("sdpa_cudnn", "sdpa_flash"):
                backend = common.sdpa_backends()[provider]
                if backend is None:
                    raise RuntimeError(
                        f"this torch ({torch.__version__}) has no SDPA backend for {provider}")
                bound = [common.sdpa_call_with_gqa(backend, q, k_copy, v_copy)
                         for k_copy, v_copy in copies]
                call, gqa = common.rotating([call for call, _, _ in bound]), bound[0][1]
                if case.layout == "varlen":
                    # No per-sequence lengths: it reads the whole buffer; compare time only.
                    figures = timed(call, held_bytes, check=False)
                    figures["bytes_read"] = full_bytes
                    figures["gbps_read"] = bandwidth_figures(figures["us"], full_bytes)["gbps"]
                    figures["note"] = "attends all S_max keys (no lengths): time reference"
                else:
                    figures = timed(call, held_bytes)
                figures["gqa"] = gqa
                return figures
            if provider == "hf_static_mask":
                positions = torch.arange(S, device=device)
                mask = (positions[None, :] < lengths[:, None].long())[:, None, None, :]
                bound = [transformers_sdpa_call(q, k_copy, v_copy, mask)
                         for k_copy, v_copy in copies]
                call, impl = common.rotating([call for call, _ in bound]), bound[0][1]
                figures = timed(call, held_bytes, out_to_bhsd=lambda out: out.transpose(1, 2))
                figures["bytes_read"] = full_bytes
                figures["gbps_read"] = bandwidth_figures(figures["us"], full_bytes)["gbps"]
                figures["impl"] = impl
                if case.layout == "varlen":
                    figures["note"] = (f"masked read of S_max: {full_bytes / 1e6:.0f} MB at "
                                       f"{figures['gbps_read']:.0f} GB/s")
                return figures
            raise ValueError(f"unknown provider {provider!r}")

        row = common.run_provider(config, provider, body)
        sink.add(row)
        if row["error"]:
            common.log(f"  {provider:15s} ERROR {row['error'][:200]}")
        else:
            common.log(f"  {provider:15s} {row['us']:9.1f} µs {row['gbps']:7.0f} GB/s "
                       f"{row['pct_bw']:5.1f}% |Δ|={common.fmt(row.get('max_abs_diff'), 4)}")


# --------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=common.DEFAULT_OUT,
                        help="directory for decode.json and decode.png (default %(default)s)")
    parser.add_argument("--dtype", choices=sorted(common.DTYPES), default="fp16")
    parser.add_argument("--providers", default=",".join(PROVIDERS),
                        help="comma-separated subset of " + ",".join(PROVIDERS))
    parser.add_argument("--layouts", default="contiguous,varlen,paged",
                        help="comma-separated subset of contiguous,varlen,paged")
    parser.add_argument("--timing", choices=("graph", "do_bench"), default="graph")
    parser.add_argument("--graph-calls", type=int, default=20,
                        help="calls captured per CUDA graph (default %(default)s)")
    parser.add_argument("--replays", type=int, default=30,
                        help="timed graph replays; the median is reported (default %(default)s)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache-copies", type=int, default=3,
                        help="copies of each cache, used in turn by consecutive calls "
                             "(default %(default)s)")
    parser.add_argument("--fresh", action="store_true",
                        help="overwrite decode.json instead of merging with stored rows")
    parser.add_argument("--no-plot", action="store_true")
    args = parser.parse_args(argv)
    args.providers = common.choice_list(parser, "--providers", args.providers, PROVIDERS)
    args.layouts = common.choice_list(parser, "--layouts", args.layouts, ("contiguous", "varlen", "paged"))
    if args.cache_copies < 1:
        parser.error(f"--cache-copies must be >= 1, got {args.cache_copies}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    common.require_cuda("bench_decode.py")
    common.line_buffered_stdout()
    common.log("env:", common.env_tags())
    sink = common.RowSink(args.out / "decode.json", KEY_FIELDS, fresh=args.fresh)
    cases = [case for case in default_cases() if case.layout in args.layouts]
    for case in cases:
        try:
            run_case(case, args, sink)
        except Exception as exc:  # noqa: BLE001 - setup failure (e.g. OOM): record, go on
            sink.add(common.make_row({**case.fields(args.dtype)}, "setup",
                                     error=common.short_error(exc)))
            common.log(f"  setup failed: {common.short_error(exc, 300)}")
        common.free_cuda_memory()

    return common.finish(sink, decode_table(sink.new_rows), "plot_decode", args.out / "decode.png", args.no_plot)


if __name__ == "__main__":
    raise SystemExit(main())
