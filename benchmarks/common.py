"""Shared pieces of the flashkv benchmarks: environment tags, timing, JSON rows, tables.

Every benchmark writes a list of JSON rows. A row holds the configuration fields, the
``provider`` (whose implementation was timed), the measured figures, ``error`` (``None`` or the
text of the exception that provider raised) and the environment tags from :func:`env_tags`.

Nothing here needs a GPU at import time, so the CPU smoke test can import it.
"""

from __future__ import annotations

import datetime as _dt
import importlib.metadata
import itertools
import json
import contextlib
import math
import os
import statistics
import subprocess
import sys
import time
import traceback
import warnings
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch

# Read bandwidth the H100 reaches here (cuDNN decode over a 537 MB cache, FACTS.md). Used as the
# "limit" in every % figure: a spec-sheet 3.35 TB/s is not reachable by any kernel.
H100_BANDWIDTH_BYTES_PER_S = 3.0e12
BANDWIDTH_LABEL = "3.0 TB/s"

DEFAULT_OUT = Path(__file__).resolve().parent / "results"

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
DTYPE_NAMES = {value: key for key, value in DTYPES.items()}


# --------------------------------------------------------------------------------------------
# environment
# --------------------------------------------------------------------------------------------


def _package_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _git_commit() -> str | None:
    """Short hash of HEAD, with "+dirty" when tracked files differ from it (the measured code is
    then not that commit); None without a repository. ``FLASHKV_COMMIT`` in the environment takes
    precedence: for a copy of a clean tree whose git metadata is not the copied commit."""
    if os.environ.get("FLASHKV_COMMIT"):
        return os.environ["FLASHKV_COMMIT"]
    # The GPU machine gets a copy of the working tree that may lack .git: then there is no commit.
    here = Path(__file__).resolve().parent

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=here, capture_output=True, text=True, timeout=5).stdout.strip()

    try:
        commit = git("rev-parse", "--short", "HEAD")
        dirty = commit and git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return None
    return (commit + ("+dirty" if dirty else "")) or None


_ENV_CACHE: dict[str, Any] | None = None


def env_tags() -> dict[str, Any]:
    """Describe the machine and software stack a measurement was taken on.

    Returns
    -------
    dict
        ``gpu`` (device name or ``None``), ``torch``, ``triton``, ``transformers``, ``cuda``
        (the CUDA version torch was built with) and ``flashkv_commit`` (short git hash or
        ``None``). Computed once per process; :func:`make_row` adds a fresh ``timestamp``.
    """
    global _ENV_CACHE
    if _ENV_CACHE is None:
        gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
        _ENV_CACHE = {
            "gpu": gpu,
            "torch": torch.__version__,
            "triton": _package_version("triton"),
            "transformers": _package_version("transformers"),
            "cuda": torch.version.cuda,
            "flashkv_commit": _git_commit(),
        }
    return dict(_ENV_CACHE)


def timestamp() -> str:
    """Current UTC time as ISO 8601 text with seconds, e.g. ``2025-01-31T12:00:00Z``."""
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def require_cuda(script: str) -> None:
    """Exit with a one-paragraph explanation (status 2) when no CUDA device is usable.

    Parameters
    ----------
    script : str
        Name shown in the message, e.g. ``"bench_decode.py"``.
    """
    if torch.cuda.is_available():
        return
    build = f"torch {torch.__version__}" + ("" if torch.version.cuda else " (a CPU-only build)")
    print(
        f"{script}: no CUDA device is available ({build}); these benchmarks time GPU kernels and "
        "have nothing to measure here. Nothing was run and no results were written.",
        file=sys.stderr,
        flush=True,
    )
    raise SystemExit(2)


def line_buffered_stdout() -> None:
    """Make progress lines appear at once when stdout is a pipe or a file (remote runs)."""
    try:
        sys.stdout.reconfigure(line_buffering=True)
    except (AttributeError, ValueError):
        pass


def log(*parts: Any) -> None:
    """Print one progress line and flush it."""
    print(*parts, flush=True)


# --------------------------------------------------------------------------------------------
# timing
# --------------------------------------------------------------------------------------------


def cuda_graph_time_us(
    fn: Callable[[], Any],
    *,
    calls_per_graph: int = 20,
    replays: int = 30,
    warmup_calls: int = 3,
    warmup_ms: float = 30.0,
) -> float:
    """Median GPU time of one call of ``fn``, from CUDA-graph replays queued back to back.

    ``calls_per_graph`` calls are captured in one ``torch.cuda.CUDAGraph``. The graph is replayed
    for ``warmup_ms`` (clocks settle), then ``replays`` more times with nothing in between but CUDA
    events, so the GPU never idles while the host launches the next replay; each gap between two
    events, divided by ``calls_per_graph``, is one sample. Launch and Python overheads vanish, as
    they do in a graph-captured decode loop, which is what decode kernels are judged in.
    (Synchronising after every replay would count the host's graph-launch latency, ~0.5 µs a call
    at 20 calls of 25 µs, against whatever is timed.)

    Parameters
    ----------
    fn : callable
        Takes no argument; must be capturable (no host synchronisation, no CPU tensors).
    calls_per_graph : int
        Calls captured in the graph.
    replays : int
        Timed replays; the median is returned.
    warmup_calls : int
        Eager calls on a side stream before capture (compilation, autotuning, allocator).
    warmup_ms : float
        Untimed replays for this long before the timed ones.

    Returns
    -------
    float
        Microseconds per call.
    """
    if calls_per_graph < 1 or replays < 1:
        raise ValueError(
            f"calls_per_graph and replays must be >= 1, got {calls_per_graph} and {replays}"
        )
    # Warm up on a side stream, as the CUDA-graph recipe asks, so lazy initialisation
    # (cuBLAS/cuDNN handles, Triton compilation) never happens during capture.
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup_calls):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()

    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls_per_graph):
            fn()
    graph.replay()  # first replay uploads the graph; not timed
    torch.cuda.synchronize()
    started = time.perf_counter()
    while time.perf_counter() - started < warmup_ms / 1e3:
        graph.replay()
        torch.cuda.synchronize()

    events = [torch.cuda.Event(enable_timing=True) for _ in range(replays + 1)]
    graph.replay()  # keeps the queue busy while the first event is recorded
    events[0].record()
    for event in events[1:]:
        graph.replay()
        event.record()
    events[-1].synchronize()
    per_call_us = [
        events[i].elapsed_time(events[i + 1]) * 1e3 / calls_per_graph for i in range(replays)
    ]
    del graph
    return statistics.median(per_call_us)


def rotating(calls: Sequence[Callable[[], Any]]) -> Callable[[], Any]:
    """One zero-argument call that runs ``calls[0]``, ``calls[1]``, ... in turn, wrapping around
    (each call's result is returned); used to spread a timed loop over copies of its inputs."""
    if not calls:
        raise ValueError("calls must not be empty")
    turn = itertools.cycle(calls)
    return lambda: next(turn)()


def do_bench_time_us(fn: Callable[[], Any], *, warmup_ms: int = 25, rep_ms: int = 100) -> float:
    """Median time of one call of ``fn`` from ``triton.testing.do_bench``, in microseconds.

    ``do_bench`` clears the L2 cache before each call and includes launch overhead; it is the
    right clock for millisecond-scale kernels (prefill) and the fallback when capture fails.
    """
    import triton.testing

    ms = triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median")
    return float(ms) * 1e3


def time_us(
    fn: Callable[[], Any], method: str = "graph", **graph_kwargs: Any
) -> tuple[float, str]:
    """Time ``fn`` by CUDA-graph replay, falling back to ``do_bench`` if capture fails.

    Parameters
    ----------
    fn : callable
        Takes no argument.
    method : {"graph", "do_bench"}
        Preferred clock.
    **graph_kwargs
        Passed to :func:`cuda_graph_time_us`.

    Returns
    -------
    (float, str)
        Microseconds per call and the clock actually used: ``"cuda_graph"``, ``"do_bench"``, or
        ``"do_bench (graph capture failed: <error>)"``.
    """
    if method not in ("graph", "do_bench"):
        raise ValueError(f"method must be 'graph' or 'do_bench', got {method!r}")
    if method == "graph":
        try:
            return cuda_graph_time_us(fn, **graph_kwargs), "cuda_graph"
        except Exception as exc:  # noqa: BLE001 - any capture failure falls back to do_bench
            reason = short_error(exc, limit=160)
            try:
                torch.cuda.synchronize()
            except Exception:  # noqa: BLE001 - a broken capture can leave an error behind
                pass
            return do_bench_time_us(fn), f"do_bench (graph capture failed: {reason})"
    return do_bench_time_us(fn), "do_bench"


def sync() -> None:
    """Wait for queued GPU work; a no-op without CUDA (so helpers also run in CPU tests)."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed_first_call(fn: Callable[[], Any]) -> tuple[float, Any]:
    """Wall time of one synchronised call of ``fn`` in milliseconds, and what it returned.

    Called before any warm-up, it measures what a user waits for on a shape's first call:
    Triton compilation and autotuning, cuDNN plan building.
    """
    sync()
    start = time.perf_counter()
    out = fn()
    sync()
    return (time.perf_counter() - start) * 1e3, out


def first_call_ms(fn: Callable[[], Any]) -> float:
    """:func:`timed_first_call` without the result."""
    return timed_first_call(fn)[0]


def free_cuda_memory() -> None:
    """Release cached blocks so one configuration's buffers do not crowd the next."""
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


# --------------------------------------------------------------------------------------------
# PyTorch SDPA peers
# --------------------------------------------------------------------------------------------


def sdpa_backends() -> dict[str, Any]:
    """Provider name -> ``SDPBackend`` member (``None`` where this torch lacks the backend)."""
    from torch.nn.attention import SDPBackend

    return {
        "sdpa_cudnn": getattr(SDPBackend, "CUDNN_ATTENTION", None),
        "sdpa_flash": getattr(SDPBackend, "FLASH_ATTENTION", None),
    }


def _backend_context(backend: Any):
    from torch.nn.attention import sdpa_kernel

    return sdpa_kernel([backend]) if backend is not None else contextlib.nullcontext()


def sdpa_call_with_gqa(
    backend: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **sdpa_kwargs: Any
) -> tuple[Callable[[], torch.Tensor], str, float]:
    """A zero-argument SDPA call pinned to ``backend``, how it handles GQA, its first-call time.

    Tries ``enable_gqa=True`` first; if the backend refuses it, K/V are repeated to ``H_q``
    heads once, here, outside any timed region (the kernel then reads ``H_q / H_kv`` times the
    K/V bytes). Raises ``RuntimeError`` carrying SDPA's reasons if the backend cannot run.

    Parameters
    ----------
    backend : SDPBackend or None
        ``None`` lets SDPA choose.
    q : Tensor
        ``[B, H_q, S_q, D]``.
    k, v : Tensor
        ``[B, H_kv, S_k, D]``.
    **sdpa_kwargs
        Passed to ``scaled_dot_product_attention`` (``is_causal``, ``attn_mask``, ``scale``).

    Returns
    -------
    (callable, str, float)
        The call (returns ``[B, H_q, S_q, D]``); ``"none"`` (H_q == H_kv), ``"enable_gqa"`` or
        ``"repeat_kv"``; milliseconds of the first successful call (plan building included).
    """
    import torch.nn.functional as F

    group = q.shape[1] // k.shape[1]

    def bound(key: torch.Tensor, value: torch.Tensor, **extra: Any) -> Callable[[], torch.Tensor]:
        def call() -> torch.Tensor:
            # The backend choice is made at call time, so the context must wrap every call,
            # including the ones captured in a CUDA graph.
            with _backend_context(backend):
                return F.scaled_dot_product_attention(q, key, value, **sdpa_kwargs, **extra)

        return call

    def probe(call: Callable[[], torch.Tensor]) -> float:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                return first_call_ms(call)
            except Exception as exc:  # noqa: BLE001 - re-raised with SDPA's reasons attached
                reasons = "; ".join(
                    dict.fromkeys(str(w.message).replace("\n", " ")[:200] for w in caught)
                )
                suffix = f" [SDPA says: {reasons}]" if reasons else ""
                raise RuntimeError(f"{exc}{suffix}") from exc

    if group == 1:
        call = bound(k, v)
        return call, "none", probe(call)
    try:
        call = bound(k, v, enable_gqa=True)
        return call, "enable_gqa", probe(call)
    except (TypeError, RuntimeError):
        pass
    k_rep = k.repeat_interleave(group, dim=1)
    v_rep = v.repeat_interleave(group, dim=1)
    call = bound(k_rep, v_rep)
    return call, "repeat_kv", probe(call)


# --------------------------------------------------------------------------------------------
# rows
# --------------------------------------------------------------------------------------------


def short_error(exc: BaseException, limit: int = 600) -> str:
    """``"TypeName: message"`` on one line, cut to ``limit`` characters."""
    text = f"{type(exc).__name__}: {exc}".replace("\n", " ").strip()
    return text if len(text) <= limit else text[: limit - 3] + "..."


def make_row(config: dict[str, Any], provider: str, **figures: Any) -> dict[str, Any]:
    """Build one result row: configuration, provider, figures, ``error=None``, environment tags.

    Figures named in ``figures`` override nothing in ``config``; ``error`` may be passed to
    record a failure.
    """
    row: dict[str, Any] = dict(config)
    row["provider"] = provider
    row.update(figures)
    row.setdefault("error", None)
    row.update(env_tags())
    row["timestamp"] = timestamp()
    return row


def run_provider(
    config: dict[str, Any], provider: str, body: Callable[[], dict[str, Any]]
) -> dict[str, Any]:
    """Run one provider's measurement; an exception becomes the row's ``error`` text.

    Parameters
    ----------
    config : dict
        Configuration fields copied into the row.
    provider : str
        Provider name.
    body : callable
        Returns a dict of figures (and optionally ``note``).

    Returns
    -------
    dict
        The row. On failure the figures are absent and ``error`` holds ``"Type: message"``; the
        traceback goes to stderr so the run log keeps it.
    """
    try:
        figures = body()
    except Exception as exc:  # noqa: BLE001 - one provider's failure must not end the run
        print(f"[{provider}] failed:", file=sys.stderr, flush=True)
        traceback.print_exc(file=sys.stderr)
        sys.stderr.flush()
        row = make_row(config, provider, error=short_error(exc))
    else:
        row = make_row(config, provider, **figures)
    try:
        free_cuda_memory()
    except Exception:  # noqa: BLE001 - a sticky CUDA error shows up in the next rows anyway
        pass
    return row


def load_rows(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Rows stored at ``path`` (a JSON list); ``[]`` if the file does not exist."""
    path = Path(path)
    if not path.exists():
        return []
    with open(path) as handle:
        data = json.load(handle)
    if isinstance(data, dict) and "rows" in data:
        data = data["rows"]
    if not isinstance(data, list):
        raise ValueError(f"{path} must hold a JSON list of rows, found {type(data).__name__}")
    return data


def _json_default(value: Any) -> Any:
    if isinstance(value, torch.dtype):
        return DTYPE_NAMES.get(value, str(value))
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "item"):
        return value.item()
    raise TypeError(f"cannot store {type(value).__name__} in a result row")


def _clean(value: Any) -> Any:
    # JSON has no NaN/inf; store them as null so every reader can parse the file.
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _clean(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(item) for item in value]
    return value


def write_rows(path: str | os.PathLike, rows: Sequence[dict[str, Any]]) -> None:
    """Write ``rows`` to ``path`` as a JSON list, atomically (a killed run leaves a valid file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as handle:
        json.dump([_clean(row) for row in rows], handle, indent=1, default=_json_default)
        handle.write("\n")
    os.replace(tmp, path)


class RowSink:
    """Collect rows and rewrite the JSON file after each one, merging with earlier runs.

    A row replaces an earlier stored row with the same key (the values of ``key_fields``), so
    a benchmark split over several runs (``--models tinyllama`` then ``--models llama3-8b``)
    accumulates in one file, and re-running a configuration updates it.

    Parameters
    ----------
    path : path-like
        JSON file.
    key_fields : sequence of str
        Fields that identify a measurement (configuration fields and ``provider``).
    fresh : bool
        Start from an empty file instead of merging with what is stored.
    """

    def __init__(self, path: str | os.PathLike, key_fields: Sequence[str], fresh: bool = False):
        self.path = Path(path)
        self.key_fields = tuple(key_fields)
        stored = [] if fresh else load_rows(self.path)
        self.rows: list[dict[str, Any]] = list(stored)
        self.new_rows: list[dict[str, Any]] = []

    def key(self, row: dict[str, Any]) -> tuple:
        return tuple(json.dumps(row.get(field), default=str) for field in self.key_fields)

    def add(self, row: dict[str, Any]) -> None:
        key = self.key(row)
        self.rows = [old for old in self.rows if self.key(old) != key]
        self.rows.append(row)
        self.new_rows.append(row)
        write_rows(self.path, self.rows)


# --------------------------------------------------------------------------------------------
# tables
# --------------------------------------------------------------------------------------------


def fmt(value: Any, digits: int = 1) -> str:
    """Table cell text: ``-`` for missing, fixed decimals for floats, ``str`` otherwise."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if not math.isfinite(value):
            return "-"
        return f"{value:,.{digits}f}"
    return str(value)


def markdown_table(headers: Sequence[str], body: Iterable[Sequence[Any]]) -> str:
    """Render a GitHub markdown table with padded columns (readable in a terminal too).

    Cells are converted with ``str``; ``|`` inside a cell is escaped. Columns whose cells all
    look numeric are right-aligned.
    """
    text_rows = [[str(cell).replace("|", "\\|") for cell in row] for row in body]
    widths = [len(header) for header in headers]
    for row in text_rows:
        if len(row) != len(headers):
            raise ValueError(f"table row has {len(row)} cells, headers have {len(headers)}")
        for index, cell in enumerate(row):
            widths[index] = max(widths[index], len(cell))

    def numeric(cell: str) -> bool:
        stripped = cell.replace(",", "").replace("%", "").replace("×", "").strip()
        try:
            float(stripped)
        except ValueError:
            return cell == "-"
        return True

    right = [
        bool(text_rows) and all(numeric(row[index]) for row in text_rows)
        for index in range(len(headers))
    ]
    lines = [
        "| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths)) + " |",
        "|" + "|".join(("-" * (w + 1) + ":") if r else ("-" * (w + 2))
                       for w, r in zip(widths, right)) + "|",
    ]
    for row in text_rows:
        cells = [c.rjust(w) if r else c.ljust(w) for c, w, r in zip(row, widths, right)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def env_summary(rows: Sequence[dict[str, Any]]) -> str:
    """One line naming the GPU and versions the rows were measured with (distinct values)."""
    if not rows:
        return "(no rows)"
    parts = []
    for field in ("gpu", "torch", "triton", "transformers", "cuda", "flashkv_commit"):
        values = sorted({str(row.get(field)) for row in rows if row.get(field) is not None})
        if values:
            parts.append(f"{field.replace('_', ' ')} {', '.join(values)}")
    dates = sorted(str(row.get("timestamp", ""))[:10] for row in rows if row.get("timestamp"))
    if dates:
        parts.append(f"measured {dates[0]}" + (f"..{dates[-1]}" if dates[-1] != dates[0] else ""))
    return "; ".join(parts)


def finish(sink: "RowSink", table: str, plot_name: str, out_png: Path, no_plot: bool) -> int:
    """The common tail of every bench script: environment line, markdown table, rows path, plot.

    ``plot_name`` names the drawing function in ``benchmarks.plot`` (e.g. ``"plot_decode"``).
    """
    log("\n" + env_summary(sink.new_rows))
    log(table)
    log(f"rows: {sink.path}")
    if not no_plot:
        try:
            from benchmarks import plot

            path = getattr(plot, plot_name)(sink.rows, out_png)
            log(f"plot: {path}")
        except Exception as exc:  # noqa: BLE001 - the rows are saved; a plot failure is minor
            log(f"plot failed: {short_error(exc)}")
    return 0


def choice_list(parser, flag: str, text: str, allowed: Iterable[str]) -> list[str]:
    """Split a comma-separated command-line value and reject names outside ``allowed``."""
    allowed = list(allowed)
    items = [item.strip() for item in text.split(",") if item.strip()]
    unknown = sorted(set(items) - set(allowed))
    if unknown:
        parser.error(f"{flag}: unknown {unknown}; choose from {allowed}")
    return items
