"""A MoE block whose experts are split over several devices of one process.

    x_TD (layer's device) -> moe_router (once, fused router kernel)    probs, gates, topk_ids
      -> for each shard: x, gates, ids -> shard device (non_blocking)
           moe_experts(shard's experts | shard's F slice)              fp32 partial [T, D]
         partial -> layer's device (non_blocking)
      -> sum of the partials (fp32), one cast to the compute dtype

Two splits (``SPLITS``):
* "experts": shard j holds a contiguous range of experts (expert e of every layer on GPU e with 8
  GPUs). A token's partials hold its k slots in at most k shards; for k = 2 the sum is bit-equal to
  the single-device layer (see ``grok_torch.kernels.moe_experts``).
* "ffn": shard j holds columns j*F/n ... of w1/w3 and those rows of w2 of EVERY expert (the official
  (1, 8) mesh). Every shard computes every routed token on its slice; the partial down projections
  are summed unrounded (fp32), so logits differ from one device by fp32 rounding only.

Nothing here synchronises with the host, so the shards' kernels on different GPUs run concurrently
(the host queues each device's work and moves on) and the block stays CUDA-graph friendly.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List, Optional, Tuple

import torch
from torch import nn

from grok_torch.config import GrokConfig
from grok_torch.moe import MoE, RoutedMoE
from grok_torch.weights import Weight

__all__ = ["SPLITS", "ShardSpec", "shard_specs", "ExpertShard", "ShardedMoE", "shard_moe_blocks", "replace_moe_blocks"]

SPLITS = ("experts", "ffn")


@dataclass(frozen=True)
class ShardSpec:
    """The part of every layer's experts one holder keeps: experts [expert_start, expert_stop) and,
    of each, hidden columns [f_start, f_stop) (rows of w2); w2's scale groups [g_start, g_stop)."""

    expert_start: int
    expert_stop: int
    f_start: int
    f_stop: int
    g_start: int
    g_stop: int
    f_partial: bool

    @property
    def num_experts(self) -> int:
        return self.expert_stop - self.expert_start

    def slices(self, what: str) -> Tuple[slice, ...]:
        """Index of this shard in a stacked checkpoint tensor ``w1|w3|w2`` + ``.weight|.scales``."""
        e = slice(self.expert_start, self.expert_stop)
        f = slice(self.f_start, self.f_stop)
        return {
            "w1.weight": (e, slice(None), f), "w3.weight": (e, slice(None), f), "w2.weight": (e, f, slice(None)),
            "w1.scales": (e, slice(None), f), "w3.scales": (e, slice(None), f),
            "w2.scales": (e, slice(self.g_start, self.g_stop), slice(None)),
        }[what]


def shard_specs(cfg: GrokConfig, split: str, parts: int) -> List[ShardSpec]:
    """The ``parts`` shards of a split, or a ValueError saying which split or count would work."""
    E, F = cfg.num_experts, cfg.ffn_size
    G = cfg.quant_groups["w2"] if cfg.weight_format == "int8" else 1
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if parts < 1:
        raise ValueError(f"need at least one device, got {parts}")
    if split == "experts":
        if E % parts:
            raise ValueError(f"split 'experts' needs a device count that divides the {E} experts, got {parts} "
                             f"(use {', '.join(str(d) for d in range(1, E + 1) if E % d == 0)} devices, or split 'ffn')")
        n = E // parts
        return [ShardSpec(j * n, (j + 1) * n, 0, F, 0, G, False) for j in range(parts)]
    # an int8 w2 carries one scale row per F/G rows: a slice must hold whole groups
    if F % parts or (G > 1 and G % parts):
        ok = [d for d in range(1, 65) if F % d == 0 and (G == 1 or G % d == 0)]
        raise ValueError(f"split 'ffn' needs a device count that divides the hidden size F={F}"
                         + (f" and w2's {G} int8 scale groups" if G > 1 else "")
                         + f", got {parts} (use {', '.join(map(str, ok))} devices, or split 'experts')")
    n, g = F // parts, G // parts if G > 1 else 1
    return [ShardSpec(0, E, j * n, (j + 1) * n, j * g if G > 1 else 0, (j + 1) * g if G > 1 else 1, parts > 1)
            for j in range(parts)]


class ExpertShard(nn.Module):
    """w1, w3 ``[E_j, D, F_j]`` and w2 ``[E_j, F_j, D]`` of one shard (int8 + scales or float)."""

    def __init__(self, cfg: GrokConfig, spec: ShardSpec, dtype: torch.dtype, quantized: bool):
        super().__init__()
        D, e, f = cfg.d_model, spec.num_experts, spec.f_stop - spec.f_start
        g = cfg.quant_groups
        self.spec = spec
        self.w1 = Weight((e, D, f), g["w1"], quantized, dtype)
        self.w3 = Weight((e, D, f), g["w3"], quantized, dtype)
        self.w2 = Weight((e, f, D), spec.g_stop - spec.g_start if quantized else g["w2"], quantized, dtype)

    def forward(self, x_TD: torch.Tensor, gates_TK: torch.Tensor, ids_TK: torch.Tensor,
                compute_dtype: torch.dtype, impl: str) -> torch.Tensor:
        """fp32 partial [T, D] of the tokens' slots held here (all tokens for an F slice)."""
        from grok_torch.kernels import moe_experts
        from grok_torch.moe import expert_lora

        ws = (self.w1, self.w3, self.w2)
        return moe_experts(
            x_TD, gates_TK, ids_TK, *(w.weight for w in ws),
            scales=tuple(w.scales for w in ws) if self.w1.quantized else None,
            expert_start=self.spec.expert_start, f_partial=self.spec.f_partial,
            compute_dtype=compute_dtype, impl=impl, lora=expert_lora(self),
        )


class ShardedMoE(RoutedMoE):
    """Drop-in for ``MoE`` (same forward contract) with the experts in ``shards`` on their devices.

    The router stays with the layer (its device is the token's device); each shard may live anywhere.
    """

    def __init__(self, cfg: GrokConfig, dtype: torch.dtype, quantized: bool, specs: List[ShardSpec]):
        super().__init__(cfg, dtype)
        self.shards = nn.ModuleList(ExpertShard(cfg, s, dtype, quantized) for s in specs)

    @property
    def split(self) -> str:
        return "ffn" if self.shards[0].spec.f_partial else "experts"

    def forward(
        self, x_TD: torch.Tensor, expert_ids_TK: Optional[torch.Tensor] = None
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        home = x_TD.device
        probs, gates, ids = self.route(x_TD, expert_ids_TK)
        # queue every shard's work before reading any result: shards on different GPUs overlap
        partials = []
        for shard in self.shards:
            dev = shard.w1.weight.device
            part = shard(x_TD.to(dev, non_blocking=True), gates.to(dev, non_blocking=True),
                         ids.to(dev, non_blocking=True), self.dtype, self.impl)
            partials.append(part.to(home, non_blocking=True))
        out = partials[0]
        for p in partials[1:]:
            out = out + p
        return out.to(self.dtype), probs, ids


def replace_moe_blocks(model: nn.Module, build: Callable[[int], nn.Module]) -> None:
    """Replace every layer's one-device ``MoE`` by ``build(layer index)``, built on the meta device
    (the weights are read later, each shard's slice straight to its device), keeping ``impl``."""
    for i, layer in enumerate(model.layers):
        if not isinstance(layer.moe, MoE):
            raise ValueError("the model's MoE blocks are already sharded")
        impl = layer.moe.impl
        with torch.device("meta"):
            layer.moe = build(i)
        layer.moe.impl = impl


def shard_moe_blocks(model: nn.Module, specs: List[ShardSpec]) -> None:
    """Replace every layer's ``MoE`` by a ``ShardedMoE`` with these shards."""
    quantized = model.config.weight_format == "int8"
    replace_moe_blocks(model, lambda i: ShardedMoE(model.config, model.dtype, quantized, specs))
