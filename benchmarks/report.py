"""Print the README's benchmark sections (markdown tables and plot links) from the JSON rows.

``python benchmarks/report.py [--out DIR] [--sections decode,prefill,e2e]`` reads
``DIR/{decode,prefill,e2e}.json`` and prints, per file, a heading, the GPU and versions the rows
were measured with, the table and a link to the PNG (relative to the repository root when the
directory lies inside it). Paste the output into README.md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

if __package__ in (None, ""):
    # Run as a script: make `benchmarks` importable from the repository root.
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import common
from benchmarks.bench_decode import decode_table
from benchmarks.bench_e2e import e2e_table
from benchmarks.bench_prefill import headline_rows, prefill_table

REPO_ROOT = Path(__file__).resolve().parent.parent

SECTIONS: dict[str, tuple[str, str, Callable[[Sequence[dict[str, Any]]], str]]] = {
    "decode": (
        "Decode attention against a KV cache",
        "One query token per sequence, CUDA-graph replay timing (20 calls per graph on three copies "
        "of the cache in turn, replays queued back to back, median of 30). GB/s and % count the K/V bytes "
        f"each sequence actually holds (plus q and output) against the {common.BANDWIDTH_LABEL} "
        "the H100 reaches; \"vs cuDNN\" is SDPA cuDNN's time over the provider's (paged rows: "
        "over cuDNN on the contiguous cache).",
        decode_table,
    ),
    "prefill": (
        "Prefill attention",
        "CUDA-graph replay timing (GPU time, no host launch path; rows measured on flashkv commits "
        "before 94e1d4b synchronised after every replay, which counts the host's graph-launch gap, "
        "0.3–0.8 µs a call where measured on decode shapes; later ones queue the replays back to back; "
        "`--timing do_bench` for eager "
        "calls); TFLOP/s = 4·B·H_q·S_q·S_k·D / t with causal work "
        "counted as half. \"first call\" is the first call's wall time (Triton compilation and "
        "autotuning for flashkv, plan building for cuDNN). The table holds the issue's target "
        "shapes and their neighbours; the plot and `benchmarks/results/prefill.json` hold the full "
        "sweep (S 512–16384 at B·S = 16384 tokens, D 64/128/256, GQA 32:8 and 32:4, bf16 and fp16).",
        lambda rows: prefill_table(headline_rows(rows)),
    ),
    "e2e": (
        "End-to-end generation",
        "Random-weight bf16 models of the named shapes, greedy. Decode tokens/s exclude the "
        "prefill (timed by a max_new_tokens=1 call); GB/s counts the weights read per step "
        "(all but the input embedding table) plus the K/V held, over the time per step. The "
        "notes count the leading steps whose greedy tokens equal hf_eager's: random bf16 weights "
        "give near-tied logits, so any other rounding (fused GEMMs, another attention kernel, "
        "compiled kernels; transformers' static path too) flips a token within a few steps. "
        "Token-for-token equality is tested in float32 (`tests/test_generate.py`).",
        e2e_table,
    ),
}


def _link(path: Path) -> str:
    try:
        return path.resolve().relative_to(REPO_ROOT).as_posix()
    except ValueError:
        return path.as_posix()


def render_section(name: str, rows: Sequence[dict[str, Any]], png: Path | None = None) -> str:
    """Markdown for one benchmark: heading, method note, environment line, table, plot link."""
    if name not in SECTIONS:
        raise ValueError(f"section must be one of {list(SECTIONS)}, got {name!r}")
    title, method, table = SECTIONS[name]
    parts = [f"### {title}", "", method, "", f"Measured on: {common.env_summary(rows)}.", "",
             table(rows)]
    if png is not None and png.exists():
        parts += ["", f"![{title}]({_link(png)})"]
    return "\n".join(parts) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=common.DEFAULT_OUT,
                        help="directory holding decode.json, prefill.json, e2e.json")
    parser.add_argument("--sections", default=",".join(SECTIONS),
                        help="comma-separated subset of " + ",".join(SECTIONS))
    args = parser.parse_args(argv)
    names = common.choice_list(parser, "--sections", args.sections, SECTIONS)
    printed = 0
    for name in names:
        source = args.out / f"{name}.json"
        if not source.exists():
            print(f"({source} not found: run benchmarks/bench_{name}.py)", file=sys.stderr)
            continue
        rows = common.load_rows(source)
        print(render_section(name, rows, args.out / f"{name}.png"), flush=True)
        printed += 1
    return 0 if printed else 1


if __name__ == "__main__":
    raise SystemExit(main())
