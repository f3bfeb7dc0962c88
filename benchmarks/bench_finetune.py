"""Fine-tuning benchmark (issue #10): tokens/s and peak memory of one optimizer step, LoRA vs full
fine-tuning vs the forward alone, in the same run; and the estimate of LoRA memory for the real
Grok-1 on 8 x 80 GB.

    python benchmarks/bench_finetune.py                                   # CPU: tiny + scaled (~3-4 min, 2 threads)
    python benchmarks/bench_finetune.py --configs tiny --steps 2 --threads 2 --md ft.md
    python benchmarks/bench_finetune.py --md "$OUT/bench_finetune.md"     # GPU: impl triton vs torch (gpu_check.sh)
    python benchmarks/bench_finetune.py --plan-only                       # the Grok-1 estimate alone (seconds)

Models: random weights built in memory (``Grok(config, dtype)`` filled in place; no checkpoint), int8
weights + bf16 scales for the forward / LoRA rows (the released format), float weights in the
activation dtype for the full row (full fine-tuning needs float weights: a ``grok-convert --dtype
bf16`` checkpoint). Activations bf16 (``--dtype``, grok-finetune's default).
  tiny     GrokConfig "tiny" (d_model 128, 12 layers, 16 q / 8 kv heads of 8, ffn 176, 8 experts top-2,
           vocab 512); batch 4 x seq 64 (its context).
  scaled   Grok-1 with d_model and ffn divided by 8 and its head shape kept: d_model 768, 6 q / 1 kv
           heads of 128 (Grok-1: 48 / 8), ffn 4096, 8 experts top-2, 4 layers, vocab 32768;
           batch 1 x seq 256 on the CPU (batch 4 x seq 1024 on a GPU).

Rows (one optimizer step = batch x seq tokens; the loop of grok_torch.finetune.train):
  forward int8    model(ids) + lm_loss under torch.no_grad (eval mode), the int8 model
  LoRA            LoRA rank 8 (alpha 16) on attn + experts of the int8 model: forward, lm_loss,
                  backward, clip_grad_norm_(1.0), AdamW step, zero_grad
  LoRA + ckpt     the same with model.gradient_checkpointing = True (each layer recomputed in backward)
  forward float   as "forward int8" with float weights (the baseline of "full")
  full            every parameter trained (float weights), same step
Each row: time = median over --steps steps after one warm-up step; tokens/s = batch x seq / time.
Peak memory: the optimizer is created afresh (its state and the gradients are allocated again) and one
step is measured over the loaded model (adapters attached). CPU: every row in a fresh subprocess;
after the timed steps glibc is set to return freed blocks (mallopt / malloc_trim), one step settles,
the optimizer is dropped, the peak RSS is reset (/proc/self/clear_refs) and the increase of peak RSS
(ru_maxrss) over one more step is reported (bench_attention.py's method). GPU:
torch.cuda.max_memory_allocated() - memory_allocated() before that step. "state MiB" counts the
gradients + AdamW moments exactly (tensor sizes), the part that stays between steps.

GPU (only when torch.cuda.is_available()): every row with impl "triton" and impl "torch" (the
reference). What runs where with impl "triton" while training (grok_torch as of this benchmark): the
int8/float attention projections on the Triton GEMM (backward too); the attention core on the Triton
flash kernels, forward (with its row log-sum-exp) and backward (kernels/flash_attention.py); the MoE
on Triton with its backward, expert LoRA adapters included (only adapter dropout > 0 falls back to
the reference, with a warning that the output reports per row).

Grok-1 estimate (``grok1_lora_estimate``; printed with every run): per GPU of 8 x 80 GB, device_map
"experts" (GPU j: layers 8j..8j+7 home, expert j of every layer): weights = grok_torch.plan's
``weight_bytes_per_device`` (int8 + bf16 scales, fp32 embedding / norms / routers); adapters (rank 8,
attn of the home layers + the held expert of every layer, counted from the shapes) in fp32, their
gradients (fp32) and AdamW's two moments (fp32); activations at seq 4096, batch 1, with gradient
checkpointing: the checkpointed residual [B, T, D] fp32 of each home layer + one layer's recomputed
activations (below) + on GPU 0 one loss chunk's logits [min(T, 1024), V] fp32 twice (logits and the
loss's softmax: grok-finetune's --loss-chunk, default 1024, recomputes each chunk in backward) + the
planner's 1.5 GiB reserve. One layer's recomputed activations are the tensors autograd saves in one
layer's forward, counted with torch.autograd.graph.saved_tensors_hooks on a probe layer run here
(Grok-1's attention shapes, d_model and ffn / 8, seq 2048, bf16, the reference kernels, LoRA on attn
+ experts) and scaled to Grok-1 by shape: MoE rows by routed rows per GPU x 8, dequantised
expert-weight copies by matrix size, the rest by tokens (x 8 where the last dim is d_model). The
attention core (--attention, default "triton", what impl "auto" runs on a GPU) is counted from
shapes: the flash kernels' autograd Function saves q, k, v, out (fp32) and one fp32 log-sum-exp per
row, no score tile (an upper bound: q, k, v, out may also be saved by the neighbouring ops); with
"torch" (the blockwise reference) it is the probe's saved score tiles scaled by visited tile area.
It is an ESTIMATE FROM SHAPES, not a measurement on GPUs; the backward's own transient buffers
(gradients of one layer's activations, the flash backward's D = rowsum(dO * O)) are not in it.
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import math
import os
import statistics
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import torch

from grok_torch.config import GrokConfig
from grok_torch.finetune.losses import lm_loss
from grok_torch.finetune.train import TrainConfig
from grok_torch.lora import TARGETS, LoRAConfig, add_lora
from grok_torch.model import Grok, RMSNorm
from grok_torch.moe import Router
from grok_torch.plan import weight_bytes_per_device
from grok_torch.weights import Weight

LOSS_CHUNK = TrainConfig.loss_chunk  # grok-finetune's default --loss-chunk
ROWS = ("forward int8", "LoRA", "LoRA + ckpt", "forward float", "full")
SPEC = {  # weights, what is trained, gradient checkpointing
    "forward int8": ("int8", None, False),
    "LoRA": ("int8", "lora", False),
    "LoRA + ckpt": ("int8", "lora", True),
    "forward float": ("float", None, False),
    "full": ("float", "full", False),
}
BASELINE = {"LoRA": "forward int8", "LoRA + ckpt": "forward int8", "full": "forward float"}
SCALED = dict(d_model=768, num_layers=4, num_q_heads=6, num_kv_heads=1, head_dim=128, widening_factor=8,
              num_experts=8, num_experts_per_tok=2, vocab_size=32768, max_seq_len=8192)
# (config overrides, CPU batch x seq, GPU batch x seq)
CONFIGS = {"tiny": (None, (4, 64), (8, 64)), "scaled": (SCALED, (1, 256), (4, 1024))}
LORA = dict(rank=8, alpha=16.0, targets=("attn", "experts"))
LR = 1e-4


def config(name: str) -> GrokConfig:
    over = CONFIGS[name][0]
    return GrokConfig.from_name("tiny") if over is None else GrokConfig(name=name, **over)


def _attn_helpers():
    """bench_attention's CPU peak-RSS helpers (glibc trim, clear_refs reset) and device description."""
    here = str(Path(__file__).resolve().parent)
    if here not in sys.path:
        sys.path.insert(0, here)
    import bench_attention

    return bench_attention


# ---------------------------------------------------------------------------------------------
# Models and steps
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def make_model(cfg: GrokConfig, weights: str, dtype: torch.dtype, device, impl: str = "auto", seed: int = 0) -> Grok:
    """A random Grok of ``cfg`` built and filled in place on ``device``: int8 weights with bf16 scales
    (the synthetic checkpoint's distribution: |w| ~ 1/sqrt(fan_in)), or float weights in ``dtype``."""
    fmt = "int8" if weights == "int8" else {torch.bfloat16: "bf16", torch.float32: "fp32"}[dtype]
    cfg = cfg.replace(weight_format=fmt)
    with torch.device(device):
        model = Grok(cfg, dtype)
    gen = torch.Generator(device=device).manual_seed(seed)
    for mod in model.modules():
        if isinstance(mod, Weight):
            fan_in = mod.weight.shape[-2]
            if mod.quantized:
                mod.weight.random_(-127, 128, generator=gen)
                mod.scales.uniform_(0.5, 1.5, generator=gen).div_(73.0 * math.sqrt(fan_in))
            else:
                mod.weight.normal_(0.0, 1.0 / math.sqrt(fan_in), generator=gen)
        elif isinstance(mod, RMSNorm):
            mod.weight.normal_(1.0, 0.1, generator=gen)
        elif isinstance(mod, Router):
            mod.weight.normal_(0.0, 1.0 / math.sqrt(cfg.d_model), generator=gen)
    model.embed.weight.normal_(generator=gen)
    model.impl = impl
    return model


def make_batch(cfg: GrokConfig, batch: int, seq: int, device):
    """ids [B, T] (no padding id) and labels = the next token."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, cfg.vocab_size, (batch, seq + 1), generator=g).to(device)
    return ids[:, :-1].contiguous(), ids[:, 1:].contiguous()


def prepare(model: Grok, row: str, ids, labels):
    """(step, reset, trainable params, holder) for a row: step() runs one forward / optimizer step;
    reset() drops the optimizer (None for forward rows) so the next step allocates its state again."""
    _, train, ckpt = SPEC[row]
    if train is None:
        model.eval()

        def forward():
            with torch.no_grad():
                return lm_loss(model(ids), labels)

        return forward, None, [], {}
    if train == "lora":
        params = add_lora(model, LoRAConfig(**LORA))
    else:
        params = list(model.parameters())
        if any(not p.is_floating_point() for p in params):
            raise ValueError("full fine-tuning needs float weights")
        for p in params:
            p.requires_grad_(True)
    model.gradient_checkpointing = ckpt
    model.train()
    holder = {"opt": torch.optim.AdamW(params, lr=LR)}

    def step():
        loss = lm_loss(model(ids), labels)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        holder["opt"].step()
        holder["opt"].zero_grad(set_to_none=True)
        return loss

    def reset():
        holder["opt"] = None  # its state is freed here ...
        for p in params:
            p.grad = None
        holder["opt"] = torch.optim.AdamW(params, lr=LR)  # ... and allocated again by the next step

    return step, reset, params, holder


def state_bytes(params, holder) -> int:
    """Gradients + optimizer state that persist between steps (counted, not measured)."""
    grads = sum(p.numel() * p.element_size() for p in params)
    opt = holder.get("opt")
    moments = sum(t.numel() * t.element_size() for s in (opt.state.values() if opt else ())
                  for k, t in s.items() if torch.is_tensor(t) and k != "step")
    return grads + moments


def _sync(cuda: bool):
    if cuda:
        torch.cuda.synchronize()


def measure(step, reset, steps: int, cuda: bool) -> tuple[float, int]:
    """(median seconds per step after one warm-up step, peak extra bytes of one step over the loaded model)."""
    step()  # warm-up (first step: optimizer state allocated, caches filled)
    _sync(cuda)
    ts = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        _sync(cuda)
        ts.append(time.perf_counter() - t0)
    if not cuda:
        ba = _attn_helpers()
        ba._heap_returns_freed_memory()
        step()  # library caches take back what the trim released
        if reset:
            reset()
        gc.collect()
        ba._heap_returns_freed_memory()
        base = ba._reset_peak_rss()
        step()  # the step whose peak is reported
        return statistics.median(ts), ba._maxrss() - base
    if reset:
        reset()
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    return statistics.median(ts), torch.cuda.max_memory_allocated() - before


def gpu_note(row: str, impl: str) -> str:
    """What runs where while training with impl "triton" (see the module docstring)."""
    if impl != "triton":
        return ""
    if SPEC[row][1] is None:
        return "all Triton (int8 GEMM, flash attention, fused MoE)"
    moe = ("MoE base + expert LoRA: Triton fwd + bwd (adapter dropout: reference)" if SPEC[row][1] == "lora"
           else "MoE: Triton fwd + bwd")
    return f"projections: Triton GEMM; attention core: Triton flash fwd + bwd; {moe}"


def run_row(name: str, row: str, steps: int, *, dtype=torch.bfloat16, device: str = "cpu", impl: str = "auto",
            batch: Optional[int] = None, seq: Optional[int] = None) -> dict:
    """One row in this process."""
    cuda = device.startswith("cuda")
    cfg = config(name)
    B, T = CONFIGS[name][2 if cuda else 1]
    B, T = batch or B, seq or T
    model = make_model(cfg, SPEC[row][0], dtype, device, impl)
    ids, labels = make_batch(cfg, B, T, device)
    step, reset, params, holder = prepare(model, row, ids, labels)
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    kernels = sys.modules.get("grok_torch.kernels")
    if kernels is not None and hasattr(kernels, "_WARNED"):
        kernels._WARNED.clear()  # so this row's fallbacks are reported even if an earlier row warned
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sec, peak = measure(step, reset, steps, cuda)
    notes = [gpu_note(row, impl) if cuda else ""] + sorted({str(w.message).split(" (")[0] for w in caught
                                                               if "reference" in str(w.message)})
    return dict(config=name, row=row, impl=impl, B=B, T=T, ms=sec * 1e3, tok_s=B * T / sec, peak_mb=peak / 2**20,
                model_mb=model_bytes / 2**20, trainable=sum(p.numel() for p in params),
                state_mb=state_bytes(params, holder) / 2**20, note="; ".join(n for n in notes if n))


def run_row_isolated(name: str, row: str, steps: int, threads: int, dtype: str, batch=None, seq=None) -> dict:
    """run_row in a fresh Python process (the CPU peak RSS must not see the other rows)."""
    job = json.dumps(dict(config=name, row=row, steps=steps, threads=threads, dtype=dtype, batch=batch, seq=seq))
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    proc = subprocess.run([sys.executable, __file__, "--child", job], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or [f"exit status {proc.returncode}"]
        print(f"# {name} {row}: {tail[0]}", file=sys.stderr)
        why = "killed (out of memory?)" if proc.returncode < 0 else tail[0][:80]
        return dict(config=name, row=row, impl="torch", B=0, T=0, ms=float("nan"), tok_s=float("nan"),
                    peak_mb=float("nan"), model_mb=float("nan"), trainable=0, state_mb=float("nan"), note=f"error: {why}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def ratios(rows: list[dict]) -> list[dict]:
    """Each training row against the forward of the same weights (and impl), and LoRA against full."""
    by = {(r["config"], r["impl"], r["row"]): r for r in rows}
    out = []
    for r in rows:
        pairs = [(BASELINE.get(r["row"]), "forward")]
        if r["row"] in ("LoRA", "LoRA + ckpt"):
            pairs.append(("full", "full"))
        for base_row, what in pairs:
            b = by.get((r["config"], r["impl"], base_row))
            if b is None or not (math.isfinite(b["ms"]) and math.isfinite(r["ms"])):
                continue
            out.append(dict(config=r["config"], impl=r["impl"], row=r["row"], vs=base_row, time=r["ms"] / b["ms"],
                            mem=r["peak_mb"] / b["peak_mb"] if b["peak_mb"] > 0 else float("nan")))
    return out


# ---------------------------------------------------------------------------------------------
# Grok-1 LoRA on 8 x 80 GB: an estimate from shapes
# ---------------------------------------------------------------------------------------------

PROBE = dict(d_model=768, num_layers=1, num_q_heads=48, num_kv_heads=8, head_dim=128, widening_factor=8,
             num_experts=8, num_experts_per_tok=2, vocab_size=512, max_seq_len=8192)  # ffn 4096 = 32768 / 8
PROBE_SEQ = 2048


def flash_saved_bytes(cfg: GrokConfig, T: int, B: int = 1) -> int:
    """Bytes the Triton attention (flash_attention.FlashAttention) saves for its backward in one
    layer: q and out [B, T, Hq, dh] fp32, k and v [B, T, Hkv, dh] fp32 (no cache while training),
    the row log-sum-exp [B, T, Hq] fp32, q_pos [B, T] int64 and key_valid [B, T] bool."""
    Hq, Hkv, dh = cfg.num_q_heads, cfg.num_kv_heads, cfg.head_dim
    return 4 * B * T * (2 * Hq * dh + 2 * Hkv * dh + Hq) + 8 * B * T + B * T


def visited_tile_area(T: int, Hq: int, B: int = 1) -> int:
    """Query-key pairs the blockwise reference visits in a causal prefill (whole key blocks)."""
    from grok_torch.kernels.attention import attention_blocks

    bq, bk = attention_blocks(B, T, T, Hq)
    return sum((t1 - t0) * min(T, -(-t1 // bk) * bk) for t0 in range(0, T, bq) for t1 in [min(T, t0 + bq)])


@contextmanager
def _tagged(tag: dict, key: str):
    old = tag["where"]
    tag["where"] = key
    try:
        yield
    finally:
        tag["where"] = old


def saved_activation_bytes(cfg: GrokConfig, seq: int, dtype=torch.bfloat16) -> dict:
    """Bytes autograd saves in one layer's forward (LoRA attn+experts, int8, the reference kernels, CPU),
    split into: attention core, MoE expert rows, dequantised expert-weight copies, the rest (per token,
    by last dim: d_model or other). Storages counted once; parameters excluded."""
    import grok_torch.model as gm

    model = make_model(cfg, "int8", dtype, "cpu", "torch")
    add_lora(model, LoRAConfig(**LORA))
    model.train()
    layer = model.layers[0]
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    D, F = cfg.d_model, cfg.ffn_size
    tag, seen = {"where": "rest"}, {}
    out = {"attention": 0, "moe_rows": 0, "weight_copies": 0, "rest_d_model": 0, "rest_other": 0}

    def pack(t):
        st = t.untyped_storage()
        ptr = st.data_ptr()
        if ptr in params or ptr in seen:
            return t
        seen[ptr] = True
        nbytes = st.nbytes()
        if tuple(t.shape[-2:]) in ((D, F), (F, D)):
            out["weight_copies"] += nbytes
        elif tag["where"] == "attention":
            out["attention"] += nbytes
        elif tag["where"] == "moe":
            out["moe_rows"] += nbytes
        else:
            out["rest_d_model" if t.shape and t.shape[-1] == D else "rest_other"] += nbytes
        return t

    inner_attention, moe_forward = gm.attention, layer.moe.forward

    def attention(*a, **k):
        with _tagged(tag, "attention"):
            return inner_attention(*a, **k)

    def moe(*a, **k):
        with _tagged(tag, "moe"):
            return moe_forward(*a, **k)

    g = torch.Generator().manual_seed(2)
    h = torch.randn(1, seq, D, generator=g, requires_grad=True)
    pos = torch.arange(seq).expand(1, seq)
    valid = torch.ones(1, seq, dtype=torch.bool)
    gm.attention, layer.moe.forward = attention, moe
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            layer(h, pos, valid, None, 0, None, 0)
    finally:
        gm.attention = inner_attention
        del layer.moe.forward
    return out


def adapter_params_per_device(cfg: GrokConfig, gpus: int, rank: int) -> list[int]:
    """LoRA parameters (attn + experts, rank r: r x (in + out) per matrix, per expert) on each GPU of
    the "experts" placement: the home layers' attention adapters, the held experts' adapters of every layer."""
    D, F, L, E = cfg.d_model, cfg.ffn_size, cfg.num_layers, cfg.num_experts
    attn = rank * ((D + cfg.q_size) + 2 * (D + cfg.kv_size) + (cfg.q_size + D))
    expert = rank * (2 * (D + F) + (F + D))
    assert TARGETS["attn"] == ("wq", "wk", "wv", "wo") and TARGETS["experts"] == ("w1", "w3", "w2")
    home = [sum(1 for i in range(L) if i * gpus // L == j) for j in range(gpus)]
    return [home[j] * attn + L * (E // gpus) * expert for j in range(gpus)]


def grok1_lora_estimate(gpus: int = 8, gpu_mem: float = 80e9, seq: int = 4096, batch: int = 1, rank: int = 8,
                        reserve: float = 1.5 * 2**30, probe: Optional[dict] = None, attention: str = "triton") -> dict:
    """Per-GPU memory of LoRA fine-tuning of Grok-1 (int8, split "experts"); see the module docstring."""
    cfg = GrokConfig.from_name("grok-1")
    pc = GrokConfig(name="probe", **PROBE)
    probe = probe or saved_activation_bytes(pc, PROBE_SEQ)
    D, V, L, E, k = cfg.d_model, cfg.vocab_size, cfg.num_layers, cfg.num_experts, cfg.num_experts_per_tok
    T, Ts = batch * seq, PROBE_SEQ
    d_ratio = D / pc.d_model
    assert cfg.ffn_size / pc.ffn_size == d_ratio and (cfg.num_q_heads, cfg.head_dim) == (pc.num_q_heads, pc.head_dim)
    rows_g, rows_s = T * k / E * (E // gpus), Ts * pc.num_experts_per_tok  # routed rows per GPU (uniform routing)
    if attention == "triton":  # flash kernels: inputs, output and row statistics only
        attn = ("attention core (Triton: q, k, v, out, lse)", flash_saved_bytes(cfg, seq, batch))
    elif attention == "torch":  # the blockwise reference: its score tiles, scaled by visited area
        attn = ("attention core (reference: score tiles)", probe["attention"] * visited_tile_area(seq, cfg.num_q_heads, batch)
                / visited_tile_area(Ts, pc.num_q_heads))
    else:
        raise ValueError(f"attention must be 'triton' or 'torch', got {attention!r}")
    layer = {
        attn[0]: attn[1],
        "MoE rows": probe["moe_rows"] * rows_g / rows_s * d_ratio,
        "dequantised expert copies": probe["weight_copies"] * (cfg.d_model * cfg.ffn_size) / (pc.d_model * pc.ffn_size)
        * (E // gpus) / pc.num_experts,
        "rest (norms, projections, LoRA inputs)": (probe["rest_d_model"] * d_ratio + probe["rest_other"]) * T / Ts,
    }
    weights = weight_bytes_per_device(cfg, gpus, "experts", "int8")
    adapters = adapter_params_per_device(cfg, gpus, rank)
    devices = []
    for j in range(gpus):
        home = sum(1 for i in range(L) if i * gpus // L == j)
        terms = {
            "weights (int8 + scales, plan.py)": weights[j],
            "adapters fp32": adapters[j] * 4,
            "adapter gradients fp32": adapters[j] * 4,
            "AdamW moments 2 x fp32": adapters[j] * 8,
            f"checkpointed residuals ({home} layers x [B,T,D] fp32)": home * T * D * 4,
            "one layer recomputed": sum(layer.values()),
            f"loss-chunk logits [{min(T, LOSS_CHUNK)},V] fp32 x 2": 2 * min(T, LOSS_CHUNK) * V * 4 if j == 0 else 0,
            "reserve (CUDA context, allocator)": reserve,
        }
        devices.append(dict(gpu=j, terms=terms, total=sum(terms.values())))
    worst = max(devices, key=lambda d: d["total"])
    fits = worst["total"] <= gpu_mem
    verdict = (f"{'FITS' if fits else 'DOES NOT FIT'}: the fullest GPU ({worst['gpu']}) needs {worst['total'] / 1e9:.1f} "
               f"of {gpu_mem / 1e9:.0f} GB ({(gpu_mem - worst['total']) / 1e9:+.1f} GB left)")
    return dict(gpus=gpus, gpu_mem=gpu_mem, seq=seq, batch=batch, rank=rank, layer=layer, probe=probe, attention=attention,
                devices=devices, fits=fits, verdict=verdict, adapters_total=sum(adapters))


def estimate_markdown(est: dict) -> str:
    d0, d1 = est["devices"][0], est["devices"][1]
    gb = lambda b: f"{b / 1e9:.2f}"  # noqa: E731
    lines = [f"**Estimate from shapes, not a measurement**: LoRA rank {est['rank']} (attn + experts) on the real "
             f"Grok-1 (int8), {est['gpus']} x {est['gpu_mem'] / 1e9:.0f} GB, device_map \"experts\", seq {est['seq']}, "
             f"batch {est['batch']}, gradient checkpointing, attention core on "
             f"{'the Triton flash kernels' if est['attention'] == 'triton' else 'the blockwise reference'}. "
             f"Adapter parameters in all: {est['adapters_total']:,} "
             f"({est['adapters_total'] * 4 / 1e9:.2f} GB fp32). GB = 1e9 bytes.", "",
             "| per GPU | GPU 0 (GB) | GPUs 1-7 (GB) |", "|---|---|---|"]
    for (name, a), b in zip(d0["terms"].items(), d1["terms"].values()):
        lines.append(f"| {name} | {gb(a)} | {gb(b)} |")
    lines.append(f"| **total** | **{gb(d0['total'])}** | **{gb(d1['total'])}** |")
    lines += ["", "One layer recomputed in backward (saved tensors of a probe layer at seq "
              f"{PROBE_SEQ}, scaled to Grok-1; GB): " + ", ".join(f"{k} {gb(v)}" for k, v in est["layer"].items()),
              "", est["verdict"]]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------


def _num(v, fmt) -> str:
    return "—" if isinstance(v, float) and not math.isfinite(v) else format(v, fmt)


def _fmt_row(r: dict) -> str:
    return (f"{r['config']:>6} {r['impl']:>6} {r['row']:>13}: {_num(r['ms'], '9.1f')} ms/step "
            f"{_num(r['tok_s'], '9.1f')} tok/s  peak +{_num(r['peak_mb'], '.0f')} MiB  state {_num(r['state_mb'], '.0f')} MiB"
            f"  {r['note']}")


def markdown(rows: list[dict], est: dict, *, device: str, threads: Optional[int], command: str, load: str = "",
             dtype: str = "bf16") -> str:
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).resolve().parent).stdout.strip()
    except OSError:
        commit = ""
    cuda = not device.startswith("CPU")
    lines = [f"**{datetime.date.today().isoformat()}, {device}, torch {torch.__version__}"
             + (f", {threads} threads" if threads else "") + f", commit {commit or 'unknown'}.**",
             f"Command: `{command}`" + (f". Load average (1 min) before / after: {load}." if load else ""), ""]
    if rows:
        lines += [f"One optimizer step (batch x seq tokens), {dtype} activations; peak = extra memory of one step over the "
                  "loaded model (gradients and optimizer state allocated in it); state = gradients + AdamW moments (counted):",
                  "", "| config | impl | row | batch x seq | ms/step | tokens/s | peak MiB | state MiB | model MiB | trainable | note |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            lines.append("| " + " | ".join([r["config"], r["impl"], r["row"], f"{r['B']} x {r['T']}", _num(r["ms"], ".1f"),
                                            _num(r["tok_s"], ".1f"), _num(r["peak_mb"], ".0f"), _num(r["state_mb"], ".0f"),
                                            _num(r["model_mb"], ".0f"), f"{r['trainable']:,}", r["note"]]) + " |")
        rat = ratios(rows)
        if rat:
            lines += ["", "| config | impl | row | vs | time ratio | tokens/s ratio | peak memory ratio |", "|---|---|---|---|---|---|---|"]
            lines += [f"| {r['config']} | {r['impl']} | {r['row']} | {r['vs']} | {r['time']:.2f} | {1 / r['time']:.2f} | "
                      f"{_num(r['mem'], '.2f')} |" for r in rat]
        if not cuda:
            lines += ["", "Triton backward vs the reference: GPU only (`bash scripts/gpu_check.sh`)."]
    lines += ["", estimate_markdown(est)]
    return "\n".join(lines)


def main(argv=None) -> int:
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", default="tiny,scaled", help=f"comma-separated, from {','.join(CONFIGS)}")
    p.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated, from {','.join(ROWS)}")
    p.add_argument("--threads", type=int, default=min(8, os.cpu_count() or 1), help="torch.set_num_threads (CPU)")
    p.add_argument("--steps", type=int, default=None, help="timed steps after one warm-up (default 3 CPU, 10 GPU)")
    p.add_argument("--batch", type=int, default=None, help="override the config's batch")
    p.add_argument("--seq", type=int, default=None, help="override the config's sequence length")
    p.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16", help="activation dtype (default bf16)")
    p.add_argument("--impls", default="triton,torch" if cuda else "torch", help="GPU: triton,torch")
    p.add_argument("--plan-only", action="store_true", help="only the Grok-1 estimate")
    p.add_argument("--attention", choices=("triton", "torch"), default="triton",
                   help="the estimate's attention core: Triton flash fwd + bwd (default, the GPU path) or the reference")
    p.add_argument("--md", default=None, help="write a dated markdown section for BENCHMARKS.md here")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    dtypes = {"bf16": torch.bfloat16, "fp32": torch.float32}
    if a.child:  # one isolated CPU row (run_row_isolated)
        job = json.loads(a.child)
        torch.set_num_threads(job["threads"])
        r = run_row(job["config"], job["row"], job["steps"], dtype=dtypes[job["dtype"]], impl="torch",
                    batch=job["batch"], seq=job["seq"])
        print(json.dumps(r))
        return 0
    names = [c for c in a.configs.split(",") if c]
    rows_wanted = [r for r in a.rows.split(",") if r]
    impls = [i for i in a.impls.split(",") if i]
    bad = sorted(set(names) - set(CONFIGS)) + sorted(set(rows_wanted) - set(ROWS)) + sorted(set(impls) - {"torch", "triton"})
    if bad:
        p.error(f"unknown config / row / impl {bad}")
    if "triton" in impls and not cuda:
        p.error("impl triton needs a GPU")
    steps = a.steps or (10 if cuda else 3)
    ba = _attn_helpers()
    device = ba.device_description(cuda)
    threads = None if cuda else a.threads
    torch.set_num_threads(a.threads) if not cuda else None
    command = "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]) if argv is None else "main()"
    print(f"# {device}, torch {torch.__version__}" + (f", {threads} threads" if threads else ""), flush=True)
    load0 = os.getloadavg()[0]
    rows = []
    for name in ([] if a.plan_only else names):
        for impl in impls:
            for row in rows_wanted:
                if cuda:
                    try:
                        r = run_row(name, row, steps, dtype=dtypes[a.dtype], device="cuda", impl=impl,
                                    batch=a.batch, seq=a.seq)
                    except torch.cuda.OutOfMemoryError as exc:
                        r = dict(config=name, row=row, impl=impl, B=0, T=0, ms=float("nan"), tok_s=float("nan"),
                                 peak_mb=float("nan"), model_mb=float("nan"), trainable=0, state_mb=float("nan"),
                                 note=f"out of memory: {str(exc).splitlines()[0][:60]}")
                    gc.collect()
                    torch.cuda.empty_cache()
                else:
                    r = run_row_isolated(name, row, steps, a.threads, a.dtype, a.batch, a.seq)
                rows.append(r)
                print(_fmt_row(r), flush=True)
    for r in ratios(rows):
        print(f"{r['config']:>6} {r['impl']:>6} {r['row']:>13} / {r['vs']}: time {r['time']:.2f}, "
              f"peak memory {_num(r['mem'], '.2f')}")
    est = grok1_lora_estimate(attention=a.attention)
    print(estimate_markdown(est))
    load = f"{load0:.1f} / {os.getloadavg()[0]:.1f}"
    text = markdown(rows, est, device=device, threads=threads, command=command, load=load, dtype=a.dtype)
    if a.md:
        Path(a.md).write_text(text)
        print(f"# wrote {a.md}")
    failed = [r for r in rows if r["note"].startswith(("error", "out of memory"))]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
