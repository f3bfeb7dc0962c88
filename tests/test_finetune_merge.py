"""grok-finetune merge (grok_torch.finetune.merge.merge_adapter) on the tiny_ref model.

* fp32 merge: logits of the merged checkpoint == base + adapter (unmerged) within 1e-4 abs (|logits| up
  to 4.7; measured max 3.8e-5, mean 3e-6: W + s·A·B rounded once to fp32 vs x@W + s·(x@A)@B); untouched
  tensors bit-equal; the same bytes from an int8 base (its exact fp32 dequantization);
  ``grok-generate`` greedy ids equal ``grok-generate --adapter`` on the base.
* bf16 merge: every merged matrix is the one bf16 rounding of the fp32 merge, bit for bit; its logits
  (vs base + adapter) are no further off than grok-convert's bf16 checkpoint's are from its fp32 one
  (SPEC §8: the tiny MoE is chaotic, near-tie routing flips, so bf16 weights alone move logits by ~2 max).
* int8 matrices the adapter does not touch come out byte-identical to grok-convert --dtype bf16/fp32.
* the output is a grok-convert directory (``verify_conversion`` passes), several shards, tokenizer copied.
* refusals (int8 output, bad model / adapter / OUT, other architecture, non-empty OUT) name the path;
  overwrite replaces; a failure mid-write leaves OUT as it was and no temporary directory.
"""
import json
import shutil

import pytest
import torch
from safetensors import safe_open

from grok_torch import Grok
from grok_torch.convert import verify_conversion
from grok_torch.finetune import merge as merge_mod
from grok_torch.finetune.merge import MergeError, merge_adapter
from grok_torch.kernels.reference import dequantize
from grok_torch.lora import LoRA, LoRAConfig, add_lora, lora_modules, save_adapter

FP32 = torch.float32
TOK = torch.randint(1, 512, (8, 32), generator=torch.Generator().manual_seed(1))
ALL = ("attn", "experts", "router")


def tensors(d):
    """{name: tensor} of every shard of a model directory."""
    index = json.loads((d / "model.safetensors.index.json").read_text())["weight_map"]
    out = {}
    for shard in sorted(set(index.values())):
        with safe_open(str(d / shard), "pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


@pytest.fixture(scope="module")
def setup(converted, tmp_path_factory):
    """An fp32 base with seeded adapters on every target (random nonzero B), saved; its logits."""
    root = tmp_path_factory.mktemp("merge")
    torch.manual_seed(0)
    m = Grok.from_pretrained(converted("fp32"), dtype=FP32, impl="torch")
    add_lora(m, LoRAConfig(rank=4, alpha=8, targets=ALL))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for lora in lora_modules(m).values():
            lora.B.copy_(torch.randn(lora.B.shape, generator=g) * 0.05)
        ref = m(TOK)
    deltas = {path.rsplit(".", 1)[0]: lora.delta().detach() for path, lora in m.named_modules()
              if isinstance(lora, LoRA)}
    assert len(deltas) == 12 * 8
    save_adapter(m, root / "adapter")
    # an attention-only adapter: the int8 experts stay untouched
    m2 = Grok.from_pretrained(converted("fp32"), dtype=FP32, impl="torch")
    add_lora(m2, LoRAConfig(rank=2, alpha=2, targets=("attn",)))
    with torch.no_grad():
        for lora in lora_modules(m2).values():
            lora.B.normal_(0, 0.05, generator=g)
    save_adapter(m2, root / "attn_adapter")
    return root, ref, deltas


@pytest.fixture(scope="module")
def merged_fp32(converted, setup):
    root, _, _ = setup
    # small shards and row blocks: several shards, int8 scale groups split across blocks
    return merge_adapter(converted("fp32"), root / "adapter", root / "fp32", dtype="fp32", progress=False,
                         shard_size="1MB", chunk_size=4096)


def logits(path, adapter=None):
    with torch.no_grad():
        return Grok.from_pretrained(path, dtype=FP32, impl="torch", adapter=adapter)(TOK)


def test_fp32_merge_matches_base_plus_adapter(converted, setup, merged_fp32):
    root, ref, deltas = setup
    out = merged_fp32
    assert verify_conversion(out, quiet=True) == []
    assert json.loads((out / "config.json").read_text())["weight_format"] == "fp32"
    assert len(list(out.glob("model-*.safetensors"))) > 1
    assert not [p for p in root.iterdir() if p.name.startswith(".")]  # no temporary directory left
    got = logits(out)
    assert (got - ref).abs().max() < 1e-4, (got - ref).abs().max()
    assert (ref - logits(converted("fp32"))).abs().max() > 0.1  # the adapter matters
    src, merged = tensors(converted("fp32")), tensors(out)
    assert set(src) == set(merged)
    for name, t in merged.items():
        assert t.dtype == FP32
        module = name[: -len(".weight")]
        if module in deltas:  # W + delta, one fp32 rounding (delta from row blocks of A @ B * scale)
            torch.testing.assert_close(t, src[name] + deltas[module], rtol=0, atol=1e-6)
            assert not torch.equal(t, src[name])
        else:
            assert torch.equal(t, src[name]), name


def test_int8_base_merges_exactly_like_its_fp32_conversion(converted, setup, merged_fp32, tmp_path):
    """The tiny fp32 conversion holds the exact int8*scale products, so merging onto the int8 base
    (dequantized block by block, here in 4 KiB row blocks) gives the same bytes."""
    root, _, _ = setup
    out = merge_adapter(converted("int8"), root / "adapter", tmp_path / "m", dtype="fp32", progress=False,
                        chunk_size=4096)
    a, b = tensors(out), tensors(merged_fp32)
    assert all(torch.equal(a[k], b[k]) for k in b)


@pytest.mark.parametrize("fmt", ["bf16", "fp32"])
def test_untouched_int8_matrices_equal_the_converters_dequantization(converted, setup, tmp_path, fmt):
    root, _, _ = setup
    out = merge_adapter(converted("int8"), root / "attn_adapter", tmp_path / "m", dtype=fmt, progress=False,
                        chunk_size=4096)
    merged, conv, q = tensors(out), tensors(converted(fmt)), tensors(converted("int8"))
    for name, t in merged.items():
        if ".attn." in name:
            assert not torch.equal(t, conv[name])
            continue
        assert t.dtype == conv[name].dtype and torch.equal(t, conv[name]), name
        if ".moe.w" in name:
            s = q[name.replace(".weight", ".scales")]
            assert torch.equal(t.float(), dequantize(q[name], s, FP32).to(t.dtype).float())


def test_bf16_merge_is_one_rounding_of_the_fp32_merge(converted, setup, merged_fp32, tmp_path):
    root, ref, _ = setup
    out = merge_adapter(converted("fp32"), root / "adapter", tmp_path / "m", progress=False,  # dtype bf16
                        chunk_size=4096)  # the fp32 merge's row blocks: the same fp32 sums
    assert verify_conversion(out, quiet=True) == []
    assert json.loads((out / "config.json").read_text())["weight_format"] == "bf16"
    exact = tensors(merged_fp32)
    for name, t in tensors(out).items():
        plain = name == "embed.weight" or "norm" in name or "router" in name  # fp32, as --plain-dtype fp32
        assert t.dtype == (FP32 if plain else torch.bfloat16), name
        assert torch.equal(t, exact[name].to(t.dtype)), name
    # logits: bf16 weights in this chaotic tiny MoE (near-tie routing flips, SPEC §8) move them about as
    # much as grok-convert's bf16 checkpoint moves the base's (measured over 5 adapter seeds: merge mean
    # |d| 0.07-0.14, max 2.4-3.5, top-1 77-86 %; conversion 0.10, 2.4, 83 %), far less than the adapter does
    def stats(x, y):
        return (x - y).abs().mean().item(), (x.argmax(-1) == y.argmax(-1)).float().mean().item()

    base = logits(converted("fp32"))
    (mean, top1), (conv_mean, conv_top1) = stats(logits(out), ref), stats(logits(converted("bf16")), base)
    assert mean < 2 * conv_mean and top1 >= conv_top1 - 0.1, (mean, top1, conv_mean, conv_top1)
    assert mean < 0.25 * stats(ref, base)[0]
    with torch.no_grad():  # and bf16 activations load it too
        assert torch.isfinite(Grok.from_pretrained(out, impl="torch")(TOK)).all()


def test_grok_generate_loads_the_merge(converted, setup, merged_fp32, capsys):
    from grok_torch.generate_cli import main

    root, _, _ = setup
    args = ["--prompt-ids", "25,376,378", "--max-new-tokens", "6", "--temperature", "0", "--no-stop",
            "--dtype", "fp32", "--impl", "torch"]
    assert main(["--model", str(merged_fp32)] + args) == 0
    ids = capsys.readouterr().out
    assert main(["--model", str(converted("fp32")), "--adapter", str(root / "adapter")] + args) == 0
    assert capsys.readouterr().out == ids


def test_tokenizer_is_copied(converted, setup, tmp_path):
    root, _, _ = setup
    src = tmp_path / "model"
    shutil.copytree(converted("int8"), src)
    (src / "tokenizer.model").write_bytes(b"sentencepiece bytes")
    out = merge_adapter(src, root / "attn_adapter", tmp_path / "m", progress=False)
    assert (out / "tokenizer.model").read_bytes() == b"sentencepiece bytes"


def test_refusals_name_the_path(converted, setup, tmp_path):
    root, _, _ = setup
    model, adapter = converted("fp32"), root / "adapter"

    def refused(match, m=model, a=adapter, out=tmp_path / "out", **kw):
        with pytest.raises(MergeError, match=match) as e:
            merge_adapter(m, a, out, progress=False, **kw)
        assert "\n" not in str(e.value)
        return str(e.value)

    refused("re-quantize", dtype="int8")
    refused("one of bf16, fp32", dtype="fp16")
    assert str(tmp_path / "nope") in refused("does not exist", m=tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    refused(f"{tmp_path / 'empty'} is not a grok-convert output", m=tmp_path / "empty")
    (tmp_path / "cfg_only").mkdir()
    shutil.copy(model / "config.json", tmp_path / "cfg_only")
    refused("cfg_only is not a readable grok-convert output", m=tmp_path / "cfg_only")
    relabeled = tmp_path / "relabeled"  # an int8 checkpoint whose config.json says fp32
    shutil.copytree(converted("int8"), relabeled)
    cfg = json.loads((relabeled / "config.json").read_text())
    (relabeled / "config.json").write_text(json.dumps({**cfg, "weight_format": "fp32"}))
    refused(f"{relabeled}: its tensors do not match its config.json", m=relabeled)
    corrupt = tmp_path / "corrupt"
    shutil.copytree(converted("fp32"), corrupt)
    shard = next(corrupt.glob("model-*.safetensors"))
    shard.write_bytes(shard.read_bytes()[:4096])
    refused(f"{shard}: not a readable safetensors file", m=corrupt)
    refused("adapter directory .*nope does not exist", a=tmp_path / "nope")
    refused(f"{tmp_path / 'empty'}/adapter_config.json is missing", a=tmp_path / "empty")
    other = tmp_path / "other_adapter"
    shutil.copytree(adapter, other)
    meta = json.loads((other / "grok_adapter.json").read_text())
    meta["base_config"]["num_layers"] = 2
    (other / "grok_adapter.json").write_text(json.dumps(meta))
    refused(f"adapter {other} was trained for another base model: num_layers 2", a=other)
    (tmp_path / "file").write_text("x")
    refused(f"output path {tmp_path / 'file'} is a file", out=tmp_path / "file")
    refused("holds .* choose a separate output directory", out=model, overwrite=True)
    assert not (tmp_path / "out").exists()


def test_existing_out_is_refused_then_overwritten(converted, setup, tmp_path):
    root, _, _ = setup
    out = tmp_path / "out"
    merge_adapter(converted("int8"), root / "attn_adapter", out, progress=False)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(MergeError, match=f"output directory {out} is not empty; pass overwrite=True"):
        merge_adapter(converted("fp32"), root / "adapter", out, dtype="fp32", progress=False)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    merge_adapter(converted("fp32"), root / "adapter", out, dtype="fp32", progress=False, overwrite=True)
    assert json.loads((out / "config.json").read_text())["weight_format"] == "fp32"
    assert verify_conversion(out, quiet=True) == []
    (out / "notes.txt").write_text("mine")
    with pytest.raises(MergeError, match="holds files a model directory does not .notes.txt"):
        merge_adapter(converted("fp32"), root / "adapter", out, progress=False, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    (tmp_path / "empty").mkdir()  # an existing empty OUT is fine without overwrite
    merge_adapter(converted("fp32"), root / "attn_adapter", tmp_path / "empty", progress=False)


@pytest.mark.parametrize("error", [RuntimeError("boom"), OSError(28, "No space left on device")])
def test_failure_leaves_out_untouched_and_no_temp_dir(converted, setup, tmp_path, monkeypatch, error):
    root, _, _ = setup
    out = tmp_path / "out"
    merge_adapter(converted("int8"), root / "attn_adapter", out, progress=False)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    real = merge_mod._merged_blocks
    calls = []

    def failing(*a, **kw):
        for i, block in enumerate(real(*a, **kw)):
            calls.append(i)
            if len(calls) > 20:  # well into the first shard
                raise error
            yield block

    monkeypatch.setattr(merge_mod, "_merged_blocks", failing)
    for target, kw in ((out, {"overwrite": True}), (tmp_path / "new", {})):
        calls.clear()
        with pytest.raises(type(error) if isinstance(error, RuntimeError) else MergeError):
            merge_adapter(converted("fp32"), root / "adapter", target, dtype="fp32", progress=False, **kw)
        assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
        assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_merge_leaves_the_global_rng_alone(converted, setup, tmp_path):
    root, _, _ = setup
    state = torch.get_rng_state()
    merge_adapter(converted("fp32"), root / "attn_adapter", tmp_path / "m", progress=False)
    assert torch.equal(torch.get_rng_state(), state)
