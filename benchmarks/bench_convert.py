"""Conversion speed and memory against `cp`, the floor for any converter that writes the same bytes.

Writes official-format synthetic checkpoints (``grok_torch.convert.synthetic``): one with the REAL
Grok-1 tensor shapes for ``--layers`` layers (1 layer = the 3.2 GB embedding + 4.8 GB of int8
experts/attention) and a scaled-down whole model (64 layers, small dims). Then, for each, in one run:

* the time to read the source files (``cat > /dev/null``),
* the time to copy them (``cp -r``, then ``sync``),
* the conversion time per ``--dtype`` (each in its own process, then ``sync``) and its peak RSS,
* the ratios: conversion speed / cp speed (on source bytes) -- target >= 0.8 for int8 -- and
  peak RSS -- target <= 1 GB.

Every figure is printed as a table and appended as CSV; record runs in BENCHMARKS.md.

    python benchmarks/bench_convert.py --workdir /tmp/bench-convert            # ~25 GB of disk at peak
    python benchmarks/bench_convert.py --workdir /tmp/bc --layers 0 --dtypes int8   # quick: scaled model only
"""
from __future__ import annotations

import argparse
import csv
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from grok_torch.config import GrokConfig
from grok_torch.convert.synthetic import write_checkpoint

_CONVERT = "from grok_torch.convert.cli import main; import sys; sys.exit(main(sys.argv[1:]))"


def _du(p: Path) -> int:
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


def _timed(cmd, **kw):
    """(seconds, peak RSS bytes) of a child process, sync included so written data is on disk."""
    t = time.perf_counter()
    proc = subprocess.Popen(cmd, **kw)
    _, status, ru = os.wait4(proc.pid, 0)
    os.sync()
    dt = time.perf_counter() - t
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"failed: {' '.join(map(str, cmd))}")
    return dt, ru.ru_maxrss * 1024


def bench_one(label: str, cfg: GrokConfig, work: Path, dtypes, workers: int, rows: list) -> None:
    src = work / f"{label}-src"
    if not (src / "ckpt-0" / f"tensor{2 + 12 * cfg.num_layers - 1:05d}_000").exists():
        print(f"[{label}] writing synthetic checkpoint ({cfg.num_layers} layers, d_model {cfg.d_model}) ...", flush=True)
        write_checkpoint(src, cfg, repeat=True, progress=True, overwrite=True)  # an interrupted earlier write
    size = _du(src)
    read_s, _ = _timed(["sh", "-c", f"cat {src}/ckpt-0/* > /dev/null"])
    dst = work / f"{label}-cp"
    shutil.rmtree(dst, ignore_errors=True)
    cp_s, _ = _timed(["cp", "-r", str(src), str(dst)])
    shutil.rmtree(dst)
    base = dict(case=label, layers=cfg.num_layers, d_model=cfg.d_model, src_bytes=size)
    rows.append({**base, "what": "read (cat)", "seconds": read_s, "GB/s": size / read_s / 1e9})
    rows.append({**base, "what": "cp -r", "seconds": cp_s, "GB/s": size / cp_s / 1e9, "x_cp": 1.0})
    cfg_path = work / f"{label}.json"
    cfg_path.write_text(cfg.to_json())
    for dtype in dtypes:
        out = work / f"{label}-{dtype}"
        shutil.rmtree(out, ignore_errors=True)
        secs, rss = _timed([sys.executable, "-c", _CONVERT, str(src), str(out), "--dtype", dtype, "--config",
                            str(cfg_path), "--workers", str(workers), "--quiet"])
        out_bytes = _du(out)
        shutil.rmtree(out)
        rows.append({**base, "what": f"grok-convert --dtype {dtype}", "seconds": secs, "GB/s": size / secs / 1e9,
                     "x_cp": cp_s / secs, "out_bytes": out_bytes, "peak_rss_MB": rss / 1e6})
        print(f"[{label}] {dtype}: {secs:.1f} s ({cp_s / secs:.2f}x cp), peak RSS {rss / 1e6:.0f} MB", flush=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", type=Path, required=True, help="scratch directory (several GB)")
    p.add_argument("--layers", type=int, default=1, help="real-shape Grok-1 layers (0 to skip; 1 = ~8 GB)")
    p.add_argument("--dtypes", default="int8,bf16,fp32")
    p.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1))
    p.add_argument("--csv", type=Path, default=None, help="append the rows to this CSV")
    p.add_argument("--keep", action="store_true", help="keep the synthetic sources for the next run")
    a = p.parse_args(argv)
    a.workdir.mkdir(parents=True, exist_ok=True)
    dtypes = a.dtypes.split(",")
    rows: list = []
    # scaled-down whole model: all 770 files, the real file structure, ~1.7 GB
    scaled = GrokConfig.from_name("grok-1", vocab_size=8192, d_model=512, num_q_heads=4, num_kv_heads=1,
                                  ffn_size=2048, max_seq_len=1024).replace(name="grok-1-scaled")
    bench_one("scaled-64-layers", scaled, a.workdir, dtypes, a.workers, rows)
    if a.layers:
        real = GrokConfig.from_name("grok-1", num_layers=a.layers).replace(name=f"grok-1-{a.layers}-layers")
        bench_one(f"real-shapes-{a.layers}-layer", real, a.workdir, dtypes, a.workers, rows)
    if not a.keep:
        for d in a.workdir.glob("*-src"):
            shutil.rmtree(d)
    cols = ["case", "what", "src_bytes", "seconds", "GB/s", "x_cp", "out_bytes", "peak_rss_MB"]
    print(f"\nmachine: {os.cpu_count()} CPUs; workers {a.workers}; page cache warm (source just written)")
    print("| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(f"{r[c]:.2f}" if isinstance(r.get(c), float) else str(r.get(c, "")) for c in cols) + " |")
    if a.csv:
        new = not a.csv.exists()
        with open(a.csv, "a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
            if new:
                w.writeheader()
            w.writerows(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
