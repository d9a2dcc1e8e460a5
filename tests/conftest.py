"""Without a GPU, run the real Triton kernels on CPU through the interpreter.

TRITON_INTERPRET is read when triton is imported, so it is decided here, before any test module
imports flashkv_ops. `import torch` does not import triton.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
