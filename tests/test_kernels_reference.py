"""The pure-PyTorch MoE reference (grok_torch.kernels.reference) and the impl dispatch.

Covers: the reference against an independent dense formulation written the way the official JAX
code does it (all experts for all tokens, one-hot select); top-k tie-breaking toward the lower
expert index; forced routing; renormalisation and softcap; int8 dequantisation with G = 1 and G = 8;
autograd through the reference; impl / GROK_MOE_IMPL resolution.
"""
import math

import pytest
import torch

from grok_torch.kernels import fused_moe, resolve_impl
from grok_torch.kernels.reference import dequantize, route


def _dense_oracle(x, router_w, w1, w3, w2, top_k, cd, scales=None):
    """Official-style MoE: every expert on every token, then a one-hot select (xai-org/grok-1 moe_slow_matmul)."""
    probs = torch.softmax(x.float() @ router_w.float(), -1)
    gates, ids = torch.sort(probs, dim=-1, descending=True, stable=True)
    gates, ids = gates[:, :top_k], ids[:, :top_k]
    E = w1.shape[0]

    def deq(w, s):
        if s is None:
            return w.to(cd)
        K, N = w.shape[-2:]
        G = s.shape[-2]
        full = (w.float().reshape(E, G, K // G, N) * s.float()[:, :, None, :]).reshape(E, K, N)
        return full if cd == torch.float32 else full.to(cd)

    s1, s3, s2 = scales if scales is not None else (None, None, None)
    W1, W3, W2 = deq(w1, s1), deq(w3, s3), deq(w2, s2)
    xc = x.to(cd)
    c1 = torch.tensor(math.sqrt(2 / math.pi), dtype=cd).item()
    c2 = torch.tensor(0.044715, dtype=cd).item()
    g = torch.einsum("td,edf->etf", xc, W1).float()
    u = torch.einsum("td,edf->etf", xc, W3).float()
    a = (g * 0.5 * (1 + torch.tanh(c1 * (g + c2 * g**3))) * u).to(cd)
    y = torch.einsum("etf,efd->etd", a, W2)  # [E, T, D]
    T = x.shape[0]
    acc = torch.zeros(T, w2.shape[-1])
    for k in range(top_k):
        yk = y[ids[:, k], torch.arange(T)].float()
        acc = acc + gates[:, k : k + 1].to(cd).float() * yk
    return acc.to(cd), probs, ids


def _make_inputs(T, D, F, E, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, D, generator=g)
    router_w = torch.randn(D, E, generator=g) / math.sqrt(D)
    w1 = (torch.randn(E, D, F, generator=g) / math.sqrt(D)).to(dtype)
    w3 = (torch.randn(E, D, F, generator=g) / math.sqrt(D)).to(dtype)
    w2 = (torch.randn(E, F, D, generator=g) / math.sqrt(F)).to(dtype)
    return x, router_w, w1, w3, w2


@pytest.mark.parametrize("dtype, atol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("top_k", [1, 2, 8])
def test_reference_matches_dense_oracle(dtype, atol, top_k):
    x, rw, w1, w3, w2 = _make_inputs(13, 32, 48, 8, dtype, seed=top_k)
    out, probs, ids = fused_moe(x, rw, w1, w3, w2, top_k=top_k, impl="torch")
    ref, ref_probs, ref_ids = _dense_oracle(x, rw, w1, w3, w2, top_k, dtype)
    assert out.dtype == dtype and probs.dtype == torch.float32 and ids.dtype == torch.int64
    torch.testing.assert_close(ids, ref_ids, rtol=0, atol=0)
    torch.testing.assert_close(probs, ref_probs, rtol=0, atol=0)
    # Same math, different matmul batching: fp32 agrees to rounding, bf16 to a bf16 ulp or two.
    torch.testing.assert_close(out.float(), ref.float(), rtol=2e-2 if dtype == torch.bfloat16 else 1e-5, atol=atol)


@pytest.mark.parametrize("G2", [1, 8])
def test_reference_int8(G2):
    E, D, F, T = 4, 32, 64, 9
    g = torch.Generator().manual_seed(G2)
    x = torch.randn(T, D, generator=g)
    rw = torch.randn(D, E, generator=g)
    w1 = torch.randint(-127, 128, (E, D, F), generator=g, dtype=torch.int8)
    w3 = torch.randint(-127, 128, (E, D, F), generator=g, dtype=torch.int8)
    w2 = torch.randint(-127, 128, (E, F, D), generator=g, dtype=torch.int8)
    s1 = (torch.rand(E, 1, F, generator=g) * 1e-3).bfloat16()
    s3 = (torch.rand(E, 1, F, generator=g) * 1e-3).bfloat16()
    s2 = (torch.rand(E, G2, D, generator=g) * 1e-3).bfloat16()
    out, _, _ = fused_moe(x, rw, w1, w3, w2, scales=(s1, s3, s2), impl="torch")
    assert out.dtype == torch.bfloat16
    ref, _, _ = _dense_oracle(x, rw, w1, w3, w2, 2, torch.bfloat16, scales=(s1, s3, s2))
    torch.testing.assert_close(out.float(), ref.float(), rtol=2e-2, atol=1e-3)


def test_dequantize_groups_follow_k_rows():
    w = torch.ones(8, 3, dtype=torch.int8)
    s = torch.tensor([[1.0, 2.0, 3.0], [10.0, 20.0, 30.0]]).bfloat16()  # G=2: rows 0-3, rows 4-7
    W = dequantize(w, s, torch.float32)
    assert torch.equal(W[:4], s[0].float().expand(4, 3)) and torch.equal(W[4:], s[1].float().expand(4, 3))


def test_topk_ties_go_to_lower_index():
    # Zero router weight: all logits equal, every expert ties; jax.lax.top_k picks 0, 1, ...
    x = torch.randn(5, 16)
    _, gates, ids = route(x, torch.zeros(16, 8), top_k=3)
    assert ids.tolist() == [[0, 1, 2]] * 5
    torch.testing.assert_close(gates, torch.full((5, 3), 1 / 8))


def test_forced_routing_renormalize_and_softcap():
    x, rw, w1, w3, w2 = _make_inputs(6, 16, 32, 8, torch.float32, seed=3)
    forced = torch.tensor([[7, 0]] * 6)
    probs, gates, ids = route(x, rw, 2, expert_ids=forced, renormalize=True)
    assert torch.equal(ids, forced)
    torch.testing.assert_close(gates, probs.gather(-1, forced) / probs.gather(-1, forced).sum(-1, keepdim=True))
    capped, _, _ = route(x * 100, rw, 2, router_softcap=1.0)
    logits = (x * 100) @ rw
    torch.testing.assert_close(capped, torch.softmax(torch.tanh(logits), -1))
    out, _, out_ids = fused_moe(x, rw, w1, w3, w2, expert_ids=forced, impl="torch")
    assert torch.equal(out_ids, forced) and out.shape == (6, 16)


def test_reference_autograd():
    x, rw, w1, w3, w2 = _make_inputs(7, 8, 12, 4, torch.float64, seed=5)
    x, rw = x.double().requires_grad_(), rw.double().requires_grad_()
    for w in (w1, w3, w2):
        w.requires_grad_()
    f = lambda *a: fused_moe(*a, compute_dtype=torch.float64, impl="torch")[0]  # noqa: E731
    # Routing is piecewise constant: perturbations this small never flip the top-k.
    assert torch.autograd.gradcheck(f, (x, rw, w1, w3, w2), eps=1e-6, atol=1e-6)


def test_impl_resolution(monkeypatch):
    x = torch.zeros(1)
    monkeypatch.delenv("GROK_MOE_IMPL", raising=False)
    assert resolve_impl("auto", x) == "torch"
    assert resolve_impl("triton", x) == "triton"
    monkeypatch.setenv("GROK_MOE_IMPL", "triton")
    assert resolve_impl("auto", x) == "triton" and resolve_impl("torch", x) == "torch"
    monkeypatch.setenv("GROK_MOE_IMPL", "cuda")
    with pytest.raises(ValueError, match="GROK_MOE_IMPL"):
        resolve_impl("auto", x)
    with pytest.raises(ValueError, match="impl"):
        resolve_impl("fast", x)
