"""Weight-only int8 linear for Grok-1's attention projections: ``x @ deq(w)`` without a weight copy.

    int8_linear_triton(x, w, scales=None, *, precision="fp32", transpose=False)     the kernel
    int8_linear_reference(x, w, scales=None, *, precision="fp32", transpose=False)  the oracle

Semantics (both functions; the reference is the definition):

* ``x`` ``[M, K]`` (``[M, N]`` with ``transpose=True``), fp32, bf16 or fp16; the Triton path wants its
  last dim contiguous (any row stride: a row-strided view is read in place).
* ``w`` ``[K, N]`` in the released layout (``y = x @ w``): int8 with ``scales`` ``[G, N]`` bf16
  (``K % G == 0``), or a floating matrix (fp32/bf16/fp16) with ``scales=None``. Any strides.
  The dequantised weight is ``deq(w)[k, n] = float32(w[k, n]) * float32(scales[k // (K // G), n])``,
  exact in fp32 (an 8-bit integer times an 8-bit significand) — ``reference.dequantize``.
* returns a new fp32 tensor: ``[M, N] = x @ deq(w)``, or with ``transpose=True`` ``[M, K] = x @ deq(w)^T``
  (the backward's grad_input; element (k, n) still takes ``scales[k // (K // G), n]``).
* ``precision="fp32"`` (default, faithful): fp32 operands (x widened exactly), the exact fp32 weight,
  ``tl.dot(..., input_precision="ieee")`` (no tf32), fp32 accumulation: it equals
  ``x.float() @ dequantize(w, scales, torch.float32)`` up to fp32 summation order.
  ``precision="bf16"``: x rounded to bf16, the exact fp32 weight rounded once to bf16, a tensor-core
  dot, fp32 accumulation; the reference rounds the same way and multiplies the rounded values in fp32.

Why no copies: the model's old path built ``dequantize(w, scales, fp32)`` for every matrix on every
forward (a [6144, 6144] fp32 temporary is 151 MB; ~350 MB per layer). Here each program loads its
int8 weight tile (1 byte/element: the bandwidth floor at decode) and dequantises it in registers;
the scale vector of a (K group, column tile) is loaded once per group, not per element. The only
allocations are the fp32 output and, when the reduction is split, an fp32 ``[SPLIT, M, N_out]``
partial buffer (SPLIT x M x N_out x 4 bytes: 0.6 MB at M=8, 9 MB at M=64, against 151 MB for one
weight copy). No host synchronisation: every launch parameter comes from shapes, strides and dtypes
(tests/test_int8_linear.py records the launches on the ``meta`` device, where a host read raises).

Tiles (``int8_linear_config``; untuned guesses, checked to compile for sm_90 without spilling):

* decode (M <= 16): BLOCK_M 16 (the smallest tl.dot tile), BLOCK_N 64, BLOCK_K 128 (bf16) / 32
  (fp32, 8 warps). 6144 output columns make only 96 column tiles for 132 SMs (1024 columns: 16), so the
  reduction is split into SPLIT chunks (>= 4 K steps each) until there are about two CTAs per SM;
  each chunk writes its own fp32 partial and ``_int8_linear_reduce_kernel`` adds them in chunk order:
  deterministic (same input, same bits), no atomics, one extra launch.
* 16 < M <= 128: bf16 64 x 128 x 64 (wgmma), split likewise when there are fewer tiles than SMs.
* prefill (M > 128): bf16 128 x 128 x 64, 8 warps (wgmma). fp32 above 16 rows (an FMA parity mode,
  no tensor cores): 64 x 64 x 16, 8 warps.
  Programs are ordered in groups of GROUP_M row tiles so a wave shares its weight tiles in L2.

Scales (SCALE_MODE): 1, ``w`` not transposed and K // G a multiple of BLOCK_K: the [BLOCK_N] scale
row of the group is loaded once per (group, column tile, chunk); 2, transposed and K // G a multiple of the output tile:
the output tile lies in one group, and its scale varies along the reduction, a [BLOCK_K] vector per
step (2/BLOCK_N of the weight bytes); 3, smaller groups (tests): a per-element gather; 0, float w.
Everything is fp32 in the accumulator; the output is always fp32.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

# Without a GPU the kernel runs only under the interpreter the user opts into (TRITON_INTERPRET=1, see ops.py).
from . import require_launchable
from .reference import linear_reference

__all__ = ["int8_linear_reference", "int8_linear_triton", "int8_linear_config", "Int8LinearConfig"]

NUM_SMS = 132  # H100/H200 SXM; only used to size the split-K (a shape-only choice, no device query)
_X_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_W_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_CDTYPE = {"fp32": tl.float32, "bf16": tl.bfloat16}


@triton.jit
def _int8_linear_kernel(
    x_ptr,  # *fp32|bf16|fp16 [M, R], last dim contiguous
    w_ptr,  # *int8|float weight seen as [R, N_OUT] through (stride_wr, stride_wo)
    s_ptr,  # *bf16 scales [G, N] of the [K, N] weight (read only when SCALE_MODE > 0)
    out_ptr,  # *fp32 [SPLIT, M, N_OUT] (SPLIT 1: the output itself)
    M,  # rows of x
    N_OUT,  # output columns (N, or K when transposed)
    R,  # reduction length (K, or N when transposed)
    CHUNK,  # reduction rows per split program (a multiple of BLOCK_K; R when not split)
    GROUP_R,  # SCALE_MODE 1: reduction rows per scale row (K // G); otherwise R
    GROUP_K,  # K // G: weight rows per scale row (SCALE_MODE 2 and 3)
    stride_xm,  # row stride of x
    stride_wr, stride_wo,  # weight strides along the reduction and the output columns
    stride_sg, stride_sn,  # scale strides: per group (scale row), per weight column n
    stride_os, stride_om,  # output strides: per split, per row (columns contiguous)
    SCALE_MODE: tl.constexpr,  # 0 float w; 1 scale row per group; 2 scale vector along R; 3 gather
    TRANSPOSE: tl.constexpr,  # the weight is read transposed (scale of (r, o) is s[o // GROUP_K, r])
    EVEN_R: tl.constexpr,  # R % BLOCK_K == 0: no step crosses a chunk, group or the end (no K mask)
    CDTYPE: tl.constexpr,  # dot operand dtype: fp32 (exact, ieee) or bf16 (tensor cores)
    DOT_PRECISION: tl.constexpr,  # "ieee" for fp32 operands; ignored by 16-bit dots
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,  # output columns per program
    BLOCK_K: tl.constexpr,  # reduction step
    GROUP_M: tl.constexpr,  # row tiles per launch-order group (L2 reuse of weight tiles)
):
    pid = tl.program_id(0)
    pid_s = tl.program_id(1)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N_OUT, BLOCK_N)
    per_group = GROUP_M * num_pid_n
    first_m = (pid // per_group) * GROUP_M
    size_m = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % size_m
    pid_n = (pid % per_group) // size_m

    ar_m = tl.arange(0, BLOCK_M)
    ar_n = tl.arange(0, BLOCK_N)
    ar_k = tl.arange(0, BLOCK_K)
    offs_m = pid_m * BLOCK_M + ar_m
    offs_n = pid_n * BLOCK_N + ar_n
    m_mask = offs_m < M
    n_mask = offs_n < N_OUT
    # 64-bit tile bases, 32-bit offsets inside a tile
    x_base = x_ptr + (pid_m * BLOCK_M).to(tl.int64) * stride_xm
    x_rel = ar_m[:, None] * stride_xm + ar_k[None, :]
    w_base = w_ptr + (pid_n * BLOCK_N).to(tl.int64) * stride_wo
    w_rel = ar_k[:, None] * stride_wr + ar_n[None, :] * stride_wo
    if SCALE_MODE == 2:
        # transposed, the output tile inside one scale group: that group's row, along R
        s_base = s_ptr + ((pid_n * BLOCK_N) // GROUP_K).to(tl.int64) * stride_sg

    r_start = pid_s * CHUNK
    r_stop = tl.minimum(r_start + CHUNK, R)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for grp in range(r_start // GROUP_R, tl.cdiv(r_stop, GROUP_R)):
        lo = tl.maximum(r_start, grp * GROUP_R)
        hi = tl.minimum(r_stop, (grp + 1) * GROUP_R)
        if SCALE_MODE == 1:
            # one [BLOCK_N] scale row per (group, column tile)
            s_row = tl.load(s_ptr + grp * stride_sg + offs_n * stride_sn, mask=n_mask, other=0.0).to(tl.float32)
        for r0 in range(lo, hi, BLOCK_K):
            r0 = tl.multiple_of(r0, BLOCK_K)
            if EVEN_R:
                a = tl.load(x_base + r0 + x_rel, mask=m_mask[:, None], other=0.0)
                b = tl.load(w_base + r0 * stride_wr + w_rel, mask=n_mask[None, :], other=0)
            else:
                k_mask = r0 + ar_k < hi
                a = tl.load(x_base + r0 + x_rel, mask=m_mask[:, None] & k_mask[None, :], other=0.0)
                b = tl.load(w_base + r0 * stride_wr + w_rel,
                            mask=k_mask[:, None] & n_mask[None, :], other=0)
            if SCALE_MODE == 1:
                b = b.to(tl.float32) * s_row[None, :]  # exact in fp32
            elif SCALE_MODE == 2:
                s_col = tl.load(s_base + (r0 + ar_k) * stride_sn, mask=r0 + ar_k < R, other=0.0)
                b = b.to(tl.float32) * s_col.to(tl.float32)[:, None]
            elif SCALE_MODE == 3:
                offs_r = r0 + ar_k
                if TRANSPOSE:
                    s_off = (offs_n // GROUP_K)[None, :] * stride_sg + offs_r[:, None] * stride_sn
                else:
                    s_off = (offs_r // GROUP_K)[:, None] * stride_sg + offs_n[None, :] * stride_sn
                s = tl.load(s_ptr + s_off, mask=(offs_r < R)[:, None] & n_mask[None, :], other=0.0)
                b = b.to(tl.float32) * s.to(tl.float32)
            acc = tl.dot(a.to(CDTYPE), b.to(CDTYPE), acc, input_precision=DOT_PRECISION, out_dtype=tl.float32)

    out = out_ptr + pid_s.to(tl.int64) * stride_os + offs_m.to(tl.int64)[:, None] * stride_om + offs_n[None, :]
    tl.store(out, acc, mask=m_mask[:, None] & n_mask[None, :])


@triton.jit
def _int8_linear_reduce_kernel(
    part_ptr,  # *fp32 [SPLIT, NUMEL] partial sums, contiguous
    out_ptr,  # *fp32 [NUMEL] out
    NUMEL,  # M * N_OUT
    SPLIT,  # number of partials
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < NUMEL
    acc = tl.load(part_ptr + offs, mask=mask, other=0.0)
    for s in range(1, SPLIT):  # chunk order: a fixed summation order, the same bits every run
        acc += tl.load(part_ptr + s * NUMEL + offs, mask=mask, other=0.0)
    tl.store(out_ptr + offs, acc, mask=mask)


@dataclass(frozen=True)
class Int8LinearConfig:
    block_m: int
    block_n: int
    block_k: int
    split: int  # reduction chunks (1: no split, no second launch)
    chunk: int  # reduction rows per chunk, a multiple of block_k
    num_warps: int
    num_stages: int
    group_m: int = 8


def int8_linear_config(M: int, n_out: int, r: int, precision: str = "fp32", group_rows: int | None = None,
                       num_sms: int = NUM_SMS) -> Int8LinearConfig:
    """Tiles for an [M, r] @ [r, n_out] product (shapes only). group_rows: K // G when the scale
    groups run along the reduction (not transposed), so that BLOCK_K divides it where it can."""
    fp32 = precision == "fp32"
    if fp32:  # FMA dots (exact parity mode): 8 warps, short K steps, no register spills
        bm, bn, bk, warps, stages = (16, 64, 32, 8, 3) if M <= 16 else (64, 64, 16, 8, 3)
    elif M <= 16:  # 2 stages: 3 or 4 spill registers on sm_90 when x arrives in fp32 (the model's case)
        bm, bn, bk, warps, stages = 16, 64, 128, 4, 2
    elif M <= 128:
        bm, bn, bk, warps, stages = 64, 128, 64, 4, 3
    else:
        bm, bn, bk, warps, stages = 128, 128, 64, 8, 3
    if group_rows is not None:  # the largest power-of-two step (>= 16) that divides the group, if any
        fits = [b for b in (bk, bk // 2, bk // 4, bk // 8) if b >= 16 and group_rows % b == 0]
        bk = fits[0] if fits else bk  # none: per-element scales (SCALE_MODE 3) with the default step
    tiles = triton.cdiv(M, bm) * triton.cdiv(n_out, bn)
    split = 1
    if tiles < num_sms:  # ~2 CTAs per SM, each chunk at least 4 K steps
        split = max(1, min(triton.cdiv(2 * num_sms, tiles), r // (4 * bk)))
    chunk = triton.cdiv(triton.cdiv(max(r, 1), split), bk) * bk
    split = triton.cdiv(max(r, 1), chunk)  # no empty chunk
    return Int8LinearConfig(bm, bn, bk, split, chunk if split > 1 else max(r, 1), warps, stages)


def _plan(M: int, K: int, N: int, G: int, int8: bool, precision: str, transpose: bool) -> tuple[Int8LinearConfig, int]:
    """(tile config, SCALE_MODE) of a call: see the module docstring."""
    n_out, r, gk = (K, N, K // G) if transpose else (N, K, K // G)
    cfg = int8_linear_config(M, n_out, r, precision, gk if int8 and not transpose else None)
    if not int8:
        return cfg, 0
    if not transpose:
        return cfg, 1 if gk % cfg.block_k == 0 else 3
    return cfg, 2 if gk % cfg.block_n == 0 else 3


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


def _max_offset(t: torch.Tensor) -> int:
    return sum((n - 1) * abs(st) for n, st in zip(t.shape, t.stride()))


def _check_args(x, w, scales, precision, transpose) -> tuple[int, int, int, int]:
    """Shape/dtype checks shared by both implementations; returns (M, K, N, G)."""
    _check(precision in ("fp32", "bf16"), f"precision must be 'fp32' or 'bf16', got {precision!r}")
    _check(x.dim() == 2, f"x must be 2-D [M, in_features], got shape {tuple(x.shape)}; "
                         "flatten leading dims with x.reshape(-1, x.shape[-1])")
    _check(x.dtype in _X_DTYPES, f"x must be float32, bfloat16 or float16, got {x.dtype}")
    _check(w.dim() == 2, f"w must be 2-D [K, N] (released [in, out] layout), got shape {tuple(w.shape)}")
    K, N = w.shape
    if w.dtype == torch.int8:
        _check(scales is not None, "scales must be given for an int8 w: a bf16 [G, N] tensor")
        _check(scales.dim() == 2 and scales.shape[1] == N and scales.shape[0] >= 1,
               f"scales must be [G, N] = [G, {N}] for w of shape {tuple(w.shape)}, got {tuple(scales.shape)}")
        G = scales.shape[0]
        _check(K % G == 0, f"scales has G={G} groups, which must divide w's K={K} rows")
        _check(scales.dtype == torch.bfloat16, f"scales must be bfloat16 (the released format), got {scales.dtype}")
        _check(scales.device == w.device, f"scales is on {scales.device} but w on {w.device}; move them together")
    else:
        _check(w.dtype in _W_FLOAT_DTYPES, f"w must be int8 (with scales) or float32/bfloat16/float16, got {w.dtype}")
        _check(scales is None, f"scales must be None for a floating-point w ({w.dtype})")
        G = 1
    want = N if transpose else K
    _check(x.shape[1] == want, f"x has {x.shape[1]} columns but w {tuple(w.shape)} needs {want}"
                               f" ({'N' if transpose else 'K'}{', transpose=True' if transpose else ''})")
    _check(x.device == w.device, f"x is on {x.device} but w on {w.device}; move them together")
    return x.shape[0], K, N, G


def int8_linear_reference(x, w, scales=None, *, precision="fp32", transpose=False) -> torch.Tensor:
    """The PyTorch oracle (see the module docstring): fp32 ``x @ deq(w)`` (``transpose``: ``@ deq(w)^T``),
    with x and the exact weight rounded to bf16 first when ``precision="bf16"``. Makes the fp32 copy
    of the weight that the kernel avoids."""
    _check_args(x, w, scales, precision, transpose)
    return linear_reference(x, w, scales, precision=precision, transpose=transpose)


def int8_linear_triton(x, w, scales=None, *, precision="fp32", transpose=False) -> torch.Tensor:
    """``int8_linear_reference`` as one Triton launch (two when the reduction is split), dequantising
    the weight tile by tile in registers. No host synchronisation; launch parameters depend on
    shapes, strides and dtypes only."""
    M, K, N, G = _check_args(x, w, scales, precision, transpose)
    _check(x.shape[1] == 0 or x.stride(1) == 1,
           f"x's last dim must be contiguous (stride 1), got strides {tuple(x.stride())}; pass x.contiguous()")
    _check(_max_offset(w) < 2**31, f"w's element offsets must fit in int32 (strides {tuple(w.stride())})")
    require_launchable(_int8_linear_kernel, x.device, "int8_linear_triton")
    if x.device.type == "cpu":
        _check(precision == "fp32", "precision='bf16' needs a GPU (the Triton interpreter's bf16 arithmetic is "
                                    "wrong); use int8_linear_reference on the CPU")
    n_out, r = (K, N) if transpose else (N, K)
    if M == 0 or n_out == 0 or r == 0:
        return torch.zeros(M, n_out, dtype=torch.float32, device=x.device)
    gk = K // G
    cfg, mode = _plan(M, K, N, G, scales is not None, precision, transpose)
    stride_wr, stride_wo = (w.stride(1), w.stride(0)) if transpose else (w.stride(0), w.stride(1))
    s = scales if scales is not None else w  # a dummy pointer when SCALE_MODE 0
    s_strides = (scales.stride(0), scales.stride(1)) if scales is not None else (0, 0)
    out = torch.empty(M, n_out, dtype=torch.float32, device=x.device)
    part = out if cfg.split == 1 else torch.empty(cfg.split, M, n_out, dtype=torch.float32, device=x.device)
    grid = (triton.cdiv(M, cfg.block_m) * triton.cdiv(n_out, cfg.block_n), cfg.split)
    _int8_linear_kernel[grid](
        x, w, s, part, M, n_out, r, cfg.chunk, gk if mode == 1 else r, gk,
        x.stride(0), stride_wr, stride_wo, *s_strides, M * n_out, n_out,
        SCALE_MODE=mode, TRANSPOSE=transpose, EVEN_R=r % cfg.block_k == 0, CDTYPE=_CDTYPE[precision],
        DOT_PRECISION="ieee" if precision == "fp32" else "tf32",
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    if cfg.split > 1:
        block = 1024
        _int8_linear_reduce_kernel[(triton.cdiv(M * n_out, block),)](part, out, M * n_out, cfg.split, BLOCK=block)
    return out
