"""What only a GPU build shows, checked without a GPU: the Triton kernels as the model launches them
(the MoE layer, the attention core, the int8 attention projections; see grok_torch/kernels/aot.py).

* Every launch of fused_moe_triton (forward and backward), int8_linear_triton and
  flash_attention_triton at Grok-1 shapes is recorded on the `meta` device. That it runs there at
  all is the CUDA-graph contract: grids and buffer sizes come from shapes alone (no `.item()`, no
  `nonzero`, no size read from a tensor's values), so a captured graph replays.
* Every recorded variant compiles for sm_90 (H100) exactly as Triton's JIT would specialise it, in a
  subprocess with TRITON_INTERPRET=0 (in this process the kernels may be interpreter objects:
  tests/conftest.py turns the interpreter on where there is no CUDA). The 16-bit dots use tensor
  cores (`wgmma` at 64+ row tiles, `mma` below) and the fp32 ones none (exact fp32, no tf32); no
  kernel spills registers (but KNOWN_SPILLS), every CTA fits the SM's shared memory, and only the
  deterministic=False MoE down GEMM has atomic adds.
By default the release path is compiled (MoE: int8 weights, bf16 compute, inference; the projections
and attention over a bf16 cache, fp32 and bf16 precision); under CI (or with GROK_AOT_FULL=1) every
variant: MoE bf16/fp16/fp32, float and int8, atomic combine, frozen-expert, full and expert-LoRA training
(the LoRA low-rank GEMMs are exact fp32, so FMA, at every compute dtype); the projections'
grad_input (transposed) products; attention over fp32/fp16 caches, speculative decode, no cache.
Attention training (kind attn-train: the forward with its row statistics, the dK/dV and dQ backward
kernels, fp32 and bf16, dh 128, G 6) is compiled on the release path too (seq 4096; --full adds 512 to 8192).
* The README's `python -m grok_torch.kernels.aot --full --table` runs as a user runs it, with no
  TRITON_INTERPRET in the environment (issue #11: importing the kernels used to set it on CPU-only
  machines, and the tool crashed on interpreter objects); by default a fast subset of it
  (`--table --only linear`, the same path: record, specialise, compile, table), the command itself
  under CI or GROK_AOT_FULL=1.
"""
import json
import os
import re
import subprocess
import sys

import pytest
import torch

from grok_torch.kernels import aot
from grok_torch.kernels.ops import gemm_config


@pytest.mark.parametrize("cd", [torch.bfloat16, torch.float16, torch.float32])
def test_recorded_token_counts_reach_every_tile_config(cd):
    every = {gemm_config(T, 2, 8, cd) for T in (1, 2, 8, 16, 64, 65, 100, 256, 257, 512, 2048, 2049, 4096, 65536)}
    assert {gemm_config(T, 2, 8, cd) for T in aot.TOKENS} == every


def test_attention_shapes_are_grok1s():
    """aot's attention constants are the release config's (grok_torch/config.py)."""
    from grok_torch.config import QUANT_GROUPS, GrokConfig

    cfg = GrokConfig.from_name("grok-1")
    assert (aot.ATTN["D"], aot.ATTN["Hq"], aot.ATTN["Hkv"], aot.ATTN["dh"], aot.ATTN["max_len"]) == (
        cfg.d_model, cfg.num_q_heads, cfg.num_kv_heads, cfg.head_dim, cfg.max_seq_len)
    assert aot.ATTN["scale"] == pytest.approx(cfg.attn_output_multiplier) and aot.ATTN["cap"] == cfg.attn_logit_cap
    assert aot.PROJECTIONS == {"wq": (cfg.d_model, cfg.q_size, QUANT_GROUPS["wq"]),
                               "wk": (cfg.d_model, cfg.kv_size, QUANT_GROUPS["wk"]),
                               "wv": (cfg.d_model, cfg.kv_size, QUANT_GROUPS["wv"]),
                               "wo": (cfg.q_size, cfg.d_model, QUANT_GROUPS["wo"])}
    assert cfg.quant_groups == QUANT_GROUPS and aot.GROK1["D"] == cfg.d_model


def test_scenario_names():
    assert {sc.name for sc in aot.scenarios(kinds=("attn-train",))} == {
        "attn-train-T4096-S4096-fp32kv-fp32", "attn-train-T4096-S4096-fp32kv-bf16"}
    names = {sc.name for sc in aot.scenarios(kinds=("linear", "attn"))}
    assert {"linear-wq-T1-fp32", "linear-wo-T4096-bf16", "attn-decode-S8192-bf16cache-fp32",
            "attn-prefill-T8192-S8192-bf16cache-bf16"} <= names
    full = {sc.name for sc in aot.scenarios(full=True, kinds=("linear", "attn"))} - names
    assert {"linear-wk-T8-fp32", "linear-wv-T64-bf16-dx", "attn-decode-T4-S8192-fp16cache-fp32",
            "attn-prefill-T512-S512-fp32kv-bf16", "attn-decode-S8192-fp32cache-fp32"} <= full


def _launches(sc):
    return [(fn.__name__, grid) for fn, grid, _, _ in aot.record_launches(sc)]


def test_launch_sequence_is_shape_only():
    """Forward 5 launches (4 with the atomic combine); the backward adds 3 GEMMs, + 3 weight grads."""
    assert _launches(aot.Scenario(T=1)) == [
        ("_router_topk_kernel", (1,)), ("_align_kernel", (1,)),
        ("_moe_gemm_kernel", (3, 32768 // 64)), ("_moe_gemm_kernel", (3, 6144 // 64)), ("_combine_kernel", (1, 24)),
    ]
    names = [n for n, _ in _launches(aot.Scenario(T=4096, deterministic=False))]
    assert names == ["_router_topk_kernel", "_align_kernel", "_moe_gemm_kernel", "_moe_gemm_kernel"]
    lora = [n for n, _ in _launches(aot.Scenario(T=64, train="x"))]
    assert lora[:5] == names[:4] + ["_combine_kernel"] and lora[5:] == ["_moe_gemm_kernel"] * 3
    full = [n for n, _ in _launches(aot.Scenario(T=64, compute="bf16", weights="float", train="weights"))]
    assert full[8:] == ["_moe_wgrad_kernel"] * 3


def test_lora_launches_are_shape_only():
    """Expert LoRA (rank aot.LORA_RANK): per adapted matrix 2 low-rank GEMMs before the up (down)
    GEMM that adds their deltas; the backward adds per matrix 2 transposed low-rank GEMMs and 2
    weight grads. The no-grad forward first, then forward + backward."""
    calls = aot.record_launches(aot.Scenario(T=64, train="lora"))
    names = [fn.__name__ for fn, _, _, _ in calls]
    fwd = ["_router_topk_kernel", "_align_kernel"] + ["_moe_gemm_kernel"] * 8 + ["_combine_kernel"]
    bwd = ["_moe_gemm_kernel"] * 3 + ["_moe_wgrad_kernel"] * 2 + ["_moe_gemm_kernel"] * 2 + (
        ["_moe_gemm_kernel"] * 2 + ["_moe_wgrad_kernel"] * 2) * 2
    assert names == fwd + fwd + bwd
    preact_in = [kw["PREACT_IN"] for fn, _, _, kw in calls[:11] if fn.__name__ == "_moe_gemm_kernel"]
    assert preact_in == [0, 0, 0, 0, 3, 0, 0, 1]  # the up GEMM adds both deltas, the down GEMM its one
    assert calls[2][1][1] == 1  # x @ A: one column tile for r = 16


def test_attention_launches_are_shape_only():
    """The projections and the attention core run on the meta device too (one launch each; a split
    reduction adds its fixed-order sum); grids: (tiles, chunks) and (token blocks, kv heads, batch)."""
    assert _launches(aot.LinearScenario("wk", 1, "bf16")) == [("_int8_linear_kernel", (16, 12)),
                                                               ("_int8_linear_reduce_kernel", (1,))]
    assert _launches(aot.LinearScenario("wq", 4096, "bf16", transpose=True)) == [("_int8_linear_kernel", (32 * 48, 1))]
    assert _launches(aot.AttnScenario(1, "bf16cache", "bf16")) == [("_flash_attn_kernel", (1, 8, 1))]
    assert _launches(aot.AttnScenario(512, "bf16cache", "bf16")) == [("_flash_attn_kernel", (25, 8, 1))]
    _, _, args, _ = aot.record_launches(aot.AttnScenario(512, "fp32kv", "fp32"))[0]
    assert args[7] == 512  # S = T without a cache


def test_attention_training_launches_are_shape_only():
    """Training (attention(impl="triton") with q, k, v requiring grad, as the model calls it): the
    forward with its row statistics, then the dK/dV kernel (key blocks, kv heads, batch) and the dQ
    kernel (token blocks, kv heads, batch); no inference launch is changed by it."""
    from grok_torch.kernels.flash_attention import attention_bwd_config

    calls = aot.record_launches(aot.AttnScenario(4096, "fp32kv", "bf16", train=True))
    assert [fn.__name__ for fn, *_ in calls] == ["_flash_attn_kernel", "_flash_attn_bwd_dkdv_kernel",
                                                 "_flash_attn_bwd_dq_kernel"]
    kv, q = attention_bwd_config(6, 128, "bf16")
    assert calls[0][3]["STATS"] is True and calls[1][1] == (4096 // kv.block_n, 8, 1)
    assert calls[2][1] == (-(-4096 // (q.block_m // 6)), 8, 1)
    assert "STATS" not in aot.record_launches(aot.AttnScenario(4096, "fp32kv", "bf16"))[0][3]


@pytest.mark.parametrize("read", ["item", "nonzero"])
def test_recording_catches_a_host_read(monkeypatch, read):
    """The shape-only proof can fail: a wrapper that reads a tensor's values raises on meta."""
    from grok_torch.kernels import ops

    real = ops.moe_align

    def syncing(topk_ids, num_experts, block_m):
        _ = int(topk_ids.max()) if read == "item" else topk_ids.nonzero()  # what breaks graph capture
        return real(topk_ids, num_experts, block_m)

    monkeypatch.setattr(ops, "moe_align", syncing)
    with pytest.raises((RuntimeError, NotImplementedError), match="meta|nonzero"):
        aot.record_launches(aot.Scenario(T=64))


# CI compiles every variant so that a kernel that would not build (or would spill) on an H100 fails
# CI; locally the release path is the default (set GROK_AOT_FULL=1 for all).
_FULL = os.environ.get("GROK_AOT_FULL") == "1" or bool(os.environ.get("CI"))
_NEEDS_FULL = pytest.mark.skipif(not _FULL, reason="every variant takes minutes; runs under CI or with GROK_AOT_FULL=1")


@pytest.mark.parametrize("args", [["--table", "--only", "linear"], pytest.param(["--full", "--table"], marks=_NEEDS_FULL)])
def test_readme_command_runs_without_the_interpreter_in_the_environment(args):
    """`python -m grok_torch.kernels.aot --full --table` (kernels/README.md) on this machine as a user
    runs it: TRITON_INTERPRET absent, whether or not there is a GPU (the compile needs none)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "grok_torch.kernels.aot", *args], env=env, capture_output=True,
                          text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    header, *rows = proc.stdout.splitlines()
    assert header.split() == ["variant", "regs", "spill", "smem", "KB", "CTA/SM", "wgmma", "mma", "atom", "scen", "sec"]
    assert rows and all(len(r.split()) == 10 for r in rows), rows
    names = {r.split()[0] for r in rows}
    assert {"linear-wq-T1-fp32", "linear-wq-T64-bf16"} <= names
    if "--full" in args:
        assert {"linear-wq-T1-fp32-dx", "attn-decode-S8192-fp16cache-bf16", "attn-decode-T4-S8192-fp16cache-bf16"} <= names
        assert any(n.startswith("up-train-") for n in names) and any(n.startswith("down-atomic-lora-") for n in names)


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="needs this process under the interpreter")
def test_interpreted_kernels_are_refused_with_the_reason():
    """A user who exports TRITON_INTERPRET=1 and runs the AOT tool is told why it cannot compile."""
    with pytest.raises(RuntimeError, match="interpreter.*run it without TRITON_INTERPRET=1"):
        aot.variants(kinds=("linear",))

# Spills found by this check and not yet fixed (variant: at most these bytes). The bf16 decode tile of
# the int8 linear (16 x 64 x 128, 4 warps, 4 stages; int8_linear_config) spills 8 bytes with the fp32
# x the model passes (bf16 x, as tests/test_int8_linear.py compiles it, does not); 2 stages do not.
KNOWN_SPILLS: dict = {}  # variant name -> bytes tolerated (none today)


@pytest.mark.parametrize("full", [False, pytest.param(True, marks=_NEEDS_FULL)])
def test_compiles_for_sm90(full):
    env = dict(os.environ, TRITON_INTERPRET="0")
    cmd = [sys.executable, "-m", "grok_torch.kernels.aot", "--arch", "90"] + (["--full"] if full else [])
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    roles = {r["name"].split("-m")[0] for r in results if r["kernel"] == "_moe_gemm_kernel"}
    kernels = {r["kernel"] for r in results}
    names = {r["name"] for r in results}
    assert {"_router_topk_kernel", "_align_kernel", "_combine_kernel"} <= kernels
    assert {"up", "down"} <= roles
    assert {"_int8_linear_kernel", "_int8_linear_reduce_kernel", "_flash_attn_kernel"} <= kernels
    assert {f"{n}-{p}" for n in ("linear-wq-T1", "linear-wq-T64", "attn-decode-S8192-bf16cache",
                                 "attn-prefill-T512-S8192-bf16cache") for p in ("fp32", "bf16")} <= names
    # attention training at Grok-1 shapes (dh 128, G 6): forward + statistics, dK/dV, dQ, fp32 and bf16
    assert {"_flash_attn_bwd_dkdv_kernel", "_flash_attn_bwd_dq_kernel"} <= kernels
    # (identical specialisations compile once, under the first scenario's name: with --full that is T512)
    train = {re.sub(r"-T\d+-S\d+-", "-", n) for n in names if n.startswith("attn-train-")}
    assert {f"attn-train-fp32kv-{p}{k}" for p in ("fp32", "bf16") for k in ("", "-dkdv", "-dq")} <= train
    if full:
        assert {"up-train", "down-atomic", "bwd-dA", "bwd-dx"} <= roles and "_moe_wgrad_kernel" in kernels
        assert {"up-lora", "up-lora-train", "down-lora", "down-atomic-lora", "lora-bwd-dA", "lora-bwd-dx"} <= roles
        assert {r["cdtype"] for r in results if r["is_gemm"]} == {"bf16", "fp16", "fp32"}
        assert {"linear-wq-T1-fp32-dx", "linear-wq-T256-bf16-dx", "attn-decode-S8192-fp32cache-fp32",
                "attn-decode-S8192-fp16cache-bf16", "attn-decode-T8-S8192-bf16cache-bf16",
                "attn-prefill-T512-S8192-fp32cache-bf16"} <= names
    for r in results:
        assert r["spill_bytes"] <= KNOWN_SPILLS.get(r["name"], 0), \
            f"{r['name']}: spills {r['spill_bytes']} bytes of registers on sm_90"
        assert r["smem"] <= aot.SM90["smem_per_cta_max"], f"{r['name']}: {r['smem']} B of shared memory per CTA"
        assert r["ctas_per_sm"] >= 1, r
        if r["epilogue"] == 3:
            assert r["atomics"] > 0, f"{r['name']}: no atomic add in the PTX"
        else:
            assert r["atomics"] == 0, f"{r['name']}: atomics in a deterministic kernel"
        if r["is_gemm"] and r["cdtype"] != "fp32":
            assert r["wgmma"] + r["mma"] > 0, f"{r['name']}: no tensor-core instruction in the PTX"
        elif r["is_gemm"]:  # fp32 is exact fp32 on purpose (input_precision="ieee"): FMA, not tf32 MMA
            assert r["wgmma"] + r["mma"] == 0, f"{r['name']}: tensor-core (tf32) instructions in an fp32 kernel"
        if r["kernel"] in ("_int8_linear_kernel", "_flash_attn_kernel") and r["cdtype"] == "bf16":
            # Hopper warpgroup MMA at 64+ row tiles (prefill, T=8 speculative decode), mma.sync below
            assert (r["wgmma"] if r["block_m"] >= 64 else r["mma"]) > 0, r
        if r["kernel"] in ("_flash_attn_bwd_dkdv_kernel", "_flash_attn_bwd_dq_kernel") and r["cdtype"] == "bf16":
            # dK/dV: its products have the 64 keys as M; dQ: 64 rows
            assert r["wgmma"] > 0, r
    # Hopper warpgroup MMA where the tiles allow it (64+ rows): the prefill GEMMs
    prefill = [r for r in results if r["kernel"] == "_moe_gemm_kernel" and "-m128n" in r["name"] and r["cdtype"] == "bf16"]
    assert prefill and all(r["wgmma"] > 0 for r in prefill), prefill
