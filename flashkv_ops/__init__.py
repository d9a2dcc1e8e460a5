"""flashkv: Triton attention kernels for LLM inference as torch.library ops.

Public API: ``attention``, ``attention_with_kv_cache``, ``attention_with_key_ranges``,
``PagedKVCache``, ``paged_read_order``, ``StaticKVCache`` and ``generate``. Importing the package registers
``torch.ops.flashkv.*`` and, when transformers is installed, the ``"triton_kv"`` attention
implementation.
"""

from .attention import attention, attention_with_key_ranges, attention_with_kv_cache
from .cache import StaticKVCache
from .generate import generate
from .paged import PagedKVCache, PoolExhaustedError, paged_read_order

try:
    from .model_patches import register_triton_kv
except ImportError:  # transformers missing or too old: the ops still work
    register_triton_kv = None
else:
    register_triton_kv()

__all__ = [
    "attention",
    "attention_with_kv_cache",
    "attention_with_key_ranges",
    "PagedKVCache",
    "PoolExhaustedError",
    "paged_read_order",
    "StaticKVCache",
    "generate",
]
__version__ = "0.1.0"
