"""Decode with flashkv: static KV cache, CUDA-graph-captured decode step, bandwidth report.

With no arguments it builds a small random-weight LLaMA (nothing is downloaded) and decodes on
the GPU if there is one, else on the CPU (a few seconds)::

    python examples/generate.py
    python examples/generate.py --config llama3-8b --batch 1 --prompt-len 128 --max-new-tokens 256
    python examples/generate.py --config tinyllama --compare          # next to transformers' generate
    python examples/generate.py --model ~/models/Llama-3.1-8B-Instruct --prompt "The capital of France is"

What it prints: the generated tokens (text when a tokenizer is available), prefill time, decode
tokens/s, and the memory traffic of decode in GB/s against the bandwidth bound. Decode reads every
weight once per step plus each sequence's filled KV cache, so

    achieved GB/s = sum over steps of (weight bytes + KV bytes read) / decode time

and the bound is that traffic at the GPU's peak bandwidth (3.0 TB/s measured on an H100;
``--bandwidth`` for other devices).
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time

import torch

import flashkv_ops
from flashkv_ops.model_shapes import MODEL_SHAPES, model_config

# Runs at least this long get a progress bar.
PROGRESS_MIN_TOKENS = 128


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--config", choices=sorted(MODEL_SHAPES), default="default",
                        help="random-weight model of this shape (default: a small LLaMA)")
    source.add_argument("--model", metavar="DIR", help="local Hugging Face checkpoint directory (with tokenizer)")
    parser.add_argument("--prompt", action="append",
                        help="prompt text (with --model); repeat for several prompts")
    parser.add_argument("--batch", type=int, default=1, help="number of sequences (default 1)")
    parser.add_argument("--prompt-len", type=int, default=32,
                        help="random prompt length in tokens, for random-weight models (default 32)")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate per sequence (default 64)")
    parser.add_argument("--dtype", choices=["auto", "float32", "float16", "bfloat16"], default="auto",
                        help="auto: bfloat16 on GPU, float32 on CPU")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--bandwidth", type=float, default=None,
                        help="peak memory bandwidth in GB/s for the %% of bound (default 3000 on CUDA, an H100)")
    parser.add_argument("--no-cuda-graph", action="store_true", help="run the decode step eagerly")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the decode step before capturing it (fuses element-wise kernels)")
    parser.add_argument("--compare", action="store_true", help="also run transformers' generate and compare")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.batch < 1 or args.prompt_len < 1 or args.max_new_tokens < 1:
        parser.error("--batch, --prompt-len and --max-new-tokens must be >= 1")
    if args.prompt and not args.model:
        parser.error("--prompt needs --model (random-weight models have no tokenizer)")
    return args


def build_random_model(name: str, dtype: torch.dtype, device: torch.device):
    from transformers import AutoModelForCausalLM

    # Drawing the weights on the target device: an 8B model is initialised in seconds on a GPU.
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(model_config(name), dtype=dtype)
    return model.eval()


def load_checkpoint(path: str, dtype: torch.dtype, device: torch.device):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True).to(device)
    return model.eval(), tokenizer


def make_prompts(args, model, tokenizer, device):
    """Prompts [B, P] and attention mask [B, P], left-padded."""
    if tokenizer is not None:
        texts = args.prompt or ["The quick brown fox"]
        texts = [texts[i % len(texts)] for i in range(max(args.batch, len(texts)))]
        tokenizer.padding_side = "left"
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        batch = tokenizer(texts, return_tensors="pt", padding=True)
        return batch.input_ids.to(device), batch.attention_mask.to(device)
    generator = torch.Generator().manual_seed(args.seed)
    # Ids from 3 up: skip the usual special tokens (0-2) so that no prompt contains an EOS.
    ids = torch.randint(3, model.config.vocab_size, (args.batch, args.prompt_len), generator=generator)
    return ids.to(device), torch.ones_like(ids, device=device)


def weight_bytes_per_step(model) -> int:
    """Bytes of weights a decode step reads: every parameter once, except the input embedding
    table, of which only one row per sequence is gathered (unless it is tied to the LM head)."""
    seen, total = set(), 0
    for param in model.parameters():
        if param.data_ptr() not in seen:
            seen.add(param.data_ptr())
            total += param.nbytes
    embedding = model.get_input_embeddings().weight
    if embedding.data_ptr() != model.get_output_embeddings().weight.data_ptr():
        total -= embedding.nbytes
    return total


def kv_bytes_per_token(cache: flashkv_ops.StaticKVCache) -> int:
    """Bytes of K and V, over all layers, for one token of one sequence."""
    return 2 * cache.num_layers * cache.num_kv_heads * cache.head_dim * cache.dtype.itemsize


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device):
    synchronize(device)
    start = time.perf_counter()
    result = fn()
    synchronize(device)
    return result, time.perf_counter() - start


def describe_tokens(output, prompt_len, tokenizer, rows=4, max_tokens=24) -> str:
    lines = []
    for b in range(min(rows, output.shape[0])):
        new = output[b, prompt_len:].tolist()
        if tokenizer is not None:
            lines.append(f"  [{b}] {tokenizer.decode(new, skip_special_tokens=True)!r}")
        else:
            more = " ..." if len(new) > max_tokens else ""
            lines.append(f"  [{b}] {new[:max_tokens]}{more}")
    if output.shape[0] > rows:
        lines.append(f"  ... {output.shape[0] - rows} more rows")
    return "\n".join(lines)


def first_difference(a: torch.Tensor, b: torch.Tensor) -> str | None:
    """Where two [B, T] token tensors first differ (compared over the shorter width)."""
    width = min(a.shape[1], b.shape[1])
    diff = (a[:, :width] != b[:, :width]).cpu()
    if not diff.any():
        return None
    rows, cols = diff.nonzero(as_tuple=True)
    first = int(cols.argmin())
    return f"row {int(rows[first])}, column {int(cols[first])}"


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.dtype == "auto":
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    else:
        dtype = getattr(torch, args.dtype)
    torch.manual_seed(args.seed)

    tokenizer = None
    if args.model:
        model, tokenizer = load_checkpoint(args.model, dtype, device)
        source = args.model
    else:
        model = build_random_model(args.config, dtype, device)
        source = f"{args.config} shape, random weights"
    input_ids, attention_mask = make_prompts(args, model, tokenizer, device)
    batch, prompt_len = input_ids.shape
    new_tokens = args.max_new_tokens
    # Random weights emit the EOS id by chance; decode the full length so timings compare.
    ignore_eos = tokenizer is None
    use_graph = device.type == "cuda" and not args.no_cuda_graph

    num_params = sum(p.numel() for p in model.parameters())
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    size = f"{num_params / 1e9:.2f} B" if num_params >= 1e9 else f"{num_params / 1e6:.1f} M"
    print(f"model: {source} | {model.config.model_type}, {size} parameters, {dtype}")
    print(f"device: {device_name} | batch {batch}, prompt {prompt_len} tokens, {new_tokens} new tokens, "
          f"decode step {'compiled, ' if args.compile else ''}{'CUDA graph' if use_graph else 'eager'}")

    cache = flashkv_ops.StaticKVCache.from_model(model, batch, prompt_len + new_tokens)
    print(f"KV cache: {cache.num_layers} layers x 2 x [{batch}, {cache.num_kv_heads}, {cache.max_seq_len}, "
          f"{cache.head_dim}] {cache.dtype} = {cache.nbytes / 2**20:.1f} MiB")

    def run(max_new_tokens, callback=None):
        return flashkv_ops.generate(model, input_ids, attention_mask, max_new_tokens=max_new_tokens,
                                    cache=cache, ignore_eos=ignore_eos, cuda_graph=use_graph, compile=args.compile,
                                    callback=callback)

    # Warm-up: Triton compilation, cuBLAS handles and the graph capture happen here, not in the timings.
    run(min(new_tokens, 4))
    _, prefill_s = timed(lambda: run(1), device)

    steps = []
    progress = None
    if new_tokens >= PROGRESS_MIN_TOKENS:
        from tqdm import tqdm

        progress = tqdm(total=new_tokens, unit="tok", desc="decode", file=sys.stderr, leave=False)

    def on_step(step, next_tokens, logits):
        steps.append(step)
        if progress is not None:
            progress.update(1)

    output, total_s = timed(lambda: run(new_tokens, on_step), device)
    if progress is not None:
        progress.close()

    print("generated:")
    print(describe_tokens(output, prompt_len, tokenizer))

    # The first new token comes out of the prefill; each further one is a decode step.
    decode_steps = len(steps) - 1
    decode_s = max(total_s - prefill_s, 1e-9)
    print(f"prefill: {prefill_s * 1e3:.1f} ms for {batch} x {prompt_len} tokens")
    if decode_steps < 1:
        print("decode: no decode steps (max_new_tokens=1)")
        return 0
    lengths = attention_mask.sum(dim=1).tolist()
    # Step s attends over len_b + s + 1 cached tokens per sequence (the new one included).
    kv_tokens_read = sum(n * decode_steps + decode_steps * (decode_steps + 1) // 2 for n in lengths)
    traffic = weight_bytes_per_step(model) * decode_steps + kv_bytes_per_token(cache) * kv_tokens_read
    achieved = traffic / decode_s / 1e9
    bandwidth = args.bandwidth or (3000.0 if device.type == "cuda" else None)
    print(f"decode: {decode_steps} steps in {decode_s:.3f} s = {decode_steps / decode_s:.1f} tok/s per sequence, "
          f"{batch * decode_steps / decode_s:.1f} tok/s total ({decode_s / decode_steps * 1e3:.2f} ms/step)")
    line = f"memory traffic: {traffic / decode_steps / 1e9:.3f} GB/step, achieved {achieved:.1f} GB/s"
    if bandwidth:
        bound_tok_s = bandwidth * 1e9 / (traffic / decode_steps)
        line += (f" = {100 * achieved / bandwidth:.0f}% of the {bandwidth:.0f} GB/s bound "
                 f"(bound {bound_tok_s:.0f} tok/s per sequence)")
    print(line)

    if args.compare:
        generation_config = copy.deepcopy(model.generation_config)
        if ignore_eos:
            generation_config.eos_token_id = None
        if generation_config.pad_token_id is None:
            generation_config.pad_token_id = 0
        generation_config.do_sample = False

        def transformers_run(max_new_tokens):
            generation_config.max_new_tokens = max_new_tokens
            return model.generate(input_ids, attention_mask=attention_mask, generation_config=generation_config)

        transformers_run(min(new_tokens, 4))
        reference, reference_s = timed(lambda: transformers_run(new_tokens), device)
        produced = reference.shape[1] - prompt_len
        print(f"transformers generate ({model.config._attn_implementation}): {produced} tokens in "
              f"{reference_s:.3f} s = {produced / reference_s:.1f} tok/s per sequence (prefill included); "
              f"flashkv {new_tokens / total_s:.1f} tok/s on the same basis, "
              f"{reference_s / total_s:.2f}x")
        where = first_difference(output, reference)
        if where is None:
            print("tokens: identical to transformers")
        else:
            # Expected now and then in 16-bit: a different reduction order flips a near-tie.
            print(f"tokens: first difference from transformers at {where}")
    return 0


if __name__ == "__main__":
    # Keep the CPU run from oversubscribing shared machines.
    if not torch.cuda.is_available() and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(min(4, torch.get_num_threads()))
    sys.exit(main())
