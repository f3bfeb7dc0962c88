"""Ahead-of-time compilation of the Triton kernels, exactly as the model launches them, without a GPU.

    python -m grok_torch.kernels.aot            # the release path, every tile regime (see below)
    python -m grok_torch.kernels.aot --full     # every variant the wrappers can launch at Grok-1 shapes
    python -m grok_torch.kernels.aot --table    # the same as a table instead of JSON lines
    python -m grok_torch.kernels.aot --arch 80  # another target (default sm_90, the H100)
    python -m grok_torch.kernels.aot --only attn,linear   # some kinds only: moe, linear, attn, attn-train

Four kinds of scenario, at Grok-1 shapes (d_model 6144; 48 q heads over 8 kv heads of 128):
  * moe: `fused_moe_triton` (routing, grouped GEMMs, combine; backward when training), F = 32768 and
    4096. Release: int8 weights, bf16 compute, inference. --full: bf16/fp16/fp32, int8 and float
    weights, the atomic combine, frozen experts (x grads only), full training (weight grads) and
    expert LoRA (rank LORA_RANK adapters on w1/w3/w2: the fp32 low-rank GEMMs, the up/down GEMMs
    that add their deltas, the adapters' gradients; inference and training).
  * linear: `int8_linear_triton` for the four attention projections wq, wk, wv (6144 -> 6144, 1024,
    1024) and wo (6144 -> 6144), int8 with the release K groups (1, 1, 1, 8), fp32 x (as the model
    passes it), at each token count of TOKENS, precision fp32 (the model's default) and bf16.
    --full adds 8 tokens (decode with 8 sequences) and transpose=True (grad_input, for training).
  * attn: `flash_attention_triton`, fp32 q (as the model passes it): decode (T=1) over the whole
    preallocated bf16 KV cache (S=8192), prefill T=512/2048/8192 over it, precision fp32 and bf16.
    --full adds fp32 and fp16 caches, speculative decode (T=4, 8), and prefill without a cache (fp32
    K/V of the T tokens themselves, S = T).
  * attn-train: `attention(impl="triton")` while autograd records, as the model trains (fp32 q, k, v
    requiring grad, no cache, S = T = 4096, precision fp32 and bf16): the forward with its row
    statistics (STATS), then the backward's dK/dV (`-dkdv`) and dQ (`-dq`) kernels. --full adds T =
    512, 2048, 8192 (the same kernels at other lengths).

The variants are not a hand-kept list: `record_launches` runs the wrappers on the `meta` device with
the kernel objects (in ops.py, flash_attention.py, int8_linear.py) swapped for recorders, so every
launch they make (tile config, flags, dtypes, grid) is captured without touching memory. Each launch
is then specialised the way Triton's JIT specialises it at run time (integer arguments equal to 1
become constants, multiples of 16 and pointers get a divisibility hint): a compile without that, as a
hand-written signature gives, is a different and much worse kernel (it cannot vectorise along unit
strides and spills registers), so it would check the wrong thing. Scenarios that launch the same
specialisation share one variant: the MoE variants are named by role and tile, the attention and
linear ones by the first scenario that launches them (`attn-decode-S8192-bf16cache-fp32`,
`linear-wq-T1-fp32`; `-dx` is the transposed grad_input product), with the number of scenarios each
serves in the output.

For each distinct variant it reports (JSON lines, or a table): compile seconds; the tensor-core
instructions in the PTX (`wgmma` on sm_90, `mma` on sm_80); atomic adds (`red`/`atom ... .add`: only
the deterministic=False MoE down GEMM, EPILOGUE 3, may have any); and from the cubin (`cuobjdump
--dump-resource-usage`, shipped with Triton) registers per thread, spilled bytes (stack + local),
shared memory per CTA and the CTAs per SM those allow on an H100-class SM. `is_gemm` marks the
kernels built on tl.dot (the MoE GEMMs, the int8 linear, attention) and `cdtype` their operand dtype:
the 16-bit ones must use tensor cores, the fp32 ones none (exact fp32, input_precision="ieee").
tests/test_kernels_aot.py checks all of it in a subprocess with the interpreter off, because
TRITON_INTERPRET=1 (which the test process sets on CPU-only machines, tests/conftest.py) makes
`triton.jit` return interpreter objects that cannot be compiled. Importing grok_torch.kernels never
sets it, so this command works on a CPU-only machine as long as the environment does not.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import re
import subprocess
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field

# Rank of the expert-LoRA scenarios (grok_torch.lora's default-sized adapters; below every tile).
LORA_RANK = 16
# Grok-1's MoE layer: the whole layer on one GPU (F=32768) and an 8-way slice of every expert (F=4096).
GROK1 = dict(D=6144, E=8, top_k=2)
FFN_SIZES = (32768, 4096)
# One T per tile regime of ops.gemm_config (rows per expert = T * top_k / E): decode (two Ts: the
# padding count differs), small, medium, prefill. Kept in step with gemm_config by the test.
TOKENS = (1, 64, 256, 2048, 4096)

# Grok-1's attention sublayer (grok_torch/config.py CONFIGS["grok-1"] and QUANT_GROUPS; the test checks).
ATTN = dict(D=6144, Hq=48, Hkv=8, dh=128, max_len=8192, scale=128 ** -0.5, cap=30.0)
# projection: (K, N, G) of the released [in, out] int8 weight and its K groups
PROJECTIONS = {"wq": (6144, 6144, 1), "wk": (6144, 1024, 1), "wv": (6144, 1024, 1), "wo": (6144, 6144, 8)}
PREFILL = (512, 2048, 8192)  # attention prefill lengths; decode is T=1 (and 4, 8 speculative: --full)
# attention training (forward with row statistics + backward): the fine-tuning estimate's sequence
# (bench_finetune.py, seq 4096); --full adds the other prefill lengths (the same kernels, other T)
TRAIN_SEQ = (4096,)
KINDS = ("moe", "linear", "attn", "attn-train")

# sm_90 per-SM limits (CUDA occupancy rules) for the CTAs-per-SM figure.
SM90 = dict(regs=65536, smem=233472, smem_per_cta_max=232448, smem_reserved=1024, warps=64, ctas=32)

# module -> the kernel objects its wrappers launch through (swapped for recorders while recording)
_KERNELS = {
    "ops": ("_router_topk_kernel", "_align_kernel", "_moe_gemm_kernel", "_combine_kernel", "_moe_wgrad_kernel"),
    "flash_attention": ("_flash_attn_kernel", "_flash_attn_bwd_dkdv_kernel", "_flash_attn_bwd_dq_kernel"),
    "int8_linear": ("_int8_linear_kernel", "_int8_linear_reduce_kernel"),
}
# where each kernel is defined (the JITFunction to compile)
_DEFINED_IN = ("grouped_gemm", "routing", "flash_attention", "int8_linear")
_ATTN_KERNELS = ("_flash_attn_kernel", "_flash_attn_bwd_dkdv_kernel", "_flash_attn_bwd_dq_kernel")
_DOT_KERNELS = ("_moe_gemm_kernel", "_moe_wgrad_kernel", "_int8_linear_kernel") + _ATTN_KERNELS


@dataclass(frozen=True)
class Scenario:
    """One call of fused_moe: shape, dtypes and mode."""

    T: int
    F: int = 32768
    compute: str = "bf16"  # bf16 | fp16 | fp32
    weights: str = "int8"  # int8 (release layout, G = 1, 1, 8) | float (the compute dtype)
    deterministic: bool = True
    train: str = "none"  # none | x (frozen experts) | weights (experts trained too; float only)
    #                      | lora (frozen experts + ExpertLoRA: a no-grad forward, then forward + backward)

    @property
    def name(self) -> str:
        det = "" if self.deterministic else "-atomic"
        tr = "" if self.train == "none" else f"-train-{self.train}"
        return f"T{self.T}-F{self.F}-{self.compute}-{self.weights}{det}{tr}"


@dataclass(frozen=True)
class LinearScenario:
    """One int8_linear_triton call of an attention projection: x [T, in] fp32 @ deq(w) (or @ deq(w)^T)."""

    proj: str  # wq | wk | wv | wo (PROJECTIONS)
    T: int  # tokens: rows of x
    precision: str = "fp32"  # fp32 (the model's default) | bf16
    transpose: bool = False  # the backward's grad_input: dy [T, out] @ deq(w)^T

    @property
    def name(self) -> str:
        return f"linear-{self.proj}-T{self.T}-{self.precision}" + ("-dx" if self.transpose else "")


@dataclass(frozen=True)
class AttnScenario:
    """One flash_attention_triton call of the model: one sequence, T queries (fp32, as the model gives them)."""

    T: int
    kv: str = "bf16cache"  # bf16cache | fp32cache | fp16cache: the whole preallocated cache (S = max_len);
    #                        fp32kv: no cache, the T tokens' own fp32 K/V (S = T)
    precision: str = "fp32"  # fp32 (the model's default) | bf16
    train: bool = False  # q, k, v require grad: attention(impl="triton") forward (+ row stats) and backward

    @property
    def S(self) -> int:
        return self.T if self.kv == "fp32kv" else ATTN["max_len"]

    @property
    def name(self) -> str:
        if self.train:
            return f"attn-train-T{self.T}-S{self.S}-{self.kv}-{self.precision}"
        if self.T <= 8:  # decode: one token (a few when speculating) over the cache
            step = "decode" + ("" if self.T == 1 else f"-T{self.T}")
        else:
            step = f"prefill-T{self.T}"
        return f"attn-{step}-S{self.S}-{self.kv}-{self.precision}"


def _kind(sc) -> str:
    if isinstance(sc, AttnScenario):
        return "attn-train" if sc.train else "attn"
    return {Scenario: "moe", LinearScenario: "linear"}[type(sc)]


def scenarios(full: bool = False, kinds: tuple = KINDS) -> list:
    """The release path of each kind (see the module docstring); full: every mode."""
    out: list = []
    precs = ("fp32", "bf16")
    if "moe" in kinds:
        if not full:
            out += [Scenario(T, F) for F in FFN_SIZES for T in TOKENS]
        else:
            for F in FFN_SIZES:
                for T in TOKENS:
                    for cd in ("bf16", "fp16", "fp32"):
                        for w in ("int8", "float"):
                            for det in (True, False):
                                for train in ("none", "x") + (("weights",) if w == "float" else ()) + ("lora",):
                                    out.append(Scenario(T, F, cd, w, det, train))
    if "linear" in kinds:
        tokens = sorted(TOKENS + (8,)) if full else TOKENS
        out += [LinearScenario(p, T, prec, tr) for tr in ((False, True) if full else (False,))
                for p in PROJECTIONS for T in tokens for prec in precs]
    if "attn" in kinds:
        caches = ("bf16cache", "fp32cache", "fp16cache") if full else ("bf16cache",)
        out += [AttnScenario(T, kv, prec) for T in ((1, 4, 8) if full else (1,)) for kv in caches for prec in precs]
        out += [AttnScenario(T, kv, prec) for T in PREFILL for kv in caches + (("fp32kv",) if full else ())
                for prec in precs]
    if "attn-train" in kinds:  # training has no cache: the T tokens' own fp32 K/V, as the model gives them
        out += [AttnScenario(T, "fp32kv", prec, train=True) for T in sorted(set(TRAIN_SEQ + (PREFILL if full else ())))
                for prec in precs]
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
    """Every kernel object the wrappers launch through (MoE, attention, int8 linear) replaced by a recorder."""
    saved = [(importlib.import_module(f"{__package__}.{mod}"), name) for mod, names in _KERNELS.items()
             for name in names]
    saved = [(m, name, getattr(m, name)) for m, name in saved]
    try:
        for m, name, fn in saved:
            setattr(m, name, _Recorder(fn, log))
        yield
    finally:
        for m, name, fn in saved:
            setattr(m, name, fn)


def record_launches(sc) -> list:
    """Every kernel launch of one scenario (MoE: forward, and backward when training; linear and
    attention: the one call), on the meta device: shapes, strides and dtypes are real, no memory is
    touched, nothing runs. Returns [(jit_function, grid, args, kwargs)] in launch order.
    """
    log: list = []
    with _recording(log):
        {"moe": _run_moe, "linear": _run_linear, "attn": _run_attn, "attn-train": _run_attn}[_kind(sc)](sc)
    return log


def _run_moe(sc: Scenario) -> None:
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
    if sc.train == "lora":
        from .reference import ExpertLoRA

        r = LORA_RANK
        lora = ExpertLoRA(*[tuple(torch.empty(E, *s, dtype=torch.float32, requires_grad=True, **meta) for s in ss)
                            for ss in (((D, r), (r, sc.F)), ((D, r), (r, sc.F)), ((sc.F, r), (r, D)))], scale=2.0)
        kw = dict(top_k=k, scales=scales, compute_dtype=dt, deterministic=sc.deterministic, lora=lora)
        with torch.no_grad():  # inference with unmerged adapters
            fused_moe_triton(x, router_w, w1, w3, w2, **kw)
        out, _, _ = fused_moe_triton(x, router_w, w1, w3, w2, **kw)
        out.backward(torch.empty_like(out))
        return
    with torch.set_grad_enabled(sc.train != "none"):
        out, _, _ = fused_moe_triton(x, router_w, w1, w3, w2, top_k=k, scales=scales, compute_dtype=dt,
                                     deterministic=sc.deterministic)
        if sc.train != "none":
            out.backward(torch.empty_like(out))


def _run_linear(sc: LinearScenario) -> None:
    import torch

    from .int8_linear import int8_linear_triton

    K, N, G = PROJECTIONS[sc.proj]
    meta = dict(device="meta")
    x = torch.empty(sc.T, N if sc.transpose else K, dtype=torch.float32, **meta)  # the model's x (and dy) are fp32
    w = torch.empty(K, N, dtype=torch.int8, **meta)
    scales = torch.empty(G, N, dtype=torch.bfloat16, **meta)
    int8_linear_triton(x, w, scales, precision=sc.precision, transpose=sc.transpose)


def _run_attn(sc: AttnScenario) -> None:
    import torch

    from .attention import attention
    from .flash_attention import flash_attention_triton

    Hq, Hkv, dh, S = ATTN["Hq"], ATTN["Hkv"], ATTN["dh"], sc.S
    meta = dict(device="meta")
    kv_dtype = {"bf16cache": torch.bfloat16, "fp32cache": torch.float32, "fp16cache": torch.float16,
                "fp32kv": torch.float32}[sc.kv]
    q = torch.empty(1, sc.T, Hq, dh, dtype=torch.float32, **meta)
    k, v = (torch.empty(1, S, Hkv, dh, dtype=kv_dtype, **meta) for _ in range(2))  # a layer's cache, or K/V
    q_pos = torch.empty(1, sc.T, dtype=torch.int64, **meta)
    key_valid = torch.empty(1, S, dtype=torch.bool, **meta)
    if sc.train:  # the dispatcher as the model calls it while autograd records: forward + stats, then backward
        for x in (q, k, v):
            x.requires_grad_(True)
        out = attention(q, k, v, q_pos, key_valid, scale=ATTN["scale"], cap=ATTN["cap"], precision=sc.precision,
                        impl="triton")
        out.backward(torch.empty_like(out))
        return
    flash_attention_triton(q, k, v, q_pos, key_valid, scale=ATTN["scale"], cap=ATTN["cap"], precision=sc.precision)


def _require_compilable(fn) -> None:
    """Interpreter objects have neither the parameters to specialise nor anything to compile: say why."""
    from triton.runtime.jit import JITFunction

    if not isinstance(fn, JITFunction):
        raise RuntimeError(f"{getattr(fn, '__name__', fn)} was defined under Triton's interpreter (TRITON_INTERPRET=1 "
                           "in the environment); the AOT check compiles real kernels: run it without TRITON_INTERPRET=1")


def _specialize(fn, args, kwargs, target):
    """(signature, constexprs, attrs, options) as Triton's JIT builds them for these arguments."""
    from triton._C.libtriton import native_specialize_impl
    from triton.compiler.compiler import make_backend

    _require_compilable(fn)

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


def _describe(kernel: str, sig: dict, c: dict, options: dict, sc=None) -> str:
    """A readable variant name: MoE by role, tile, compute dtype and weight kind; attention and the
    int8 linear by the scenario that first launches them (`sc`)."""
    dt = getattr(c.get("CDTYPE"), "name", "")
    if kernel == "_int8_linear_reduce_kernel":
        return f"linear-reduce-b{c['BLOCK']}"
    if kernel == "_int8_linear_kernel" or kernel in _ATTN_KERNELS:
        return sc.name + {"_flash_attn_bwd_dkdv_kernel": "-dkdv", "_flash_attn_bwd_dq_kernel": "-dq"}.get(kernel, "")
    if kernel == "_router_topk_kernel":
        return f"router-E{c['E_PAD']}-k{c['TOP_K']}"
    if kernel == "_align_kernel":
        return f"align-E{c['E_PAD']}-m{c['BLOCK_M']}"
    if kernel == "_combine_kernel":
        return f"combine-k{c['TOP_K']}-{sig['out_ptr'].lstrip('*')}"
    # the LoRA-only launches (low-rank GEMMs, adapter grads) first appear in a lora scenario
    lora = "lora-" if isinstance(sc, Scenario) and sc.train == "lora" else ""
    if kernel == "_moe_wgrad_kernel":
        return f"{lora}wgrad-{'w2' if c['B_GATED'] else 'w13'}-{dt}"
    role = {1: "up", 2: "down", 3: "down-atomic"}.get(c["EPILOGUE"]) or (lora + ("bwd-dA" if c["A_BY_TOKEN"] else "bwd-dx"))
    if c.get("PREACT_IN"):
        role += "-lora"
    if c.get("STORE_PREACT"):
        role += "-train"
    tile = f"m{c['BLOCK_M']}n{c['BLOCK_N']}k{c['BLOCK_K']}w{options.get('num_warps', 4)}s{options.get('num_stages', 3)}"
    return f"{role}-{tile}-{dt}-{'int8' if c['SCALE_MODE'] else 'float'}"


def variants(full: bool = False, arch: int = 90, kinds: tuple = KINDS) -> list[Variant]:
    """The distinct kernel specialisations launched over `scenarios(full, kinds)`."""
    from triton.backends.compiler import GPUTarget

    target = GPUTarget("cuda", arch, 32)
    found: dict = {}
    for sc in scenarios(full, kinds):
        for fn, _grid, args, kwargs in record_launches(sc):
            sig, ce, attrs, opts = _specialize(fn, args, kwargs, target)
            v = Variant(_describe(fn.__name__, sig, ce, opts, sc), fn.__name__, sig, ce, attrs, opts)
            v = found.setdefault(v.key, v)
            v.scenarios.append(sc.name)
    out = list(found.values())
    seen: dict = {}
    for v in out:  # same readable name, another specialisation (T*k not a multiple of 16, say): name its first T
        seen[v.name] = seen.get(v.name, 0) + 1
        if seen[v.name] > 1:
            v.name += "@" + (v.scenarios[0].split("-")[0] if v.scenarios[0][0] == "T" else v.scenarios[0])
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

    mods = [importlib.import_module(f"{__package__}.{m}") for m in _DEFINED_IN]
    fn = next(getattr(m, v.kernel) for m in mods if hasattr(m, v.kernel))
    _require_compilable(fn)  # a worker process defines the kernels anew
    t0 = time.time()
    k = triton.compile(ASTSource(fn=fn, signature=v.signature, constexprs=v.constexprs, attrs=v.attrs),
                       target=GPUTarget("cuda", arch, 32), options=v.options)
    ptx = k.asm["ptx"]
    res = _resources(k.asm["cubin"])
    num_warps = k.metadata.num_warps
    c = v.constexprs
    return dict(
        name=v.name, kernel=v.kernel, seconds=round(time.time() - t0, 1), is_gemm=v.kernel in _DOT_KERNELS,
        epilogue=c.get("EPILOGUE"), cdtype=getattr(c.get("CDTYPE", c.get("OPERAND")), "name", None),
        block_m=c.get("BLOCK_M"),
        wgmma=len(re.findall(r"\bwgmma\.mma_async", ptx)), mma=len(re.findall(r"\bmma\.sync", ptx)),
        atomics=len(re.findall(r"\b(?:red|atom)(?:\.[a-z0-9_]+)*\.add\b", ptx)),
        num_warps=num_warps, smem=k.metadata.shared, **res,
        ctas_per_sm=ctas_per_sm(res["regs"], num_warps, k.metadata.shared),
        scenarios=len(v.scenarios),
    )


def _compile_star(args):
    return compile_variant(*args)


def main(*, full: bool = False, arch: int = 90, jobs: int | None = None, table: bool = False,
         kinds: tuple = KINDS) -> list[dict]:
    vs = variants(full, arch, kinds)
    jobs = jobs or min(len(vs), os.cpu_count() or 1)
    results = []
    width = max([len(v.name) for v in vs] + [7])
    if table:
        print(f"{'variant':{width}s} {'regs':>4s} {'spill':>5s} {'smem KB':>7s} {'CTA/SM':>6s} {'wgmma':>5s} {'mma':>4s} "
              f"{'atom':>4s} {'scen':>4s} {'sec':>5s}")
    with ProcessPoolExecutor(jobs) as pool:
        for r in pool.map(_compile_star, [(v, arch) for v in vs]):
            if table:
                print(f"{r['name']:{width}s} {r['regs']:4d} {r['spill_bytes']:5d} {r['smem'] / 1024:7.0f} {r['ctas_per_sm']:6d} "
                      f"{r['wgmma']:5d} {r['mma']:4d} {r['atomics']:4d} {r['scenarios']:4d} {r['seconds']:5.1f}", flush=True)
            else:
                print(json.dumps(r), flush=True)
            results.append(r)
    return results


if __name__ == "__main__":
    p = argparse.ArgumentParser(prog="python -m grok_torch.kernels.aot", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--full", action="store_true", help="every variant, not just the release path")
    p.add_argument("--arch", type=int, default=90, help="CUDA compute capability, e.g. 90 (H100) or 80 (A100)")
    p.add_argument("--jobs", type=int, default=None, help="parallel compiles (default: CPU count)")
    p.add_argument("--table", action="store_true", help="a readable table instead of JSON lines")
    p.add_argument("--only", default=",".join(KINDS), help=f"comma-separated kinds among {','.join(KINDS)} (default: all)")
    a = p.parse_args()
    only = tuple(k.strip() for k in a.only.split(",") if k.strip())
    if not only or set(only) - set(KINDS):
        p.error(f"--only takes kinds among {', '.join(KINDS)}, got {a.only!r}")
    main(full=a.full, arch=a.arch, jobs=a.jobs, table=a.table, kinds=only)
