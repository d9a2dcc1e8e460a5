"""transformers integration: the ``"triton_kv"`` attention implementation.

Importing ``flashkv_ops`` (with transformers >= 5.0 installed) calls :func:`register_triton_kv`,
after which any LLaMA-family model can switch attention with one argument::

    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="triton_kv")
    model.set_attn_implementation("triton_kv")          # or on a loaded model
    flashkv_ops.model_patches.apply_flashkv(model)      # same, checking the model family

Padding is carried as per-sequence key ranges (:class:`~.masks.KeyRangeMask`), never as a dense
``[B, 1, S_q, S_k]`` mask; patterns that ranges cannot express fall back to SDPA with a warning.

The name avoids "flash", "sdpa", "flex" and "/": transformers routes such names to its own code
paths (FlashAttention branches, SDPA checks, hub kernels).
"""

from __future__ import annotations

import importlib

import transformers
from packaging.version import Version

MIN_TRANSFORMERS = "5.0"


def _check_transformers_version(version: str) -> None:
    """Raise ImportError unless ``version`` is a transformers release this integration supports."""
    if Version(version).release < Version(MIN_TRANSFORMERS).release:
        raise ImportError(
            f"flashkv_ops.model_patches needs transformers >= {MIN_TRANSFORMERS} (its AttentionInterface and "
            f"AttentionMaskInterface); found transformers {version}. Upgrade with "
            f"`pip install 'transformers>={MIN_TRANSFORMERS}'`."
        )


_check_transformers_version(transformers.__version__)

from transformers import AttentionInterface  # noqa: E402
from transformers.masking_utils import AttentionMaskInterface  # noqa: E402

from .attention import triton_kv_attention  # noqa: E402
from .masks import KeyRangeMask, triton_kv_mask  # noqa: E402

ATTN_IMPLEMENTATION = "triton_kv"

__all__ = [
    "ATTN_IMPLEMENTATION",
    "KeyRangeMask",
    "apply_flashkv",
    "apply_flashkv_to_llama",
    "apply_flashkv_to_mistral",
    "apply_flashkv_to_phi3",
    "apply_flashkv_to_qwen2",
    "register_triton_kv",
    "revert_flashkv_defaults",
    "triton_kv_attention",
    "triton_kv_mask",
]


def register_triton_kv() -> None:
    """Register ``"triton_kv"`` with transformers' attention and attention-mask interfaces.

    Idempotent. Both entries are needed: without the mask entry transformers would pass
    ``attention_mask=None`` to the attention function and silently drop padding.
    """
    if AttentionInterface._global_mapping.get(ATTN_IMPLEMENTATION) is not triton_kv_attention:
        AttentionInterface.register(ATTN_IMPLEMENTATION, triton_kv_attention)
    if AttentionMaskInterface._global_mapping.get(ATTN_IMPLEMENTATION) is not triton_kv_mask:
        AttentionMaskInterface.register(ATTN_IMPLEMENTATION, triton_kv_mask)


# model_type -> (module path, PreTrainedModel base class name) of the supported families
_FAMILIES = {
    "llama": ("transformers.models.llama.modeling_llama", "LlamaPreTrainedModel"),
    "mistral": ("transformers.models.mistral.modeling_mistral", "MistralPreTrainedModel"),
    "qwen2": ("transformers.models.qwen2.modeling_qwen2", "Qwen2PreTrainedModel"),
    "phi3": ("transformers.models.phi3.modeling_phi3", "Phi3PreTrainedModel"),
}

# base class -> its own get_correct_attn_implementation before patching (None: it had none)
_patched_defaults: dict[type, object] = {}


def _family_base(model_type: str) -> type:
    module_name, class_name = _FAMILIES[model_type]
    return getattr(importlib.import_module(module_name), class_name)


def _default_to_triton_kv(base: type) -> None:
    """Make ``"triton_kv"`` what ``base`` models get when no attn_implementation is requested."""
    # get_correct_attn_implementation is where transformers (5.17 and 5.23 alike) turns "nothing
    # requested" into "sdpa", for __init__, from_config and from_pretrained; explicit requests
    # pass through it unchanged.
    if base in _patched_defaults:
        return
    _patched_defaults[base] = base.__dict__.get("get_correct_attn_implementation")
    inherited = base.get_correct_attn_implementation

    def get_correct_attn_implementation(self, requested_attention=None, is_init_check=False):
        if requested_attention is None:
            requested_attention = ATTN_IMPLEMENTATION
        return inherited(self, requested_attention, is_init_check)

    base.get_correct_attn_implementation = get_correct_attn_implementation


def revert_flashkv_defaults() -> None:
    """Undo every class-level patch made by ``apply_flashkv_to_*(model=None)``."""
    for base, own in _patched_defaults.items():
        if own is None:
            del base.get_correct_attn_implementation
        else:
            base.get_correct_attn_implementation = own
    _patched_defaults.clear()


def _apply(model_type: str, model):
    register_triton_kv()
    if model is None:
        _default_to_triton_kv(_family_base(model_type))
        return None
    found = getattr(getattr(model, "config", None), "model_type", None)
    if found != model_type:
        raise ValueError(f"apply_flashkv_to_{model_type} got a model with config.model_type={found!r}")
    model.set_attn_implementation(ATTN_IMPLEMENTATION)
    return model


def apply_flashkv_to_llama(model=None):
    """Route LLaMA attention through flashkv.

    Parameters
    ----------
    model : transformers.PreTrainedModel, optional
        A loaded LLaMA model (``config.model_type == "llama"``): switched to ``"triton_kv"`` in
        place. If None, LLaMA models created afterwards without an explicit
        ``attn_implementation`` default to ``"triton_kv"`` (undo with
        :func:`revert_flashkv_defaults`); an explicit request still wins.

    Returns
    -------
    The model (switched), or None when ``model`` is None.

    Examples
    --------
    >>> model = apply_flashkv_to_llama(AutoModelForCausalLM.from_pretrained(path))
    """
    return _apply("llama", model)


def apply_flashkv_to_mistral(model=None):
    """Route Mistral attention through flashkv; same contract as :func:`apply_flashkv_to_llama`.

    A sliding window is honoured exactly: where it cuts off keys the layer falls back to SDPA
    with a warning.
    """
    return _apply("mistral", model)


def apply_flashkv_to_qwen2(model=None):
    """Route Qwen2 attention through flashkv; same contract as :func:`apply_flashkv_to_llama`."""
    return _apply("qwen2", model)


def apply_flashkv_to_phi3(model=None):
    """Route Phi-3 attention through flashkv; same contract as :func:`apply_flashkv_to_llama`."""
    return _apply("phi3", model)


def apply_flashkv(model):
    """Switch a loaded model to ``"triton_kv"``, dispatching on ``model.config.model_type``.

    Parameters
    ----------
    model : transformers.PreTrainedModel
        A LLaMA, Mistral, Qwen2 or Phi-3 model.

    Returns
    -------
    The same model, switched in place.

    Raises
    ------
    ValueError
        If the model family is not one of the supported ones.
    """
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in _FAMILIES:
        raise ValueError(
            f"apply_flashkv supports model_type in {sorted(_FAMILIES)}, "
            f"got model.config.model_type={model_type!r}"
        )
    return _apply(model_type, model)


# Importing the integration is what makes the names usable: `import flashkv_ops` imports this
# module when transformers is present, so from_pretrained(..., attn_implementation="triton_kv")
# works without a further call.
register_triton_kv()
