"""Blockwise attention (grok_torch.kernels.attention) against the dense formula, and its memory bound.

* random inputs with left / right / interior padding, the cap active, rows with no visible key,
  GQA, per-row positions over a longer cache, several block sizes and S not a multiple of them,
  with and without the causal block skipping: equal to the dense formula to fp32 rounding (and bit
  for bit when one block holds every key, the order the official code computes in);
* precision="bf16" equals the dense formula on bf16-rounded q, k, v (and p);
* one attention sublayer at Grok-1's head shapes (d_model 6144, 48/8 heads of 128) at T = 4096 in a
  subprocess: peak extra memory below a bound stated from the docstring's formula, which the dense
  version's score tensor alone exceeds.
"""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from grok_torch.kernels.attention import attention, attention_blocks, attention_dense, attention_reference

CAP = 30.0


def make_inputs(B, T, Hq, Hkv, dh, S, pattern, seed=0, scale=3.0):
    """q [B,T,Hq,dh], k/v [B,S,Hkv,dh], q_pos [B,T], key_valid [B,S] for a padding pattern."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, Hq, dh, generator=g) * scale
    k = torch.randn(B, S, Hkv, dh, generator=g) * scale
    v = torch.randn(B, S, Hkv, dh, generator=g)
    valid = torch.ones(B, S, dtype=torch.bool)
    if pattern == "prefill":  # no cache: S = T, positions 0..T-1; row 0 left-padded, row 1 right-padded, interior pads
        q_pos = torch.arange(T).expand(B, T).clone()
        valid[0, : T // 3] = False
        valid[1 % B, T - T // 4:] = False
        valid[-1, T // 2: T // 2 + 2] = False
    else:  # "decode": each row at its own position in a longer cache; one row with no valid key
        q_pos = torch.stack([torch.arange(T) + (S - T - 3 * b) for b in range(B)])
        valid[:, ::5] = False
        valid[-1] = False
    return q, k, v, q_pos, valid


def fully_masked(q_pos, valid):
    S = valid.shape[1]
    visible = valid[:, None, :] & (torch.arange(S) <= q_pos[:, :, None])
    return ~visible.any(-1)


CASES = [  # (B, T, Hq, Hkv, dh, S, pattern)
    (3, 37, 6, 2, 16, 37, "prefill"),
    (2, 50, 4, 4, 8, 50, "prefill"),
    (3, 1, 6, 2, 16, 41, "decode"),
    (2, 4, 12, 2, 32, 29, "decode"),
]


@pytest.mark.parametrize("case", CASES, ids=[f"{c[6]}-B{c[0]}-T{c[1]}-G{c[2] // c[3]}-S{c[5]}" for c in CASES])
@pytest.mark.parametrize("blocks", [(None, None), (7, 5), (16, 16), (1, 64)], ids=lambda b: f"bq{b[0]}-bk{b[1]}")
@pytest.mark.parametrize("causal", [False, True], ids=["all-keys", "skip-future"])
def test_blockwise_equals_dense(case, blocks, causal):
    B, T, Hq, Hkv, dh, S, pattern = case
    q, k, v, q_pos, valid = make_inputs(B, T, Hq, Hkv, dh, S, pattern, seed=T + S)
    masked = fully_masked(q_pos, valid)
    assert masked.any() and not masked.all(), "the case must hold rows with and without visible keys"
    sc = 0.5 * (16 / dh) ** 0.5  # the cap bites for every head dim
    s_raw = torch.einsum("bthd,bshd->bhts", q, k.repeat_interleave(Hq // Hkv, dim=2)) * sc
    assert (s_raw.abs() > CAP).float().mean() > 0.05, "the cap must be active"
    # the promise causal_offset makes: q_pos[b, t] <= offset + t
    offset = int((q_pos - torch.arange(T)).max()) if causal else None
    want = attention_dense(q, k, v, q_pos, valid, scale=sc, cap=CAP)
    got = attention_reference(q, k, v, q_pos, valid, scale=sc, cap=CAP, causal_offset=offset,
                              block_q=blocks[0], block_k=blocks[1])
    assert got.dtype == torch.float32 and got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-5, atol=2e-6)
    # rows with no visible key: the plain mean of V over all S keys (the official -1e30 behaviour)
    mean = v.mean(1).repeat_interleave(Hq // Hkv, dim=1)
    b, t = masked.nonzero(as_tuple=True)
    torch.testing.assert_close(got[b, t], mean[b], rtol=1e-5, atol=2e-6)
    if blocks == (None, None) and not causal:  # one block holds every key: the dense order, bit for bit
        assert torch.equal(got, want)


def test_cached_keys_past_the_positions_do_not_matter():
    """Decode over a preallocated cache: garbage in the unwritten tail changes no row that sees a key."""
    q, k, v, q_pos, valid = make_inputs(2, 1, 6, 2, 16, 40, "decode", seed=3)
    valid[-1, 0] = True  # every row sees a key now
    tail = torch.arange(40) > q_pos.max()
    k2, v2 = k.clone(), v.clone()
    k2[:, tail], v2[:, tail] = 1e4, -1e4
    for offset in (None, int(q_pos.max())):
        a = attention_reference(q, k, v, q_pos, valid, scale=0.5, cap=CAP, causal_offset=offset, block_k=8)
        b = attention_reference(q, k2, v2, q_pos, valid, scale=0.5, cap=CAP, causal_offset=offset, block_k=8)
        assert torch.equal(a, b)


def test_bf16_precision_rounds_the_operands():
    q, k, v, q_pos, valid = make_inputs(2, 9, 6, 2, 16, 9, "prefill", seed=5)
    r = lambda x: x.to(torch.bfloat16).float()  # noqa: E731
    got = attention_reference(q, k, v, q_pos, valid, scale=0.5, cap=CAP, precision="bf16")
    # one key block: p is the normalised softmax, rounded to bf16 like the official p.astype(bf16)
    s = torch.einsum("btkgd,bskd->bkgts", r(q).view(2, 9, 2, 3, 16), r(k)) * 0.5
    s = (CAP * torch.tanh(s / CAP)).masked_fill(~(valid[:, None, :] & (torch.arange(9) <= q_pos[:, :, None]))[:, None, None], -1e30)
    want = torch.einsum("bkgts,bskd->btkgd", r(torch.softmax(s, -1)), r(v)).reshape(2, 9, 6, 16)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    fp32 = attention_reference(q, k, v, q_pos, valid, scale=0.5, cap=CAP)
    assert (got - fp32).abs().max() > 1e-4, "bf16 precision must actually round"


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_gradients_flow_whatever_the_impl(monkeypatch, impl):
    """With autograd recording, attention() is differentiable on either path: impl "torch" runs the
    blockwise reference (autograd through its ops), "triton" the flash kernels' forward + backward
    (flash_attention.FlashAttention; on the CPU under the Triton interpreter). Either way a trained
    projection before it (LoRA) gets its true gradient, for q, k and v."""
    from grok_torch.kernels import attention as attention_mod
    from grok_torch.kernels import flash_attention as fa

    ran = []
    real_ref, real_fn = attention_mod.attention_reference, fa.FlashAttention.apply
    monkeypatch.setattr(attention_mod, "attention_reference", lambda *a, **k: ran.append("torch") or real_ref(*a, **k))
    monkeypatch.setattr(fa.FlashAttention, "apply", lambda *a: ran.append("triton") or real_fn(*a))
    q, k, v, q_pos, valid = make_inputs(2, 7, 6, 2, 16, 7, "prefill", seed=9)
    grads = []
    for fn in (lambda *a: attention(*a, scale=0.5, cap=CAP, causal_offset=0, impl=impl),
               lambda *a: attention_dense(*a, scale=0.5, cap=CAP)):
        qq, kk, vv = (x.clone().requires_grad_() for x in (q, k, v))
        out = fn(qq, kk, vv, q_pos, valid)
        assert out.requires_grad
        out.square().sum().backward()
        grads.append((qq.grad, kk.grad, vv.grad))
    assert ran == [impl]
    for got, want in zip(*grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5 * float(want.abs().max()))


def test_bad_arguments_name_themselves():
    q, k, v, q_pos, valid = make_inputs(1, 4, 6, 2, 16, 4, "prefill")
    with pytest.raises(ValueError, match="q_pos must be"):
        attention(q, k, v, q_pos[:, :2], valid, scale=1.0, cap=CAP, impl="torch")
    with pytest.raises(ValueError, match="precision"):
        attention(q, k, v, q_pos, valid, scale=1.0, cap=CAP, precision="fp16", impl="torch")
    with pytest.raises(ValueError, match="multiple of Hkv"):
        attention(q[:, :, :5], k, v, q_pos, valid, scale=1.0, cap=CAP, impl="torch")


# ---- memory: one sublayer at Grok-1's head shapes ------------------------------------------------

T_MEM = 4096
_MEMORY_SCRIPT = textwrap.dedent("""
    import json, resource, sys, torch
    from grok_torch.config import GrokConfig
    from grok_torch.model import Attention
    torch.set_num_threads(2)
    cfg = GrokConfig.from_name("grok-1")
    attn = Attention(cfg, torch.bfloat16, quantized=True)
    g = torch.Generator().manual_seed(0)
    for w in (attn.wq, attn.wk, attn.wv, attn.wo):
        w.weight.data = torch.randint(-127, 128, w.weight.shape, dtype=torch.int8, generator=g)
        w.scales.data = (torch.rand(w.scales.shape, generator=g) * 1e-3).to(torch.bfloat16)
    T = int(sys.argv[1])
    x = torch.randn(1, T, cfg.d_model, generator=g)
    pos, valid = torch.arange(T)[None], torch.ones(1, T, dtype=torch.bool)
    rss = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    base = rss()
    with torch.no_grad():
        out = attn(x, pos, valid, None, 0, 0)
    print(json.dumps(dict(extra=rss() - base, finite=bool(out.isfinite().all()))))
""")


def test_attention_sublayer_memory_at_grok_shapes():
    """T = 4096 at d_model 6144, 48 q / 8 kv heads of 128: peak extra memory < the stated bound < dense.

    Bound (kernels/attention.py's formula for the core, plus the sublayer's own tensors): the
    attention core's tiles, accumulators and K/V blocks; the reference projection's dequantised fp32
    matrix (and its int8 -> fp32 step); q and its RoPE temporaries (4 x [T, 6144] fp32). The peak RSS
    is measured in a fresh process with glibc's mmap threshold at 64 KiB, so freed tensors go back to
    the system and the figure is what tensors held, not what the allocator kept cached.
    """
    B, Hq, Hkv, dh, D = 1, 48, 8, 128, 6144
    bq, bk = attention_blocks(B, T_MEM, T_MEM, Hq)
    core = 4 * B * Hq * bq * bk * 4 + 2 * B * T_MEM * Hq * dh * 4 + 2 * B * bk * Hkv * dh * 4
    bound = core + 2 * D * D * 4 + 4 * B * T_MEM * D * 4
    dense_scores = B * Hq * T_MEM * T_MEM * 4  # one fp32 score tensor of the dense form (it makes several)
    assert dense_scores > bound
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS="2")
    proc = subprocess.run([sys.executable, "-c", _MEMORY_SCRIPT, str(T_MEM)], capture_output=True, text=True,
                          env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    import json

    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert res["finite"]
    assert res["extra"] < bound, f"peak extra {res['extra'] / 2**20:.0f} MiB >= bound {bound / 2**20:.0f} MiB"
