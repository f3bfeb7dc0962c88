"""MoE layer benchmark: the reference loop, torch._grouped_mm and our Triton kernels, side by side.

    # GPU (H100): Grok-1 shapes, one table on stdout and a CSV
    python benchmarks/bench_moe.py --csv moe_h100.csv
    python benchmarks/bench_moe.py --shapes tp8 --tokens 1 8 64 --dtypes int8      # a subset
    # CPU (no GPU): tiny shapes, reference vs the Triton interpreter, < 2 minutes; keeps the script alive
    python benchmarks/bench_moe.py --csv moe_cpu.csv

Rows: shape x tokens T x routing x weight dtype x implementation.
  shapes    full = one whole Grok-1 MoE layer on one GPU (D=6144, F=32768, E=8)
            tp8  = an 8-way slice of every expert (D=6144, F=4096, E=8)
  tokens    T in {1, 8, 64, 512, 4096}
  routing   uniform = random router; skewed = a shared direction in x pulls most tokens to experts 0 and 1
  dtypes    bf16 weights, or int8 weights with the release's scales (G=1 for w1/w3, G=8 for w2)
  impls     reference = grok_torch.kernels.moe_reference (loop over experts, eager: it syncs on nonzero)
            grouped_mm = torch._grouped_mm over expert-sorted rows (bf16 weights only; int8 would need a
                         dequantised copy, which is not the same problem), CUDA-graph replayed
            triton     = grok_torch.kernels.fused_moe(impl="triton"), CUDA-graph replayed
            triton-atomic = the same with deterministic=False: the top-k combine as fp32 atomics in the
                         down GEMM's epilogue (4 launches, no [T*k, D] intermediate), CUDA-graph replayed
Columns: median time (us) over replays, TF/s (useful flops 2*T*k*3*D*F), GB/s (unique bytes: the
weights of the experts that got tokens + x + out), and % of roofline = max(bytes / copy bandwidth,
flops / matmul rate) / time, with the copy bandwidth (device-to-device copy of 1 GiB) and the bf16
matmul rate (8192^3) measured at the start of the same run. int8 runs on bf16 tensor cores (W8A16),
so its compute roof is the bf16 rate. The weights are GBs, far above L2, so no L2 flush is needed
for the weight stream; small activations stay cache-resident across replays (optimistic at T=1).

On the CPU the same rows are produced for tiny shapes (D=64, F=128, E=8, T in {1, 8, 64}, fp32 since
the interpreter gets bf16 wrong) with wall-clock medians and no roofline.
"""
from __future__ import annotations

import argparse
import csv
import math
import os
import statistics
import sys
import time

import torch

# On the CPU the triton rows run in Triton's interpreter, which `triton.jit` picks when the kernels are
# defined and which the library leaves to its user: this script opts in before they are imported (an
# explicit TRITON_INTERPRET in the environment wins).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from grok_torch.kernels import fused_moe, moe_reference  # noqa: E402

SHAPES = {"full": (6144, 32768, 8), "tp8": (6144, 4096, 8), "tiny": (64, 128, 8)}


# ---------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------


def make_weights(D, F, E, dtype, device):
    """Random expert weights in the released layout; int8 with bf16 scales [E, G, N] (G=1, 1, 8)."""
    g = torch.Generator(device=device).manual_seed(0)
    shapes, groups = [(E, D, F), (E, D, F), (E, F, D)], [1, 1, 8]
    if dtype == "int8":
        ws = [torch.randint(-127, 128, s, generator=g, device=device, dtype=torch.int8) for s in shapes]
        scales = tuple(
            torch.full((s[0], G, s[2]), 1.0 / (127 * math.sqrt(s[1])), device=device, dtype=torch.bfloat16)
            for s, G in zip(shapes, groups)
        )
        return ws, scales
    wd = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype]
    ws = [torch.randn(s, generator=g, device=device, dtype=torch.float32).div_(math.sqrt(s[1])).to(wd) for s in shapes]
    return ws, None


def make_tokens(T, D, E, routing, device):
    g = torch.Generator(device=device).manual_seed(T)
    x = torch.randn(T, D, generator=g, device=device)
    router_w = torch.randn(D, E, generator=g, device=device) / math.sqrt(D)
    if routing == "skewed":
        direction = torch.randn(D, generator=g, device=device)
        direction /= direction.norm()
        x += 3 * direction  # every token shares this component ...
        router_w[:, 0] += 2 * direction  # ... which experts 0 and 1 read strongly
        router_w[:, 1] += 1.5 * direction
    return x, router_w


# ---------------------------------------------------------------------------------------------
# Implementations (each returns a zero-argument callable)
# ---------------------------------------------------------------------------------------------


def impl_reference(x, router_w, ws, scales, cd):
    return lambda: moe_reference(x, router_w, *ws, scales=scales, compute_dtype=cd)


def impl_triton(x, router_w, ws, scales, cd):
    return lambda: fused_moe(x, router_w, *ws, scales=scales, compute_dtype=cd, impl="triton")


def impl_triton_atomic(x, router_w, ws, scales, cd):
    return lambda: fused_moe(x, router_w, *ws, scales=scales, compute_dtype=cd, impl="triton", deterministic=False)


def impl_grouped_mm(x, router_w, ws, scales, cd):
    """torch._grouped_mm: sort rows by expert, three grouped GEMMs, gate and scatter back. bf16 only."""
    if scales is not None or not hasattr(torch, "_grouped_mm"):
        return None
    w1, w3, w2 = ws
    E = w1.shape[0]
    c1, c2 = math.sqrt(2 / math.pi), 0.044715

    def run():
        probs = torch.softmax(x.float() @ router_w, -1)
        gates, ids = torch.topk(probs, 2, dim=-1)
        T, K = ids.shape
        flat = ids.reshape(-1)
        order = torch.argsort(flat, stable=True)
        # counts by comparison, not one_hot/bincount: those validate on the host and break graph capture
        counts = (flat[:, None] == torch.arange(E, device=flat.device)).sum(0)
        ends = torch.cumsum(counts, 0).to(torch.int32)
        xs = x.to(cd)[order // K]
        g = torch._grouped_mm(xs, w1, offs=ends)
        u = torch._grouped_mm(xs, w3, offs=ends)
        gf = g.float()
        a = (gf * 0.5 * (1 + torch.tanh(c1 * (gf + c2 * gf**3))) * u.float()).to(cd)
        y = torch._grouped_mm(a, w2, offs=ends).float() * gates.reshape(-1)[order, None]
        out = torch.zeros(T, x.shape[1], device=x.device, dtype=torch.float32)
        out.index_add_(0, order // K, y)
        return out.to(cd)

    return run


IMPLS = {
    "reference": impl_reference,
    "grouped_mm": impl_grouped_mm,
    "triton": impl_triton,
    "triton-atomic": impl_triton_atomic,
}


# ---------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------


def time_cpu(fn, reps):
    fn()  # warm-up (interpreter tracing)
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts) * 1e6, "wall"


def time_cuda(fn, reps, graph):
    """Median microseconds over reps; replays a captured CUDA graph when graph=True."""
    fn()
    torch.cuda.synchronize()
    mode = "eager"
    if graph:
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            fn()  # warm-up on the capture stream (allocator pools)
        torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            fn()
        fn, mode = g.replay, "graph"
        fn()
    ts = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b) * 1e3)
    return statistics.median(ts), mode


def _copy_us(n: int) -> float:
    src = torch.empty(n, dtype=torch.bfloat16, device="cuda")
    dst = torch.empty_like(src)
    return time_cuda(lambda: dst.copy_(src), 20, graph=False)[0]  # both freed on return


def measure_roofs():
    """Device copy bandwidth (B/s) and bf16 matmul rate (FLOP/s), measured now."""
    n = 1 << 29  # 1 GiB of bf16
    t_copy = _copy_us(n)
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    t_mm, _ = time_cuda(lambda: a @ b, 20, graph=False)
    return 2 * n * 2 / (t_copy * 1e-6), 2 * 8192**3 / (t_mm * 1e-6)


# ---------------------------------------------------------------------------------------------
# Targets (issue #4, on an H100) and the markdown record for BENCHMARKS.md
# ---------------------------------------------------------------------------------------------

HEADER = ["shape", "T", "routing", "dtype", "impl", "timer", "us", "TF/s", "GB/s", "%roof", "experts_hit", "max_err"]
DECODE_MAX_T, PREFILL_T = 64, 4096
TARGETS = {  # name -> (what, threshold)
    "decode_hbm": ("decode (T <= 64): % of measured copy bandwidth on the bytes that must be read", 90.0),
    "prefill_mma": ("prefill (T = 4096): % of measured bf16 matmul rate", 70.0),
    "decode_vs_grouped_mm": ("decode (T <= 64, bf16): speed-up over torch._grouped_mm", 1.5),
}


def check_targets(rows: list, mm_rate: float) -> list[tuple[str, str, float, float, str]]:
    """(target, scope, worst measured value, threshold, PASS/FAIL) for the `triton` rows; the worst
    case over routings and token counts decides. Rows without a roofline (CPU) give no verdict."""
    rec = [dict(zip(HEADER, r)) for r in rows]
    ok = [r for r in rec if r["timer"] == "graph" and math.isfinite(r["us"])]
    out = []
    for shape in dict.fromkeys(r["shape"] for r in ok):
        for dtype in dict.fromkeys(r["dtype"] for r in ok if r["shape"] == shape):
            ours = [r for r in ok if r["impl"] == "triton" and r["shape"] == shape and r["dtype"] == dtype]
            scope = f"{shape} {dtype}"
            dec = [r["%roof"] for r in ours if r["T"] <= DECODE_MAX_T]
            if dec:
                out.append(("decode_hbm", scope, min(dec), TARGETS["decode_hbm"][1]))
            pre = [100 * r["TF/s"] * 1e12 / mm_rate for r in ours if r["T"] == PREFILL_T]
            if pre:
                out.append(("prefill_mma", scope, min(pre), TARGETS["prefill_mma"][1]))
            ratios = []
            for r in ours:
                if r["T"] > DECODE_MAX_T:
                    continue
                base = [b for b in ok if b["impl"] == "grouped_mm" and all(b[k] == r[k] for k in ("shape", "T", "routing", "dtype"))]
                if base:
                    ratios.append(base[0]["us"] / r["us"])
            if ratios:
                out.append(("decode_vs_grouped_mm", scope, min(ratios), TARGETS["decode_vs_grouped_mm"][1]))
    return [(t, sc, v, th, "PASS" if v >= th else "FAIL") for t, sc, v, th in out]


def markdown(rows: list, *, device: str, copy_bw: float, mm_rate: float, command: str) -> str:
    """A dated section for BENCHMARKS.md: machine, command, measured roofs, the table, the targets."""
    import datetime
    import subprocess

    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    except OSError:
        commit = ""
    lines = [
        f"**{datetime.date.today().isoformat()}, {device}, commit {commit or 'unknown'}, torch {torch.__version__}.**",
        f"Command: `{command}`. Measured in the same run: copy {copy_bw / 1e9:.0f} GB/s, bf16 matmul {mm_rate / 1e12:.0f} TF/s.",
        "",
        "| " + " | ".join(HEADER) + " |",
        "|" + "---|" * len(HEADER),
    ]
    for r in rows:
        lines.append("| " + " | ".join(f"{v:.4g}" if isinstance(v, float) else str(v) for v in r) + " |")
    verdicts = check_targets(rows, mm_rate) if math.isfinite(mm_rate) else []
    lines += ["", "| target | scope | worst measured | needed | |", "|---|---|---|---|---|"]
    for t, sc, v, th, verdict in verdicts:
        lines.append(f"| {TARGETS[t][0]} | {sc} | {v:.3g} | {th:g} | {verdict} |")
    if not verdicts:
        lines.append("| (no CUDA-graph `triton` rows: no verdict) | | | | |")
    failed = [f"{r[4]} {r[0]} T={r[1]} {r[2]} {r[3]}" for r in rows if r[5] == "error"]
    if failed:
        lines += ["", f"{len(failed)} row(s) failed (the exception is in the run's log): " + "; ".join(failed)]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------


def main(*, shapes, tokens, routings, dtypes, impls, csv_path=None, reps=None, md_path=None, command=""):
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    reps = reps or (20 if cuda else 3)
    copy_bw, mm_rate = measure_roofs() if cuda else (float("nan"), float("nan"))
    if cuda:
        print(f"# {torch.cuda.get_device_name()}: copy {copy_bw / 1e9:.0f} GB/s, bf16 matmul {mm_rate / 1e12:.0f} TF/s")
    rows = []
    print(" | ".join(f"{h:>10}" for h in HEADER))
    for shape in shapes:
        D, F, E = SHAPES[shape]
        for dtype in dtypes:
            ws, scales = make_weights(D, F, E, dtype, device)
            cd = torch.bfloat16 if dtype in ("bf16", "int8") and cuda else torch.float32
            wbytes = ws[0][0].numel() * ws[0].element_size() * 3 + (
                sum(s[0].numel() * 2 for s in scales) if scales else 0
            )
            for T in tokens:
                for routing in routings:
                    x, router_w = make_tokens(T, D, E, routing, device)
                    ref_out, _, ids = moe_reference(x, router_w, *ws, scales=scales, compute_dtype=cd)
                    hit = int(torch.unique(ids).numel())
                    flops = 2 * T * ids.shape[1] * 3 * D * F
                    nbytes = hit * wbytes + x.numel() * x.element_size() + T * D * ref_out.element_size()
                    for name in impls:
                        fn = IMPLS[name](x, router_w, ws, scales, cd)
                        if fn is None:
                            continue
                        try:
                            out = fn()
                            out = out[0] if isinstance(out, tuple) else out
                            err = (out.float() - ref_out.float()).abs().max().item()
                            if cuda:
                                us, timer = time_cuda(fn, reps, graph=name != "reference")
                            else:
                                us, timer = time_cpu(fn, reps)
                        except Exception as exc:  # one failing implementation must not end the run
                            print(f"# {name} {shape} T={T} {routing} {dtype}: {type(exc).__name__}: {exc}", file=sys.stderr)
                            us, timer, err = float("nan"), "error", float("nan")
                        roof = max(nbytes / copy_bw, flops / mm_rate) * 1e6 / us if cuda else float("nan")
                        row = [shape, T, routing, dtype, name, timer, us, flops / us / 1e6, nbytes / us / 1e3, 100 * roof, hit, err]
                        rows.append(row)
                        print(" | ".join(f"{v:>10.4g}" if isinstance(v, float) else f"{v!s:>10}" for v in row), flush=True)
            del ws, scales
            if cuda:
                torch.cuda.empty_cache()
    if csv_path:
        with open(csv_path, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(HEADER)
            w.writerows(rows)
        print(f"# wrote {csv_path}")
    verdicts = check_targets(rows, mm_rate) if cuda else []
    for t, sc, v, th, verdict in verdicts:
        print(f"# {verdict} {TARGETS[t][0]} [{sc}]: worst {v:.3g}, needed {th:g}")
    if md_path:
        device_name = torch.cuda.get_device_name() if cuda else "CPU (Triton interpreter, tiny shapes)"
        with open(md_path, "w") as f:
            f.write(markdown(rows, device=device_name, copy_bw=copy_bw, mm_rate=mm_rate, command=command))
        print(f"# wrote {md_path}")
    return rows


if __name__ == "__main__":
    gpu = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", nargs="+", default=["full", "tp8"] if gpu else ["tiny"], choices=list(SHAPES))
    p.add_argument("--tokens", nargs="+", type=int, default=[1, 8, 64, 512, 4096] if gpu else [1, 8, 64])
    p.add_argument("--routings", nargs="+", default=["uniform", "skewed"], choices=["uniform", "skewed"])
    p.add_argument("--dtypes", nargs="+", default=["bf16", "int8"] if gpu else ["fp32", "int8"],
                   choices=["bf16", "int8", "fp32"])
    p.add_argument("--impls", nargs="+", default=list(IMPLS), choices=list(IMPLS))
    p.add_argument("--reps", type=int, default=None, help="timed repetitions (default 20 on GPU, 3 on CPU)")
    p.add_argument("--csv", default=None, help="also write the rows to this CSV file")
    p.add_argument("--md", default=None, help="also write a dated markdown section (table + target verdicts) for BENCHMARKS.md")
    a = p.parse_args()
    main(shapes=a.shapes, tokens=a.tokens, routings=a.routings, dtypes=a.dtypes, impls=a.impls, csv_path=a.csv,
         reps=a.reps, md_path=a.md, command="python " + " ".join(sys.argv))
