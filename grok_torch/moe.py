"""The Grok-1 MoE block: fp32 router + top-k experts, all expert math in ``grok_torch.kernels.fused_moe``.

Legend (shape suffixes): T tokens, D d_model, F expert hidden size, E experts, K experts per token,
G scale groups along the contracting dim.

    x_TD (fp32, unrounded pre-MoE RMSNorm output)
      -> fused_moe(x_TD, router_DE, w1_EDF, w3_EDF, w2_EFD, scales=(s1_EGF, s3_EGF, s2_EGD))
      -> out_TD (activation dtype), router_probs_TE (fp32), topk_ids_TK (int64)

Why the router sees fp32: XLA removes the f32->bf16->f32 round trip between ``rms_norm_2`` and the
router, so the official router consumes the fp32 norm output (SPEC §3.4; the bf16 value shifts
probabilities by up to 2.4e-3). The kernel layer groups tokens by expert: no expert ever
computes tokens that were not routed to it.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import nn

from grok_torch.config import GrokConfig
from grok_torch.weights import Weight

__all__ = ["MoE", "RoutedMoE", "Router", "expert_lora"]


class Router(nn.Module):
    """The router matrix ``[D, E]``; always fp32 (released fp32, and routing is precision-sensitive)."""

    def __init__(self, d_model: int, num_experts: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(d_model, num_experts, dtype=torch.float32), requires_grad=False)
        self.lora = None  # a grok_torch.lora.LoRA when fine-tuning the router

    def effective_weight(self) -> torch.Tensor:
        """The router matrix, plus its LoRA delta when adapted ([D, E]: small enough to add)."""
        return self.weight if self.lora is None else self.weight + self.lora.delta()


class RoutedMoE(nn.Module):
    """What every MoE block shares, wherever its experts live: the fp32 router and the config's
    routing settings. ``impl`` ("auto" | "torch" | "triton") is passed straight to the kernel
    layer; the model sets it from one switch (``Grok.impl``). Subclasses hold the experts:
    ``MoE`` (one device), ``grok_torch.parallel``'s ``ShardedMoE`` and ``ExpertParallelMoE``.
    """

    # whether a CUDA graph can hold this block's forward (no host synchronisation, no collectives)
    capturable = True

    def __init__(self, cfg: GrokConfig, dtype: torch.dtype):
        super().__init__()
        self.router = Router(cfg.d_model, cfg.num_experts)
        self.top_k = cfg.num_experts_per_tok
        self.renormalize = cfg.renormalize_gates
        self.router_softcap = cfg.router_logit_softcap
        self.dtype = dtype
        self.impl = "auto"

    def route(self, x_TD: torch.Tensor, expert_ids_TK: Optional[torch.Tensor] = None
              ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(router_probs [T, E] fp32, gates [T, K] fp32, topk_ids [T, K] int64): the router alone."""
        from grok_torch.kernels import moe_router

        return moe_router(x_TD, self.router.effective_weight(), top_k=self.top_k, renormalize=self.renormalize,
                          router_softcap=self.router_softcap, expert_ids=expert_ids_TK, impl=self.impl)


class MoE(RoutedMoE):
    """Router + stacked experts ``out = w2(gelu_tanh(w1 x) * w3 x)`` with un-renormalised top-k gates,
    on one device: routing and experts in one ``fused_moe`` call."""

    def __init__(self, cfg: GrokConfig, dtype: torch.dtype, quantized: bool):
        super().__init__(cfg, dtype)
        D, F, E = cfg.d_model, cfg.ffn_size, cfg.num_experts
        g = cfg.quant_groups
        self.w1 = Weight((E, D, F), g["w1"], quantized, dtype)   # gate proj, goes through GELU
        self.w3 = Weight((E, D, F), g["w3"], quantized, dtype)   # up proj, linear
        self.w2 = Weight((E, F, D), g["w2"], quantized, dtype)   # down proj

    def forward(
        self, x_TD: torch.Tensor, expert_ids_TK: Optional[torch.Tensor] = None
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x_TD: fp32 [T, D]. expert_ids_TK forces the routing (gates are the probs at those ids).

        Returns (out_TD in the activation dtype, router_probs_TE fp32, topk_ids_TK int64).
        """
        from grok_torch.kernels import fused_moe  # imported late: the model module stays importable alone

        ws = (self.w1, self.w3, self.w2)
        scales = tuple(w.scales for w in ws) if self.w1.quantized else None
        return fused_moe(
            x_TD, self.router.effective_weight(), self.w1.weight, self.w3.weight, self.w2.weight,
            top_k=self.top_k, scales=scales, renormalize=self.renormalize,
            router_softcap=self.router_softcap, compute_dtype=self.dtype,
            expert_ids=expert_ids_TK, impl=self.impl, lora=expert_lora(self),
        )


def expert_lora(block: nn.Module):
    """The adapters of ``block.w1 / w3 / w2`` (stacked experts) as ``grok_torch.kernels.ExpertLoRA``, or None.

    Dropout is on only while ``block.training``.
    """
    from grok_torch.kernels import ExpertLoRA

    loras = [w.lora for w in (block.w1, block.w3, block.w2)]
    if all(lo is None for lo in loras):
        return None
    first = next(lo for lo in loras if lo is not None)
    return ExpertLoRA(*[None if lo is None else (lo.A, lo.B) for lo in loras], scale=first.scale,
                      dropout=first.p if block.training else 0.0)
