"""End-to-end greedy generation: flashkv's graph-captured decode vs transformers' own paths.

Models are LLaMA-family shapes with random weights in bf16 (no download), built directly on the
GPU with ``transformers.LlamaForCausalLM``. For each model and batch size, in one run:

- ``flashkv``: ``flashkv_ops.generate(model, input_ids, attention_mask, max_new_tokens=N,
  ignore_eos=True)``; ``flashkv+compile`` (opt-in through ``--providers``) adds
  ``compile=True``, which also runs the captured decode step through ``torch.compile``.
- ``hf_eager``: ``model.generate(..., do_sample=False, min_new_tokens=N, max_new_tokens=N)``
  with the default dynamic cache and SDPA attention, nothing compiled.
- ``hf_static``: the same with ``cache_implementation="static"``, for which ``generate``
  compiles the decode step itself (``mode="reduce-overhead"``). A crash is recorded in the row.

Each provider gets one untimed warm-up call of the same shape (compilation, graph capture,
allocation), then one timed call. A separate ``max_new_tokens=1`` call (warmed up too) times
the prefill, so the decode rate is reported on its own. Figures: tokens/s over the whole call
(``B * N / time``), decode tokens/s (``B * (N - 1) / (time - prefill)``), and the bandwidth
the decode achieves: bytes per step (weights read once — every parameter except the input
embedding table, of which only B rows are gathered — plus the K/V held at the mean context
length) over the time per step, against the 3.0 TB/s the H100 reaches.

Defaults: TinyLlama-1.1B and Llama-3.1-8B shapes, batch 1 and 16, prompt 128, 256 new tokens,
about 8 minutes on an H100; ``--budget-s`` skips what would start after that much time
(re-run with ``--models``/``--batches`` for the rest: rows merge into ``<out>/e2e.json``).
"""

from __future__ import annotations

import argparse
import inspect
import json
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

if __package__ in (None, ""):
    # Run as a script: make `benchmarks` importable from the repository root.
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from benchmarks import common
from flashkv_ops.model_shapes import MODEL_SHAPES, config_kwargs

# LlamaConfig arguments (plus a label) of the published checkpoints' shapes; weights are random.
MODEL_SPECS: dict[str, dict[str, Any]] = {
    name: {"label": MODEL_SHAPES[name]["label"], **config_kwargs(name)} for name in ("tinyllama", "llama3-8b")
}
# "flashkv+compile" (decode step also through torch.compile) is opt-in: --providers.
PROVIDERS = ("flashkv", "flashkv+compile", "hf_eager", "hf_static")
DEFAULT_PROVIDERS = ("flashkv", "hf_eager", "hf_static")
# Where the model lives; the CPU smoke test sets "cpu" to run the code paths on a tiny model.
DEVICE = "cuda"
KEY_FIELDS = ("model", "batch", "prompt_len", "new_tokens", "dtype", "provider", "compile_config")


# --------------------------------------------------------------------------------------------
# pure helpers (tested on CPU)
# --------------------------------------------------------------------------------------------


def parameter_count(spec: dict[str, Any]) -> dict[str, int]:
    """Parameters of a LLaMA model with this spec: ``total`` and ``embedding`` (input table).

    Per layer: q and o projections ``H*H``, k and v ``H*(H_kv*D)``, gate/up/down ``3*H*I``,
    two RMSNorm weights; plus the embedding ``V*H``, the final norm and, when not tied, the
    ``V*H`` output head.
    """
    hidden = spec["hidden_size"]
    head_dim = spec.get("head_dim") or hidden // spec["num_attention_heads"]
    kv_width = spec["num_key_value_heads"] * head_dim
    q_width = spec["num_attention_heads"] * head_dim
    per_layer = (
        hidden * q_width * 2  # q_proj, o_proj
        + hidden * kv_width * 2  # k_proj, v_proj
        + 3 * hidden * spec["intermediate_size"]  # gate, up, down
        + 2 * hidden  # input and post-attention RMSNorm
    )
    embedding = spec["vocab_size"] * hidden
    head = 0 if spec.get("tie_word_embeddings") else spec["vocab_size"] * hidden
    total = embedding + spec["num_hidden_layers"] * per_layer + hidden + head
    return {"total": total, "embedding": embedding}


def decode_step_bytes(
    spec: dict[str, Any], batch: int, context_len: float, elem_bytes: int = 2
) -> dict[str, float]:
    """Bytes one decode step must read: weights once, plus every sequence's K/V.

    The input embedding table is not counted (a step gathers only ``batch`` rows of it) unless
    it is tied to the output head, which reads it whole.

    Parameters
    ----------
    spec : dict
        A ``MODEL_SPECS`` entry.
    batch : int
    context_len : float
        Tokens each sequence holds in its cache at this step (the mean over a run).
    elem_bytes : int
        Bytes per weight and cache element (2 for bf16).

    Returns
    -------
    dict
        ``weights``, ``kv`` and ``total`` bytes.
    """
    counts = parameter_count(spec)
    read_params = counts["total"] - (0 if spec.get("tie_word_embeddings") else counts["embedding"])
    head_dim = spec.get("head_dim") or spec["hidden_size"] // spec["num_attention_heads"]
    kv = (2 * spec["num_hidden_layers"] * batch * spec["num_key_value_heads"] * head_dim
          * elem_bytes * context_len)
    weights = read_params * elem_bytes
    return {"weights": float(weights), "kv": float(kv), "total": float(weights + kv)}


def throughput_figures(
    spec: dict[str, Any],
    batch: int,
    prompt_len: int,
    new_tokens: int,
    total_s: float,
    prefill_s: float | None,
    elem_bytes: int = 2,
) -> dict[str, Any]:
    """Tokens/s, decode tokens/s, achieved GB/s and % of the 3.0 TB/s bound for one run.

    The first new token comes out of the prefill; the other ``new_tokens - 1`` are decode
    steps. Without a prefill time (``None``, or not less than ``total_s``) the decode figures
    use the whole call (``new_tokens`` steps in ``total_s``), which understates them slightly.
    """
    figures: dict[str, Any] = {"total_s": total_s, "tok_s": batch * new_tokens / total_s,
                               "prefill_s": prefill_s}
    if prefill_s is not None and 0 < prefill_s < total_s and new_tokens > 1:
        steps, decode_s = new_tokens - 1, total_s - prefill_s
        figures["decode_timing"] = "total - prefill"
    else:
        steps, decode_s = new_tokens, total_s
        figures["decode_timing"] = "whole call"
    mean_context = prompt_len + new_tokens / 2
    step = decode_step_bytes(spec, batch, mean_context, elem_bytes)
    bytes_per_s = steps * step["total"] / decode_s
    figures.update({
        "decode_tok_s": batch * steps / decode_s,
        "ms_per_step": 1e3 * decode_s / steps,
        "weight_bytes": step["weights"],
        "kv_bytes_per_step": step["kv"],
        "gbps": bytes_per_s / 1e9,
        "pct_bw": 100.0 * bytes_per_s / common.H100_BANDWIDTH_BYTES_PER_S,
        "bound_tok_s": batch * common.H100_BANDWIDTH_BYTES_PER_S / step["total"],
    })
    return figures


def common_prefix(a: torch.Tensor, b: torch.Tensor) -> int:
    """Fewest leading tokens two ``[B, T]`` id tensors agree on, over the batch rows."""
    if a.shape != b.shape:
        return 0
    differs = (a != b).to(torch.int64)
    if not bool(differs.any()):
        return a.shape[1]
    # First differing position of each row (T where a row agrees everywhere).
    width = a.shape[1]
    first = torch.where(differs.any(dim=1), differs.argmax(dim=1),
                        torch.full_like(differs[:, 0], width))
    return int(first.min())


def e2e_sort_key(row: dict[str, Any]) -> tuple:
    """Order rows: model (as in MODEL_SPECS), batch, prompt/new lengths, provider."""
    models = list(MODEL_SPECS)
    providers = PROVIDERS + ("setup",)
    return (
        models.index(row["model"]) if row.get("model") in models else len(models),
        row.get("batch") or 0,
        row.get("prompt_len") or 0,
        row.get("new_tokens") or 0,
        providers.index(row["provider"]) if row.get("provider") in providers else len(providers),
    )


def e2e_table(rows: Sequence[dict[str, Any]]) -> str:
    """Markdown table: tokens/s, decode tokens/s, GB/s, % of bound, ratio to hf_static."""
    static = {}
    for row in rows:
        default_static = row["provider"] == "hf_static" and not row.get("compile_config")
        if default_static and not row.get("error"):
            static[(row["model"], row["batch"], row["prompt_len"], row["new_tokens"],
                    row["dtype"])] = row

    body = []
    for row in sorted(rows, key=e2e_sort_key):
        peer = static.get((row["model"], row["batch"], row["prompt_len"], row["new_tokens"],
                           row["dtype"]))
        vs_static = "-"
        if peer is not None and not row.get("error") and row.get("decode_tok_s"):
            vs_static = f"{row['decode_tok_s'] / peer['decode_tok_s']:.2f}×"
        notes = []
        if row.get("error"):
            notes.append("error: " + str(row["error"])[:100])
        else:
            if row.get("matches_eager") is not None and row["matches_eager"] < row["new_tokens"]:
                notes.append(f"same greedy tokens as hf_eager for {row['matches_eager']} steps")
            if row.get("decode_timing") == "whole call":
                notes.append("decode figures include prefill")
            if row.get("note"):
                notes.append(row["note"])
        if row.get("compile_config"):
            notes.append(f"CompileConfig({row['compile_config']})")
        prefill = row.get("prefill_s")
        body.append([
            row.get("model_label", row["model"]),
            row["batch"],
            f"{row['prompt_len']}+{row['new_tokens']}",
            row["provider"],
            common.fmt(None if prefill is None else prefill * 1e3, 1),
            common.fmt(row.get("tok_s"), 0),
            common.fmt(row.get("decode_tok_s"), 0),
            common.fmt(row.get("gbps"), 0),
            common.fmt(row.get("pct_bw"), 1),
            common.fmt(row.get("bound_tok_s"), 0),
            vs_static,
            "; ".join(notes),
        ])
    headers = ["model", "batch", "prompt+new", "provider", "prefill ms", "tok/s",
               "decode tok/s", "GB/s", f"% of {common.BANDWIDTH_LABEL}", "bound tok/s",
               "vs hf_static", "notes"]
    return common.markdown_table(headers, body)


# --------------------------------------------------------------------------------------------
# models and providers
# --------------------------------------------------------------------------------------------


def build_model(name: str, dtype: torch.dtype = torch.bfloat16):
    """A random-weight ``LlamaForCausalLM`` of the named shape, created on the GPU in ``dtype``.

    Parameters are allocated and initialised on the device (no CPU copy, no download); the
    rotary inverse frequencies stay float32 as transformers computes them.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    spec = {key: value for key, value in MODEL_SPECS[name].items() if key != "label"}
    config = LlamaConfig(**spec)
    config.dtype = dtype
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(DEVICE):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    model.eval()
    model.generation_config.pad_token_id = 0
    return model


def reset_compiled_state() -> None:
    """Drop compiled graphs and their CUDA-graph memory pools between providers and models."""
    try:
        torch._dynamo.reset()
    except Exception:  # noqa: BLE001 - best effort: nothing compiled, or an older torch
        pass
    common.free_cuda_memory()


def _timed_call(fn: Callable[[], torch.Tensor]) -> tuple[float, torch.Tensor]:
    common.sync()
    start = time.perf_counter()
    out = fn()
    common.sync()
    return time.perf_counter() - start, out


def generate_fn(provider: str, model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                new_tokens: int, compile_config: dict[str, Any] | None = None
                ) -> Callable[[], torch.Tensor]:
    """A zero-argument call that generates ``new_tokens`` greedy tokens with ``provider``.

    ``compile_config`` (``hf_static`` only): ``transformers.CompileConfig`` arguments replacing
    generate's default automatic compilation settings.
    """
    if provider in ("flashkv", "flashkv+compile"):
        import flashkv_ops

        options: dict[str, Any] = {}
        accepted = inspect.signature(flashkv_ops.generate).parameters
        # Every row must decode all new_tokens (random weights emit EOS at random) so the
        # providers do the same work.
        if "ignore_eos" in accepted:
            options["ignore_eos"] = True
        if provider == "flashkv+compile":
            options["compile"] = True

        def call():
            with torch.no_grad():
                return flashkv_ops.generate(model, input_ids, attention_mask=attention_mask,
                                            max_new_tokens=new_tokens, **options)
        return call
    kwargs = {"attention_mask": attention_mask, "do_sample": False,
              "min_new_tokens": new_tokens, "max_new_tokens": new_tokens, "pad_token_id": 0}
    if provider == "hf_static":
        kwargs["cache_implementation"] = "static"
        if compile_config:
            from transformers import CompileConfig

            kwargs["compile_config"] = CompileConfig(**compile_config)
    elif provider != "hf_eager":
        raise ValueError(f"unknown provider {provider!r}")

    def call():
        with torch.inference_mode():
            return model.generate(input_ids, **kwargs)
    return call


def measure_provider(
    provider: str,
    model,
    spec: dict[str, Any],
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    args: argparse.Namespace,
) -> tuple[dict[str, Any], torch.Tensor]:
    """Warm up, time the full generation, time a prefill-only call; figures and the output."""
    batch, prompt_len = input_ids.shape
    n = args.new_tokens
    compile_config = args.hf_compile_config
    full = generate_fn(provider, model, input_ids, attention_mask, n, compile_config)
    # The eager path has nothing to compile: a short warm-up is enough and saves a minute.
    warm = generate_fn(provider, model, input_ids, attention_mask, min(n, 16)) \
        if provider == "hf_eager" else full
    warmup_s, _ = _timed_call(warm)
    total_s, out = _timed_call(full)
    if out.shape != (batch, prompt_len + n):
        raise RuntimeError(f"{provider} returned shape {tuple(out.shape)}, expected "
                           f"{(batch, prompt_len + n)}")
    prefill_s = None
    prefill_error = None
    if not args.no_prefill:
        try:
            one = generate_fn(provider, model, input_ids, attention_mask, 1, compile_config)
            _timed_call(one)
            prefill_s, _ = _timed_call(one)
        except Exception as exc:  # noqa: BLE001 - decode figures then cover the whole call
            prefill_error = common.short_error(exc, 200)
    figures = throughput_figures(spec, batch, prompt_len, n, total_s, prefill_s)
    figures["warmup_s"] = warmup_s
    if prefill_error:
        figures["note"] = f"prefill-only call failed: {prefill_error}"
    return figures, out[:, prompt_len:].cpu()


def run_model(name: str, args: argparse.Namespace, sink: common.RowSink, deadline: float) -> None:
    spec = MODEL_SPECS[name]
    counts = parameter_count(spec)
    common.log(f"=== {spec['label']} shape: {counts['total'] / 1e9:.2f} B parameters, building")
    start = time.perf_counter()
    model = build_model(name)
    common.log(f"    built in {time.perf_counter() - start:.1f} s")
    try:
        for batch in args.batches:
            generator = torch.Generator().manual_seed(args.seed)
            input_ids = torch.randint(3, spec["vocab_size"], (batch, args.prompt_len),
                                      generator=generator).to(DEVICE)
            attention_mask = torch.ones_like(input_ids)
            config = {
                "bench": "e2e", "model": name, "model_label": spec["label"], "batch": batch,
                "prompt_len": args.prompt_len, "new_tokens": args.new_tokens, "dtype": "bf16",
                "params": counts["total"],
            }
            common.log(f"--- {spec['label']} batch {batch}, prompt {args.prompt_len}, "
                       f"{args.new_tokens} new tokens")
            outputs: dict[str, torch.Tensor] = {}
            rows: dict[str, dict[str, Any]] = {}
            for provider in args.providers:
                if time.perf_counter() > deadline:
                    common.log(f"  {provider:10s} skipped: --budget-s reached (not recorded); "
                               f"run again with --models {name} --batches {batch}")
                    continue

                def body(provider=provider) -> dict[str, Any]:
                    figures, generated = measure_provider(provider, model, spec, input_ids,
                                                          attention_mask, args)
                    outputs[provider] = generated
                    return figures

                fields = dict(config)
                if provider == "hf_static" and args.hf_compile_config:
                    # Part of the row's key: a tuned run does not replace the default one.
                    fields["compile_config"] = args.hf_compile_config
                row = common.run_provider(fields, provider, body)
                reset_compiled_state()
                rows[provider] = row
                sink.add(row)
                if row["error"]:
                    common.log(f"  {provider:10s} ERROR {row['error'][:300]}")
                else:
                    common.log(f"  {provider:10s} {row['tok_s']:8.1f} tok/s, decode "
                               f"{row['decode_tok_s']:8.1f} tok/s, {row['gbps']:6.0f} GB/s "
                               f"({row['pct_bw']:.0f}%), warm-up {row['warmup_s']:.1f} s")
            # Greedy decoding should agree with transformers' eager path (random weights in
            # bf16 can tie, so a late divergence is possible; an early one is a bug).
            reference = outputs.get("hf_eager")
            if reference is not None:
                for provider, row in rows.items():
                    if provider != "hf_eager" and provider in outputs:
                        row["matches_eager"] = common_prefix(outputs[provider], reference)
                        sink.add(row)
    finally:
        del model
        reset_compiled_state()


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=common.DEFAULT_OUT,
                        help="directory for e2e.json and e2e.png (default %(default)s)")
    parser.add_argument("--models", default="tinyllama,llama3-8b",
                        help="comma-separated subset of " + ",".join(MODEL_SPECS))
    parser.add_argument("--batches", default="1,16", help="comma-separated batch sizes")
    parser.add_argument("--providers", default=",".join(DEFAULT_PROVIDERS),
                        help="comma-separated subset of " + ",".join(PROVIDERS)
                        + " (default %(default)s)")
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--no-prefill", action="store_true",
                        help="skip the max_new_tokens=1 call that times the prefill")
    parser.add_argument("--hf-compile-config", default=None, metavar="JSON",
                        help='CompileConfig arguments for hf_static, e.g. \'{"fullgraph": true}\' '
                             "(default: generate's automatic settings)")
    parser.add_argument("--budget-s", type=float, default=450.0,
                        help="start no provider after this many seconds (default %(default)s)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--fresh", action="store_true",
                        help="overwrite e2e.json instead of merging with stored rows")
    parser.add_argument("--no-plot", action="store_true")
    args = parser.parse_args(argv)
    args.models = common.choice_list(parser, "--models", args.models, MODEL_SPECS)
    args.providers = common.choice_list(parser, "--providers", args.providers, PROVIDERS)
    try:
        args.batches = [int(b) for b in args.batches.split(",") if b.strip()]
    except ValueError:
        parser.error(f"--batches must be comma-separated integers, got {args.batches!r}")
    if not args.batches or min(args.batches) < 1:
        parser.error("--batches needs at least one batch size >= 1")
    if args.hf_compile_config is not None:
        try:
            args.hf_compile_config = json.loads(args.hf_compile_config)
        except json.JSONDecodeError as exc:
            parser.error(f"--hf-compile-config must be a JSON object: {exc}")
        if not isinstance(args.hf_compile_config, dict):
            parser.error("--hf-compile-config must be a JSON object, e.g. '{\"fullgraph\": true}'")
    if args.prompt_len < 1 or args.new_tokens < 2:
        parser.error("--prompt-len must be >= 1 and --new-tokens >= 2")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    common.require_cuda("bench_e2e.py")
    common.line_buffered_stdout()
    common.log("env:", common.env_tags())
    deadline = time.perf_counter() + args.budget_s
    sink = common.RowSink(args.out / "e2e.json", KEY_FIELDS, fresh=args.fresh)
    for name in args.models:
        if time.perf_counter() > deadline:
            common.log(f"=== {name} skipped: --budget-s reached; run again with --models {name}")
            continue
        try:
            run_model(name, args, sink, deadline)
        except Exception as exc:  # noqa: BLE001 - e.g. out of memory building the model
            sink.add(common.make_row({"bench": "e2e", "model": name, "batch": None,
                                      "prompt_len": args.prompt_len,
                                      "new_tokens": args.new_tokens, "dtype": "bf16"},
                                     "setup", error=common.short_error(exc)))
            common.log(f"  setup failed: {common.short_error(exc, 300)}")
            reset_compiled_state()

    return common.finish(sink, e2e_table(_latest(sink.new_rows, sink)), "plot_e2e", args.out / "e2e.png", args.no_plot)


def _latest(new_rows: Sequence[dict[str, Any]], sink: common.RowSink) -> list[dict[str, Any]]:
    # A row re-added with its agreement count appears twice in new_rows; keep the last one.
    latest: dict[tuple, dict[str, Any]] = {}
    for row in new_rows:
        latest[sink.key(row)] = row
    return list(latest.values())


if __name__ == "__main__":
    raise SystemExit(main())
