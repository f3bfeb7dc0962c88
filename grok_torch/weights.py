"""How a stored matrix is held: ``Weight`` (int8 + bf16 scales as released, or a float matrix).

Layout is ``convert/weight_map.py``: the released ``[in, out]`` layout (``y = x @ w``), experts
stacked ``[E, in, out]``; int8 matrices carry ``scales [*lead, G, out]`` (bf16), one per output
column per group of ``in/G`` input rows.

A 2-D ``Weight`` is applied by calling it (``self.wq(x)``), so the int8 GEMM, adapters and placement
hooks attach in one place. On CUDA the int8 matrix is dequantised inside the GEMM kernel
(``grok_torch.kernels.int8_linear``): no fp32 copy of the matrix is made per call. Elsewhere the
reference dequantises and multiplies. In training, backward dequantises again (x's gradient is
``dy @ W^T``): no dequantised copy is kept alive between forward and backward.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn

from grok_torch.kernels import resolve_impl
from grok_torch.kernels.reference import dequantize, linear_reference  # one dequantization for attention and experts

__all__ = ["Weight", "SUPPORTED_DTYPES", "linear"]

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
        self.lora = None  # a grok_torch.lora.LoRA when fine-tuning this matrix

    @property
    def quantized(self) -> bool:
        return self.scales is not None

    def dequant(self, dtype: torch.dtype) -> torch.Tensor:
        """The matrix in ``dtype`` (int8 is dequantized on the fly: the reference path)."""
        return dequantize(self.weight, self.scales, dtype)

    def forward(self, x: torch.Tensor, precision: str = "fp32", impl: str = "auto") -> torch.Tensor:
        """``x [..., in] @ W`` -> fp32 ``[..., out]`` (2-D weights; see the module docstring).

        precision "fp32": exact dequantisation, fp32 products (the faithful path); "bf16": x and the
        dequantised matrix rounded to bf16, fp32 accumulation (tensor cores on a GPU).
        """
        if self.weight.dim() != 2:
            raise ValueError(f"Weight.forward applies a 2-D matrix; this one is {tuple(self.weight.shape)} "
                             f"(stacked experts go through grok_torch.kernels.fused_moe)")
        y = linear(x, self.weight, self.scales, precision=precision, impl=impl)
        return y if self.lora is None else y + self.lora(x)


def linear(x: torch.Tensor, w: torch.Tensor, scales: Optional[torch.Tensor], *, precision: str = "fp32",
           impl: str = "auto") -> torch.Tensor:
    """``x [..., K] @ deq(w [K, N])`` in fp32, differentiable in x (and in a float w that requires grad)."""
    lead = x.shape[:-1]
    y = _Linear.apply(x.reshape(-1, x.shape[-1]), w, scales, precision, resolve_impl(impl, x))
    return y.view(*lead, y.shape[-1])


def _matmul(x, w, scales, precision, impl, transpose=False):
    if impl == "triton":
        from grok_torch.kernels.int8_linear import int8_linear_triton

        return int8_linear_triton(x, w, scales, precision=precision, transpose=transpose)
    return linear_reference(x, w, scales, precision=precision, transpose=transpose)


class _Linear(torch.autograd.Function):
    """Saves the stored (int8) matrix, never a dequantised copy; backward dequantises again."""

    @staticmethod
    def forward(ctx, x, w, scales, precision, impl):
        ctx.save_for_backward(x if w.requires_grad else None, w, scales)
        ctx.precision, ctx.impl, ctx.x_dtype = precision, impl, x.dtype
        return _matmul(x, w, scales, precision, impl)

    @staticmethod
    def backward(ctx, dy):
        x, w, scales = ctx.saved_tensors
        dx = dw = None
        if ctx.needs_input_grad[0]:
            dx = _matmul(dy.contiguous(), w, scales, ctx.precision, ctx.impl, transpose=True).to(ctx.x_dtype)
        if ctx.needs_input_grad[1]:  # a float matrix being trained (full fine-tuning)
            dw = (x.float().T @ dy.float()).to(w.dtype)
        return dx, dw, None, None, None
