"""Ahead-of-time compilation of the MoE kernels, exactly as fused_moe launches them, without a GPU.

    python -m grok_torch.kernels.aot            # the release path (int8 + bf16, inference), every tile regime
    python -m grok_torch.kernels.aot --full     # every variant fused_moe can launch (dtypes, atomics, training)
    python -m grok_torch.kernels.aot --table    # the same as a table instead of JSON lines
    python -m grok_torch.kernels.aot --arch 80  # another target (default sm_90, the H100)

The variants are not a hand-kept list: `record_launches` runs `fused_moe_triton` (and, for training
scenarios, its backward) at Grok-1 shapes on the `meta` device with the kernel objects swapped for
recorders, so every launch the wrappers make (tile config, flags, dtypes, grid) is captured without
touching memory. Each launch is then specialised the way Triton's JIT specialises it at run time
(integer arguments equal to 1 become constants, multiples of 16 and pointers get a divisibility hint):
a compile without that, as a hand-written signature gives, is a different and much worse kernel
(it cannot vectorise along unit strides and spills registers), so it would check the wrong thing.

For each distinct variant it reports (JSON lines, or a table): compile seconds; the tensor-core
instructions in the PTX (`wgmma` on sm_90, `mma` on sm_80); atomic adds (`red`/`atom ... .add`: only
the deterministic=False down GEMM, EPILOGUE 3, may have any); and from the cubin (`cuobjdump
--dump-resource-usage`, shipped with Triton) registers per thread, spilled bytes (stack + local),
shared memory per CTA and the CTAs per SM those allow on an H100-class SM. tests/test_kernels_aot.py
checks all of it in a subprocess with the interpreter off, because TRITON_INTERPRET (set on CPU-only
machines) makes `triton.jit` return interpreter objects that cannot be compiled.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import subprocess
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field

# Grok-1's MoE layer: the whole layer on one GPU (F=32768) and an 8-way slice of every expert (F=4096).
GROK1 = dict(D=6144, E=8, top_k=2)
FFN_SIZES = (32768, 4096)
# One T per tile regime of ops.gemm_config (rows per expert = T * top_k / E): decode (two Ts: the
# padding count differs), small, medium, prefill. Kept in step with gemm_config by the test.
TOKENS = (1, 64, 256, 2048, 4096)

# sm_90 per-SM limits (CUDA occupancy rules) for the CTAs-per-SM figure.
SM90 = dict(regs=65536, smem=233472, smem_per_cta_max=232448, smem_reserved=1024, warps=64, ctas=32)

_KERNELS = ("_router_topk_kernel", "_align_kernel", "_moe_gemm_kernel", "_combine_kernel", "_moe_wgrad_kernel")


@dataclass(frozen=True)
class Scenario:
    """One call of fused_moe: shape, dtypes and mode."""

    T: int
    F: int = 32768
    compute: str = "bf16"  # bf16 | fp16 | fp32
    weights: str = "int8"  # int8 (release layout, G = 1, 1, 8) | float (the compute dtype)
    deterministic: bool = True
    train: str = "none"  # none | x (frozen experts: LoRA) | weights (experts trained too; float only)

    @property
    def name(self) -> str:
        det = "" if self.deterministic else "-atomic"
        tr = "" if self.train == "none" else f"-train-{self.train}"
        return f"T{self.T}-F{self.F}-{self.compute}-{self.weights}{det}{tr}"


def scenarios(full: bool = False) -> list[Scenario]:
    """The release path (int8 weights, bf16 compute, inference) for every regime; full: every mode."""
    if not full:
        return [Scenario(T, F) for F in FFN_SIZES for T in TOKENS]
    out = []
    for F in FFN_SIZES:
        for T in TOKENS:
            for cd in ("bf16", "fp16", "fp32"):
                for w in ("int8", "float"):
                    for det in (True, False):
                        for train in ("none", "x") + (("weights",) if w == "float" else ()):
                            out.append(Scenario(T, F, cd, w, det, train))
    return out


@dataclass
class Variant:
    """One kernel specialisation: what triton.compile needs, and a readable name."""

    name: str
    kernel: str
    signature: dict
    constexprs: dict
    attrs: dict
    options: dict
    scenarios: list = field(default_factory=list)

    @property
    def key(self):
        return (self.kernel, tuple(self.signature.items()), tuple((k, repr(v)) for k, v in self.constexprs.items()),
                tuple(sorted((k, repr(v)) for k, v in self.attrs.items())), tuple(sorted(self.options.items())))


class _Recorder:
    def __init__(self, fn, log):
        self.fn, self.log = fn, log

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.log.append((self.fn, grid, args, kwargs))


@contextlib.contextmanager
def _recording(log):
    from . import ops

    saved = {name: getattr(ops, name) for name in _KERNELS}
    try:
        for name, fn in saved.items():
            setattr(ops, name, _Recorder(fn, log))
        yield
    finally:
        for name, fn in saved.items():
            setattr(ops, name, fn)


def record_launches(sc: Scenario) -> list:
    """Every kernel launch of fused_moe_triton (forward, and backward when training) for a scenario.

    Runs on the meta device: shapes, strides and dtypes are real, no memory is touched, nothing runs.
    Returns [(jit_function, grid, args, kwargs)] in launch order.
    """
    import torch

    from .ops import fused_moe_triton

    dt = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[sc.compute]
    D, E, k = GROK1["D"], GROK1["E"], GROK1["top_k"]
    meta = dict(device="meta")
    wdt = torch.int8 if sc.weights == "int8" else dt
    w_grad = sc.train == "weights"
    x = torch.empty(sc.T, D, dtype=torch.float32, requires_grad=sc.train != "none", **meta)
    router_w = torch.empty(D, E, dtype=torch.float32, **meta)
    w1, w3 = (torch.empty(E, D, sc.F, dtype=wdt, requires_grad=w_grad, **meta) for _ in range(2))
    w2 = torch.empty(E, sc.F, D, dtype=wdt, requires_grad=w_grad, **meta)
    scales = None
    if sc.weights == "int8":
        scales = tuple(torch.empty(E, g, n, dtype=torch.bfloat16, **meta) for g, n in ((1, sc.F), (1, sc.F), (8, D)))
    log = []
    with _recording(log), torch.set_grad_enabled(sc.train != "none"):
        out, _, _ = fused_moe_triton(x, router_w, w1, w3, w2, top_k=k, scales=scales, compute_dtype=dt,
                                     deterministic=sc.deterministic)
        if sc.train != "none":
            out.backward(torch.empty_like(out))
    return log


def _specialize(fn, args, kwargs, target):
    """(signature, constexprs, attrs, options) as Triton's JIT builds them for these arguments."""
    from triton._C.libtriton import native_specialize_impl
    from triton.compiler.compiler import make_backend

    backend = make_backend(target)
    bound = dict(zip(fn.arg_names, args))
    bound.update({k: v for k, v in kwargs.items() if k in fn.arg_names})
    options = {k: v for k, v in kwargs.items() if k not in fn.arg_names}
    signature, constexprs, attrs = {}, {}, {}
    for i, p in enumerate(fn.params):
        value = bound[p.name] if p.name in bound else p.default
        if p.is_constexpr:
            signature[p.name], constexprs[p.name] = "constexpr", value
            continue
        ty, attr = native_specialize_impl(
            type(backend), value, p.is_const, not getattr(p, "do_not_specialize", False),
            not getattr(p, "do_not_specialize_on_alignment", False),
        )
        if ty == "constexpr":  # an integer equal to 1
            signature[p.name], constexprs[p.name] = "constexpr", attr
            continue
        signature[p.name] = ty
        if attr:
            attrs[(i,)] = backend.parse_attr(attr)
    return signature, constexprs, attrs, options


def _describe(kernel: str, sig: dict, c: dict, options: dict) -> str:
    """A readable variant name: role, tile, compute dtype, weight kind."""
    dt = getattr(c.get("CDTYPE"), "name", "")
    if kernel == "_router_topk_kernel":
        return f"router-E{c['E_PAD']}-k{c['TOP_K']}"
    if kernel == "_align_kernel":
        return f"align-E{c['E_PAD']}-m{c['BLOCK_M']}"
    if kernel == "_combine_kernel":
        return f"combine-k{c['TOP_K']}-{sig['out_ptr'].lstrip('*')}"
    if kernel == "_moe_wgrad_kernel":
        return f"wgrad-{'w2' if c['B_GATED'] else 'w13'}-{dt}"
    role = {1: "up", 2: "down", 3: "down-atomic"}.get(c["EPILOGUE"]) or ("bwd-dA" if c["A_BY_TOKEN"] else "bwd-dx")
    if c.get("STORE_PREACT"):
        role += "-train"
    tile = f"m{c['BLOCK_M']}n{c['BLOCK_N']}k{c['BLOCK_K']}w{options.get('num_warps', 4)}s{options.get('num_stages', 3)}"
    return f"{role}-{tile}-{dt}-{'int8' if c['SCALE_MODE'] else 'float'}"


def variants(full: bool = False, arch: int = 90) -> list[Variant]:
    """The distinct kernel specialisations fused_moe launches over `scenarios(full)`."""
    from triton.backends.compiler import GPUTarget

    target = GPUTarget("cuda", arch, 32)
    found: dict = {}
    for sc in scenarios(full):
        for fn, _grid, args, kwargs in record_launches(sc):
            sig, ce, attrs, opts = _specialize(fn, args, kwargs, target)
            v = Variant(_describe(fn.__name__, sig, ce, opts), fn.__name__, sig, ce, attrs, opts)
            v = found.setdefault(v.key, v)
            v.scenarios.append(sc.name)
    out = list(found.values())
    seen: dict = {}
    for v in out:  # same readable name, another specialisation (T*k not a multiple of 16, say): name its first T
        seen[v.name] = seen.get(v.name, 0) + 1
        if seen[v.name] > 1:
            v.name += "@" + v.scenarios[0].split("-")[0]
    return out


def _resources(cubin: bytes) -> dict:
    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True, check=True).stdout
    got = {k: int(v) for k, v in re.findall(r"\b(REG|STACK|LOCAL):(\d+)", text)}
    return dict(regs=got["REG"], spill_bytes=got["STACK"] + got["LOCAL"])


def ctas_per_sm(regs: int, num_warps: int, smem: int) -> int:
    """Resident CTAs per sm_90 SM allowed by registers, shared memory, warps and the CTA cap."""
    warp_regs = -(-regs * 32 // 256) * 256  # allocated per warp in units of 256
    by_regs = SM90["regs"] // (warp_regs * num_warps)
    by_smem = SM90["smem"] // (smem + SM90["smem_reserved"])
    return min(by_regs, by_smem, SM90["warps"] // num_warps, SM90["ctas"])


def compile_variant(v: Variant, arch: int = 90) -> dict:
    """Compile one variant for cuda:arch; report its PTX instructions and resource use."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from . import grouped_gemm, routing

    fn = getattr(grouped_gemm, v.kernel, None) or getattr(routing, v.kernel)
    if not isinstance(fn, triton.runtime.jit.JITFunction):
        raise RuntimeError("kernels were defined under TRITON_INTERPRET=1; run with TRITON_INTERPRET=0")
    t0 = time.time()
    k = triton.compile(ASTSource(fn=fn, signature=v.signature, constexprs=v.constexprs, attrs=v.attrs),
                       target=GPUTarget("cuda", arch, 32), options=v.options)
    ptx = k.asm["ptx"]
    res = _resources(k.asm["cubin"])
    num_warps = k.metadata.num_warps
    c = v.constexprs
    return dict(
        name=v.name, kernel=v.kernel, seconds=round(time.time() - t0, 1), is_gemm=v.kernel in ("_moe_gemm_kernel", "_moe_wgrad_kernel"),
        epilogue=c.get("EPILOGUE"), cdtype=getattr(c.get("CDTYPE"), "name", None),
        wgmma=len(re.findall(r"\bwgmma\.mma_async", ptx)), mma=len(re.findall(r"\bmma\.sync", ptx)),
        atomics=len(re.findall(r"\b(?:red|atom)(?:\.[a-z0-9_]+)*\.add\b", ptx)),
        num_warps=num_warps, smem=k.metadata.shared, **res,
        ctas_per_sm=ctas_per_sm(res["regs"], num_warps, k.metadata.shared),
        scenarios=len(v.scenarios),
    )


def _compile_star(args):
    return compile_variant(*args)


def main(*, full: bool = False, arch: int = 90, jobs: int | None = None, table: bool = False) -> list[dict]:
    vs = variants(full, arch)
    jobs = jobs or min(len(vs), os.cpu_count() or 1)
    results = []
    if table:
        print(f"{'variant':40s} {'regs':>4s} {'spill':>5s} {'smem KB':>7s} {'CTA/SM':>6s} {'wgmma':>5s} {'mma':>4s} {'atom':>4s}")
    with ProcessPoolExecutor(jobs) as pool:
        for r in pool.map(_compile_star, [(v, arch) for v in vs]):
            if table:
                print(f"{r['name']:40s} {r['regs']:4d} {r['spill_bytes']:5d} {r['smem'] / 1024:7.0f} {r['ctas_per_sm']:6d} "
                      f"{r['wgmma']:5d} {r['mma']:4d} {r['atomics']:4d}", flush=True)
            else:
                print(json.dumps(r), flush=True)
            results.append(r)
    return results


if __name__ == "__main__":
    p = argparse.ArgumentParser(prog="python -m grok_torch.kernels.aot", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--full", action="store_true", help="every variant, not just the int8/bf16 inference path")
    p.add_argument("--arch", type=int, default=90, help="CUDA compute capability, e.g. 90 (H100) or 80 (A100)")
    p.add_argument("--jobs", type=int, default=None, help="parallel compiles (default: CPU count)")
    p.add_argument("--table", action="store_true", help="a readable table instead of JSON lines")
    a = p.parse_args()
    main(full=a.full, arch=a.arch, jobs=a.jobs, table=a.table)
