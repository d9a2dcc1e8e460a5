"""The ``"triton_kv"`` entry of transformers' ``AttentionInterface``.

Two modes:

* transformers' own caches (``DynamicCache``, ``StaticCache``, or none): the model hands over the
  full key/value tensors of the layer and the :class:`~.masks.KeyRangeMask` built by
  :func:`~.masks.triton_kv_mask`; attention runs in ``flashkv_ops.attention_with_key_ranges``.
* flashkv's own cache (``flashkv_ops.generate``): the caller passes ``flashkv_cache=...`` to the
  model's forward (transformers forwards extra keyword arguments down to attention); key/value
  are then only the new tokens and the cache object attends over what it holds.
"""

from __future__ import annotations

import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

import flashkv_ops

from .masks import KeyRangeMask, warn_once

__all__ = ["triton_kv_attention"]


def triton_kv_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: KeyRangeMask | torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """Attention function registered as ``"triton_kv"`` with ``transformers.AttentionInterface``.

    Parameters
    ----------
    module : torch.nn.Module
        The calling attention layer (``layer_idx`` and ``is_causal`` are read from it).
    query : Tensor
        ``[B, H_q, S_q, D]`` after RoPE.
    key, value : Tensor
        ``[B, H_kv, S_k, D]``, not repeated for GQA: the layer's whole cache content (or just the
        ``S_q`` new tokens when ``flashkv_cache`` is given).
    attention_mask : KeyRangeMask or Tensor or None
        What the ``"triton_kv"`` mask interface returned. ``None`` means plain causal attention
        over all ``S_k`` keys, bottom-right aligned. A dense tensor (a user-supplied 4-D mask,
        which transformers passes through) is honoured through SDPA, with a warning.
    scaling : float, optional
        Softmax scale; defaults to ``D ** -0.5``.
    dropout : float
        Must be 0: the kernels are inference-only.
    **kwargs
        ``flashkv_cache``: an object with ``attend(layer_idx, query, key, value, scaling) ->
        [B, H_q, S_q, D]`` that owns the KV cache (then ``attention_mask`` is ignored).
        ``sliding_window``: with no mask built, a window shorter than the ``S_k`` keys raises
        ``ValueError`` (it cannot be honoured there; masks built by transformers carry the window,
        which falls back to SDPA where it cuts keys). Others are ignored.

    Returns
    -------
    tuple of (Tensor, None)
        ``attn_output`` ``[B, S_q, H_q, D]`` contiguous, and no attention weights.
    """
    flashkv_cache = kwargs.get("flashkv_cache")
    if flashkv_cache is not None:
        out = flashkv_cache.attend(module.layer_idx, query, key, value, scaling)  # [B, H_q, S_q, D]
        return out.transpose(1, 2).contiguous(), None

    if dropout:
        raise ValueError(f"triton_kv attention is inference-only: dropout must be 0, got dropout={dropout}")
    if not getattr(module, "is_causal", True):
        raise ValueError(
            "triton_kv attention supports causal self-attention only; "
            f"{type(module).__name__} has is_causal=False"
        )

    batch_size, seqlen_k = key.shape[0], key.shape[2]
    if attention_mask is None:
        window = kwargs.get("sliding_window")
        if window is not None and seqlen_k > window:
            raise ValueError(
                f"triton_kv attention got no mask but sliding_window={window} < {seqlen_k} keys: the "
                "window would be ignored. Build the mask through transformers (attention_mask / cache)."
            )
        out = flashkv_ops.attention(query, key, value, causal=True, scale=scaling)  # [B, H_q, S_q, D]
        return out.transpose(1, 2).contiguous(), None

    if isinstance(attention_mask, torch.Tensor):
        warn_once(
            "dense-mask",
            "triton_kv attention received a dense attention mask tensor (a custom 4-D mask); "
            "falling back to PyTorch SDPA for it.",
        )
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=0.0, scaling=scaling, is_causal=False
        )

    if not isinstance(attention_mask, KeyRangeMask):
        raise TypeError(
            "triton_kv attention expects attention_mask to be None, a KeyRangeMask or a tensor, got "
            f"{type(attention_mask).__name__}"
        )

    attention_mask.verify()
    if attention_mask.fallback_reason is not None:
        warn_once(
            attention_mask.fallback_reason,
            f"triton_kv attention cannot express this mask as key ranges: {attention_mask.fallback_reason}; "
            "falling back to PyTorch SDPA with a dense mask (slower, same result).",
        )
        return sdpa_attention_forward(
            module, query, key, value, attention_mask.dense(), dropout=0.0, scaling=scaling, is_causal=False
        )

    if attention_mask.key_start.shape[0] != batch_size:
        raise ValueError(
            f"attention_mask was built for batch size {attention_mask.key_start.shape[0]}, "
            f"but the key tensor has batch size {batch_size}"
        )
    # The registered op directly: the ranges come from triton_kv_mask (verified once per forward
    # above), so the public function's per-call value checks would only add one host sync per
    # layer in eager generation. The kernels clamp every range to the key tensor regardless.
    out = torch.ops.flashkv.attention_with_key_ranges(
        query, key, value, attention_mask.key_start, attention_mask.key_end, causal=True, scale=scaling
    )  # [B, H_q, S_q, D]
    return out.transpose(1, 2).contiguous(), None
