"""Write a random checkpoint in the exact official on-disk format (no JAX, no numpy pickling).

Used by the tests, the conversion benchmark (real Grok-1 shapes without the 318 GB download) and
the README quick start (a tiny model to convert and run on a fresh machine). The pickles have the
same opcode structure as the official files (SPEC §5.2, ``pickle_layout.txt``): a numpy array via
``numpy.core.multiarray._reconstruct`` or a ``__main__.QuantizedWeight8bit`` whose ``weight`` is
int8 and whose ``scales`` are ``ml_dtypes.bfloat16``; payloads are streamed, never held whole.

    python -m grok_torch.convert.synthetic /tmp/grok-tiny-src     # the demo config: tiny shapes, real vocab
"""
from __future__ import annotations

import argparse
import math
import os
import re
import shutil
import struct
import sys
from pathlib import Path
from typing import BinaryIO, Iterator, Optional, Sequence

from grok_torch.config import GrokConfig
from grok_torch.convert.convert import missing_dirs, remove_empty_dirs
from grok_torch.convert.safetensors_io import ITEMSIZE
from grok_torch.convert.weight_map import ParamSpec, param_order
from grok_torch.tokenizer import BUNDLED_TOKENIZER

_REAL_VOCAB = 128 * 1024    # the bundled tokenizer's size: configs with it get the tokenizer too

_CHUNK = 1 << 24


def _str(s: str) -> bytes:
    b = s.encode()
    return b"\x8c" + bytes([len(b)]) + b                              # SHORT_BINUNICODE


def _global(module: str, name: str) -> bytes:
    return _str(module) + _str(name) + b"\x93"                        # STACK_GLOBAL


def _int(i: int) -> bytes:
    return b"J" + struct.pack("<i", i)                                # BININT


def _dtype(name: str) -> bytes:
    # numpy.dtype(<spec>, False, True) then BUILD (3, '<', None, None, None, elsize, align, flags)
    if name == "bfloat16":
        return (_global("numpy", "dtype") + _global("ml_dtypes", "bfloat16") + b"\x89\x88\x87R"
                + b"(" + _int(3) + _str("<") + b"NNN" + _int(2) + _int(2) + _int(64) + b"tb")
    code, order = {"int8": ("i1", "|"), "float32": ("f4", "<")}[name]
    return (_global("numpy", "dtype") + _str(code) + b"\x89\x88\x87R"
            + b"(" + _int(3) + _str(order) + b"NNN" + _int(-1) + _int(-1) + _int(0) + b"tb")


def _write_array(f: BinaryIO, dtype: str, shape: Sequence[int], chunks: Iterator[bytes]) -> None:
    nbytes = ITEMSIZE[dtype] * math.prod(shape)
    f.write(_global("numpy.core.multiarray", "_reconstruct") + _global("numpy", "ndarray")
            + _int(0) + b"\x85" + b"C\x01b" + b"\x87R")               # _reconstruct(ndarray, (0,), b'b')
    f.write(b"(" + _int(1) + b"(" + b"".join(_int(s) for s in shape) + b"t" + _dtype(dtype) + b"\x89")
    f.write((b"B" + struct.pack("<I", nbytes)) if nbytes < 2 ** 32 else (b"\x8e" + struct.pack("<Q", nbytes)))
    written = 0
    for c in chunks:
        f.write(c)
        written += len(c)
    assert written == nbytes, (written, nbytes)
    f.write(b"tb")                                                    # TUPLE, BUILD


class _Random:
    """Seeded random bytes; ``repeat`` reuses one block (fast, for multi-GB benchmark files)."""

    def __init__(self, seed: int, repeat: bool):
        import torch   # here, not at the top: a Ctrl-C during the CLI's start-up is then one line
        self.g = torch.Generator().manual_seed(seed)
        self.repeat = repeat
        self.block: dict = {}

    def chunks(self, dtype: str, numel: int, make) -> Iterator[bytes]:
        import torch
        per = _CHUNK // ITEMSIZE[dtype]
        for start in range(0, numel, per):
            n = min(per, numel - start)
            if self.repeat:
                if dtype not in self.block:
                    self.block[dtype] = make(per, self.g)
                t = self.block[dtype][:n]
            else:
                t = make(n, self.g)
            yield t.view(torch.uint8).numpy().tobytes()


def write_tensor_file(path: Path, spec: ParamSpec, rnd: _Random) -> None:
    import torch
    D = spec.shape[-2] if len(spec.shape) > 1 else spec.shape[0]
    with open(path, "wb") as f:
        f.write(b"\x80\x04")                                          # PROTO 4
        if spec.quantized:
            f.write(_global("__main__", "QuantizedWeight8bit") + b")\x81" + b"}(" + _str("weight"))
            _write_array(f, "int8", spec.shape, rnd.chunks(
                "int8", math.prod(spec.shape), lambda n, g: torch.randint(-127, 128, (n,), generator=g, dtype=torch.int8)))
            f.write(_str("scales"))
            # |w| ~ 1/sqrt(fan_in): an int8 uniform in [-127, 127] has std ~73.
            base = 1.0 / (73.0 * math.sqrt(spec.shape[-2]))
            _write_array(f, "bfloat16", spec.scales_shape, rnd.chunks(
                "bfloat16", math.prod(spec.scales_shape),
                lambda n, g: (base * (0.5 + torch.rand(n, generator=g))).to(torch.bfloat16)))
            f.write(b"ub")                                            # SETITEMS, BUILD
        else:
            name = spec.path
            if name.endswith("embeddings"):
                # std 1/sqrt(D): the scale the embedding multiplier (78.4 = sqrt(6144) for Grok-1) undoes,
                # and the tied head's logits then have std ~output_multiplier, so a random model's loss
                # starts near ln(vocab) instead of at tens of nats
                make = lambda n, g: torch.randn(n, generator=g) / math.sqrt(spec.shape[-1])
            elif name.endswith("scale"):                              # RMSNorm scales around 1
                make = lambda n, g: 1.0 + 0.1 * torch.randn(n, generator=g)
            else:                                                     # router
                make = lambda n, g: torch.randn(n, generator=g) / math.sqrt(D)
            _write_array(f, "float32", spec.shape, rnd.chunks("float32", math.prod(spec.shape), make))
        f.write(b".")                                                 # STOP


# what write_checkpoint writes, and all that --overwrite removes
_OUR_FILES = re.compile(r"^(config\.json|tokenizer\.model|ckpt-0/tensor\d{5}_000)$")


def write_checkpoint(dst: "str | os.PathLike", config: "str | GrokConfig" = "demo", *, seed: int = 0,
                     repeat: bool = False, progress: bool = False, overwrite: bool = False) -> Path:
    """Write ``dst/ckpt-0/tensor00000_000 ...`` for ``config``; returns the ``ckpt-0`` path.

    Also writes ``dst/config.json``, which grok-convert reads when not given ``--config`` (a model
    with fewer layers than its named config cannot be detected from the shapes). A non-empty
    ``dst`` is refused unless ``overwrite`` (then only the files listed above are replaced). On any
    failure, Ctrl-C included, the files and directories this call created are removed.
    """
    cfg = config if isinstance(config, GrokConfig) else GrokConfig.load(config)
    if cfg.num_layers < 1:
        raise ValueError(f"--layers must be at least 1, got {cfg.num_layers}")
    root = Path(dst)
    if root.exists() and not root.is_dir():
        raise NotADirectoryError(f"{root} is a file, not a directory: choose a directory to create ckpt-0/ in")
    if root.is_dir() and any(root.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{root} is not empty: pass --overwrite to replace the checkpoint there, "
                                  "or choose an empty directory")
        for p in [*root.iterdir(), *((root / "ckpt-0").iterdir() if (root / "ckpt-0").is_dir() else [])]:
            if p.is_file() and _OUR_FILES.match(p.relative_to(root).as_posix()):
                p.unlink()
    ckpt = root / "ckpt-0"
    created_dirs = missing_dirs(ckpt)
    written: list = []
    try:
        ckpt.mkdir(parents=True, exist_ok=True)
        rnd = _Random(seed, repeat)
        specs = param_order(cfg)
        it = specs
        if progress:
            from tqdm.auto import tqdm
            it = tqdm(specs, desc="synthetic checkpoint", unit="file")
        for spec in it:
            written.append(ckpt / spec.file)
            write_tensor_file(ckpt / spec.file, spec, rnd)
        written.append(root / "config.json")
        cfg.to_json(root / "config.json")
        if cfg.vocab_size == _REAL_VOCAB:
            # as the release lays it out: tokenizer.model beside ckpt-0, where grok-convert finds it
            written.append(root / "tokenizer.model")
            shutil.copyfile(BUNDLED_TOKENIZER, root / "tokenizer.model")
    except BaseException:
        # nothing half-written: a checkpoint missing its last files would convert as "files missing"
        for f in written:
            f.unlink(missing_ok=True)
        remove_empty_dirs(created_dirs)
        raise
    return ckpt


def main(argv: Optional[Sequence[str]] = None) -> int:
    prog = "python -m grok_torch.convert.synthetic"
    p = argparse.ArgumentParser(
        prog=prog,
        description="Write a random checkpoint in the official Grok-1 format (ckpt-0/tensorNNNNN_000 pickles and "
                    "config.json beside ckpt-0/), e.g. to try grok-convert and grok-generate without the 318 GB "
                    "download.")
    p.add_argument("dst", help="directory to create ckpt-0/ in (must be empty unless --overwrite)")
    p.add_argument("--config", default="demo",
                   help="named config (demo, tiny, grok-1) or JSON path (default demo: tiny shapes with the real "
                        "131072-token vocabulary; the real tokenizer.model is written beside ckpt-0)")
    p.add_argument("--layers", type=int, default=None, help="override num_layers (e.g. 1 for real-shape benchmarks)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true", help="replace a checkpoint already in DST")
    try:
        a = p.parse_args(argv)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    try:
        if a.layers is not None and a.layers < 1:
            raise ValueError(f"--layers must be at least 1, got {a.layers}")
        cfg = GrokConfig.load(a.config)
        if a.layers is not None:
            cfg = cfg.replace(num_layers=a.layers)
        ckpt = write_checkpoint(a.dst, cfg, seed=a.seed, progress=True, overwrite=a.overwrite)
    except (ValueError, KeyError, OSError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"{prog}: error: {msg}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; nothing was left in {a.dst}", file=sys.stderr)
        return 130
    print(f"wrote {ckpt} and {Path(a.dst) / 'config.json'} ({cfg.name}, {cfg.num_layers} layers)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
