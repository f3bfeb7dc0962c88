"""Grok-1's attention core, blockwise: ``softmax(where(visible, cap(q.k * scale), -1e30)) @ v``.

    o = attention(q [B,T,Hq,dh], k [B,S,Hkv,dh], v [B,S,Hkv,dh], q_pos [B,T], key_valid [B,S], scale=, cap=)

Semantics (SPEC §3.2, fp32 throughout): ``s = (q . k) * scale``; ``s = cap * tanh(s / cap)``; key j
is visible to query (b, t) iff ``key_valid[b, j]`` and ``j <= q_pos[b, t]``; invisible logits are
-1e30 (not -inf); softmax over all S keys; ``o = p @ v``. A query with no visible key (a
left-padding position) therefore attends UNIFORMLY to all S keys, as the official code does.
GQA: q head h uses kv head ``h // (Hq / Hkv)``.

Why blockwise: the dense form holds fp32 ``[B, Hq, T, S]`` scores and as many copies again for the
cap / mask / softmax (12.9 GB each for one 8k sequence of Grok-1). Here the keys are visited in
blocks with an online softmax (running max ``m``, running sum ``l``, rescaled accumulator), so the
workspace is a few ``[B, Hq, block_q, block_k]`` tiles, whatever S is:

    peak extra memory <= 4 * B*Hq*block_q*block_k * 4 B     (scores, capped, exp, mask-select)
                        + 2 * B*T*Hq*dh * 4 B               (accumulators and the fp32 output)
                        + 2 * B*block_k*Hkv*dh * 4 B        (one K and one V block upcast to fp32)

The K/V blocks are read where they lie (a slice of the KV cache, any dtype): the filled cache is
never copied to fp32 as a whole. The online softmax reassociates the fp32 sums, so results equal the
dense form to fp32 rounding, not bit for bit.

``causal_offset`` (host-known, optional): a promise that ``q_pos[b, t] <= causal_offset + t``; key
blocks past every query of a query block are then skipped (half the work of a prefill, and the
unwritten tail of a decode cache). Skipped keys would have contributed only to rows with no visible
key; those rows get the skipped values added back (plain sums, no exp), so the result is unchanged.
Without it (None) every key block is visited and no host value is needed: the shapes are static,
nothing is read back to the host, and a CUDA graph can hold the call.

Implementations: ``impl="torch"`` (this file, any device) or ``"triton"`` (``flash_attention.py``,
CUDA, or the Triton interpreter); ``"auto"`` is Triton on CUDA. When autograd records (an input
requires grad), ``"triton"`` runs ``flash_attention.FlashAttention``: the forward kernel also writes
each row's log-sum-exp and Triton kernels compute dq, dk, dv from it (saved: q, k, v, out and the row
statistics, no score tile); ``"torch"`` differentiates the reference's ops (which keeps its score tiles
for the backward). ``precision="bf16"`` rounds q, k,
p and v to bf16 for the two products (fp32 accumulation), the tensor-core form; ``"fp32"`` (the
default, faithful to the official fp32-fused computation) keeps everything fp32.
"""
from __future__ import annotations

from typing import Optional

import torch

__all__ = ["attention", "attention_reference", "attention_dense", "attention_blocks", "MASK_VALUE"]

MASK_VALUE = -1e30  # official value; -inf would turn fully masked rows into NaN
PRECISIONS = ("fp32", "bf16")
# Elements of one [B, Hq, block_q, block_k] score tile the reference aims for (32 MiB in fp32).
SCORE_TILE_ELEMS = 1 << 23


def _check(q, k, v, q_pos, key_valid, precision):
    if q.dim() != 4 or k.dim() != 4 or v.shape != k.shape:
        raise ValueError(f"attention: q must be [B, T, Hq, dh] and k, v [B, S, Hkv, dh]; got q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}, v {tuple(v.shape)}")
    B, T, Hq, dh = q.shape
    if k.shape[0] != B or k.shape[3] != dh or Hq % k.shape[2]:
        raise ValueError(f"attention: k/v {tuple(k.shape)} do not fit q {tuple(q.shape)} (same B and dh, Hq a "
                         f"multiple of Hkv)")
    if tuple(q_pos.shape) != (B, T) or tuple(key_valid.shape) != (B, k.shape[1]):
        raise ValueError(f"attention: q_pos must be [B, T] = {(B, T)} and key_valid [B, S] = {(B, k.shape[1])}; "
                         f"got {tuple(q_pos.shape)} and {tuple(key_valid.shape)}")
    if precision not in PRECISIONS:
        raise ValueError(f"attention: precision must be one of {PRECISIONS}, got {precision!r}")


def attention_dense(q, k, v, q_pos, key_valid, *, scale: float, cap: float) -> torch.Tensor:
    """The formula as the official code writes it, one ``[B, Hkv, G, T, S]`` fp32 score tensor (tests' oracle)."""
    _check(q, k, v, q_pos, key_valid, "fp32")
    B, T, Hq, dh = q.shape
    Hkv, S = k.shape[2], k.shape[1]
    qg = q.float().view(B, T, Hkv, Hq // Hkv, dh)
    s = torch.einsum("btkgd,bskd->bkgts", qg, k.float()) * scale
    s = cap * torch.tanh(s / cap)
    visible = key_valid[:, None, :] & (torch.arange(S, device=q.device) <= q_pos[:, :, None])
    s = s.masked_fill(~visible[:, None, None], MASK_VALUE)
    o = torch.einsum("bkgts,bskd->btkgd", torch.softmax(s, dim=-1), v.float())
    return o.reshape(B, T, Hq, dh)


def attention_blocks(B: int, T: int, S: int, Hq: int) -> tuple[int, int]:
    """(block_q, block_k) for the reference: a score tile of about SCORE_TILE_ELEMS elements.

    Decode (T small) takes the keys in as few blocks as the budget allows (fewer Python steps);
    a prefill uses 256 query rows and as many keys as fit.
    """
    block_q = max(1, min(T, 256))
    block_k = max(128, SCORE_TILE_ELEMS // max(1, B * Hq * block_q))
    return block_q, min(block_k, max(S, 1))


def _round(x: torch.Tensor, precision: str) -> torch.Tensor:
    """fp32 values, rounded through bf16 first when precision is "bf16"."""
    return x.to(torch.bfloat16).float() if precision == "bf16" else x.float()


def attention_reference(q, k, v, q_pos, key_valid, *, scale: float, cap: float, precision: str = "fp32",
                        causal_offset: Optional[int] = None, block_q: Optional[int] = None,
                        block_k: Optional[int] = None) -> torch.Tensor:
    """Blockwise online-softmax attention in PyTorch (module docstring); returns fp32 ``[B, T, Hq, dh]``."""
    _check(q, k, v, q_pos, key_valid, precision)
    B, T, Hq, dh = q.shape
    S, Hkv = k.shape[1], k.shape[2]
    G = Hq // Hkv
    bq, bk = attention_blocks(B, T, S, Hq)
    bq, bk = block_q or bq, block_k or bk
    key_idx = torch.arange(S, device=q.device)
    out = []
    for t0 in range(0, T, bq):
        t1 = min(T, t0 + bq)
        qb = _round(q[:, t0:t1], precision).view(B, t1 - t0, Hkv, G, dh)
        pos = q_pos[:, t0:t1, None]
        # keys from kv_end on are invisible to every query of this block (causal_offset's promise)
        kv_end = S if causal_offset is None else min(S, max(1, causal_offset + t1))
        m = torch.full((B, Hkv, G, t1 - t0, 1), float("-inf"), device=q.device)
        l = torch.zeros_like(m)
        acc = torch.zeros(B, Hkv, G, t1 - t0, dh, device=q.device)
        for s0 in range(0, kv_end, bk):
            s1 = min(kv_end, s0 + bk)
            kb, vb = _round(k[:, s0:s1], precision), _round(v[:, s0:s1], precision)
            s = torch.einsum("btkgd,bskd->bkgts", qb, kb) * scale
            s = cap * torch.tanh(s / cap)
            visible = key_valid[:, None, s0:s1] & (key_idx[s0:s1] <= pos)
            s = s.masked_fill(~visible[:, None, None], MASK_VALUE)
            if s1 - s0 == kv_end:
                # one block holds every key (decode, short prompts): normalise before the product,
                # in the official order, so the result is the dense formula's to the bit
                m = s.amax(-1, keepdim=True)
                acc, l = torch.einsum("bkgts,bskd->bkgtd", _round(torch.softmax(s, -1), precision), vb), 1.0
                break
            m_new = torch.maximum(m, s.amax(-1, keepdim=True))
            p = torch.exp(s - m_new)
            rescale = torch.exp(m - m_new)
            l = l * rescale + p.sum(-1, keepdim=True)
            acc = acc * rescale + torch.einsum("bkgts,bskd->bkgtd", _round(p, precision), vb)
            m = m_new
        acc = acc / l
        if kv_end < S:
            # rows with no visible key (m still MASK_VALUE) attend uniformly to all S keys: the visited
            # kv_end keys gave their mean; add the skipped keys' values (torch.where: no host sync)
            skipped = torch.zeros(B, Hkv, dh, device=q.device)
            for s0 in range(kv_end, S, bk):
                skipped += _round(v[:, s0:min(S, s0 + bk)], precision).sum(1)
            uniform = (acc * kv_end + skipped[:, :, None, None]) / S
            acc = torch.where(m <= MASK_VALUE, uniform, acc)
        out.append(acc.permute(0, 3, 1, 2, 4).reshape(B, t1 - t0, Hq, dh))
    return torch.cat(out, dim=1) if len(out) > 1 else out[0]


def attention(q, k, v, q_pos, key_valid, *, scale: float, cap: float, precision: str = "fp32",
              causal_offset: Optional[int] = None, impl: str = "auto") -> torch.Tensor:
    """Grok-1 attention (module docstring): fp32 ``[B, T, Hq, dh]``; impl "auto" | "torch" | "triton".

    Under autograd the Triton path is first-order only (no double backward, no functorch
    transforms): use ``impl="torch"`` for those."""
    from . import resolve_impl  # the package's one rule for "auto" (and its GROK_MOE_IMPL override)

    # "auto" keeps the reference where the kernels do not go: fp64 / fp16 queries (gradcheck, tests)
    if resolve_impl(impl, q) == "torch" or (impl == "auto" and q.dtype not in (torch.float32, torch.bfloat16)):
        return attention_reference(q, k, v, q_pos, key_valid, scale=scale, cap=cap, precision=precision,
                                   causal_offset=causal_offset)
    # the kernels bound their key loops on the device: causal_offset is not needed
    from .flash_attention import flash_attention_triton, flash_attention_triton_autograd

    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        # training: the forward also writes each row's log-sum-exp and a Triton backward recomputes
        # the probabilities from it (saved: q, k, v, out and the row statistics, no score tile)
        return flash_attention_triton_autograd(q, k, v, q_pos, key_valid, scale=scale, cap=cap, precision=precision)
    return flash_attention_triton(q, k, v, q_pos, key_valid, scale=scale, cap=cap, precision=precision)
