"""Pure-PyTorch MoE reference: the numerical oracle for every kernel in this package.

Map (shape suffixes: T tokens, D model dim, F expert hidden dim, E experts, K top-k, G scale groups):

    route(x_TD, router_w_DE)                  -> router_probs_TE (fp32), gates_TK (fp32), topk_ids_TK (int64)
    dequantize(w_xKN, scales_xGN, compute_dtype) -> W_xKN in compute_dtype (fp32: the exact product)
    gelu_tanh(z, compute_dtype)               -> GELU, tanh approximation, constants rounded to compute_dtype
    moe_experts_reference(x_TD, gates_TK, topk_ids_TK, w1, w3, w2, expert_start=0)
                                              -> fp32 out_TD over the experts held (routing given)
    moe_reference(...)                        -> (out_TD, router_probs_TE, topk_ids_TK)

It follows the official JAX code (xai-org/grok-1 model.py, see shared/grok1/SPEC.md section 3.3):
fp32 router, softmax over all E, top-k with ties to the lower expert index, gates NOT renormalised,
`w2(gelu_tanh(w1 x) * w3 x)` per expert, and the k expert outputs summed in slot order with the
gate rounded to the compute dtype first. Each expert only sees its own tokens (never all experts
for all tokens). Plain torch ops throughout, so autograd works through it unchanged.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional, Tuple

import torch

__all__ = ["ExpertLoRA", "route", "dequantize", "gelu_tanh", "gelu_constants", "linear_reference", "moe_experts_reference", "moe_reference", "resolve_compute_dtype"]


def resolve_compute_dtype(w: torch.Tensor, compute_dtype: torch.dtype | None) -> torch.dtype:
    """None -> the weight dtype if it is floating, else bf16 (int8 weights dequantise to bf16 like the release)."""
    if compute_dtype is not None:
        return compute_dtype
    return w.dtype if w.is_floating_point() else torch.bfloat16


def gelu_constants(compute_dtype: torch.dtype) -> tuple[float, float]:
    """sqrt(2/pi) and 0.044715 as the compute dtype holds them (JAX builds them in the input dtype)."""
    c1 = torch.tensor(math.sqrt(2.0 / math.pi), dtype=compute_dtype).item()
    c2 = torch.tensor(0.044715, dtype=compute_dtype).item()
    return c1, c2


def gelu_tanh(z: torch.Tensor, compute_dtype: torch.dtype) -> torch.Tensor:
    """z * 0.5 * (1 + tanh(c1 * (z + c2 * z**3))), evaluated in z's dtype with constants rounded to compute_dtype."""
    c1, c2 = gelu_constants(compute_dtype)
    return z * 0.5 * (1.0 + torch.tanh(c1 * (z + c2 * z**3)))


def route(
    x: torch.Tensor,
    router_w: torch.Tensor,
    top_k: int = 2,
    *,
    renormalize: bool = False,
    router_softcap: float | None = None,
    expert_ids: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """fp32 router. Returns (router_probs [T, E] fp32, gates [T, K] fp32, topk_ids [T, K] int64).

    Ties go to the lower expert index (jax.lax.top_k): a *stable* descending sort keeps equal
    probabilities in index order, which torch.topk does not promise.
    """
    # fp32 on purpose (the official router); fp64 inputs stay fp64 so gradcheck can run through it.
    acc = torch.promote_types(torch.promote_types(x.dtype, router_w.dtype), torch.float32)
    logits = x.to(acc) @ router_w.to(acc)
    if router_softcap:
        logits = router_softcap * torch.tanh(logits / router_softcap)
    probs = torch.softmax(logits, dim=-1)
    if expert_ids is not None:
        topk_ids = expert_ids.long()
        gates = probs.gather(-1, topk_ids)
    else:
        gates, topk_ids = torch.sort(probs, dim=-1, descending=True, stable=True)
        gates, topk_ids = gates[:, :top_k], topk_ids[:, :top_k]
    if renormalize:
        gates = gates / gates.sum(dim=-1, keepdim=True)
    return probs, gates, topk_ids


def dequantize(w: torch.Tensor, scales: torch.Tensor | None, compute_dtype: torch.dtype) -> torch.Tensor:
    """A weight [*lead, K, N] (int8 with scales [*lead, G, N], or floating) as a compute_dtype tensor.

    Scale row g covers the K/G consecutive input rows g*K/G ... (g+1)*K/G - 1 (SPEC section 5.3).
    The int8 x bf16 product is exact in fp32; it is rounded once to the compute dtype (kept in fp32).
    """
    if scales is None:
        return w.to(compute_dtype)
    *lead, K, N = w.shape
    G = scales.shape[-2]
    w_full = (w.float().reshape(*lead, G, K // G, N) * scales.float().unsqueeze(-2)).reshape(w.shape)
    return w_full if compute_dtype == torch.float32 else w_full.to(compute_dtype)  # fp32: the exact product


def linear_reference(x: torch.Tensor, w: torch.Tensor, scales: torch.Tensor | None = None, *,
                          precision: str = "fp32", transpose: bool = False) -> torch.Tensor:
    """``x @ deq(w)`` (or ``x @ deq(w)^T``) as fp32, the oracle of ``int8_linear_triton`` (no argument checks:
    ``int8_linear.int8_linear_reference`` is the checked entry; the model calls this one, without Triton).

    precision "fp32": exact dequantisation, fp32 matmul. "bf16": x and the exactly dequantised matrix
    rounded to bf16 each, then multiplied with fp32 accumulation (what the tensor-core kernel does).
    """
    if precision not in ("fp32", "bf16"):
        raise ValueError(f"precision must be 'fp32' or 'bf16', got {precision!r}")
    wf = dequantize(w, scales, torch.float32)
    xf = x.float()
    if precision == "bf16":
        wf, xf = wf.to(torch.bfloat16).float(), xf.to(torch.bfloat16).float()
    return xf @ (wf.T if transpose else wf)


class ExpertLoRA(NamedTuple):
    """Low-rank adapters of the stacked experts: ``(A [E, in, r], B [E, r, out])`` per matrix, or None.

    Expert e's matrix acts as ``W_e + scale * A_e @ B_e`` without forming it: the gate and up deltas
    ``scale * (dropout(x) @ A_e) @ B_e`` are added to the pre-activations before the GELU, the down
    delta to the expert output; in fp32, so an adapter with B = 0 changes no bit.
    """

    w1: Optional[Tuple[torch.Tensor, torch.Tensor]]
    w3: Optional[Tuple[torch.Tensor, torch.Tensor]]
    w2: Optional[Tuple[torch.Tensor, torch.Tensor]]
    scale: float
    dropout: float = 0.0  # applied to each adapter's input (pass 0 outside training)


def _lora_delta(x: torch.Tensor, ab, e: int, lora: ExpertLoRA) -> torch.Tensor:
    a, b = ab
    x = torch.nn.functional.dropout(x, lora.dropout) if lora.dropout else x
    return (x @ a[e].to(x.dtype)) @ b[e].to(x.dtype) * lora.scale


class _DequantMatmul(torch.autograd.Function):
    """``x @ dequantize(w, s, cd)`` that saves the stored (int8) matrix, not its dequantised copy, for
    backward (which dequantises again): training through frozen experts keeps no expert copy alive."""

    @staticmethod
    def forward(ctx, x, w, s, cd):
        ctx.save_for_backward(w, s)
        ctx.cd = cd
        return x @ dequantize(w, s, cd).to(x.dtype)

    @staticmethod
    def backward(ctx, dy):
        w, s = ctx.saved_tensors
        return dy @ dequantize(w, s, ctx.cd).to(dy.dtype).T, None, None, None


def _expert_matmul(x: torch.Tensor, w: torch.Tensor, s: torch.Tensor | None, cd: torch.dtype) -> torch.Tensor:
    """x @ deq(w): dequantised (rounded) to cd, multiplied in x's dtype; through _DequantMatmul when only
    x needs a gradient (frozen weights)."""
    if torch.is_grad_enabled() and x.requires_grad and not w.requires_grad:
        return _DequantMatmul.apply(x, w, s, cd)
    return x @ dequantize(w, s, cd).to(x.dtype)


def moe_experts_reference(
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
    lora: ExpertLoRA | None = None,
) -> torch.Tensor:
    """The experts of a routed MoE layer, routing given: ``sum_k gate_k * expert_k(x)`` over the k
    slots whose expert is held here, as fp32 ``[T, D]`` (fp64 stays fp64). See ``moe_experts``.

    w1/w3/w2 hold experts ``expert_start ... expert_start + w1.shape[0] - 1``; slots routed elsewhere
    add nothing. ``f_partial``: the weights hold a slice of the hidden dim F, so each expert's down
    projection is a partial sum: it is kept unrounded instead of being rounded to the compute dtype.
    """
    cd = resolve_compute_dtype(w1, compute_dtype)
    T, D = x.shape[0], w2.shape[-1]
    E_local = w1.shape[0]
    K = topk_ids.shape[1]
    acc = torch.promote_types(cd, torch.float32)  # fp32 accumulation (fp64 stays fp64 for gradcheck)
    s1, s3, s2 = scales if scales is not None else (None, None, None)

    # One row per (token, slot); each local expert fills the rows routed to it, the others stay 0.
    flat_ids = topk_ids.reshape(-1)
    y = x.new_zeros(T * K, D, dtype=acc if f_partial else cd)
    for e in range(E_local):
        rows = (flat_ids == e + expert_start).nonzero().squeeze(1)
        if rows.numel() == 0:
            continue  # an expert without tokens never touches its weights
        xe = x[rows // K].to(cd)
        g = _expert_matmul(xe, w1[e], None if s1 is None else s1[e], cd)
        u = _expert_matmul(xe, w3[e], None if s3 is None else s3[e], cd)
        if lora is not None and lora.w1 is not None:
            g = g.to(acc) + _lora_delta(xe.to(acc), lora.w1, e, lora)
        if lora is not None and lora.w3 is not None:
            u = u.to(acc) + _lora_delta(xe.to(acc), lora.w3, e, lora)
        a = (gelu_tanh(g.to(acc), cd) * u.to(acc)).to(cd)
        s2e = None if s2 is None else s2[e]
        ye = _expert_matmul(a.to(acc) if f_partial else a, w2[e], s2e, cd)
        if lora is not None and lora.w2 is not None:
            ye = (ye.to(acc) + _lora_delta(a.to(acc), lora.w2, e, lora)).to(ye.dtype)
        y = y.index_copy(0, rows, ye)

    # Weighted sum over slots in slot order, gate rounded to the compute dtype first (official code).
    # A slot held elsewhere adds an exact 0, so with k = 2 the partial sums of several holders add up
    # to the single-device bits (two fp32 terms commute).
    y = y.view(T, K, D).to(acc)
    g_TK = gates.to(cd).to(acc)
    out = g_TK[:, 0:1] * y[:, 0]
    for k in range(1, K):
        out = out + g_TK[:, k : k + 1] * y[:, k]
    return out


def moe_reference(
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
    lora: ExpertLoRA | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The MoE layer: ``route`` then ``moe_experts_reference`` over all experts. See the module docstring."""
    cd = resolve_compute_dtype(w1, compute_dtype)
    probs, gates, topk_ids = route(
        x, router_w, top_k, renormalize=renormalize, router_softcap=router_softcap, expert_ids=expert_ids
    )
    out = moe_experts_reference(x, gates, topk_ids, w1, w3, w2, scales=scales, compute_dtype=cd, lora=lora)
    return out.to(cd), probs, topk_ids
