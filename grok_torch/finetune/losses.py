"""Losses of fine-tuning: next-token cross-entropy and the two optional router losses.

    lm_loss(logits [B, T, V], labels [B, T])       mean over labels != -100 (fp32)
    lm_loss_sum(head, hidden [B, T, D], labels)    the same as a sum, the head applied a chunk at a time
    load_balancing_loss(router_stats, valid)       Switch / Mixtral: E * sum_e f_e * P_e, mean over layers
    router_z_loss(router_stats, valid)             ST-MoE: mean over tokens of logsumexp(router logits)^2

``router_stats`` is the list ``Grok.forward(..., router_stats=[])`` fills: per layer (router logits
[N, E] fp32, probs [N, E], top-k ids [N, k]) for the N = B*T positions; ``valid`` [N] marks the
positions that count (not padding). Load balancing, as transformers computes it for Mixtral:
``f_e`` is the fraction of (token, slot) pairs routed to e per slot and ``P_e`` the mean router
probability of e, so ``E * sum(f * P)`` summed over the k slots is k at perfect balance (2 for
Grok-1) and grows as routing concentrates. The official Grok-1 code trains with neither (its router
returns 0 as aux loss): both are off unless a weight is given.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch

__all__ = ["lm_loss", "lm_loss_sum", "load_balancing_loss", "router_z_loss", "IGNORE_INDEX"]

IGNORE_INDEX = -100


def lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy in fp32 over positions whose label is not IGNORE_INDEX.

    A batch without any such position (a row of prompt only) gives 0 with zero gradients, not NaN.
    """
    flat = labels.flatten().to(logits.device)
    count = (flat != IGNORE_INDEX).sum().clamp_min(1)
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), flat, ignore_index=IGNORE_INDEX,
                                             reduction="sum") / count


def _ce_sum(head, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cross_entropy(head(hidden).flatten(0, 1).float(), labels.flatten(),
                                             ignore_index=IGNORE_INDEX, reduction="sum")


def lm_loss_sum(head, hidden: torch.Tensor, labels: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """Sum over target tokens of the cross-entropy of ``head(hidden)``, ``chunk`` positions at a time.

    Grok-1's logits are [B, T, 131072] (2 GB in fp32 per 4k row, and the cast makes another): with
    autograd recording and T > chunk, each chunk's logits are recomputed in backward
    (``torch.utils.checkpoint``), so one chunk's logits exist at a time. T <= chunk is one plain
    cross-entropy, the same computation as ``lm_loss`` (times the token count).
    """
    labels = labels.to(hidden.device)
    T = hidden.shape[1]
    if T <= chunk:
        return _ce_sum(head, hidden, labels)
    from torch.utils.checkpoint import checkpoint

    total = hidden.new_zeros((), dtype=torch.float32)
    for t0 in range(0, T, chunk):
        h, lab = hidden[:, t0:t0 + chunk], labels[:, t0:t0 + chunk]
        if torch.is_grad_enabled() and hidden.requires_grad:
            total = total + checkpoint(_ce_sum, head, h, lab, use_reentrant=False)
        else:
            total = total + _ce_sum(head, h, lab)
    return total


Stats = List[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


def _masked_mean(x: torch.Tensor, valid: Optional[torch.Tensor]) -> torch.Tensor:
    if valid is None:
        return x.mean(0)
    w = valid.to(x.device, x.dtype).view(-1, *([1] * (x.dim() - 1)))
    return (x * w).sum(0) / w.sum().clamp_min(1)


def load_balancing_loss(router_stats: Stats, valid: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Switch/Mixtral load balancing, averaged over layers (k at perfect balance; see the module docstring)."""
    losses = []
    for _, probs, topk in router_stats:
        E = probs.shape[-1]
        routed = torch.nn.functional.one_hot(topk, E).to(probs.dtype)   # [N, k, E]
        f = _masked_mean(routed, valid)                                  # [k, E] (no gradient: counts)
        P = _masked_mean(probs.float(), valid)                           # [E]
        losses.append(E * (f * P).sum())
    return torch.stack(losses).mean()


def router_z_loss(router_stats: Stats, valid: Optional[torch.Tensor] = None) -> torch.Tensor:
    """ST-MoE z-loss: mean over valid positions of logsumexp(router logits)^2, averaged over layers."""
    return torch.stack([_masked_mean(torch.logsumexp(logits.float(), -1) ** 2, valid)
                        for logits, _, _ in router_stats]).mean()
