"""Attention sublayer benchmark (issue #9): prefill time and peak memory, new vs old in the same run;
decode ms/step eager vs CUDA graph when a GPU is present.

    python benchmarks/bench_attention.py                                  # CPU default: T 512, 2048 (minutes)
    python benchmarks/bench_attention.py --tokens 512,2048,8192 --threads 2 --md attn.md
    python benchmarks/bench_attention.py --allow-big                      # CPU: also a dense baseline > 4 GiB of scores
    python benchmarks/bench_attention.py --md "$OUT/bench_attention.md"   # GPU: T 512, 2048, 8192 + decode (gpu_check.sh)

One layer's attention sublayer (projections, RoPE, attention, o_proj) at Grok-1 shapes: d_model 6144,
48 q / 8 kv heads of 128, batch 1, random int8 weights with the release's scale groups (G=1 for
wq/wk/wv, G=8 for wo; bf16 scales), x fp32 (the pre-norm output), every token real, causal.

Rows (impl):
  new-fp32, new-bf16  grok_torch.model.Attention as it is now, precision fp32 / bf16: Weight.forward
                      (CUDA: the int8 GEMM, dequantised in registers; CPU: dequantise, then multiply) and
                      grok_torch.kernels.attention (CPU: impl "torch", the blockwise reference; CUDA: impl
                      "triton", flash attention), called as Grok.forward calls it for a prompt (no cache,
                      causal_offset 0). new-bf16 runs on CUDA only by default.
  old-chunked         the sublayer of commit 2690ac9, reproduced below (``old_forward``): ``x @ w.dequant(fp32)``
                      per projection (an fp32 copy of each matrix per call), dense masked fp32 scores over
                      query chunks of 1024 rows ([B, Hkv, G, 1024, S] and its capped / masked / softmaxed
                      copies); the [B, T, S] boolean mask is built beforehand, as Grok.forward built it once
                      for all layers.
  old-dense           the same in one chunk: the full [B, Hkv, G, T, S] fp32 scores (the formula before
                      query chunking; = old-chunked when T <= 1024). Skipped, with its score bytes still
                      reported, where one score tensor exceeds 4 GiB on the CPU (unless --allow-big) or
                      three of them would not fit in the GPU's free memory.

Measured: ms = median over --reps calls after one warm-up call. Peak extra memory: on the CPU each
configuration runs in a fresh subprocess; after the timed calls, glibc is set to return every freed
block >= 64 KiB to the system (mallopt, malloc_trim: otherwise RSS keeps whatever the allocator
retained), one call settles, the peak RSS is reset (/proc/self/clear_refs) and the increase of peak
RSS (getrusage ru_maxrss) over one more call is reported: the memory one prefill needs beyond the
weights and inputs. On CUDA, torch.cuda.max_memory_allocated() minus memory_allocated() before the
calls (the warm-up included). CPU timings on a shared machine are only as good as its quiet: the
load average before and after the run is recorded. "scores MB":
one fp32 score tensor of the implementation (computed; 0 for the Triton kernel, whose tiles stay on
chip). TF/s: useful flops (projections, and the two attention products over the T(T+1)/2 visible
query-key pairs) / time; on a known GPU %peak of its nominal dense rate (H100/H200 SXM: bf16 989 TF/s,
fp32 67 TF/s; the old path and new-fp32 multiply in true fp32).

Decode (CUDA only): one sublayer step at position S-1 of a bf16 KVCache of S = --decode-len (8192),
the static-shape path of ``Grok.forward(static_shapes=True)``: ``Attention.forward(x, pos, key_valid,
cache, 0, None)`` visits the whole cache with a mask and reads nothing back to the host; eager vs
replayed from a torch.cuda.CUDAGraph, plus the old sublayer eager (it reads ``cache[:, :S]`` as fp32).
Roofline: bytes that must be read (int8 weights + scales + the bf16 K and V cache) / HBM bandwidth,
taken from the device name (H200 4.8 TB/s, H100 SXM 3.35 TB/s, H100 NVL 3.9, H100 PCIe 2.0; others: none).
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import resource
import subprocess
import sys
from pathlib import Path
from typing import Optional

import torch

from grok_torch.config import GrokConfig
from grok_torch.kernels.attention import MASK_VALUE, attention_blocks
from grok_torch.model import Attention, KVCache, apply_rope

IMPLS = ("new-fp32", "new-bf16", "old-chunked", "old-dense")
OLD_QUERY_CHUNK = 1024  # Attention.query_chunk at commit 2690ac9
CPU_DENSE_LIMIT = 4 << 30  # bytes of one score tensor above which old-dense needs --allow-big on the CPU
HBM_TBS = (("H200", 4.8), ("H100 PCIe", 2.0), ("H100 NVL", 3.9), ("H100", 3.35))  # nominal HBM bandwidth, first match wins
PEAK_TFS = {"bf16": 989.0, "fp32": 67.0}  # H100 / H200 SXM nominal dense rates


def grok1_attention(**overrides) -> GrokConfig:
    """Grok-1's attention shapes (GrokConfig defaults) with one layer (the KVCache holds one)."""
    return GrokConfig(name="grok-1", num_layers=1, **overrides)


# ---------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def make_layer(cfg: GrokConfig, device) -> Attention:
    """A random int8 attention sublayer, allocated and filled in place on ``device`` (no temporaries)."""
    with torch.device(device):
        attn = Attention(cfg, torch.bfloat16, quantized=True)
    gen = torch.Generator(device=device).manual_seed(0)
    for w in (attn.wq, attn.wk, attn.wv, attn.wo):
        w.weight.random_(-127, 128, generator=gen)
        w.scales.uniform_(0.5, 1.5, generator=gen).div_(127 * math.sqrt(w.weight.shape[0]))
    return attn


def make_inputs(cfg: GrokConfig, T: int, device, old: bool):
    """x [1, T, D] fp32, positions, key_valid and (old path only) the [1, T, T] mask Grok.forward built."""
    gen = torch.Generator(device=device).manual_seed(T)
    x = torch.randn(1, T, cfg.d_model, generator=gen, device=device)
    pos = torch.arange(T, device=device).expand(1, T)
    key_valid = torch.ones(1, T, dtype=torch.bool, device=device)
    mask = key_valid[:, None, :] & (torch.arange(T, device=device) <= pos[:, :, None]) if old else None
    return x, pos, key_valid, mask


# ---------------------------------------------------------------------------------------------
# The previous implementation (commit 2690ac9, grok_torch/model.py Attention.forward / _attend)
# ---------------------------------------------------------------------------------------------


def old_forward(attn: Attention, x, pos_BT, mask_BTS, cache: Optional[KVCache] = None, layer: int = 0,
                query_chunk: Optional[int] = OLD_QUERY_CHUNK) -> torch.Tensor:
    """2690ac9's sublayer with this layer's weights; ``query_chunk=None``: one chunk (fully dense)."""
    cfg = attn.cfg
    B, T, _ = x.shape
    Hq, Hkv, dh = cfg.num_q_heads, cfg.num_kv_heads, cfg.head_dim
    f32 = torch.float32
    q = apply_rope((x @ attn.wq.dequant(f32)).view(B, T, Hq, dh), pos_BT, cfg.rope_base)
    k = apply_rope((x @ attn.wk.dequant(f32)).view(B, T, Hkv, dh), pos_BT, cfg.rope_base)
    v = (x @ attn.wv.dequant(f32)).view(B, T, Hkv, dh)
    if cache is not None:
        rows = torch.arange(B, device=x.device)[:, None]
        cache.k[layer][rows, pos_BT] = k.to(cache.dtype)
        cache.v[layer][rows, pos_BT] = v.to(cache.dtype)
        S = mask_BTS.shape[-1]  # only the filled prefix of the cache takes part
        k, v = cache.k[layer][:, :S].float(), cache.v[layer][:, :S].float()
    q = q.view(B, T, Hkv, Hq // Hkv, dh)
    chunk = query_chunk or T
    o = torch.cat([_old_attend(cfg, q[:, t:t + chunk], k, v, mask_BTS[:, t:t + chunk])
                   for t in range(0, T, chunk)], dim=1)
    return o.reshape(B, T, Hq * dh) @ attn.wo.dequant(f32)


def _old_attend(cfg, q, k, v, mask_BTS):
    s = torch.einsum("btkgd,bskd->bkgts", q, k) * cfg.attn_output_multiplier
    s = cfg.attn_logit_cap * torch.tanh(s / cfg.attn_logit_cap)
    s = s.masked_fill(~mask_BTS[:, None, None], MASK_VALUE)
    return torch.einsum("bkgts,bskd->btkgd", torch.softmax(s, dim=-1), v)


# ---------------------------------------------------------------------------------------------
# What each row computes
# ---------------------------------------------------------------------------------------------


def prefill_fn(attn: Attention, impl: str, x, pos, key_valid, mask):
    """A zero-argument callable for one prefill of the sublayer."""
    if impl.startswith("new-"):
        attn.precision = impl.split("-")[1]
        attn.impl = "triton" if x.is_cuda else "torch"
        return lambda: attn(x, pos, key_valid, None, 0, 0)
    chunk = OLD_QUERY_CHUNK if impl == "old-chunked" else None
    return lambda: old_forward(attn, x, pos, mask, query_chunk=chunk)


def score_bytes(cfg: GrokConfig, T: int, S: int, impl: str, cuda: bool) -> int:
    """Bytes of one fp32 score tensor (the attention workspace unit) of ``impl``."""
    Hq = cfg.num_q_heads
    if impl.startswith("new-"):
        if cuda:
            return 0  # flash attention: tiles in registers / shared memory
        bq, bk = attention_blocks(1, T, S, Hq)
        return Hq * bq * bk * 4
    rows = min(T, OLD_QUERY_CHUNK) if impl == "old-chunked" else T
    return Hq * rows * S * 4


def useful_flops(cfg: GrokConfig, T: int) -> float:
    D, Hq, Hkv, dh = cfg.d_model, cfg.num_q_heads, cfg.num_kv_heads, cfg.head_dim
    proj = 2 * T * D * (Hq + 2 * Hkv) * dh + 2 * T * Hq * dh * D
    return proj + 2 * 2 * Hq * dh * T * (T + 1) / 2


def weight_bytes(attn: Attention) -> int:
    return sum(w.weight.numel() * w.weight.element_size() + w.scales.numel() * w.scales.element_size()
               for w in (attn.wq, attn.wk, attn.wv, attn.wo))


# ---------------------------------------------------------------------------------------------
# Timing and peak memory
# ---------------------------------------------------------------------------------------------


def _maxrss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _reset_peak_rss() -> int:
    """Reset the peak RSS to the current RSS where Linux allows it; returns the (new) peak in bytes."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass  # the peak then includes the setup's: the reported increase is a lower bound
    return _maxrss()


def _heap_returns_freed_memory() -> None:
    """From now on glibc gives every block >= 64 KiB back to the system when freed (and gives back
    what it kept so far), so RSS follows the live tensors instead of what the allocator retains."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-1, 0)  # M_TRIM_THRESHOLD
        libc.mallopt(-3, 1 << 16)  # M_MMAP_THRESHOLD (fixed: no dynamic raise up to 32 MiB)
        libc.malloc_trim(0)
    except (OSError, AttributeError):
        pass  # not glibc: the peak may include retained heap


def _bench_helpers():
    """bench_moe's timers (CPU wall clock; CUDA events, optionally replaying a captured graph)."""
    here = str(Path(__file__).resolve().parent)
    if here not in sys.path:
        sys.path.insert(0, here)
    import bench_moe

    return bench_moe.time_cpu, bench_moe.time_cuda


def measure(fn, reps: int, cuda: bool, graph: bool = False) -> tuple[float, int]:
    """(median ms after a warm-up, peak extra bytes over what was allocated before).

    CPU: the timed calls run with the default allocator settings; then glibc is told to return freed
    blocks (so RSS follows the live tensors), one call settles, the peak RSS is reset, and the peak
    increase over one more call is reported."""
    time_cpu, time_cuda = _bench_helpers()
    if not cuda:
        us, _ = time_cpu(fn, reps)  # timed with the default allocator settings
        _heap_returns_freed_memory()
        fn()  # library caches take back what the trim released
        base = _reset_peak_rss()
        fn()  # the call whose peak is reported
        return us / 1e3, _maxrss() - base
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    us, _ = time_cuda(fn, reps, graph=graph)
    return us / 1e3, torch.cuda.max_memory_allocated() - before


def prefill_row(cfg: GrokConfig, T: int, impl: str, reps: int, device: str = "cpu") -> dict:
    """One configuration, in this process: time and peak extra memory of one prefill."""
    cuda = device.startswith("cuda")
    attn = make_layer(cfg, device)
    x, pos, key_valid, mask = make_inputs(cfg, T, device, old=impl.startswith("old"))
    with torch.inference_mode():
        ms, peak = measure(prefill_fn(attn, impl, x, pos, key_valid, mask), reps, cuda)
    return dict(T=T, impl=impl, ms=ms, peak_mb=peak / 2**20, note="")


def prefill_row_isolated(cfg_overrides: dict, T: int, impl: str, reps: int, threads: int) -> dict:
    """prefill_row in a fresh Python process (CPU peak RSS must not see the other configurations)."""
    job = json.dumps(dict(cfg=cfg_overrides, T=T, impl=impl, reps=reps, threads=threads))
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    proc = subprocess.run([sys.executable, __file__, "--child", job], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or [f"exit status {proc.returncode}"]
        print(f"# {impl} T={T}: {tail[0]}", file=sys.stderr)
        why = "killed (out of memory?)" if proc.returncode < 0 else tail[0][:80]
        return dict(T=T, impl=impl, ms=float("nan"), peak_mb=float("nan"), note=f"error: {why}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def skip_reason(cfg: GrokConfig, T: int, impl: str, cuda: bool, allow_big: bool) -> Optional[str]:
    if impl != "old-dense":
        return None
    nbytes = score_bytes(cfg, T, T, impl, cuda)
    if cuda:
        free = torch.cuda.mem_get_info()[0]
        if 3 * nbytes > free:
            return f"not run: 3 x {nbytes / 2**30:.1f} GiB scores > {free / 2**30:.0f} GiB free"
    elif nbytes > CPU_DENSE_LIMIT and not allow_big:
        return f"not run (--allow-big): one score tensor is {nbytes / 2**30:.1f} GiB, several live at once"
    return None


def prefill_rows(cfg_overrides: dict, tokens, impls, reps: int, *, threads: int = 1, isolate: bool = True,
                 allow_big: bool = False, device: str = "cpu") -> list[dict]:
    cfg = grok1_attention(**cfg_overrides)
    cuda = device.startswith("cuda")
    rows = []
    for T in tokens:
        for impl in impls:
            reason = skip_reason(cfg, T, impl, cuda, allow_big)
            if reason:
                row = dict(T=T, impl=impl, ms=float("nan"), peak_mb=float("nan"), note=reason)
            elif cuda:
                try:
                    row = prefill_row(cfg, T, impl, reps, device)
                except torch.cuda.OutOfMemoryError as exc:
                    row = dict(T=T, impl=impl, ms=float("nan"), peak_mb=float("nan"),
                               note=f"out of memory: {str(exc).splitlines()[0][:60]}")
                torch.cuda.empty_cache()
            elif isolate:
                row = prefill_row_isolated(cfg_overrides, T, impl, reps, threads)
            else:
                row = prefill_row(cfg, T, impl, reps, device)
            row["scores_mb"] = score_bytes(cfg, T, T, impl, cuda) / 2**20
            row["tfs"] = useful_flops(cfg, T) / (row["ms"] * 1e-3) / 1e12
            rows.append(row)
            print(_fmt_row(row), flush=True)
    return rows


def ratio_rows(rows: list[dict]) -> list[dict]:
    """new / old, time and peak memory, for every (T, new impl, old impl) measured."""
    out = []
    for new in (r for r in rows if r["impl"].startswith("new-")):
        for old in (r for r in rows if r["impl"].startswith("old-") and r["T"] == new["T"]):
            if math.isfinite(old["ms"]) and math.isfinite(new["ms"]):
                out.append(dict(T=new["T"], new=new["impl"], old=old["impl"], time=new["ms"] / old["ms"],
                                mem=new["peak_mb"] / old["peak_mb"] if old["peak_mb"] > 0 else float("nan")))
    return out


# ---------------------------------------------------------------------------------------------
# Decode (CUDA)
# ---------------------------------------------------------------------------------------------


def hbm_bandwidth(name: str) -> tuple[float, str]:
    """Nominal HBM bandwidth (B/s) from the device name, and the name matched ('' when unknown)."""
    for key, tbs in HBM_TBS:
        if key in name:
            return tbs * 1e12, f"{key} {tbs} TB/s"
    return float("nan"), ""


def decode_rows(cfg: GrokConfig, S: int, reps: int, precisions=("fp32", "bf16")) -> list[dict]:
    """One sublayer decode step at position S-1 of a full bf16 cache: eager vs CUDA graph, and old eager."""
    dev = "cuda"
    attn = make_layer(cfg, dev)
    cache = KVCache(cfg, 1, S, torch.bfloat16, dev)
    gen = torch.Generator(device=dev).manual_seed(1)
    cache.k[0].normal_(generator=gen)
    cache.v[0].normal_(generator=gen)
    cache.key_valid.fill_(True)
    cache.pos.fill_(S - 1)  # the last slot: every key is visible (the kernel bounds its loop by position)
    x = torch.randn(1, 1, cfg.d_model, generator=gen, device=dev)
    bw, bw_name = hbm_bandwidth(torch.cuda.get_device_name())
    nbytes = weight_bytes(attn) + 2 * cache.k[0].numel() * cache.k[0].element_size()

    def step():
        pos = cache.pos[:, None] + torch.arange(1, device=dev)
        return attn(x, pos, cache.key_valid, cache, 0, None)

    pos0 = cache.pos[:, None].clone()
    mask = cache.key_valid[:, None, :] & (torch.arange(S, device=dev) <= pos0[:, :, None])
    rows = []
    with torch.inference_mode():
        for prec in precisions:
            attn.precision, attn.impl = prec, "triton"
            for graph in (False, True):
                ms, peak = measure(step, reps, cuda=True, graph=graph)
                rows.append(dict(S=S, impl=f"new-{prec}", mode="graph" if graph else "eager", ms=ms, peak_mb=peak / 2**20))
        ms, peak = measure(lambda: old_forward(attn, x, pos0, mask, cache, 0), reps, cuda=True)
        rows.append(dict(S=S, impl="old-chunked", mode="eager", ms=ms, peak_mb=peak / 2**20))
    for r in rows:
        r["roof_ms"] = nbytes / bw * 1e3
        r["pct_roof"] = 100 * r["roof_ms"] / r["ms"]
        r["bytes_mb"], r["bw"] = nbytes / 2**20, bw_name or "unknown device: no roofline"
        print(f"decode S={S} {r['impl']:>11} {r['mode']:>5}: {r['ms']:.3f} ms/step, {r['pct_roof']:.0f} % of roofline "
              f"({r['bytes_mb']:.0f} MiB at {r['bw']})", flush=True)
    return rows


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------


def _num(v, fmt=".4g") -> str:
    return "—" if isinstance(v, float) and not math.isfinite(v) else format(v, fmt)


def _fmt_row(r: dict) -> str:
    return (f"T={r['T']:>5} {r['impl']:>11}: {_num(r['ms'], '.1f'):>9} ms  peak +{_num(r['peak_mb'], '.0f'):>6} MiB  "
            f"scores {r['scores_mb']:.0f} MiB  {_num(r['tfs'], '.3g')} TF/s  {r['note']}")


def device_description(cuda: bool) -> str:
    if cuda:
        return torch.cuda.get_device_name()
    model = ""
    try:
        model = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
        mem = next(int(l.split()[1]) for l in open("/proc/meminfo") if l.startswith("MemTotal")) / 2**20
        return f"CPU {model}, {os.cpu_count()} cores, {mem:.0f} GiB"
    except (OSError, StopIteration):
        return f"CPU {model or 'unknown'}, {os.cpu_count()} cores"


def markdown(prefill: list[dict], decode: list[dict], *, device: str, threads: Optional[int], command: str,
             load: str = "") -> str:
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).resolve().parent).stdout.strip()
    except OSError:
        commit = ""
    cuda = not device.startswith("CPU")
    peak = {"old-chunked": "fp32", "old-dense": "fp32", "new-fp32": "fp32", "new-bf16": "bf16"}
    nominal = cuda and any(k in device for k in ("H100", "H200")) and "PCIe" not in device
    lines = [
        f"**{datetime.date.today().isoformat()}, {device}, torch {torch.__version__}"
        + (f", {threads} threads" if threads else "") + f", commit {commit or 'unknown'}.**",
        f"Command: `{command}`" + (f". Load average (1 min) before / after: {load}." if load else ""),
        "",
        "Prefill, one attention sublayer, batch 1 (peak = extra memory over weights and inputs):",
        "",
        "| T | impl | ms | TF/s | " + ("%peak | " if nominal else "") + "peak MiB | one score tensor MiB | note |",
        "|---|---|---|---|" + ("---|" if nominal else "") + "---|---|---|",
    ]
    for r in prefill:
        pct = [_num(100 * r["tfs"] / PEAK_TFS[peak[r["impl"]]], ".3g")] if nominal else []
        lines.append("| " + " | ".join([str(r["T"]), r["impl"], _num(r["ms"], ".1f"), _num(r["tfs"], ".3g"), *pct,
                                        _num(r["peak_mb"], ".0f"), f"{r['scores_mb']:.0f}", r["note"]]) + " |")
    ratios = ratio_rows(prefill)
    if ratios:
        lines += ["", "| T | new | old | time new/old | peak memory new/old |", "|---|---|---|---|---|"]
        lines += [f"| {r['T']} | {r['new']} | {r['old']} | {r['time']:.2f} | {_num(r['mem'], '.3f')} |" for r in ratios]
    if decode:
        lines += ["", f"Decode, one sublayer step at position S-1 of a full bf16 cache ({decode[0]['bytes_mb']:.0f} MiB "
                  f"to read: int8 weights + scales + K/V; roofline at {decode[0]['bw']}):", "",
                  "| S | impl | mode | ms/step | roofline ms | % of roofline |", "|---|---|---|---|---|---|"]
        lines += [f"| {r['S']} | {r['impl']} | {r['mode']} | {r['ms']:.3f} | {_num(r['roof_ms'], '.3f')} | "
                  f"{_num(r['pct_roof'], '.0f')} |" for r in decode]
        by = {(r["impl"], r["mode"]): r["ms"] for r in decode}
        for impl in dict.fromkeys(r["impl"] for r in decode):
            if (impl, "graph") in by:
                lines.append(f"\n{impl}: graph / eager = {by[(impl, 'graph')] / by[(impl, 'eager')]:.2f}")
    elif not cuda:
        lines += ["", "Decode eager vs CUDA graph: GPU only (`bash scripts/gpu_check.sh`)."]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", default="512,2048,8192" if cuda else "512,2048", help="comma-separated prefill lengths")
    p.add_argument("--impls", default=",".join(IMPLS if cuda else [i for i in IMPLS if i != "new-bf16"]),
                   help=f"comma-separated, from {','.join(IMPLS)}")
    p.add_argument("--threads", type=int, default=min(8, os.cpu_count() or 1), help="torch.set_num_threads (CPU)")
    p.add_argument("--reps", type=int, default=None, help="timed calls after the warm-up (default 10 GPU, 3 CPU)")
    p.add_argument("--allow-big", action="store_true", help="CPU: run old-dense even where its scores exceed 4 GiB")
    p.add_argument("--decode-len", type=int, default=8192, help="KV cache length of the decode rows (GPU)")
    p.add_argument("--md", default=None, help="write a dated markdown section for BENCHMARKS.md here")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child:  # one isolated CPU configuration (prefill_row_isolated)
        job = json.loads(a.child)
        torch.set_num_threads(job["threads"])
        row = prefill_row(grok1_attention(**job["cfg"]), job["T"], job["impl"], job["reps"])
        print(json.dumps(row))
        return 0
    tokens = [int(t) for t in a.tokens.split(",") if t]
    impls = [i for i in a.impls.split(",") if i]
    bad = sorted(set(impls) - set(IMPLS))
    if bad:
        p.error(f"unknown impl(s) {bad}; choose from {IMPLS}")
    reps = a.reps or (10 if cuda else 3)
    threads = None if cuda else a.threads
    if not cuda:
        torch.set_num_threads(a.threads)
    device = device_description(cuda)
    command = "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]) if argv is None else "main()"
    print(f"# {device}, torch {torch.__version__}" + (f", {threads} threads" if threads else ""), flush=True)
    load0 = os.getloadavg()[0] if not cuda else None
    rows = prefill_rows({}, tokens, impls, reps, threads=a.threads, allow_big=a.allow_big,
                        device="cuda" if cuda else "cpu")
    for r in ratio_rows(rows):
        print(f"T={r['T']:>5} {r['new']} / {r['old']}: time {r['time']:.2f}, peak memory {_num(r['mem'], '.3f')}")
    dec = decode_rows(grok1_attention(), a.decode_len, reps) if cuda and a.decode_len else []
    load = f"{load0:.1f} / {os.getloadavg()[0]:.1f}" if load0 is not None else ""
    text = markdown(rows, dec, device=device, threads=threads, command=command, load=load)
    if a.md:
        Path(a.md).write_text(text)
        print(f"# wrote {a.md}")
    failed = [r for r in rows if r["note"].startswith(("error", "out of memory"))]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
