"""Greedy / sampled decoding of transformers LLaMA-family models over a :class:`StaticKVCache`.

The loop, per call::

    prompts [B, P] (left-padded)                     cache [B, H_kv, S_max, D] per layer
        |  re-align: row b's real tokens -> columns 0..len_b-1
        v
    prefill  [B, L] one forward, positions 0..L-1, every row causal from cache slot 0
        |  seqlens <- len_b, logits taken at column len_b - 1
        v
    decode   [B, 1] static shapes: tokens buffer, positions = seqlens, seqlens += 1
             on CUDA captured once in a CUDAGraph (per cache and model) and replayed

Why prefill right-pads instead of masking: with causal attention, tokens after a row's real
prompt cannot influence it, so padding at the end needs no mask at all; the pad K/V it leaves
at slots >= len_b is never read (attention covers [0, seqlens[b]]) and is overwritten by decode.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable, Sequence

import torch
from torch import nn

from ._validation import check_count, check_real
from .cache import StaticKVCache, config_dims

__all__ = ["generate"]

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "phi3")
ATTN_IMPLEMENTATION = "triton_kv"

# Whether every row has finished is a host read (a sync); doing it every step would drain the
# GPU queue each token, so it is done every this many steps. The output does not change: rows
# that finished keep emitting the pad token either way.
_EOS_CHECK_INTERVAL = 16
# Implicit caches are sized up to a multiple of this, so that calls with slightly different
# prompt lengths reuse one cache (and its captured graph) instead of reallocating.
_CACHE_LEN_MULTIPLE = 256
# Eager runs of the decode step before capture, on a side stream, as PyTorch's CUDA-graph
# documentation asks: lazy initialisation (cuBLAS handles, Triton and torch.compile
# compilation) must not happen during capture.
_WARMUP_STEPS = 2

# model -> StaticKVCache used when generate() is called without cache=. Weak keys: the cache
# (and its captured graph) goes away with the model.
_implicit_caches: "weakref.WeakKeyDictionary[nn.Module, StaticKVCache]" = weakref.WeakKeyDictionary()


def generate(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    max_new_tokens: int = 32,
    eos_token_id: int | Sequence[int] | None = None,
    pad_token_id: int | None = None,
    ignore_eos: bool = False,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
    cache: StaticKVCache | None = None,
    max_cache_len: int | None = None,
    cuda_graph: bool | None = None,
    compile: bool = False,
    fuse_projections: bool = True,
    callback: Callable[[int, torch.Tensor, torch.Tensor], None] | None = None,
) -> torch.Tensor:
    """Decode ``max_new_tokens`` tokens per prompt with flashkv attention and a static KV cache.

    The model may have been loaded with any ``attn_implementation``: for the duration of the call
    it is switched to ``"triton_kv"`` and afterwards restored, so ``model.generate`` behaves as
    before. Greedy output equals transformers' ``model.generate(..., do_sample=False)``.

    Parameters
    ----------
    model : transformers.PreTrainedModel
        A causal LM whose ``config.model_type`` is one of ``llama``, ``mistral``, ``qwen2``,
        ``phi3``, on one device.
    input_ids : torch.Tensor
        int64 ``[B, P]`` prompts, left-padded (right padding also works: only the positions
        where ``attention_mask`` is 1 are read, in order).
    attention_mask : torch.Tensor, optional
        ``[B, P]`` of 0/1; default all ones. Every row needs at least one 1.
    max_new_tokens : int
        Tokens to generate per row, ``>= 1``.
    eos_token_id : int or sequence of int, optional
        Tokens that end a row. Default: ``model.generation_config.eos_token_id``, as
        transformers does.
    pad_token_id : int, optional
        Emitted by a row after its EOS. Default: ``generation_config.pad_token_id``, else the
        first EOS token.
    ignore_eos : bool
        Decode exactly ``max_new_tokens`` for every row regardless of EOS (benchmarks).
    do_sample : bool
        Sample instead of argmax. Sampling runs outside the captured graph.
    temperature : float
        Divides the logits before sampling; ``> 0``.
    top_k : int, optional
        Keep only the ``top_k`` most likely tokens when sampling.
    top_p : float, optional
        Nucleus sampling: keep the smallest set of tokens whose probability reaches ``top_p``.
    generator : torch.Generator, optional
        Random source for sampling, on the model's device.
    cache : StaticKVCache, optional
        Cache to decode into, shaped for this model and batch; it is reset first, and a decode
        graph captured against it is kept on it for the next call. Default: a cache kept per
        model (allocated on first use, reused while batch size, dtype and capacity fit).
    max_cache_len : int, optional
        Capacity of the implicit cache; default ``L + max_new_tokens`` rounded up to a multiple
        of 256 (``L`` = longest prompt). Ignored when ``cache`` is given.
    cuda_graph : bool, optional
        Capture the decode step in a CUDA graph; default ``True`` on CUDA, except for RoPE types
        that transformers recomputes from position values each step (``dynamic``,
        ``longrope``). ``False`` runs the same step eagerly. Not available on CPU.
    compile : bool
        Also run the decode step through ``torch.compile`` (before capture), which fuses the
        small element-wise kernels around attention (RMSNorm, RoPE, residual adds). The first
        call per model and cache shape pays the compilation.
    fuse_projections : bool
        During the call, run q/k/v and gate/up projections as one GEMM each
        (:func:`flashkv_ops.model_patches.projections.fused_projections`): fewer, larger
        launches per layer. The first call moves each group's weights into one buffer (same
        parameters, values and memory); the modules are restored on return.
    callback : callable, optional
        ``callback(step, next_tokens, logits)`` after each generated token: ``step`` counts from
        0, ``next_tokens`` is int64 ``[B]``, ``logits`` ``[B, vocab]`` (a buffer overwritten by
        the next step). It runs on the host without forcing a device sync.

    Returns
    -------
    torch.Tensor
        int64 ``[B, P + max_new_tokens]``: the prompts as given, then the new tokens. A row that
        produced EOS is followed by ``pad_token_id``; the width is fixed even when every row
        stops early (transformers would return a shorter tensor).

    Raises
    ------
    ValueError
        Unsupported ``model_type``, bad shapes or arguments, a request longer than the cache
        (``L + max_new_tokens > max_seq_len``) or the model's sliding window.
    TypeError
        ``cache`` dtype differs from the model's.

    Examples
    --------
    >>> tok.padding_side = "left"
    >>> batch = tok(["Hello", "The capital of France is"], return_tensors="pt", padding=True)
    >>> out = flashkv_ops.generate(model, batch.input_ids.cuda(), batch.attention_mask.cuda(),
    ...                            max_new_tokens=64)
    >>> tok.batch_decode(out[:, batch.input_ids.shape[1]:], skip_special_tokens=True)
    """
    _check_model(model)
    embed_weight = model.get_input_embeddings().weight
    device, dtype = embed_weight.device, embed_weight.dtype

    if not isinstance(input_ids, torch.Tensor) or input_ids.ndim != 2 or 0 in input_ids.shape:
        raise ValueError(f"input_ids must be a [batch, prompt_len] tensor with batch, prompt_len >= 1, got "
                         f"{tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids)}")
    if input_ids.dtype.is_floating_point or input_ids.dtype == torch.bool:
        raise TypeError(f"input_ids must hold integer token ids, got {input_ids.dtype}")
    input_ids = input_ids.to(device=device, dtype=torch.long)
    batch_size, prompt_len = input_ids.shape
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    elif not isinstance(attention_mask, torch.Tensor):
        raise TypeError(f"attention_mask must be a torch.Tensor or None, got {type(attention_mask).__name__}")
    elif attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask must have input_ids' shape {tuple(input_ids.shape)}, "
                         f"got {tuple(attention_mask.shape)}")
    attention_mask = attention_mask.to(device=device) != 0
    max_new_tokens = check_count("max_new_tokens", max_new_tokens, 1)
    _check_sampling(do_sample, temperature, top_k, top_p)
    dynamic_rope = _runtime_rope_types(model.config)
    if cuda_graph is None:
        cuda_graph = device.type == "cuda" and not dynamic_rope
    elif cuda_graph and device.type != "cuda":
        raise ValueError(f"cuda_graph=True needs a CUDA model, this one is on {device}")
    elif cuda_graph and dynamic_rope:
        raise ValueError(f"cuda_graph=True is not supported with RoPE type {dynamic_rope[0]!r}: transformers "
                         f"recomputes its frequencies from a host-side read of the positions every step")

    lengths = attention_mask.sum(dim=1, dtype=torch.int32)  # [B]
    lengths_host = lengths.tolist()
    if min(lengths_host) < 1:
        raise ValueError(f"every row of attention_mask needs at least one 1, rows "
                         f"{[b for b, n in enumerate(lengths_host) if n < 1]} have none")
    longest = max(lengths_host)
    needed = longest + max_new_tokens
    _check_sliding_window(model.config, needed)

    eos_ids = [] if ignore_eos else _eos_ids(model, eos_token_id)
    if pad_token_id is None:
        pad_token_id = getattr(getattr(model, "generation_config", None), "pad_token_id", None)
    if pad_token_id is None:
        pad_token_id = eos_ids[0] if eos_ids else 0

    cache = _resolve_cache(model, cache, batch_size, needed, max_cache_len, dtype, device)

    from .model_patches.projections import fused_projections

    fusion = fused_projections(model) if fuse_projections else contextlib.nullcontext()
    with torch.no_grad(), _attention_implementation(model, ATTN_IMPLEMENTATION), fusion:
        # -- prefill ---------------------------------------------------------------------------
        # Stable sort puts each row's real tokens first, in order: [B, P] -> [B, L].
        order = torch.sort((~attention_mask).to(torch.int8), dim=1, stable=True).indices[:, :longest]
        packed = input_ids.gather(1, order)  # [B, L]
        columns = torch.arange(longest, device=device)
        # Slots past a row's end get token 0: any valid id works, their K/V is never attended.
        packed = torch.where(columns.unsqueeze(0) < lengths.unsqueeze(1), packed, 0)
        cache.reset()
        logits = _prefill(model, cache, packed, lengths)  # [B, V]

        # -- decode ----------------------------------------------------------------------------
        output = torch.empty(batch_size, prompt_len + max_new_tokens, dtype=torch.long, device=device)
        output[:, :prompt_len] = input_ids
        output[:, prompt_len:] = pad_token_id
        eos = torch.tensor(eos_ids, dtype=torch.long, device=device)
        finished = torch.zeros(batch_size, dtype=torch.bool, device=device)
        step_runner = _decode_runner(model, cache, compile) if max_new_tokens > 1 else None

        for step in range(max_new_tokens):
            if step > 0:
                logits = step_runner.step(model, cache, cuda_graph)
            next_tokens = _select(logits, do_sample, temperature, top_k, top_p, generator)  # [B]
            if eos_ids:
                next_tokens = torch.where(finished, pad_token_id, next_tokens)
                finished |= torch.isin(next_tokens, eos)
            output[:, prompt_len + step] = next_tokens
            if callback is not None:
                callback(step, next_tokens, logits)
            if step + 1 == max_new_tokens:
                break
            step_runner.tokens.copy_(next_tokens.unsqueeze(1))
            if eos_ids and (step + 1) % _EOS_CHECK_INTERVAL == 0 and bool(finished.all()):
                break
    return output


# -- checks ------------------------------------------------------------------------------------


def _check_model(model: nn.Module) -> None:
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"model has model_type={model_type!r}; flashkv_ops.generate supports "
                         f"{', '.join(SUPPORTED_MODEL_TYPES)}")
    if getattr(model, "get_output_embeddings", lambda: None)() is None:
        raise ValueError(f"model must be a causal LM with an output head (e.g. LlamaForCausalLM), "
                         f"got {type(model).__name__}")
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if ATTN_IMPLEMENTATION not in ALL_ATTENTION_FUNCTIONS:
        raise RuntimeError(f"the {ATTN_IMPLEMENTATION!r} attention implementation is not registered with "
                           f"transformers; it is registered when flashkv_ops is imported")


def _check_sampling(do_sample: bool, temperature: float, top_k: int | None, top_p: float | None) -> None:
    if not do_sample:
        return
    temperature = check_real("temperature", temperature)
    if top_p is not None:
        top_p = check_real("top_p", top_p, "a float or None")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0 when do_sample=True, got {temperature}")
    if top_k is not None:
        check_count("top_k", top_k, 1)
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1] or None, got {top_p}")


def _check_sliding_window(config, needed: int) -> None:
    # Mistral / Phi-3 (and Qwen2 with use_sliding_window) limit attention to a window; the cache
    # attends to the whole prefix, which equals the windowed model only while no query sees more
    # keys than the window holds. The last token generated is never fed back: the longest row's
    # last query sees prompt + max_new_tokens - 1 keys.
    window = getattr(config, "sliding_window", None)
    if window is not None and needed - 1 > window:
        raise ValueError(f"prompt + max_new_tokens - 1 = {needed - 1} keys exceed the model's "
                         f"sliding_window={window}; sliding-window attention is not supported")


def _runtime_rope_types(config) -> list[str]:
    """RoPE types whose frequencies transformers updates from position values at run time."""
    parameters = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    # one dict, or one per layer type
    entries = [parameters] if "rope_type" in parameters or "type" in parameters else list(parameters.values())
    found = []
    for entry in entries:
        if isinstance(entry, dict):
            rope_type = entry.get("rope_type", entry.get("type", "default"))
            if "dynamic" in rope_type or rope_type == "longrope":
                found.append(rope_type)
    return found


def _eos_ids(model: nn.Module, eos_token_id: int | Sequence[int] | None) -> list[int]:
    if eos_token_id is None:
        eos_token_id = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if eos_token_id is None:
        return []
    if isinstance(eos_token_id, torch.Tensor):
        eos_token_id = eos_token_id.tolist()
    if not isinstance(eos_token_id, (list, tuple)):
        eos_token_id = [eos_token_id]
    return [check_count("eos_token_id", t, 0) for t in eos_token_id]


# -- cache -------------------------------------------------------------------------------------


def _cache_fits(cache: StaticKVCache, config, batch_size: int) -> str | None:
    """Why ``cache`` cannot serve this model and batch, or None when it can."""
    num_layers, num_kv_heads, head_dim = config_dims(config)
    want = (num_layers, batch_size, num_kv_heads, head_dim)
    have = (cache.num_layers, cache.batch_size, cache.num_kv_heads, cache.head_dim)
    if want != have:
        return (f"cache has (num_layers, batch_size, num_kv_heads, head_dim) = {have}, "
                f"the model and batch need {want}")
    return None


def _resolve_cache(
    model: nn.Module,
    cache: StaticKVCache | None,
    batch_size: int,
    needed: int,
    max_cache_len: int | None,
    dtype: torch.dtype,
    device: torch.device,
) -> StaticKVCache:
    if cache is not None:
        if not isinstance(cache, StaticKVCache):
            raise TypeError(f"cache must be a flashkv_ops.StaticKVCache, got {type(cache).__name__}")
        reason = _cache_fits(cache, model.config, batch_size)
        if reason is not None:
            raise ValueError(reason)
        if cache.dtype != dtype:
            raise TypeError(f"cache dtype {cache.dtype} differs from the model's {dtype}")
        if cache.device != device:
            raise ValueError(f"cache is on {cache.device}, the model on {device}")
        if needed > cache.max_seq_len:
            raise ValueError(f"prompt length + max_new_tokens = {needed} exceeds the cache capacity "
                             f"max_seq_len={cache.max_seq_len}")
        return cache

    if max_cache_len is not None:
        max_cache_len = check_count("max_cache_len", max_cache_len, 1)
        if needed > max_cache_len:
            raise ValueError(f"prompt length + max_new_tokens = {needed} exceeds max_cache_len={max_cache_len}")
        capacity = max_cache_len
    else:
        capacity = -(-needed // _CACHE_LEN_MULTIPLE) * _CACHE_LEN_MULTIPLE
    cached = _implicit_caches.get(model)
    if cached is not None:
        reusable = (
            _cache_fits(cached, model.config, batch_size) is None
            and cached.dtype == dtype
            and cached.device == device
            and (cached.max_seq_len == max_cache_len if max_cache_len is not None else cached.max_seq_len >= needed)
        )
        if reusable:
            return cached
        # Free the old buffers (and graph pool) before allocating their replacement.
        del _implicit_caches[model]
        del cached
    cache = StaticKVCache.from_config(model.config, batch_size, capacity, dtype=dtype, device=device)
    _implicit_caches[model] = cache
    return cache


@contextlib.contextmanager
def _attention_implementation(model: nn.Module, name: str):
    """Route every attention layer of ``model`` through ``name``; restore the old choice on exit."""
    configs = {}
    for module in model.modules():
        config = getattr(module, "config", None)
        if config is not None and hasattr(config, "_attn_implementation_internal"):
            configs[id(config)] = config
    # The internal attribute, not set_attn_implementation(): restoring must not re-run
    # availability checks (or hub kernel loading) for the implementation the model came with.
    saved = [(config, config._attn_implementation_internal) for config in configs.values()]
    try:
        for config, _ in saved:
            config._attn_implementation_internal = name
        yield
    finally:
        for config, implementation in saved:
            config._attn_implementation_internal = implementation


# -- model steps -------------------------------------------------------------------------------


def _prefill(model: nn.Module, cache: StaticKVCache, packed: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Run the left-aligned prompts ``packed`` [B, L] into the empty cache; logits [B, V] at len_b - 1."""
    batch_size, longest = packed.shape
    position_ids = torch.arange(longest, device=packed.device).unsqueeze(0).expand(batch_size, longest)
    hidden = model.base_model(
        input_ids=packed,
        position_ids=position_ids,
        attention_mask=None,
        use_cache=False,
        flashkv_cache=cache,
    ).last_hidden_state  # [B, L, hidden]
    # Only each row's last real position feeds the LM head: [B, hidden] -> [B, V], instead of
    # the [B, L, V] logits a plain forward would materialise.
    last = hidden[torch.arange(batch_size, device=packed.device), lengths.long() - 1]
    logits = model.get_output_embeddings()(last)
    cache.seqlens.copy_(lengths)
    return logits


def _decode_forward(model: nn.Module, cache: StaticKVCache, tokens: torch.Tensor) -> torch.Tensor:
    """One decode step on ``tokens`` [B, 1]: the captured body. Returns logits [B, V]."""
    position_ids = cache.seqlens.unsqueeze(1).long()  # [B, 1]: each row's own next position
    logits = model(
        input_ids=tokens,
        position_ids=position_ids,
        attention_mask=None,
        use_cache=False,
        flashkv_cache=cache,
        logits_to_keep=1,
    ).logits  # [B, 1, V]
    cache.advance(1)
    return logits[:, -1, :]


def _model_key(model: nn.Module) -> tuple:
    # A captured graph reads weights at fixed addresses: if the model was moved or reloaded the
    # addresses change and the graph must be captured again.
    return (id(model), tuple(t.data_ptr() for t in model.parameters()), tuple(t.data_ptr() for t in model.buffers()))


class _DecodeRunner:
    """The static ``[B, 1]`` input buffer and, on CUDA, the graph captured around it."""

    def __init__(self, model: nn.Module, cache: StaticKVCache, compile: bool) -> None:
        self.key = (_model_key(model), compile)
        # Graph breaks are tolerated: inside a captured graph they cost nothing at replay.
        self.forward = (torch.compile(_decode_forward, dynamic=False, options=_compile_options())
                        if compile else _decode_forward)
        self.tokens = torch.zeros(cache.batch_size, 1, dtype=torch.long, device=cache.device)  # [B, 1]
        self.graph: torch.cuda.CUDAGraph | None = None
        self.logits: torch.Tensor | None = None  # [B, V], lives in the graph's memory pool

    def step(self, model: nn.Module, cache: StaticKVCache, use_graph: bool) -> torch.Tensor:
        if not use_graph:
            return self.forward(model, cache, self.tokens)
        if self.graph is None:
            self._capture(model, cache)
        self.graph.replay()
        return self.logits

    def _capture(self, model: nn.Module, cache: StaticKVCache) -> None:
        device = cache.device
        saved_seqlens = cache.seqlens.clone()
        with torch.cuda.device(device):
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(_WARMUP_STEPS):
                    # Writes this step's K/V at slot seqlens[b], which the replay rewrites with
                    # the same values; the lengths go back so the replay starts where it should.
                    self.forward(model, cache, self.tokens)
                    cache.seqlens.copy_(saved_seqlens)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                logits = self.forward(model, cache, self.tokens)
        # Capture records kernels without running them, so seqlens is still the pre-step value.
        self.graph, self.logits = graph, logits


def _compile_options() -> dict:
    """Inductor options for the decode step: programmatic dependent launch for its Triton kernels
    where this torch has the switch (it takes effect on Hopper and newer only). Inside the captured
    graph each kernel's launch then overlaps the tail of the one before, as flashkv's own decode
    kernels do."""
    import torch._inductor.config as inductor_config

    return {"triton.enable_pdl": True} if hasattr(inductor_config.triton, "enable_pdl") else {}


def _decode_runner(model: nn.Module, cache: StaticKVCache, compile: bool) -> _DecodeRunner:
    runner = cache._decode_graph
    if runner is None or runner.key != (_model_key(model), compile) or runner.tokens.device != cache.device:
        runner = _DecodeRunner(model, cache, compile)
        cache._decode_graph = runner
    return runner


# -- token selection ---------------------------------------------------------------------------


def _select(
    logits: torch.Tensor,
    do_sample: bool,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """Next token per row from logits [B, V] -> int64 [B]."""
    if not do_sample:
        return logits.argmax(dim=-1)
    scores = logits.float() / temperature
    if top_k is not None and top_k < scores.shape[-1]:
        kth = torch.topk(scores, top_k, dim=-1).values[:, -1:]  # [B, 1]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_scores, sorted_idx = torch.sort(scores, dim=-1, descending=True)
        probs = sorted_scores.softmax(dim=-1)
        # Drop a token when the tokens ranked above it already reach top_p; the top one always stays.
        drop_sorted = (probs.cumsum(dim=-1) - probs) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, sorted_idx, drop_sorted)
        scores = scores.masked_fill(drop, float("-inf"))
    probs = scores.softmax(dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(1)
