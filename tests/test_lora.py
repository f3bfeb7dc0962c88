"""LoRA adapters (grok_torch.lora) on the tiny_ref model, int8 base, CPU reference kernels.

* untrained adapters (B = 0) change no logit, bit for bit, on every target;
* expert LoRA equals an independent oracle (per expert ``x @ (W + s A_e B_e)`` with the dequantised
  weight, GELU on the adapted gate), forward and gradients, and gradcheck in fp64 on small shapes;
* training steps change only adapter tensors: the frozen int8 base stays bit-identical;
* save -> load onto a fresh base reproduces the logits exactly; the files are PEFT's layout
  (``peft.PeftConfig.from_pretrained`` reads them when peft is installed); mismatches are refused.
"""
import json

import pytest
import torch

from grok_torch import Grok
from grok_torch.kernels import ExpertLoRA
from grok_torch.kernels.reference import dequantize, gelu_tanh, moe_experts_reference
from grok_torch.lora import (LoRAConfig, add_lora, load_adapter, lora_modules, lora_state_dict, replicated_copies,
                             save_adapter, sync_replicated_grads)

FP32, BF16 = torch.float32, torch.bfloat16
TOK = torch.tensor([[25, 376, 378, 9, 11, 400, 401, 0], [300, 301, 302, 303, 304, 305, 306, 307]])
ALL = ("attn", "experts", "router")


@pytest.fixture()
def fresh(converted):
    """fresh(dtype) -> a newly loaded int8 tiny model (adapters attach to it)."""
    return lambda dtype=FP32: Grok.from_pretrained(converted("int8"), dtype=dtype, impl="torch")


def randomize_b(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for lora in lora_modules(model).values():
            lora.B.copy_(torch.randn(lora.B.shape, generator=g) * 0.05)


@pytest.mark.parametrize("dtype", [FP32, BF16], ids=["fp32", "bf16"])
@torch.no_grad()
def test_untrained_adapters_change_no_logit(fresh, dtype):
    m = fresh(dtype)
    base = m(TOK)
    params = add_lora(m, LoRAConfig(rank=4, alpha=8, targets=ALL))
    assert params and all(p.requires_grad for p in params)
    assert torch.equal(m(TOK), base)
    randomize_b(m)
    assert not torch.equal(m(TOK), base)


def test_expert_lora_matches_an_oracle():
    """moe_experts_reference with ExpertLoRA == per-expert x @ (W + s A B) with W dequantised, fwd + grads."""
    torch.manual_seed(0)
    T, D, F, E, K, r = 6, 16, 32, 4, 2, 3
    x = torch.randn(T, D, dtype=torch.float64, requires_grad=True)
    w = [torch.randint(-127, 128, s, dtype=torch.int8) for s in ((E, D, F), (E, D, F), (E, F, D))]
    sc = [torch.rand(E, g, n, dtype=torch.float64) * 0.01 for g, n in ((1, F), (1, F), (2, D))]
    ab = [(torch.randn(E, i, r, dtype=torch.float64, requires_grad=True),
           torch.randn(E, r, o, dtype=torch.float64, requires_grad=True)) for i, o in ((D, F), (D, F), (F, D))]
    gates = torch.rand(T, K, dtype=torch.float64)
    ids = torch.stack([torch.randperm(E)[:K] for _ in range(T)])
    s = 0.5
    lora = ExpertLoRA(ab[0], ab[1], ab[2], scale=s)

    def ours(x, *flat):
        pairs = [(flat[0], flat[1]), (flat[2], flat[3]), (flat[4], flat[5])]
        return moe_experts_reference(x, gates, ids, *w, scales=tuple(sc), compute_dtype=torch.float64,
                                     lora=ExpertLoRA(*pairs, scale=s))

    def oracle(x, *flat):
        out = torch.zeros(T, D, dtype=torch.float64)
        for t in range(T):
            for k in range(K):
                e = int(ids[t, k])
                W = [dequantize(w[j][e], sc[j][e], torch.float64) + s * flat[2 * j][e] @ flat[2 * j + 1][e]
                     for j in range(3)]
                h = gelu_tanh(x[t] @ W[0], torch.float64) * (x[t] @ W[1])
                out[t] = out[t] + gates[t, k] * (h @ W[2])
        return out

    flat = [p for pair in ab for p in pair]
    torch.testing.assert_close(ours(x, *flat), oracle(x, *flat), rtol=1e-10, atol=1e-10)
    g1 = torch.autograd.grad(ours(x, *flat).square().sum(), [x, *flat])
    g2 = torch.autograd.grad(oracle(x, *flat).square().sum(), [x, *flat])
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)
    assert torch.autograd.gradcheck(ours, (x, *flat))
    assert lora.scale == s


def test_training_changes_only_adapters(fresh):
    m = fresh(FP32)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    params = add_lora(m, LoRAConfig(rank=2, alpha=4, targets=ALL, dropout=0.1))
    opt = torch.optim.AdamW(params, lr=1e-2)
    m.train()
    for step in range(2):
        logits = m(TOK[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), TOK[:, 1:].flatten())
        loss.backward()
        # step 0: B = 0, so only the B's have a gradient (A's is x^T (dy B^T) = 0), as in any LoRA
        moving = params if step else params[1::2]
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in moving), "every adapter gets a gradient"
        opt.step()
        opt.zero_grad()
    after = m.state_dict()
    for k, v in before.items():
        assert torch.equal(after[k], v), f"base tensor {k} changed"
    assert all(not p.requires_grad for n, p in m.named_parameters() if ".lora." not in n)


@torch.no_grad()
def test_save_and_load_reproduce_the_logits(fresh, tmp_path):
    m = fresh(FP32)
    add_lora(m, LoRAConfig(rank=3, alpha=6, targets=ALL))
    randomize_b(m, seed=1)
    want = m(TOK)
    out = save_adapter(m, tmp_path / "adapter", base_model="tiny")
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 3 and cfg["lora_alpha"] == 6
    assert not list(out.glob(".tmp-*")), "no temporary left behind"
    m2 = fresh(FP32)
    assert load_adapter(m2, out).targets == ALL
    assert torch.equal(m2(TOK), want)
    with pytest.raises(ValueError, match="already has LoRA adapters"):
        load_adapter(m2, out)


def test_saved_expert_layout_is_per_expert_blocks(fresh, tmp_path):
    from safetensors.torch import load_file

    m = fresh(FP32)
    add_lora(m, LoRAConfig(rank=2, targets=("experts",)))
    randomize_b(m)
    save_adapter(m, tmp_path)
    sd = load_file(str(tmp_path / "adapter_model.safetensors"))
    lora = m.layers[1].moe.w2.lora
    A, B = sd["base_model.model.layers.1.moe.w2.lora_A.weight"], sd["base_model.model.layers.1.moe.w2.lora_B.weight"]
    E, fin, r = lora.A.shape
    assert A.shape == (E * r, fin) and B.shape == (lora.B.shape[2], E * r)
    e = 3  # expert e's rows of A and columns of B
    torch.testing.assert_close(A[e * r:(e + 1) * r].T, lora.A[e].detach(), rtol=0, atol=0)
    torch.testing.assert_close(B[:, e * r:(e + 1) * r].T, lora.B[e].detach(), rtol=0, atol=0)


def test_adapter_mismatches_are_refused(fresh, tmp_path, converted):
    m = fresh(FP32)
    add_lora(m, LoRAConfig(rank=2, targets=("attn",)))
    save_adapter(m, tmp_path)
    meta = json.loads((tmp_path / "grok_adapter.json").read_text())
    meta["base_config"]["num_layers"] = 3
    (tmp_path / "grok_adapter.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="trained for another base model: num_layers 3"):
        load_adapter(fresh(FP32), tmp_path)
    with pytest.raises(FileNotFoundError, match="adapter_config.json is missing"):
        load_adapter(fresh(FP32), converted("int8"))
    for bad in (dict(rank=0), dict(alpha=0), dict(dropout=1.0), dict(targets=("mlp",)), dict(targets=())):
        with pytest.raises(ValueError, match="LoRA"):
            LoRAConfig(**bad)


def test_peft_reads_the_adapter_config(fresh, tmp_path):
    peft = pytest.importorskip("peft", reason="peft is an optional extra (pip install peft)")
    m = fresh(FP32)
    add_lora(m, LoRAConfig(rank=4, alpha=8))
    save_adapter(m, tmp_path)
    cfg = peft.PeftConfig.from_pretrained(str(tmp_path))
    assert cfg.peft_type == "LORA" and cfg.r == 4 and cfg.lora_alpha == 8


@torch.no_grad()
def test_from_pretrained_and_grok_generate_apply_an_adapter(fresh, converted, tmp_path, capsys):
    from grok_torch.generate_cli import main

    m = fresh(FP32)
    add_lora(m, LoRAConfig(rank=2, targets=ALL))
    randomize_b(m, seed=2)
    save_adapter(m, tmp_path / "ad")
    loaded = Grok.from_pretrained(converted("int8"), dtype=FP32, impl="torch", adapter=tmp_path / "ad")
    assert torch.equal(loaded(TOK), m(TOK))
    assert not any(p.requires_grad for p in loaded.parameters())
    argv = ["--model", str(converted("int8")), "--prompt-ids", "25,376,378", "--max-new-tokens", "3",
            "--temperature", "0", "--dtype", "fp32"]
    assert main(argv + ["--adapter", str(tmp_path / "ad")]) == 0
    assert len(capsys.readouterr().out.strip().split(",")) == 3
    assert main(argv + ["--adapter", str(tmp_path / "missing")]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "adapter directory" in err[0] and "does not exist" in err[0]


@torch.no_grad()
def test_adapters_with_the_experts_split_over_devices(fresh, converted, tmp_path):
    """device_map="experts" (4 cpu devices standing in for GPUs): each shard holds its experts' adapters;
    saved, they are the one-device layout (concatenated along E), and the logits match either way."""
    one = fresh(FP32)
    add_lora(one, LoRAConfig(rank=2, targets=ALL))
    randomize_b(one, seed=4)
    save_adapter(one, tmp_path / "one")
    split = Grok.from_pretrained(converted("int8"), dtype=FP32, impl="torch", device_map="experts", devices=["cpu"] * 4)
    load_adapter(split, tmp_path / "one")
    assert sum(".shards." in name for name in lora_modules(split)) == 3 * 4 * len(split.layers)
    assert torch.equal(split(TOK), one(TOK))  # top-2 partial sums: bit-equal, as without adapters
    save_adapter(split, tmp_path / "split")
    assert (tmp_path / "split" / "adapter_model.safetensors").read_bytes() == \
        (tmp_path / "one" / "adapter_model.safetensors").read_bytes()


def _ffn(converted):
    return Grok.from_pretrained(converted("int8"), dtype=FP32, impl="torch", device_map="ffn", devices=["cpu"] * 2)


def _rel(a, b):
    return float(((a - b).norm() / b.norm()).detach())


def test_adapters_with_the_experts_hidden_dim_split_over_devices(fresh, converted, tmp_path):
    """device_map="ffn" (2 cpu devices): each shard holds w1/w3's B and w2's A for its F columns and a copy
    of w1/w3's A and w2's B. add_lora draws the one-device adapters; saved, they are the one-device layout
    (the same bytes), both ways; the logits match the one-device ones within fp32 reassociation (the split
    without adapters already differs by ~2e-6 relative)."""
    torch.manual_seed(7)
    one = fresh(FP32)
    add_lora(one, LoRAConfig(rank=2, targets=ALL))
    torch.manual_seed(7)
    ffn = _ffn(converted)
    add_lora(ffn, LoRAConfig(rank=2, targets=ALL))
    assert sum(".shards." in name for name in lora_modules(ffn)) == 3 * 2 * len(ffn.layers)
    assert all(torch.equal(a, b) for a, b in zip(lora_state_dict(ffn).values(), lora_state_dict(one).values()))
    randomize_b(one, seed=4)
    save_adapter(one, tmp_path / "one")
    base = _ffn(converted)
    load_adapter(base, tmp_path / "one")
    ref = one(TOK)
    assert _rel(base(TOK), ref) < 1e-5, _rel(base(TOK), ref)
    save_adapter(base, tmp_path / "ffn")
    assert (tmp_path / "ffn" / "adapter_model.safetensors").read_bytes() == \
        (tmp_path / "one" / "adapter_model.safetensors").read_bytes()
    back = fresh(FP32)
    load_adapter(back, tmp_path / "ffn")
    assert torch.equal(back(TOK), ref)
    moe = base.layers[0].moe
    E, D, F = moe.shards[0].w1.weight.shape[0], moe.shards[0].w1.weight.shape[1], 2 * moe.shards[0].w1.weight.shape[2]
    for shard in moe.shards:
        assert shard.w1.lora.A.shape == (E, D, 2) and shard.w1.lora.B.shape == (E, 2, F // 2)
        assert shard.w2.lora.A.shape == (E, F // 2, 2) and shard.w2.lora.B.shape == (E, 2, D)
    assert len(replicated_copies(base)) == 3 * len(base.layers)


def test_training_with_the_experts_hidden_dim_split_follows_one_device(fresh, converted):
    """A few AdamW steps with device_map="ffn": the replicated copies' gradients are summed
    (sync_replicated_grads), so the copies stay bit-identical and the run follows the one-device one
    within fp32 reassociation."""
    runs = []
    for model in (fresh(FP32), _ffn(converted)):
        torch.manual_seed(3)
        params = add_lora(model, LoRAConfig(rank=2, targets=ALL))
        opt = torch.optim.AdamW(params, lr=1e-3)
        curve = []
        for _ in range(4):
            logits = model(TOK)
            loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), TOK[:, 1:].flatten())
            loss.backward()
            sync_replicated_grads(model)
            for copies in replicated_copies(model):
                assert all(torch.equal(p.grad, copies[0].grad) for p in copies[1:])
            opt.step()
            opt.zero_grad(set_to_none=True)
            curve.append(float(loss.detach()))
            for copies in replicated_copies(model):
                assert all(torch.equal(p, copies[0]) for p in copies[1:])
        runs.append((curve, lora_state_dict(model)))
    (c1, s1), (c2, s2) = runs
    assert max(abs(a - b) / abs(a) for a, b in zip(c1, c2)) < 1e-5, (c1, c2)
    worst = max(_rel(s2[k], s1[k]) for k in s1 if s1[k].norm() > 0)
    print(max(abs(a - b) / abs(a) for a, b in zip(c1, c2)), worst)
    assert worst < 2e-2, worst  # Adam normalises near-zero gradients: reassociation noise moves them by ~lr


def test_expert_backward_keeps_no_dequantised_expert(fresh):
    """Through frozen int8 experts, autograd saves the int8 matrices (and activations), never an fp32 or
    bf16 copy of an expert: backward dequantises again."""
    m = fresh(FP32)
    add_lora(m, LoRAConfig(rank=2, targets=("experts",)))
    moe = m.layers[0].moe
    E, D, F = moe.w1.weight.shape
    x = torch.randn(6, D, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out, _, _ = moe(x)
    shapes = {(D, F), (F, D)}
    assert not any(t.is_floating_point() and tuple(t.shape[-2:]) in shapes for t in saved), \
        sorted({(str(t.dtype), tuple(t.shape)) for t in saved})
    out.sum().backward()
    assert x.grad is not None and moe.w1.lora.B.grad is not None
