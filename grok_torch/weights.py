"""How a stored matrix is held: ``Weight`` (int8 + bf16 scales as released, or a float matrix).

Layout is ``convert/weight_map.py``: the released ``[in, out]`` layout (``y = x @ w``), experts
stacked ``[E, in, out]``; int8 matrices carry ``scales [*lead, G, out]`` (bf16), one per output
column per group of ``in/G`` input rows.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from grok_torch.kernels.reference import dequantize  # one dequantization for attention and experts

__all__ = ["Weight", "SUPPORTED_DTYPES"]

# Activation dtypes the faithful model supports: bf16 (the release's fprop dtype) and fp32 (SPEC §8.1).
SUPPORTED_DTYPES = (torch.bfloat16, torch.float32)


class Weight(nn.Module):
    """One stored matrix ``weight [*lead, in, out]`` and, when quantized, ``scales [*lead, G, out]`` (bf16).

    ``fp32_math``: the consumer computes in fp32 (attention). Loading then keeps an fp32 float
    checkpoint's matrix in fp32 instead of rounding it to the activation dtype, so it holds the same
    exact int8*scale products the int8 path dequantizes to.
    """

    def __init__(self, shape: Sequence[int], groups: int, quantized: bool, dtype: torch.dtype,
                 fp32_math: bool = False):
        super().__init__()
        shape = tuple(shape)
        self.fp32_math = fp32_math
        self.weight = nn.Parameter(torch.empty(shape, dtype=torch.int8 if quantized else dtype), requires_grad=False)
        if quantized:
            scales = torch.empty(*shape[:-2], groups, shape[-1], dtype=torch.bfloat16)
            self.scales = nn.Parameter(scales, requires_grad=False)
        else:
            self.scales = None

    @property
    def quantized(self) -> bool:
        return self.scales is not None

    def dequant(self, dtype: torch.dtype) -> torch.Tensor:
        """The matrix in ``dtype`` (int8 is dequantized on the fly: the reference path)."""
        return dequantize(self.weight, self.scales, dtype)
