"""Pure Triton kernels and their launchers (installed as ``flashkv_ops.kernels``).

No validation and no torch.library here: callers in ``flashkv_ops`` check inputs first.
"""

from .attention_fwd import attention_forward
from .cache_append import append_kv
from .decode import attention_decode, decode_packed_rows
from .page_order import paged_read_order

__all__ = ["attention_forward", "attention_decode", "append_kv", "decode_packed_rows", "paged_read_order"]
