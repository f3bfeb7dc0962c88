"""The experts-only kernel entry (``moe_router`` + ``moe_experts``) that expert shards and expert
parallelism are built on: routing once, then any split of the experts (a contiguous range of
experts per holder, or a slice of F per holder), summed, gives ``fused_moe``'s output.

Both implementations: the reference (any dtype) and Triton (under the interpreter on the CPU: fp32
only, small shapes). Forward bits and gradients.
"""
import pytest
import torch

from grok_torch.kernels import fused_moe, moe_experts, moe_router
from grok_torch.kernels.ops import local_routing, moe_align
from test_kernels_triton import _make_inputs  # same random activations / int8 weights + scales


def _inputs(T, D, F, E, wdtype, seed=0):
    return _make_inputs(T, D, F, E, wdtype, seed)


def expert_split(ws, scales, parts):
    """[(expert_start, weights, scales)] for `parts` contiguous expert ranges."""
    E = ws[0].shape[0]
    out = []
    for p in range(parts):
        a, b = p * E // parts, (p + 1) * E // parts
        out.append((a, [w[a:b] for w in ws], None if scales is None else tuple(s[a:b] for s in scales)))
    return out


def ffn_split(ws, scales, parts):
    """[(0, weights, scales)] for `parts` slices of F (w2's G scale groups split with its rows)."""
    F = ws[0].shape[2]
    out = []
    for p in range(parts):
        a, b = p * F // parts, (p + 1) * F // parts
        w = [ws[0][..., a:b], ws[1][..., a:b], ws[2][:, a:b]]
        s = None
        if scales is not None:
            G = scales[2].shape[1]
            s = (scales[0][..., a:b], scales[1][..., a:b], scales[2][:, p * G // parts:(p + 1) * G // parts])
        out.append((0, w, s))
    return out


@pytest.mark.parametrize("wdtype", [torch.float32, torch.bfloat16, torch.int8])
@pytest.mark.parametrize("parts", [1, 2, 4, 8])
def test_expert_split_sums_to_fused_moe_bit_for_bit(wdtype, parts):
    """Reference: the partials of any expert split add up to fused_moe's bits (k = 2)."""
    x, rw, ws, scales = _inputs(23, 32, 48, 8, wdtype)
    cd = torch.float32 if wdtype == torch.float32 else torch.bfloat16
    want, probs, ids = fused_moe(x, rw, *ws, scales=scales, compute_dtype=cd, impl="torch")
    p2, gates, ids2 = moe_router(x, rw, top_k=2, impl="torch")
    assert torch.equal(p2, probs) and torch.equal(ids2, ids)
    total = sum(moe_experts(x, gates, ids, *w, scales=s, expert_start=e0, compute_dtype=cd, impl="torch")
                for e0, w, s in expert_split(ws, scales, parts))
    assert total.dtype == torch.float32
    assert torch.equal(total.to(cd), want)


@pytest.mark.parametrize("parts", [2, 4, 8])
def test_ffn_split_matches_fused_moe(parts):
    """Reference: F slices (partial down projections summed unrounded) = fused_moe within fp32 rounding,
    int8 weights with w2's 8 scale groups divided among the slices."""
    x, rw, ws, scales = _inputs(19, 32, 64, 8, torch.int8)
    want, _, ids = fused_moe(x, rw, *ws, scales=scales, compute_dtype=torch.float32, impl="torch")
    _, gates, ids = moe_router(x, rw, impl="torch")
    total = sum(moe_experts(x, gates, ids, *w, scales=s, f_partial=True, compute_dtype=torch.float32, impl="torch")
                for _, w, s in ffn_split(ws, scales, parts))
    torch.testing.assert_close(total, want, atol=1e-6, rtol=1e-5)


def test_slots_elsewhere_add_exact_zeros():
    """A holder whose experts no token chose returns zeros, and never reads its weights (NaN weights)."""
    x, rw, ws, _ = _inputs(4, 16, 16, 8, torch.float32)
    ids = torch.tensor([[0, 1]] * 4)
    gates = torch.full((4, 2), 0.5)
    nan_ws = [torch.full_like(w[4:], float("nan")) for w in ws]
    out = moe_experts(x, gates, ids, *nan_ws, expert_start=4, impl="torch")
    assert torch.equal(out, torch.zeros(4, 16))


def test_align_drops_ids_of_other_shards():
    """The align kernel gives rows only to ids in [0, E): a shard's grouping of global ids."""
    ids = torch.tensor([[0, 5], [6, 1], [7, 4], [2, 3]], dtype=torch.int32)
    sorted_ids, block_expert, counts, offsets = moe_align(ids - 4, 4, 16)
    assert counts.tolist() == [1, 1, 1, 1]  # experts 4, 5, 6, 7 once each
    real = sorted_ids[sorted_ids < ids.numel()].tolist()
    assert sorted(real) == [1, 2, 4, 5]     # flat rows t*K+k of the slots routed to 4..7
    assert block_expert.tolist()[:4] == [0, 1, 2, 3] and all(b == -1 for b in block_expert.tolist()[4:])
    r = local_routing(torch.ones(4, 2), ids, 4, 4, 16)
    assert r.partial and torch.equal(r.counts, counts)


@pytest.mark.parametrize("split", ["experts", "ffn"])
@pytest.mark.parametrize("wdtype", [torch.float32, torch.int8])
def test_triton_partials_match_reference(split, wdtype):
    """Triton (interpreter, fp32): each holder's partial equals the reference partial, forward and
    backward (x and gates), and the sum equals the single fused_moe call."""
    x, rw, ws, scales = _inputs(9, 32, 32, 8, wdtype, seed=3)
    holders = expert_split(ws, scales, 4) if split == "experts" else ffn_split(ws, scales, 2)
    _, gates, ids = moe_router(x, rw, impl="torch")
    _, gates_t, ids_t = moe_router(x, rw, impl="triton")
    assert torch.equal(ids_t, ids)
    torch.testing.assert_close(gates_t, gates, atol=1e-6, rtol=1e-6)
    total = 0
    for e0, w, s in holders:
        outs, grads = [], []
        for impl in ("torch", "triton"):
            xi = x.clone().requires_grad_()
            gi = gates.clone().requires_grad_()
            o = moe_experts(xi, gi, ids, *w, scales=s, expert_start=e0, f_partial=split == "ffn",
                            compute_dtype=torch.float32, impl=impl)
            o.backward(torch.ones_like(o))
            outs.append(o.detach())
            grads.append((xi.grad, gi.grad))
        torch.testing.assert_close(outs[1], outs[0], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(grads[1][0], grads[0][0], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(grads[1][1], grads[0][1], atol=1e-5, rtol=1e-4)
        total = total + outs[1]
    want, _, _ = fused_moe(x, rw, *ws, scales=scales, compute_dtype=torch.float32, impl="triton")
    torch.testing.assert_close(total, want, atol=1e-5, rtol=1e-4)
