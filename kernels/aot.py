"""Ahead-of-time compilation of the MoE kernels for a GPU target, no GPU needed.

    python -m grok_torch.kernels.aot            # the release path (int8 + bf16) for every tile config
    python -m grok_torch.kernels.aot --full     # every variant fused_moe can launch on the GPU
    python -m grok_torch.kernels.aot --arch 80  # another target (default sm_90)

Each variant is (kernel, pointer dtypes, constexprs, launch options), built from the same tile
configurations (`ops.gemm_config`) and flags the wrappers use. The output is one JSON line per
variant: its name, compile seconds, the tensor-core instructions found in its PTX (`wgmma` on
sm_90, `mma` on sm_80) and its atomic adds (`red`/`atom ... .add`: only the `down-atomic-*`
variants, the deterministic=False epilogue, have any). tests/test_kernels_aot.py runs this in a subprocess with the interpreter
off, because TRITON_INTERPRET (set on CPU-only machines) makes `triton.jit` return interpreter
objects that cannot be compiled.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field

# Tile configurations of ops.gemm_config, one per regime (kept in step by tests/test_kernels_aot.py).
TILE_CONFIGS = {
    "decode": dict(block_m=16, block_n=64, block_k=128, num_warps=4, num_stages=4),
    "small": dict(block_m=32, block_n=64, block_k=64, num_warps=4, num_stages=4),
    "medium": dict(block_m=64, block_n=128, block_k=64, num_warps=4, num_stages=3),
    "prefill": dict(block_m=128, block_n=128, block_k=64, num_warps=8, num_stages=3),
}
_TORCH_TO_TT = {"bf16": "bf16", "fp16": "fp16", "fp32": "fp32"}


@dataclass
class Variant:
    name: str
    kernel: str  # "gemm" | "wgrad" | "router" | "align" | "combine"
    ptrs: dict  # pointer argument -> Triton dtype string
    constexprs: dict
    options: dict = field(default_factory=dict)
    is_gemm: bool = False


def _gemm_variant(name, cfg, *, cd, wdtype, scale_mode, dual, epilogue, a_by_token, preact=False, a_dtype="fp32"):
    acc = "fp32"
    out = {1: cd, 2: acc, 3: acc, 0: acc}[epilogue]
    ptrs = dict(
        a_ptr=a_dtype, b_ptr=wdtype, b2_ptr=wdtype, s_ptr="bf16", s2_ptr="bf16", c_ptr=out,
        g_ptr=acc, u_ptr=acc, gate_ptr="fp32", sorted_ptr="i32", block_expert_ptr="i32",
    )
    constexprs = dict(
        TOP_K=2, A_BY_TOKEN=a_by_token, DUAL=dual, SCALE_MODE=scale_mode, EPILOGUE=epilogue,
        STORE_PREACT=preact, CDTYPE=cd, ACC=acc, DOT_PRECISION="ieee" if cd == "fp32" else "tf32",
        C1=0.796875, C2=0.044677734375,
        BLOCK_M=cfg["block_m"], BLOCK_N=cfg["block_n"], BLOCK_K=cfg["block_k"],
    )
    return Variant(name, "gemm", ptrs, constexprs, dict(num_warps=cfg["num_warps"], num_stages=cfg["num_stages"]), True)


def variants(full: bool = False) -> list[Variant]:
    """The kernel variants fused_moe launches on a GPU (full) or the Grok-1 release path (default)."""
    out = []
    cds = ["bf16", "fp16", "fp32"] if full else ["bf16"]
    for tname, cfg in TILE_CONFIGS.items():
        for cd in cds:
            wkinds = [("i8", 1), (cd, 0)] if full else [("i8", 1)]
            for wdtype, mode in wkinds:
                tag = f"{tname}-{cd}-{'int8' if mode else 'float'}"
                for preact in ([False, True] if full else [False]):
                    out.append(_gemm_variant(f"up-{tag}{'-train' if preact else ''}", cfg, cd=cd, wdtype=wdtype,
                                             scale_mode=mode, dual=True, epilogue=1, a_by_token=True, preact=preact))
                out.append(_gemm_variant(f"down-{tag}", cfg, cd=cd, wdtype=wdtype, scale_mode=mode, dual=False,
                                         epilogue=2, a_by_token=False, a_dtype=cd))
                # deterministic=False: the top-k combine as fp32 atomics in the epilogue
                out.append(_gemm_variant(f"down-atomic-{tag}", cfg, cd=cd, wdtype=wdtype, scale_mode=mode,
                                         dual=False, epilogue=3, a_by_token=False, a_dtype=cd))
                if full:  # backward: dout @ w2^T (gathered by token), dg @ w1^T (per row)
                    bmode = 2 if mode else 0
                    out.append(_gemm_variant(f"bwd-dA-{tag}", cfg, cd=cd, wdtype=wdtype, scale_mode=bmode, dual=False,
                                             epilogue=0, a_by_token=True, a_dtype=cd))
                    out.append(_gemm_variant(f"bwd-dx-{tag}", cfg, cd=cd, wdtype=wdtype, scale_mode=bmode, dual=False,
                                             epilogue=0, a_by_token=False, a_dtype=cd))
    for cd in cds:  # expert weight gradients (bf16/fp32 training), the wrapper's one tile shape
        for b_gated, a_tok in ((False, True), (True, False)):
            out.append(Variant(
                f"wgrad-{'w2' if b_gated else 'w1'}-{cd}", "wgrad",
                dict(a_ptr="fp32" if a_tok else cd, b_ptr=cd, gate_ptr="fp32", dw_ptr=cd, sorted_ptr="i32",
                     counts_ptr="i32", offsets_ptr="i32"),
                dict(TOP_K=2, A_BY_TOKEN=a_tok, B_BY_TOKEN=b_gated, B_GATED=b_gated, CDTYPE=cd, ACC="fp32",
                     DOT_PRECISION="ieee" if cd == "fp32" else "tf32", BLOCK_R=32, BLOCK_P=64, BLOCK_Q=64),
                dict(num_warps=4, num_stages=3), True,
            ))
    out.append(Variant(
        "router-E8-k2", "router",
        dict(x_ptr="fp32", w_ptr="fp32", probs_ptr="fp32", gates_ptr="fp32", ids_ptr="i32", forced_ptr="i32"),
        dict(SOFTCAP=0.0, RENORM=False, FORCED=False, TOP_K=2, K_PAD=2, E_PAD=8, BLOCK_T=16, BLOCK_D=64),
    ))
    out.append(Variant(
        "align-E8", "align",
        dict(ids_ptr="i32", sorted_ptr="i32", block_expert_ptr="i32", counts_ptr="i32", offsets_ptr="i32"),
        dict(E_PAD=8, BLOCK_M=16, CHUNK=256),
    ))
    out.append(Variant("combine-k2-bf16", "combine", dict(y_ptr="fp32", out_ptr="bf16"), dict(TOP_K=2, BLOCK_D=256)))
    return out


def compile_variant(v: Variant, arch: int = 90) -> dict:
    """Compile one variant for cuda:arch; report the tensor-core instructions in its PTX."""
    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from . import grouped_gemm, routing

    fn = {
        "gemm": grouped_gemm._moe_gemm_kernel,
        "wgrad": grouped_gemm._moe_wgrad_kernel,
        "combine": grouped_gemm._combine_kernel,
        "router": routing._router_topk_kernel,
        "align": routing._align_kernel,
    }[v.kernel]
    if not isinstance(fn, triton.runtime.jit.JITFunction):
        raise RuntimeError("kernels were defined under TRITON_INTERPRET=1; run with TRITON_INTERPRET=0")
    tt = {"bf16": tl.bfloat16, "fp16": tl.float16, "fp32": tl.float32}
    constexprs = {k: tt.get(val, val) if isinstance(val, str) and k in ("CDTYPE", "ACC") else val for k, val in v.constexprs.items()}
    signature = {}
    for name in fn.arg_names:
        if name in v.ptrs:
            signature[name] = "*" + v.ptrs[name]
        elif name in constexprs:
            signature[name] = "constexpr"
        else:
            signature[name] = "i32"  # sizes and strides (element offsets are widened in the kernel)
    t0 = time.time()
    k = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs),
                       target=GPUTarget("cuda", arch, 32), options=v.options)
    ptx = k.asm["ptx"]
    return dict(
        name=v.name, seconds=round(time.time() - t0, 1), is_gemm=v.is_gemm,
        wgmma=len(re.findall(r"\bwgmma\.mma_async", ptx)), mma=len(re.findall(r"\bmma\.sync", ptx)),
        atomics=len(re.findall(r"\b(?:red|atom)(?:\.[a-z0-9_]+)*\.add\b", ptx)),
    )


def _compile_star(args):
    return compile_variant(*args)


def main(*, full: bool = False, arch: int = 90, jobs: int | None = None) -> list[dict]:
    vs = variants(full)
    jobs = jobs or min(len(vs), os.cpu_count() or 1)
    results = []
    with ProcessPoolExecutor(jobs) as pool:
        for r in pool.map(_compile_star, [(v, arch) for v in vs]):
            print(json.dumps(r), flush=True)
            results.append(r)
    return results


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--full", action="store_true", help="every variant, not just the int8/bf16 release path")
    p.add_argument("--arch", type=int, default=90, help="CUDA compute capability, e.g. 90 (H100) or 80 (A100)")
    p.add_argument("--jobs", type=int, default=None, help="parallel compiles (default: CPU count)")
    a = p.parse_args()
    main(full=a.full, arch=a.arch, jobs=a.jobs)
