"""Streaming safetensors shards: the header is planned up front, tensors are written chunk by chunk.

The ``safetensors`` library serialises from tensors held in memory; a 5 GB shard of Grok-1 must
not be. The format is simple (8-byte little-endian header length, a JSON header with
``dtype``/``shape``/``data_offsets`` per tensor, then the raw bytes), so the converter plans each
shard's header from the config, writes it, then streams every tensor's bytes in order.
"""
from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass, field
from typing import BinaryIO, Callable, Dict, Iterable, List, Tuple

ST_DTYPES = {"int8": "I8", "bfloat16": "BF16", "float32": "F32"}
ITEMSIZE = {"int8": 1, "bfloat16": 2, "float32": 4}


@dataclass
class OutTensor:
    name: str
    dtype: str                     # "int8" | "bfloat16" | "float32"
    shape: Tuple[int, ...]
    source_index: int              # which official file it comes from
    part: str                      # "array" (plain), "weight" or "scales"

    @property
    def nbytes(self) -> int:
        n = ITEMSIZE[self.dtype]
        for s in self.shape:
            n *= s
        return n


@dataclass
class Shard:
    file: str
    tensors: List[OutTensor] = field(default_factory=list)

    def header(self) -> bytes:
        meta: Dict[str, object] = {"__metadata__": {"format": "pt"}}
        off = 0
        for t in self.tensors:
            meta[t.name] = {"dtype": ST_DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [off, off + t.nbytes]}
            off += t.nbytes
        h = json.dumps(meta, separators=(",", ":")).encode()
        h += b" " * (-(len(h) + 8) % 8)      # keep the data 8-byte aligned for zero-copy loads
        return struct.pack("<Q", len(h)) + h

    def write(self, f: BinaryIO, pieces: Callable[["OutTensor"], Iterable], progress: Callable[[int], None],
              error: type = ValueError) -> str:
        """Write the shard to the open file ``f``: the header, then each tensor's bytes as ``pieces(t)``
        yields them (bytes-like). Reports every write to ``progress``, raises ``error`` naming a tensor
        whose pieces do not add up to its size, and returns the sha256 of what was written."""
        h = hashlib.sha256()
        header = self.header()
        f.write(header)
        h.update(header)
        progress(len(header))
        for t in self.tensors:
            written = 0
            for piece in pieces(t):
                f.write(piece)
                h.update(piece)
                written += len(piece)
                progress(len(piece))
            if written != t.nbytes:
                raise error(f"{t.name}: wrote {written} bytes, expected {t.nbytes}")
        return h.hexdigest()

    @property
    def data_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    @property
    def size(self) -> int:
        return len(self.header()) + self.data_bytes


def plan_shards(tensors: List[OutTensor], shard_size: int) -> List[Shard]:
    """Pack tensors in order into shards of at most ``shard_size`` data bytes (a bigger tensor gets its own)."""
    groups: List[List[OutTensor]] = [[]]
    used = 0
    for t in tensors:
        if groups[-1] and used + t.nbytes > shard_size:
            groups.append([])
            used = 0
        groups[-1].append(t)
        used += t.nbytes
    n = len(groups)
    return [Shard(f"model-{i + 1:05d}-of-{n:05d}.safetensors", g) for i, g in enumerate(groups)]


def read_header(path: str) -> Tuple[int, Dict[str, dict]]:
    """(data start offset, header dict) of a safetensors file."""
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise ValueError(f"{path}: not a safetensors file (shorter than 8 bytes)")
        (n,) = struct.unpack("<Q", raw)
        if n > 100_000_000:
            raise ValueError(f"{path}: not a safetensors file (header length {n})")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{path}: corrupt safetensors header ({e})") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path}: corrupt safetensors header (not a JSON object)")
    return 8 + n, header
