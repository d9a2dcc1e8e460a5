"""The torch.library registrations: every flashkv op and its fake (meta) twin, in one place.

The op bodies do no validation (the public functions in ``flashkv_ops.attention`` do) and never
sync the host, so they can run inside torch.compile graphs and CUDA-graph captures. They choose
a kernel from static shapes only: few packed query rows -> split-KV decode, else the
FlashAttention-2 forward kernel.
"""

import os
from typing import Optional

import torch
from torch import Tensor

from . import _fallback
from .kernels import append_kv, attention_decode, attention_forward, decode_packed_rows, paged_read_order

# TRITON_INTERPRET is read by triton when it is imported, so decide once, here.
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

# packed (group x S_q) rows up to which the split-KV decode kernel beats the forward kernel
DECODE_MAX_PACKED_ROWS = 64
DECODE_MAX_QUERY_LEN = 16


def uses_triton(t: Tensor) -> bool:
    """CUDA tensors and (under TRITON_INTERPRET=1) CPU tensors run the Triton kernels."""
    return t.is_cuda or _INTERPRET


def _attend(q, k, v, out, key_start, key_end, key_end_offset, block_table, causal, scale, k_new=None, v_new=None):
    """Dispatch to a kernel (or the CPU fallback). k_new/v_new: this step's tokens, appended to the
    cache k/v at key_end[b] first (key_end is then cache_seqlens and key_end_offset their count)."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if scale < 0 and uses_triton(q):
        # the kernels take each block's running max as max(q.k) * scale, which needs scale >= 0:
        # softmax(scale * q.k) is softmax(-scale * (-q).k)
        q, scale = -q, -scale
    if not uses_triton(q):
        if k_new is not None:
            _fallback.append_kv(k_new, v_new, k, v, key_end, block_table)
        _fallback.attention(q, k, v, out, key_start, key_end, key_end_offset, block_table, causal, scale)
    elif _uses_decode(q, k):
        # the decode kernels write k_new/v_new into the cache themselves, in the same pass
        attention_decode(q, k, v, out, key_start, key_end, key_end_offset, block_table, causal, scale,
                         k_new=k_new, v_new=v_new)
    else:
        if k_new is not None:
            append_kv(k_new, v_new, k, v, key_end, block_table)
        attention_forward(q, k, v, out, key_start, key_end, key_end_offset, block_table, causal, scale)


def _uses_decode(q: Tensor, k: Tensor) -> bool:
    num_q_heads, seqlen_q = q.shape[1], q.shape[2]
    packed = decode_packed_rows(num_q_heads, k.shape[1], seqlen_q)
    return seqlen_q <= DECODE_MAX_QUERY_LEN and packed <= DECODE_MAX_PACKED_ROWS


def _new_output(q: Tensor) -> Tensor:
    return torch.empty(q.shape, dtype=q.dtype, device=q.device)


@torch.library.custom_op("flashkv::attention", mutates_args=())
def attention_op(q: Tensor, k: Tensor, v: Tensor, causal: bool = False, scale: Optional[float] = None) -> Tensor:
    out = _new_output(q)
    _attend(q, k, v, out, None, None, 0, None, causal, scale)
    return out


@attention_op.register_fake
def _(q, k, v, causal=False, scale=None):
    return _new_output(q)


@torch.library.custom_op("flashkv::attention_with_kv_cache", mutates_args=("k_cache", "v_cache"))
def attention_with_kv_cache_op(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    cache_seqlens: Tensor,
    k: Optional[Tensor] = None,
    v: Optional[Tensor] = None,
    causal: bool = True,
    scale: Optional[float] = None,
    block_table: Optional[Tensor] = None,
) -> Tensor:
    out = _new_output(q)
    if k is None or v is None:  # the public function takes both or neither
        k = v = None
    appended = 0 if k is None else k.shape[2]
    _attend(q, k_cache, v_cache, out, None, cache_seqlens, appended, block_table, causal, scale, k, v)
    return out


@attention_with_kv_cache_op.register_fake
def _(q, k_cache, v_cache, cache_seqlens, k=None, v=None, causal=True, scale=None, block_table=None):
    return _new_output(q)


@torch.library.custom_op("flashkv::attention_with_key_ranges", mutates_args=())
def attention_with_key_ranges_op(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    key_start: Tensor,
    key_end: Tensor,
    causal: bool = True,
    scale: Optional[float] = None,
) -> Tensor:
    out = _new_output(q)
    _attend(q, k, v, out, key_start, key_end, 0, None, causal, scale)
    return out


@attention_with_key_ranges_op.register_fake
def _(q, k, v, key_start, key_end, causal=True, scale=None):
    return _new_output(q)


@torch.library.custom_op("flashkv::paged_read_order", mutates_args=())
def paged_read_order_op(block_table: Tensor, cache_seqlens: Tensor, page_size: int) -> Tensor:
    if not uses_triton(block_table):
        return _fallback.paged_read_order(block_table, cache_seqlens, page_size)
    out = torch.empty(block_table.shape, dtype=torch.int32, device=block_table.device)
    paged_read_order(block_table, cache_seqlens, page_size, out)
    return out


@paged_read_order_op.register_fake
def _(block_table, cache_seqlens, page_size):
    return torch.empty(block_table.shape, dtype=torch.int32, device=block_table.device)
