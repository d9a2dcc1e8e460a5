"""Draw the benchmark PNGs from the JSON rows (matplotlib, Agg backend: no display needed).

``python benchmarks/plot.py [--out DIR]`` draws ``decode.png``, ``prefill.png`` and ``e2e.png``
for whichever of ``decode.json``, ``prefill.json`` and ``e2e.json`` exist in ``DIR``. The bench
scripts call the same functions at the end of a run. Rows with an ``error`` are left out.
"""

from __future__ import annotations

import argparse
import sys
import textwrap
from pathlib import Path
from typing import Any, Sequence

if __package__ in (None, ""):
    # Run as a script: make `benchmarks` importable from the repository root.
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import common


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _ok(rows: Sequence[dict[str, Any]], figure: str) -> list[dict[str, Any]]:
    return [row for row in rows if not row.get("error") and row.get(figure) is not None]


def _grouped_bars(ax, groups: list[str], providers: list[str],
                  value: dict[tuple[str, str], float]) -> None:
    """Bars of ``value[(group, provider)]``, one cluster per group, one colour per provider."""
    width = 0.8 / max(1, len(providers))
    for index, provider in enumerate(providers):
        xs, ys = [], []
        for position, group in enumerate(groups):
            if (group, provider) in value:
                xs.append(position - 0.4 + width * (index + 0.5))
                ys.append(value[(group, provider)])
        ax.bar(xs, ys, width=width, label=provider)
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels(groups, rotation=30, ha="right", fontsize=8)
    ax.grid(axis="y", alpha=0.3)


def _title(kind: str, rows: Sequence[dict[str, Any]]) -> str:
    # Narrow panels cut long lines: wrap the environment summary.
    return kind + "\n" + "\n".join(textwrap.wrap(common.env_summary(rows), 70))


def plot_decode(rows: Sequence[dict[str, Any]], path: str | Path) -> Path:
    """Grouped bars per decode config: µs (top) and % of 3.0 TB/s on the bytes held (bottom).

    Returns the path written.
    """
    from benchmarks.bench_decode import decode_sort_key

    plt = _pyplot()
    rows = sorted(_ok(rows, "us"), key=decode_sort_key)
    if not rows:
        raise ValueError("no decode rows without error to plot")

    def group(row: dict[str, Any]) -> str:
        layout = row["layout"] if row["layout"] != "paged" else f"paged{row.get('page_size')}"
        return f"{row['config']}\n{layout} {row['dtype']}"

    groups = list(dict.fromkeys(group(row) for row in rows))
    providers = list(dict.fromkeys(row["provider"] for row in rows))
    micros = {(group(row), row["provider"]): row["us"] for row in rows}
    percent = {(group(row), row["provider"]): row["pct_bw"] for row in rows
               if row.get("pct_bw") is not None}
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(max(8, 1.4 * len(groups)), 9), sharex=True)
    _grouped_bars(top, groups, providers, micros)
    top.set_ylabel("µs per decode step (lower is better)")
    top.legend(fontsize=8, ncol=len(providers))
    _grouped_bars(bottom, groups, providers, percent)
    bottom.axhline(100, color="black", linewidth=0.8, linestyle="--")
    bottom.set_ylabel(f"% of {common.BANDWIDTH_LABEL} (bytes of KV held)")
    top.set_title(_title("Decode attention (S_q = 1), CUDA-graph replay", rows), fontsize=9)
    fig.tight_layout()
    return _save(fig, plt, path)


def plot_prefill(rows: Sequence[dict[str, Any]], path: str | Path) -> Path:
    """TFLOP/s against S, one panel per (head_dim, dtype), one line per provider and GQA ratio.

    Chunked-prefill rows are left out (they have one length). Returns the path written.
    """
    plt = _pyplot()
    rows = [row for row in _ok(rows, "tflops") if row.get("kind", "full") == "full"]
    if not rows:
        raise ValueError("no full-prefill rows without error to plot")
    panels = sorted({(row["head_dim"], row["dtype"]) for row in rows})
    columns = min(3, len(panels))
    lines_of_panels = (len(panels) + columns - 1) // columns
    fig, axes = plt.subplots(lines_of_panels, columns,
                             figsize=(max(7, 5 * columns), 4 * lines_of_panels + 1), squeeze=False)
    for ax, (head_dim, dtype) in zip(axes.flat, panels):
        series: dict[str, dict[int, float]] = {}
        for row in rows:
            if (row["head_dim"], row["dtype"]) != (head_dim, dtype):
                continue
            label = (f"{row['provider']} {row['num_q_heads']}:{row['num_kv_heads']}"
                     + ("" if row.get("causal", True) else " non-causal"))
            # Several batch sizes at one S (quick set): keep the largest amount of work.
            points = series.setdefault(label, {})
            points[row["seqlen_q"]] = max(points.get(row["seqlen_q"], 0.0), row["tflops"])
        for label in sorted(series):
            xs = sorted(series[label])
            ax.plot(xs, [series[label][x] for x in xs], marker="o", label=label)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("sequence length S")
        ax.set_ylabel("TFLOP/s (causal counted as half)")
        ax.set_ylim(bottom=0)
        ax.set_title(f"D={head_dim} {dtype}", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    fig.suptitle(_title("Prefill attention, causal", rows), fontsize=9)
    fig.tight_layout()
    return _save(fig, plt, path)


def plot_e2e(rows: Sequence[dict[str, Any]], path: str | Path) -> Path:
    """Grouped bars per (model, batch): decode tokens/s (log, with the bandwidth bound marked)
    and % of 3.0 TB/s. Returns the path written."""
    from benchmarks.bench_e2e import e2e_sort_key

    plt = _pyplot()
    rows = sorted(_ok(rows, "decode_tok_s"), key=e2e_sort_key)
    if not rows:
        raise ValueError("no end-to-end rows without error to plot")

    def group(row: dict[str, Any]) -> str:
        return f"{row.get('model_label', row['model'])}\nbatch {row['batch']}"

    groups = list(dict.fromkeys(group(row) for row in rows))
    providers = list(dict.fromkeys(row["provider"] for row in rows))
    rate = {(group(row), row["provider"]): row["decode_tok_s"] for row in rows}
    percent = {(group(row), row["provider"]): row["pct_bw"] for row in rows
               if row.get("pct_bw") is not None}
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(max(7, 2.0 * len(groups)), 8), sharex=True)
    _grouped_bars(top, groups, providers, rate)
    bounds = {}
    for row in rows:
        if row.get("bound_tok_s"):
            bounds[group(row)] = max(bounds.get(group(row), 0.0), row["bound_tok_s"])
    for position, name in enumerate(groups):
        if name in bounds:
            top.hlines(bounds[name], position - 0.45, position + 0.45, colors="black",
                       linestyles="--", linewidth=1,
                       label="bandwidth bound" if position == 0 else None)
    top.set_yscale("log")
    top.set_ylabel("decode tokens/s, all sequences")
    top.legend(fontsize=8)
    _grouped_bars(bottom, groups, providers, percent)
    bottom.axhline(100, color="black", linewidth=0.8, linestyle="--")
    bottom.set_ylabel(f"% of {common.BANDWIDTH_LABEL}")
    top.set_title(_title("End-to-end greedy decode, bf16, random weights", rows), fontsize=9)
    fig.tight_layout()
    return _save(fig, plt, path)


def _save(fig, plt, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


PLOTTERS = {"decode": plot_decode, "prefill": plot_prefill, "e2e": plot_e2e}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=common.DEFAULT_OUT,
                        help="directory holding the JSON rows; PNGs are written there")
    args = parser.parse_args(argv)
    drawn = 0
    for name, plotter in PLOTTERS.items():
        source = args.out / f"{name}.json"
        if not source.exists():
            continue
        try:
            print(f"{plotter(common.load_rows(source), args.out / f'{name}.png')}", flush=True)
            drawn += 1
        except Exception as exc:  # noqa: BLE001 - draw the others
            print(f"{name}: {common.short_error(exc)}", file=sys.stderr, flush=True)
    if drawn == 0:
        print(f"no plot drawn from {args.out}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
