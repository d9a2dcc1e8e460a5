"""The ``"triton_kv"`` entry of transformers' ``AttentionMaskInterface``: padding as key ranges.

transformers asks the mask interface of the active attention implementation for a mask once per
forward (per layer type) and hands the result, untouched, to every attention call. For
``"sdpa"``/``"eager"`` that is a dense ``[B, 1, S_q, S_k]`` tensor. For ``"triton_kv"`` it is a
:class:`KeyRangeMask`: two int32 ``[B]`` tensors saying which key columns each sequence may see,
which is exactly what ``flashkv_ops.attention_with_key_ranges`` takes::

    keys of batch b:   0 .. key_start[b]-1 | key_start[b] .. key_end[b]-1 | key_end[b] .. S_k-1
                       left padding        | real tokens (causal inside)  | not written yet
                                                                            (static caches)

Masks that two ranges cannot express (right padding, holes, a sliding window that actually cuts
off keys, packed sequences, custom ``or``/``and`` mask functions, bidirectional or chunked
attention) are not approximated: the mask records why, and the attention function falls back to
transformers' dense SDPA path with a warning, building the dense mask only then.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable

import torch
from transformers import masking_utils

__all__ = ["KeyRangeMask", "triton_kv_mask", "warn_once"]

# Code objects of the closures transformers builds for a sliding-window causal mask,
# ``and_masks(sliding_window_overlay(w), causal_mask_function)``. Comparing code objects (not
# names) recognises exactly that construction and nothing that merely looks like it.
_AND_MASK_CODE = masking_utils.and_masks(masking_utils.causal_mask_function).__code__
_SLIDING_OVERLAY_CODE = masking_utils.sliding_window_overlay(1).__code__

_warned: set[str] = set()


def warn_once(key: str, message: str) -> None:
    """Issue ``message`` as a ``UserWarning`` the first time ``key`` is seen in this process.

    Silent while ``torch.compile`` traces (a ``warnings.warn`` there would break the graph); the
    same decision is normally taken, and warned about, in the eager prefill first.
    """
    if key in _warned or torch.compiler.is_compiling():
        return
    _warned.add(key)
    warnings.warn(message, UserWarning, stacklevel=3)


def _can_read_values() -> bool:
    """True when reading tensor values on the host is allowed (eager, no CUDA graph capture)."""
    if torch.compiler.is_compiling():
        return False
    return not (torch.cuda.is_available() and torch.cuda.is_current_stream_capturing())


def _closure_vars(fn: Callable) -> dict:
    """Free variables of a closure by name (empty for plain functions)."""
    cells = fn.__closure__ or ()
    return {name: cell.cell_contents for name, cell in zip(fn.__code__.co_freevars, cells)}


def _sliding_window_of(mask_function: Callable) -> int | None:
    """The window ``w`` if ``mask_function`` is transformers' sliding-window causal mask, else None."""
    code = getattr(mask_function, "__code__", None)
    if code is not _AND_MASK_CODE:
        return None
    parts = _closure_vars(mask_function).get("mask_functions", ())
    if len(parts) != 2 or parts[1] is not masking_utils.causal_mask_function:
        return None
    overlay = parts[0]
    if getattr(overlay, "__code__", None) is not _SLIDING_OVERLAY_CODE:
        return None
    window = _closure_vars(overlay).get("sliding_window")
    return window if isinstance(window, int) else None


class KeyRangeMask:
    """Compact causal mask for a batch: per-sequence visible key range instead of a dense mask.

    Query row ``i`` of batch ``b`` attends key column ``j`` (an index into the key/value tensors
    the attention function receives) iff ``key_start[b] <= j < key_end[b]`` and
    ``j <= i + key_end[b] - S_q`` (causal, bottom-right aligned to ``key_end``).

    Parameters
    ----------
    key_start : Tensor
        int32 ``[batch_size]``: first visible key column (number of left-padding tokens still
        present in the keys).
    key_end : Tensor
        int32 ``[batch_size]``: one past the last visible key column, i.e. the number of key
        columns holding tokens up to and including the last query (``S_k`` for dynamic caches,
        the filled length for static caches).
    padding_mask : Tensor, optional
        bool ``[batch_size, L]``: the 2-D padding mask the ranges were derived from, kept so that
        eager calls can verify it really is left padding only (see :meth:`verify`).
    left_padding : Tensor, optional
        int32 ``[batch_size]``: leading zeros of ``padding_mask`` (absolute positions).
    query_end : Tensor or int, optional
        Absolute position one past the last query (``q_offset + q_length``); positions of the
        padding mask below it must be ``0...0 1...1``.
    fallback_reason : str, optional
        Set when the ranges cannot express the mask; the attention function then uses
        :meth:`dense` with transformers' SDPA.
    dense_factory : callable, optional
        Zero-argument callable building the equivalent dense bool mask ``[B, 1, S_q, S_k]``;
        called at most once, and only if a fallback is needed.

    Notes
    -----
    Not a tensor. transformers' mask preprocessing passes non-tensor masks through unchanged as
    long as ``ndim != 2``, and ``generate`` calls ``.contiguous()`` on precomputed masks, so this
    class provides both; everything else treats it as opaque.
    """

    ndim = 0

    def __init__(
        self,
        key_start: torch.Tensor,
        key_end: torch.Tensor,
        *,
        padding_mask: torch.Tensor | None = None,
        left_padding: torch.Tensor | None = None,
        query_end: torch.Tensor | int | None = None,
        fallback_reason: str | None = None,
        dense_factory: Callable[[], torch.Tensor] | None = None,
    ) -> None:
        self.key_start = key_start
        self.key_end = key_end
        self.padding_mask = padding_mask
        self.left_padding = left_padding
        self.query_end = query_end
        self.fallback_reason = fallback_reason
        self._dense_factory = dense_factory
        self._dense: torch.Tensor | None = None
        # Only masks derived from a 2-D padding mask have anything to verify.
        self._verified = padding_mask is None

    def contiguous(self) -> KeyRangeMask:
        """Return self: ``generate`` calls this on precomputed masks; the ranges are tiny anyway."""
        return self

    def verify(self) -> None:
        """Check, once and in eager mode only, that the padding mask is pure left padding.

        Reading the values needs a host sync, so this is skipped while compiling or capturing a
        CUDA graph (same rule as the ops' value checks). A mask with right padding or holes sets
        :attr:`fallback_reason` instead of being silently misread.
        """
        if self._verified or self.fallback_reason is not None or not _can_read_values():
            return
        self._verified = True
        mask = self.padding_mask  # [B, L] bool
        length = mask.shape[-1]
        positions = torch.arange(length, device=mask.device)  # [L]
        expected = positions[None, :] >= self.left_padding[:, None]  # [B, L]
        below_end = positions[None, :] < self.query_end  # [1, L]
        ok = torch.where(below_end, mask == expected, True).all()
        # positions the 2-D mask does not cover count as padding in transformers' dense masks
        ok = ok & (self.query_end <= length)
        if not bool(ok):
            self.fallback_reason = (
                "the attention_mask is not pure left padding (right padding, holes, or shorter "
                "than the tokens seen so far)"
            )

    def dense(self) -> torch.Tensor:
        """The equivalent dense bool mask ``[B, 1, S_q, S_k]``, built on first use and kept."""
        if self._dense is None:
            if self._dense_factory is None:
                raise RuntimeError("this KeyRangeMask has no dense equivalent to fall back to")
            self._dense = self._dense_factory()
        return self._dense

    def __repr__(self) -> str:
        reason = f", fallback_reason={self.fallback_reason!r}" if self.fallback_reason else ""
        return f"KeyRangeMask(key_start={self.key_start}, key_end={self.key_end}{reason})"


def triton_kv_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: int | torch.Tensor = 0,
    kv_offset: int = 0,
    mask_function: Callable = masking_utils.causal_mask_function,
    attention_mask: torch.Tensor | KeyRangeMask | None = None,
    local_size: int | None = None,
    device: torch.device | str = "cpu",
    use_vmap: bool = False,
    **kwargs,
) -> KeyRangeMask:
    """Mask function registered as ``"triton_kv"`` in ``AttentionMaskInterface``.

    Called by transformers' ``create_causal_mask`` / ``create_sliding_window_causal_mask`` with
    the sizes of the coming attention calls. No ``[B, S_q, S_k]`` allocation, and no host sync
    while compiling or capturing a CUDA graph: it traces under ``torch.compile(fullgraph=True)``.
    (In eager mode one value may be read: the cache length, when a sliding window might matter.)

    Parameters
    ----------
    batch_size : int
        ``B``.
    q_length : int
        ``S_q``, number of new tokens in this forward.
    kv_length : int
        ``S_k``, number of key columns the attention function will receive (``max_cache_len``
        for static caches).
    q_offset : int or Tensor
        Absolute position of the first query (tokens already cached); a 0-d tensor for static
        caches.
    kv_offset : int
        Absolute position of key column 0 (non-zero once a sliding-window cache drops tokens).
    mask_function : callable
        transformers' index-based mask pattern; plain causal and sliding-window causal are
        recognised, anything else falls back.
    attention_mask : Tensor or KeyRangeMask, optional
        bool ``[B, L]`` padding mask over absolute positions (1 = real token), or a
        :class:`KeyRangeMask` precomputed by ``generate`` (returned unchanged).
    local_size : int, optional
        Sliding window size for sliding-window layers.
    device : torch.device or str
        Where to put the range tensors.
    use_vmap : bool
        Forwarded to transformers' dense mask builder if a fallback is needed.
    **kwargs
        Other arguments transformers passes to mask interfaces (``dtype``, ``config``, ...);
        ignored.

    Returns
    -------
    KeyRangeMask
        ``key_start``, ``key_end``: int32 ``[B]`` on ``device``.
    """
    if isinstance(attention_mask, KeyRangeMask):
        # generate() precomputed it (static caches) and the model asks again inside forward.
        return attention_mask

    # -- causal alignment: the last query sits at absolute position q_offset + q_length - 1, so
    #    key_end - S_q == q_offset - kv_offset makes the kernel's bottom-right rule the absolute
    #    rule kv_pos <= q_pos --
    query_end = q_offset + q_length  # int, or a fresh tensor (q_offset is mutated in place later)
    key_end = query_end - kv_offset
    if isinstance(key_end, torch.Tensor):
        # materialised, not an expanded stride-0 view: kernels index it per batch entry
        key_end = key_end.to(device=device, dtype=torch.int32).reshape(1).repeat(batch_size)
    else:
        key_end = torch.full((batch_size,), key_end, dtype=torch.int32, device=device)

    padding_mask = None
    if attention_mask is None:
        key_start = torch.zeros(batch_size, dtype=torch.int32, device=device)
        left_padding = None
    else:
        padding_mask = attention_mask.to(device=device, dtype=torch.bool)  # [B, L]
        # number of leading zeros = left padding, in absolute positions
        left_padding = (padding_mask.cumsum(-1) == 0).sum(-1).to(torch.int32)  # [B]
        key_start = torch.minimum((left_padding - kv_offset).clamp_min(0), key_end)

    fallback_reason = _unsupported_pattern(
        mask_function, q_offset, q_length, kv_length, kv_offset, local_size
    )
    dense_factory = functools.partial(
        masking_utils.sdpa_mask,
        batch_size=batch_size,
        q_length=q_length,
        kv_length=kv_length,
        q_offset=query_end - q_length,
        kv_offset=kv_offset,
        mask_function=mask_function,
        attention_mask=padding_mask,
        local_size=local_size,
        allow_is_causal_skip=False,
        use_vmap=use_vmap,
        device=device,
    )
    return KeyRangeMask(
        key_start,
        key_end,
        padding_mask=padding_mask,
        left_padding=left_padding,
        query_end=query_end,
        fallback_reason=fallback_reason,
        dense_factory=dense_factory,
    )


def _unsupported_pattern(mask_function, q_offset, q_length, kv_length, kv_offset, local_size) -> str | None:
    """Why ``mask_function`` cannot be expressed as key ranges, or None if it can."""
    if mask_function is masking_utils.causal_mask_function:
        return None
    if torch.compiler.is_compiling():
        # Dynamo cannot read a closure's cells, so a sliding window cannot be told apart from a
        # packed-sequence or custom pattern here; the dense path is right for all of them.
        # (Compiled decode through generate() never gets here: it reuses the eager-built mask.)
        return "a mask pattern that is not plain causal cannot be inspected while compiling"
    window = _sliding_window_of(mask_function)
    if window is None:
        name = getattr(mask_function, "__qualname__", type(mask_function).__name__)
        return (
            f"the mask pattern {name} (packed sequences, custom or_mask/and_mask functions, "
            "bidirectional or chunked attention) is not a plain causal mask"
        )
    # The window cuts keys off iff the span from the first key column to the last query reaches
    # it: (q_offset + q_length - 1) - kv_offset >= window. Queries never lie past the keys, so
    # kv_length <= window settles it without reading q_offset.
    if kv_length <= window:
        return None
    span = q_offset + q_length - kv_offset
    if isinstance(span, torch.Tensor):
        if not _can_read_values():
            return (
                f"a sliding window of {window} may cut off keys "
                "(not checkable while compiling or capturing)"
            )
        span = int(span)
    if span <= window:
        return None
    # no lengths in the text: it doubles as the warn-once key
    return f"a sliding window of {window} cuts off keys of this sequence"
