"""benchmarks/bench_finetune.py at a toy size on the CPU, so the script cannot rot between runs: its
rows (forward, LoRA, LoRA + checkpointing, full), ratios, markdown, one isolated (subprocess) row, and
the Grok-1 estimate's arithmetic (adapter count from shapes, weights from grok_torch.plan). The
figures themselves are not checked (CPU wall clock at a toy size means nothing)."""
import importlib.util
import math
from pathlib import Path

import pytest
import torch

from grok_torch.config import GrokConfig
from grok_torch.lora import LoRAConfig, add_lora
from grok_torch.plan import weight_bytes_per_device

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_finetune.py"
TOY = dict(d_model=64, num_layers=2, num_q_heads=4, num_kv_heads=2, head_dim=16, widening_factor=2,
           num_experts=4, num_experts_per_tok=2, vocab_size=256, max_seq_len=32)


def _bench():
    spec = importlib.util.spec_from_file_location("bench_finetune", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    bench.CONFIGS["toy"] = (TOY, (2, 16), (2, 16))
    return bench


@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU run is the real benchmark (scripts/gpu_check.sh)")
def test_bench_finetune_rows_on_cpu():
    bench = _bench()
    torch.set_num_threads(1)
    rows = [bench.run_row("toy", row, 1, dtype=torch.float32, impl="torch") for row in bench.ROWS]
    for r in rows:
        assert math.isfinite(r["ms"]) and r["tok_s"] > 0 and r["peak_mb"] >= 0 and r["note"] == "", r
    by = {r["row"]: r for r in rows}
    assert by["forward int8"]["trainable"] == 0 and by["forward int8"]["state_mb"] == 0
    lora = by["LoRA"]["trainable"]
    assert lora == by["LoRA + ckpt"]["trainable"] == sum(bench.adapter_params_per_device(bench.config("toy"), 1, 8))
    assert by["full"]["trainable"] > lora and by["full"]["state_mb"] > by["LoRA"]["state_mb"] > 0
    rat = bench.ratios(rows)
    assert {(r["row"], r["vs"]) for r in rat} == {("LoRA", "forward int8"), ("LoRA + ckpt", "forward int8"),
                                                  ("full", "forward float"), ("LoRA", "full"), ("LoRA + ckpt", "full")}
    est = bench.grok1_lora_estimate(probe=dict(attention=1, moe_rows=1, weight_copies=0, rest_d_model=1, rest_other=1))
    md = bench.markdown(rows, est, device="CPU test", threads=1, command="test", load="0.1 / 0.2", dtype="fp32")
    assert "Command: `test`" in md and "1 threads" in md and "gpu_check.sh" in md and "Estimate from shapes" in md
    assert md.count("| toy | torch |") == len(rows) + len(rat)


def test_isolated_row_runs_in_a_fresh_process():
    bench = _bench()
    r = bench.run_row_isolated("tiny", "forward int8", 1, threads=1, dtype="bf16", batch=1, seq=8)
    assert r["row"] == "forward int8" and (r["B"], r["T"]) == (1, 8) and math.isfinite(r["ms"]) and r["note"] == ""


def test_grok1_estimate_arithmetic():
    """Adapters counted from the shapes (as add_lora makes them), weights from plan.py, the terms add up."""
    bench = _bench()
    toy = GrokConfig(name="toy", **TOY)
    model = bench.make_model(toy, "int8", torch.float32, "cpu", "torch")
    params = add_lora(model, LoRAConfig(rank=8, targets=("attn", "experts")))
    assert sum(bench.adapter_params_per_device(toy, 1, 8)) == sum(p.numel() for p in params)
    assert sum(bench.adapter_params_per_device(toy, 2, 8)) == sum(p.numel() for p in params)
    probe = bench.saved_activation_bytes(toy, 32)
    assert probe["attention"] > 0 and probe["moe_rows"] > 0 and probe["rest_d_model"] > 0
    est = bench.grok1_lora_estimate(probe=probe)
    grok = GrokConfig.from_name("grok-1")
    assert est["adapters_total"] == 498_073_600  # 64 x (attn 311,296 + 8 experts x 3 x 8 x (6144 + 32768))
    w = weight_bytes_per_device(grok, 8, "experts", "int8")
    for d in est["devices"]:
        assert d["terms"]["weights (int8 + scales, plan.py)"] == w[d["gpu"]]
        assert d["total"] == pytest.approx(sum(d["terms"].values()))
    assert est["devices"][0]["terms"]["loss-chunk logits [1024,V] fp32 x 2"] == 2 * 1024 * 131072 * 4  # --loss-chunk
    assert est["verdict"].startswith("FITS" if est["fits"] else "DOES NOT FIT")
    assert bench.visited_tile_area(256, 48) == 256 * 256  # one query block, one key block
    # the attention core: the Triton flash kernels save q, out [T, 48, 128], k, v [T, 8, 128] fp32, the
    # row log-sum-exp [T, 48] fp32, q_pos int64 and key_valid bool (no score tile); or the reference's tiles
    flash = est["layer"]["attention core (Triton: q, k, v, out, lse)"]
    assert flash == 4 * 4096 * (2 * 48 * 128 + 2 * 8 * 128 + 48) + 9 * 4096 and est["attention"] == "triton"
    ref = bench.grok1_lora_estimate(probe=probe, attention="torch")
    tiles = ref["layer"]["attention core (reference: score tiles)"]
    assert tiles > 0 and ref["devices"][1]["total"] - est["devices"][1]["total"] == pytest.approx(tiles - flash)
    assert "Triton flash kernels" in bench.estimate_markdown(est) and "blockwise reference" in bench.estimate_markdown(ref)
