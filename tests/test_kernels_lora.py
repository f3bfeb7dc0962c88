"""Expert LoRA on the Triton MoE kernels (grok_torch.kernels.ops) against the reference's ExpertLoRA.

The low-rank products ``t = scale * x[row] @ A[e]`` and ``t @ B[e]`` run on the expert-sorted rows with
the same grouped-GEMM kernel (exact fp32, as the reference adds the deltas in fp32); the up GEMM adds
the gate/up deltas before the GELU, the down GEMM the down delta before the gate. Checked under the
interpreter (fp32 and fp16, small shapes; bf16 on a GPU only):
  * forward == moe_experts_reference / moe_reference with the same ExpertLoRA (tolerance table of
    test_kernels_triton): decode T=1, experts with no tokens, r = 4 and 16 (below the tile), float
    and int8 weights (G = 1 and 2), a shard of local experts (expert_start), some adapters absent;
  * backward (fp32): dx, dgates, dA and dB == the reference's autograd gradients, the base frozen;
  * B = 0 gives the no-LoRA Triton output bit for bit; no fallback warning for dropout 0 (dropout > 0
    still runs the reference, with a warning).
"""
import warnings

import pytest
import torch

from grok_torch import kernels
from grok_torch.kernels import ExpertLoRA, fused_moe, moe_experts, moe_experts_reference, moe_reference
from test_kernels_triton import TOLERANCES, _make_inputs


def make_lora(E, D, F, r, *, seed=0, scale=2.0, which=("w1", "w3", "w2"), zero_b=False, grad=False):
    """Adapters of E experts: A ~ N(0, 1/in), B ~ N(0, 0.25/r) (0 with zero_b), fp32."""
    g = torch.Generator().manual_seed(seed + 1000)
    ab = {}
    for name, (i, o) in (("w1", (D, F)), ("w3", (D, F)), ("w2", (F, D))):
        if name not in which:
            ab[name] = None
            continue
        a = torch.randn(E, i, r, generator=g) / i ** 0.5
        b = torch.zeros(E, r, o) if zero_b else torch.randn(E, r, o, generator=g) * 0.5 / r ** 0.5
        ab[name] = (a.requires_grad_(grad), b.requires_grad_(grad))
    return ExpertLoRA(ab["w1"], ab["w3"], ab["w2"], scale=scale)


def _routing(T, E_total, K, seed):
    g = torch.Generator().manual_seed(seed + 7)
    ids = torch.stack([torch.randperm(E_total, generator=g)[:K] for _ in range(T)])
    gates = torch.rand(T, K, generator=g)
    return gates, ids


def _weights(T, D, F, E, wkind, cd, seed):
    G = {"int8-G1": (1, 1, 1), "int8-G2": (2, 2, 2)}.get(wkind, (1, 1, 1))
    x, _, ws, scales = _make_inputs(T, D, F, E, torch.int8 if wkind.startswith("int8") else cd, seed, G=G)
    return x, ws, scales


# (T, D, F, E_local, E_total, expert_start, r, why)
CASES = [
    (1, 32, 48, 8, 8, 0, 4, "decode T=1: two experts with work, six without; r=4 below every tile"),
    (7, 32, 32, 8, 8, 0, 16, "experts with no tokens; r=16"),
    (9, 32, 48, 4, 8, 4, 4, "a shard: local experts 4..7 (expert_start), slots elsewhere add nothing"),
]
CASE_IDS = [f"T{c[0]}-E{c[3]}of{c[4]}-start{c[5]}-r{c[6]}" for c in CASES]


@pytest.mark.parametrize("cd, atol, rtol", TOLERANCES)
@pytest.mark.parametrize("wkind", ["float", "int8-G1", "int8-G2"])
@pytest.mark.parametrize("T, D, F, E, E_total, e0, r, why", CASES, ids=CASE_IDS)
def test_moe_experts_lora_matches_reference(cd, atol, rtol, wkind, T, D, F, E, E_total, e0, r, why):
    x, ws, scales = _weights(T, D, F, E, wkind, cd, seed=T + r)
    gates, ids = _routing(T, E_total, 2, seed=T)
    lora = make_lora(E, D, F, r, seed=T)
    kw = dict(scales=scales, expert_start=e0, compute_dtype=cd, lora=lora)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*LoRA.*")  # no fallback for dropout 0
        got = moe_experts(x, gates, ids, *ws, impl="triton", **kw)
    want = moe_experts_reference(x, gates, ids, *ws, **kw)
    base = moe_experts_reference(x, gates, ids, *ws, scales=scales, expert_start=e0, compute_dtype=cd)
    assert (want - base).abs().max() > 10 * atol, "the adapters must change the output for the test to mean anything"
    torch.testing.assert_close(got, want, atol=atol, rtol=rtol)


@pytest.mark.parametrize("which", [("w3", "w2"), ("w1",), ("w2",)], ids=["w3+w2", "w1", "w2"])
@pytest.mark.parametrize("deterministic", [True, False])
def test_fused_moe_lora_matches_reference(which, deterministic):
    """Through fused_moe (router + all experts), some adapters absent, both combines."""
    x, rw, ws, _ = _make_inputs(11, 32, 48, 8, torch.float32, seed=3)
    lora = make_lora(8, 32, 48, 8, seed=3, which=which)
    got, probs, ids = fused_moe(x, rw, *ws, lora=lora, impl="triton", deterministic=deterministic)
    want, want_probs, want_ids = moe_reference(x, rw, *ws, lora=lora)
    assert torch.equal(ids, want_ids)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("wkind", ["float", "int8-G2"])
def test_zero_b_is_the_no_lora_output_bit_for_bit(wkind):
    T, D, F, E = 9, 32, 48, 8
    x, ws, scales = _weights(T, D, F, E, wkind, torch.float32, seed=5)
    _, rw, _, _ = _make_inputs(T, D, F, E, torch.float32, seed=5)
    gates, ids = _routing(T, E, 2, seed=5)
    lora = make_lora(E, D, F, 16, seed=5, zero_b=True)
    for e0, sl in ((0, slice(0, E)), (4, slice(4, E))):  # all experts, and a shard
        w = [t[sl] for t in ws]
        s = None if scales is None else tuple(t[sl] for t in scales)
        lo = ExpertLoRA(*[(a[sl], b[sl]) for a, b in lora[:3]], scale=lora.scale)
        base = moe_experts(x, gates, ids, *w, scales=s, expert_start=e0, impl="triton")
        assert torch.equal(moe_experts(x, gates, ids, *w, scales=s, expert_start=e0, impl="triton", lora=lo), base)
    base = fused_moe(x, rw, *ws, scales=scales, compute_dtype=torch.float32, impl="triton")[0]
    got = fused_moe(x, rw, *ws, scales=scales, compute_dtype=torch.float32, impl="triton", lora=lora)[0]
    assert torch.equal(got, base)


@pytest.mark.parametrize("wkind, e0, E_total, r, deterministic", [
    ("float", 0, 8, 4, True),
    ("int8-G2", 0, 8, 16, False),
    ("int8-G1", 4, 8, 4, True),
], ids=["float-r4", "int8G2-r16-atomic", "int8G1-shard-r4"])
def test_backward_matches_reference(wkind, e0, E_total, r, deterministic):
    """fp32: gradients of x, gates and every adapter tensor == the reference's autograd; base frozen."""
    T, D, F, E = 7, 32, 48, E_total - e0
    x, ws, scales = _weights(T, D, F, E, wkind, torch.float32, seed=11)
    gates, ids = _routing(T, E_total, 2, seed=11)
    dout = torch.randn(T, D, generator=torch.Generator().manual_seed(12))
    grads = []
    for impl in ("triton", "torch"):
        xx, gg = x.clone().requires_grad_(), gates.clone().requires_grad_()
        lora = make_lora(E, D, F, r, seed=11, grad=True)
        out = moe_experts(xx, gg, ids, *ws, scales=scales, expert_start=e0, compute_dtype=torch.float32,
                          lora=lora, impl=impl, deterministic=deterministic)
        params = [xx, gg] + [t for ab in lora[:3] for t in ab]
        grads.append(torch.autograd.grad((out * dout).sum(), params))
    names = ["x", "gates", "A1", "B1", "A3", "B3", "A2", "B2"]
    for name, a, b in zip(names, *grads):
        assert b.abs().max() > 0, name
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4, msg=lambda m: f"grad of {name}: {m}")
    assert all(not w.requires_grad for w in ws)


def test_adapter_grads_of_experts_without_tokens_are_zero():
    T, D, F, E = 1, 32, 32, 8
    x, ws, _ = _weights(T, D, F, E, "float", torch.float32, seed=2)
    gates, ids = _routing(T, E, 2, seed=2)
    lora = make_lora(E, D, F, 4, seed=2, grad=True)
    out = moe_experts(x, gates, ids, *ws, lora=lora, impl="triton")
    out.sum().backward()
    idle = sorted(set(range(E)) - set(ids.flatten().tolist()))
    for a, b in lora[:3]:
        assert torch.equal(a.grad[idle], torch.zeros_like(a.grad[idle]))
        assert torch.equal(b.grad[idle], torch.zeros_like(b.grad[idle]))
        assert a.grad.abs().sum() > 0 and b.grad.abs().sum() > 0


def test_dropout_falls_back_to_the_reference_with_a_warning(monkeypatch):
    x, ws, _ = _weights(3, 16, 16, 4, "float", torch.float32, seed=1)
    gates, ids = _routing(3, 4, 2, seed=1)
    lora = make_lora(4, 16, 16, 4)._replace(dropout=0.5)
    monkeypatch.setattr(kernels, "_WARNED", set())
    with pytest.warns(UserWarning, match="dropout"):
        out = moe_experts(x, gates, ids, *ws, lora=lora, impl="triton")
    assert out.shape == (3, 16)


def test_adapter_shape_errors_name_the_argument():
    x, ws, _ = _weights(3, 16, 16, 4, "float", torch.float32, seed=1)
    gates, ids = _routing(3, 4, 2, seed=1)
    bad = make_lora(4, 16, 16, 4)
    bad = bad._replace(w2=(bad.w2[0], bad.w2[1][:, :2]))  # B2 rank 2 != A2 rank 4
    with pytest.raises(ValueError, match="lora.w2"):
        moe_experts(x, gates, ids, *ws, lora=bad, impl="triton")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="bf16 needs a GPU: the Triton interpreter's bf16 arithmetic is wrong")
@pytest.mark.parametrize("wkind", ["bf16", "int8"])
@pytest.mark.parametrize("T", [1, 64, 300])
def test_bf16_lora_on_gpu(wkind, T):
    D, F, E = 256, 512, 8
    x, rw, ws, scales = _make_inputs(T, D, F, E, torch.bfloat16 if wkind == "bf16" else torch.int8, seed=T)
    x, rw, ws = x.cuda(), rw.cuda(), [w.cuda() for w in ws]
    scales = tuple(s.cuda() for s in scales) if scales else None
    lora = make_lora(E, D, F, 16, seed=T, grad=True)
    lora = ExpertLoRA(*[(a.detach().cuda().requires_grad_(), b.detach().cuda().requires_grad_()) for a, b in lora[:3]],
                      scale=lora.scale)
    outs, grads = [], []
    for impl in ("triton", "torch"):
        xx = x.clone().requires_grad_()
        out = fused_moe(xx, rw, *ws, scales=scales, impl=impl, lora=lora)[0]
        params = [xx] + [t for ab in lora[:3] for t in ab]
        grads.append(torch.autograd.grad(out.float().square().sum(), params))
        outs.append(out.float())
    torch.testing.assert_close(outs[0], outs[1], atol=2e-2, rtol=2e-2)
    for a, b in zip(*grads):  # bf16 rounding of different intermediates: relative to the largest entry
        assert (a.float() - b.float()).abs().max() <= 3e-2 * b.float().abs().max() + 1e-3
