"""Counters for the split kernel's in-kernel merge, safe with several streams and CUDA graphs.

The programs of one (sequence, KV head) each add one to a shared int32 counter when their slice
is done; the one that brings it to ``num_splits`` merges the slices and sets it back to zero. So a
counter is zero between calls, and two calls may share one only if they never run at once:

- eager calls get one set per (device, stream): the kernels of one stream run one after the other
  (each decode kernel waits for the kernel before it to finish before it counts);
- a call captured into a CUDA graph gets a set of its own, carved from a zeroed arena that an
  eager call allocated beforehand (while capturing, nothing can be allocated and zeroed outside
  the graph, and a zeroing node inside it would cost a launch per replay). A graph never runs
  concurrently with itself, so its counters are back to zero at every replay, and graphs replayed
  on different streams share none.

`split_counters` returns None when a capture finds no arena room (no eager call on this device
before the capture, or a used-up arena); the caller then merges with a separate kernel. Arena
slices are never handed back (nothing tells when a graph is destroyed): an arena holds
``ARENA_COUNTERS`` counters, a few thousand captured calls; an eager call that finds it used up
starts a new one and keeps the old one alive for the graphs that point into it.
"""

import torch

# int32 counters per arena (1 MiB)
ARENA_COUNTERS = 1 << 18
# slices start on 128-byte lines, so the counters of different captured calls never share one
_LINE = 32
# an eager call replaces an arena with less room than this left
_RESERVE = 1 << 14

_arenas: dict = {}  # device -> [zeroed int32 tensor, counters handed out]
_retired: list = []  # used-up arenas, kept alive for the captured graphs that point into them
_per_stream: dict = {}  # (device, stream) -> zeroed int32 tensor for eager calls


def _ready_arena(device: torch.device) -> None:
    """Allocate (or, once nearly used up, replace) the device's arena: eager callers only."""
    arena = _arenas.get(device)
    if arena is None or arena[1] > ARENA_COUNTERS - _RESERVE:
        if arena is not None:
            _retired.append(arena)
        _arenas[device] = [torch.zeros(ARENA_COUNTERS, dtype=torch.int32, device=device), 0]


def split_counters(device: torch.device, count: int) -> "torch.Tensor | None":
    """``count`` int32 counters, all zero, that no call which may run concurrently shares.

    device: where the split kernel runs. Returns a [count] tensor, or None while a CUDA graph
    is being captured and no arena room is left (the caller merges with a separate kernel).
    """
    capturing = device.type == "cuda" and torch.cuda.is_current_stream_capturing()
    if not capturing:
        # an arena ready for later captures, then this stream's own counters
        _ready_arena(device)
        stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else None
        counters = _per_stream.get((device, stream))
        if counters is None or counters.numel() < count:
            # the stream's previous set (if any) is freed behind the kernels queued on it
            counters = _per_stream[(device, stream)] = torch.zeros(count, dtype=torch.int32, device=device)
        return counters[:count]
    arena = _arenas.get(device)
    if arena is None or arena[1] + count > ARENA_COUNTERS:
        return None
    start = arena[1]
    arena[1] = start + -(-count // _LINE) * _LINE
    return arena[0][start:start + count]

