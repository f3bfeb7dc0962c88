"""grok_torch.kernels: the Grok-1 MoE layer as fused Triton kernels, with a pure-PyTorch reference beside them.

Public ops (the model's MoE block calls fused_moe; expert shards and expert parallelism, which
route once and send each holder of experts its tokens, call the other two):

    out_TD, router_probs_TE, topk_ids_TK = fused_moe(x_TD, router_w_DE, w1_EDF, w3_EDF, w2_EFD, top_k=2, ...)
    router_probs_TE, gates_TK, topk_ids_TK = moe_router(x_TD, router_w_DE, top_k=2, ...)
    partial_TD (fp32) = moe_experts(x_TD, gates_TK, topk_ids_TK, w1_eDF, w3_eDF, w2_eFD, expert_start=e0)

Files:
    reference.py    pure-PyTorch oracle: router, dequantisation, per-expert loop     (impl="torch")
    routing.py      Triton: router + softmax + top-k, then expert grouping (2 launches)
    grouped_gemm.py Triton: gathered grouped GEMM (GELU*up / gate epilogues), weight grads, slot combine
    ops.py          launch wrappers with shape checks (the pieces: moe_route, moe_align, moe_up, moe_down,
                    moe_combine, moe_weight_grad), torch.autograd.Function, fused_moe_triton
    aot.py          ahead-of-time compile of every GPU variant (sm_90 by default), no GPU needed

Implementation choice: impl="torch" | "triton" | "auto". "auto" is Triton when x is on CUDA and the
reference elsewhere; the environment variable GROK_MOE_IMPL=torch|triton overrides "auto" (never an
explicit impl). Triton is imported only when used, so this package imports without it.

Without CUDA, Triton runs only in its interpreter, which ``triton.jit`` picks when a kernel is
defined: set TRITON_INTERPRET=1 in the environment before importing the kernels to run impl="triton"
on CPU tensors (the tests do, in tests/conftest.py). Importing this package never sets it, so that
tools such as ``python -m grok_torch.kernels.aot`` get real (compilable) kernels; without it, impl
"triton" on CPU tensors raises one error saying so (``require_launchable``).
"""
from __future__ import annotations

import os

import torch

from .reference import ExpertLoRA, moe_experts_reference, moe_reference, route

__all__ = ["ExpertLoRA", "fused_moe", "moe_router", "moe_experts", "moe_reference", "moe_experts_reference", "route", "resolve_impl",
           "require_launchable"]

_IMPLS = ("torch", "triton")


_WARNED: set = set()


def _warn_once(msg: str) -> None:
    if msg not in _WARNED:
        _WARNED.add(msg)
        import warnings

        warnings.warn(msg, stacklevel=3)


def resolve_impl(impl: str, x: torch.Tensor) -> str:
    """Turn impl="auto" into "torch" or "triton" (GROK_MOE_IMPL wins over the device rule)."""
    if impl == "auto":
        env = os.environ.get("GROK_MOE_IMPL", "").strip().lower()
        if env:
            if env not in _IMPLS:
                raise ValueError(f"GROK_MOE_IMPL must be one of {_IMPLS}, got {env!r}")
            return env
        return "triton" if x.is_cuda else "torch"
    if impl not in _IMPLS:
        raise ValueError(f"impl must be 'auto', 'torch' or 'triton', got {impl!r}")
    return impl


def require_launchable(kernel, device: torch.device, what: str) -> None:
    """Refuse a launch of ``kernel`` on CPU tensors unless it was defined under the Triton interpreter.

    A kernel compiled for the GPU would otherwise fail deep inside Triton's launcher on host pointers.
    The kernel object, not the environment, is asked: TRITON_INTERPRET set after the kernels were
    defined does not make them interpretable. Other devices pass (CUDA; meta while aot.py records).
    """
    if device.type != "cpu":
        return
    from triton.runtime.jit import JITFunction  # only reached on the Triton path

    if isinstance(kernel, JITFunction):
        raise RuntimeError(
            f"{what}: impl='triton' got CPU tensors, but the Triton kernels were not defined under Triton's "
            "interpreter; move the tensors to CUDA, use impl='torch' (or 'auto'), or set TRITON_INTERPRET=1 "
            "in the environment before grok_torch.kernels is imported to run them in the interpreter")


def _use_reference(impl: str, x: torch.Tensor, lora: ExpertLoRA | None, op: str) -> bool:
    """The reference runs for impl "torch", and for expert LoRA with dropout (not in the kernels)."""
    if resolve_impl(impl, x) == "torch":
        return True
    if lora is not None and lora.dropout:
        _warn_once(f"{op}: expert LoRA with dropout > 0 runs on the PyTorch reference (the Triton kernels "
                   "take adapters without dropout)")
        return True
    return False


def fused_moe(
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
    impl: str = "auto",
    deterministic: bool = True,
    lora: ExpertLoRA | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Grok-1 MoE layer: fp32 router, top-k, `w2(gelu_tanh(w1 x) * w3 x)` per expert, gate-weighted sum.

    Args:
        x:          [T, D] float, the (unrounded fp32) pre-MoE RMSNorm output.
        router_w:   [D, E] fp32 router weight.
        w1, w3:     [E, D, F] gate (through GELU) and up projections, released [in, out] layout.
        w2:         [E, F, D] down projection.
        top_k:      experts per token (any k <= E).
        scales:     (s1, s3, s2) bf16 [E, G, N] when the weights are int8: one scale per output column
                    per group of K/G consecutive input rows (Grok-1: G=1 for w1/w3, G=8 for w2).
        renormalize: divide the k gates by their sum (off in Grok-1).
        router_softcap: c for c*tanh(logits/c) (Grok-2 style); None = off (Grok-1).
        compute_dtype: dtype of the expert matmuls; None -> w1.dtype if floating else bf16.
        expert_ids: [T, k] int, forced routing (parity tests); gates = router_probs at those ids.
        impl:       "auto" | "torch" | "triton" (see module docstring).
        deterministic: Triton only. True (default): the k expert outputs of a token are summed in slot
                    order by a separate combine launch, without atomics, so the same input gives the
                    same bits. False: the down GEMM's epilogue adds gate * y into a zeroed fp32 [T, D]
                    buffer with atomics (one launch fewer, no [T*k, D] intermediate); the summation order
                    then depends on scheduling, so results may differ between runs by fp32 rounding
                    (before the cast to compute_dtype). Gradients are the same either way. The reference
                    (impl="torch") accepts and ignores it: it is always deterministic.
        lora:       ``ExpertLoRA``: per-expert low-rank adapters on w1/w3/w2 (fine-tuning), the base
                    weights (int8 or float) frozen or not. Triton: the low-rank products run on the
                    same expert-sorted rows in exact fp32 and are added to the fp32 pre-activations
                    (before the GELU) and the expert outputs (before the gate); forward and backward
                    (x, gates, the adapters A and B). Adapter dropout > 0 is not in the kernels: that
                    case runs the reference (a warning says so once).

    Returns:
        out [T, D] compute_dtype, router_probs [T, E] fp32, topk_ids [T, k] int64.
    """
    kwargs = dict(
        top_k=top_k,
        scales=scales,
        renormalize=renormalize,
        router_softcap=router_softcap,
        compute_dtype=compute_dtype,
        expert_ids=expert_ids,
    )
    if _use_reference(impl, x, lora, "fused_moe"):
        return moe_reference(x, router_w, w1, w3, w2, lora=lora, **kwargs)
    from .ops import fused_moe_triton  # Triton only when asked for

    return fused_moe_triton(x, router_w, w1, w3, w2, deterministic=deterministic, lora=lora, **kwargs)


def moe_router(
    x: torch.Tensor,
    router_w: torch.Tensor,
    *,
    top_k: int = 2,
    renormalize: bool = False,
    router_softcap: float | None = None,
    expert_ids: torch.Tensor | None = None,
    impl: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The routing of ``fused_moe`` alone: (router_probs [T, E] fp32, gates [T, K] fp32, topk_ids [T, K] int64).

    Triton: one launch (fp32 router, softmax, top-k). When autograd records (x or router_w requires
    grad) the probabilities are recomputed with torch ops at the chosen experts, as fused_moe does,
    so gradients reach the router through the gates.
    """
    kwargs = dict(renormalize=renormalize, router_softcap=router_softcap)
    if resolve_impl(impl, x) == "torch":
        return route(x, router_w, top_k, expert_ids=expert_ids, **kwargs)
    from .ops import moe_router as router_triton
    from .ops import router_grad

    with torch.no_grad():
        probs, gates, ids = router_triton(x, router_w, top_k, expert_ids=expert_ids, **kwargs)
    ids = ids.long()
    probs, gates = router_grad(x, router_w, probs, gates, ids, **kwargs)
    return probs, gates, ids


def moe_experts(
    x: torch.Tensor,
    gates: torch.Tensor,
    topk_ids: torch.Tensor,
    w1: torch.Tensor,
    w3: torch.Tensor,
    w2: torch.Tensor,
    *,
    scales: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    expert_start: int = 0,
    f_partial: bool = False,
    compute_dtype: torch.dtype | None = None,
    impl: str = "auto",
    deterministic: bool = True,
    lora: ExpertLoRA | None = None,
) -> torch.Tensor:
    """The expert half of the MoE layer, routing given (from ``moe_router`` on the token's device).

    Computes ``sum_k gates[t, k] * expert_{topk_ids[t, k]}(x[t])`` over the slots whose expert this
    call holds, and returns it UNROUNDED as fp32 ``[T, D]`` (fp64 for fp64): callers add the partial
    results of several holders, then cast once to the compute dtype. Forward and backward (x, gates
    and float weights are differentiable). No host synchronisation on the Triton path.

    Args:
        x, gates, topk_ids: [T, D] tokens, [T, K] gates and [T, K] GLOBAL expert ids.
        w1, w3, w2:   [E_local, D, F_local], [E_local, D, F_local], [E_local, F_local, D]: experts
                      ``expert_start ... expert_start + E_local - 1``, or all experts with a slice
                      of their hidden dim F (``f_partial=True``).
        scales:       (s1, s3, s2) for int8 weights, sliced like the weights ([E_local, G, N]).
        expert_start: global id of w1[0]. Slots routed to experts outside the range add nothing.
        f_partial:    the weights hold a slice of F: each expert's down projection is a partial sum
                      and is not rounded to the compute dtype before the gate (the reference rounds
                      a complete one, as fused_moe does; the Triton kernels never round it).
        lora:         ``ExpertLoRA`` of these experts (indexed like w1), as in ``fused_moe`` (Triton
                      unless its dropout is > 0).

    With top_k = 2 (Grok-1), the sum of the expert-split partials equals ``fused_moe``'s output bit
    for bit before the final cast: a token's two slots are either in one partial, in the same
    order, or in two (fp32 addition of two terms commutes, and the other partials add exact zeros).
    """
    kwargs = dict(scales=scales, expert_start=expert_start, compute_dtype=compute_dtype)
    if _use_reference(impl, x, lora, "moe_experts"):
        return moe_experts_reference(x, gates, topk_ids, w1, w3, w2, f_partial=f_partial, lora=lora, **kwargs)
    from .ops import moe_experts_triton

    return moe_experts_triton(x, gates, topk_ids, w1, w3, w2, deterministic=deterministic, lora=lora, **kwargs)
