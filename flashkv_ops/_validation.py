"""Input checks for the public boundary. Each raises naming the argument at fault.

Shape, dtype and device checks are free and always run. Checks that read tensor values
(lengths, page indices) run only in eager mode: `value_checks_enabled()` is false while
torch.compile traces and while a CUDA graph is being captured, so no check syncs the host there.
"""

import math
import numbers
import operator
from typing import Optional

import numpy as np
import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 256


def value_checks_enabled(t: torch.Tensor) -> bool:
    if torch.compiler.is_compiling():
        return False
    return not (t.is_cuda and torch.cuda.is_current_stream_capturing())


def check_count(name: str, value, minimum: int) -> int:
    """``value`` as a Python int >= ``minimum``; any integer type passes (numpy's, a 0-d integer
    tensor), a float or bool raises TypeError and a smaller value ValueError, naming ``name``."""
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got {value!r}")
    try:
        value = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an int, got {value!r}") from None
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def check_index(name: str, value, size: int) -> int:
    """``value`` as a Python int in ``[0, size)`` (`check_count` with minimum 0, then the bound),
    naming ``name``."""
    value = check_count(name, value, 0)
    if value >= size:
        raise ValueError(f"{name} must be in [0, {size}), got {value}")
    return value


def check_causal_scale(causal, scale) -> tuple:
    """``(causal, scale)`` as the op schema takes them (a Python bool; None or a Python float), after
    checking that ``causal`` is a bool and ``scale`` None or a finite real number. Symbolic values
    pass unchanged: torch.compile may trace either as one."""
    if isinstance(causal, np.bool_):
        causal = bool(causal)
    if not isinstance(causal, (bool, torch.SymBool)):
        raise TypeError(f"causal must be a bool, got {causal!r}")
    if scale is None or isinstance(scale, (torch.SymFloat, torch.SymInt)):
        return causal, scale
    scale = check_real("scale", scale, "a float or None")
    if not math.isfinite(scale):
        raise ValueError(f"scale must be finite, got {scale}")
    return causal, scale


def check_real(name: str, value, expected: str = "a float") -> float:
    """``value`` as a Python float; any real number passes (numpy's too), a bool or anything else
    raises TypeError naming ``name`` and what it ``expected``."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be {expected}, got {value!r}")
    return float(value)


def check_storage(head_dim, dtype) -> None:
    """A cache's ``head_dim`` (an int, see `check_count`) and element ``dtype``, as its
    constructor's arguments."""
    if not _head_dim_supported(head_dim):
        raise ValueError(f"head_dim must be a multiple of 8 from 8 to {MAX_HEAD_DIM}, got {head_dim}")
    if dtype not in FLOAT_DTYPES:
        raise TypeError(f"dtype must be float16, bfloat16 or float32, got {dtype}")


def check_tensor(name: str, t, rank: int = 4) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != rank:
        raise ValueError(f"{name} must have {rank} dimensions, got shape {tuple(t.shape)}")


def check_float(name: str, t: torch.Tensor, like: torch.Tensor = None, like_name: str = "q") -> None:
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16 or float32, got {t.dtype}")
    if like is not None and t.dtype != like.dtype:
        raise TypeError(f"{name} has dtype {t.dtype} but {like_name} has {like.dtype}; they must match")


def check_same_device(name: str, t: torch.Tensor, device: torch.device) -> None:
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but q is on {device}; all tensors must share a device")


def _head_dim_supported(head_dim: int) -> bool:
    return head_dim % 8 == 0 and 8 <= head_dim <= MAX_HEAD_DIM


def check_head_dim(name: str, head_dim: int) -> None:
    if not _head_dim_supported(head_dim):
        raise ValueError(f"{name} has head_dim {head_dim}; supported: multiples of 8 from 8 to {MAX_HEAD_DIM}")


def check_last_dim_contiguous(name: str, t: torch.Tensor) -> None:
    if t.stride(-1) != 1 and t.shape[-1] > 1:
        raise ValueError(f"{name} must have a contiguous last dimension (stride 1), got strides {t.stride()}")


def check_query_kv(q, k, v, k_name: str = "k", v_name: str = "v") -> None:
    """q [B, H_q, S_q, D] against keys/values [*, H_kv, *, D]: ranks, dtypes, devices, heads."""
    check_tensor("q", q)
    check_tensor(k_name, k)
    check_tensor(v_name, v)
    check_float("q", q)
    check_float(k_name, k, q)
    check_float(v_name, v, q)
    check_same_device(k_name, k, q.device)
    check_same_device(v_name, v, q.device)
    check_head_dim("q", q.shape[-1])
    for name, t in ((k_name, k), (v_name, v)):
        if t.shape[-1] != q.shape[-1]:
            raise ValueError(f"{name} has head_dim {t.shape[-1]} but q has {q.shape[-1]}")
    if k.shape != v.shape:
        raise ValueError(f"{k_name} has shape {tuple(k.shape)} but {v_name} has {tuple(v.shape)}; they must match")
    for name, t in ((k_name, k), (v_name, v)):
        # kernels address one KV head's [S, D] slab with 32-bit offsets
        if t.shape[2] * t.stride(2) >= 2**31:
            raise ValueError(f"{name} spans {t.shape[2] * t.stride(2)} elements along its sequence dimension; "
                             "at most 2**31 - 1 are supported")
    num_q_heads, num_kv_heads = q.shape[1], k.shape[1]
    if num_kv_heads == 0 or num_q_heads % num_kv_heads != 0:
        raise ValueError(
            f"q has {num_q_heads} heads, which is not a multiple of the {num_kv_heads} heads of {k_name}")


def check_lengths_tensor(name: str, t, batch: int, device: torch.device) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be an int32 torch.Tensor of shape [{batch}], got {type(t).__name__}")
    if t.dtype != torch.int32:
        raise TypeError(f"{name} must be int32, got {t.dtype}")
    if t.shape != (batch,):
        raise ValueError(f"{name} must have shape [{batch}] (one entry per sequence), got {tuple(t.shape)}")
    check_same_device(name, t, device)


def check_new_tokens(q, k_cache, k, v) -> None:
    """New tokens k/v [B, H_kv, S_q, D] for a cache append."""
    if (k is None) != (v is None):
        raise ValueError("k and v must be given together (got " + ("k without v)" if v is None else "v without k)"))
    if k is None:
        return
    check_tensor("k", k)
    check_tensor("v", v)
    check_float("k", k, q)
    check_float("v", v, q)
    check_same_device("k", k, q.device)
    check_same_device("v", v, q.device)
    batch, _, seqlen_q, head_dim = q.shape
    expected = (batch, k_cache.shape[1], seqlen_q, head_dim)
    for name, t in (("k", k), ("v", v)):
        if tuple(t.shape) != expected:
            raise ValueError(f"{name} must have shape [B, H_kv, S_q, D] = {list(expected)}, got {list(t.shape)}")


def check_block_table(block_table, batch: Optional[int] = None, device: Optional[torch.device] = None) -> None:
    """int32 ``[B, max_pages_per_seq]``; ``batch`` and ``device``, when given, are what B and its
    device must be."""
    if not isinstance(block_table, torch.Tensor):
        raise TypeError(f"block_table must be an int32 torch.Tensor, got {type(block_table).__name__}")
    if block_table.dtype != torch.int32:
        raise TypeError(f"block_table must be int32, got {block_table.dtype}")
    if block_table.dim() != 2 or (batch is not None and block_table.shape[0] != batch):
        rows = "B" if batch is None else f"B={batch}"
        raise ValueError(f"block_table must have shape [{rows}, max_pages_per_seq], got {tuple(block_table.shape)}")
    if block_table.shape[1] == 0:
        raise ValueError("block_table must have at least one page per sequence")
    if device is not None:
        check_same_device("block_table", block_table, device)


def check_cache_values(cache_seqlens, seqlen_q: int, capacity: int, block_table, num_pages: int,
                       page_size: int) -> None:
    """Eager-only: lengths non-negative, no overflow, every page that will be touched inside the pool."""
    lengths = cache_seqlens.tolist()
    for b, length in enumerate(lengths):
        if length < 0:
            raise ValueError(f"cache_seqlens[{b}] is {length}; lengths must be >= 0")
        if length + seqlen_q > capacity:
            what = "max_pages_per_seq * page_size" if block_table is not None else "S_max"
            raise ValueError(f"cache_seqlens + S_q exceeds the cache capacity {what}={capacity} "
                             f"for batch {b} ({length} + {seqlen_q})")
    if block_table is None:
        return
    # one copy of the table and a vectorised test: a Python walk over B x pages costs ~ms
    table = block_table.cpu().numpy()  # [B, max_pages_per_seq]
    used = -(-(np.asarray(lengths) + seqlen_q) // page_size)  # pages each sequence touches
    touched = np.arange(table.shape[1])[None, :] < used[:, None]
    bad = np.argwhere(touched & ((table < 0) | (table >= num_pages)))
    if len(bad):
        b, slot = bad[0]
        raise ValueError(f"block_table[{b}, {slot}] is {table[b, slot]}, outside the pool of {num_pages} pages")


def check_key_range_values(key_start, key_end, num_keys: int) -> None:
    """Eager-only: 0 <= key_start <= key_end <= S_k."""
    for b, (start, end) in enumerate(zip(key_start.tolist(), key_end.tolist())):
        if not 0 <= start <= end <= num_keys:
            raise ValueError(f"key_start[{b}]={start}, key_end[{b}]={end} must satisfy "
                             f"0 <= key_start <= key_end <= S_k={num_keys}")
