"""Launch wrappers, the autograd.Function and the Triton MoE entry point.

Forward (5 launches):   route -> align -> up GEMM (gather x, w1 and w3 in one pass, gelu*up)
                        -> down GEMM (gate in the epilogue) -> combine (slot sum, no atomics)
  deterministic=False (4 launches): the down GEMM's epilogue atomically adds gate * y (fp32) into a
                        zeroed [T, D] buffer by token, and the combine launch is skipped; the order of
                        the k additions per token is not fixed, so the bits may vary between runs.
Backward (3 GEMM launches reusing _moe_gemm_kernel with transposed weight strides, + weight grads):
    dA = dout[token] @ w2[e]^T            (int8: B tiles dequantised in the main loop)
    dgate = rowsum(dA * act);  da = gate * dA;  dg, du through gelu_tanh(g) * u   (torch, elementwise)
    dx = sum_k (dg @ w1[e]^T + du @ w3[e]^T)
    dw1 = x^T dg, dw3 = x^T du, dw2 = act^T (gate * dout) per expert, over its own rows
    (_moe_wgrad_kernel; only for weights that require grad: bf16/fp32 training).
Expert LoRA (ExpertLoRA, dropout 0): per adapted matrix 2 more grouped-GEMM launches (exact fp32
low-rank products t = scale * in @ A[e], delta = t @ B[e]) before the up / down GEMM, whose
accumulators start at the deltas; backward: 2 transposed low-rank GEMMs + 2 weight grads per matrix.
Gates stay differentiable through the router: when autograd is recording, the router probabilities
are recomputed with torch ops at the kernel's chosen experts (T x D x E, negligible), so gradients
reach x and router_w through the softmax; without autograd the kernel's probabilities are returned.

Every wrapper checks shapes and dtypes and names the offending argument.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import triton
import triton.language as tl

# Without a GPU the kernels run only under Triton's interpreter, which the user (or tests/conftest.py)
# opts into with TRITON_INTERPRET=1 before this import; every launch goes through require_launchable.
from . import require_launchable
from .grouped_gemm import _combine_kernel, _moe_gemm_kernel, _moe_wgrad_kernel
from .reference import gelu_constants, resolve_compute_dtype, route
from .routing import _align_kernel, _router_topk_kernel

__all__ = [
    "Routing",
    "GemmConfig",
    "gemm_config",
    "moe_router",
    "router_grad",
    "moe_route",
    "moe_align",
    "local_routing",
    "moe_experts_triton",
    "moe_up",
    "moe_down",
    "moe_combine",
    "moe_weight_grad",
    "moe_lora_gemm",
    "lora_config",
    "lora_args",
    "fused_moe_triton",
]

_TL_DTYPE = {
    torch.float32: tl.float32,
    torch.float16: tl.float16,
    torch.bfloat16: tl.bfloat16,
    torch.float64: tl.float64,
}


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


# ---------------------------------------------------------------------------------------------
# Tile configuration
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GemmConfig:
    """Tile shape of the grouped GEMMs. BLOCK_M also sets the padding of each expert's rows.

    preact_block_n caps the column tile of the up GEMM when it also stores the fp32 pre-activations
    for the backward: both accumulators are then live through the epilogue's stores, and a 128-wide
    tile spills registers on sm_90 (`python -m grok_torch.kernels.aot --full --table` shows it).
    """

    block_m: int = 64
    block_n: int = 64
    block_k: int = 64
    num_warps: int = 4
    num_stages: int = 3
    preact_block_n: int = 64


def gemm_config(num_tokens: int, top_k: int, num_experts: int, compute_dtype: torch.dtype = torch.bfloat16) -> GemmConfig:
    """Pick tiles from the mean rows per expert (the shape of the M dimension each expert sees).

    16-bit compute: decode (few rows) is weight-streaming, so the smallest M tile tl.dot allows (16)
    and wide K steps; prefill is compute-bound, so 128x128 tiles with 8 warps. Untuned guesses; see
    benchmarks/bench_moe.py. fp32 compute is exact fp32 (FMA, no tensor cores: a parity mode, not a
    fast path): narrow K and N steps with 8 warps, the largest tiles that compile for sm_90 without
    spilling registers (checked for every variant by tests/test_kernels_aot.py).
    """
    rows_per_expert = num_tokens * top_k / max(num_experts, 1)
    if rows_per_expert <= 16:
        block_m = 16
    elif rows_per_expert <= 64:
        block_m = 32
    elif rows_per_expert <= 512:
        block_m = 64
    else:
        block_m = 128
    if compute_dtype in (torch.float32, torch.float64):
        return GemmConfig(block_m=block_m, block_n=64 if block_m == 16 else 32, block_k=16, num_warps=8, num_stages=2)
    return {
        16: GemmConfig(block_m=16, block_n=64, block_k=128, num_warps=4, num_stages=4),
        32: GemmConfig(block_m=32, block_n=64, block_k=64, num_warps=4, num_stages=4),
        64: GemmConfig(block_m=64, block_n=128, block_k=64, num_warps=4, num_stages=3),
        128: GemmConfig(block_m=128, block_n=128, block_k=64, num_warps=8, num_stages=3),
    }[block_m]


# ---------------------------------------------------------------------------------------------
# Routing
# ---------------------------------------------------------------------------------------------


@dataclass
class Routing:
    """Everything the grouped GEMMs need to know about where each token went.

    router_probs  [T, E] fp32     softmax over all experts (None for an expert shard's local grouping)
    gates         [T, K] fp32     gate of each chosen expert (renormalised if asked)
    topk_ids      [T, K] int32    chosen experts, descending probability
    sorted_ids    [MAX_BLOCKS * BLOCK_M] int32  flat row t*K+k of each GEMM row; T*K = padding
    block_expert  [MAX_BLOCKS] int32            expert of each BLOCK_M tile; -1 = no work
    counts        [E] int32      rows per expert;  offsets [E+1] int32 padded start rows
    partial       True when some (token, slot) rows go to experts not held here (expert shards):
                  those rows are never computed, so the buffers that hold them start zeroed
    """

    router_probs: torch.Tensor
    gates: torch.Tensor
    topk_ids: torch.Tensor
    sorted_ids: torch.Tensor
    block_expert: torch.Tensor
    counts: torch.Tensor
    offsets: torch.Tensor
    block_m: int
    partial: bool = False

    @property
    def max_blocks(self) -> int:
        return self.block_expert.numel()


def moe_align(topk_ids: torch.Tensor, num_experts: int, block_m: int):
    """Group the (token, slot) rows by expert. Returns (sorted_ids, block_expert, counts, offsets).

    Ids outside [0, num_experts) are dropped (no GEMM row): an expert shard passes global ids minus
    its first expert."""
    _check(topk_ids.dim() == 2, f"topk_ids must be [T, K], got {tuple(topk_ids.shape)}")
    _check(block_m >= 16 and block_m & (block_m - 1) == 0, f"block_m must be a power of two >= 16, got {block_m}")
    numel = topk_ids.numel()
    ids = topk_ids.to(torch.int32).contiguous()
    # sum over experts of ceil(count/BLOCK_M) <= floor(numel/BLOCK_M) + (experts with rows)
    max_blocks = triton.cdiv(numel, block_m) + min(num_experts, numel)
    dev = topk_ids.device
    sorted_ids = torch.empty(max_blocks * block_m, dtype=torch.int32, device=dev)
    block_expert = torch.empty(max_blocks, dtype=torch.int32, device=dev)
    counts = torch.empty(num_experts, dtype=torch.int32, device=dev)
    offsets = torch.empty(num_experts + 1, dtype=torch.int32, device=dev)
    require_launchable(_align_kernel, dev, "moe_align")
    _align_kernel[(1,)](
        ids, sorted_ids, block_expert, counts, offsets,
        numel, num_experts, max_blocks * block_m, max_blocks,
        E_PAD=triton.next_power_of_2(num_experts), BLOCK_M=block_m, CHUNK=256,
    )
    return sorted_ids, block_expert, counts, offsets


def moe_router(
    x: torch.Tensor,
    router_w: torch.Tensor,
    top_k: int = 2,
    *,
    renormalize: bool = False,
    router_softcap: float | None = None,
    expert_ids: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Router + softmax + top-k in one launch: (probs [T, E] fp32, gates [T, K] fp32, topk_ids [T, K] int32)."""
    _check(x.dim() == 2, f"x must be [T, D], got {tuple(x.shape)}")
    _check(x.is_floating_point(), f"x must be floating, got {x.dtype}")
    T, D = x.shape
    _check(router_w.dim() == 2 and router_w.shape[0] == D, f"router_w must be [D={D}, E], got {tuple(router_w.shape)}")
    E = router_w.shape[1]
    if expert_ids is not None:
        _check(expert_ids.dim() == 2 and expert_ids.shape[0] == T, f"expert_ids must be [T={T}, k], got {tuple(expert_ids.shape)}")
        top_k = expert_ids.shape[1]
        _check(bool(((expert_ids >= 0) & (expert_ids < E)).all()), f"expert_ids must lie in [0, {E})")
        forced = expert_ids.to(torch.int32).contiguous()
    _check(1 <= top_k <= E, f"top_k must be in [1, E={E}], got {top_k}")
    w = router_w.float()  # fp32 router (a no-op for the released fp32 weight)
    probs = torch.empty(T, E, dtype=torch.float32, device=x.device)
    gates = torch.empty(T, top_k, dtype=torch.float32, device=x.device)
    ids = torch.empty(T, top_k, dtype=torch.int32, device=x.device)
    BLOCK_T = 16
    require_launchable(_router_topk_kernel, x.device, "moe_router")
    _router_topk_kernel[(triton.cdiv(T, BLOCK_T),)](
        x, w, probs, gates, ids, forced if expert_ids is not None else ids,
        T, D, E,
        x.stride(0), x.stride(1), w.stride(0), w.stride(1), probs.stride(0), probs.stride(1),
        SOFTCAP=float(router_softcap or 0.0), RENORM=bool(renormalize), FORCED=expert_ids is not None,
        TOP_K=top_k, K_PAD=triton.next_power_of_2(top_k), E_PAD=triton.next_power_of_2(E),
        BLOCK_T=BLOCK_T, BLOCK_D=64,
    )
    return probs, gates, ids


def router_grad(x, router_w, probs, gates, topk_ids, *, renormalize: bool = False,
                router_softcap: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The router kernel's (probs, gates), or, when autograd records through x or router_w, the same
    values recomputed with torch ops at the kernel's experts (cheap: T x D x E), so that gradients
    reach the router through the gates."""
    if torch.is_grad_enabled() and (x.requires_grad or router_w.requires_grad):
        probs, gates, _ = route(x, router_w, renormalize=renormalize, router_softcap=router_softcap,
                                expert_ids=topk_ids)
    return probs, gates


def moe_route(
    x: torch.Tensor,
    router_w: torch.Tensor,
    top_k: int = 2,
    *,
    renormalize: bool = False,
    router_softcap: float | None = None,
    expert_ids: torch.Tensor | None = None,
    block_m: int = 64,
) -> Routing:
    """Router + top-k (launch 1) and expert grouping padded to block_m (launch 2)."""
    probs, gates, ids = moe_router(
        x, router_w, top_k, renormalize=renormalize, router_softcap=router_softcap, expert_ids=expert_ids
    )
    sorted_ids, block_expert, counts, offsets = moe_align(ids, router_w.shape[1], block_m)
    return Routing(probs, gates, ids, sorted_ids, block_expert, counts, offsets, block_m)


def local_routing(gates: torch.Tensor, topk_ids: torch.Tensor, expert_start: int, num_local: int, block_m: int) -> Routing:
    """The grouping for an expert shard holding experts ``expert_start ... expert_start + num_local - 1``.

    Slots routed to other experts get no GEMM row (the align kernel drops ids outside the shard);
    their rows of the per-slot buffers stay zero. One launch, no host synchronisation.
    """
    ids = topk_ids.to(torch.int32)
    if expert_start:
        ids = ids - expert_start
    sorted_ids, block_expert, counts, offsets = moe_align(ids, num_local, block_m)
    return Routing(None, gates, ids, sorted_ids, block_expert, counts, offsets, block_m, partial=True)


# ---------------------------------------------------------------------------------------------
# Grouped GEMMs
# ---------------------------------------------------------------------------------------------


def _check_weight(name: str, w: torch.Tensor, shape: tuple, scale: torch.Tensor | None, scale_name: str) -> int:
    """Check an expert weight [E, K, N] and its scales [E, G, N]; return G (0 for float weights)."""
    _check(tuple(w.shape) == shape, f"{name} must be {list(shape)}, got {list(w.shape)}")
    if w.dtype == torch.int8:
        _check(scale is not None, f"{name} is int8: pass scales ({scale_name} [E, G, N])")
        E, K, N = shape
        _check(
            scale.dim() == 3 and scale.shape[0] == E and scale.shape[2] == N and K % scale.shape[1] == 0,
            f"{scale_name} must be [E={E}, G, N={N}] with G dividing K={K}, got {list(scale.shape)}",
        )
        return scale.shape[1]
    _check(w.dtype in _TL_DTYPE, f"{name} must be int8, fp16, bf16 or fp32, got {w.dtype}")
    return 0


def _launch_gemm(
    a, a_by_token, b, b2, s, s2, c, routing, *, N, K, kb, nb, top_k, numel, cd, cfg,
    scale_mode, groups=1, div_k=1, div_n=1, sk=0, sn=0, epilogue=0, gate=None, preact=None,
    store_preact=None, preact_in=0,
):
    """One grouped-GEMM launch. kb/nb are B's strides along the reduction and output dims.

    preact: (g, u) fp32 buffers with C's strides: written (store_preact, default when given) and/or
    read and added to the accumulators first (preact_in bits 1: g, 2: u; the LoRA deltas)."""
    c1, c2 = gelu_constants(cd)
    g_out, u_out = (x if x is not None else c for x in preact) if preact is not None else (c, c)
    if store_preact is None:
        store_preact = preact is not None
    grid = (routing.max_blocks, triton.cdiv(N, cfg.block_n))
    require_launchable(_moe_gemm_kernel, c.device, "the MoE grouped GEMM")
    _moe_gemm_kernel[grid](
        a, b, b2 if b2 is not None else b, s if s is not None else b, s2 if s2 is not None else b,
        c, g_out, u_out, gate if gate is not None else routing.gates,
        routing.sorted_ids, routing.block_expert,
        numel, N, K, groups if scale_mode == 1 else 1, K // groups if scale_mode == 1 else K, div_k, div_n,
        a.stride(0), a.stride(1),
        b.stride(0), kb, nb,
        s.stride(0) if s is not None else 0, sk, sn,
        c.stride(0), c.stride(1),
        TOP_K=top_k, A_BY_TOKEN=a_by_token, DUAL=b2 is not None, SCALE_MODE=scale_mode,
        EPILOGUE=epilogue, STORE_PREACT=bool(store_preact), PREACT_IN=preact_in,
        CDTYPE=_TL_DTYPE[cd], ACC=tl.float64 if cd == torch.float64 else tl.float32,
        DOT_PRECISION="ieee" if cd in (torch.float32, torch.float64) else "tf32",
        C1=c1, C2=c2,
        BLOCK_M=routing.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )


def _delta_tiles(cfg: GemmConfig, cd: torch.dtype) -> GemmConfig:
    """Tiles of an up/down GEMM whose accumulators start at LoRA deltas (PREACT_IN): the tiles loaded
    before the main loop stay live through it, so fewer pipeline stages (and N <= preact_block_n);
    without this some sm_90 variants spill (`python -m grok_torch.kernels.aot --full --table`)."""
    if cd in (torch.float32, torch.float64):
        return replace(cfg, num_stages=1)
    return replace(cfg, block_n=min(cfg.block_n, cfg.preact_block_n), num_stages=min(cfg.num_stages, 3))


def moe_up(
    x: torch.Tensor,
    w1: torch.Tensor,
    w3: torch.Tensor,
    routing: Routing,
    *,
    scales: tuple[torch.Tensor, torch.Tensor] | None = None,
    compute_dtype: torch.dtype | None = None,
    config: GemmConfig | None = None,
    store_preact: bool = False,
    delta: tuple[torch.Tensor | None, torch.Tensor | None] | None = None,
):
    """act[t*K+k] = gelu_tanh(x[t] @ w1[e]) * (x[t] @ w3[e]) for e = topk_ids[t, k]; [T*K, F] compute dtype.

    x rows are gathered in the kernel (no permuted copy); with store_preact also returns the fp32
    pre-activations (g, u) the backward needs. delta: (d1, d3), fp32 [T*K, F] (or None) added to the
    gate / up pre-activations before the GELU (the expert-LoRA terms); with store_preact the buffers
    given are overwritten with the pre-activations and returned as (g, u).
    """
    T, D = x.shape
    _check(w1.dim() == 3, f"w1 must be [E, D, F], got {list(w1.shape)}")
    E, _, F = w1.shape
    s1, s3 = scales if scales is not None else (None, None)
    g1 = _check_weight("w1", w1, (E, D, F), s1, "s1")
    g3 = _check_weight("w3", w3, (E, D, F), s3, "s3")
    _check(w1.dtype == w3.dtype and w1.stride() == w3.stride(), "w1 and w3 must share dtype and strides")
    _check(g1 == g3 and (s1 is None or s1.stride() == s3.stride()), "s1 and s3 must share shape and strides")
    cd = resolve_compute_dtype(w1, compute_dtype)
    K = routing.topk_ids.shape[1]
    cfg = config or gemm_config(T, K, E, cd)
    _check(cfg.block_m == routing.block_m, f"config.block_m={cfg.block_m} != routing.block_m={routing.block_m}")
    new = torch.zeros if routing.partial else torch.empty  # rows of other shards' experts stay 0
    act = new(T * K, F, dtype=cd, device=x.device)
    acc = torch.float64 if cd == torch.float64 else torch.float32
    d1, d3 = delta if delta is not None else (None, None)
    for name, d in (("delta[0]", d1), ("delta[1]", d3)):
        _check(d is None or (d.shape == (T * K, F) and d.dtype == acc and d.is_contiguous()),
               f"{name} must be a contiguous {acc} [T*K={T * K}, F={F}] tensor")
    preact_in = (1 if d1 is not None else 0) | (2 if d3 is not None else 0)
    preact = None
    if store_preact:
        cfg = replace(cfg, block_n=min(cfg.block_n, cfg.preact_block_n))
    if preact_in:
        cfg = _delta_tiles(cfg, cd)
    if store_preact:
        preact = tuple(d if d is not None else new(T * K, F, dtype=acc, device=x.device) for d in (d1, d3))
    elif preact_in:
        preact = (d1, d3)
    _launch_gemm(
        x, True, w1, w3, s1, s3, act, routing, N=F, K=D, kb=w1.stride(1), nb=w1.stride(2), top_k=K,
        numel=T * K, cd=cd, cfg=cfg, scale_mode=1 if g1 else 0, groups=max(g1, 1),
        sk=s1.stride(1) if g1 else 0, sn=s1.stride(2) if g1 else 0, epilogue=1, preact=preact,
        store_preact=store_preact, preact_in=preact_in,
    )
    return (act, *preact) if store_preact else act


def moe_down(
    act: torch.Tensor,
    w2: torch.Tensor,
    routing: Routing,
    *,
    scale: torch.Tensor | None = None,
    gates: torch.Tensor | None = None,
    compute_dtype: torch.dtype | None = None,
    config: GemmConfig | None = None,
    deterministic: bool = True,
    delta: torch.Tensor | None = None,
) -> torch.Tensor:
    """y[t*K+k] = gate[t, k] * (act[t*K+k] @ w2[e] + delta[t*K+k]); [T*K, D] fp32 (fp64 for fp64 compute).

    delta: optional fp32 [T*K, D] added before the gate (the expert-LoRA term of the down projection).

    deterministic=False: the combine happens in the epilogue instead; returns out[t] = sum_k y[t*K+k]
    as [T, D] fp32 (fp64), accumulated with atomics into a zeroed buffer (no moe_combine needed;
    the summation order per token is not fixed).
    """
    _check(act.dim() == 2, f"act must be [T*K, F], got {list(act.shape)}")
    numel, F = act.shape
    _check(w2.dim() == 3 and w2.shape[1] == F, f"w2 must be [E, F={F}, D], got {list(w2.shape)}")
    E, _, D = w2.shape
    G = _check_weight("w2", w2, (E, F, D), scale, "s2")
    cd = resolve_compute_dtype(w2, compute_dtype)
    T, K = routing.topk_ids.shape
    _check(numel == T * K, f"act must have T*K={T * K} rows, got {numel}")
    gates = routing.gates if gates is None else gates
    _check(gates.shape == (T, K), f"gates must be [T={T}, K={K}], got {list(gates.shape)}")
    cfg = config or gemm_config(T, K, E, cd)
    if delta is not None:
        cfg = _delta_tiles(cfg, cd)
    acc = torch.float64 if cd == torch.float64 else torch.float32
    _check(delta is None or (delta.shape == (numel, D) and delta.dtype == acc and delta.is_contiguous()),
           f"delta must be a contiguous {acc} [T*K={numel}, D={D}] tensor")
    if deterministic:
        y = (torch.zeros if routing.partial else torch.empty)(numel, D, dtype=acc, device=act.device)
    else:
        y = torch.zeros(T, D, dtype=acc, device=act.device)  # the atomics accumulate into it
    _launch_gemm(
        act, False, w2, None, scale, None, y, routing, N=D, K=F, kb=w2.stride(1), nb=w2.stride(2), top_k=K,
        numel=numel, cd=cd, cfg=cfg, scale_mode=1 if G else 0, groups=max(G, 1),
        sk=scale.stride(1) if G else 0, sn=scale.stride(2) if G else 0,
        epilogue=2 if deterministic else 3,
        gate=gates.float().contiguous() if cd != torch.float64 else gates.contiguous(),
        preact=None if delta is None else (delta, None), store_preact=False, preact_in=1 if delta is not None else 0,
    )
    return y


def moe_combine(y: torch.Tensor, top_k: int, out_dtype: torch.dtype) -> torch.Tensor:
    """out[t] = sum_k y[t*K+k] in slot order (fp32), cast to out_dtype. Deterministic."""
    _check(y.dim() == 2 and y.shape[0] % top_k == 0, f"y must be [T*K, D], got {list(y.shape)}")
    T, D = y.shape[0] // top_k, y.shape[1]
    out = torch.empty(T, D, dtype=out_dtype, device=y.device)
    BLOCK_D = 256
    require_launchable(_combine_kernel, y.device, "moe_combine")
    _combine_kernel[(T, triton.cdiv(D, BLOCK_D))](
        y, out, D, y.stride(0), y.stride(1), out.stride(0), out.stride(1), TOP_K=top_k, BLOCK_D=BLOCK_D
    )
    return out


def _moe_transposed(dy, by_token, w, s, routing, *, cd, cfg, top_k, numel):
    """dy @ w[e]^T for each row's expert: w is [E, K_w, N_w], dy is [rows, N_w] -> [T*K, K_w] (fp32/fp64)."""
    E, Kw, Nw = w.shape
    new = torch.zeros if routing.partial else torch.empty
    out = new(numel, Kw, dtype=torch.float64 if cd == torch.float64 else torch.float32, device=dy.device)
    kw = {}
    if s is not None:
        # B^T[k, n] = w[n, k] with scale s[n // (K_w/G), k]: the scale varies along the reduction,
        # so each B tile is dequantised in the main loop (SCALE_MODE 2).
        kw = dict(scale_mode=2, div_k=1, div_n=Kw // s.shape[1], sk=s.stride(2), sn=s.stride(1))
    else:
        kw = dict(scale_mode=0)
    _launch_gemm(
        dy, by_token, w, None, s, None, out, routing, N=Kw, K=Nw, kb=w.stride(2), nb=w.stride(1),
        top_k=top_k, numel=numel, cd=cd, cfg=cfg, **kw,
    )
    return out


def moe_weight_grad(a, a_by_token, b, b_by_token, routing, w, *, cd, gates=None, block=(32, 64, 64)):
    """dW[e] = A[rows of e]^T @ B[rows of e] (B's rows times their gate if gates is given); dW like w."""
    E, P, Q = w.shape
    _check(a.shape[1] == P and b.shape[1] == Q, f"weight grad: A [*, {P}] and B [*, {Q}] expected, got {list(a.shape)}, {list(b.shape)}")
    dw = torch.empty(E, P, Q, dtype=w.dtype, device=w.device)
    T, K = routing.topk_ids.shape
    BLOCK_R, BLOCK_P, BLOCK_Q = block
    require_launchable(_moe_wgrad_kernel, dw.device, "moe_weight_grad")
    _moe_wgrad_kernel[(E, triton.cdiv(P, BLOCK_P), triton.cdiv(Q, BLOCK_Q))](
        a, b, gates.reshape(-1).contiguous() if gates is not None else routing.gates, dw,
        routing.sorted_ids, routing.counts, routing.offsets,
        T * K, P, Q,
        a.stride(0), a.stride(1), b.stride(0), b.stride(1), dw.stride(0), dw.stride(1), dw.stride(2),
        TOP_K=K, A_BY_TOKEN=a_by_token, B_BY_TOKEN=b_by_token, B_GATED=gates is not None,
        CDTYPE=_TL_DTYPE[cd], ACC=tl.float64 if cd == torch.float64 else tl.float32,
        DOT_PRECISION="ieee" if cd in (torch.float32, torch.float64) else "tf32",
        BLOCK_R=BLOCK_R, BLOCK_P=BLOCK_P, BLOCK_Q=BLOCK_Q,
        # fp32 compute is an FMA dot held in registers: 4 warps spill on sm_90 for the w2 gradient
        num_warps=8 if cd in (torch.float32, torch.float64) else 4,
    )
    return dw


# ---------------------------------------------------------------------------------------------
# Expert LoRA: low-rank products on the same expert-sorted rows
# ---------------------------------------------------------------------------------------------


def lora_config(cfg: GemmConfig, num_tokens: int, top_k: int, num_experts: int) -> GemmConfig:
    """Tiles of the LoRA GEMMs: the fp32 ones of gemm_config (exact fp32, as the reference adds the
    deltas in fp32), with the routing's BLOCK_M."""
    return replace(gemm_config(num_tokens, top_k, num_experts, torch.float32), block_m=cfg.block_m)


def moe_lora_gemm(a, a_by_token, w, routing, *, cfg, acc=torch.float32, top_k=None):
    """out[row] = a[row or token] @ w[e] for each sorted row of expert e: float w [E, K, N] -> fp32
    [T*K, N] (exact fp32; rows of other shards' experts 0). The LoRA low-rank products: the rank
    r may be below the tile (masked)."""
    T, K = routing.topk_ids.shape
    _, Kw, N = w.shape
    _check(a.shape[1] == Kw, f"LoRA GEMM: A [*, {Kw}] expected, got {list(a.shape)}")
    out = (torch.zeros if routing.partial else torch.empty)(T * K, N, dtype=acc, device=a.device)
    _launch_gemm(a, a_by_token, w, None, None, None, out, routing, N=N, K=Kw, kb=w.stride(1), nb=w.stride(2),
                 top_k=K, numel=T * K, cd=acc, cfg=cfg, scale_mode=0)
    return out


def _lora_forward(a, a_by_token, A, B, scale, routing, cfg, acc):
    """(t, delta): t = scale * a[row] @ A[e] ([T*K, r] fp32), delta = t @ B[e] ([T*K, N] fp32)."""
    t = moe_lora_gemm(a, a_by_token, A, routing, cfg=cfg, acc=acc) * scale
    return t, moe_lora_gemm(t, False, B, routing, cfg=cfg, acc=acc)


def lora_args(lora, E: int, D: int, F: int) -> tuple:
    """An ExpertLoRA (dropout 0) as the trailing arguments of _MoEExperts: (scale, A1, B1, A3, B3, A2, B2)."""
    if lora is None:
        return (0.0,) + (None,) * 6
    _check(not lora.dropout, "the Triton kernels take expert LoRA without dropout (lora.dropout must be 0)")
    out: list = [float(lora.scale)]
    for name, ab, (i, o) in (("w1", lora.w1, (D, F)), ("w3", lora.w3, (D, F)), ("w2", lora.w2, (F, D))):
        if ab is None:
            out += [None, None]
            continue
        a, b = ab
        _check(a.dim() == 3 and b.dim() == 3 and tuple(a.shape[:2]) == (E, i) and b.shape[0] == E
               and b.shape[1] == a.shape[2] and b.shape[2] == o and a.is_floating_point() and b.is_floating_point(),
               f"lora.{name} must be float (A [E={E}, {i}, r], B [E={E}, r, {o}]), got "
               f"{list(a.shape)} {a.dtype}, {list(b.shape)} {b.dtype}")
        out += [a, b]
    return tuple(out)


# ---------------------------------------------------------------------------------------------
# Autograd
# ---------------------------------------------------------------------------------------------


class _MoEExperts(torch.autograd.Function):
    """out = sum_k gate_k * w2(gelu_tanh(w1 x) * w3 x) over each token's experts (routing fixed).

    Expert LoRA (trailing arguments, see lora_args): t = scale * x[row] @ A[e] and delta = t @ B[e]
    by the same grouped GEMM in exact fp32 (lora_config), the deltas added to the fp32 accumulators
    in the up GEMM's epilogue (before the GELU) and the down GEMM's (before the gate). Backward:
    dB[e] = t^T dpre, dA[e] = in^T (scale * dpre @ B[e]^T) over the expert's rows (moe_weight_grad),
    and the same low-rank products add to dx, d act and dgates.
    """

    @staticmethod
    def forward(ctx, x, gates, w1, w3, w2, s1, s3, s2, routing, cd, cfg, deterministic, out_dtype=None,
                lora_scale=0.0, a1=None, b1=None, a3=None, b3=None, a2=None, b2=None):
        T, K = routing.topk_ids.shape
        need_grad = any(ctx.needs_input_grad)
        acc = torch.float64 if cd == torch.float64 else torch.float32
        lcfg = lora_config(cfg, T, K, w1.shape[0])
        t1 = t3 = t2 = d1 = d3 = d2 = None
        if a1 is not None or a3 is not None:
            x_c = x.to(cd)  # the reference's deltas: fp32 products of the compute-dtype x
            if a1 is not None:
                t1, d1 = _lora_forward(x_c, True, a1, b1, lora_scale, routing, lcfg, acc)
            if a3 is not None:
                t3, d3 = _lora_forward(x_c, True, a3, b3, lora_scale, routing, lcfg, acc)
        up = moe_up(
            x, w1, w3, routing, scales=None if s1 is None else (s1, s3), compute_dtype=cd, config=cfg,
            store_preact=need_grad, delta=(d1, d3),
        )
        act, g, u = up if need_grad else (up, None, None)
        if a2 is not None:
            t2, d2 = _lora_forward(act, False, a2, b2, lora_scale, routing, lcfg, acc)
        y = moe_down(act, w2, routing, scale=s2, gates=gates, compute_dtype=cd, config=cfg, deterministic=deterministic,
                     delta=d2)
        # deterministic: combine launch in slot order; otherwise the down GEMM already summed the slots
        out_dtype = out_dtype or cd
        out = moe_combine(y, K, out_dtype) if deterministic else y.to(out_dtype)
        if need_grad:
            ctx.save_for_backward(x, gates, w1, w3, w2, s1, s3, s2, act, g, u, t1, t3, t2, a1, b1, a3, b3, a2, b2)
            ctx.routing, ctx.cd, ctx.cfg, ctx.lcfg, ctx.lora_scale = routing, cd, cfg, lcfg, lora_scale
        return out

    @staticmethod
    def backward(ctx, dout):
        x, gates, w1, w3, w2, s1, s3, s2, act, g, u, t1, t3, t2, a1, b1, a3, b3, a2, b2 = ctx.saved_tensors
        routing, cd, cfg, sc = ctx.routing, ctx.cd, ctx.cfg, ctx.lora_scale
        need = ctx.needs_input_grad
        T, K = routing.topk_ids.shape
        acc = g.dtype
        lkw = dict(cd=acc, cfg=ctx.lcfg, top_k=K, numel=T * K)  # the LoRA products: exact fp32
        dout_f = dout.to(acc).contiguous()  # the LoRA gradients take the incoming gradient unrounded
        dout = dout.to(cd).contiguous()
        # dA = dout[token] @ w2[e]^T, before the gate (so dgate = <dA, act>)
        dA = _moe_transposed(dout, True, w2, s2, routing, cd=cd, cfg=cfg, top_k=K, numel=T * K)
        gate_c = gates.to(cd).to(acc).reshape(-1, 1)
        dgates = (dA * act.to(acc)).sum(-1)
        da = dA * gate_c
        da2 = db2 = None
        if a2 is not None:
            p2 = _moe_transposed(dout_f, True, b2, None, routing, **lkw)  # dout[token] @ B2[e]^T: [T*K, r]
            dgates = dgates + (p2 * t2).sum(-1)  # <dout, t2 @ B2[e]>
            dt2 = p2 * (gate_c * sc)  # gradient of act @ A2[e]
            da = da + _moe_transposed(dt2, False, a2, None, routing, **lkw)
            if need[18]:
                da2 = moe_weight_grad(act, False, dt2, False, routing, a2, cd=acc)
            if need[19]:
                db2 = moe_weight_grad(t2, False, dout_f, True, routing, b2, cd=acc, gates=gate_c)
        c1, c2 = gelu_constants(cd)
        inner = 2.0 * c1 * (g + c2 * g**3)
        sig = torch.sigmoid(inner)
        gelu = g * sig
        dgelu = sig + g * sig * (1 - sig) * 2.0 * c1 * (1 + 3 * c2 * g * g)
        dg_f = da * u * dgelu
        du_f = da * gelu
        dg, du = dg_f.to(cd), du_f.to(cd)
        dx = dw1 = dw3 = dw2 = None
        if need[0]:
            dx1 = _moe_transposed(dg, False, w1, s1, routing, cd=cd, cfg=cfg, top_k=K, numel=T * K)
            dx3 = _moe_transposed(du, False, w3, s3, routing, cd=cd, cfg=cfg, top_k=K, numel=T * K)
            dx = dx1 + dx3
        lora_grads = []
        x_c = x.to(cd) if (a1 is not None and need[14]) or (a3 is not None and need[16]) else None
        for a_, b_, t_, d_, ia in ((a1, b1, t1, dg_f, 14), (a3, b3, t3, du_f, 16)):
            dA_ = dB_ = None
            if a_ is not None:
                q = _moe_transposed(d_, False, b_, None, routing, **lkw) * sc  # gradient of x @ A[e]
                if need[0]:
                    dx = dx + _moe_transposed(q, False, a_, None, routing, **lkw)
                if need[ia]:
                    dA_ = moe_weight_grad(x_c, True, q, False, routing, a_, cd=acc)
                if need[ia + 1]:
                    dB_ = moe_weight_grad(t_, False, d_, False, routing, b_, cd=acc)
            lora_grads += [dA_, dB_]
        if dx is not None:
            dx = dx.view(T, K, -1).sum(1).to(x.dtype)
        if need[2]:
            dw1 = moe_weight_grad(x, True, dg, False, routing, w1, cd=cd)
        if need[3]:
            dw3 = moe_weight_grad(x, True, du, False, routing, w3, cd=cd)
        if need[4]:
            dw2 = moe_weight_grad(act, False, dout, True, routing, w2, cd=cd, gates=gates)
        return (dx, dgates.view(T, K).to(gates.dtype), dw1, dw3, dw2) + (None,) * 9 + (*lora_grads, da2, db2)


def _experts_apply(x, gates, w1, w3, w2, *rest):
    """_MoEExperts.apply; without grad mode its inputs are detached first (needs_input_grad ignores the
    mode), so inference with trainable adapters or x keeps nothing for a backward."""
    if not torch.is_grad_enabled():
        x, gates, w1, w3, w2 = (t.detach() for t in (x, gates, w1, w3, w2))
        rest = tuple(t.detach() if isinstance(t, torch.Tensor) else t for t in rest)
    return _MoEExperts.apply(x, gates, w1, w3, w2, *rest)


# ---------------------------------------------------------------------------------------------
# Public entry
# ---------------------------------------------------------------------------------------------


def fused_moe_triton(
    x: torch.Tensor,
    router_w: torch.Tensor,
    w1: torch.Tensor,
    w3: torch.Tensor,
    w2: torch.Tensor,
    *,
    top_k: int = 2,
    scales: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    renormalize: bool = False,
    router_softcap: float | None = None,
    compute_dtype: torch.dtype | None = None,
    expert_ids: torch.Tensor | None = None,
    config: GemmConfig | None = None,
    deterministic: bool = True,
    lora=None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The Triton MoE layer; same contract as grok_torch.kernels.fused_moe (see there).

    deterministic=False combines the k expert outputs with fp32 atomics in the down GEMM's epilogue
    (4 launches instead of 5; not bit-reproducible). The backward does not depend on it.
    """
    _check(x.dim() == 2, f"x must be [T, D], got {list(x.shape)}")
    T, D = x.shape
    _check(w1.dim() == 3, f"w1 must be [E, D, F], got {list(w1.shape)}")
    E = w1.shape[0]
    _check(router_w.shape == (D, E), f"router_w must be [D={D}, E={E}], got {list(router_w.shape)}")
    if w1.dtype == torch.int8:
        _check(scales is not None and len(scales) == 3, "int8 weights need scales=(s1, s3, s2)")
    s1, s3, s2 = scales if scales is not None else (None, None, None)
    cd = resolve_compute_dtype(w1, compute_dtype)
    k = expert_ids.shape[1] if expert_ids is not None else top_k
    cfg = config or gemm_config(T, k, E, cd)
    with torch.no_grad():
        routing = moe_route(
            x, router_w, top_k, renormalize=renormalize, router_softcap=router_softcap,
            expert_ids=expert_ids, block_m=cfg.block_m,
        )
    probs, gates = router_grad(x, router_w, routing.router_probs, routing.gates, routing.topk_ids,
                               renormalize=renormalize, router_softcap=router_softcap)
    largs = lora_args(lora, E, D, w1.shape[2])
    out = _experts_apply(x, gates, w1, w3, w2, s1, s3, s2, routing, cd, cfg, bool(deterministic), None, *largs)
    return out, probs, routing.topk_ids.long()


def moe_experts_triton(
    x: torch.Tensor,
    gates: torch.Tensor,
    topk_ids: torch.Tensor,
    w1: torch.Tensor,
    w3: torch.Tensor,
    w2: torch.Tensor,
    *,
    scales: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    expert_start: int = 0,
    compute_dtype: torch.dtype | None = None,
    config: GemmConfig | None = None,
    deterministic: bool = True,
    lora=None,
) -> torch.Tensor:
    """The experts of the layer with the routing given; same contract as grok_torch.kernels.moe_experts.

    One align launch for this shard's experts, then the same grouped GEMMs as fused_moe_triton. The
    down GEMM's output is fp32 whatever F holds, so a slice of F needs nothing special here.
    """
    _check(x.dim() == 2, f"x must be [T, D], got {list(x.shape)}")
    _check(topk_ids.dim() == 2 and topk_ids.shape[0] == x.shape[0],
           f"topk_ids must be [T={x.shape[0]}, k], got {list(topk_ids.shape)}")
    _check(gates.shape == topk_ids.shape, f"gates must be {list(topk_ids.shape)}, got {list(gates.shape)}")
    _check(w1.dim() == 3, f"w1 must be [E_local, D, F], got {list(w1.shape)}")
    if w1.dtype == torch.int8:
        _check(scales is not None and len(scales) == 3, "int8 weights need scales=(s1, s3, s2)")
    s1, s3, s2 = scales if scales is not None else (None, None, None)
    cd = resolve_compute_dtype(w1, compute_dtype)
    T, K = topk_ids.shape
    E_local = w1.shape[0]
    cfg = config or gemm_config(T, K, E_local, cd)
    with torch.no_grad():
        routing = local_routing(gates, topk_ids, expert_start, E_local, cfg.block_m)
    acc = torch.float64 if cd == torch.float64 else torch.float32
    largs = lora_args(lora, E_local, x.shape[1], w1.shape[2])
    return _experts_apply(x, gates, w1, w3, w2, s1, s3, s2, routing, cd, cfg, bool(deterministic), acc, *largs)
