"""What each way of spreading Grok costs: bytes moved (computed) and speed / memory (measured).

    python benchmarks/bench_parallel.py              # tiny + scaled, 1/2/4 gloo ranks, < 5 min on 2 CPU cores
    python benchmarks/bench_parallel.py --quick      # tiny only, fewer steps
    python benchmarks/bench_parallel.py --md out.md  # also write a dated markdown section for BENCHMARKS.md

1. Computed, Grok-1 shapes: bytes each rank sends per token per layer for the two splits across
   processes (experts: all_to_all of the k routed rows there and back; ffn: ring all-reduce of the
   partial [D] fp32), and in one process (device_map: x to every shard, fp32 partials back); and the
   weight bytes the busiest GPU reads per decoded token (the decode floor of grok-plan).
2. Measured on the CPU (gloo): prefill tokens/s and decode ms/token for 1 process (the baseline, in
   the same invocation) and 2 / 4 ranks per split, with each rank's parameter bytes and peak RSS.
   Two cores cannot show a speed-up (ranks share them); the figures show the overhead of the
   exchange and that per-rank memory falls with the world size.
3. Measured: host RSS while loading (peak RSS minus the loaded model's bytes) for two model sizes:
   it must not grow with the model.
4. On CUDA GPUs (when present): decode ms/token of device_map "experts" and "ffn" over the visible
   GPUs against one GPU.
"""
from __future__ import annotations

import argparse
import datetime
import os
import resource
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from grok_torch.config import GrokConfig

SCALED = dict(vocab_size=4096, d_model=512, num_layers=8, num_q_heads=8, num_kv_heads=4, head_dim=64,
              widening_factor=4, num_experts=8, num_experts_per_tok=2, max_seq_len=512)


# ---- 1. computed -------------------------------------------------------------------------------

def traffic_rows(cfg: GrokConfig, worlds=(2, 4, 8)) -> list:
    """Bytes one rank sends per token per layer (fp32 activations), by split and world size."""
    from grok_torch.plan import plan_memory

    D, k = cfg.d_model, cfg.num_experts_per_tok
    rows = []
    for n in worlds:
        remote = (n - 1) / n
        floors = plan_memory(cfg, gpus=n, gpu_mem="1TB", split="experts").decode_floor_s
        rows.append({
            "world": n,
            # per token of the batch, as the all-reduce: the rank's own T/W tokens' k rows go out and come
            # back (the remote share of them), then the all_gather of the [T/W, D] share
            "experts a2a (procs)": 2 * k * D * 4 * remote / n + D * 4 * remote,
            "ffn all-reduce (procs)": 2 * D * 4 * remote,
            "device_map (1 proc)": 2 * D * 4 * (n - 1),                     # x to each other shard, partial back
            "floor experts ms": floors["experts"] * 1e3,
            "floor ffn ms": floors["ffn"] * 1e3,
        })
    return rows


# ---- 2. measured across processes ----------------------------------------------------------------

def make_checkpoint(cfg: GrokConfig, root: Path) -> Path:
    from grok_torch.convert import convert_checkpoint
    from grok_torch.convert.synthetic import write_checkpoint

    src, out = root / f"{cfg.name}-src", root / cfg.name
    if not out.exists():
        write_checkpoint(src, cfg, seed=0, overwrite=True)  # an interrupted earlier write
        convert_checkpoint(src, out, dtype="int8", config=cfg, quiet=True, overwrite=True)
    return out


def _worker(rank, world, port, path, split, exchange, prompt_len, steps, q):
    torch.set_num_threads(1)
    import datetime as dt

    import torch.distributed as dist

    from grok_torch import Grok

    kw = {}
    if world > 1:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                                timeout=dt.timedelta(seconds=120))
        kw = dict(expert_parallel=split, device="cpu")
    model = Grok.from_pretrained(path, dtype=torch.bfloat16, **kw)
    if exchange:
        from grok_torch.parallel.distributed import set_exchange

        set_exchange(model, exchange)
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    tokens = torch.randint(3, model.config.vocab_size, (1, prompt_len), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        cache = model.new_cache(1, prompt_len + steps)
        model(tokens, cache)  # warm-up prefill
        cache = model.new_cache(1, prompt_len + steps)
        t0 = time.perf_counter()
        logits = model(tokens, cache)
        prefill = time.perf_counter() - t0
        nxt = logits[:, -1].argmax(-1, keepdim=True)
        t0 = time.perf_counter()
        for _ in range(steps):
            nxt = model(nxt, cache)[:, -1].argmax(-1, keepdim=True)
        decode = (time.perf_counter() - t0) / steps
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    q.put((rank, prefill, decode, params, rss, int(nxt)))
    if world > 1:
        dist.destroy_process_group()


def run_world(path, world, split, prompt_len, steps, exchange=None):
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [ctx.Process(target=_worker, args=(r, world, port, str(path), split, exchange, prompt_len, steps, q))
             for r in range(world)]
    for p in procs:
        p.start()
    res = [q.get(timeout=600) for _ in procs]
    for p in procs:
        p.join(60)
    return sorted(res)


def measured_rows(cfg, root, worlds, prompt_len, steps):
    from grok_torch.parallel import shard_specs

    path = make_checkpoint(cfg, root)
    base = run_world(path, 1, None, prompt_len, steps)[0]
    rows = [dict(config=cfg.name, split="1 process", world=1, prefill_tok_s=prompt_len / base[1],
                 decode_ms=base[2] * 1e3, x_prefill=1.0, x_decode=1.0, param_mb=base[3] / 1e6, rss_mb=base[4] / 1e6,
                 same_tokens=True)]
    # the experts split with its two exchanges: all_to_all (one host sync per layer) and all_reduce
    for split, exchange in (("experts", "all_to_all"), ("experts", "all_reduce"), ("ffn", None)):
        for n in worlds:
            try:
                shard_specs(cfg, split, n)
            except ValueError:
                continue
            res = run_world(path, n, split, prompt_len, steps, exchange)
            prefill, decode = max(r[1] for r in res), max(r[2] for r in res)
            name = f"{split} ({exchange})" if exchange else split
            rows.append(dict(config=cfg.name, split=name, world=n, prefill_tok_s=prompt_len / prefill,
                             decode_ms=decode * 1e3, x_prefill=base[1] / prefill, x_decode=base[2] / decode,
                             param_mb=max(r[3] for r in res) / 1e6, rss_mb=max(r[4] for r in res) / 1e6,
                             same_tokens=all(r[5] == base[5] for r in res)))
    return rows


# ---- 3. loading memory -------------------------------------------------------------------------------

_LOAD_PROBE = """
import sys, threading, time, torch
from grok_torch import Grok

def status():
    with open("/proc/self/status") as f:
        d = dict(line.split(":", 1) for line in f)
    return int(d["RssAnon"].split()[0]) * 1024, int(d["RssFile"].split()[0]) * 1024

base, peak, done = status(), list(status()), []
def poll():
    while not done:
        for i, v in enumerate(status()):
            peak[i] = max(peak[i], v)
        time.sleep(0.002)
t = threading.Thread(target=poll); t.start()
m = Grok.from_pretrained(sys.argv[1], device_map="experts", devices=["cpu"] * 4)
done.append(1); t.join()
print(peak[0] - base[0], peak[1] - base[1], sum(p.numel() * p.element_size() for p in m.parameters()))
"""


def loading_rows(root, layer_counts):
    """Peak growth of anonymous memory (what a GPU user's host must have) and of mapped file pages
    (the page cache of the shard being read: reclaimable) while loading, against the model's bytes.
    On the CPU the loaded parameters are views of the mapped shards (safetensors), so the model
    itself adds little anonymous memory; what matters is that neither figure grows with the model."""
    rows = []
    for L in layer_counts:
        cfg = GrokConfig(name=f"scaled-{L}L", **{**SCALED, "num_layers": L})
        path = make_checkpoint(cfg, root)
        anon, file, model = map(int, subprocess.check_output([sys.executable, "-c", _LOAD_PROBE, str(path)]).split())
        rows.append(dict(model=cfg.name, model_mb=model / 1e6, peak_anon_growth_mb=anon / 1e6,
                         peak_file_pages_mb=file / 1e6))
    return rows


# ---- 4. GPUs -----------------------------------------------------------------------------------------

def gpu_rows(root, steps=32):
    if not torch.cuda.is_available():
        return []
    from grok_torch import Grok

    cfg = GrokConfig(name="scaled", **SCALED)
    path = make_checkpoint(cfg, root)
    n = max(d for d in (1, 2, 4, 8) if d <= torch.cuda.device_count())
    rows = []
    for name, kw in (("1 GPU", dict(device="cuda:0")), ("experts", dict(device_map="experts", devices=list(range(n)))),
                     ("ffn", dict(device_map="ffn", devices=list(range(n))))):
        m = Grok.from_pretrained(path, **kw)
        tok = torch.randint(3, cfg.vocab_size, (1, 64), device="cuda:0")
        with torch.inference_mode():
            cache = m.new_cache(1, 64 + steps + 8)
            nxt = m(tok, cache)[:, -1:].argmax(-1)
            for _ in range(4):
                nxt = m(nxt, cache)[:, -1:].argmax(-1)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(steps):
                nxt = m(nxt, cache)[:, -1:].argmax(-1)
            torch.cuda.synchronize()
        rows.append(dict(map=name, gpus=1 if name == "1 GPU" else n, decode_ms=(time.perf_counter() - t0) / steps * 1e3))
    for r in rows:
        r["x_one_gpu"] = rows[0]["decode_ms"] / r["decode_ms"]
    return rows


# ---- output ------------------------------------------------------------------------------------------

def table(rows, fmt=None) -> str:
    if not rows:
        return "(none)\n"
    keys = list(rows[0])
    fmt = fmt or {}

    def cell(k, v):
        if isinstance(v, int) and not isinstance(v, bool):
            return f"{v:,}"
        if isinstance(v, float):
            return format(v, fmt.get(k, ".3g")) if abs(v) < 1e4 else f"{v:,.0f}"
        return str(v)
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(cell(k, r[k]) for k in keys) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny config only, fewer steps")
    p.add_argument("--ranks", default="2,4", help="world sizes to measure (default 2,4)")
    p.add_argument("--md", help="write a dated markdown section here")
    p.add_argument("--workdir", help="where the benchmark checkpoints go (default: a temporary directory)")
    args = p.parse_args(argv)
    worlds = [int(x) for x in args.ranks.split(",")]
    root = Path(args.workdir or tempfile.mkdtemp(prefix="bench_parallel_"))
    root.mkdir(parents=True, exist_ok=True)
    configs = [GrokConfig.from_name("tiny")] + ([] if args.quick else [GrokConfig(name="scaled", **SCALED)])
    steps = 4 if args.quick else 16

    out = [f"## Placement and expert parallelism (`benchmarks/bench_parallel.py`)\n",
           f"**{datetime.date.today()}, {torch.cuda.get_device_name() if torch.cuda.is_available() else 'CPU'}"
           f" ({os.cpu_count()} cores), torch {torch.__version__}.** Command: "
           f"`python benchmarks/bench_parallel.py {' '.join(argv if argv is not None else sys.argv[1:])}`\n",
           "Computed for Grok-1 (fp32 activations): bytes one rank sends per token per layer, and the "
           "decode floor at batch 1 on H100s (weights the busiest GPU reads per token / 3.35 TB/s):\n",
           table(traffic_rows(GrokConfig.from_name("grok-1")), {"floor experts ms": ".2f", "floor ffn ms": ".2f"})]
    print("".join(out), flush=True)
    rows = []
    for cfg in configs:
        rows += measured_rows(cfg, root, worlds, 32 if cfg.name == "tiny" else 128, steps)
    part = ["Measured on this machine, gloo ranks as processes sharing its cores, bf16, int8 weights, batch 1 "
            "(x_* = speed vs the 1-process run of the same invocation; param_mb / rss_mb: the largest rank):\n",
            table(rows, {"decode_ms": ".1f", "prefill_tok_s": ".0f", "x_prefill": ".2f", "x_decode": ".2f",
                         "param_mb": ".2f", "rss_mb": ".0f"})]
    print("".join(part), flush=True)
    out += part
    if not args.quick:
        part = ["Host memory while loading (device_map experts over 4 cpu devices), peak growth during "
                "from_pretrained, sampled every 2 ms from /proc/self/status:\n", table(loading_rows(root, (8, 32)))]
        print("".join(part), flush=True)
        out += part
    gpu = gpu_rows(root)
    if gpu:
        part = ["On the GPUs: decode ms/token, scaled config, batch 1:\n", table(gpu)]
        print("".join(part), flush=True)
        out += part
    if args.md:
        Path(args.md).write_text("\n".join(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
