"""Inference at scale on the tiny_ref model: logits_to_keep, chunked prefill, the static decode step.

* ``model(tokens, logits_to_keep=...)`` gives the full computation's logits at the kept positions
  (int, [K] and per-row [B, K] forms);
* chunked prefill (several chunk sizes, right-padded rows of different lengths) gives each row's
  last-token logits and the same greedy tokens as one whole-prompt prefill;
* the static decode step (whole preallocated cache, no host values) equals the default cached path;
* the decode graph contract: Grok-1's decode step at real shapes runs on the meta device through the
  Triton wrappers (kernels recorded, not run) with nothing read back to the host and no host tensor
  entering the device computation; DecodeStep says why it will not capture where it cannot;
* Weight.forward keeps no dequantised copy for backward (saved tensors are the int8 weights);
* GPU only (scripts/gpu_check.sh): the captured decode step replays to the eager step's tokens.
"""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from grok_torch import Grok, generate
from grok_torch.config import GrokConfig
from grok_torch.decode import DecodeStep, graph_blocker, prefill

BF16, FP32 = torch.bfloat16, torch.float32
PROMPTS = [[25, 376, 378, 9, 11, 400, 401], [25, 376], [300, 301, 302, 303, 304]]


@pytest.fixture(scope="module")
def model(tiny_int8_model):
    return tiny_int8_model


def padded(prompts):
    L = max(map(len, prompts))
    tok = torch.zeros(len(prompts), L, dtype=torch.long)
    for b, p in enumerate(prompts):
        tok[b, :len(p)] = torch.tensor(p)
    return tok, torch.tensor([len(p) for p in prompts])


@torch.no_grad()
def test_logits_to_keep_equals_the_full_computation(model):
    m = model(FP32)
    tok, lengths = padded(PROMPTS)
    full = m(tok)
    torch.testing.assert_close(m(tok, logits_to_keep=1), full[:, -1:], rtol=0, atol=1e-5)
    torch.testing.assert_close(m(tok, logits_to_keep=3), full[:, -3:], rtol=0, atol=1e-5)
    idx = torch.tensor([0, 4, 6])
    torch.testing.assert_close(m(tok, logits_to_keep=idx), full[:, idx], rtol=0, atol=1e-5)
    last = (lengths - 1)[:, None]
    got = m(tok, logits_to_keep=last)
    assert got.shape == (3, 1, m.config.vocab_size)
    torch.testing.assert_close(got[:, 0], full[torch.arange(3), lengths - 1], rtol=0, atol=1e-5)
    for bad in (-1, 1.5, torch.zeros(2, 2, 2, dtype=torch.long)):
        with pytest.raises(ValueError, match="logits_to_keep"):
            m(tok, logits_to_keep=bad)


@torch.no_grad()
@pytest.mark.parametrize("dtype", [FP32, BF16], ids=["fp32", "bf16"])
def test_chunked_prefill_matches_one_prefill(model, dtype):
    m = model(dtype)
    tok, lengths = padded(PROMPTS)
    whole = prefill(m, tok, lengths, m.new_cache(3, 16), chunk=None)
    for chunk in (1, 3, 5):
        cache = m.new_cache(3, 16)
        got = prefill(m, tok, lengths, cache, chunk=chunk)
        assert torch.equal(cache.pos, lengths)
        # chunks only change the fp32 summation order of attention; bf16 logits may move by an ulp
        tol = 1e-4 if dtype == FP32 else 0.05
        torch.testing.assert_close(got.float(), whole.float(), rtol=0, atol=tol)
    if dtype == FP32:  # bf16 greedy runs may part after an ulp flip of a near-tie (measured on 2 threads)
        one = generate(m, PROMPTS, 6, temperature=0, prefill_chunk=None)
        two = generate(m, PROMPTS, 6, temperature=0, prefill_chunk=2)
        assert [g.tokens for g in one] == [g.tokens for g in two]


@torch.no_grad()
def test_static_decode_step_equals_the_default_path(model):
    m = model(FP32)
    tok, lengths = padded(PROMPTS)
    caches = [m.new_cache(3, 20), m.new_cache(3, 20)]
    for c in caches:
        prefill(m, tok, lengths, c)
    step = DecodeStep(m, caches[1], cuda_graph=False)
    assert step.graph is None
    ids = torch.tensor([5, 6, 7])
    for _ in range(3):
        want = m(ids[:, None], caches[0])[:, -1]
        got = step(ids)
        # the static step's softmax runs over all 20 slots (exact zeros past the positions): only the
        # fp32 summation order differs
        torch.testing.assert_close(got, want, rtol=0, atol=1e-4)
        ids = got.argmax(-1)
    assert torch.equal(caches[0].pos, caches[1].pos)


def test_decode_step_explains_why_it_does_not_capture(model):
    m = model(FP32)
    assert "not on one CUDA device" in graph_blocker(m)
    with pytest.raises(ValueError, match="cannot be captured: the weights are on"):
        DecodeStep(m, m.new_cache(1, 4), cuda_graph=True)


# ---- the decode graph contract at Grok-1 shapes ---------------------------------------------------

class NoHostTraffic(TorchDispatchMode):
    """Fails any op that mixes a host tensor into the device computation (a host-to-device copy a
    CUDA graph cannot hold); host-only ops (Python constants rounded on the CPU) pass. Reads of
    device values need no check here: on meta tensors they raise by themselves."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        tensors = [t for t in torch.utils._pytree.tree_leaves((args, kwargs, out)) if isinstance(t, torch.Tensor)]
        devices = {t.device.type for t in tensors if not (t.device.type == "cpu" and t.dim() == 0)}
        if "meta" in devices and "cpu" in devices:
            raise AssertionError(f"{func} mixes host and device tensors")
        return out


@torch.no_grad()
def test_grok1_decode_step_reads_nothing_back_on_the_meta_device():
    """The released model's decode step (64 layers, int8, batch 2 over an 8192-slot bf16 cache) through
    the Triton wrappers on meta tensors: any .item()/.tolist()/bool(tensor)/nonzero would raise."""
    from grok_torch.kernels.aot import _recording

    cfg = GrokConfig.from_name("grok-1")
    with torch.device("meta"):
        m = Grok(cfg, dtype=BF16, impl="triton")
    cache = m.new_cache(2, cfg.max_seq_len)
    step = DecodeStep(m, cache, cuda_graph=False)
    log = []
    with _recording(log), NoHostTraffic():
        logits = step(torch.zeros(2, dtype=torch.long, device="meta"))
    assert logits.shape == (2, cfg.vocab_size) and logits.device.type == "meta"
    names = [getattr(fn, "__name__", str(fn)) for fn, *_ in log]
    per_layer = {n: names.count(n) // cfg.num_layers for n in set(names)}
    assert per_layer["_flash_attn_kernel"] == 1, per_layer
    assert per_layer["_int8_linear_kernel"] >= 4, per_layer  # wq, wk, wv, wo
    assert per_layer["_moe_gemm_kernel"] == 2, per_layer     # up and down


def test_weight_backward_keeps_no_dequantised_copy(model):
    """Training through a frozen int8 matrix: the saved tensors are x and the stored int8 weight +
    scales, never an fp32 copy of the matrix; the gradient is x's true gradient."""
    attn = model(FP32).layers[0].attn
    x = torch.randn(2, 5, attn.cfg.d_model, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = attn.wq(x)
    K, N = attn.wq.weight.shape
    assert not any(t.is_floating_point() and t.shape[-2:] == (K, N) for t in saved), [(t.dtype, t.shape) for t in saved]
    y.square().sum().backward()
    w = attn.wq.dequant(FP32)
    torch.testing.assert_close(x.grad, (2 * (x.detach() @ w)) @ w.T, rtol=1e-5, atol=1e-5)


# ---- on a GPU -----------------------------------------------------------------------------------

@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: scripts/gpu_check.sh runs it")
@torch.no_grad()
def test_gpu_graph_decode_replays_the_eager_tokens(converted):
    m = Grok.from_pretrained(converted("int8"), dtype=BF16, device="cuda")
    assert graph_blocker(m) is None
    runs = [generate(m, PROMPTS, 12, temperature=0, cuda_graph=g) for g in (False, True)]
    assert [r.tokens for r in runs[0]] == [r.tokens for r in runs[1]]
    torch.cuda.set_sync_debug_mode("error")  # a replayed step must not synchronise either
    try:
        tok, lengths = padded(PROMPTS)
        cache = m.new_cache(3, 24)
        prefill(m, tok.cuda(), lengths.cuda(), cache)
        step = DecodeStep(m, cache, cuda_graph=True)
        assert step.graph is not None
        ids = torch.ones(3, dtype=torch.long, device="cuda")
        for _ in range(4):
            ids = step(ids).argmax(-1)
    finally:
        torch.cuda.set_sync_debug_mode("default")
