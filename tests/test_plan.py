"""grok-plan: verdicts for the real Grok-1, byte counts checked by hand and against the model itself."""
import itertools
import json
import subprocess
import sys
from math import comb

import pytest
import torch

from grok_torch.config import GrokConfig
from grok_torch.plan import (PlanError, _busiest, check_fits, main, parse_bytes, placement, plan_memory,
                             weight_bytes_per_device)

GROK1 = GrokConfig.from_name("grok-1")
TINY = GrokConfig.from_name("tiny")
# Grok-1: D=6144, F=32768, E=8, L=64, Hq=48, Hkv=8, dh=128, V=131072


def plan(**kw):
    args = dict(gpus=8, gpu_mem="80GB", context=8192, batch=1)
    return plan_memory(GROK1, **{**args, **kw})


# ---- verdicts ---------------------------------------------------------------------------------

@pytest.mark.parametrize("split", ["experts", "ffn"])
def test_grok1_int8_fits_8x80gb_at_8k(split):
    p = plan(split=split, weight_format="int8")
    assert p.fits and p.verdict.startswith("FITS"), p.report()
    assert p.suggestions == []


@pytest.mark.parametrize("split", ["experts", "ffn"])
def test_grok1_int8_does_not_fit_4x80gb(split):
    p = plan(gpus=4, split=split, weight_format="int8")
    assert not p.fits and p.verdict.startswith("DOES NOT FIT: GPU ")
    assert any("8 GPUs" in s for s in p.suggestions), p.suggestions


def test_grok1_bf16_does_not_fit_8x80gb_and_says_what_would():
    p = plan(weight_format="bf16")
    assert not p.fits
    # the worst GPU is named with its excess: GPU 0 also holds the embedding and the logits
    worst = max(p.devices, key=lambda d: d["total"] - d["capacity"])
    assert worst["gpu"] == 0 and f"GPU 0 needs {worst['total'] / 1e9:.1f} GB of 80.0 GB" in p.verdict
    text = " | ".join(p.suggestions)
    assert "int8" in text and "16 GPUs with split 'ffn'" in text, text
    assert "--dtype int8" in p.report()
    # every suggestion was checked by planning it
    assert plan(gpus=16, split="ffn", weight_format="bf16").fits
    assert not plan(gpus=8, split="ffn", weight_format="bf16").fits


def test_chunk_context_and_batch_suggestions_are_the_largest_that_fit():
    p = plan(weight_format="int8", batch=64)
    assert not p.fits
    chunk = next(int(s.split()[2]) for s in p.suggestions if s.startswith("prefill chunk"))
    ctx = next(int(s.split()[1]) for s in p.suggestions if s.startswith("context"))
    bat = next(int(s.split()[1]) for s in p.suggestions if s.startswith("batch"))
    assert f"(--prefill-chunk {chunk})" in " | ".join(p.suggestions)
    assert plan(weight_format="int8", batch=64, prefill_chunk=chunk).fits
    assert not plan(weight_format="int8", batch=64, prefill_chunk=chunk + 1).fits
    assert plan(weight_format="int8", batch=64, context=ctx).fits
    assert not plan(weight_format="int8", batch=64, context=ctx + 1).fits
    assert plan(weight_format="int8", batch=bat).fits and not plan(weight_format="int8", batch=bat + 1).fits


def test_tiny_fits_anything():
    # 1 GB with nothing reserved (the default 1.5 GiB CUDA reserve alone exceeds 1 GB), and the default reserve on 2 GB
    assert plan_memory(TINY, gpus=1, gpu_mem="1GB", reserve=0).fits
    assert plan_memory(TINY, gpus=1, gpu_mem="2GB").fits
    assert plan_memory(TINY, gpus=8, gpu_mem="2GB", split="ffn", weight_format="fp32").fits


def test_check_fits_raises_with_the_explanation():
    assert check_fits(GROK1, gpus=8, gpu_mem="80GB", context=8192).fits
    with pytest.raises(PlanError) as e:
        check_fits(GROK1, gpus=8, gpu_mem="80GB", weight_format="bf16")
    msg = str(e.value)
    assert msg.splitlines()[0].startswith("DOES NOT FIT: GPU 0") and "would fit: " in msg and "GPU  layers" in msg
    assert isinstance(e.value, ValueError)


def test_bad_split_is_a_value_error_naming_the_other_split():
    with pytest.raises(ValueError, match="divides the 8 experts, got 3"):
        plan(gpus=3)
    with pytest.raises(ValueError, match=r"8 int8 scale groups, got 16: GPU counts that work .*ffn: 1, 2, 4, 8$"):
        plan(gpus=16, split="ffn", weight_format="int8")
    with pytest.raises(ValueError, match=r"got 16: use split 'ffn' \(--device-map ffn\)"):
        plan(gpus=16, split="experts", weight_format="bf16")
    assert plan(gpus=16, split="ffn", weight_format="bf16").inputs["gpus"] == 16  # bf16 has no scale groups


# ---- bytes by hand ----------------------------------------------------------------------------

EMBED = 131072 * 6144 * 4 + 6144 * 4                     # fp32 embedding (tied head) + final norm
HOME_LAYER_INT8 = (
    4 * 6144 * 4                                         # 4 RMSNorms, fp32
    + 6144 * 6144 + 1 * 6144 * 2                         # wq int8 + scales [1, 6144] bf16
    + 2 * (6144 * 1024 + 1 * 1024 * 2)                   # wk, wv int8 + scales [1, 1024]
    + 6144 * 6144 + 8 * 6144 * 2                         # wo int8 + scales [8, 6144]
    + 6144 * 8 * 4                                       # router fp32
)
ONE_EXPERT_INT8 = (
    2 * (6144 * 32768 + 1 * 32768 * 2)                   # w1, w3 [D, F] int8 + scales [1, F]
    + 32768 * 6144 + 8 * 6144 * 2                        # w2 [F, D] int8 + scales [8, D]
)
FFN_SLICE_INT8 = (                                       # all 8 experts, F/8 = 4096 columns
    2 * (8 * 6144 * 4096 + 8 * 1 * 4096 * 2)             # w1, w3 [8, D, 4096] + scales [8, 1, 4096]
    + 8 * 4096 * 6144 + 8 * 1 * 6144 * 2                 # w2 [8, 4096, D] + scales [8, 8/8 groups, D]
)


def test_weight_bytes_by_hand_grok1_int8_8_gpus():
    experts = weight_bytes_per_device(GROK1, 8, "experts", "int8")
    assert experts[0] == EMBED + 8 * HOME_LAYER_INT8 + 64 * ONE_EXPERT_INT8 == 42_598_555_648
    assert experts[7] == 8 * HOME_LAYER_INT8 + 64 * ONE_EXPERT_INT8 == 39_377_305_600
    ffn = weight_bytes_per_device(GROK1, 8, "ffn", "int8")
    assert ffn[0] == EMBED + 8 * HOME_LAYER_INT8 + 64 * FFN_SLICE_INT8
    assert ffn[7] == 8 * HOME_LAYER_INT8 + 64 * FFN_SLICE_INT8
    assert ONE_EXPERT_INT8 == FFN_SLICE_INT8  # one whole expert weighs what one slice of all 8 does


def test_weight_bytes_by_hand_bf16():
    home = 4 * 6144 * 4 + 2 * (6144 * 6144 + 6144 * 1024) * 2 + 6144 * 8 * 4
    expert = 3 * 6144 * 32768 * 2
    assert weight_bytes_per_device(GROK1, 8, "experts", "bf16") == [EMBED + 8 * home + 64 * expert] + [8 * home + 64 * expert] * 7
    # an fp32 checkpoint: attention stays fp32 (its math is fp32), experts take the bf16 activation dtype
    home32 = home + 2 * (6144 * 6144 + 6144 * 1024) * 2
    assert weight_bytes_per_device(GROK1, 8, "experts", "fp32")[7] == 8 * home32 + 64 * expert
    assert weight_bytes_per_device(GROK1, 8, "experts", "fp32", act_dtype="fp32")[7] == 8 * home32 + 64 * 2 * expert


def _working_by_hand(B, Tc, f_loc=32768):
    """The terms of one prefill forward of Tc positions x batch B (Grok-1, bf16 activations), by hand."""
    D, q, kv, V = 6144, 48 * 128, 8 * 128, 131072
    return {
        "activations": 6 * B * Tc * D * 4,                        # 6 fp32 [B, Tc, D]
        "attention": (4 * B * Tc * q                              # fp32 q + 3 RoPE temporaries of its size
                      + 2 * B * Tc * kv                           # k, v
                      + B * Tc * q                                # the kernel's output o
                      + B * Tc * D) * 4,                          # the o_proj output
        "moe": B * Tc * 2 * (f_loc * 2 + D * 4) + 2 * B * Tc * D * 4,  # act bf16 + y fp32 (k=2 rows a token) + x, partial
        "head": 2 * B * V * 4,                                    # two fp32 [B, V]: last position only
    }


def test_kv_cache_and_working_terms_by_hand():
    p = plan(weight_format="int8", batch=2, context=4096)   # default prefill chunk: 2048 positions a forward
    assert p.inputs["prefill_chunk"] == 2048
    kv_layer = 2 * 2 * 4096 * 8 * 128 * 2                # k and v, batch 2, 4096 positions, 8 heads x 128, bf16
    assert [d["kv_cache"] for d in p.devices] == [8 * kv_layer] * 8 == [268_435_456] * 8
    t0 = p.devices[0]["terms"]
    assert t0 == _working_by_hand(2, 2048)
    assert t0["head"] == 2 * 2 * 131072 * 4 == 2_097_152
    assert t0["attention"] == (5 * 2048 * 6144 + 2 * 2048 * 1024 + 2048 * 6144) * 2 * 4 == 637_534_208
    assert p.devices[0]["working"] == t0["activations"] + max(t0["attention"], t0["moe"], t0["head"])
    # the whole prompt in one forward: the same formulas at Tc = context
    whole = plan(weight_format="int8", batch=2, context=4096, prefill_chunk=None).devices[0]["terms"]
    assert whole == _working_by_hand(2, 4096)
    # a chunk longer than the context is the whole context
    assert plan(weight_format="int8", batch=2, context=1000, prefill_chunk=4096).devices[0]["terms"] == _working_by_hand(2, 1000)
    # ffn split: each GPU runs its F/n columns of every routed row
    assert plan(weight_format="int8", batch=2, context=4096, split="ffn").devices[5]["terms"]["moe"] == \
        _working_by_hand(2, 2048, f_loc=32768 // 8)["moe"]
    # no dequantised weight copy (int8 GEMM in registers) and no score tensor: an fp32-held matrix
    # and an int8 one cost attention the same
    t32 = plan(weight_format="fp32", batch=2, context=4096).devices[0]["terms"]
    assert t32["attention"] == t0["attention"]
    d = p.devices[3]
    assert d["terms"]["head"] == 0  # the head lives on GPU 0
    assert d["working"] == d["terms"]["activations"] + max(d["terms"]["attention"], d["terms"]["moe"])
    assert d["total"] == d["weights"] + d["kv_cache"] + d["working"] + parse_bytes("1.5GiB")


def test_smaller_prefill_chunk_lowers_working_memory_not_the_kv_cache():
    plans = {c: plan(weight_format="int8", batch=4, prefill_chunk=c) for c in (None, 4096, 2048, 512, 1)}
    working = [plans[c].devices[0]["working"] for c in plans]
    assert working == sorted(working, reverse=True) and len(set(working)) == len(working), working
    for c, p in plans.items():
        assert [d["kv_cache"] for d in p.devices] == [d["kv_cache"] for d in plans[None].devices]  # 2 x [B, context, ...]
        assert [d["weights"] for d in p.devices] == [d["weights"] for d in plans[None].devices]
        assert p.decode_floor_s == plans[None].decode_floor_s
    assert plans[None].devices[0]["terms"] == plan(weight_format="int8", batch=4, prefill_chunk=8192).devices[0]["terms"]
    assert plans[1].devices[0]["terms"] == _working_by_hand(4, 1)


def test_released_model_on_8x80gb_at_8k_fits_with_the_default_chunk():
    p = plan_memory(GROK1, gpus=8, gpu_mem="80GB", context=8192, batch=1)  # int8: the release
    assert p.inputs["prefill_chunk"] == 2048 and p.inputs["weight_format"] == "int8"
    d0 = p.devices[0]
    print(f"\nGPU 0: weights {d0['weights'] / 1e9:.2f} GB, KV {d0['kv_cache'] / 1e9:.3f} GB, "
          f"working {d0['working'] / 1e9:.3f} GB {d0['terms']}, total {d0['total'] / 1e9:.2f} of 80 GB; {p.verdict}")
    assert p.fits and p.verdict.startswith("FITS: tightest is GPU 0")
    t = _working_by_hand(1, 2048)
    assert d0["working"] == t["activations"] + max(t["attention"], t["moe"], t["head"]) == 771_751_936
    assert d0["kv_cache"] == 8 * 2 * 8192 * 8 * 128 * 2 == 268_435_456
    assert d0["total"] == 42_598_555_648 + 268_435_456 + 771_751_936 + parse_bytes("1.5GiB")
    assert "prefill chunk 2048" in p.report() and "Tc = 2048 tokens" in p.report()


@pytest.mark.parametrize("chunk", [0, -1, 2.5, True, "2048"])
def test_prefill_chunk_must_be_a_positive_int_or_none(chunk):
    with pytest.raises(ValueError, match=r"prefill_chunk must be an int >= 1 \(or None"):
        plan(prefill_chunk=chunk)


# ---- against the model itself (meta device: no memory) ----------------------------------------

def _meta_state(cfg, act=torch.bfloat16):
    from grok_torch.model import Grok

    with torch.device("meta"):
        return Grok(cfg, dtype=act).state_dict()


def test_grok1_parameter_count_and_bytes_on_the_meta_device():
    sd = _meta_state(GROK1)
    params = sum(t.numel() for name, t in sd.items() if not name.endswith(".scales"))
    assert params == 315_684_820_992  # "314B": 315.7e9, 98% of them in the experts
    assert 3.14e11 <= params <= 3.17e11
    total = sum(t.numel() * t.element_size() for t in sd.values())
    assert total == 318_239_694_848  # int8 + bf16 scales + fp32 embedding/norms/routers
    for n, split in itertools.product((1, 8), ("experts", "ffn")):
        assert sum(weight_bytes_per_device(GROK1, n, split)) == total, (n, split)


@pytest.mark.parametrize("fmt,act", [("int8", torch.bfloat16), ("bf16", torch.bfloat16), ("fp32", torch.float32)])
@pytest.mark.parametrize("cfg", [GROK1, TINY], ids=["grok-1", "tiny"])
def test_placement_matches_every_model_tensor(cfg, fmt, act):
    """One GPU: the placement lists exactly the model's tensors with their shapes and dtypes; several
    GPUs: the slices of each tensor add up to it."""
    cfg = cfg.replace(weight_format=fmt)
    sd = _meta_state(cfg, act)
    act_name = "bf16" if act == torch.bfloat16 else "fp32"
    one = {t.name: (t.shape, t.itemsize) for t in placement(cfg, 1, "experts", act_dtype=act_name)}
    assert one == {name: (tuple(t.shape), t.element_size()) for name, t in sd.items()}
    for split in ("experts", "ffn"):
        per_name = {}
        for t in placement(cfg, 8, split, act_dtype=act_name):
            per_name[t.name] = per_name.get(t.name, 0) + torch.Size(t.shape).numel() * t.itemsize
        assert per_name == {name: t.numel() * t.element_size() for name, t in sd.items()}


@pytest.mark.parametrize("split", ["experts", "ffn"])
def test_placement_slices_tile_every_tensor_once(split):
    """Each GPU's index selects a block of its stated shape, and the blocks cover the tensor exactly once."""
    sd = _meta_state(TINY)
    cover = {name: torch.zeros(t.shape, dtype=torch.int8) for name, t in sd.items()}
    for t in placement(TINY, 8, split):
        block = cover[t.name][t.index]
        assert tuple(block.shape) == t.shape, t
        block += 1
    assert all(bool((c == 1).all()) for c in cover.values())
    w2s = [t for t in placement(TINY, 8, split) if t.name == "layers.0.moe.w2.scales"]
    assert [t.index for t in w2s][3] == ((slice(3, 4),) if split == "experts" else (slice(None), slice(3, 4)))


# ---- decode floor -----------------------------------------------------------------------------

def test_decode_floor_ffn_beats_experts_at_batch_1():
    p = plan(weight_format="int8")
    f, b = p.decode_floor_s, p.decode_bytes
    assert f["ffn"] < f["experts"]
    # experts: one GPU reads one whole expert per layer; ffn: every GPU reads 2/8 of two experts
    assert b["experts"]["moe"] == pytest.approx(64 * ONE_EXPERT_INT8)
    assert b["ffn"]["moe"] == pytest.approx(64 * 2 * ONE_EXPERT_INT8 / 8)
    assert b["experts"]["moe"] / b["ffn"]["moe"] == pytest.approx(4.0)
    assert f["experts"] / f["ffn"] > 2  # attention, KV and head reads are the same in both
    assert f["ffn"] == pytest.approx(sum(b["ffn"].values()) / 3.35e12)
    assert "<- faster" in [line for line in p.report().splitlines() if line.strip().startswith("ffn ")][0]


def test_decode_floor_splits_converge_at_large_batch():
    p = plan(weight_format="int8", batch=64, context=1024)
    assert p.decode_bytes["experts"]["moe"] / p.decode_bytes["ffn"]["moe"] == pytest.approx(1.0, abs=1e-6)
    # a split that cannot use this GPU count has no floor, and the report says why
    p = plan(gpus=16, split="ffn", weight_format="bf16")
    assert p.decode_floor_s["experts"] is None and p.decode_floor_s["ffn"] > 0
    assert "experts  n/a: split 'experts' needs a GPU count that divides the 8 experts" in p.report()


def test_busiest_gpu_expectation_is_exact():
    """Brute force over every routing of B tokens (k of E each) against the closed form."""
    for E, k, B, n in [(4, 2, 2, 2), (4, 1, 3, 4), (6, 2, 2, 3), (8, 2, 1, 8), (4, 2, 3, 1)]:
        subsets = list(itertools.combinations(range(E), k))
        total = 0
        for choice in itertools.product(subsets, repeat=B):
            chosen = set().union(*choice)
            total += max(sum(e // (E // n) == g for e in chosen) for g in range(n))
        assert _busiest(E, k, B, n) == pytest.approx(total / comb(E, k) ** B), (E, k, B, n)


# ---- parse_bytes and the CLI ------------------------------------------------------------------

def test_parse_bytes():
    assert parse_bytes("80GB") == 80 * 10**9
    assert parse_bytes("80GiB") == 80 * 2**30
    assert parse_bytes("81920MiB") == 80 * 2**30
    assert parse_bytes("1.5GiB") == 3 * 2**29
    assert parse_bytes(123) == parse_bytes("123") == 123
    for bad in ("80 gigs", "", "-1GB", "GB"):
        with pytest.raises(ValueError):
            parse_bytes(bad)


def test_cli_exit_codes_and_report(capsys):
    assert main(["--config", "grok-1", "--gpus", "8", "--gpu-mem", "80GB", "--dtype", "int8", "--context", "8192"]) == 0
    out = capsys.readouterr().out
    assert "FITS" in out and "GPU  layers" in out and "ms/step" in out
    assert main(["--config", "grok-1", "--gpus", "8", "--dtype", "bf16"]) == 1
    assert "DOES NOT FIT" in capsys.readouterr().out


def test_cli_prefill_chunk(capsys):
    assert main(["--config", "grok-1", "--gpus", "8", "--prefill-chunk", "512", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["inputs"]["prefill_chunk"] == 512 and d["devices"][0]["terms"] == _working_by_hand(1, 512)
    assert main(["--config", "grok-1", "--gpus", "8", "--prefill-chunk", "0"]) == 0  # 0: the whole prompt
    out = capsys.readouterr().out
    assert "prefill in one forward" in out and "Tc = 8192 tokens" in out
    assert main(["--config", "grok-1", "--gpus", "8"]) == 0
    out = capsys.readouterr().out
    assert "batch 1, prefill chunk 2048 (GB" in out and "score" not in out.replace("no score tensor", "")


def test_cli_json(capsys):
    assert main(["--config", "grok-1", "--gpus", "4", "--json"]) == 1
    d = json.loads(capsys.readouterr().out)
    assert d["fits"] is False and len(d["devices"]) == 4 and d["suggestions"]
    assert set(d["devices"][0]) >= {"weights", "kv_cache", "working", "total", "capacity"}
    assert d["decode_floor_s"]["ffn"] < d["decode_floor_s"]["experts"]


@pytest.mark.parametrize("argv,flag", [
    (["--config", "grok-1", "--gpus", "3", "--device-map", "experts"], "--device-map experts --gpus 3"),
    (["--config", "grok-1", "--gpus", "16", "--device-map", "ffn"], "--device-map ffn --gpus 16"),
    (["--config", "grok-1", "--gpu-mem", "lots"], "--gpu-mem"),
    (["--config", "grok-1", "--context", "9000"], "--context"),
    (["--config", "grok-1", "--batch", "0"], "--batch"),
    (["--config", "grok-1", "--prefill-chunk", "-1"], "--prefill-chunk"),
    (["--config", "grok-9"], "--config"),
    (["--model", "/nonexistent/dir"], "--model"),
    (["--config", "grok-1", "--dtype", "int4"], "--dtype"),
    ([], "--model"),
])
def test_cli_bad_arguments_exit_2_with_one_line(argv, flag, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("grok-plan: ") and flag in err and err.count("\n") == 1 and "Traceback" not in err


def test_cli_split_error_suggests_the_other_split(capsys):
    with pytest.raises(SystemExit):
        main(["--config", "grok-1", "--dtype", "bf16", "--gpus", "16", "--device-map", "experts"])
    assert "use split 'ffn' (--device-map ffn)" in capsys.readouterr().err


def test_cli_model_dir_uses_its_weight_format(tmp_path, capsys):
    GROK1.replace(weight_format="bf16").to_json(tmp_path / "config.json")
    assert main(["--model", str(tmp_path), "--gpus", "8"]) == 1
    assert "bf16 weights" in capsys.readouterr().out
    assert main(["--model", str(tmp_path), "--gpus", "8", "--dtype", "int8"]) == 0


def test_module_entry_point_and_help():
    run = subprocess.run([sys.executable, "-m", "grok_torch.plan", "--config", "tiny", "--gpus", "1",
                          "--gpu-mem", "1GB", "--reserve", "0"], capture_output=True, text=True)
    assert run.returncode == 0 and "FITS" in run.stdout, run.stderr
    run = subprocess.run([sys.executable, "-m", "grok_torch.plan", "--help"], capture_output=True, text=True)
    assert run.returncode == 0 and "examples:" in run.stdout and "GB = 1e9" in run.stdout
