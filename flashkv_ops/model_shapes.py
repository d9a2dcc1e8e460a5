"""Shapes of the LLaMA-family checkpoints flashkv is measured on, for random-weight models.

Layer counts, widths, heads, vocabulary and RoPE of the published models, without weights: the
example (``examples/generate.py --config NAME``) and the end-to-end benchmark build models of
these shapes on the device without downloading anything. RoPE is given as ``rope_theta`` /
``rope_scaling``, which transformers 5.x accepts and standardises on every version we support.
"""

from __future__ import annotations

from typing import Any

# name -> label, model_type and the config arguments of that model
MODEL_SHAPES: dict[str, dict[str, Any]] = {
    # small enough to run on a laptop CPU in seconds, with GQA (4 query heads per KV head)
    "default": {
        "label": "small LLaMA",
        "model_type": "llama",
        "hidden_size": 256,
        "intermediate_size": 688,
        "num_hidden_layers": 4,
        "num_attention_heads": 8,
        "num_key_value_heads": 2,
        "vocab_size": 32000,
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
    },
    "tinyllama": {
        "label": "TinyLlama-1.1B",
        "model_type": "llama",
        "hidden_size": 2048,
        "intermediate_size": 5632,
        "num_hidden_layers": 22,
        "num_attention_heads": 32,
        "num_key_value_heads": 4,
        "vocab_size": 32000,
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
    },
    # with its "llama3" RoPE frequency scaling
    "llama3-8b": {
        "label": "Llama-3.1-8B",
        "model_type": "llama",
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "vocab_size": 128256,
        "max_position_embeddings": 131072,
        "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0,
        "rope_scaling": {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
        "tie_word_embeddings": False,
    },
    # biases on q/k/v are part of the Qwen2 architecture
    "qwen2.5-7b": {
        "label": "Qwen2.5-7B",
        "model_type": "qwen2",
        "hidden_size": 3584,
        "intermediate_size": 18944,
        "num_hidden_layers": 28,
        "num_attention_heads": 28,
        "num_key_value_heads": 4,
        "vocab_size": 152064,
        "max_position_embeddings": 32768,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0,
        "use_sliding_window": False,
        "tie_word_embeddings": False,
    },
}


def config_kwargs(name: str) -> dict[str, Any]:
    """The config arguments of shape ``name`` (without its label and model_type)."""
    if name not in MODEL_SHAPES:
        raise ValueError(f"name must be one of {sorted(MODEL_SHAPES)}, got {name!r}")
    return {key: value for key, value in MODEL_SHAPES[name].items() if key not in ("label", "model_type")}


def model_config(name: str):
    """A transformers config (``LlamaConfig`` or ``Qwen2Config``) of shape ``name``."""
    from transformers import AutoConfig

    return AutoConfig.for_model(MODEL_SHAPES[name]["model_type"], **config_kwargs(name))
