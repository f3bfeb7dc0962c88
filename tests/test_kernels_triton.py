"""Triton MoE kernels (grok_torch.kernels.ops) against the pure-PyTorch reference.

On a machine without CUDA the kernels run under the Triton interpreter (tests/conftest.py sets
TRITON_INTERPRET=1 before any test imports them; the library never does). The interpreter gets bf16 arithmetic wrong, so bf16 is
checked on the GPU only; fp32 and fp16 run everywhere, on small shapes, because it is slow.

Covers:
  * routing: probabilities, top-k ids (ties to the lower index), gates, softcap, renormalisation,
    forced experts; the grouping invariants (counts, padded offsets, stable sorted rows, padding
    markers, the expert of each tile);
  * each GEMM on its own (up: gather + gate/up + gelu*up; down: gate epilogue) and the whole layer,
    fp32 and fp16, int8 with G = 1 and G = 8, against the reference with a per-dtype tolerance table;
  * labelled shape cases: decode, T < block, T not a multiple of the block, k = 1, 2, 8 with E = 8,
    experts with no tokens, all tokens on one expert, dims that need masks;
  * every output is poisoned (NaN / sentinel) before the run and checked fully written;
  * determinism (same bits twice); backward against the reference in fp32 (float and frozen int8
    weights) and torch.autograd.gradcheck in fp64;
  * deterministic=False (the combine as fp32 atomics in the down GEMM's epilogue): against the
    reference (same tolerance table), against deterministic=True (fp32 reassociation; bit-equal for
    k <= 2), at the moe_down level against the slot sum, and the backward through it.
"""
import contextlib
import math

import pytest
import torch

from grok_torch.kernels import fused_moe
from grok_torch.kernels import ops
from grok_torch.kernels.ops import GemmConfig, moe_align, moe_down, moe_route, moe_up
from grok_torch.kernels.reference import dequantize, gelu_tanh, route

INT_POISON = -777


@contextlib.contextmanager
def poisoned_outputs():
    """Every torch.empty made by the wrappers comes back full of NaN (floats) or INT_POISON (ints)."""
    real_empty = torch.empty

    def empty(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        return t.fill_(float("nan") if t.is_floating_point() else INT_POISON)

    torch.empty, ops.torch.empty = empty, empty
    try:
        yield
    finally:
        torch.empty = real_empty


def assert_written(*tensors):
    for t in tensors:
        bad = torch.isnan(t) if t.is_floating_point() else t == INT_POISON
        assert not bad.any(), f"{int(bad.sum())} of {t.numel()} elements never written"


def _make_inputs(T, D, F, E, wdtype, seed, G=(1, 1, 8)):
    """Activations fp32 (as the model passes them); float weights in wdtype, or int8 + bf16 scales."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, D, generator=g)
    router_w = torch.randn(D, E, generator=g) / math.sqrt(D)
    shapes = [(E, D, F), (E, D, F), (E, F, D)]
    if wdtype == torch.int8:
        ws = [torch.randint(-127, 128, s, generator=g, dtype=torch.int8) for s in shapes]
        scales = tuple(
            (torch.rand(s[0], G_, s[2], generator=g) * 2 + 0.5).div(127 * math.sqrt(s[1])).bfloat16()
            for s, G_ in zip(shapes, G)
        )
        return x, router_w, ws, scales
    ws = [(torch.randn(s, generator=g) / math.sqrt(s[1])).to(wdtype) for s in shapes]
    return x, router_w, ws, None


# (compute dtype, atol, rtol): fp32 differs only in summation order; fp16 in that the kernels keep
# the gate/up/down products in fp32 where the reference rounds them to fp16 (a few fp16 ulps).
TOLERANCES = [(torch.float32, 1e-5, 1e-4), (torch.float16, 3e-3, 5e-3)]

# (T, D, F, E, top_k, block_m, why)
SHAPES = [
    (1, 32, 32, 8, 2, 16, "decode: one token, two tiles with work, the rest exit"),
    (5, 32, 48, 8, 2, 16, "T < BLOCK_M: tiles mostly padding; F needs a column mask (48 < 64)"),
    (37, 40, 24, 8, 2, 16, "T not a multiple of the block; D and F not multiples of BLOCK_K/BLOCK_N"),
    (9, 16, 32, 8, 1, 16, "k = 1"),
    (6, 32, 16, 8, 8, 16, "k = E = 8: every expert gets every token"),
    (20, 48, 40, 3, 2, 32, "odd E (padded to 4 inside the router), bigger M tile"),
]
SHAPE_IDS = [f"T{s[0]}-D{s[1]}-F{s[2]}-E{s[3]}-k{s[4]}" for s in SHAPES]
SMALL_TILES = dict(block_n=32, block_k=16, num_warps=4, num_stages=2)


def _ref_rows(x, ws, scales, ids, cd):
    """Reference up/down per (token, slot) row: act [T*K, F] and unweighted y [T*K, D] in cd."""
    T, K = ids.shape
    s1, s3, s2 = scales if scales is not None else (None, None, None)
    act = torch.zeros(T * K, ws[0].shape[2], dtype=cd)
    y = torch.zeros(T * K, ws[2].shape[2], dtype=cd)
    flat = ids.reshape(-1).long()
    for e in range(ws[0].shape[0]):
        rows = (flat == e).nonzero().squeeze(1)
        if rows.numel() == 0:
            continue
        xe = x[rows // K].to(cd)
        g = xe @ dequantize(ws[0][e], None if s1 is None else s1[e], cd)
        u = xe @ dequantize(ws[1][e], None if s3 is None else s3[e], cd)
        act[rows] = (gelu_tanh(g.float(), cd) * u.float()).to(cd)
        y[rows] = act[rows] @ dequantize(ws[2][e], None if s2 is None else s2[e], cd)
    return act, y


# ---------------------------------------------------------------------------------------------
# Routing
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("T, D, F, E, top_k, block_m, why", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("softcap, renorm", [(None, False), (2.0, True)])
def test_route_matches_reference(T, D, F, E, top_k, block_m, why, softcap, renorm):
    x, rw, _, _ = _make_inputs(T, D, F, E, torch.float32, seed=T + E)
    x = x * 4  # spread the logits so the softcap matters
    with poisoned_outputs():
        r = moe_route(x, rw, top_k, renormalize=renorm, router_softcap=softcap, block_m=block_m)
    assert_written(r.router_probs, r.gates, r.topk_ids, r.sorted_ids, r.block_expert, r.counts, r.offsets)
    probs, gates, ids = route(x, rw, top_k, renormalize=renorm, router_softcap=softcap)
    torch.testing.assert_close(r.router_probs, probs, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(r.topk_ids.long(), ids, atol=0, rtol=0)
    torch.testing.assert_close(r.gates, gates, atol=1e-6, rtol=1e-5)


def test_route_ties_and_forced_experts():
    x = torch.randn(7, 32)
    r = moe_route(x, torch.zeros(32, 8), 3, block_m=16)  # all probabilities equal
    assert r.topk_ids.tolist() == [[0, 1, 2]] * 7
    forced = torch.tensor([[5, 1]] * 7)
    rw = torch.randn(32, 8)
    r = moe_route(x, rw, expert_ids=forced, block_m=16)
    probs, gates, _ = route(x, rw, expert_ids=forced)
    assert torch.equal(r.topk_ids.long(), forced)
    torch.testing.assert_close(r.gates, gates, atol=1e-6, rtol=1e-5)
    with pytest.raises(ValueError, match="expert_ids"):
        moe_route(x, rw, expert_ids=forced + 7)


@pytest.mark.parametrize(
    "T, K, E, block_m, skew, why",
    [
        (1, 2, 8, 16, False, "decode"),
        (300, 2, 8, 16, False, "several CHUNKs of 256 flat rows: the running offsets carry over"),
        (50, 1, 8, 32, True, "all tokens on one expert, the other seven empty"),
        (64, 8, 8, 16, False, "k = E"),
        (13, 2, 5, 64, False, "odd E, a block bigger than all rows"),
    ],
)
def test_align_invariants(T, K, E, block_m, skew, why):
    g = torch.Generator().manual_seed(T)
    if skew:
        ids = torch.full((T, K), 3)
    else:
        ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)])
    with poisoned_outputs():
        sorted_ids, block_expert, counts, offsets = moe_align(ids, E, block_m)
    assert_written(sorted_ids, block_expert, counts, offsets)
    flat = ids.reshape(-1)
    numel = flat.numel()
    assert counts.tolist() == torch.bincount(flat, minlength=E).tolist()
    padded = (counts + block_m - 1) // block_m * block_m
    assert offsets.tolist() == [0] + torch.cumsum(padded, 0).tolist()
    for e in range(E):
        seg = sorted_ids[offsets[e] : offsets[e + 1]]
        want = (flat == e).nonzero().squeeze(1).int()  # token order inside an expert: stable
        assert torch.equal(seg[: counts[e]], want), f"expert {e}"
        assert (seg[counts[e] :] == numel).all(), f"expert {e} padding"
        assert (block_expert[offsets[e] // block_m : offsets[e + 1] // block_m] == e).all()
    assert (sorted_ids[offsets[E] :] == numel).all()
    assert (block_expert[offsets[E] // block_m :] == -1).all()


# ---------------------------------------------------------------------------------------------
# GEMMs, one by one and together
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cd, atol, rtol", TOLERANCES)
@pytest.mark.parametrize("T, D, F, E, top_k, block_m, why", SHAPES, ids=SHAPE_IDS)
def test_up_and_down_gemms(cd, atol, rtol, T, D, F, E, top_k, block_m, why):
    x, rw, ws, _ = _make_inputs(T, D, F, E, cd, seed=1000 + T)
    cfg = GemmConfig(block_m=block_m, **SMALL_TILES)
    with poisoned_outputs():
        r = moe_route(x, rw, top_k, block_m=block_m)
        act, g, u = moe_up(x, ws[0], ws[1], r, config=cfg, store_preact=True)
        y = moe_down(act, ws[2], r, config=cfg)
    assert_written(act, g, u, y)
    act_ref, y_ref = _ref_rows(x, ws, None, r.topk_ids, cd)
    torch.testing.assert_close(act.float(), act_ref.float(), atol=atol, rtol=rtol)
    # the down GEMM multiplies by the gate rounded to the compute dtype
    y_ref = y_ref.float() * r.gates.to(cd).float().reshape(-1, 1)
    torch.testing.assert_close(y, y_ref, atol=atol, rtol=rtol)


@pytest.mark.parametrize("cd, atol, rtol", TOLERANCES)
@pytest.mark.parametrize("G", [(1, 1, 8), (1, 1, 1), (4, 4, 2)], ids=["release-G1-G1-G8", "G1", "G4-G4-G2"])
def test_int8_gemms(cd, atol, rtol, G):
    T, D, F, E = 19, 32, 64, 8
    x, rw, ws, scales = _make_inputs(T, D, F, E, torch.int8, seed=sum(G), G=G)
    cfg = GemmConfig(block_m=16, **SMALL_TILES)
    with poisoned_outputs():
        r = moe_route(x, rw, 2, block_m=16)
        act = moe_up(x, ws[0], ws[1], r, scales=scales[:2], compute_dtype=cd, config=cfg)
        y = moe_down(act, ws[2], r, scale=scales[2], compute_dtype=cd, config=cfg)
    assert_written(act, y)
    act_ref, y_ref = _ref_rows(x, ws, scales, r.topk_ids, cd)
    # int8 scales land in the fp32 accumulator here and on the weight in the reference
    torch.testing.assert_close(act.float(), act_ref.float(), atol=atol, rtol=rtol)
    y_ref = y_ref.float() * r.gates.to(cd).float().reshape(-1, 1)
    torch.testing.assert_close(y, y_ref, atol=atol, rtol=rtol)


@pytest.mark.parametrize("cd, atol, rtol", TOLERANCES)
@pytest.mark.parametrize("wkind", ["float", "int8"])
@pytest.mark.parametrize("T, D, F, E, top_k, block_m, why", SHAPES[:3], ids=SHAPE_IDS[:3])
def test_fused_moe_matches_reference(cd, atol, rtol, wkind, T, D, F, E, top_k, block_m, why):
    x, rw, ws, scales = _make_inputs(T, D, F, E, cd if wkind == "float" else torch.int8, seed=7 * T)
    kw = dict(top_k=top_k, scales=scales, compute_dtype=cd)
    with poisoned_outputs():
        out, probs, ids = fused_moe(x, rw, *ws, impl="triton", **kw)
    assert_written(out, probs)
    ref, ref_probs, ref_ids = fused_moe(x, rw, *ws, impl="torch", **kw)
    assert out.dtype == ref.dtype == cd and ids.dtype == torch.int64
    assert torch.equal(ids, ref_ids)
    torch.testing.assert_close(probs, ref_probs, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(out.float(), ref.float(), atol=atol, rtol=rtol)


def test_all_tokens_on_one_expert_and_empty_experts_untouched():
    T, D, F, E = 33, 32, 32, 8
    x, rw, ws, _ = _make_inputs(T, D, F, E, torch.float32, seed=5)
    forced = torch.stack([torch.full((T,), 6), torch.full((T,), 2)], 1)
    # experts without tokens hold NaN: any use of their weights would poison the output
    for w in ws:
        w[[0, 1, 3, 4, 5, 7]] = float("nan")
    out, _, ids = fused_moe(x, rw, *ws, expert_ids=forced, impl="triton")
    ref, _, _ = fused_moe(x, rw, *ws, expert_ids=forced, impl="torch")
    assert torch.equal(ids, forced)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)


def test_deterministic():
    x, rw, ws, scales = _make_inputs(40, 32, 48, 8, torch.int8, seed=11)
    a = fused_moe(x, rw, *ws, scales=scales, compute_dtype=torch.float16, impl="triton")[0]
    b = fused_moe(x, rw, *ws, scales=scales, compute_dtype=torch.float16, impl="triton")[0]
    assert torch.equal(a.view(torch.int16), b.view(torch.int16))


def test_shape_errors_name_the_argument():
    x, rw, ws, scales = _make_inputs(4, 16, 16, 4, torch.int8, seed=0)
    with pytest.raises(ValueError, match="scales"):
        fused_moe(x, rw, *ws, impl="triton")
    with pytest.raises(ValueError, match="s2"):
        fused_moe(x, rw, *ws, scales=(scales[0], scales[1], scales[2][:, :, :3]), impl="triton")
    with pytest.raises(ValueError, match="router_w"):
        fused_moe(x, rw[:, :3], *ws, scales=scales, impl="triton")
    with pytest.raises(ValueError, match="w3"):
        fused_moe(x, rw, ws[0], ws[1][:, :8], ws[2], scales=scales, impl="triton")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="bf16 needs a GPU: the Triton interpreter's bf16 arithmetic is wrong")
@pytest.mark.parametrize("deterministic", [True, False])
@pytest.mark.parametrize("wkind", ["bf16", "int8"])
@pytest.mark.parametrize("T", [1, 64, 300])
def test_bf16_on_gpu(wkind, T, deterministic):
    x, rw, ws, scales = _make_inputs(T, 256, 512, 8, torch.bfloat16 if wkind == "bf16" else torch.int8, seed=T)
    x, rw = x.cuda(), rw.cuda()
    ws = [w.cuda() for w in ws]
    scales = tuple(s.cuda() for s in scales) if scales else None
    out, _, ids = fused_moe(x, rw, *ws, scales=scales, impl="triton", deterministic=deterministic)
    ref, _, ref_ids = fused_moe(x, rw, *ws, scales=scales, impl="torch")
    assert torch.equal(ids, ref_ids)
    torch.testing.assert_close(out.float(), ref.float(), atol=2e-2, rtol=2e-2)
    if not deterministic:  # top_k = 2: the atomic sum is order-independent (up to subnormal flushing)
        det = fused_moe(x, rw, *ws, scales=scales, impl="triton")[0]
        torch.testing.assert_close(out, det, atol=1e-6, rtol=2.0**-7)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU (the CPU proof: tests/test_kernels_aot.py records every launch on the meta device)")
@pytest.mark.parametrize("T", [1, 64])
def test_cuda_graph_replay_on_gpu(T):
    """One capture serves every routing: replays with new tokens give the eager result bit for bit."""
    x, rw, ws, scales = _make_inputs(T, 256, 512, 8, torch.int8, seed=3)
    rw, ws, scales = rw.cuda(), [w.cuda() for w in ws], tuple(s.cuda() for s in scales)
    static_x = x.cuda()
    run = lambda: fused_moe(static_x, rw, *ws, scales=scales, impl="triton")[0]  # noqa: E731
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        run()  # compile and warm the allocator outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = run()
    for seed in (4, 5, 6):
        x_new = _make_inputs(T, 256, 512, 8, torch.int8, seed=seed)[0].cuda()
        static_x.copy_(x_new)
        graph.replay()
        torch.cuda.synchronize()
        eager = fused_moe(x_new, rw, *ws, scales=scales, impl="triton")[0]
        assert torch.equal(static_out, eager), f"replay with seed {seed} differs from the eager call"


# ---------------------------------------------------------------------------------------------
# Backward
# ---------------------------------------------------------------------------------------------


def _grads(impl, x, rw, ws, scales, cd, train_weights, top_k=2, **kw):
    x, rw = x.clone().requires_grad_(), rw.clone().requires_grad_()
    ws = [w.clone().requires_grad_(train_weights) for w in ws]
    out, probs, _ = fused_moe(x, rw, *ws, top_k=top_k, scales=scales, compute_dtype=cd, impl=impl, **kw)
    g = torch.Generator().manual_seed(1)
    # a loss through both outputs: the router probabilities are differentiable too
    loss = (out.float() * torch.randn(out.shape, generator=g)).sum() + (probs * torch.randn(probs.shape, generator=g)).sum()
    loss.backward()
    return [x.grad, rw.grad] + ([w.grad for w in ws] if train_weights else [])


@pytest.mark.parametrize(
    "wkind, train_weights, T, top_k",
    [("float", True, 11, 2), ("float", True, 4, 8), ("int8", False, 13, 2)],
    ids=["fp32-weights", "fp32-k8", "frozen-int8-G8"],
)
def test_backward_matches_reference(wkind, train_weights, T, top_k):
    x, rw, ws, scales = _make_inputs(T, 32, 48, 8, torch.float32 if wkind == "float" else torch.int8, seed=T)
    got = _grads("triton", x, rw, ws, scales, torch.float32, train_weights, top_k)
    want = _grads("torch", x, rw, ws, scales, torch.float32, train_weights, top_k)
    for name, a, b in zip(["x", "router_w", "w1", "w3", "w2"], got, want):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4, msg=lambda m: f"grad of {name}: {m}")


@pytest.mark.parametrize("deterministic", [True, False])
def test_gradcheck_fp64(deterministic):
    x, rw, ws, _ = _make_inputs(3, 16, 16, 4, torch.float64, seed=2)
    args = [t.double().requires_grad_() for t in (x, rw, *ws)]
    f = lambda *a: fused_moe(*a, compute_dtype=torch.float64, impl="triton", deterministic=deterministic)[0]  # noqa: E731
    # routing is piecewise constant: eps this small never flips an expert choice
    assert torch.autograd.gradcheck(f, tuple(args), eps=1e-6, atol=1e-6, fast_mode=True)


def test_weight_grads_of_empty_experts_are_zero_and_written():
    T, D, F, E = 5, 16, 32, 8
    x, rw, ws, _ = _make_inputs(T, D, F, E, torch.float32, seed=9)
    forced = torch.tensor([[2, 5]] * T)
    grads = {}
    for impl in ("triton", "torch"):
        wg = [w.clone().requires_grad_() for w in ws]
        with poisoned_outputs() if impl == "triton" else contextlib.nullcontext():
            out, _, _ = fused_moe(x, rw, *wg, expert_ids=forced, impl=impl)
            out.sum().backward()
        grads[impl] = [w.grad for w in wg]
    for got, want in zip(grads["triton"], grads["torch"]):
        assert_written(got)
        assert (got[[0, 1, 3, 4, 6, 7]] == 0).all()
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


# ---------------------------------------------------------------------------------------------
# deterministic=False: the top-k combine as fp32 atomics in the down GEMM's epilogue
# ---------------------------------------------------------------------------------------------

# (compute dtype, atol, rtol) between deterministic=False and True: the same fp32 terms summed in
# another order (fp32: a few ulps of the sum of |terms|; fp16: that, then at most one fp16 ulp).
REASSOC = {torch.float32: (1e-6, 1e-5), torch.float16: (1e-6, 2.0**-10)}

# (T, D, F, top_k, weights, why); E = 8
ATOMIC_CASES = [
    (1, 32, 32, 2, "float", "decode: one token"),
    (37, 40, 24, 2, "int8", "T not a multiple of the block, D needs a column mask; int8 G = 1, 1, 8"),
    (6, 32, 16, 8, "float", "k = E = 8: eight additions per token"),
    (9, 16, 32, 1, "int8", "k = 1"),
]
ATOMIC_IDS = [f"T{c[0]}-k{c[3]}-{c[4]}" for c in ATOMIC_CASES]


@pytest.mark.parametrize("cd, atol, rtol", TOLERANCES)
@pytest.mark.parametrize("T, D, F, top_k, wkind, why", ATOMIC_CASES, ids=ATOMIC_IDS)
def test_atomic_combine_matches_reference_and_deterministic(cd, atol, rtol, T, D, F, top_k, wkind, why):
    x, rw, ws, scales = _make_inputs(T, D, F, 8, cd if wkind == "float" else torch.int8, seed=3 * T + top_k)
    kw = dict(top_k=top_k, scales=scales, compute_dtype=cd)
    with poisoned_outputs():  # every torch.empty of the wrappers NaN; the atomics' buffer is zeroed
        out, probs, ids = fused_moe(x, rw, *ws, impl="triton", deterministic=False, **kw)
    # every element must hold its k contributions: NaN from a poisoned buffer or a missed row/column
    # (left at 0) would fail the comparisons below
    assert_written(out, probs)
    assert out.dtype == cd and out.shape == (T, D)
    ref, ref_probs, ref_ids = fused_moe(x, rw, *ws, impl="torch", **kw)
    ref_nd = fused_moe(x, rw, *ws, impl="torch", deterministic=False, **kw)[0]
    assert torch.equal(ref, ref_nd), "the reference ignores the flag"
    assert torch.equal(ids, ref_ids)
    torch.testing.assert_close(probs, ref_probs, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(out.float(), ref.float(), atol=atol, rtol=rtol)
    det = fused_moe(x, rw, *ws, impl="triton", **kw)[0]
    torch.testing.assert_close(out, det, atol=REASSOC[cd][0], rtol=REASSOC[cd][1])
    if top_k <= 2:  # 0 + a = a and a + b = b + a exactly: the order cannot matter
        assert torch.equal(out, det)


@pytest.mark.parametrize("cd", [torch.float32, torch.float16])
@pytest.mark.parametrize("T, D, F, E, top_k, block_m, why", [SHAPES[2], SHAPES[4]], ids=[SHAPE_IDS[2], SHAPE_IDS[4]])
def test_moe_down_atomic_is_the_slot_sum(cd, T, D, F, E, top_k, block_m, why):
    """moe_down(deterministic=False) returns [T, D] fp32: the slot sum of its deterministic [T*K, D] rows."""
    x, rw, ws, _ = _make_inputs(T, D, F, E, cd, seed=50 + T)
    cfg = GemmConfig(block_m=block_m, **SMALL_TILES)  # several column tiles, masked columns
    r = moe_route(x, rw, top_k, block_m=block_m)
    act = moe_up(x, ws[0], ws[1], r, config=cfg)
    with poisoned_outputs():
        y = moe_down(act, ws[2], r, config=cfg)
        out = moe_down(act, ws[2], r, config=cfg, deterministic=False)
    assert_written(y, out)
    assert out.dtype == torch.float32 and out.shape == (T, D)
    torch.testing.assert_close(out, y.view(T, top_k, D).sum(1), atol=1e-6, rtol=1e-5)
    if top_k <= 2:
        assert torch.equal(ops.moe_combine(y, top_k, torch.float32), out)


@pytest.mark.parametrize(
    "wkind, train_weights, T, top_k",
    [("float", True, 11, 2), ("int8", False, 5, 8)],
    ids=["fp32-weights-k2", "frozen-int8-G8-k8"],
)
def test_backward_through_atomic_combine(wkind, train_weights, T, top_k):
    x, rw, ws, scales = _make_inputs(T, 32, 48, 8, torch.float32 if wkind == "float" else torch.int8, seed=20 + T)
    got = _grads("triton", x, rw, ws, scales, torch.float32, train_weights, top_k, deterministic=False)
    want = _grads("torch", x, rw, ws, scales, torch.float32, train_weights, top_k, deterministic=False)
    for name, a, b in zip(["x", "router_w", "w1", "w3", "w2"], got, want):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4, msg=lambda m: f"grad of {name}: {m}")
