"""Triton flash attention (grok_torch.kernels.flash_attention) against a dense fp32 oracle.

Without CUDA the kernel runs under the Triton interpreter (tests/conftest.py turns it on; fp32 only:
the interpreter's bf16 arithmetic is wrong), on small shapes. Covers:
  * GQA G = 3, 4 and 1; dh 16 and 32; fp32 and fp16 K/V; several S not a multiple of the key block,
    with the default tiles and with small ones (several key blocks, several token blocks per head);
  * left padding (padding queries see no key: fully masked rows = mean of V over all S keys), right
    padding, interior invalid keys, chunked prefill at the end of a cache, decode T=1 with a different
    position per sequence over a strided view of a longer cache (NaN past S, garbage past each
    position that must not matter), speculative T=3;
  * the soft cap active (|s| > cap before it); the output poisoned and fully written; determinism;
  * argument errors; the launch recorded on the meta device (no host read of a tensor's values);
  * the sm_90 build (no register spills, shared memory fits, tensor cores for bf16 and none, exact
    fp32, for fp32) is compiled by tests/test_kernels_aot.py (grok_torch.kernels.aot); here, that its
    variants include every (T, precision, K/V dtype) launch at Grok-1 shapes;
  * on a GPU only: Grok-1 shapes (Hq=48, Hkv=8, dh=128, T=1 and 512, S=2048), fp32 and bf16.
Backward (FlashAttention: forward with row log-sum-exp, dK/dV and dQ kernels; attention(impl="triton")
while autograd records):
  * a fp64 gradcheck of the dense oracle (fully masked rows included), the ground truth;
  * dq, dk, dv equal the autograd of the dense fp32 formula (attention_dense) and of the blockwise
    reference (attention_reference) for G = 1, 2, 3, dh 8, 16, 24 (not a power of two), T < S at a
    causal offset (decode / a chunk at the end), left / right padding, invalid keys, B > 1, the cap
    active, default and small tiles. Tolerance atol = 1e-5 * max|grad| (rtol 1e-4): measured at most
    2.0e-6 * max|grad| against the fp64 oracle (dense fp32 autograd: 5e-7); the forward's tanh through
    a sigmoid costs ~cap * 1e-7 on a score (~1e-6 of the output, as the forward tests allow);
  * rows with no visible key: dq = 0 and no dk from them, exactly, and dv = dO / S on every key;
  * the training forward's output is bit-identical to the inference one, the backward deterministic;
  * the inference launch (no grad) is exactly the one before the backward existed (no statistics
    written); training launches forward (+ lse), dK/dV, dQ, all on the meta device (no host sync);
  * on a GPU only: Grok-1 shapes backward in fp32 and bf16.
"""
import json
import os
import subprocess
import sys

import pytest
import torch

from grok_torch.kernels import flash_attention as fa
from grok_torch.kernels.flash_attention import AttnConfig, flash_attention_triton

CAP = 30.0


def oracle(q, k, v, q_pos, key_valid, scale, cap=CAP, dtype=torch.float32):
    """The official semantics, dense, in fp32 (or `dtype`): capped scores, -1e30 mask, softmax over all S keys."""
    G = q.shape[2] // k.shape[2]
    kk = k.to(dtype).repeat_interleave(G, dim=2)
    vv = v.to(dtype).repeat_interleave(G, dim=2)
    s = torch.einsum("bthd,bshd->bhts", q.to(dtype), kk) * scale
    s = cap * torch.tanh(s / cap)
    j = torch.arange(k.shape[1], device=q.device)
    visible = key_valid[:, None, None, :] & (j[None, None, None, :] <= q_pos[:, None, :, None])
    s = torch.where(visible, s, torch.tensor(-1e30, dtype=dtype, device=q.device))
    return torch.einsum("bhts,bshd->bthd", torch.softmax(s, dim=-1), vv)


def fully_masked(q_pos, key_valid):
    """[B, T] rows with no visible key."""
    j = torch.arange(key_valid.shape[1], device=q_pos.device)
    return ~(key_valid[:, None, :] & (j[None, None, :] <= q_pos[:, :, None])).any(-1)


def _positions(pattern, B, T, S, g):
    """(q_pos [B, T] int64, key_valid [B, S] bool) for a padding pattern."""
    t = torch.arange(T)
    j = torch.arange(S)
    valid = torch.ones(B, S, dtype=torch.bool)
    if pattern == "left-pad":  # prefill, T == S: the first pad_b queries and keys are padding
        pads = torch.tensor([5, 0, S - 2][:B])
        valid = j[None, :] >= pads[:, None]
        pos = t.expand(B, T)
    elif pattern == "right-pad":  # prefill, T == S: keys past each length invalid
        lens = torch.tensor([S - 6, S, 1][:B])
        valid = j[None, :] < lens[:, None]
        pos = t.expand(B, T)
    elif pattern == "interior":  # a chunk at the end of the sequence; invalid keys inside it
        valid[:, S // 3 : S // 3 + 7] = False
        valid &= torch.rand(B, S, generator=g) > 0.2
        pos = (t + S - T).expand(B, T)
    elif pattern == "decode":  # T positions from p0 on; S ends past every position (garbage there)
        p0 = torch.tensor([S - T, S // 2, 3, -1, 0][:B])
        if B > 2:
            valid[1, :4] = False  # left padding
            valid[2, :] = False  # nothing valid at all: fully masked
        pos = p0[:, None] + t[None, :]
    else:
        raise ValueError(pattern)
    return pos.contiguous().long(), valid.contiguous()


def make_inputs(B, T, Hq, Hkv, dh, S, pattern, kv_dtype=torch.float32, max_len=None, seed=0, device="cpu"):
    """q [B, T, Hq, dh]; k, v strided views [:, :S] of [B, max_len, Hkv, dh] caches (NaN past S)."""
    g = torch.Generator().manual_seed(seed)
    max_len = max_len or S + 9
    q = torch.randn(B, T, Hq, dh, generator=g)
    caches = []
    for _ in range(2):
        c = torch.full((B, max_len, Hkv, dh), float("nan"))
        c[:, :S] = torch.randn(B, S, Hkv, dh, generator=g)
        caches.append(c.to(kv_dtype).to(device))
    q_pos, valid = _positions(pattern, B, T, S, g)
    k, v = (c[:, :S] for c in caches)
    return q.to(device), k, v, q_pos.to(device), valid.to(device), caches


def assert_close_fp32(out, ref, v):
    vscale = float(v.float().abs().max())
    torch.testing.assert_close(out, ref, atol=1e-5 * vscale, rtol=1e-4)


@pytest.fixture
def tiles(monkeypatch):
    """tiles(cfg): force a tile config on every kernel, forward and backward (None: the defaults)."""

    def force(cfg):
        if cfg is not None:
            monkeypatch.setattr(fa, "attention_config", lambda *a, **k: cfg)
            monkeypatch.setattr(fa, "attention_bwd_config", lambda *a, **k: (cfg, cfg))

    return force


SMALL = AttnConfig(block_m=16, block_n=16, num_warps=4, num_stages=1)

# (B, T, Hq, Hkv, dh, S, pattern, scale, why)
CASES = [
    (3, 23, 6, 2, 16, 23, "left-pad", 0.25, "G=3; padding queries fully masked; S=23 not a block multiple"),
    (3, 21, 6, 2, 32, 21, "right-pad", 0.2, "G=3, dh=32; a sequence of length 1"),
    (2, 13, 2, 2, 16, 41, "interior", 0.25, "G=1; a chunk at the end of 41 keys, invalid keys inside"),
    (2, 9, 8, 2, 16, 30, "interior", 0.25, "G=4 (a power of two)"),
    (5, 1, 6, 2, 16, 37, "decode", 0.25, "decode: a position per sequence, one at -1, one with no valid key"),
    (4, 3, 3, 1, 32, 35, "decode", 0.2, "speculative T=3, G=3 = all heads on one kv head"),
    (2, 19, 4, 2, 8, 19, "left-pad", 0.3, "dh=8 (the tiny model's), padded to 16 lanes in registers"),
    (5, 1, 6, 2, 24, 29, "decode", 0.2, "dh=24, not a power of two"),
    (2, 17, 6, 2, 16, 17, "left-pad", 4.0, "cap active: |s| up to ~2x the cap before it"),
]
CASE_IDS = [f"B{c[0]}-T{c[1]}-Hq{c[2]}-Hkv{c[3]}-dh{c[4]}-S{c[5]}-{c[6]}-x{c[7]}" for c in CASES]


@pytest.mark.parametrize("cfg", [None, SMALL], ids=["default-tiles", "small-tiles"])
@pytest.mark.parametrize("kv_dtype", [torch.float32, torch.float16], ids=["kv32", "kv16"])
@pytest.mark.parametrize("B, T, Hq, Hkv, dh, S, pattern, scale, why", CASES, ids=CASE_IDS)
def test_matches_oracle(tiles, monkeypatch, B, T, Hq, Hkv, dh, S, pattern, scale, why, kv_dtype, cfg):
    tiles(cfg)
    q, k, v, q_pos, valid, _ = make_inputs(B, T, Hq, Hkv, dh, S, pattern, kv_dtype, seed=B * 100 + T + S)
    real_empty = torch.empty
    with monkeypatch.context() as mp:  # the output starts as NaN: every element must be written
        mp.setattr(torch, "empty", lambda *a, **kw: real_empty(*a, **kw).fill_(float("nan")))
        out = flash_attention_triton(q, k, v, q_pos, valid, scale=scale, cap=CAP)
    assert out.dtype == torch.float32 and out.shape == q.shape and out.is_contiguous()
    assert not out.isnan().any(), f"{int(out.isnan().sum())} of {out.numel()} outputs never written"
    ref = oracle(q, k, v, q_pos, valid, scale)
    assert_close_fp32(out, ref, v)
    masked = fully_masked(q_pos, valid)
    if masked.any():  # the official left-padding behaviour: the plain mean of V over all S keys
        G = Hq // Hkv
        mean = v.float().mean(dim=1).repeat_interleave(G, dim=1)  # [B, Hq, dh]
        b, t = masked.nonzero(as_tuple=True)
        assert_close_fp32(out[b, t], mean[b], v)


def test_cases_exercise_what_they_claim():
    """The labelled patterns really contain fully masked rows (and rows beside them), and the cap case saturates."""
    for B, T, Hq, Hkv, dh, S, pattern, scale, why in CASES:
        q, k, v, q_pos, valid, _ = make_inputs(B, T, Hq, Hkv, dh, S, pattern, seed=B * 100 + T + S)
        masked = fully_masked(q_pos, valid)
        if pattern in ("left-pad", "decode"):
            assert masked.any() and not masked.all(), why
    q, k, v, *_ = make_inputs(*CASES[-1][:7], seed=0)
    raw = torch.einsum("bthd,bshd->bhts", q, k.repeat_interleave(3, dim=2)) * CASES[-1][7]
    assert raw.abs().max() > 1.5 * CAP and (raw.abs() > CAP).float().mean() > 0.02


def test_cap_changes_the_result():
    q, k, v, q_pos, valid, _ = make_inputs(2, 17, 6, 2, 16, 17, "right-pad", seed=5)
    out = flash_attention_triton(q, k, v, q_pos, valid, scale=3.0, cap=CAP)
    assert_close_fp32(out, oracle(q, k, v, q_pos, valid, 3.0), v)
    uncapped = oracle(q, k, v, q_pos, valid, 3.0, cap=1e9)
    assert (out - uncapped).abs().max() > 1e-2


@pytest.mark.parametrize("cfg", [None, SMALL], ids=["default-tiles", "small-tiles"])
def test_decode_reads_nothing_past_each_position(tiles, cfg):
    """Decode over a cache view (NaN past S, never read): keys between a row's position and S change
    nothing, bit for bit, for rows with a visible key (weight exactly 0; past the key block that holds
    the position they are not even read); rows with no visible key average them."""
    tiles(cfg)
    B, S, max_len = 4, 45, 64
    q, k, v, q_pos, valid, (ck, cv) = make_inputs(B, 1, 6, 2, 16, S, "decode", max_len=max_len, seed=9)
    assert k.stride(0) == max_len * 2 * 16 and not k.is_contiguous()
    out1 = flash_attention_triton(q, k, v, q_pos, valid, scale=0.25, cap=CAP)
    g = torch.Generator().manual_seed(1)
    for b in range(B):
        p = int(q_pos[b, 0])
        ck[b, p + 1 : S] = torch.randn(S - p - 1, 2, 16, generator=g) * 50
        cv[b, p + 1 : S] = torch.randn(S - p - 1, 2, 16, generator=g) * 50
    out2 = flash_attention_triton(q, k, v, q_pos, valid, scale=0.25, cap=CAP)
    masked = fully_masked(q_pos, valid)[:, 0]
    assert masked.tolist() == [False, False, True, True]
    assert torch.equal(out1[~masked], out2[~masked])
    assert_close_fp32(out2, oracle(q, k, v, q_pos, valid, 0.25), v)


def test_fully_masked_program_takes_the_tail_loop(tiles):
    """Every row of every program masked (all positions -1): each output is the mean of V over S,
    which is read only by the second loop (the first visits no key)."""
    tiles(SMALL)
    q, k, v, _, valid, _ = make_inputs(2, 4, 6, 2, 16, 50, "interior", seed=3)
    q_pos = torch.full((2, 4), -1, dtype=torch.long)
    out = flash_attention_triton(q, k, v, q_pos, valid, scale=0.25, cap=CAP)
    mean = v.float().mean(dim=1).repeat_interleave(3, dim=1)[:, None].expand_as(out)
    assert_close_fp32(out, mean, v)
    assert_close_fp32(out, oracle(q, k, v, q_pos, valid, 0.25), v)


def test_bf16_q_with_fp32_precision():
    """q may be bf16: converted to fp32 in the kernel exactly."""
    q, k, v, q_pos, valid, _ = make_inputs(2, 7, 6, 2, 16, 7, "left-pad", seed=4)
    q16 = q.bfloat16()
    out = flash_attention_triton(q16, k, v, q_pos, valid, scale=0.25, cap=CAP)
    assert_close_fp32(out, oracle(q16.float(), k, v, q_pos, valid, 0.25), v)


@pytest.mark.parametrize("cfg", [None, SMALL], ids=["default-tiles", "small-tiles"])
def test_deterministic(tiles, cfg):
    tiles(cfg)
    args = make_inputs(3, 23, 6, 2, 16, 23, "left-pad", seed=2)[:5]
    a = flash_attention_triton(*args, scale=0.25, cap=CAP)
    b = flash_attention_triton(*args, scale=0.25, cap=CAP)
    assert torch.equal(a, b)


def test_tile_configs():
    """Decode rows fit one small tile; every tile holds at least one token's G heads."""
    assert fa.attention_config(1, 6, 128, "bf16", 2).block_m == 16
    assert fa.attention_config(8, 6, 128, "bf16", 2).block_m == 64
    assert fa.attention_config(512, 6, 128, "bf16", 2).block_m == 128
    for T in (1, 4, 8, 512):
        for prec in ("fp32", "bf16"):
            for kv_bytes in (2, 4):
                for G in (1, 6, 48):
                    cfg = fa.attention_config(T, G, 128, prec, kv_bytes)
                    assert cfg.block_m >= max(16, G) and cfg.block_m & (cfg.block_m - 1) == 0
                    assert cfg.block_n >= 16


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(q=torch.zeros(1, 2, 6, 264), k=torch.zeros(1, 9, 2, 264), v=torch.zeros(1, 9, 2, 264)), r"\[1, 256\]"),
        (dict(q=torch.zeros(1, 2, 5, 16)), "multiple"),
        (dict(q=torch.zeros(1, 2, 6, 16, dtype=torch.float16)), "q must be fp32 or bf16"),
        (dict(k=torch.zeros(1, 16, 2, 9).permute(0, 3, 2, 1)), "k must be contiguous in its last dim"),
        (dict(v=torch.zeros(1, 8, 2, 16)), "v must have"),
        (dict(q_pos=torch.zeros(1, 3, dtype=torch.long)), "q_pos must be"),
        (dict(q_pos=torch.zeros(1, 2)), "q_pos must be int64"),
        (dict(key_valid=torch.ones(1, 8, dtype=torch.bool)), "key_valid must be"),
        (dict(key_valid=torch.ones(1, 9, dtype=torch.int8)), "key_valid must be bool"),
        (dict(precision="tf32"), "precision"),
        (dict(cap=0.0), "cap"),
    ],
)
def test_argument_errors(change, match):
    args = dict(q=torch.zeros(1, 2, 6, 16), k=torch.zeros(1, 9, 2, 16), v=torch.zeros(1, 9, 2, 16),
                q_pos=torch.zeros(1, 2, dtype=torch.long), key_valid=torch.ones(1, 9, dtype=torch.bool),
                scale=0.25, cap=CAP, precision="fp32")
    args.update(change)
    with pytest.raises(ValueError, match=match):
        flash_attention_triton(**args)


class _Recorder:
    def __init__(self, log, name=None):
        self.log, self.name = log, name

    def __getitem__(self, grid):
        if self.name:
            return lambda *args, **kwargs: self.log.append((self.name, grid, args, kwargs))
        return lambda *args, **kwargs: self.log.append((grid, args, kwargs))


@pytest.mark.parametrize("T, precision, grid", [(1, "bf16", (1, 8, 2)), (512, "bf16", (25, 8, 2)),
                                                 (512, "fp32", (103, 8, 2))])
def test_launch_is_shape_only(monkeypatch, T, precision, grid):
    """One launch at Grok-1 shapes on the meta device (nothing can be read from a tensor there: the
    CUDA-graph contract); the grid is (token blocks, kv heads, batch)."""
    log = []
    monkeypatch.setattr(fa, "_flash_attn_kernel", _Recorder(log))
    m = dict(device="meta")
    cache = torch.empty(2, 8192, 8, 128, dtype=torch.bfloat16, **m)
    out = flash_attention_triton(torch.empty(2, T, 48, 128, **m), cache[:, :2048], cache[:, :2048],
                                 torch.empty(2, T, dtype=torch.long, **m), torch.empty(2, 2048, dtype=torch.bool, **m),
                                 scale=128 ** -0.5, cap=CAP, precision=precision)
    assert out.shape == (2, T, 48, 128) and out.dtype == torch.float32
    (got_grid, args, kwargs), = log
    assert got_grid == grid
    assert kwargs["G"] == 6 and kwargs["DH"] == 128
    assert args[7] == 2048 and args[13] == 8192 * 8 * 128  # S; k's batch stride is the cache's


# The sm_90 build (no register spills, shared memory that fits, tensor cores for bf16 and none for exact
# fp32, no atomics) is checked by tests/test_kernels_aot.py, which compiles every launch of
# `python -m grok_torch.kernels.aot` (attention at Grok-1 shapes: decode and prefill over a bf16 cache
# by default; fp32/fp16 caches, speculative decode, prefill without a cache with --full, under CI).
# Here: those variants include each launch this file used to compile itself, (T, precision, K/V dtype)
# over a 2048-key view of an 8192-key cache (recorded on the meta device, specialised, not compiled).
_AOT_CASES = [(T, p, kv) for T in (1, 4, 8, 512) for p in ("bf16", "fp32") for kv in ("bfloat16", "float32", "float16")]
_COVERAGE_SCRIPT = r"""
import json, sys
import torch
from triton.backends.compiler import GPUTarget
from grok_torch.kernels import aot, flash_attention as fa

target = GPUTarget("cuda", 90, 32)
covered = {v.key for v in aot.variants(full=True, kinds=("attn",))}
missing = []
for T, prec, kv in json.loads(sys.argv[1]):
    log, m = [], dict(device="meta")
    with aot._recording(log):
        cache = torch.empty(1, 8192, 8, 128, dtype=getattr(torch, kv), **m)
        fa.flash_attention_triton(torch.empty(1, T, 48, 128, **m), cache[:, :2048], cache[:, :2048],
                                  torch.empty(1, T, dtype=torch.long, **m), torch.empty(1, 2048, dtype=torch.bool, **m),
                                  scale=0.088, cap=30.0, precision=prec)
    (fn, grid, args, kwargs), = log
    if aot.Variant("", fn.__name__, *aot._specialize(fn, args, kwargs, target)).key not in covered:
        missing.append([T, prec, kv])
print(json.dumps(missing))
"""


def test_sm90_build_is_checked_by_aot():
    env = dict(os.environ, TRITON_INTERPRET="0")
    proc = subprocess.run([sys.executable, "-c", _COVERAGE_SCRIPT, json.dumps(_AOT_CASES)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.splitlines()[-1]) == [], "launches that grok_torch.kernels.aot --full does not compile"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="bf16 and Grok-1 shapes need a GPU (the interpreter is slow and wrong on bf16)")
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("T", [1, 512])
def test_grok_shapes_on_gpu(T, precision):
    B, S = 2, 2048
    kv_dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    q, k, v, q_pos, valid, _ = make_inputs(B, T, 48, 8, 128, S, "decode" if T == 1 else "interior", kv_dtype,
                                          max_len=4096, seed=T, device="cuda")
    scale = 128 ** -0.5
    out = flash_attention_triton(q, k, v, q_pos, valid, scale=scale, cap=CAP, precision=precision)
    torch.cuda.synchronize()
    if precision == "fp32":
        assert_close_fp32(out, oracle(q, k, v, q_pos, valid, scale), v)
    else:  # the oracle on the bf16-rounded operands; what remains is p rounded to bf16 for PV
        ref = oracle(q.bfloat16(), k, v, q_pos, valid, scale)
        vscale = float(v.float().abs().max())
        torch.testing.assert_close(out, ref, atol=1e-2 * vscale, rtol=1e-2)
    assert torch.equal(out, flash_attention_triton(q, k, v, q_pos, valid, scale=scale, cap=CAP, precision=precision))


# ---- backward ------------------------------------------------------------------------------------

from grok_torch.kernels.attention import attention, attention_dense, attention_reference  # noqa: E402


def _grads(fn, q, k, v, q_pos, valid, g, dtype=torch.float32):
    """(out, dq, dk, dv) of sum(fn(q, k, v) * g), in fp64 for comparison."""
    qq, kk, vv = (x.detach().to(dtype).requires_grad_() for x in (q, k, v))
    out = fn(qq, kk, vv, q_pos, valid)
    (out * g.to(out.dtype)).sum().backward()
    return [x.detach().double() for x in (out, qq.grad, kk.grad, vv.grad)]


def assert_grads_close(got, want, what):
    """fp32 gradients: atol 1e-5 of the largest |gradient| (see the module docstring), rtol 1e-4."""
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, want):
        torch.testing.assert_close(a, b, atol=1e-5 * float(b.abs().max()), rtol=1e-4, msg=lambda m: f"{what} {name}: {m}")


def test_oracle_gradcheck_fp64():
    """The dense oracle's autograd is the true derivative (fp64 finite differences), fully masked rows
    (a left-padding query, a sequence with no valid key) and the cap included: the ground truth."""
    g = torch.Generator().manual_seed(0)
    B, T, Hq, Hkv, dh, S = 2, 3, 4, 2, 5, 5
    q, k, v = (torch.randn(*sh, generator=g, dtype=torch.float64) * 2 for sh in ((B, T, Hq, dh), (B, S, Hkv, dh),
                                                                                  (B, S, Hkv, dh)))
    q_pos = torch.tensor([[-1, 1, 4], [2, 3, 4]])
    valid = torch.tensor([[True, False, True, True, True], [False] * 5])
    assert fully_masked(q_pos, valid).tolist() == [[True, False, False], [True, True, True]]
    fn = lambda q, k, v: oracle(q, k, v, q_pos, valid, 3.0, dtype=torch.float64)  # noqa: E731  (cap active)
    assert torch.autograd.gradcheck(fn, tuple(x.requires_grad_() for x in (q, k, v)), eps=1e-6, atol=1e-6)


# (B, T, Hq, Hkv, dh, S, pattern, scale, why)
BWD_CASES = [
    (2, 11, 6, 2, 16, 11, "left-pad", 0.25, "G=3; left padding: fully masked rows"),
    (2, 5, 4, 2, 16, 19, "interior", 0.25, "G=2; T < S: a chunk at causal offset 14, invalid keys"),
    (3, 4, 2, 2, 24, 13, "decode", 0.25, "G=1, dh=24; T < S per sequence; a sequence with no valid key"),
    (2, 9, 6, 2, 16, 9, "left-pad", 4.0, "the cap active"),
    (2, 7, 3, 1, 8, 7, "right-pad", 0.3, "G=3 on one kv head, dh=8; a sequence of length 1"),
]
BWD_IDS = [f"B{c[0]}-T{c[1]}-G{c[2] // c[3]}-dh{c[4]}-S{c[5]}-{c[6]}-x{c[7]}" for c in BWD_CASES]


@pytest.mark.parametrize("cfg", [None, SMALL], ids=["default-tiles", "small-tiles"])
@pytest.mark.parametrize("B, T, Hq, Hkv, dh, S, pattern, scale, why", BWD_CASES, ids=BWD_IDS)
def test_backward_matches_reference(tiles, B, T, Hq, Hkv, dh, S, pattern, scale, why, cfg):
    tiles(cfg)
    q, k, v, q_pos, valid, _ = make_inputs(B, T, Hq, Hkv, dh, S, pattern, seed=T + S)
    k, v = k.contiguous(), v.contiguous()
    g = torch.randn(B, T, Hq, dh, generator=torch.Generator().manual_seed(1))
    kw = dict(scale=scale, cap=CAP)
    got = _grads(lambda *a: attention(*a, **kw, impl="triton"), q, k, v, q_pos, valid, g)
    assert_grads_close(got, _grads(lambda *a: attention_dense(*a, **kw), q, k, v, q_pos, valid, g), "dense")
    blockwise = lambda *a: attention_reference(*a, **kw, block_q=3, block_k=4)  # noqa: E731  (online softmax)
    assert_grads_close(got, _grads(blockwise, q, k, v, q_pos, valid, g), "reference")
    assert_grads_close(got, _grads(lambda *a: oracle(*a, scale, dtype=torch.float64), q, k, v, q_pos, valid, g,
                                   torch.float64), "fp64 oracle")
    # training runs the inference kernel (plus the statistics): the same output, bit for bit
    assert torch.equal(got[0].float(), flash_attention_triton(q, k, v, q_pos, valid, **kw))
    masked = fully_masked(q_pos, valid)
    if pattern in ("left-pad", "decode"):
        assert masked.any(), why
    assert torch.equal(got[1][masked], torch.zeros_like(got[1][masked]))  # constant scores: no dq


def test_backward_fully_masked_rows(tiles):
    """Every row without a visible key (all positions -1, or no valid key): p = 1/S on every key, so
    dv = (sum of dO over the kv head's rows) / S, and the scores are the constant -1e30: dq = dk = 0."""
    tiles(SMALL)
    B, T, Hq, Hkv, dh, S = 2, 3, 6, 2, 16, 37
    q, k, v, _, valid, _ = make_inputs(B, T, Hq, Hkv, dh, S, "interior", seed=4)
    k, v = k.contiguous(), v.contiguous()
    q_pos = torch.tensor([[-1, -1, -1], [5, 6, 36]])
    valid[1] = False
    assert fully_masked(q_pos, valid).all()
    g = torch.randn(B, T, Hq, dh, generator=torch.Generator().manual_seed(2))
    out, dq, dk, dv = _grads(lambda *a: attention(*a, scale=0.25, cap=CAP, impl="triton"), q, k, v, q_pos, valid, g)
    assert not dq.any() and not dk.any()
    want = g.double().view(B, T, Hkv, Hq // Hkv, dh).sum((1, 3))[:, None].expand(B, S, Hkv, dh) / S
    torch.testing.assert_close(dv, want, atol=1e-6, rtol=1e-6)


def test_backward_deterministic(tiles):
    tiles(SMALL)
    q, k, v, q_pos, valid, _ = make_inputs(2, 11, 6, 2, 16, 11, "left-pad", seed=3)
    g = torch.randn(2, 11, 6, 16, generator=torch.Generator().manual_seed(3))
    runs = [_grads(lambda *a: attention(*a, scale=0.25, cap=CAP, impl="triton"), q, k.contiguous(), v.contiguous(),
                   q_pos, valid, g) for _ in range(2)]
    assert all(torch.equal(a, b) for a, b in zip(*runs))


# The positional arguments and keywords of the inference launch before the backward existed.
_INFERENCE_KWARGS = {"G", "HEAD_DIM", "DH", "OPERAND", "DOT_PRECISION", "BLOCK_M", "BLOCK_N", "num_warps", "num_stages"}


def _record(monkeypatch):
    log = []
    for name in ("_flash_attn_kernel", "_flash_attn_bwd_dkdv_kernel", "_flash_attn_bwd_dq_kernel"):
        monkeypatch.setattr(fa, name, _Recorder(log, name))
    return log


@pytest.mark.parametrize("grad", ["no-grad", "inputs-without-grad"])
def test_inference_launch_is_unchanged(monkeypatch, grad):
    """Without autograd recording, attention(impl="triton") launches the forward kernel exactly as
    before the backward existed: 26 positional arguments, the same keywords, no statistics buffer and
    no STATS switch (so the compiled kernel is the inference one: sync-free, graph-capturable)."""
    log = _record(monkeypatch)
    m = dict(device="meta")
    q = torch.empty(1, 512, 48, 128, **m, requires_grad=grad == "no-grad")
    kv = torch.empty(1, 512, 8, 128, **m)
    with torch.set_grad_enabled(grad != "no-grad"):
        attention(q, kv, kv, torch.empty(1, 512, dtype=torch.long, **m), torch.empty(1, 512, dtype=torch.bool, **m),
                  scale=128 ** -0.5, cap=CAP, impl="triton")
    (name, grid, args, kwargs), = log
    assert name == "_flash_attn_kernel" and grid == (103, 8, 1)
    assert len(args) == 26 and set(kwargs) == _INFERENCE_KWARGS


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_training_launches_are_shape_only(monkeypatch, precision):
    """While autograd records: the forward with lse (STATS), then dK/dV (grid: key blocks, kv heads,
    batch) and dQ (token blocks, kv heads, batch), all on the meta device (no host read)."""
    log = _record(monkeypatch)
    m = dict(device="meta")
    q, k, v = (torch.empty(2, 512, h, 128, **m, requires_grad=True) for h in (48, 8, 8))
    out = attention(q, k, v, torch.empty(2, 512, dtype=torch.long, **m), torch.empty(2, 512, dtype=torch.bool, **m),
                    scale=128 ** -0.5, cap=CAP, precision=precision, impl="triton")
    out.backward(torch.empty_like(out))
    assert [name for name, *_ in log] == ["_flash_attn_kernel", "_flash_attn_bwd_dkdv_kernel", "_flash_attn_bwd_dq_kernel"]
    (_, _, fargs, fkw), (_, kv_grid, _, kv_kw), (_, q_grid, _, q_kw) = log
    assert len(fargs) == 26 and fkw["STATS"] is True and tuple(fkw["lse_ptr"].shape) == (2, 512, 48)
    kv_cfg, q_cfg = fa.attention_bwd_config(6, 128, precision)
    assert kv_grid == (512 // kv_cfg.block_n, 8, 2) and q_grid == (-(-512 // (q_cfg.block_m // 6)), 8, 2)
    assert q.grad.shape == q.shape and k.grad.shape == k.shape and v.grad.shape == v.shape


@pytest.mark.skipif(not torch.cuda.is_available(), reason="bf16 and Grok-1 shapes need a GPU (the interpreter is slow and wrong on bf16)")
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_backward_grok_shapes_on_gpu(precision):
    """Grok-1 heads (48 / 8 of 128), T = S = 512 with left padding, fp32 K/V as the model trains:
    the Triton gradients against the dense fp32 autograd (bf16: the dots on bf16 operands)."""
    B, T, S = 2, 512, 512
    q, k, v, q_pos, valid, _ = make_inputs(B, T, 48, 8, 128, S, "left-pad", max_len=S, seed=7, device="cuda")
    g = torch.randn(B, T, 48, 128, generator=torch.Generator().manual_seed(1)).cuda()
    kw = dict(scale=128 ** -0.5, cap=CAP)
    got = _grads(lambda *a: attention(*a, **kw, precision=precision, impl="triton"), q, k, v, q_pos, valid, g)
    torch.cuda.synchronize()
    if precision == "fp32":
        assert_grads_close(got, _grads(lambda *a: attention_dense(*a, **kw), q, k, v, q_pos, valid, g), "dense")
    else:  # the reference on the bf16-rounded operands; p and dS are rounded to bf16 too, in the dots
        want = _grads(lambda *a: attention_reference(*a, **kw, precision="bf16"), q, k, v, q_pos, valid, g)
        for name, a, b in zip(("out", "dq", "dk", "dv"), got, want):
            torch.testing.assert_close(a, b, atol=2e-2 * float(b.abs().max()), rtol=2e-2, msg=lambda m: f"{name}: {m}")
    again = _grads(lambda *a: attention(*a, **kw, precision=precision, impl="triton"), q, k, v, q_pos, valid, g)
    assert all(torch.equal(a, b) for a, b in zip(got, again))
