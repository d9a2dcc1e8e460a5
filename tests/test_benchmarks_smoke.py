"""CPU smoke tests of the benchmark scripts: their pure helpers, tables, plots, JSON rows.

No GPU timing happens here. The run_case tests swap the clocks for constants and put the
tensors on the CPU, so the set-up code of every provider runs (flashkv through its CPU path,
SDPA's cuDNN backend failing as it must on a CPU, recorded in its row).
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from benchmarks import bench_decode, bench_e2e, bench_prefill, common, plot, report  # noqa: E402

ENV = {"gpu": "NVIDIA H100 80GB HBM3", "torch": "2.11.0", "triton": "3.6.0",
       "transformers": "5.17.0", "cuda": "13.0", "timestamp": "2025-01-01T00:00:00Z",
       "error": None}


# --------------------------------------------------------------------------------------------
# decode helpers
# --------------------------------------------------------------------------------------------


def test_decode_bytes_match_issue_figures():
    # Issue 3: B=16 H=8 S=2048 D=64 fp16 holds 67 MB of K/V; B=32 Hkv=8 S=4096 D=128, 537 MB.
    small = bench_decode.decode_bytes(16 * 2048, 16, 8, 8, 64, 2)
    assert small == 2 * 16 * 2048 * 8 * 64 * 2 + 2 * 16 * 8 * 64 * 2
    assert round(small / 1e6) == 67
    big = bench_decode.decode_bytes(32 * 4096, 32, 32, 8, 128, 2)
    assert round((big - 2 * 32 * 32 * 128 * 2) / 1e6) == 537
    appended = bench_decode.decode_bytes(32 * 4096, 32, 32, 8, 128, 2, append=True)
    assert appended - big == 2 * 2 * 32 * 8 * 128 * 2


def test_bandwidth_figures_at_the_ceiling():
    nbytes = 3_000_000  # 3 MB in 1 µs is 3.0 TB/s
    figures = bench_decode.bandwidth_figures(1.0, nbytes)
    assert math.isclose(figures["gbps"], 3000.0)
    assert math.isclose(figures["pct_bw"], 100.0)


def test_make_lengths_fixed_and_seeded_varlen():
    fixed = bench_decode.make_lengths(bench_decode.DecodeCase(4, 8, 8, 128, 64))
    assert fixed.dtype == torch.int32 and fixed.tolist() == [128] * 4
    case = bench_decode.DecodeCase(*bench_decode.VARLEN_CONFIG, layout="varlen")
    first = bench_decode.make_lengths(case, seed=3)
    again = bench_decode.make_lengths(case, seed=3)
    assert torch.equal(first, again)
    assert int(first.min()) >= 1 and int(first.max()) <= case.max_seqlen
    assert not torch.equal(first, bench_decode.make_lengths(case, seed=4))


def test_rotating_calls_take_turns():
    calls = [lambda index=index: index for index in range(3)]
    call = common.rotating(calls)
    assert [call() for _ in range(7)] == [0, 1, 2, 0, 1, 2, 0]
    with pytest.raises(ValueError, match="calls"):
        common.rotating([])


def test_decode_cache_copies_argument():
    assert bench_decode.parse_args([]).cache_copies == 3
    assert bench_decode.parse_args(["--cache-copies", "1"]).cache_copies == 1
    with pytest.raises(SystemExit):
        bench_decode.parse_args(["--cache-copies", "0"])


def test_default_cases_cover_issue_three():
    cases = bench_decode.default_cases()
    layouts = [case.layout for case in cases]
    assert layouts.count("contiguous") == 9 and layouts.count("varlen") == 1
    assert layouts.count("paged") == 9
    assert all(case.page_size == 16 for case in cases if case.layout == "paged")
    shapes = {(c.batch, c.num_q_heads, c.num_kv_heads, c.max_seqlen, c.head_dim) for c in cases}
    assert {(16, 8, 8, 2048, 64), (1, 32, 8, 32768, 128), (32, 32, 8, 4096, 128), (8, 32, 4, 8192, 64),
            (64, 32, 8, 2048, 128)} <= shapes
    # grids just past one wave, at 1.7 waves and just past two of (sequence, KV head) programs on 132 SMs
    assert {(17, 32, 8, 2048, 128), (17, 32, 8, 2048, 64), (28, 32, 8, 2048, 64), (36, 32, 8, 2048, 64)} <= shapes


@settings(deadline=None, max_examples=20)
@given(
    batch=st.integers(1, 3),
    heads=st.integers(1, 2),
    max_seqlen=st.integers(1, 40),
    page_size=st.sampled_from([1, 3, 8, 16]),
    seed=st.integers(0, 100),
)
def test_to_paged_puts_each_position_where_the_block_table_says(batch, heads, max_seqlen,
                                                                 page_size, seed):
    torch.manual_seed(seed)
    cache = torch.randn(batch, heads, max_seqlen, 8)
    pages_per_seq = math.ceil(max_seqlen / page_size)
    table = bench_decode.random_block_table(batch, pages_per_seq, seed=seed)
    assert sorted(table.flatten().tolist()) == list(range(batch * pages_per_seq))
    pool = bench_decode.to_paged(cache, table, page_size)
    assert pool.shape == (batch * pages_per_seq, heads, page_size, 8)
    for b in range(batch):
        for p in range(max_seqlen):
            page, slot = int(table[b, p // page_size]), p % page_size
            assert torch.equal(pool[page, :, slot], cache[b, :, p])


def test_reference_decode_matches_masked_sdpa():
    torch.manual_seed(0)
    batch, num_q_heads, num_kv_heads, max_seqlen, head_dim = 3, 6, 2, 20, 8
    q = torch.randn(batch, num_q_heads, 1, head_dim, dtype=torch.float64)
    k = torch.randn(batch, num_kv_heads, max_seqlen, head_dim, dtype=torch.float64)
    v = torch.randn(batch, num_kv_heads, max_seqlen, head_dim, dtype=torch.float64)
    lengths = torch.tensor([1, 20, 7], dtype=torch.int32)
    group = num_q_heads // num_kv_heads
    mask = (torch.arange(max_seqlen)[None, :] < lengths[:, None])[:, None, None, :]
    expected = torch.nn.functional.scaled_dot_product_attention(
        q, k.repeat_interleave(group, 1), v.repeat_interleave(group, 1), attn_mask=mask)
    got = bench_decode.reference_decode(q, k, v, lengths)
    assert got.dtype == torch.float32
    assert torch.allclose(got.double(), expected, atol=1e-5)


# --------------------------------------------------------------------------------------------
# prefill helpers
# --------------------------------------------------------------------------------------------


def test_attention_flops_convention():
    full = bench_prefill.attention_flops(1, 32, 4096, 4096, 128, causal=False)
    assert full == 4 * 32 * 4096 * 4096 * 128
    assert bench_prefill.attention_flops(1, 32, 4096, 4096, 128, causal=True) == full / 2
    # 538 TFLOP/s (cuDNN, issue 4) on this shape is about 255 µs.
    us = full / 2 / 538e12 * 1e6
    assert math.isclose(bench_prefill.tflops(full / 2, us), 538.0)
    with pytest.raises(ValueError, match="seqlen_k >= seqlen_q"):
        bench_prefill.attention_flops(1, 1, 8, 4, 8, causal=True)


@settings(deadline=None, max_examples=30)
@given(seqlen_q=st.integers(1, 64), extra=st.integers(0, 64))
def test_causal_flops_count_the_mask_up_to_half_a_diagonal(seqlen_q, extra):
    seqlen_k = seqlen_q + extra
    mask = bench_prefill.bottom_right_causal_mask(seqlen_q, seqlen_k)
    pairs = bench_prefill.attention_flops(1, 1, seqlen_q, seqlen_k, 1, causal=True) / 4
    # The convention counts the diagonal square as exactly half: S_q / 2 pairs short.
    assert math.isclose(int(mask.sum()) - pairs, seqlen_q / 2)
    # Bottom-right alignment: the last query row sees every key.
    assert bool(mask[-1].all()) and int(mask[0].sum()) == extra + 1


def test_quick_set_holds_the_issue_four_targets():
    quick = bench_prefill.quick_cases()
    assert bench_prefill.PrefillCase(1, 32, 8, 4096, 128, "bf16") in quick
    assert bench_prefill.PrefillCase(4, 32, 4, 2048, 64, "bf16") in quick
    full = bench_prefill.full_cases()
    assert len(full) == len(set(full))
    assert {c.seqlen_q for c in full} >= set(bench_prefill.SWEEP_SEQLENS)
    assert {c.head_dim for c in full} == {64, 128, 256}
    chunked = bench_prefill.chunked_cases(["bf16"])[0]
    assert (chunked.seqlen_q, chunked.keys) == (512, 4096)


def test_prefill_filters():
    args = bench_prefill.parse_args(["--full", "--head-dims", "128", "--dtypes", "fp16",
                                     "--gqa", "32:4"])
    cases = bench_prefill.select_cases(args)
    assert cases and all(c.head_dim == 128 and c.dtype == "fp16" for c in cases)
    assert all((c.num_q_heads, c.num_kv_heads) == (32, 4) for c in cases if c.kind == "full")
    with pytest.raises(SystemExit):
        bench_prefill.parse_args(["--providers", "nope"])


# --------------------------------------------------------------------------------------------
# end-to-end helpers
# --------------------------------------------------------------------------------------------


def test_parameter_counts_of_the_published_shapes():
    tiny = bench_e2e.parameter_count(bench_e2e.MODEL_SPECS["tinyllama"])
    llama = bench_e2e.parameter_count(bench_e2e.MODEL_SPECS["llama3-8b"])
    assert tiny["total"] == 1_100_048_384
    assert llama["total"] == 8_030_261_248


def test_parameter_count_agrees_with_transformers():
    pytest.importorskip("transformers")
    from transformers import LlamaConfig, LlamaForCausalLM

    spec = {"vocab_size": 97, "hidden_size": 64, "intermediate_size": 96,
            "num_hidden_layers": 3, "num_attention_heads": 8, "num_key_value_heads": 2,
            "tie_word_embeddings": False}
    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(**spec))
    assert bench_e2e.parameter_count(spec)["total"] == sum(p.numel() for p in model.parameters())


def test_throughput_figures_and_bound():
    spec = bench_e2e.MODEL_SPECS["llama3-8b"]
    figures = bench_e2e.throughput_figures(spec, batch=1, prompt_len=128, new_tokens=256,
                                           total_s=2.0, prefill_s=0.02)
    assert math.isclose(figures["tok_s"], 128.0)
    assert math.isclose(figures["decode_tok_s"], 255 / 1.98)
    assert figures["decode_timing"] == "total - prefill"
    # Weights read per step: everything but the 1.05 GB input embedding table.
    assert 14.9e9 < figures["weight_bytes"] < 15.1e9
    assert 190 < figures["bound_tok_s"] < 205
    expected_gbps = 255 * (figures["weight_bytes"] + figures["kv_bytes_per_step"]) / 1.98 / 1e9
    assert math.isclose(figures["gbps"], expected_gbps)
    no_prefill = bench_e2e.throughput_figures(spec, 1, 128, 256, 2.0, None)
    assert no_prefill["decode_timing"] == "whole call"
    assert math.isclose(no_prefill["decode_tok_s"], 128.0)


def test_decode_step_kv_bytes():
    spec = bench_e2e.MODEL_SPECS["tinyllama"]
    step = bench_e2e.decode_step_bytes(spec, batch=16, context_len=256)
    assert step["kv"] == 2 * 22 * 16 * 4 * 64 * 2 * 256
    assert step["total"] == step["kv"] + step["weights"]


def test_common_prefix():
    a = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8]])
    assert bench_e2e.common_prefix(a, a.clone()) == 4
    b = a.clone()
    b[1, 2] = 0
    assert bench_e2e.common_prefix(a, b) == 2
    b[0, 0] = 9
    assert bench_e2e.common_prefix(a, b) == 0
    assert bench_e2e.common_prefix(a, a[:, :3]) == 0


# --------------------------------------------------------------------------------------------
# rows, tables, plots, report
# --------------------------------------------------------------------------------------------


def _decode_rows():
    base = {"bench": "decode", "config": "B16 H8/8 S2048 D64", "batch": 16, "num_q_heads": 8,
            "num_kv_heads": 8, "max_seqlen": 2048, "head_dim": 64, "dtype": "fp16",
            "layout": "contiguous", "page_size": None, "mean_len": 2048.0, **ENV}
    rows = []
    for provider, us in [("flashkv", 25.0), ("sdpa_cudnn", 27.1), ("sdpa_flash", 31.8),
                         ("hf_static_mask", 40.0)]:
        rows.append({**base, "provider": provider, "us": us, "bytes": 67_141_632,
                     **bench_decode.bandwidth_figures(us, 67_141_632), "max_abs_diff": 1e-4,
                     "timing": "cuda_graph", "gqa": "none"})
    rows.append({**base, "layout": "paged", "page_size": 16, "provider": "flashkv", "us": 26.0,
                 "bytes": 67_141_632, **bench_decode.bandwidth_figures(26.0, 67_141_632),
                 "timing": "cuda_graph"})
    rows.append({**base, "provider": "flashkv+append", "error": "RuntimeError: boom | bad"})
    return rows


def _prefill_rows():
    rows = []
    for seqlen in (1024, 4096):
        base = {"bench": "prefill", "kind": "full", "batch": 1, "num_q_heads": 32,
                "num_kv_heads": 8, "seqlen_q": seqlen, "seqlen_k": seqlen, "head_dim": 128,
                "dtype": "bf16", "causal": True, **ENV,
                "config": f"B1 H32/8 S{seqlen} D128"}
        flops = bench_prefill.attention_flops(1, 32, seqlen, seqlen, 128, True)
        for provider, rate in [("flashkv", 500.0), ("sdpa_cudnn", 538.0), ("sdpa_flash", 284.0)]:
            us = flops / (rate * 1e12) * 1e6
            rows.append({**base, "provider": provider, "us": us, "tflops": rate,
                         "first_call_ms": 1500.0, "timing": "do_bench"})
    return rows


def _e2e_rows():
    rows = []
    spec = bench_e2e.MODEL_SPECS["tinyllama"]
    for batch in (1, 16):
        base = {"bench": "e2e", "model": "tinyllama", "model_label": "TinyLlama-1.1B",
                "batch": batch, "prompt_len": 128, "new_tokens": 256, "dtype": "bf16", **ENV}
        for provider, seconds in [("flashkv", 0.5), ("hf_eager", 5.0), ("hf_static", 3.0)]:
            figures = bench_e2e.throughput_figures(spec, batch, 128, 256, seconds, 0.02)
            rows.append({**base, "provider": provider, **figures, "matches_eager": 256})
    rows.append({**rows[0], "provider": "hf_static", "batch": 4, "error": "torch._dynamo boom"})
    return rows


def _table_lines_consistent(table: str) -> list[str]:
    lines = table.splitlines()
    widths = {len(line) for line in lines}
    assert len(widths) == 1, "columns are padded to equal width"
    counts = {line.replace("\\|", "").count("|") for line in lines}
    assert len(counts) == 1, "every line has the same number of cells"
    return lines


def test_decode_table_speedups_and_notes():
    table = bench_decode.decode_table(_decode_rows())
    lines = _table_lines_consistent(table)
    flashkv = next(line for line in lines if "| flashkv " in line and "contiguous" in line)
    assert f"{27.1 / 25.0:.2f}×" in flashkv
    paged = next(line for line in lines if "paged 16" in line)
    assert f"{25.0 / 26.0:.2f}× its contiguous speed" in paged
    assert f"{27.1 / 26.0:.2f}×" in paged  # against cuDNN on the contiguous cache
    assert "error: RuntimeError: boom" in table


def test_prefill_and_e2e_tables():
    lines = _table_lines_consistent(bench_prefill.prefill_table(_prefill_rows()))
    flashkv = next(line for line in lines if "| flashkv " in line and "S4096" in line)
    assert f"{500 / 538:.2f}×" in flashkv and f"{500 / 284:.2f}×" in flashkv
    assert "1.50" in flashkv  # first call in seconds
    table = bench_e2e.e2e_table(_e2e_rows())
    lines = _table_lines_consistent(table)
    assert any("| flashkv " in line and f"{2.98 / 0.48:.2f}×" in line for line in lines)
    assert "torch._dynamo boom" in table


def test_markdown_table_rejects_ragged_rows():
    with pytest.raises(ValueError, match="cells"):
        common.markdown_table(["a", "b"], [[1]])


def test_row_sink_merges_replaces_and_writes_valid_json(tmp_path):
    path = tmp_path / "rows.json"
    sink = common.RowSink(path, ("config", "provider"))
    sink.add(common.make_row({"config": "a"}, "p1", us=1.0))
    sink.add(common.make_row({"config": "a"}, "p2", us=float("nan")))
    stored = json.loads(path.read_text())
    assert [row["provider"] for row in stored] == ["p1", "p2"]
    assert stored[1]["us"] is None  # NaN is not JSON
    assert stored[0]["error"] is None and "torch" in stored[0] and "timestamp" in stored[0]
    later = common.RowSink(path, ("config", "provider"))
    later.add(common.make_row({"config": "a"}, "p1", us=2.0))
    stored = common.load_rows(path)
    assert len(stored) == 2 and {row["us"] for row in stored if row["provider"] == "p1"} == {2.0}
    fresh = common.RowSink(path, ("config", "provider"), fresh=True)
    fresh.add(common.make_row({"config": "b"}, "p1"))
    assert len(common.load_rows(path)) == 1
    assert not list(tmp_path.glob("*.tmp"))


def test_run_provider_records_the_error_and_goes_on():
    def broken():
        raise RuntimeError("kernel exploded\nsecond line")

    row = common.run_provider({"config": "x"}, "flashkv", broken)
    assert row["error"] == "RuntimeError: kernel exploded second line"
    assert row["provider"] == "flashkv" and "us" not in row
    ok = common.run_provider({"config": "x"}, "flashkv", lambda: {"us": 3.0})
    assert ok["error"] is None and ok["us"] == 3.0


def test_plots_and_report_from_fake_json(tmp_path):
    pytest.importorskip("matplotlib")
    common.write_rows(tmp_path / "decode.json", _decode_rows())
    common.write_rows(tmp_path / "prefill.json", _prefill_rows())
    common.write_rows(tmp_path / "e2e.json", _e2e_rows())
    assert plot.main(["--out", str(tmp_path)]) == 0
    for name in ("decode", "prefill", "e2e"):
        png = tmp_path / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = report.render_section("decode", common.load_rows(tmp_path / "decode.json"),
                                 tmp_path / "decode.png")
    assert text.startswith("### Decode") and "NVIDIA H100" in text and "decode.png)" in text
    assert report.main(["--out", str(tmp_path)]) == 0
    with pytest.raises(ValueError):
        report.render_section("nope", [])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown without CUDA")
@pytest.mark.parametrize("module", [bench_decode, bench_prefill, bench_e2e])
def test_no_cuda_gives_a_clear_message(module, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        module.main(["--out", str(tmp_path)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "no CUDA device" in err and "Traceback" not in err
    assert not list(tmp_path.iterdir())


# --------------------------------------------------------------------------------------------
# provider set-up paths on the CPU (clocks replaced)
# --------------------------------------------------------------------------------------------


@pytest.fixture
def cpu_bench(monkeypatch):
    monkeypatch.setattr(common, "time_us", lambda fn, method="graph", **kw: (10.0, "fake"))
    monkeypatch.setattr(common, "do_bench_time_us", lambda fn, **kw: 100.0)
    for module in (bench_decode, bench_prefill, bench_e2e):
        monkeypatch.setattr(module, "DEVICE", "cpu")


def test_decode_run_case_on_cpu(cpu_bench, tmp_path):
    args = bench_decode.parse_args(["--out", str(tmp_path), "--dtype", "fp32"])
    sink = common.RowSink(tmp_path / "decode.json", bench_decode.KEY_FIELDS)
    for case in (bench_decode.DecodeCase(2, 4, 2, 24, 8),
                 bench_decode.DecodeCase(2, 4, 2, 24, 8, "varlen"),
                 bench_decode.DecodeCase(2, 4, 2, 24, 8, "paged", 8)):
        bench_decode.run_case(case, args, sink)
    rows = common.load_rows(tmp_path / "decode.json")
    providers = [(row["layout"], row["provider"]) for row in rows]
    assert len(providers) == len(set(providers)) == 5 + 5 + 4
    by = {(row["layout"], row["provider"]): row for row in rows}
    # SDPA's cuDNN backend cannot run on a CPU: its row holds the reason, the run went on.
    assert "RuntimeError" in by[("contiguous", "sdpa_cudnn")]["error"]
    for layout in ("contiguous", "varlen", "paged"):
        for provider in ("flashkv", "flashkv+append"):
            row = by[(layout, provider)]
            assert row["error"] is None, row["error"]
            assert row["max_abs_diff"] < 1e-4 and row["us"] == 10.0 and row["gbps"] > 0
    # the paged pool read through paged_read_order's table: same result, the sort timed too
    for provider in ("flashkv+read_order", "flashkv+append+read_order"):
        ordered = by[("paged", provider)]
        assert ordered["error"] is None and ordered["max_abs_diff"] < 1e-4 and ordered["order_us"] == 10.0
        assert "paged_read_order" in ordered["note"]
        assert ordered["bytes"] == by[("paged", provider.replace("+read_order", ""))]["bytes"]
    assert by[("varlen", "hf_static_mask")]["max_abs_diff"] < 1e-4
    assert by[("varlen", "hf_static_mask")]["bytes_read"] > by[("varlen", "flashkv")]["bytes"]
    _table_lines_consistent(bench_decode.decode_table(rows))


def test_prefill_run_case_on_cpu(cpu_bench, tmp_path):
    args = bench_prefill.parse_args(["--out", str(tmp_path)])
    sink = common.RowSink(tmp_path / "prefill.json", bench_prefill.KEY_FIELDS)
    for case in (bench_prefill.PrefillCase(1, 4, 2, 16, 8, "bf16"),
                 bench_prefill.PrefillCase(1, 4, 2, 8, 8, "bf16", kind="chunked", seqlen_k=24)):
        bench_prefill.run_case(case, args, sink)
    rows = common.load_rows(tmp_path / "prefill.json")
    assert [row["provider"] for row in rows] == [
        "flashkv", "sdpa_cudnn", "sdpa_flash", "flashkv_kvcache", "flashkv", "sdpa_cudnn",
        "sdpa_flash"]
    for row in rows:
        if row["provider"].startswith("flashkv"):
            assert row["error"] is None, row["error"]
            assert row["max_abs_diff"] < 5e-2 and row["first_call_ms"] > 0
            # timed by the (faked) CUDA-graph clock, the default
            assert row["timing"] == "fake"
            assert math.isclose(row["tflops"], bench_prefill.tflops(
                bench_prefill.attention_flops(1, 4, row["seqlen_q"], row["seqlen_k"], 8, True),
                10.0))
    args = bench_prefill.parse_args(["--out", str(tmp_path), "--timing", "do_bench"])
    sink = common.RowSink(tmp_path / "eager.json", bench_prefill.KEY_FIELDS)
    bench_prefill.run_case(bench_prefill.PrefillCase(1, 4, 2, 16, 8, "bf16"), args, sink)
    row = common.load_rows(tmp_path / "eager.json")[0]
    assert row["timing"] == "do_bench" and row["us"] == 100.0


def test_e2e_run_model_on_cpu(cpu_bench, tmp_path, monkeypatch):
    pytest.importorskip("transformers")
    tiny = {"label": "tiny", "vocab_size": 128, "hidden_size": 32, "intermediate_size": 64,
            "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2,
            "max_position_embeddings": 64, "rope_theta": 10000.0, "rms_norm_eps": 1e-5,
            "tie_word_embeddings": False}
    monkeypatch.setitem(bench_e2e.MODEL_SPECS, "tiny", tiny)
    import flashkv_ops

    # flashkv's generate joins once the package exports it (it runs on CPU, slowly).
    providers = ["hf_eager", "hf_static"]
    if hasattr(flashkv_ops, "generate"):
        providers.append("flashkv")
    args = bench_e2e.parse_args(["--out", str(tmp_path), "--batches", "2", "--prompt-len", "5",
                                 "--new-tokens", "3", "--providers", ",".join(providers)])
    args.models = ["tiny"]
    sink = common.RowSink(tmp_path / "e2e.json", bench_e2e.KEY_FIELDS)
    bench_e2e.run_model("tiny", args, sink, deadline=float("inf"))
    rows = {row["provider"]: row for row in common.load_rows(tmp_path / "e2e.json")}
    assert set(rows) == set(providers)
    for row in rows.values():
        assert row["error"] is None, row["error"]
        assert row["tok_s"] > 0 and row["prefill_s"] is not None and row["batch"] == 2
    assert rows["hf_static"]["matches_eager"] == 3


def test_prefill_headline_rows_keep_targets_and_chunked():
    quick = bench_prefill.quick_cases()[0]
    sweep_only = bench_prefill.PrefillCase(32, 32, 8, 512, 64, "fp16")
    chunked = bench_prefill.chunked_cases(["bf16"])[0]
    rows = [{**case.fields(), "provider": "flashkv"} for case in (quick, sweep_only, chunked)]
    kept = bench_prefill.headline_rows(rows)
    assert [row["config"] for row in kept] == [quick.name, chunked.name]
    assert sweep_only in bench_prefill.full_cases() and sweep_only not in bench_prefill.quick_cases()
