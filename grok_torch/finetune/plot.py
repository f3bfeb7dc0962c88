"""The loss curve as a PNG, drawn without a plotting library (one less dependency for a 640x400 chart).

Training loss per logged step is a blue line, eval loss an orange dot per evaluation, on axes from
step 0 to the last step and from 0 to the largest loss; light grid lines at quarters.
"""
from __future__ import annotations

import struct
import zlib
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

__all__ = ["plot_losses", "write_png"]

W, H, MARGIN = 640, 400, 40
WHITE, GRID, AXIS, BLUE, ORANGE = (255, 255, 255), (225, 225, 225), (60, 60, 60), (31, 119, 180), (255, 127, 14)


def write_png(path, pixels: List[bytearray], width: int, height: int) -> None:
    """An 8-bit RGB PNG from rows of width*3 bytes."""
    raw = b"".join(b"\x00" + bytes(row) for row in pixels)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    Path(path).write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
                           + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b""))


def _line(px, x0, y0, x1, y1, color) -> None:
    steps = max(abs(x1 - x0), abs(y1 - y0), 1)
    for i in range(steps + 1):
        x, y = round(x0 + (x1 - x0) * i / steps), round(y0 + (y1 - y0) * i / steps)
        for dy in (0, 1):  # 2 px thick
            if 0 <= x < W and 0 <= y + dy < H:
                px[y + dy][3 * x:3 * x + 3] = bytes(color)


def plot_losses(rows: Sequence[Dict], path) -> Path:
    """Draw ``loss`` and ``eval_loss`` of metrics rows (dicts with ``step``) into ``path``."""
    train: List[Tuple[float, float]] = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r]
    px = [bytearray(WHITE * W) for _ in range(H)]
    last = max([s for s, _ in train + evals] or [1])
    top = max([v for _, v in train + evals] or [1.0]) * 1.05 or 1.0

    def xy(step, value):
        return (MARGIN + (W - 2 * MARGIN) * step / last, H - MARGIN - (H - 2 * MARGIN) * max(value, 0.0) / top)

    for q in range(1, 5):
        gx, gy = MARGIN + (W - 2 * MARGIN) * q // 4, H - MARGIN - (H - 2 * MARGIN) * q // 4
        _line(px, gx, MARGIN, gx, H - MARGIN, GRID)
        _line(px, MARGIN, gy, W - MARGIN, gy, GRID)
    _line(px, MARGIN, H - MARGIN, W - MARGIN, H - MARGIN, AXIS)
    _line(px, MARGIN, MARGIN, MARGIN, H - MARGIN, AXIS)
    for (s0, v0), (s1, v1) in zip(train, train[1:]):
        _line(px, *map(round, xy(s0, v0)), *map(round, xy(s1, v1)), BLUE)
    for s, v in evals:
        x, y = map(round, xy(s, v))
        for d in range(-3, 4):
            _line(px, x - 3, y + d, x + 3, y + d, ORANGE)
    write_png(path, px, W, H)
    return Path(path)
