"""Prefill attention: flashkv vs PyTorch SDPA (cuDNN and FlashAttention backends).

Prompt processing is compute-bound, so providers are compared in TFLOP/s:
``4 * B * H_q * S_q * S_k * D / t``, with causal work counted as half (for a query chunk at
the end of a longer cache, the full rectangle before the chunk plus half the square).

Providers, in one run, timed by CUDA-graph replay (``--timing graph``, the default: GPU time
without the host's launch path, as under ``torch.compile``/CUDA graphs) or with
``triton.testing.do_bench`` (``--timing do_bench``: eager calls, the host path included; at
~0.2 ms kernels the eager host path, ~130 µs per flashkv call, shows through):

- ``flashkv``: ``flashkv_ops.attention(q, k, v, causal=True)``; its first call (Triton
  compilation and autotuning) is timed separately, before any warm-up, and reported as
  ``first_call_ms``. By default Triton compiles into a fresh cache directory, so that figure is
  what a user's very first run costs (``--warm-triton-cache`` keeps the usual directory).
- ``sdpa_cudnn`` / ``sdpa_flash``: ``F.scaled_dot_product_attention(..., is_causal=True)`` pinned
  to one backend, GQA by ``enable_gqa=True`` where taken, else K/V repeated once outside timing
  (the row's ``gqa`` field says which).

A chunked-prefill case (``kind == "chunked"``) appends a 512-token chunk to a cache holding 3584
tokens (B=1, 32:8, D=128) with ``flashkv_ops.attention_with_kv_cache``, next to flashkv's
``attention`` over the same 4096 keys and SDPA with a bottom-right causal mask.

``--quick`` (default) measures the issue-4 target shapes and a few neighbours in minutes;
``--full`` sweeps S 512..16384, D 64/128/256, GQA 32:8 and 32:4, bf16 and fp16 (narrow it with
``--dtypes``/``--head-dims``/``--seqlens``/``--gqa`` to split it over several runs).
Rows go to ``<out>/prefill.json``, the plot to ``<out>/prefill.png``.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

if __package__ in (None, ""):
    # Run as a script: make `benchmarks` importable from the repository root.
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from benchmarks import common

PROVIDERS = ("flashkv", "sdpa_cudnn", "sdpa_flash")
CHUNKED_PROVIDERS = ("flashkv_kvcache", "flashkv", "sdpa_cudnn", "sdpa_flash")
KEY_FIELDS = (
    "kind", "batch", "num_q_heads", "num_kv_heads", "seqlen_q", "seqlen_k", "head_dim", "dtype",
    "causal", "provider",
)
SWEEP_SEQLENS = (512, 1024, 2048, 4096, 8192, 16384)
SWEEP_HEAD_DIMS = (64, 128, 256)
SWEEP_GQA = ((32, 8), (32, 4))
SWEEP_DTYPES = ("bf16", "fp16")
# Tokens per batch in the full sweep: B = TOKENS // S keeps the work per call comparable.
SWEEP_TOKENS = 16384
CHUNK_LEN, CHUNK_CACHED = 512, 3584
# Where the tensors live; the CPU smoke test sets "cpu" to run the set-up code paths.
DEVICE = "cuda"


@dataclass(frozen=True)
class PrefillCase:
    """One prefill shape. ``kind`` is ``"full"`` (S_q == S_k) or ``"chunked"`` (S_q < S_k:
    ``seqlen_k - seqlen_q`` tokens already cached)."""

    batch: int
    num_q_heads: int
    num_kv_heads: int
    seqlen_q: int
    head_dim: int
    dtype: str
    causal: bool = True
    kind: str = "full"
    seqlen_k: int | None = None

    @property
    def keys(self) -> int:
        return self.seqlen_q if self.seqlen_k is None else self.seqlen_k

    @property
    def name(self) -> str:
        if self.kind == "chunked":
            shape = f"chunk {self.seqlen_q} after {self.keys - self.seqlen_q}"
        else:
            shape = f"S{self.seqlen_q}"
        return (f"B{self.batch} H{self.num_q_heads}/{self.num_kv_heads} {shape} "
                f"D{self.head_dim}" + ("" if self.causal else " non-causal"))

    def fields(self) -> dict[str, Any]:
        return {
            "bench": "prefill",
            "config": self.name,
            "kind": self.kind,
            "batch": self.batch,
            "num_q_heads": self.num_q_heads,
            "num_kv_heads": self.num_kv_heads,
            "seqlen_q": self.seqlen_q,
            "seqlen_k": self.keys,
            "head_dim": self.head_dim,
            "dtype": self.dtype,
            "causal": self.causal,
        }


def quick_cases() -> list[PrefillCase]:
    """Issue-4 targets first, then S and D neighbours of the main one; a few minutes in all."""
    cases = [
        PrefillCase(1, 32, 8, 4096, 128, "bf16"),
        PrefillCase(4, 32, 4, 2048, 64, "bf16"),
    ]
    cases += [PrefillCase(1, 32, 8, s, 128, "bf16") for s in (1024, 2048, 8192, 16384)]
    cases += [
        PrefillCase(1, 32, 8, 4096, 64, "bf16"),
        PrefillCase(1, 32, 8, 4096, 256, "bf16"),
        PrefillCase(1, 32, 8, 4096, 128, "fp16"),
        PrefillCase(4, 32, 4, 2048, 64, "fp16"),
    ]
    return cases


def headline_rows(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows of the quick cases and of chunked prefill: what the README tabulates (the full
    sweep stays in prefill.json and its plot)."""
    quick = {case.name + case.dtype for case in quick_cases()}
    return [row for row in rows if row.get("kind") == "chunked" or row.get("config", "") + str(row.get("dtype")) in quick]


def full_cases(
    seqlens: Sequence[int] = SWEEP_SEQLENS,
    head_dims: Sequence[int] = SWEEP_HEAD_DIMS,
    gqa: Sequence[tuple[int, int]] = SWEEP_GQA,
    dtypes: Sequence[str] = SWEEP_DTYPES,
) -> list[PrefillCase]:
    """The quick cases plus the sweep (``B = 16384 // S``), without duplicates."""
    cases = list(quick_cases())
    for dtype in dtypes:
        for head_dim in head_dims:
            for num_q_heads, num_kv_heads in gqa:
                for seqlen in seqlens:
                    batch = max(1, SWEEP_TOKENS // seqlen)
                    cases.append(PrefillCase(batch, num_q_heads, num_kv_heads, seqlen, head_dim,
                                             dtype))
    return list(dict.fromkeys(cases))


def chunked_cases(dtypes: Sequence[str]) -> list[PrefillCase]:
    """Chunked prefill: 512 new tokens after 3584 cached (B=1, 32:8, D=128)."""
    return [PrefillCase(1, 32, 8, CHUNK_LEN, 128, dtype, kind="chunked",
                        seqlen_k=CHUNK_LEN + CHUNK_CACHED) for dtype in dtypes]


# --------------------------------------------------------------------------------------------
# pure helpers (tested on CPU)
# --------------------------------------------------------------------------------------------


def attention_flops(
    batch: int, num_q_heads: int, seqlen_q: int, seqlen_k: int, head_dim: int, causal: bool
) -> float:
    """Matmul FLOPs of one attention forward: ``4 * B * H_q * S_q * S_k * D`` (QK^T and PV).

    Causal (bottom-right aligned, ``S_k >= S_q``) counts the rectangle of keys before the
    query block fully and the square under the diagonal as half: ``S_q * (S_k - S_q) +
    S_q**2 / 2`` query-key pairs, i.e. exactly half when ``S_q == S_k`` (the usual convention).
    """
    if causal:
        if seqlen_k < seqlen_q:
            raise ValueError(
                f"causal prefill needs seqlen_k >= seqlen_q, got {seqlen_k} < {seqlen_q}")
        pairs = seqlen_q * (seqlen_k - seqlen_q) + seqlen_q * seqlen_q / 2
    else:
        pairs = seqlen_q * seqlen_k
    return 4.0 * batch * num_q_heads * pairs * head_dim


def tflops(flops: float, us: float) -> float:
    """TFLOP/s for ``flops`` done in ``us`` microseconds."""
    return flops / (us * 1e-6) / 1e12


def bottom_right_causal_mask(seqlen_q: int, seqlen_k: int, device: Any = None) -> torch.Tensor:
    """bool ``[S_q, S_k]``: query ``i`` sees key ``j`` iff ``j <= i + S_k - S_q``."""
    rows = torch.arange(seqlen_q, device=device)[:, None]
    cols = torch.arange(seqlen_k, device=device)[None, :]
    return cols <= rows + (seqlen_k - seqlen_q)


def prefill_sort_key(row: dict[str, Any]) -> tuple:
    """Order rows: full prefill before chunked, then dtype, head_dim, GQA, S, batch, provider."""
    providers = ("flashkv_kvcache",) + PROVIDERS + ("setup",)
    return (
        row.get("kind") != "full",
        str(row.get("dtype")),
        row.get("head_dim") or 0,
        -(row.get("num_kv_heads") or 0),
        row.get("seqlen_q") or 0,
        row.get("batch") or 0,
        not row.get("causal", True),
        providers.index(row["provider"]) if row.get("provider") in providers else len(providers),
    )


def prefill_table(rows: Sequence[dict[str, Any]]) -> str:
    """Markdown table: ms, TFLOP/s, ratios to SDPA cuDNN and FlashAttention, first-call time."""
    peers: dict[tuple, dict[str, dict[str, Any]]] = {}

    def case_key(row: dict[str, Any]) -> tuple:
        return tuple(row.get(field) for field in KEY_FIELDS if field != "provider")

    for row in rows:
        peers.setdefault(case_key(row), {})[row["provider"]] = row

    def ratio(row: dict[str, Any], provider: str) -> str:
        peer = peers.get(case_key(row), {}).get(provider)
        if peer is None or peer.get("error") or not peer.get("tflops") or not row.get("tflops"):
            return "-"
        return f"{row['tflops'] / peer['tflops']:.2f}×"

    body = []
    for row in sorted(rows, key=prefill_sort_key):
        notes = []
        if row.get("error"):
            notes.append("error: " + str(row["error"])[:80])
        else:
            if row.get("gqa") == "repeat_kv":
                notes.append("gqa: repeat_kv")
            if row.get("note"):
                notes.append(row["note"])
            if row.get("max_abs_diff") is not None and row["max_abs_diff"] > 5e-2:
                notes.append(f"MISMATCH max|Δ| vs other providers={row['max_abs_diff']:.3g}")
        first = row.get("first_call_ms")
        body.append([
            row["config"],
            row["dtype"],
            row["provider"],
            common.fmt(None if row.get("us") is None else row["us"] / 1e3, 3),
            common.fmt(row.get("tflops"), 0),
            ratio(row, "sdpa_cudnn"),
            ratio(row, "sdpa_flash"),
            common.fmt(None if first is None else first / 1e3, 2),
            "; ".join(notes),
        ])
    headers = ["config (B, Hq/Hkv, S, D)", "dtype", "provider", "ms", "TFLOP/s", "vs cuDNN",
               "vs FA2", "first call (s)", "notes"]
    return common.markdown_table(headers, body)


# --------------------------------------------------------------------------------------------
# measurement
# --------------------------------------------------------------------------------------------


def _max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max())


def run_case(case: PrefillCase, args: argparse.Namespace, sink: common.RowSink) -> None:
    """Measure every provider on one case; rows are added to ``sink`` once all have run, so the
    flashkv row can carry its difference from the SDPA outputs."""
    dtype = common.DTYPES[case.dtype]
    device = torch.device(DEVICE)
    B, Hq, Hkv, Sq, Sk, D = (case.batch, case.num_q_heads, case.num_kv_heads, case.seqlen_q,
                             case.keys, case.head_dim)
    flops = attention_flops(B, Hq, Sq, Sk, D, case.causal)
    common.log(f"--- {case.name} {case.dtype}: {flops / 1e12:.2f} TFLOP")
    torch.manual_seed(args.seed)
    q = torch.randn(B, Hq, Sq, D, device=device, dtype=dtype)
    k = torch.randn(B, Hkv, Sk, D, device=device, dtype=dtype)
    v = torch.randn(B, Hkv, Sk, D, device=device, dtype=dtype)
    outputs: dict[str, torch.Tensor] = {}

    def measure(provider: str, call: Callable[[], torch.Tensor], first_ms: float | None,
                **extra: Any) -> dict[str, Any]:
        if first_ms is None:
            first_ms, outputs[provider] = common.timed_first_call(call)
        else:
            outputs[provider] = call()
        if args.timing == "graph":
            us, clock = common.time_us(call, "graph", calls_per_graph=args.graph_calls, replays=args.replays)
        else:
            us, clock = common.do_bench_time_us(call, warmup_ms=args.warmup_ms, rep_ms=args.rep_ms), "do_bench"
        return {"us": us, "tflops": tflops(flops, us), "first_call_ms": first_ms, "timing": clock, **extra}

    if case.kind == "chunked":
        providers = [p for p in CHUNKED_PROVIDERS if p in args.providers or p == "flashkv_kvcache"]
        cached = Sk - Sq
        k_cache, v_cache = k.clone(), v.clone()
        k_new = k[:, :, cached:].contiguous()  # [B, H_kv, S_q, D], equal to what is cached there
        v_new = v[:, :, cached:].contiguous()
        cache_seqlens = torch.full((B,), cached, dtype=torch.int32, device=device)
        mask = bottom_right_causal_mask(Sq, Sk, device=device)
    else:
        providers = list(args.providers)

    rows = []
    for provider in providers:
        def body(provider=provider) -> dict[str, Any]:
            if provider == "flashkv_kvcache":
                import flashkv_ops

                def call():
                    return flashkv_ops.attention_with_kv_cache(
                        q, k_cache, v_cache, cache_seqlens, k_new, v_new, causal=True)
                return measure(provider, call, None, note="attention_with_kv_cache, appends chunk")
            if provider == "flashkv":
                import flashkv_ops

                def call():
                    return flashkv_ops.attention(q, k, v, causal=case.causal)
                return measure(provider, call, None)
            if provider in ("sdpa_cudnn", "sdpa_flash"):
                backend = common.sdpa_backends()[provider]
                if backend is None:
                    raise RuntimeError(f"this torch ({torch.__version__}) lacks this backend")
                if case.kind == "chunked":
                    if provider == "sdpa_flash":
                        # FlashAttention aligns causal masks bottom-right; SDPA reaches it through
                        # a lower-right CausalBias (is_causal=True would align top-left).
                        from torch.nn.attention.bias import causal_lower_right

                        sdpa_kwargs = {"attn_mask": causal_lower_right(Sq, Sk)}
                    else:
                        sdpa_kwargs = {"attn_mask": mask}
                else:
                    sdpa_kwargs = {"is_causal": case.causal}
                call, gqa, first_ms = common.sdpa_call_with_gqa(backend, q, k, v, **sdpa_kwargs)
                return measure(provider, call, first_ms, gqa=gqa)
            raise ValueError(f"unknown provider {provider!r}")

        row = common.run_provider(case.fields(), provider, body)
        rows.append(row)
        if row["error"]:
            common.log(f"  {provider:16s} ERROR {row['error'][:200]}")
        else:
            common.log(f"  {provider:16s} {row['us'] / 1e3:8.3f} ms {row['tflops']:6.0f} TFLOP/s"
                       f"  first call {row['first_call_ms'] / 1e3:.2f} s")

    # Sanity check on what was timed, with no affordable fp32 reference at these sizes: flashkv
    # rows carry their distance to the closest SDPA output, SDPA rows theirs to flashkv's.
    sdpa_outputs = [outputs[p] for p in ("sdpa_cudnn", "sdpa_flash") if p in outputs]
    flashkv_output = outputs.get("flashkv")
    for row in rows:
        out = outputs.get(row["provider"])
        if out is not None:
            if row["provider"].startswith("flashkv") and sdpa_outputs:
                row["max_abs_diff"] = min(_max_abs_diff(out, ref) for ref in sdpa_outputs)
            elif row["provider"].startswith("sdpa") and flashkv_output is not None:
                row["max_abs_diff"] = _max_abs_diff(out, flashkv_output)
        sink.add(row)
    outputs.clear()


# --------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------


def _int_list(text: str) -> list[int]:
    return [int(item) for item in text.split(",") if item.strip()]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=common.DEFAULT_OUT,
                        help="directory for prefill.json and prefill.png (default %(default)s)")
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="the default: targets + neighbours")
    size.add_argument("--full", action="store_true", help="the whole sweep (long: split it)")
    parser.add_argument("--dtypes", default=None, help="filter, e.g. bf16 or bf16,fp16")
    parser.add_argument("--head-dims", default=None, help="filter, e.g. 64,128")
    parser.add_argument("--seqlens", default=None, help="filter, e.g. 2048,4096")
    parser.add_argument("--gqa", default=None, help="filter on H_q:H_kv, e.g. 32:8,32:4")
    parser.add_argument("--providers", default=",".join(PROVIDERS),
                        help="comma-separated subset of " + ",".join(PROVIDERS))
    parser.add_argument("--no-chunked", action="store_true", help="skip the chunked-prefill case")
    parser.add_argument("--timing", choices=("graph", "do_bench"), default="graph")
    parser.add_argument("--graph-calls", type=int, default=5, help="calls captured per graph (--timing graph)")
    parser.add_argument("--replays", type=int, default=30, help="timed graph replays (--timing graph)")
    parser.add_argument("--warmup-ms", type=int, default=25, help="do_bench warm-up")
    parser.add_argument("--rep-ms", type=int, default=100, help="do_bench measuring time")
    parser.add_argument("--warm-triton-cache", action="store_true",
                        help="use the usual Triton cache (first-call times then omit compiling)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--fresh", action="store_true",
                        help="overwrite prefill.json instead of merging with stored rows")
    parser.add_argument("--no-plot", action="store_true")
    args = parser.parse_args(argv)
    args.providers = common.choice_list(parser, "--providers", args.providers, PROVIDERS)
    if args.dtypes is not None:
        args.dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
        bad = sorted(set(args.dtypes) - {"bf16", "fp16"})
        if bad:
            parser.error(f"--dtypes: unknown {bad}; choose from bf16, fp16")
    try:
        args.head_dims = None if args.head_dims is None else _int_list(args.head_dims)
        args.seqlens = None if args.seqlens is None else _int_list(args.seqlens)
        args.gqa = None if args.gqa is None else [
            tuple(int(n) for n in pair.split(":")) for pair in args.gqa.split(",") if pair.strip()
        ]
    except ValueError as exc:
        parser.error(f"bad number list: {exc}")
    return args


def select_cases(args: argparse.Namespace) -> list[PrefillCase]:
    """Cases for the chosen set after the ``--dtypes``/``--head-dims``/``--seqlens``/``--gqa``
    filters, the chunked case last."""
    cases = full_cases() if args.full else quick_cases()
    if not args.no_chunked:
        cases += chunked_cases(args.dtypes or ["bf16"])

    def keep(case: PrefillCase) -> bool:
        return ((args.dtypes is None or case.dtype in args.dtypes)
                and (args.head_dims is None or case.head_dim in args.head_dims)
                and (args.seqlens is None or case.kind == "chunked"
                     or case.seqlen_q in args.seqlens)
                and (args.gqa is None or (case.num_q_heads, case.num_kv_heads) in args.gqa))

    return [case for case in cases if keep(case)]


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    common.require_cuda("bench_prefill.py")
    common.line_buffered_stdout()
    if not args.warm_triton_cache:
        # Before anything compiles: first-call times then include Triton compilation, as on a
        # user's first run, not just a disk-cache hit.
        os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="flashkv-bench-triton-")
    common.log("env:", common.env_tags())
    sink = common.RowSink(args.out / "prefill.json", KEY_FIELDS, fresh=args.fresh)
    for case in select_cases(args):
        try:
            run_case(case, args, sink)
        except Exception as exc:  # noqa: BLE001 - setup failure (e.g. OOM): record, go on
            sink.add(common.make_row(case.fields(), "setup", error=common.short_error(exc)))
            common.log(f"  setup failed: {common.short_error(exc, 300)}")
        common.free_cuda_memory()

    return common.finish(sink, prefill_table(sink.new_rows), "plot_prefill", args.out / "prefill.png", args.no_plot)


if __name__ == "__main__":
    raise SystemExit(main())
