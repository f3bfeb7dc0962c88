"""benchmarks/bench_moe.py runs on the CPU (tiny shapes, reference vs the Triton interpreter): one
token, one repetition, so the script cannot rot between GPU runs. Its figures are not checked here
(wall-clock on a CPU means nothing); its rows, errors and CSV are."""
import csv
import importlib.util
import math
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_moe.py"


@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU run is the real benchmark (scripts/gpu_check.sh)")
def test_bench_moe_runs_on_cpu(tmp_path):
    spec = importlib.util.spec_from_file_location("bench_moe", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "moe.csv"
    rows = bench.main(shapes=["tiny"], tokens=[1], routings=["uniform", "skewed"], dtypes=["fp32", "int8"],
                      impls=list(bench.IMPLS), csv_path=str(out), reps=1)
    header = ["shape", "T", "routing", "dtype", "impl", "timer", "us", "TF/s", "GB/s", "%roof", "experts_hit", "max_err"]
    with open(out) as f:
        table = list(csv.reader(f))
    assert table[0] == header and len(table) == len(rows) + 1
    got = {(r[2], r[3], r[4]) for r in rows}
    for routing in ("uniform", "skewed"):
        for dtype in ("fp32", "int8"):  # grouped_mm has no int8 path (it would need a dequantised copy)
            impls = {"reference", "triton", "triton-atomic"} | ({"grouped_mm"} if dtype == "fp32" else set())
            assert {(routing, dtype, i) for i in impls} <= got
    for r in rows:
        assert r[5] == "wall" and math.isfinite(r[6]) and r[6] > 0, r  # timer "error": the impl raised
        assert r[11] <= 1e-5, r  # fp32 compute on the CPU: every implementation agrees with the reference
