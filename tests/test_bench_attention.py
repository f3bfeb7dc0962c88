"""benchmarks/bench_attention.py at a toy size on the CPU (Grok-1's layout, d_model 64), so the script
cannot rot between GPU runs: its rows, ratios and markdown, one isolated (subprocess) row, and that
its reproduction of the old sublayer (commit 2690ac9) computes what the current one does. The
figures themselves are not checked (CPU wall clock at a toy size means nothing)."""
import importlib.util
import math
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_attention.py"
TOY = dict(d_model=64, num_q_heads=4, num_kv_heads=2, head_dim=16, max_seq_len=64)


def _bench():
    spec = importlib.util.spec_from_file_location("bench_attention", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def test_old_sublayer_matches_the_current_one():
    """Chunked (several chunks), dense and the current Attention agree: the baseline is the same function."""
    bench = _bench()
    cfg = bench.grok1_attention(**TOY)
    attn = bench.make_layer(cfg, "cpu")
    x, pos, key_valid, mask = bench.make_inputs(cfg, 40, "cpu", old=True)
    with torch.inference_mode():
        new = bench.prefill_fn(attn, "new-fp32", x, pos, key_valid, mask)()
        dense = bench.prefill_fn(attn, "old-dense", x, pos, key_valid, mask)()
        chunked = bench.old_forward(attn, x, pos, mask, query_chunk=16)
    torch.testing.assert_close(chunked, dense, rtol=0, atol=0)
    torch.testing.assert_close(new, dense, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU run is the real benchmark (scripts/gpu_check.sh)")
def test_bench_attention_runs_on_cpu():
    bench = _bench()
    impls = ["new-fp32", "old-chunked", "old-dense"]
    rows = bench.prefill_rows(TOY, [8, 32], impls, 1, isolate=False)
    assert [(r["T"], r["impl"]) for r in rows] == [(T, i) for T in (8, 32) for i in impls]
    for r in rows:
        assert math.isfinite(r["ms"]) and r["ms"] > 0 and r["peak_mb"] >= 0 and r["note"] == "", r
    assert len(bench.ratio_rows(rows)) == 4  # new-fp32 against both baselines at both lengths
    isolated = bench.prefill_row_isolated(TOY, 8, "old-chunked", 1, threads=1)  # a fresh process, as on the CPU
    assert isolated["impl"] == "old-chunked" and math.isfinite(isolated["ms"]) and isolated["note"] == ""
    md = bench.markdown(rows, [], device="CPU test", threads=1, command="test", load="0.1 / 0.2")
    assert "Command: `test`" in md and "1 threads" in md and "gpu_check.sh" in md
    assert md.count("| 32 | new-fp32 | old-") == 2


def test_skips_and_roofline_inputs():
    """The dense baseline's scores at T=8192 (12 GiB) are reported, not run, on the CPU; bandwidth by name."""
    bench = _bench()
    cfg = bench.grok1_attention()
    assert bench.score_bytes(cfg, 8192, 8192, "old-dense", cuda=False) == 48 * 8192 * 8192 * 4
    assert bench.score_bytes(cfg, 8192, 8192, "old-chunked", cuda=False) == 48 * 1024 * 8192 * 4
    assert bench.score_bytes(cfg, 8192, 8192, "new-fp32", cuda=True) == 0
    assert "allow-big" in bench.skip_reason(cfg, 8192, "old-dense", cuda=False, allow_big=False)
    assert bench.skip_reason(cfg, 2048, "old-dense", cuda=False, allow_big=False) is None
    assert bench.hbm_bandwidth("NVIDIA H200")[0] == 4.8e12
    assert bench.hbm_bandwidth("NVIDIA H100 80GB HBM3")[0] == 3.35e12
    assert bench.hbm_bandwidth("NVIDIA H100 PCIe")[0] == 2.0e12
    assert math.isnan(bench.hbm_bandwidth("NVIDIA A10")[0])
