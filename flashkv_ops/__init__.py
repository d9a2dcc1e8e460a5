"""flashkv: Triton attention kernels for LLM inference as torch.library ops.

Public API: ``attention``, ``attention_with_kv_cache``, ``attention_with_key_ranges``,
``PagedKVCache``. Importing the package registers ``torch.ops.flashkv.*`` and, when transformers
is installed, the ``"triton_kv"`` attention implementation.
"""

from .attention import attention, attention_with_key_ranges, attention_with_kv_cache
from .paged import PagedKVCache, PoolExhaustedError

__all__ = [
    "attention",
    "attention_with_kv_cache",
    "attention_with_key_ranges",
    "PagedKVCache",
    "PoolExhaustedError",
]
__version__ = "0.1.0"
