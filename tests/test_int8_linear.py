"""The int8 weight-only linear (grok_torch.kernels.int8_linear) against its PyTorch reference.

Without CUDA the kernel runs under the Triton interpreter (tests/conftest.py turns it on; fp32 and fp16
only: its bf16 arithmetic is wrong), on small shapes chosen so that every path runs: each scale mode
(1: scale row per K group; 2: transposed, scale vector along the reduction; 3: groups narrower than a
tile, per-element gather; 0: float weights), a split reduction (with a K group boundary inside a
chunk, and a ragged tail), masked rows and columns, several row and column tiles. Every output (and split partial) is poisoned
before the run. precision="bf16" is checked on the GPU only, where it is also checked at Grok-1
shapes, with the memory high-water mark showing no weight-sized temporary.
The sm_90 build is checked without a GPU: this file, run as a script with TRITON_INTERPRET=0, records
the launches at Grok-1 shapes on the meta device (no host reads) and compiles them.
"""
import json
import os
import re
import subprocess
import sys

import pytest
import torch

from grok_torch.kernels import int8_linear as il
from grok_torch.kernels.int8_linear import int8_linear_reference, int8_linear_triton
from grok_torch.kernels.reference import dequantize

# (M, K, N, G, why); the scale mode and split each case gets are asserted in test_cases_cover_every_path
SHAPES = [
    (1, 64, 48, 4, "decode row; K//G=16 scale rows (mode 1); transposed: groups < tile (mode 3), ragged R"),
    (5, 128, 80, 2, "N=80 not a multiple of the 64-column tile; transposed: one group per tile (mode 2)"),
    (33, 32, 48, 4, "K//G=8 < the 16-step: per-element scales (mode 3) both ways; 33 rows of a 64 tile"),
    (3, 512, 64, 8, "split reduction (4 chunks of 128), two K groups inside each chunk"),
    (2, 64, 384, 1, "transposed: split reduction (3 chunks) with the scale vector along it (mode 2)"),
    (2, 392, 48, 1, "K=392: split into 160+160+72 rows, a ragged last chunk (no EVEN_R), mode 3"),
    (70, 48, 80, 1, "two row tiles x two column tiles (launch-order grouping), masks on both"),
]
SHAPE_IDS = [f"M{m}-K{k}-N{n}-G{g}" for m, k, n, g, _ in SHAPES]


def _inputs(M, K, N, G, wkind, transpose, seed=0, xdtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, N if transpose else K, generator=g).to(xdtype)
    if wkind == "int8":
        w = torch.randint(-128, 128, (K, N), generator=g, dtype=torch.int8)
        scales = (torch.rand(G, N, generator=g) + 0.5).div(127).bfloat16()
        return x, w, scales
    return x, torch.randn(K, N, generator=g).to({"fp32": torch.float32, "bf16": torch.bfloat16}[wkind]), None


def _bound(x, w, scales, transpose, rel):
    """rel x sum_k |x| |deq(w)|: the scale of fp32 summation-order differences, element by element."""
    wd = dequantize(w, scales, torch.float32).abs()
    return rel * (x.float().abs() @ (wd.t() if transpose else wd)) + 1e-30


def _assert_close(got, want, bound):
    assert got.dtype == torch.float32 and got.shape == want.shape
    assert not torch.isnan(got).any(), f"{int(torch.isnan(got).sum())} of {got.numel()} outputs never written"
    err = (got - want).abs()
    worst = (err / bound).max().item()
    assert worst <= 1, f"max |err| / bound = {worst:.3g} (max |err| {err.max().item():.3g})"


@pytest.fixture
def poisoned(monkeypatch):
    """Every torch.empty (the output, the split partials) comes back full of NaN."""
    real = torch.empty

    def empty(*args, **kwargs):
        t = real(*args, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", empty)


def test_cases_cover_every_path():
    got = set()
    for M, K, N, G, _ in SHAPES:
        for tr in (False, True):
            cfg, mode = il._plan(M, K, N, G, True, "fp32", tr)
            n_out, r = (K, N) if tr else (N, K)
            got |= {f"mode{mode}", f"split={cfg.split > 1}", f"even={r % cfg.block_k == 0}", f"mode{mode}-split={cfg.split > 1}"}
            got |= {"row tiles > 1"} if M > cfg.block_m else set()
            got |= {"col tiles > 1"} if n_out > cfg.block_n else set()
            got |= {"col mask"} if n_out % cfg.block_n else set()
            got |= {"groups in a chunk > 1"} if mode == 1 and cfg.split > 1 and cfg.chunk > K // G else set()
    want = {"mode1", "mode2", "mode3", "split=True", "split=False", "even=True", "even=False", "mode1-split=True",
            "mode2-split=True", "mode3-split=True", "row tiles > 1", "col tiles > 1", "col mask", "groups in a chunk > 1"}
    assert want <= got, want - got


@pytest.mark.parametrize("M, K, N, G, why", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("transpose", [False, True], ids=["xw", "xwT"])
@pytest.mark.parametrize("wkind", ["int8", "fp32"])
def test_fp32_matches_reference(poisoned, M, K, N, G, why, transpose, wkind):
    x, w, scales = _inputs(M, K, N, G, wkind, transpose, seed=M + K + N)
    got = int8_linear_triton(x, w, scales, transpose=transpose)
    want = int8_linear_reference(x, w, scales, transpose=transpose)
    assert got.shape == (M, K if transpose else N)
    _assert_close(got, want, _bound(x, w, scales, transpose, 1e-5))


@pytest.mark.parametrize("xdtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("transpose", [False, True], ids=["xw", "xwT"])
def test_16bit_x_is_widened_exactly(poisoned, xdtype, transpose):
    """fp16/bf16 activations with precision="fp32": widened exactly (a conversion, no bf16 arithmetic)."""
    x, w, scales = _inputs(5, 128, 80, 2, "int8", transpose, seed=3, xdtype=xdtype)
    got = int8_linear_triton(x, w, scales, transpose=transpose)
    _assert_close(got, int8_linear_reference(x, w, scales, transpose=transpose), _bound(x, w, scales, transpose, 1e-5))


def test_bf16_weight_fp32_precision(poisoned):
    x, w, _ = _inputs(3, 512, 64, 1, "bf16", False, seed=4)
    _assert_close(int8_linear_triton(x, w), int8_linear_reference(x, w), _bound(x, w, None, False, 1e-5))


@pytest.mark.parametrize("transpose", [False, True], ids=["xw", "xwT"])
def test_row_strided_x_and_transposed_w_views(poisoned, transpose):
    """x a row-strided, offset view (rows 2*(cols+5) apart); w and scales non-contiguous views too."""
    M, K, N, G = 5, 64, 48, 4
    cols = N if transpose else K
    g = torch.Generator().manual_seed(5)
    base = torch.randn(2 * M, cols + 5, generator=g)
    x = base[::2, 2:2 + cols]
    assert x.stride() == (2 * (cols + 5), 1) and not x.is_contiguous()
    w = torch.randint(-128, 128, (N, K), generator=g, dtype=torch.int8).t()  # [K, N] with strides (1, K)
    scales = (torch.rand(N, G, generator=g) + 0.5).div(127).bfloat16().t()
    got = int8_linear_triton(x, w, scales, transpose=transpose)
    want = int8_linear_reference(x.contiguous(), w.contiguous(), scales.contiguous(), transpose=transpose)
    _assert_close(got, want, _bound(x, w, scales, transpose, 1e-5))


@pytest.mark.parametrize("transpose", [False, True], ids=["xw", "xwT"])
def test_same_bits_twice(transpose):
    x, w, scales = _inputs(3, 512, 64, 8, "int8", transpose, seed=6)
    a = int8_linear_triton(x, w, scales, transpose=transpose)
    b = int8_linear_triton(x, w, scales, transpose=transpose)
    assert torch.equal(a, b)


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU tensors only")
def test_bf16_precision_refused_by_the_interpreter():
    x, w, s = _inputs(5, 128, 80, 2, "int8", False)
    with pytest.raises(ValueError, match="precision='bf16' needs a GPU"):
        int8_linear_triton(x, w, s, precision="bf16")


def test_empty_dims():
    w = torch.zeros(32, 16, dtype=torch.int8)
    s = torch.ones(1, 16, dtype=torch.bfloat16)
    assert int8_linear_triton(torch.zeros(0, 32), w, s).shape == (0, 16)
    assert int8_linear_triton(torch.zeros(3, 16), w, s, transpose=True).shape == (3, 32)
    y = int8_linear_triton(torch.zeros(2, 0), torch.zeros(0, 16, dtype=torch.int8), torch.ones(1, 16, dtype=torch.bfloat16))
    assert torch.equal(y, torch.zeros(2, 16))


def _bad(kind):
    x, w = torch.randn(2, 32), torch.zeros(32, 16, dtype=torch.int8)
    s = torch.ones(4, 16, dtype=torch.bfloat16)
    return {
        "K % G": (x, w, torch.ones(5, 16, dtype=torch.bfloat16), {}, "G=5 groups, which must divide w's K=32"),
        "scales columns": (x, w, torch.ones(4, 15, dtype=torch.bfloat16), {}, r"scales must be \[G, N\] = \[G, 16\]"),
        "scales 1-D": (x, w, torch.ones(16, dtype=torch.bfloat16), {}, r"scales must be \[G, N\]"),
        "scales dtype": (x, w, s.float(), {}, "scales must be bfloat16"),
        "no scales": (x, w, None, {}, "scales must be given for an int8 w"),
        "scales for float w": (x, w.float(), s, {}, "scales must be None for a floating-point w"),
        "3-D x": (x[None], w, s, {}, r"x must be 2-D .*reshape\(-1"),
        "x columns": (torch.randn(2, 31), w, s, {}, "x has 31 columns but w .* needs 32"),
        "x columns, transposed": (x, w, s, dict(transpose=True), "x has 32 columns but w .* needs 16 .*transpose=True"),
        "x dtype": (x.double(), w, s, {}, "x must be float32, bfloat16 or float16"),
        "w dtype": (x, w.to(torch.int16), None, {}, "w must be int8"),
        "precision": (x, w, s, dict(precision="tf32"), "precision must be 'fp32' or 'bf16'"),
    }[kind]


@pytest.mark.parametrize("impl", [int8_linear_triton, int8_linear_reference], ids=["triton", "reference"])
@pytest.mark.parametrize("kind", ["K % G", "scales columns", "scales 1-D", "scales dtype", "no scales", "scales for float w",
                                  "3-D x", "x columns", "x columns, transposed", "x dtype", "w dtype", "precision"])
def test_bad_arguments_raise_one_line_errors(impl, kind):
    x, w, s, kw, match = _bad(kind)
    with pytest.raises(ValueError, match=match) as e:
        impl(x, w, s, **kw)
    assert "\n" not in str(e.value)


def test_triton_needs_contiguous_last_dim():
    x = torch.randn(32, 2).t()
    with pytest.raises(ValueError, match=r"x's last dim must be contiguous .*x.contiguous\(\)"):
        int8_linear_triton(x, torch.zeros(32, 16, dtype=torch.int8), torch.ones(1, 16, dtype=torch.bfloat16))


# ---------------------------------------------------------------------------------------------
# The reference by hand
# ---------------------------------------------------------------------------------------------


def test_reference_by_hand():
    """w = [[1, -2], [127, 4]], one scale row [1.0078125, 0.25] (bf16-exact): deq(w)[1, 0] = 127.9921875
    needs 15 bits, so precision="bf16" rounds it to 128; x = [1, 1/3] rounds to [1, 0.333984375]."""
    w = torch.tensor([[1, -2], [127, 4]], dtype=torch.int8)
    s = torch.tensor([[1.0078125, 0.25]], dtype=torch.bfloat16)
    x = torch.tensor([[1.0, 1.0 / 3.0]])
    third = torch.tensor(1.0 / 3.0)
    want32 = torch.stack([1.0078125 + third * 127.9921875, -0.5 + third * 1.0])[None]
    assert torch.equal(int8_linear_reference(x, w, s), want32)
    want16 = torch.tensor([[1.0078125 + 0.333984375 * 128.0, -0.5 + 0.333984375]])
    assert torch.equal(int8_linear_reference(x, w, s, precision="bf16"), want16)
    # transposed: x [M, N] @ deq(w)^T, element (k, n) still scaled by s[k // (K//G), n]
    xt = torch.tensor([[2.0, 1.0]])
    want32 = torch.tensor([[2 * 1.0078125 - 0.5, 2 * 127.9921875 + 1.0]])
    assert torch.equal(int8_linear_reference(xt, w, s, transpose=True), want32)
    want16 = torch.tensor([[2 * 1.0078125 - 0.5, 2 * 128.0 + 1.0]])
    assert torch.equal(int8_linear_reference(xt, w, s, transpose=True, precision="bf16"), want16)


@pytest.mark.parametrize("transpose", [False, True], ids=["xw", "xwT"])
def test_reference_bf16_is_rounded_operands_in_fp32(transpose):
    """precision="bf16": bf16(x) @ bf16(exact deq(w)) in fp32; by hand with repeat_interleave, in fp64."""
    M, K, N, G = 4, 64, 24, 4
    x, w, s = _inputs(M, K, N, G, "int8", transpose, seed=9)
    deq = w.double() * s.double().repeat_interleave(K // G, dim=0)  # exact
    wb = deq.float().bfloat16().double()
    want = x.bfloat16().double() @ (wb.t() if transpose else wb)
    got = int8_linear_reference(x, w, s, precision="bf16", transpose=transpose)
    bound = 1e-6 * (x.bfloat16().double().abs() @ (wb.abs().t() if transpose else wb.abs())) + 1e-30
    assert ((got.double() - want).abs() <= bound).all()
    assert not torch.equal(got, int8_linear_reference(x, w, s, transpose=transpose))  # the rounding is real


# ---------------------------------------------------------------------------------------------
# GPU only
# ---------------------------------------------------------------------------------------------

GROK_SHAPES = [(6144, 6144, False), (6144, 1024, False), (6144, 6144, True), (6144, 1024, True)]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="bf16 and Grok-1 shapes need a GPU")
@pytest.mark.parametrize("K, N, transpose", GROK_SHAPES, ids=[f"{k}x{n}{'T' if t else ''}" for k, n, t in GROK_SHAPES])
@pytest.mark.parametrize("M", [1, 8, 100, 1024])
@pytest.mark.parametrize("precision, xdtype", [("fp32", torch.float32), ("bf16", torch.bfloat16)])
def test_grok_shapes_on_gpu(K, N, transpose, M, precision, xdtype):
    G = 1 if N == 6144 else 8
    x, w, s = (t.cuda() for t in _inputs(M, K, N, G, "int8", transpose, seed=M, xdtype=xdtype))
    want = int8_linear_reference(x, w, s, precision=precision, transpose=transpose)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    got = int8_linear_triton(x, w, s, precision=precision, transpose=transpose)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - before
    assert extra < got.numel() * 4 * 2 + (8 << 20), f"{extra} bytes allocated: a weight-sized temporary?"
    xb = x.float() if precision == "fp32" else x.bfloat16().float()
    wd = dequantize(w, s, torch.float32)
    wd = wd if precision == "fp32" else wd.bfloat16().float()
    bound = 2e-5 * (xb.abs() @ (wd.abs().t() if transpose else wd.abs())) + 1e-30
    assert ((got - want).abs() <= bound).all(), ((got - want).abs() / bound).max().item()
    assert torch.equal(got, int8_linear_triton(x, w, s, precision=precision, transpose=transpose))


# ---------------------------------------------------------------------------------------------
# sm_90 build without a GPU (this file as a script, TRITON_INTERPRET=0)
# ---------------------------------------------------------------------------------------------

# (M, K, N, G, precision, transpose): decode, medium and prefill tiles, both layouts, both precisions
AOT_CASES = [
    (1, 6144, 6144, 1, "bf16", False), (1, 6144, 6144, 1, "bf16", True), (8, 6144, 1024, 8, "bf16", False),
    (64, 6144, 6144, 1, "bf16", False), (8192, 6144, 6144, 1, "bf16", False), (8192, 6144, 6144, 1, "bf16", True),
    (1, 6144, 6144, 1, "fp32", False), (1, 6144, 1024, 8, "fp32", True), (8192, 6144, 6144, 1, "fp32", False),
    (8192, 6144, 6144, 1, "fp32", True),
    (3, 1000, 200, 8, "bf16", False), (3, 1000, 200, 8, "bf16", True),  # K//G=125: per-element scales, K masks
]


def record_launches(M, K, N, G, precision, transpose):
    """[(jit_function, grid, args, kwargs)] of one int8_linear_triton call, on the meta device."""
    from grok_torch.kernels import aot

    xd = torch.bfloat16 if precision == "bf16" else torch.float32
    x = torch.empty(M, N if transpose else K, dtype=xd, device="meta")
    w = torch.empty(K, N, dtype=torch.int8, device="meta")
    s = torch.empty(G, N, dtype=torch.bfloat16, device="meta")
    log, names = [], ("_int8_linear_kernel", "_int8_linear_reduce_kernel")
    saved = {n: getattr(il, n) for n in names}
    try:
        for n, fn in saved.items():
            setattr(il, n, aot._Recorder(fn, log))
        il.int8_linear_triton(x, w, s, precision=precision, transpose=transpose)
    finally:
        for n, fn in saved.items():
            setattr(il, n, fn)
    return log


def _compile_all(arch=90):
    """JSON lines: every distinct launch of AOT_CASES compiled for sm_<arch> as the JIT specialises it."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from grok_torch.kernels import aot

    target = GPUTarget("cuda", arch, 32)
    seen = set()
    for case in AOT_CASES:
        for fn, grid, args, kwargs in record_launches(*case):
            sig, ce, attrs, opts = aot._specialize(fn, args, kwargs, target)
            key = (fn.__name__, repr(sig), repr(ce), repr(sorted(attrs.items())), repr(sorted(opts.items())))
            if key in seen:
                continue
            seen.add(key)
            k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=ce, attrs=attrs), target=target, options=opts)
            ptx, res = k.asm["ptx"], aot._resources(k.asm["cubin"])
            print(json.dumps(dict(
                case="M{}-K{}-N{}-G{}-{}{}".format(*case[:5], "-T" if case[5] else ""), kernel=fn.__name__, grid=list(grid),
                tile=[ce.get("BLOCK_M"), ce.get("BLOCK_N"), ce.get("BLOCK_K")], scale_mode=ce.get("SCALE_MODE"),
                wgmma=len(re.findall(r"\bwgmma\.mma_async", ptx)), mma=len(re.findall(r"\bmma\.sync", ptx)),
                atomics=len(re.findall(r"\b(?:red|atom)(?:\.[a-z0-9_]+)*\.add\b", ptx)),
                num_warps=k.metadata.num_warps, smem=k.metadata.shared, **res,
                ctas_per_sm=aot.ctas_per_sm(res["regs"], k.metadata.num_warps, k.metadata.shared),
            )), flush=True)


def test_launches_depend_on_shapes_only():
    """The wrapper runs on the meta device (any host read of a value would raise there)."""
    def launches(*case):
        return [(fn.__name__, grid) for fn, grid, _, _ in record_launches(*case)]

    # decode, 1024 columns: 16 column tiles x 12 chunks of 512 rows, then the fixed-order sum
    assert launches(1, 6144, 1024, 8, "bf16", False) == [("_int8_linear_kernel", (16, 12)),
                                                         ("_int8_linear_reduce_kernel", (1,))]
    assert launches(8192, 6144, 6144, 1, "bf16", True) == [("_int8_linear_kernel", (3072, 1))]


def test_compiles_for_sm90():
    env = dict(os.environ, TRITON_INTERPRET="0")
    proc = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    gemms = [r for r in results if r["kernel"] == "_int8_linear_kernel"]
    assert len(gemms) >= 8 and any(r["kernel"] == "_int8_linear_reduce_kernel" for r in results)
    for r in results:
        assert r["spill_bytes"] == 0 and r["atomics"] == 0 and r["ctas_per_sm"] >= 1, r
    for r in gemms:
        bf16 = "bf16" in r["case"]
        if bf16 and r["tile"][0] >= 64:
            assert r["wgmma"] > 0, r  # Hopper tensor cores at 64+ row tiles
        elif bf16:
            assert r["mma"] > 0, r  # 16-row decode tiles: mma.sync
        else:
            assert r["wgmma"] == 0 and r["mma"] == 0, r  # fp32 "ieee": FMA, no tf32


if __name__ == "__main__":
    _compile_all()
