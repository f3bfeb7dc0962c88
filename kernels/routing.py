"""Triton gating: router + softmax + top-k, then the token grouping the grouped GEMMs need. Two launches.

    _router_topk_kernel   grid (cdiv(T, BLOCK_T),)   x_TD @ router_w_DE in fp32 -> [softcap] -> softmax
                                                     -> top-k (ties to the lower index) -> [renormalise]
                                                     writes router_probs_TE, gates_TK, topk_ids_TK
    _align_kernel         grid (1,)                  histogram of topk_ids, per-expert offsets padded to
                                                     BLOCK_M, the (token, slot) list sorted by expert
                                                     (stable: token order inside an expert), the expert
                                                     of every BLOCK_M tile, padding marked with T*K

The grouping needs every token's choice before any tile can be placed (a grid-wide prefix sum), so
it is a second launch; E is small (8), so one program does it in registers. Nothing here uses
atomics: the same input gives the same bits. All buffers have sizes fixed by (T, K, E, BLOCK_M) so
the pair replays under a CUDA graph.
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _router_topk_kernel(
    x_ptr,  # *float [T, D] normed activations (any float dtype; read as fp32)
    w_ptr,  # *fp32 [D, E] router weight
    probs_ptr,  # *fp32 [T, E] out: softmax over all experts
    gates_ptr,  # *fp32 [T, TOP_K] out: gate of each chosen expert (contiguous)
    ids_ptr,  # *int32 [T, TOP_K] out: chosen experts, descending probability (contiguous)
    forced_ptr,  # *int [T, TOP_K] forced experts (read only when FORCED; contiguous)
    T,  # number of tokens
    D,  # model dim
    E,  # number of experts
    stride_xt, stride_xd,  # strides of x
    stride_wd, stride_we,  # strides of the router weight
    stride_pt, stride_pe,  # strides of router_probs
    SOFTCAP: tl.constexpr,  # c of c*tanh(logits/c); 0.0 = off
    RENORM: tl.constexpr,  # divide the k gates by their sum
    FORCED: tl.constexpr,  # take the experts from forced_ptr instead of the top-k
    TOP_K: tl.constexpr,  # experts per token
    K_PAD: tl.constexpr,  # next power of two >= TOP_K (register tile width)
    E_PAD: tl.constexpr,  # next power of two >= E
    BLOCK_T: tl.constexpr,  # tokens per program
    BLOCK_D: tl.constexpr,  # model-dim chunk of the GEMV
):
    pid = tl.program_id(0)
    offs_t = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_e = tl.arange(0, E_PAD)
    t_mask = offs_t < T
    e_mask = offs_e < E
    # 64-bit row offsets: T * D passes 2**31 at 350K tokens of Grok-1 (a large training batch)
    rows_t = offs_t.to(tl.int64)

    # Router GEMV in exact fp32: a broadcast-multiply-sum, not tl.dot, which would round to tf32
    # on the GPU and needs dims >= 16 (E is 8).
    logits = tl.zeros((BLOCK_T, E_PAD), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        d_mask = offs_d < D
        x = tl.load(
            x_ptr + rows_t[:, None] * stride_xt + offs_d[None, :] * stride_xd,
            mask=t_mask[:, None] & d_mask[None, :],
            other=0.0,
        ).to(tl.float32)
        w = tl.load(
            w_ptr + offs_d[:, None] * stride_wd + offs_e[None, :] * stride_we,
            mask=d_mask[:, None] & e_mask[None, :],
            other=0.0,
        ).to(tl.float32)
        logits += tl.sum(x[:, :, None] * w[None, :, :], axis=1)

    if SOFTCAP != 0.0:
        # tanh(y) = 2*sigmoid(2y) - 1 (tl has no tanh that runs everywhere, interpreter included)
        logits = SOFTCAP * (2.0 * tl.sigmoid(2.0 * logits / SOFTCAP) - 1.0)
    logits = tl.where(e_mask[None, :], logits, float("-inf"))
    m = tl.max(logits, axis=1)
    p = tl.exp(logits - m[:, None])
    p = p / tl.sum(p, axis=1)[:, None]
    tl.store(
        probs_ptr + rows_t[:, None] * stride_pt + offs_e[None, :] * stride_pe,
        p,
        mask=t_mask[:, None] & e_mask[None, :],
    )

    # Top-k by k rounds of masked argmax; keep results in registers so renormalising needs no reload.
    offs_k = tl.arange(0, K_PAD)
    gates = tl.zeros((BLOCK_T, K_PAD), dtype=tl.float32)
    ids = tl.zeros((BLOCK_T, K_PAD), dtype=tl.int32)
    work = tl.where(e_mask[None, :], p, -1.0)  # padded experts can never win (p >= 0)
    for k in tl.static_range(TOP_K):
        if FORCED:
            idx = tl.load(forced_ptr + rows_t * TOP_K + k, mask=t_mask, other=0).to(tl.int32)
            g = tl.sum(tl.where(offs_e[None, :] == idx[:, None], p, 0.0), axis=1)
        else:
            g = tl.max(work, axis=1)
            # lowest index among the maxima: jax.lax.top_k tie-breaking
            idx = tl.min(tl.where(work == g[:, None], offs_e[None, :], E_PAD), axis=1)
            work = tl.where(offs_e[None, :] == idx[:, None], -1.0, work)
        gates = tl.where(offs_k[None, :] == k, g[:, None], gates)
        ids = tl.where(offs_k[None, :] == k, idx[:, None], ids)
    if RENORM:
        gates = gates / tl.sum(gates, axis=1)[:, None]
    out_mask = t_mask[:, None] & (offs_k[None, :] < TOP_K)
    tl.store(gates_ptr + rows_t[:, None] * TOP_K + offs_k[None, :], gates, mask=out_mask)
    tl.store(ids_ptr + rows_t[:, None] * TOP_K + offs_k[None, :], ids, mask=out_mask)


@triton.jit
def _align_kernel(
    ids_ptr,  # *int32 [NUMEL] flattened topk_ids (row t*TOP_K + k)
    sorted_ptr,  # *int32 [MAX_PADDED] out: flat (token, slot) row per GEMM row; NUMEL marks padding
    block_expert_ptr,  # *int32 [MAX_BLOCKS] out: expert of each BLOCK_M tile; -1 = no work
    counts_ptr,  # *int32 [E] out: tokens routed to each expert
    offsets_ptr,  # *int32 [E + 1] out: padded start of each expert's rows; [E] = total padded rows
    NUMEL,  # T * TOP_K
    E,  # number of experts
    MAX_PADDED,  # rows of sorted_ptr (= MAX_BLOCKS * BLOCK_M)
    MAX_BLOCKS,  # tiles in the GEMM grid's M dimension
    E_PAD: tl.constexpr,  # next power of two >= E
    BLOCK_M: tl.constexpr,  # GEMM tile height: every expert's rows are padded to a multiple of it
    CHUNK: tl.constexpr,  # elements handled per loop step
):
    offs_e = tl.arange(0, E_PAD)
    e_mask = offs_e < E

    # Pass 1: histogram.
    counts = tl.zeros((E_PAD,), dtype=tl.int32)
    for i0 in range(0, NUMEL, CHUNK):
        offs = i0 + tl.arange(0, CHUNK)
        e = tl.load(ids_ptr + offs, mask=offs < NUMEL, other=E_PAD)
        # ids outside [0, E) belong to another expert shard: never counted, never given a row
        counts += tl.sum(((e[:, None] == offs_e[None, :]) & e_mask[None, :]).to(tl.int32), axis=0)
    padded = (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    ends = tl.cumsum(padded, axis=0)
    starts = ends - padded
    tl.store(counts_ptr + offs_e, counts, mask=e_mask)
    tl.store(offsets_ptr + offs_e, starts, mask=e_mask)
    tl.store(offsets_ptr + E, tl.sum(padded, axis=0))

    # Pass 2: stable scatter. An element's row = its expert's start + earlier elements of that expert.
    seen = tl.zeros((E_PAD,), dtype=tl.int32)
    for i0 in range(0, NUMEL, CHUNK):
        offs = i0 + tl.arange(0, CHUNK)
        e = tl.load(ids_ptr + offs, mask=offs < NUMEL, other=E_PAD)
        valid = (offs < NUMEL) & (e >= 0) & (e < E)
        onehot = ((e[:, None] == offs_e[None, :]) & e_mask[None, :]).to(tl.int32)
        rank = tl.cumsum(onehot, axis=0) - 1 + seen[None, :] + starts[None, :]
        row = tl.sum(onehot * rank, axis=1)
        tl.store(sorted_ptr + row, offs, mask=valid)
        seen += tl.sum(onehot, axis=0)

    # Pass 3: mark padding rows (disjoint from pass 2's rows, so no ordering between the two is needed).
    for r0 in range(0, MAX_PADDED, CHUNK):
        rows = r0 + tl.arange(0, CHUNK)
        owner = tl.sum((ends[None, :] <= rows[:, None]).to(tl.int32), axis=1)  # expert whose range holds the row
        is_owner = offs_e[None, :] == owner[:, None]
        local = rows - tl.sum(tl.where(is_owner, starts[None, :], 0), axis=1)
        filled = tl.sum(tl.where(is_owner, counts[None, :], 0), axis=1)
        pad = (owner >= E) | (local >= filled)
        tl.store(sorted_ptr + rows, tl.full((CHUNK,), 0, tl.int32) + NUMEL, mask=pad & (rows < MAX_PADDED))

    # The expert of each tile; tiles past the last expert have no work (-1) and exit at once.
    for b0 in range(0, MAX_BLOCKS, CHUNK):
        blocks = b0 + tl.arange(0, CHUNK)
        owner = tl.sum((ends[None, :] <= (blocks * BLOCK_M)[:, None]).to(tl.int32), axis=1)
        tl.store(block_expert_ptr + blocks, tl.where(owner < E, owner, -1), mask=blocks < MAX_BLOCKS)
