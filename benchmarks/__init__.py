"""flashkv benchmarks: decode, prefill and end-to-end scripts, their plots and README tables.

Run them as scripts from the repository root (``python benchmarks/bench_decode.py``) or as
modules (``python -m benchmarks.bench_decode``); they need a CUDA GPU.
"""
