"""Prefill / decode speed of the Grok model (random weights), CPU by default; GPU adds bf16 vs int8.

    python benchmarks/bench_generate.py            # tiny + small (d_model 1024, 8 layers), < 3 min on 2 CPU cores
    python benchmarks/bench_generate.py --quick    # fewer steps

Reports prefill tokens/s, decode ms/token at context 64 and 2048 (flat with the KV cache: each
step attends only to the filled prefix and recomputes nothing) and their ratio, the baseline of a
decode step without the cache (recomputing the whole context) with the speed-up of the cached
step, and peak memory (RSS / CUDA).
"""
from __future__ import annotations

import argparse
import resource
import time

import torch

from grok_torch.config import GrokConfig
from grok_torch.model import Grok


def random_model(cfg: GrokConfig, dtype: torch.dtype, device: str) -> Grok:
    """A Grok with random weights of the right kinds (int8 + bf16 scales when cfg is int8)."""
    with torch.device(device):
        m = Grok(cfg, dtype=dtype)
    g = torch.Generator(device="cpu").manual_seed(0)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if p.dtype == torch.int8:
                p.copy_(torch.randint(-127, 128, p.shape, generator=g, dtype=torch.int8))
            elif name.endswith(".scales"):
                p.copy_(torch.full(p.shape, 0.02 / 127))
            elif "norm" in name:
                p.fill_(1.0)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    return m.eval()


def timed(fn, sync):
    sync()
    t = time.perf_counter()
    out = fn()
    sync()
    return out, time.perf_counter() - t


@torch.inference_mode()
def bench(cfg: GrokConfig, dtype, device, steps: int, contexts=(64, 2048)) -> None:
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    m = random_model(cfg, dtype, device)
    prompt = torch.randint(3, cfg.vocab_size, (1, 64), device=device)
    m(prompt[:, :8])  # warm-up
    _, t = timed(lambda: m(prompt), sync)
    line = f"{cfg.name:>6} {cfg.weight_format:>4} {str(dtype)[6:]:>8}  prefill {64 / t:8.1f} tok/s"
    decode_ms = {}
    for ctx in contexts:
        if ctx + steps > cfg.max_seq_len:  # the cache must hold ctx + steps tokens
            continue
        cache = m.new_cache(1, ctx + steps)
        cache.pos.fill_(ctx - 1)          # pretend ctx-1 tokens are cached (timing only)
        cache.key_valid[:, :ctx].fill_(True)
        tok = prompt[:, :1]
        m(tok, cache)
        _, t = timed(lambda: [m(tok, cache) for _ in range(steps)], sync)
        decode_ms[ctx] = 1000 * t / steps
        line += f"  decode@{ctx} {decode_ms[ctx]:7.2f} ms/tok"
    if len(decode_ms) == 2:
        lo, hi = sorted(decode_ms)
        line += f"  flatness {decode_ms[hi] / decode_ms[lo]:4.2f}x"
    # baseline in the same run: a step without the cache recomputes the whole context
    ctx = min(decode_ms) if decode_ms else 8
    _, t_full = timed(lambda: m(prompt[:, :1].expand(1, ctx + 1)), sync)
    if decode_ms:
        line += f"  no-cache step@{ctx} {1000 * t_full:8.1f} ms ({1000 * t_full / decode_ms[ctx]:4.1f}x the cached step)"
    peak = torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else \
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(line + f"  peak {peak:7.0f} MiB", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    steps = 3 if args.quick else 6
    small = GrokConfig(name="small", vocab_size=32768, d_model=1024, num_layers=8, num_q_heads=8,
                       num_kv_heads=2, head_dim=128, widening_factor=2, max_seq_len=4096)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}")
    bench(GrokConfig.from_name("tiny"), torch.bfloat16, "cpu", steps, contexts=(8, 40))
    for fmt in ("int8", "bf16"):
        bench(small.replace(weight_format=fmt), torch.bfloat16, "cpu", steps)
    if torch.cuda.is_available():
        for fmt in ("int8", "bf16"):
            bench(small.replace(weight_format=fmt), torch.bfloat16, "cuda", steps * 4)


if __name__ == "__main__":
    main()
