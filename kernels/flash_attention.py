"""Triton flash attention with Grok-1's attention semantics (soft cap, -1e30 mask, GQA, KV cache).

    out = flash_attention_triton(q, k, v, q_pos, key_valid, scale=dh**-0.5, cap=30.0, precision="fp32")
    out = flash_attention_triton_autograd(q, k, v, q_pos, key_valid, scale=..., cap=...)  # + Triton backward

Semantics (the official Grok-1 attention, as math in fp32), for q [B, T, Hq, dh], k/v [B, S, Hkv, dh],
G = Hq // Hkv (q head h reads kv head h // G: consecutive q heads share a kv head):

    s[b,h,t,j] = (q[b,t,h] . k[b,j,h//G]) * scale
    s          = cap * tanh(s / cap)                               soft cap (Grok-1: cap = 30)
    visible    = key_valid[b,j] and j <= q_pos[b,t]
    s          = where(visible, s, -1e30)                          -1e30, not -inf
    o[b,t,h]   = sum_j softmax_j(s)[j] * v[b,j,h//G]               softmax over ALL j in [0, S)

A row with no visible key (a left-padding query, or every key invalid) therefore attends uniformly to
all S keys: o = mean over j < S of v. That is what the official code does, and it is reproduced.

Design (Grok-1: Hq=48, Hkv=8, dh=128, S up to 8192; decode is T=1 with batch 1..8):
  * Online softmax over BLOCK_N key blocks: running max m, running sum l and a [BLOCK_M, dh] fp32
    accumulator per program; no [T, S] matrix ever exists. Workspace: O(BLOCK_M*dh + BLOCK_N*dh)
    per program (registers / shared memory), independent of S; the output is the only tensor written.
  * One program = one (batch, kv head) and a block of tokens, with ALL G q heads of that kv head as its
    rows (row r = token r // G, q head kv*G + r % G; BLOCK_M // G tokens per program): every K/V block
    is loaded once per group instead of G times. At decode (T=1) the M dimension of the dots is the
    G=6 heads padded to 16, the smallest tile tl.dot takes.
  * The key loop stops at the largest q_pos among the program's rows, read on the device: decode over a
    large preallocated cache (k = cache_k[:, :S]) reads keys up to the current position only. Skipping
    the keys beyond is exact: their score is -1e30, and exp(-1e30 - m) == 0 in fp32 for every row
    that has a visible key (m >= -cap).
  * The masked scores are exactly -1e30, as in the reference, and the running max starts at -1e30, so
    a row that has seen no visible key yet weights each masked key by exp(0) = 1 (and drops all of it,
    alpha = exp(-1e30 - m) = 0, at its first visible key). A row still without a visible key after the
    loop (running max still -1e30) therefore holds the sum of V over the keys visited; a second loop,
    taken only when some row of the program needs it (a runtime branch: free otherwise), adds the sum
    of V over the keys not visited (to S) and their count: the uniform mean over all S keys, exactly
    the reference's softmax of a constant row. Padding keys (j >= S: a block's tail) score -inf and
    weigh 0 for every row.
  * tanh is 2 * sigmoid(2x) - 1 (no libdevice, as grouped_gemm._gelu_tanh: runs in the interpreter
    too); scale / cap is folded into one multiply.
  * precision="fp32": both dots on fp32 operands with input_precision="ieee" (exact fp32, no tf32).
    precision="bf16": q and k rounded to bf16 for QK^T, p and v rounded to bf16 for PV, fp32
    accumulation and fp32 softmax (tensor cores).
  * No host synchronisation: the wrapper checks shapes, dtypes and strides only, so it runs on the
    `meta` device and under CUDA-graph capture. The kernel is launched through the module-level name
    `_flash_attn_kernel`, which a recorder can replace (see aot.py `_recording`).

Launch: grid (cdiv(T, BLOCK_M // G), Hkv, B), i.e. (token blocks, kv heads, batch); the positional
arguments are the six tensors, T, S, 2*scale/cap, cap and the strides (every one of q, k, v, q_pos,
key_valid, out but their last), then the constexprs G, DH, OPERAND, DOT_PRECISION, BLOCK_M, BLOCK_N
and num_warps / num_stages from `attention_config`. Training adds lse_ptr and STATS=True (below);
inference passes neither, so its launch and compiled kernel are what they were before the backward.

Backward (training: `FlashAttention`, which attention(impl="triton") uses while autograd records):
  * The forward (return_stats=True) also stores each row's log-sum-exp lse = m + log(l) (fp32
    [B, T, Hq]); saved for the backward: q, k, v, out, lse (no score tile).
  * FlashAttention-2: p = exp(s - lse) recomputed per tile, D = rowsum(dO * O) (one torch
    reduction), dP = dO V^T, dS = p (dP - D), through the cap times 1 - tanh^2 = 4 sig (1 - sig) (sig
    the forward's sigmoid: no cancellation where the cap saturates); dq = scale dS K, dk = scale dS^T q,
    dv = p^T dO; masked entries have p = 0 exactly (exp(-1e30 - lse), lse >= -cap).
  * Rows with no visible key: p = 1/S on every key, but -1e30 + log(S) == -1e30 in fp32, so exp(s -
    lse) would give 1. Their lse is stored as exactly -1e30, which the backward reads as "uniform":
    p = 1/S (dV += dO / S for every key j < S) and dS = 0 (the scores are the constant -1e30,
    independent of q and k: no dq, no dk).
  * `_flash_attn_bwd_dkdv_kernel`, key-block-major: grid (cdiv(S, BLOCK_N), Hkv, B); a program holds
    its keys' dk, dv in registers and walks every row block of the kv head's G q heads in order, so
    the GQA sum is in a fixed order (deterministic, no atomics). A row block that sees none of the
    program's keys (j0 > every row's position: the causal half of a prefill) is skipped by a runtime
    branch, unless one of its rows has no visible key (such a row adds dO / S to every key).
  * `_flash_attn_bwd_dq_kernel`, query-block-major: the forward's grid and rows; the key loop stops
    at the rows' largest position (no key beyond contributes to dq).
  * Precision as the forward: "fp32" ieee dots; "bf16" rounds q, k, dO, v, p and dS to bf16 for the
    five products, fp32 accumulation and fp32 elementwise math. Gradients return in the inputs' dtypes.
  * Accuracy (fp32, tests/test_flash_attention.py): at most 2e-6 of max|grad| from a fp64 oracle,
    against 5e-7 for torch's dense fp32 autograd (the forward's sigmoid tanh, ~cap * 1e-7 on a score).

Accuracy: fp32 agrees with a dense fp32 torch evaluation to a few 1e-6 of |v| (tanh through the
sigmoid costs ~1e-7 absolute, i.e. ~cap * 1e-7 on a score: the same order as torch's own fp32 error
against fp64).

Not done: no split over keys (flash-decoding). The backward's tiles are untuned guesses that compile
without spills at Grok-1 shapes (bf16 dK/dV at the 255-register limit); no double backward. At decode the grid is B * Hkv programs (8 for one
sequence), each streaming its kv head's keys up to the position: fewer CTAs than an H100 has SMs,
so one sequence cannot reach full HBM bandwidth. Tiles are untuned; nothing has run on a GPU yet.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

# Without a GPU the kernel runs only under the interpreter the user opts into (TRITON_INTERPRET=1, see ops.py).
from . import require_launchable

__all__ = ["AttnConfig", "attention_config", "attention_bwd_config", "flash_attention_triton",
           "flash_attention_triton_backward", "FlashAttention", "flash_attention_triton_autograd"]


_KV_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_PRECISIONS = {"fp32": (tl.float32, "ieee"), "bf16": (tl.bfloat16, "tf32")}  # (operand dtype, fp32 dot mode)


@triton.jit
def _flash_attn_kernel(
    q_ptr,  # *float [B, T, Hq, dh] (last dim contiguous)
    k_ptr,  # *float [B, S, Hkv, dh] (last dim contiguous; typically a view of a longer cache)
    v_ptr,  # *float [B, S, Hkv, dh] (same)
    pos_ptr,  # *int [B, T] absolute position of each query
    valid_ptr,  # *bool [B, S] key_valid
    o_ptr,  # *fp32 [B, T, Hq, dh] out
    T,  # queries per sequence
    S,  # keys per sequence (the softmax runs over all S)
    tanh_scale,  # 2 * scale / cap: cap * tanh(qk * scale / cap) = cap * (2 * sigmoid(tanh_scale * qk) - 1)
    cap,  # soft cap
    stride_qb, stride_qt, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_pb, stride_pt,
    stride_mb, stride_ms,
    stride_ob, stride_ot, stride_oh,
    G: tl.constexpr,  # q heads per kv head
    HEAD_DIM: tl.constexpr,  # head dim
    DH: tl.constexpr,  # HEAD_DIM padded to a power of two >= 16 (tl.dot's minimum; zero lanes)
    OPERAND: tl.constexpr,  # dtype of the dot operands: fp32 (exact) or bf16 (tensor cores)
    DOT_PRECISION: tl.constexpr,  # "ieee" for fp32 operands; ignored by bf16 dots
    BLOCK_M: tl.constexpr,  # rows per program: BLOCK_M // G tokens x G heads (the rest padding)
    BLOCK_N: tl.constexpr,  # keys per step
    lse_ptr=None,  # *fp32 [B, T, Hq] contiguous: each row's log-sum-exp, written only when STATS
    STATS: tl.constexpr = False,  # training: also write lse (inference passes neither: the same launch as before)
):
    NEG: tl.constexpr = -1e30
    TOK: tl.constexpr = BLOCK_M // G
    kvh = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)

    r = tl.arange(0, BLOCK_M)
    t = tl.program_id(0) * TOK + r // G
    h = kvh * G + r % G
    row_ok = (r < TOK * G) & (t < T)
    d = tl.arange(0, DH)
    d_ok = d < HEAD_DIM  # folds to all-true when DH == HEAD_DIM

    q = tl.load(q_ptr + b * stride_qb + t[:, None] * stride_qt + h[:, None] * stride_qh + d[None, :],
                mask=row_ok[:, None] & d_ok[None, :], other=0.0).to(OPERAND)
    pos = tl.load(pos_ptr + b * stride_pb + t * stride_pt, mask=row_ok, other=-1)
    pos = tl.minimum(tl.maximum(pos, -1), S - 1).to(tl.int32)  # visibility is unchanged: j in [0, S)
    n_end = tl.max(pos, axis=0) + 1  # keys past every row's position are masked for all rows

    k_base = k_ptr + b * stride_kb + kvh * stride_kh
    v_base = v_ptr + b * stride_vb + kvh * stride_vh
    valid_base = valid_ptr + b * stride_mb

    m_i = tl.full([BLOCK_M], NEG, tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, DH], tl.float32)
    for start in range(0, n_end, BLOCK_N):
        j = start + tl.arange(0, BLOCK_N)
        in_s = j < S
        kt = tl.load(k_base + j[None, :] * stride_ks + d[:, None], mask=in_s[None, :] & d_ok[:, None], other=0.0)  # [DH, BLOCK_N]
        s = tl.dot(q, kt.to(OPERAND), input_precision=DOT_PRECISION, out_dtype=tl.float32)
        s = cap * (2.0 * tl.sigmoid(s * tanh_scale) - 1.0)
        ok = tl.load(valid_base + j * stride_ms, mask=in_s, other=0) != 0
        s = tl.where(ok[None, :] & (j[None, :] <= pos[:, None]), s, NEG)
        s = tl.where(in_s[None, :], s, float("-inf"))  # a block's tail past S: weight 0 for every row
        m_new = tl.maximum(m_i, tl.max(s, axis=1))  # finite (>= -1e30): no inf - inf
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        vb = tl.load(v_base + j[:, None] * stride_vs + d[None, :], mask=in_s[:, None] & d_ok[None, :], other=0.0)
        acc = tl.dot(p.to(OPERAND), vb.to(OPERAND), acc * alpha[:, None], input_precision=DOT_PRECISION,
                     out_dtype=tl.float32)
        m_i = m_new

    # Rows with no visible key so far hold sum(v) and the count over the keys visited: add the keys
    # not visited (uniform weight 1 each) so that they end with the mean of V over all S keys.
    needy = row_ok & (m_i == NEG)
    if tl.max(needy.to(tl.int32), axis=0) > 0:
        tail = tl.cdiv(n_end, BLOCK_N) * BLOCK_N
        v_sum = tl.zeros([DH], tl.float32)
        for start in range(tail, S, BLOCK_N):
            j = start + tl.arange(0, BLOCK_N)
            vb = tl.load(v_base + j[:, None] * stride_vs + d[None, :], mask=(j < S)[:, None] & d_ok[None, :],
                         other=0.0)
            v_sum += tl.sum(vb.to(OPERAND).to(tl.float32), axis=0)
        acc = tl.where(needy[:, None], acc + v_sum[None, :], acc)
        l_i = tl.where(needy, l_i + tl.maximum(S - tail, 0).to(tl.float32), l_i)

    o = acc / tl.where(row_ok, l_i, 1.0)[:, None]
    tl.store(o_ptr + b * stride_ob + t[:, None] * stride_ot + h[:, None] * stride_oh + d[None, :], o,
             mask=row_ok[:, None] & d_ok[None, :])
    if STATS:
        # The backward recomputes p = exp(s - lse). A row with no visible key stores exactly -1e30 (its
        # m + log(l) rounds to that in fp32 anyway): the backward reads it as "p = 1/S on every key".
        lse = tl.where(needy, NEG, m_i + tl.log(tl.where(row_ok, l_i, 1.0)))
        tl.store(lse_ptr + (b * T + t) * (tl.num_programs(1) * G) + h, lse, mask=row_ok)


@triton.jit
def _bwd_probs(s, visible, inside, lse, S, tanh_scale, cap, NEG: tl.constexpr):
    """(p, dcap) of a tile of raw scores q.k with the forward's semantics, in either orientation (the
    masks and the rows' log-sum-exp come broadcast to the tile): p the softmax probability from the
    stored lse, dcap the derivative of the soft cap (scale excluded). A row with no visible key (lse
    == -1e30) gets p = 1/S on every key; padding rows and keys past S (`inside` false) get 0."""
    sig = tl.sigmoid(s * tanh_scale)
    sc = cap * (2.0 * sig - 1.0)
    # d(cap * tanh(x / cap))/dx = 1 - tanh^2 = 4 sig (1 - sig): no cancellation where the cap saturates
    dcap = 4.0 * sig * (1.0 - sig)
    # masked scores are -1e30: exp(-1e30 - lse) == 0 for every row with a visible key (lse >= -cap)
    p = tl.exp(tl.where(visible, sc, NEG) - lse)
    p = tl.where(lse == NEG, 1.0 / S, p)
    return tl.where(inside, p, 0.0), dcap


@triton.jit
def _flash_attn_bwd_dq_kernel(
    q_ptr, k_ptr, v_ptr, pos_ptr, valid_ptr,  # as the forward
    do_ptr,  # *fp32 [B, T, Hq, dh] contiguous: dL/d out
    lse_ptr,  # *fp32 [B, T, Hq] contiguous: the forward's log-sum-exp (-1e30: no visible key)
    delta_ptr,  # *fp32 [B, T, Hq] contiguous: rowsum(dO * O)
    dq_ptr,  # *fp32 [B, T, Hq, dh] contiguous (do's strides) out
    T, S, tanh_scale, cap,
    scale,  # the score scale (dq = scale * dS_raw @ K)
    stride_qb, stride_qt, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_pb, stride_pt,
    stride_mb, stride_ms,
    stride_db, stride_dt, stride_dh,
    G: tl.constexpr, HEAD_DIM: tl.constexpr, DH: tl.constexpr, OPERAND: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,  # rows per program (BLOCK_M // G tokens x G heads, as the forward)
    BLOCK_N: tl.constexpr,  # keys per step
):
    """dQ, query-block-major: a program owns its rows' dq and walks the keys up to its largest position
    (keys past it have p = 0; rows without a visible key have constant scores and dq = 0)."""
    NEG: tl.constexpr = -1e30
    TOK: tl.constexpr = BLOCK_M // G
    kvh = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    Hq = tl.num_programs(1) * G

    r = tl.arange(0, BLOCK_M)
    t = tl.program_id(0) * TOK + r // G
    h = kvh * G + r % G
    row_ok = (r < TOK * G) & (t < T)
    d = tl.arange(0, DH)
    d_ok = d < HEAD_DIM
    rd_ok = row_ok[:, None] & d_ok[None, :]

    q = tl.load(q_ptr + b * stride_qb + t[:, None] * stride_qt + h[:, None] * stride_qh + d[None, :],
                mask=rd_ok, other=0.0).to(OPERAND)
    do = tl.load(do_ptr + b * stride_db + t[:, None] * stride_dt + h[:, None] * stride_dh + d[None, :],
                 mask=rd_ok, other=0.0).to(OPERAND)
    lse = tl.load(lse_ptr + (b * T + t) * Hq + h, mask=row_ok, other=0.0)
    delta = tl.load(delta_ptr + (b * T + t) * Hq + h, mask=row_ok, other=0.0)
    pos = tl.load(pos_ptr + b * stride_pb + t * stride_pt, mask=row_ok, other=-1)
    pos = tl.minimum(tl.maximum(pos, -1), S - 1).to(tl.int32)
    n_end = tl.max(pos, axis=0) + 1
    uniform = lse == NEG

    k_base = k_ptr + b * stride_kb + kvh * stride_kh
    v_base = v_ptr + b * stride_vb + kvh * stride_vh
    valid_base = valid_ptr + b * stride_mb
    dq = tl.zeros([BLOCK_M, DH], tl.float32)
    for start in range(0, n_end, BLOCK_N):
        j = start + tl.arange(0, BLOCK_N)
        in_s = j < S
        kt = tl.load(k_base + j[None, :] * stride_ks + d[:, None], mask=in_s[None, :] & d_ok[:, None],
                     other=0.0).to(OPERAND)  # [DH, BLOCK_N]
        vt = tl.load(v_base + j[None, :] * stride_vs + d[:, None], mask=in_s[None, :] & d_ok[:, None],
                     other=0.0).to(OPERAND)
        ok = tl.load(valid_base + j * stride_ms, mask=in_s, other=0) != 0
        s = tl.dot(q, kt, input_precision=DOT_PRECISION, out_dtype=tl.float32)
        visible = ok[None, :] & (j[None, :] <= pos[:, None])
        p, dcap = _bwd_probs(s, visible, row_ok[:, None] & in_s[None, :], lse[:, None], S, tanh_scale, cap, NEG)
        dp = tl.dot(do, vt, input_precision=DOT_PRECISION, out_dtype=tl.float32)
        ds = tl.where(uniform[:, None], 0.0, p * (dp - delta[:, None]) * dcap)
        dq = tl.dot(ds.to(OPERAND), tl.trans(kt), dq, input_precision=DOT_PRECISION, out_dtype=tl.float32)

    tl.store(dq_ptr + b * stride_db + t[:, None] * stride_dt + h[:, None] * stride_dh + d[None, :], dq * scale,
             mask=rd_ok)


@triton.jit
def _flash_attn_bwd_dkdv_kernel(
    q_ptr, k_ptr, v_ptr, pos_ptr, valid_ptr, do_ptr, lse_ptr, delta_ptr,  # as the dq kernel
    dk_ptr, dv_ptr,  # *fp32 [B, S, Hkv, dh] contiguous (same strides) out
    T, S, tanh_scale, cap, scale,
    stride_qb, stride_qt, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_pb, stride_pt,
    stride_mb, stride_ms,
    stride_db, stride_dt, stride_dh,
    stride_gb, stride_gs, stride_gh,  # dk / dv
    G: tl.constexpr, HEAD_DIM: tl.constexpr, DH: tl.constexpr, OPERAND: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,  # rows per step (BLOCK_M // G tokens x the G q heads of the kv head)
    BLOCK_N: tl.constexpr,  # keys per program
):
    """dK and dV, key-block-major: a program owns BLOCK_N keys of one (batch, kv head) and walks every
    row block of its G q heads in order, so the sum over the group is in registers, in a fixed order
    (deterministic, no atomics). Works in the transposed [keys, rows] orientation (FlashAttention-2)."""
    NEG: tl.constexpr = -1e30
    TOK: tl.constexpr = BLOCK_M // G
    kvh = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    Hq = tl.num_programs(1) * G
    j0 = tl.program_id(0) * BLOCK_N

    j = j0 + tl.arange(0, BLOCK_N)
    in_s = j < S
    d = tl.arange(0, DH)
    d_ok = d < HEAD_DIM
    kd_ok = in_s[:, None] & d_ok[None, :]
    kb = tl.load(k_ptr + b * stride_kb + kvh * stride_kh + j[:, None] * stride_ks + d[None, :], mask=kd_ok,
                 other=0.0).to(OPERAND)  # [BLOCK_N, DH]
    vb = tl.load(v_ptr + b * stride_vb + kvh * stride_vh + j[:, None] * stride_vs + d[None, :], mask=kd_ok,
                 other=0.0).to(OPERAND)
    ok = tl.load(valid_ptr + b * stride_mb + j * stride_ms, mask=in_s, other=0) != 0

    r = tl.arange(0, BLOCK_M)
    dk = tl.zeros([BLOCK_N, DH], tl.float32)
    dv = tl.zeros([BLOCK_N, DH], tl.float32)
    for t0 in range(0, T, TOK):
        t = t0 + r // G
        h = kvh * G + r % G
        row_ok = (r < TOK * G) & (t < T)
        pos = tl.load(pos_ptr + b * stride_pb + t * stride_pt, mask=row_ok, other=-1)
        pos = tl.minimum(tl.maximum(pos, -1), S - 1).to(tl.int32)
        lse = tl.load(lse_ptr + (b * T + t) * Hq + h, mask=row_ok, other=0.0)
        uniform = row_ok & (lse == NEG)
        # skip a row block that sees none of these keys (causal: blocks before the keys) unless a row
        # of it has no visible key at all: such a row still gives every key dV += dO / S
        if (tl.max(pos, axis=0) >= j0) | (tl.max(uniform.to(tl.int32), axis=0) > 0):
            rd_ok = row_ok[:, None] & d_ok[None, :]
            q = tl.load(q_ptr + b * stride_qb + t[:, None] * stride_qt + h[:, None] * stride_qh + d[None, :],
                        mask=rd_ok, other=0.0).to(OPERAND)  # [BLOCK_M, DH]
            do = tl.load(do_ptr + b * stride_db + t[:, None] * stride_dt + h[:, None] * stride_dh + d[None, :],
                         mask=rd_ok, other=0.0).to(OPERAND)  # [BLOCK_M, DH]
            delta = tl.load(delta_ptr + (b * T + t) * Hq + h, mask=row_ok, other=0.0)
            st = tl.dot(kb, tl.trans(q), input_precision=DOT_PRECISION, out_dtype=tl.float32)  # [BLOCK_N, BLOCK_M]
            visible = ok[:, None] & (j[:, None] <= pos[None, :])
            pt, dcap = _bwd_probs(st, visible, in_s[:, None] & row_ok[None, :], lse[None, :], S, tanh_scale, cap, NEG)
            dv = tl.dot(pt.to(OPERAND), do, dv, input_precision=DOT_PRECISION, out_dtype=tl.float32)
            dpt = tl.dot(vb, tl.trans(do), input_precision=DOT_PRECISION, out_dtype=tl.float32)
            dst = tl.where(uniform[None, :], 0.0, pt * (dpt - delta[None, :]) * dcap)
            dk = tl.dot(dst.to(OPERAND), q, dk, input_precision=DOT_PRECISION, out_dtype=tl.float32)

    g_off = b * stride_gb + kvh * stride_gh + j[:, None] * stride_gs + d[None, :]
    tl.store(dk_ptr + g_off, dk * scale, mask=kd_ok)
    tl.store(dv_ptr + g_off, dv, mask=kd_ok)


@dataclass(frozen=True)
class AttnConfig:
    """Tile shape: BLOCK_M rows (tokens x G heads) per program, BLOCK_N keys per step."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


def attention_config(T: int, G: int, dh: int, precision: str, kv_bytes: int) -> AttnConfig:
    """Tiles from the row count (T * G: tokens x q heads of a kv head), the precision and the K/V
    element size. bf16: decode (up to 64 rows) takes the smallest power-of-two M tile that holds the
    rows (at least 16, tl.dot's minimum), prefill 128-row tiles with 8 warps (wgmma on sm_90). fp32
    (exact FMA dots, a parity mode): narrow key steps; 16-bit K/V converted to fp32 in the loop need
    one pipeline stage to fit in registers. Untuned guesses; every choice at Grok-1 shapes compiles
    for sm_90 without register spills (checked by tests/test_flash_attention.py).
    """
    rows = T * G
    if precision == "bf16":
        if rows <= 64:
            block_m = max(16, triton.next_power_of_2(rows))
            return AttnConfig(block_m=block_m, block_n=64, num_warps=4, num_stages=3 if block_m == 16 else 2)
        return AttnConfig(block_m=max(128, triton.next_power_of_2(G)), block_n=64 if dh <= 128 else 32,
                          num_warps=8, num_stages=3)
    if kv_bytes == 4 and rows <= 16:
        return AttnConfig(block_m=16, block_n=64, num_warps=4, num_stages=3)
    return AttnConfig(block_m=max(32, triton.next_power_of_2(G)), block_n=16, num_warps=4,
                      num_stages=2 if kv_bytes == 4 else 1)


def attention_bwd_config(G: int, dh: int, precision: str) -> tuple[AttnConfig, AttnConfig]:
    """(dK/dV tiles, dQ tiles) of the backward. dK/dV: BLOCK_N keys per program (their dk, dv
    accumulators live in registers all along) and BLOCK_M rows (tokens x G heads) per step; dQ:
    BLOCK_M rows per program, BLOCK_N keys per step. Untuned; at Grok-1 shapes every choice compiles
    for sm_90 without register spills (grok_torch.kernels.aot, kind attn-train).
    """
    rows = lambda m: max(m, triton.next_power_of_2(G))  # noqa: E731  (a step holds every head of a token)
    if precision == "bf16":  # dk, dv [64, dh] fp32 in registers: 8 warps (4 spill), 32-row steps (64 spill)
        return (AttnConfig(block_m=rows(32), block_n=64, num_warps=8, num_stages=2),
                AttnConfig(block_m=rows(64), block_n=32, num_warps=8, num_stages=2))
    # exact fp32 (FMA dots): 32 keys per dk/dv program spill at dh = 128, 16 do not
    return (AttnConfig(block_m=rows(32), block_n=16, num_warps=8, num_stages=1),
            AttnConfig(block_m=rows(32), block_n=16, num_warps=4, num_stages=1))


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


def _check_inputs(q, k, v, q_pos, key_valid, precision, cap) -> None:
    _check(precision in _PRECISIONS, f"precision must be 'fp32' or 'bf16', got {precision!r}")
    _check(q.dim() == 4, f"q must be [B, T, Hq, dh], got {list(q.shape)}")
    _check(k.dim() == 4, f"k must be [B, S, Hkv, dh], got {list(k.shape)}")
    B, T, Hq, dh = q.shape
    S, Hkv = k.shape[1], k.shape[2]
    _check(k.shape[0] == B and k.shape[3] == dh, f"k must be [B={B}, S, Hkv, dh={dh}], got {list(k.shape)}")
    _check(tuple(v.shape) == tuple(k.shape), f"v must have k's shape {list(k.shape)}, got {list(v.shape)}")
    _check(Hkv >= 1 and Hq % Hkv == 0, f"q heads ({Hq}) must be a multiple of k/v heads ({Hkv})")
    _check(1 <= dh <= 256, f"head dim (q.shape[3]) must be in [1, 256], got {dh}")
    _check(S >= 1, "k must have at least one key (S >= 1)")
    _check(q.dtype in (torch.float32, torch.bfloat16), f"q must be fp32 or bf16, got {q.dtype}")
    _check(k.dtype in _KV_DTYPES, f"k must be fp32, bf16 or fp16, got {k.dtype}")
    _check(v.dtype in _KV_DTYPES, f"v must be fp32, bf16 or fp16, got {v.dtype}")
    for name, x in (("q", q), ("k", k), ("v", v)):
        _check(x.stride(3) == 1, f"{name} must be contiguous in its last dim, got strides {x.stride()}")
    _check(tuple(q_pos.shape) == (B, T), f"q_pos must be [B={B}, T={T}], got {list(q_pos.shape)}")
    _check(q_pos.dtype in (torch.int64, torch.int32), f"q_pos must be int64 or int32, got {q_pos.dtype}")
    _check(tuple(key_valid.shape) == (B, S), f"key_valid must be [B={B}, S={S}], got {list(key_valid.shape)}")
    _check(key_valid.dtype == torch.bool, f"key_valid must be bool, got {key_valid.dtype}")
    for name, x in (("k", k), ("v", v), ("q_pos", q_pos), ("key_valid", key_valid)):
        _check(x.device == q.device, f"{name} is on {x.device}, q on {q.device}")
    _check(cap > 0 and cap != float("inf"), f"cap must be a finite positive float, got {cap}")


def _dh_pad(dh: int) -> int:
    return max(16, triton.next_power_of_2(dh))


def flash_attention_triton(q, k, v, q_pos, key_valid, *, scale: float, cap: float,
                           precision: str = "fp32", return_stats: bool = False):
    """Grok-1 attention (see the module docstring) with one kernel launch; returns fp32 [B, T, Hq, dh].

    q [B, T, Hq, dh] fp32/bf16; k, v [B, S, Hkv, dh] fp32/bf16/fp16 (views of a longer KV cache are
    fine: every stride is passed, only the last dim must be contiguous); q_pos [B, T] int64/int32 on
    the device; key_valid [B, S] bool. Hq % Hkv == 0; dh <= 256 (padded to a power of two >= 16 in
    registers). No host sync.

    return_stats (training): returns (out, lse) with lse fp32 [B, T, Hq] each row's log-sum-exp of its
    scores (exactly -1e30 for a row with no visible key), the input of `flash_attention_triton_backward`.
    The same kernel writes it (constexpr STATS); without it the launch is the inference one, unchanged.
    """
    _check_inputs(q, k, v, q_pos, key_valid, precision, cap)
    B, T, Hq, dh = q.shape
    S, Hkv = k.shape[1], k.shape[2]
    out = torch.empty(B, T, Hq, dh, dtype=torch.float32, device=q.device)
    lse = torch.empty(B, T, Hq, dtype=torch.float32, device=q.device) if return_stats else None
    if B * T == 0:
        return (out, lse) if return_stats else out
    G = Hq // Hkv
    cfg = attention_config(T, G, dh, precision, max(k.element_size(), v.element_size()))
    operand, dot_precision = _PRECISIONS[precision]
    grid = (triton.cdiv(T, cfg.block_m // G), Hkv, B)
    require_launchable(_flash_attn_kernel, q.device, "flash_attention_triton")
    stats = dict(lse_ptr=lse, STATS=True) if return_stats else {}  # absent at inference: the launch is unchanged
    _flash_attn_kernel[grid](
        q, k, v, q_pos, key_valid, out, T, S, 2.0 * float(scale) / float(cap), float(cap),
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        q_pos.stride(0), q_pos.stride(1),
        key_valid.stride(0), key_valid.stride(1),
        out.stride(0), out.stride(1), out.stride(2),
        G=G, HEAD_DIM=dh, DH=_dh_pad(dh), OPERAND=operand, DOT_PRECISION=dot_precision,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, **stats,
    )
    return (out, lse) if return_stats else out


def flash_attention_triton_backward(do, q, k, v, q_pos, key_valid, out, lse, *, scale: float, cap: float,
                                    precision: str = "fp32", need_dq: bool = True, need_dkv: bool = True):
    """(dq, dk, dv) fp32 (None where not needed) of Grok-1 attention from dL/d out and the forward's
    out and lse (`flash_attention_triton(..., return_stats=True)`). Two launches: dq query-block-major,
    dk and dv key-block-major (each kv head's keys sum over its G q heads in one program: deterministic,
    no atomics). D = rowsum(dO * O) is one torch reduction. Same precision modes as the forward. No host sync.
    """
    _check_inputs(q, k, v, q_pos, key_valid, precision, cap)
    B, T, Hq, dh = q.shape
    S, Hkv = k.shape[1], k.shape[2]
    _check(tuple(do.shape) == (B, T, Hq, dh), f"do must be [B, T, Hq, dh] = {[B, T, Hq, dh]}, got {list(do.shape)}")
    _check(tuple(lse.shape) == (B, T, Hq) and lse.dtype == torch.float32 and lse.is_contiguous(),
           f"lse must be contiguous fp32 [B, T, Hq] = {[B, T, Hq]}, got {list(lse.shape)} {lse.dtype}")
    do = do.float().contiguous()
    delta = (do * out).sum(-1)  # [B, T, Hq] fp32, contiguous
    dq = torch.zeros_like(do) if need_dq else None  # zeros: B * T == 0 launches nothing
    dk = torch.zeros(B, S, Hkv, dh, dtype=torch.float32, device=q.device) if need_dkv else None
    dv = torch.zeros_like(dk) if need_dkv else None
    if B * T == 0:
        return dq, dk, dv
    G = Hq // Hkv
    cfg_kv, cfg_q = attention_bwd_config(G, dh, precision)
    operand, dot_precision = _PRECISIONS[precision]
    args = (q, k, v, q_pos, key_valid, do, lse, delta)
    strides = (q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
               v.stride(0), v.stride(1), v.stride(2), q_pos.stride(0), q_pos.stride(1),
               key_valid.stride(0), key_valid.stride(1), do.stride(0), do.stride(1), do.stride(2))
    common = dict(G=G, HEAD_DIM=dh, DH=_dh_pad(dh), OPERAND=operand, DOT_PRECISION=dot_precision)
    consts = (T, S, 2.0 * float(scale) / float(cap), float(cap), float(scale))
    if need_dkv:
        require_launchable(_flash_attn_bwd_dkdv_kernel, q.device, "flash_attention_triton_backward")
        _flash_attn_bwd_dkdv_kernel[(triton.cdiv(S, cfg_kv.block_n), Hkv, B)](
            *args, dk, dv, *consts, *strides, dk.stride(0), dk.stride(1), dk.stride(2), **common,
            BLOCK_M=cfg_kv.block_m, BLOCK_N=cfg_kv.block_n, num_warps=cfg_kv.num_warps, num_stages=cfg_kv.num_stages,
        )
    if need_dq:
        require_launchable(_flash_attn_bwd_dq_kernel, q.device, "flash_attention_triton_backward")
        _flash_attn_bwd_dq_kernel[(triton.cdiv(T, cfg_q.block_m // G), Hkv, B)](
            *args, dq, *consts, *strides, **common,
            BLOCK_M=cfg_q.block_m, BLOCK_N=cfg_q.block_n, num_warps=cfg_q.num_warps, num_stages=cfg_q.num_stages,
        )
    return dq, dk, dv


class FlashAttention(torch.autograd.Function):
    """Grok-1 attention on the Triton kernels, forward and backward (gradients for q, k, v).

    Saves q, k, v, out and the per-row log-sum-exp (no score tile): the backward recomputes the
    probabilities block by block. Gradients come back in the inputs' dtypes.
    """

    @staticmethod
    def forward(ctx, q, k, v, q_pos, key_valid, scale: float, cap: float, precision: str):
        out, lse = flash_attention_triton(q, k, v, q_pos, key_valid, scale=scale, cap=cap, precision=precision,
                                          return_stats=True)
        ctx.save_for_backward(q, k, v, q_pos, key_valid, out, lse)
        ctx.attn = (scale, cap, precision)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, do):
        q, k, v, q_pos, key_valid, out, lse = ctx.saved_tensors
        scale, cap, precision = ctx.attn
        need = ctx.needs_input_grad
        dq, dk, dv = flash_attention_triton_backward(do, q, k, v, q_pos, key_valid, out, lse, scale=scale, cap=cap,
                                                     precision=precision, need_dq=need[0], need_dkv=need[1] or need[2])
        return (dq.to(q.dtype) if need[0] else None, dk.to(k.dtype) if need[1] else None,
                dv.to(v.dtype) if need[2] else None, None, None, None, None, None)


def flash_attention_triton_autograd(q, k, v, q_pos, key_valid, *, scale: float, cap: float, precision: str = "fp32"):
    """`flash_attention_triton` with a Triton backward (FlashAttention.apply): for training."""
    return FlashAttention.apply(q, k, v, q_pos, key_valid, float(scale), float(cap), precision)
