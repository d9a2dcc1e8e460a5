"""Static-shape KV cache for whole-model decode.

One pair of ``[batch, num_kv_heads, max_seq_len, head_dim]`` buffers per layer, allocated once,
plus one int32 length per sequence on the device. Nothing here ever reallocates or reads a
length back to the host, so a decode step that uses the cache can be captured in a CUDA graph
and replayed while the lengths grow.

How the model reaches the cache: ``model(..., flashkv_cache=cache)`` with the ``"triton_kv"``
attention implementation; transformers hands the extra keyword down to the attention function,
which calls :meth:`StaticKVCache.attend` once per layer.
"""

from __future__ import annotations

import torch
from torch import nn

import flashkv_ops

from ._validation import check_count, check_index, check_storage, check_tensor

__all__ = ["StaticKVCache"]


def _mark_static(tensor: torch.Tensor) -> None:
    # CUDA-graph trees (torch.compile mode="reduce-overhead") skip graphs whose mutated inputs
    # are not known to keep their address; module buffers usually are, but the cache travels
    # into the model as a keyword argument, not as a submodule, so say it explicitly.
    try:
        torch._dynamo.mark_static_address(tensor)
    except Exception:  # pragma: no cover - only matters under torch.compile
        pass


def config_dims(config) -> tuple[int, int, int]:
    """``(num_layers, num_kv_heads, head_dim)`` of a transformers config, as the model computes them."""
    num_q_heads = config.num_attention_heads
    num_kv_heads = getattr(config, "num_key_value_heads", None) or num_q_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // num_q_heads
    return config.num_hidden_layers, num_kv_heads, head_dim


class StaticKVCache(nn.Module):
    """Per-layer K/V buffers of fixed shape and per-sequence lengths, for graph-captured decode.

    Memory is exactly ``2 * num_layers * batch_size * num_kv_heads * max_seq_len * head_dim *
    dtype_bytes`` (:attr:`nbytes`): K/V heads are stored once, never repeated for GQA, and the
    lengths add ``4 * batch_size`` bytes. Sequence ``b`` owns cache positions
    ``[0, seqlens[b])``; positions at or beyond ``seqlens[b]`` hold stale data that attention
    never reads.

    Parameters
    ----------
    num_layers : int
        Number of decoder layers (one K and one V buffer each).
    batch_size : int
        Number of sequences ``B``; fixed for the life of the cache.
    num_kv_heads : int
        Key/value heads ``H_kv`` (not query heads).
    max_seq_len : int
        Capacity ``S_max`` in tokens per sequence: prompt plus generated tokens.
    head_dim : int
        Head dimension ``D``.
    dtype : torch.dtype, optional
        Cache dtype; must equal the model's activation dtype. Default ``torch.float16``.
    device : torch.device or str, optional
        Where the buffers live. Default: the current default device.

    Attributes
    ----------
    seqlens : torch.Tensor
        int32 ``[B]`` on the cache's device: tokens already stored per sequence.
    key_cache, value_cache : tuple of torch.Tensor
        One ``[B, H_kv, S_max, D]`` buffer per layer.

    Examples
    --------
    >>> cache = StaticKVCache.from_config(model.config, batch_size=4, max_seq_len=2048,
    ...                                   dtype=torch.bfloat16, device="cuda")
    >>> cache.nbytes  # 2 * layers * 4 * H_kv * 2048 * D * 2
    """

    def __init__(
        self,
        num_layers: int,
        batch_size: int,
        num_kv_heads: int,
        max_seq_len: int,
        head_dim: int,
        *,
        dtype: torch.dtype = torch.float16,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        num_layers, batch_size, num_kv_heads, max_seq_len, head_dim = (
            check_count(name, value, 1) for name, value in (
                ("num_layers", num_layers),
                ("batch_size", batch_size),
                ("num_kv_heads", num_kv_heads),
                ("max_seq_len", max_seq_len),
                ("head_dim", head_dim),
            ))
        check_storage(head_dim, dtype)

        self._key_names = tuple(f"key_{i}" for i in range(num_layers))
        self._value_names = tuple(f"value_{i}" for i in range(num_layers))
        shape = (batch_size, num_kv_heads, max_seq_len, head_dim)
        for key_name, value_name in zip(self._key_names, self._value_names):
            # Zero-filled so that a stray read of an unwritten slot is finite, never NaN garbage.
            # Non-persistent: a cache is scratch memory, not model state.
            self.register_buffer(key_name, torch.zeros(shape, dtype=dtype, device=device), persistent=False)
            self.register_buffer(value_name, torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("seqlens", torch.zeros(batch_size, dtype=torch.int32, device=device), persistent=False)
        self._mark_all_static()
        # Captured decode graph bound to these buffers (set by flashkv_ops.generate); it replays
        # against the exact addresses above, so it lives and dies with the cache.
        self._decode_graph = None

    # -- construction -----------------------------------------------------------------------

    @classmethod
    def from_config(
        cls,
        config,
        batch_size: int,
        max_seq_len: int,
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> "StaticKVCache":
        """Size a cache for a transformers model config.

        Parameters
        ----------
        config : transformers.PretrainedConfig
            Uses ``num_hidden_layers``, ``num_attention_heads``, ``num_key_value_heads``
            (default: ``num_attention_heads``) and ``head_dim`` (default:
            ``hidden_size // num_attention_heads``).
        batch_size : int
            Number of sequences ``B``.
        max_seq_len : int
            Capacity ``S_max`` per sequence (prompt + new tokens).
        dtype : torch.dtype, optional
            Default: ``config.dtype`` when it is a floating dtype, else ``torch.float16``.
        device : torch.device or str, optional
            Default: the current default device.

        Returns
        -------
        StaticKVCache
            Buffers ``[B, H_kv, S_max, D]`` per layer.
        """
        num_layers, num_kv_heads, head_dim = config_dims(config)
        if dtype is None:
            config_dtype = getattr(config, "dtype", None)
            if isinstance(config_dtype, str):
                config_dtype = getattr(torch, config_dtype, None)
            dtype = config_dtype if isinstance(config_dtype, torch.dtype) else torch.float16
        return cls(
            num_layers, batch_size, num_kv_heads, max_seq_len, head_dim, dtype=dtype, device=device
        )

    @classmethod
    def from_model(cls, model: nn.Module, batch_size: int, max_seq_len: int) -> "StaticKVCache":
        """Size a cache for ``model``: its config, and the dtype and device of its parameters.

        Parameters
        ----------
        model : transformers.PreTrainedModel
            A LLaMA-family causal LM.
        batch_size : int
            Number of sequences ``B``.
        max_seq_len : int
            Capacity ``S_max`` per sequence (prompt + new tokens).

        Returns
        -------
        StaticKVCache
        """
        param = next(model.parameters())
        return cls.from_config(model.config, batch_size, max_seq_len, dtype=param.dtype, device=param.device)

    # -- shape information ------------------------------------------------------------------

    @property
    def key_cache(self) -> tuple[torch.Tensor, ...]:
        """Per layer ``[batch_size, num_kv_heads, max_seq_len, head_dim]`` key buffers."""
        # Looked up through _buffers on every access: Module.to()/cuda() replace the tensors.
        return tuple(self._buffers[name] for name in self._key_names)

    @property
    def value_cache(self) -> tuple[torch.Tensor, ...]:
        """Per layer ``[batch_size, num_kv_heads, max_seq_len, head_dim]`` value buffers."""
        return tuple(self._buffers[name] for name in self._value_names)

    @property
    def num_layers(self) -> int:
        """Decoder layers (one key and one value buffer each)."""
        return len(self._key_names)

    @property
    def batch_size(self) -> int:
        """Sequences ``B`` (rows of ``seqlens``)."""
        return self.seqlens.shape[0]

    @property
    def num_kv_heads(self) -> int:
        """KV heads ``H_kv`` per layer (never repeated for GQA)."""
        return self._buffers[self._key_names[0]].shape[1]

    @property
    def max_seq_len(self) -> int:
        """Capacity ``S_max`` per sequence, in tokens."""
        return self._buffers[self._key_names[0]].shape[2]

    @property
    def head_dim(self) -> int:
        """Head dimension ``D``."""
        return self._buffers[self._key_names[0]].shape[3]

    @property
    def dtype(self) -> torch.dtype:
        """Element type of the key and value buffers."""
        return self._buffers[self._key_names[0]].dtype

    @property
    def device(self) -> torch.device:
        """Device of every buffer."""
        return self.seqlens.device

    @property
    def nbytes(self) -> int:
        """Bytes held by the K/V buffers: ``2 * layers * B * H_kv * S_max * D * dtype_bytes``."""
        return sum(t.nbytes for t in self.key_cache) + sum(t.nbytes for t in self.value_cache)

    def extra_repr(self) -> str:
        return (
            f"num_layers={self.num_layers}, batch_size={self.batch_size}, num_kv_heads={self.num_kv_heads}, "
            f"max_seq_len={self.max_seq_len}, head_dim={self.head_dim}, dtype={self.dtype}, "
            f"nbytes={self.nbytes}"
        )

    # -- state --------------------------------------------------------------------------------

    def reset(self) -> None:
        """Forget every sequence: set all lengths to 0 (in place; buffers keep their addresses)."""
        self.seqlens.zero_()

    def advance(self, num_tokens: int | torch.Tensor) -> None:
        """Add ``num_tokens`` to every sequence's length, in place, on the device.

        Call once per model forward, after all layers have attended (each layer writes at the
        same positions). Graph-capture safe: no host sync.

        Parameters
        ----------
        num_tokens : int or torch.Tensor
            An int in ``[0, max_seq_len]``, or an integer tensor, scalar or ``[B]`` for
            per-sequence counts (its values are not read here; the next eager ``attend`` checks
            the lengths they give).
        """
        if isinstance(num_tokens, torch.Tensor):
            if num_tokens.dtype.is_floating_point or num_tokens.dtype.is_complex or num_tokens.dtype == torch.bool:
                raise TypeError(f"num_tokens must hold integers, got {num_tokens.dtype}")
            if num_tokens.shape not in ((), (self.batch_size,)):
                raise ValueError(f"num_tokens must be a scalar or have shape [{self.batch_size}], "
                                 f"got {tuple(num_tokens.shape)}")
        elif check_count("num_tokens", num_tokens, 0) > self.max_seq_len:
            raise ValueError(f"num_tokens must be at most max_seq_len={self.max_seq_len}, got {num_tokens}")
        self.seqlens.add_(num_tokens)

    def attend(
        self,
        layer_idx: int,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        scaling: float | None = None,
    ) -> torch.Tensor:
        """Write one layer's new K/V into the cache and attend over each sequence's prefix.

        New tokens go to positions ``seqlens[b] .. seqlens[b] + S_q - 1``; query row ``i`` of
        sequence ``b`` sees cache positions ``j <= seqlens[b] + i``. ``seqlens`` is not changed
        here (every layer of one forward writes at the same positions): call :meth:`advance`
        after the forward.

        Parameters
        ----------
        layer_idx : int
            Decoder layer index (``module.layer_idx`` in transformers).
        query : torch.Tensor
            ``[B, H_q, S_q, D]``, RoPE already applied.
        key, value : torch.Tensor
            ``[B, H_kv, S_q, D]``: only the new tokens, RoPE already applied to ``key``.
        scaling : float, optional
            Softmax scale; default ``D ** -0.5``.

        Returns
        -------
        torch.Tensor
            ``[B, H_q, S_q, D]`` in ``query``'s dtype.
        """
        layer_idx = check_index("layer_idx", layer_idx, len(self._key_names))
        self._check_step(query, key, value)
        return flashkv_ops.attention_with_kv_cache(
            query,
            self._buffers[self._key_names[layer_idx]],
            self._buffers[self._value_names[layer_idx]],
            self.seqlens,
            k=key,
            v=value,
            causal=True,
            scale=scaling,
        )

    # -- internals ----------------------------------------------------------------------------

    def _check_step(self, query, key, value) -> None:
        """``attend``'s tensors against the cache, named as ``attend`` names them (shapes, dtypes
        and devices only: free, so they run in every mode)."""
        for name, t in (("query", query), ("key", key), ("value", value)):
            check_tensor(name, t)
            if t.dtype != self.dtype:
                raise TypeError(f"{name} has dtype {t.dtype} but the cache holds {self.dtype}")
            if t.device != self.device:
                raise ValueError(f"{name} is on {t.device} but the cache is on {self.device}")
        batch, num_q_heads, seqlen_q, head_dim = query.shape
        if batch != self.batch_size or head_dim != self.head_dim:
            raise ValueError(f"query must have shape [{self.batch_size}, H_q, S_q, {self.head_dim}] (the cache's "
                             f"batch size and head_dim), got {list(query.shape)}")
        if num_q_heads % self.num_kv_heads:
            raise ValueError(f"query has {num_q_heads} heads, not a multiple of the cache's {self.num_kv_heads} "
                             "KV heads")
        expected = [self.batch_size, self.num_kv_heads, seqlen_q, self.head_dim]
        for name, t in (("key", key), ("value", value)):
            if list(t.shape) != expected:
                raise ValueError(f"{name} must have shape [B, H_kv, S_q, D] = {expected}, got {list(t.shape)}")

    def _mark_all_static(self) -> None:
        for tensor in self._buffers.values():
            _mark_static(tensor)

    def _apply(self, fn, recurse=True):
        # .to()/.cuda()/.half() make new tensors: the old captured graph points at freed memory,
        # and the new buffers need the static marking again.
        result = super()._apply(fn, recurse)
        self._decode_graph = None
        self._mark_all_static()
        return result
