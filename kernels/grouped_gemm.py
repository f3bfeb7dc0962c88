"""Triton grouped expert GEMMs over the expert-sorted (token, slot) rows made by routing.py.

    _moe_gemm_kernel   grid (MAX_BLOCKS, cdiv(N, BLOCK_N))
        one BLOCK_M x BLOCK_N tile of C = A[rows] @ B[expert]:
        * rows come from the sorted list; A rows are gathered through it (token = row // TOP_K for
          activations, the row itself for per-(token, slot) tensors), never from a permuted copy;
        * a tile whose expert has no rows (block_expert == -1) returns before reading weights;
        * DUAL: a second weight B2 shares the A tile (gate and up projections in one pass);
        * int8 B tiles: SCALE_MODE 1 applies per-column scales to the fp32 accumulator once per K
          group (GROUP_K rows per scale row: Grok-1 w1/w3 have one group, w2 has 8); SCALE_MODE 2
          dequantises each B tile in the main loop with any (k, n) -> scale map (used by the
          backward, where the transposed weights' scales vary along K);
        * epilogues: EPILOGUE 0 stores the accumulator, 1 stores gelu_tanh(acc) * acc2 (and, for
          the backward, the fp32 pre-activations), 2 multiplies by the row's gate (rounded to the
          compute dtype, as the official code does), 3 does what 2 does and then, instead of
          storing the row, atomically adds it (fp32, relaxed) into C[token] = C[row // TOP_K]:
          the top-k combine inside the down GEMM (deterministic=False; C must start zeroed, and
          the order of the k additions per token depends on tile scheduling, so the bits may
          differ between runs). PREACT_IN starts the accumulators at precomputed fp32 per-row
          deltas instead of 0 (expert LoRA: the low-rank terms, before the GELU in the up GEMM and
          before the gate in the down GEMM); with STORE_PREACT the sums are stored back in place.
    _moe_wgrad_kernel  grid (E, cdiv(P, BLOCK_P), cdiv(Q, BLOCK_Q))
        expert weight gradients for training: dW[e] = A[rows of e]^T @ B[rows of e], reducing over
        each expert's sorted rows (gathered through the same index; optional gate on B's rows).
    _combine_kernel    grid (T, cdiv(D, BLOCK_D))
        out[t] = sum over slots k, in slot order, of y[t*TOP_K + k]: the top-k combine, in fp32,
        without atomics, so the same input gives the same bits (the default, deterministic=True).

The compute dtype is the dtype of B after dequantisation (the output of the wrapper's choice,
passed as CDTYPE); accumulation is fp32 (fp64 when the compute dtype is fp64, for gradcheck).
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _gelu_tanh(z, C1: tl.constexpr, C2: tl.constexpr):
    # z * 0.5 * (1 + tanh(y)) == z * sigmoid(2y): one transcendental, no cancellation near 0
    return z * tl.sigmoid(2.0 * C1 * (z + C2 * z * z * z))


@triton.jit
def _moe_gemm_kernel(
    a_ptr,  # *float A [rows_a, K]; row = token (A_BY_TOKEN) or flat (token, slot) row
    b_ptr,  # *int8|float B [E, K, N] (strides may describe a transposed weight)
    b2_ptr,  # *int8|float second B of the same shape and strides (read only when DUAL)
    s_ptr,  # *bf16|float scales of B (read only when SCALE_MODE > 0)
    s2_ptr,  # *bf16|float scales of B2 (read only when DUAL and SCALE_MODE > 0)
    c_ptr,  # *float C [NUMEL, N] out, indexed by the flat (token, slot) row; EPILOGUE 3: [T, N] by token
    g_ptr,  # *fp32 [NUMEL, N]: pre-activation acc out (STORE_PREACT); in: acc's start (PREACT_IN & 1)
    u_ptr,  # *fp32 [NUMEL, N]: pre-activation acc2 out (STORE_PREACT); in: acc2's start (PREACT_IN & 2)
    gate_ptr,  # *fp32 [NUMEL] gate of each flat row (read only when EPILOGUE is 2 or 3)
    sorted_ptr,  # *int32 [MAX_BLOCKS * BLOCK_M] flat row of each GEMM row; NUMEL = padding
    block_expert_ptr,  # *int32 [MAX_BLOCKS] expert of each tile; -1 = no work
    NUMEL,  # T * TOP_K: number of real flat rows (and the padding marker)
    N,  # output columns
    K,  # reduction length
    NUM_GROUPS,  # SCALE_MODE 1: scale rows along K (K // GROUP_K); otherwise 1
    GROUP_K,  # SCALE_MODE 1: K rows per scale row; otherwise K
    DIV_K,  # SCALE_MODE 2: scale row index = k // DIV_K ...
    DIV_N,  # SCALE_MODE 2: ... and scale column index = n // DIV_N
    stride_am, stride_ak,  # strides of A
    stride_be, stride_bk, stride_bn,  # strides of B and B2
    stride_se, stride_sk, stride_sn,  # strides of the scales (sk: per scale row, sn: per scale column)
    stride_cm, stride_cn,  # strides of C (and of the pre-activation outputs)
    TOP_K: tl.constexpr,  # slots per token
    A_BY_TOKEN: tl.constexpr,  # A row = flat // TOP_K (gather the token) instead of the flat row
    DUAL: tl.constexpr,  # also accumulate A @ B2 (gate and up projections share the A tile)
    SCALE_MODE: tl.constexpr,  # 0 float B; 1 int8, scale in the accumulator; 2 int8, dequant per tile
    EPILOGUE: tl.constexpr,  # 0 plain; 1 gelu_tanh(acc) * acc2; 2 acc * gate; 3 atomic C[token] += acc * gate
    STORE_PREACT: tl.constexpr,  # EPILOGUE 1: also store acc and acc2 in fp32 (for the backward)
    PREACT_IN: tl.constexpr,  # bit 1: acc starts at g[row], bit 2: acc2 at u[row] (fp32, C's strides): the
    #                           LoRA deltas (up: before the GELU, stored back with STORE_PREACT)
    CDTYPE: tl.constexpr,  # compute dtype of the tensor-core inputs
    ACC: tl.constexpr,  # accumulator dtype: fp32 (fp64 only for gradcheck runs in fp64)
    DOT_PRECISION: tl.constexpr,  # "ieee" for fp32 compute (no tf32), ignored by 16-bit dots
    C1: tl.constexpr,  # GELU sqrt(2/pi), rounded to the compute dtype
    C2: tl.constexpr,  # GELU 0.044715, rounded to the compute dtype
    BLOCK_M: tl.constexpr,  # rows per tile (every expert's rows are padded to a multiple)
    BLOCK_N: tl.constexpr,  # columns per tile
    BLOCK_K: tl.constexpr,  # reduction step
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    expert = tl.load(block_expert_ptr + pid_m)
    if expert < 0:
        return  # no tokens in this tile: exit before any weight traffic

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rows = tl.load(sorted_ptr + offs_m)
    row_mask = rows < NUMEL
    if A_BY_TOKEN:
        a_rows = rows // TOP_K
    else:
        a_rows = rows
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    # 64-bit offsets: expert * stride_be exceeds 2**31 for Grok-1 (8 x 6144 x 32768 elements).
    b_base = b_ptr + expert.to(tl.int64) * stride_be
    b2_base = b2_ptr + expert.to(tl.int64) * stride_be
    s_base = s_ptr + expert.to(tl.int64) * stride_se
    s2_base = s2_ptr + expert.to(tl.int64) * stride_se
    a_row_ptr = a_ptr + a_rows.to(tl.int64)[:, None] * stride_am

    # PREACT_IN: the accumulators start at the given deltas (no extra live tiles in the epilogue)
    if PREACT_IN & 1:
        d_off = rows.to(tl.int64)[:, None] * stride_cm + offs_n[None, :] * stride_cn
        acc = tl.load(g_ptr + d_off, mask=row_mask[:, None] & n_mask[None, :], other=0.0).to(ACC)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
    if PREACT_IN & 2:
        d_off = rows.to(tl.int64)[:, None] * stride_cm + offs_n[None, :] * stride_cn
        acc2 = tl.load(u_ptr + d_off, mask=row_mask[:, None] & n_mask[None, :], other=0.0).to(ACC)
    else:
        acc2 = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
    for grp in range(0, NUM_GROUPS):
        part = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
        part2 = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
        k_end = (grp + 1) * GROUP_K
        for k0 in range(grp * GROUP_K, k_end, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_mask = offs_k < k_end
            a = tl.load(a_row_ptr + offs_k[None, :] * stride_ak, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
            a = a.to(CDTYPE)
            b_off = offs_k[:, None].to(tl.int64) * stride_bk + offs_n[None, :] * stride_bn
            b_mask = k_mask[:, None] & n_mask[None, :]
            b = tl.load(b_base + b_off, mask=b_mask, other=0)
            if SCALE_MODE == 2:
                s_off = (offs_k // DIV_K)[:, None] * stride_sk + (offs_n // DIV_N)[None, :] * stride_sn
                s = tl.load(s_base + s_off, mask=b_mask, other=0.0)
                b = b.to(ACC) * s.to(ACC)  # exact in fp32, rounded once below
            part = tl.dot(a, b.to(CDTYPE), part, input_precision=DOT_PRECISION, out_dtype=ACC)
            if DUAL:
                b2 = tl.load(b2_base + b_off, mask=b_mask, other=0)
                if SCALE_MODE == 2:
                    s2 = tl.load(s2_base + s_off, mask=b_mask, other=0.0)
                    b2 = b2.to(ACC) * s2.to(ACC)
                part2 = tl.dot(a, b2.to(CDTYPE), part2, input_precision=DOT_PRECISION, out_dtype=ACC)
        if SCALE_MODE == 1:
            # int8 x activation is summed exactly-scaled: one multiply per column per K group
            s = tl.load(s_base + grp * stride_sk + offs_n * stride_sn, mask=n_mask, other=0.0).to(ACC)
            acc += part * s[None, :]
            if DUAL:
                s2 = tl.load(s2_base + grp * stride_sk + offs_n * stride_sn, mask=n_mask, other=0.0)
                acc2 += part2 * s2.to(ACC)[None, :]
        else:
            acc += part
            if DUAL:
                acc2 += part2

    c_off = rows.to(tl.int64)[:, None] * stride_cm + offs_n[None, :] * stride_cn
    c_mask = row_mask[:, None] & n_mask[None, :]
    if EPILOGUE == 1:
        if STORE_PREACT:
            tl.store(g_ptr + c_off, acc, mask=c_mask)
            tl.store(u_ptr + c_off, acc2, mask=c_mask)
        acc = _gelu_tanh(acc, C1, C2) * acc2
    if EPILOGUE >= 2:
        gate = tl.load(gate_ptr + rows, mask=row_mask, other=0.0)
        acc = acc * gate.to(CDTYPE).to(ACC)[:, None]
    if EPILOGUE == 3:
        # combine in the epilogue: C[token] += gate * y (padding rows masked; C is fp32/fp64 and
        # zeroed by the wrapper). Each token gets TOP_K additions, from its experts' tiles.
        t_off = (rows // TOP_K).to(tl.int64)[:, None] * stride_cm + offs_n[None, :] * stride_cn
        tl.atomic_add(c_ptr + t_off, acc.to(c_ptr.dtype.element_ty), mask=c_mask, sem="relaxed")
    else:
        tl.store(c_ptr + c_off, acc.to(c_ptr.dtype.element_ty), mask=c_mask)


@triton.jit
def _combine_kernel(
    y_ptr,  # *fp32 [T * TOP_K, D] gate-weighted expert outputs, row t*TOP_K + k
    out_ptr,  # *float [T, D] out
    D,  # model dim
    stride_ym, stride_yd,  # strides of y
    stride_ot, stride_od,  # strides of out
    TOP_K: tl.constexpr,  # slots per token
    BLOCK_D: tl.constexpr,  # columns per program
):
    t = tl.program_id(0).to(tl.int64)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    d_mask = offs_d < D
    acc = tl.load(y_ptr + (t * TOP_K) * stride_ym + offs_d * stride_yd, mask=d_mask, other=0.0)
    for k in tl.static_range(1, TOP_K):  # slot order, fp32: fixed summation order
        acc += tl.load(y_ptr + (t * TOP_K + k) * stride_ym + offs_d * stride_yd, mask=d_mask, other=0.0)
    tl.store(out_ptr + t * stride_ot + offs_d * stride_od, acc.to(out_ptr.dtype.element_ty), mask=d_mask)


@triton.jit
def _moe_wgrad_kernel(
    a_ptr,  # *float A [rows_a, P]; row = token (A_BY_TOKEN) or flat (token, slot) row
    b_ptr,  # *float B [rows_b, Q]; row = token (B_BY_TOKEN) or flat row
    gate_ptr,  # *fp32 [NUMEL] per-row scale of B (read only when B_GATED)
    dw_ptr,  # *float dW [E, P, Q] out: dW[e] = sum over expert e's rows of A[row]^T B[row]
    sorted_ptr,  # *int32 flat row of each sorted position (routing.sorted_ids)
    counts_ptr,  # *int32 [E] rows per expert
    offsets_ptr,  # *int32 [E + 1] first sorted position of each expert
    NUMEL,  # T * TOP_K (the padding marker)
    P,  # rows of dW (A's columns)
    Q,  # columns of dW (B's columns)
    stride_am, stride_ap,  # strides of A
    stride_bm, stride_bq,  # strides of B
    stride_we, stride_wp, stride_wq,  # strides of dW
    TOP_K: tl.constexpr,  # slots per token
    A_BY_TOKEN: tl.constexpr,  # A row = flat // TOP_K
    B_BY_TOKEN: tl.constexpr,  # B row = flat // TOP_K
    B_GATED: tl.constexpr,  # multiply B's rows by the row's gate, rounded to CDTYPE
    CDTYPE: tl.constexpr,  # compute dtype of the tensor-core inputs
    ACC: tl.constexpr,  # accumulator dtype (fp32; fp64 for gradcheck)
    DOT_PRECISION: tl.constexpr,  # "ieee" for fp32 compute
    BLOCK_R: tl.constexpr,  # rows reduced per step
    BLOCK_P: tl.constexpr,  # dW rows per program
    BLOCK_Q: tl.constexpr,  # dW columns per program
):
    # Expert weight gradient: the reduction runs over the expert's own rows, so every program of an
    # expert without tokens stores zeros without reading anything else.
    e = tl.program_id(0)
    offs_p = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_q = tl.program_id(2) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    p_mask = offs_p < P
    q_mask = offs_q < Q
    start = tl.load(offsets_ptr + e)
    end = start + tl.load(counts_ptr + e)
    acc = tl.zeros((BLOCK_P, BLOCK_Q), dtype=ACC)
    for r0 in range(start, end, BLOCK_R):
        pos = r0 + tl.arange(0, BLOCK_R)
        rows = tl.load(sorted_ptr + pos, mask=pos < end, other=NUMEL)
        r_mask = rows < NUMEL
        if A_BY_TOKEN:
            a_rows = rows // TOP_K
        else:
            a_rows = rows
        if B_BY_TOKEN:
            b_rows = rows // TOP_K
        else:
            b_rows = rows
        a = tl.load(
            a_ptr + a_rows.to(tl.int64)[:, None] * stride_am + offs_p[None, :] * stride_ap,
            mask=r_mask[:, None] & p_mask[None, :], other=0.0,
        ).to(CDTYPE)
        b = tl.load(
            b_ptr + b_rows.to(tl.int64)[:, None] * stride_bm + offs_q[None, :] * stride_bq,
            mask=r_mask[:, None] & q_mask[None, :], other=0.0,
        )
        if B_GATED:
            gate = tl.load(gate_ptr + rows, mask=r_mask, other=0.0).to(CDTYPE).to(ACC)
            b = b.to(ACC) * gate[:, None]
        acc = tl.dot(tl.trans(a), b.to(CDTYPE), acc, input_precision=DOT_PRECISION, out_dtype=ACC)
    w_off = e.to(tl.int64) * stride_we + offs_p[:, None].to(tl.int64) * stride_wp + offs_q[None, :] * stride_wq
    tl.store(dw_ptr + w_off, acc.to(dw_ptr.dtype.element_ty), mask=p_mask[:, None] & q_mask[None, :])
