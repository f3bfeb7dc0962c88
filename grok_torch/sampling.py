"""Next-token sampling as the official runner does it (xai-org/grok-1 runners.py, SPEC §6).

    logits [B, V] -> / temperature (in the logits' dtype) -> top-k (ours) -> top-p (official rule)
                  -> softmax fp32 -> torch.multinomial with a seeded per-row torch.Generator

temperature 0 is greedy (argmax, ties to the lower id). JAX PRNG streams cannot be reproduced in
torch, so only greedy / near-greedy outputs and the probabilities are comparable to the official ones.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import List, Optional, Sequence

import torch

__all__ = ["SampleSettings", "top_p_filter", "top_k_filter", "next_token_probs", "sample"]

FILTERED = -1e10  # official value for removed tokens (runners.py)


@dataclass(frozen=True)
class SampleSettings:
    """temperature 0 = greedy; top_p 1.0 and top_k 0 keep every token."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0

    def __post_init__(self):
        # written so that NaN fails every check
        if not (0.0 <= self.temperature < math.inf):
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if not (0.0 < self.top_p <= 1.0):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not isinstance(self.top_k, numbers.Integral) or self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0, got {self.top_k}")


def top_p_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Official rule: sort ascending, softmax, cumsum; the threshold is the first sorted logit whose
    cumulative probability reaches 1 - top_p; keep every logit >= it (ties at the threshold kept).

    When no entry reaches it (a tiny top_p: the fp32 cumsum can end below 1 - top_p, e.g. at
    0.99999994 for top_p 1e-8), the threshold is the largest logit: only the max (and its ties) survive.
    """
    sorted_logits = logits.sort(dim=-1).values
    cum = torch.softmax(sorted_logits.float(), dim=-1).cumsum(dim=-1)
    hit = cum >= 1 - top_p
    idx = hit.int().argmax(dim=-1, keepdim=True)  # first True (0 when there is none)
    idx = torch.where(hit.any(dim=-1, keepdim=True), idx, torch.full_like(idx, logits.shape[-1] - 1))
    threshold = sorted_logits.gather(-1, idx)
    return logits.masked_fill(logits < threshold, FILTERED)


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k largest logits (and anything tied with the k-th); not in the official runner."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = logits.topk(k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, FILTERED)


def next_token_probs(logits: torch.Tensor, settings: SampleSettings) -> torch.Tensor:
    """fp32 [B, V] distribution after temperature (cast to the logits dtype, as official), top-k, top-p."""
    t = max(settings.temperature, 1e-6)  # temperature 0 handled by sample(); keep this finite
    scaled = logits / torch.tensor(t, dtype=logits.dtype)
    scaled = top_p_filter(top_k_filter(scaled, settings.top_k), settings.top_p)
    return torch.softmax(scaled.float(), dim=-1)


def sample(logits: torch.Tensor, settings: SampleSettings,
           generators: Optional[Sequence[Optional[torch.Generator]]] = None) -> torch.Tensor:
    """One token id per row of ``logits [B, V]``; ``generators[b]`` drives row b (None: global RNG)."""
    if settings.temperature == 0:
        return logits.float().argmax(dim=-1)
    probs = next_token_probs(logits, settings)
    gens: List[Optional[torch.Generator]] = list(generators) if generators is not None else [None] * len(probs)
    return torch.cat([torch.multinomial(p, 1, generator=g) for p, g in zip(probs, gens)])
