"""grok-convert: the official Grok-1 ``ckpt-0`` checkpoint -> safetensors shards, JAX-free and streaming.

Pipeline (``convert_checkpoint``):

1. find ``ckpt-0/``, check every expected ``tensorNNNNN_000`` exists (one error lists all missing);
2. read every file's pickle *metadata* with the allow-listed reader (no payload is loaded), detect
   or load the config, and check each tensor's shape/dtype against it -- all before writing, so a
   bad file never leaves output behind;
3. plan the output tensors (names from ``weight_map``) and pack them into shards;
4. write shards in parallel (one per worker), each streamed in bounded chunks to
   ``<shard>.partial`` while hashing, renamed when complete; progress is recorded so ``--resume``
   skips finished shards;
5. write ``config.json``, the tokenizer, the record ``grok_convert.json`` and, last,
   ``model.safetensors.index.json``.

Dequantization is the official one (SPEC §5.3): ``W[k, n] = weight[k, n] * scales[k // (K/G), n]``,
exact in fp32 (``--dtype fp32``), then one rounding to bf16 (``--dtype bf16``). ``--dtype int8``
copies the released int8 weights and bf16 scales byte for byte.
"""
from __future__ import annotations

import errno
import io
import hashlib
import json
import os
import re
import shutil
import signal
import threading
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Union

from grok_torch.config import CONFIGS, GrokConfig
from grok_torch.convert.grok_pickle import (ArrayRef, CheckpointError, QuantizedRef, TensorRef, open_regular,
                                            read_tensor_file)
from grok_torch.convert.safetensors_io import OutTensor, Shard, plan_shards
from grok_torch.convert.weight_map import ParamSpec, num_tensors, param_order

INDEX_FILE = "model.safetensors.index.json"
RECORD_FILE = "grok_convert.json"
STATE_FILE = ".grok-convert-state.json"
DTYPE_NAMES = {"int8": "int8", "bf16": "bfloat16", "fp32": "float32"}
_OUR_FILES = re.compile(r"^(model-\d{5}-of-\d{5}\.safetensors|model\.safetensors\.index\.json|"
                        r"config\.json|tokenizer\.model|grok_convert\.json|\.grok-convert-state\.json)(\.partial)?$")
# Test-only fault injection: signal ourselves (SIGKILL, or GROK_CONVERT_FAULT_SIGNAL) once this many
# bytes were written (resume and interrupt tests).
_FAULT_ENV = "GROK_CONVERT_FAULT_AFTER_BYTES"


class ConvertError(RuntimeError):
    """A conversion that cannot proceed; the message names the file/tensor/option and what to do."""


# ---------------------------------------------------------------------------------------------
# Small helpers
# ---------------------------------------------------------------------------------------------
def parse_size(s: Union[str, int]) -> int:
    """'5GB' -> 5e9, '500MiB' -> 500*2**20, 1234 -> 1234."""
    if isinstance(s, int):
        return s
    m = re.fullmatch(r"\s*([0-9.]+)\s*([kKmMgGtT]i?[bB]?|[bB])?\s*", str(s))
    if not m:
        raise ValueError(f"cannot parse size {s!r} (examples: 5GB, 500MB, 2GiB, 1000000)")
    num, unit = float(m.group(1)), (m.group(2) or "B").upper().rstrip("B")
    base = 1024 if unit.endswith("I") else 1000
    power = {"": 0, "K": 1, "M": 2, "G": 3, "T": 4}[unit.rstrip("I")]
    return int(num * base ** power)


def human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return f"{n} B"


def find_ckpt_dir(src: "str | os.PathLike") -> Path:
    """SRC is the directory holding ``ckpt-0/`` or ``ckpt-0/`` itself."""
    p = Path(src)
    if (p / "ckpt-0").is_dir():
        return p / "ckpt-0"
    if (p / "tensor00000_000").exists():
        return p
    if not p.exists():
        raise ConvertError(f"source {p} does not exist")
    raise ConvertError(f"{p} holds neither ckpt-0/ nor tensor00000_000: pass the directory that contains "
                       "ckpt-0/ (the official release's checkpoints/) or ckpt-0/ itself")


def _free_bytes(path: Path) -> int:
    return shutil.disk_usage(path).free


def _file_sha256(path: Path, progress: Callable[[int], None] = lambda n: None, bufsize: int = 1 << 24) -> str:
    h = hashlib.sha256()
    buf = bytearray(bufsize)
    mv = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while True:
            n = f.readinto(buf)
            if not n:
                break
            h.update(mv[:n])
            progress(n)
    return h.hexdigest()


def _write_json_atomic(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".partial")
    replaced = False
    try:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
        os.replace(tmp, path)
        replaced = True
    finally:
        # also on a Ctrl-C between the write and the rename: no .partial survives
        if not replaced:
            tmp.unlink(missing_ok=True)


def _listing(lines: Sequence[str], limit: int = 10) -> str:
    """The first ``limit`` lines, then one line counting the rest: an error stays readable for 756 files."""
    shown = list(lines[:limit]) + ([f"  ... and {len(lines) - limit} more"] if len(lines) > limit else [])
    return "\n".join(shown)


# ---------------------------------------------------------------------------------------------
# Reading and checking the source
# ---------------------------------------------------------------------------------------------
def _misfits(ckpt: Path, refs: Dict[int, TensorRef], present: set, cfg: GrokConfig):
    """(number of the first 14 files that fit ``cfg``, descriptions of those that do not, files beyond it)."""
    specs = [s for s in param_order(cfg)[:14] if s.index in present]
    wrong = [f"{ckpt / s.file} ({s.path}): {p}" for s in specs if (p := _check(s, _read(ckpt, refs, s)))]
    extra = sorted(i for i in present if i >= num_tensors(cfg))
    if extra:
        names = ", ".join(f"tensor{i:05d}_000" for i in extra[:3]) + (" ..." if len(extra) > 3 else "")
        wrong.append(f"{len(extra)} file(s) beyond the {num_tensors(cfg)} tensors of config {cfg.name!r}: {names}")
    return len(specs) - len(wrong) + bool(extra), wrong


def _detect_config(ckpt: Path, refs: Dict[int, TensorRef], present: set) -> GrokConfig:
    """The named config whose first layer's shapes the files show (missing files are reported later).

    When none fits, the error names the closest config and the file that keeps it from fitting: one
    damaged or stray file must not read as "an unknown model"."""
    best = None
    for name in CONFIGS:
        cfg = GrokConfig.from_name(name)
        fits, wrong = _misfits(ckpt, refs, present, cfg)
        if not wrong:
            return cfg
        if fits and (best is None or fits > best[0]):        # ties: the first in CONFIGS
            best = (fits, cfg, wrong)
    emb = _read(ckpt, refs, param_order(GrokConfig.from_name("tiny"))[0])
    shape = list(emb.shape) if isinstance(emb, ArrayRef) else "?"
    closest = ""
    if best is not None:
        more = f" (and {len(best[2]) - 1} more difference(s))" if len(best[2]) > 1 else ""
        closest = (f"; closest is {best[1].name!r}, but {best[2][0]}{more}; "
                   "if that file is damaged or stray, replace or remove it")
    raise ConvertError(f"{ckpt}: {len(present)} tensor files, embedding {shape}: this matches no named config "
                       f"({', '.join(CONFIGS)}){closest}; else pass --config PATH.json describing the model")


def _read(ckpt: Path, refs: Dict[int, TensorRef], spec: ParamSpec) -> TensorRef:
    """The (cached) description of ``spec``'s file; errors name the file and the parameter."""
    if spec.index not in refs:
        try:
            refs[spec.index] = read_tensor_file(ckpt / spec.file)
        except CheckpointError as e:
            raise type(e)(f"{e} [parameter {spec.path}]") from None
    return refs[spec.index]


def _check(spec: ParamSpec, ref: TensorRef) -> Optional[str]:
    """None when ``ref`` is what ``spec`` expects, else a description of the mismatch."""
    if spec.quantized:
        exp = f"QuantizedWeight8bit(int8 weight {list(spec.shape)}, bfloat16 scales {list(spec.scales_shape)})"
        if not isinstance(ref, QuantizedRef):
            return f"expected {exp}, found a plain {ref.dtype} array {list(ref.shape)}"
        w, s = ref.weight, ref.scales
        if (w.dtype, w.shape, s.dtype, s.shape) != ("int8", spec.shape, "bfloat16", spec.scales_shape):
            return (f"expected {exp}, found QuantizedWeight8bit({w.dtype} weight {list(w.shape)}, "
                    f"{s.dtype} scales {list(s.shape)})")
        return None
    if not isinstance(ref, ArrayRef):
        return f"expected a float32 array {list(spec.shape)}, found a QuantizedWeight8bit"
    if (ref.dtype, ref.shape) != ("float32", spec.shape):
        return f"expected a float32 array {list(spec.shape)}, found {ref.dtype} {list(ref.shape)}"
    return None


def read_source(ckpt: Path, config: Union[None, str, GrokConfig]):
    """Check the source against the config; returns (config, specs, refs). Raises before any output exists."""
    present = {int(m.group(1)) for m in (re.fullmatch(r"tensor(\d{5})_000", p.name) for p in ckpt.iterdir()) if m}
    if not present:
        raise ConvertError(f"{ckpt}: no tensorNNNNN_000 files")
    refs: Dict[int, TensorRef] = {}
    if config is None:
        if 0 not in present:
            raise ConvertError(f"{ckpt}: tensor00000_000 (language_model/in_out_embed/embeddings) is missing")
        cfg = _detect_config(ckpt, refs, present)
    else:
        cfg = config if isinstance(config, GrokConfig) else GrokConfig.load(config)
    specs = param_order(cfg)
    missing = [s for s in specs if s.index not in present]
    if missing and config is not None:
        # files of another model (e.g. --config grok-1 on the tiny fixture): one line saying so, not
        # a list of every file the named config would need
        _, wrong = _misfits(ckpt, refs, present, cfg)
        if wrong:
            try:
                looks = f"it looks like {_detect_config(ckpt, refs, present).name!r}: drop --config to detect it"
            except (ConvertError, CheckpointError):
                looks = "nor does it match any named config: pass --config PATH.json describing the model"
            raise ConvertError(f"{ckpt}: this checkpoint ({len(present)} tensor files) does not look like config "
                               f"{cfg.name!r} ({len(specs)} tensors; {wrong[0]}); {looks}")
    if missing:
        listing = _listing([f"  {s.file}  {s.path}" for s in missing])
        layers, rest = divmod(len(present) - 2, 12)
        hint = ""
        if not rest and 0 < layers < cfg.num_layers and max(present) == len(present) - 1:
            hint = (f"\n(the {len(present)} files present make a complete {layers}-layer model: if that is "
                    f"intended, pass --config PATH.json with num_layers {layers})")
        raise ConvertError(f"{ckpt}: {len(missing)} of {len(specs)} tensor files are missing:\n{listing}{hint}")
    extra = sorted(present - {s.index for s in specs})
    if extra:
        raise ConvertError(f"{ckpt}: files tensor{extra[0]:05d}_000 ... ({len(extra)} extra) do not belong to "
                           f"config {cfg.name!r} ({len(specs)} tensors); wrong --config?")
    for s in specs:
        problem = _check(s, _read(ckpt, refs, s))
        if problem:
            raise ConvertError(f"{ckpt / s.file} ({s.path}): {problem} for config {cfg.name!r}")
    return cfg, specs, refs


# ---------------------------------------------------------------------------------------------
# Planning and streaming one tensor
# ---------------------------------------------------------------------------------------------
def plan_tensors(specs: Sequence[ParamSpec], dtype: str, plain_dtype: str) -> List[OutTensor]:
    out = []
    for s in specs:
        if s.quantized and dtype == "int8":
            out.append(OutTensor(f"{s.torch_name}.weight", "int8", s.shape, s.index, "weight"))
            out.append(OutTensor(f"{s.torch_name}.scales", "bfloat16", s.scales_shape, s.index, "scales"))
        elif s.quantized:
            out.append(OutTensor(f"{s.torch_name}.weight", DTYPE_NAMES[dtype], s.shape, s.index, "weight"))
        else:
            out.append(OutTensor(f"{s.torch_name}.weight", DTYPE_NAMES[plain_dtype], s.shape, s.index, "array"))
    return out


def _open(a: ArrayRef):
    """(file object, offset of the array's first byte): small arrays were kept inline by the reader."""
    if a.offset < 0:
        return io.BytesIO(a.data), 0
    f, _ = open_regular(a.file, buffering=0)  # checked again: the file may have been swapped for a FIFO since it was read
    return f, a.offset


def _copy_chunks(a: ArrayRef, chunk: int) -> Iterator[memoryview]:
    buf = bytearray(max(1, min(chunk, a.nbytes)))
    mv = memoryview(buf)
    f, base = _open(a)
    with f:
        f.seek(base)
        left = a.nbytes
        while left:
            n = f.readinto(mv[:min(left, len(buf))])
            if not n:
                raise CheckpointError(f"{a.file}: truncated while reading: {left} bytes of the tensor missing")
            left -= n
            yield mv[:n]


def _cast_chunks(a: ArrayRef, to: str, chunk: int) -> Iterator[memoryview]:
    """fp32 array -> bf16, chunked (only when --plain-dtype bf16)."""
    import torch
    for piece in _copy_chunks(a, chunk - chunk % 4):
        t = torch.frombuffer(piece, dtype=torch.float32).to(getattr(torch, to))
        yield memoryview(t.view(torch.uint8).numpy())


def _dequant_chunks(q: QuantizedRef, to: str, chunk_elems: int) -> Iterator[memoryview]:
    """Dequantize as the official code: exact fp32 products weight*scale per K-group, then one rounding.

    Processes whole (lead, group) blocks of K/G rows at a time when they fit in ``chunk_elems``,
    else row slices of one block, so memory stays bounded for any tensor size.
    """
    import torch  # only the dequantizing paths need it: int8 conversion is a pure byte copy
    w, s = q.weight, q.scales
    *lead, K, N = w.shape
    G = s.shape[-2]
    L = 1
    for d in lead:
        L *= d
    gk = K // G
    scales = torch.frombuffer(bytearray(s.read()), dtype=torch.bfloat16).float().view(L * G, 1, N)
    buf32 = torch.empty(max(min(chunk_elems, L * K * N), N), dtype=torch.float32)
    buf16 = torch.empty_like(buf32, dtype=torch.bfloat16) if to == "bfloat16" else None
    raw = bytearray(buf32.numel())
    block = gk * N
    if block <= chunk_elems:
        per = max(1, chunk_elems // block)
        pieces = [(b, min(per, L * G - b), 0, gk) for b in range(0, L * G, per)]
    else:
        rows = max(1, chunk_elems // N)
        pieces = [(b, 1, r, min(rows, gk - r)) for b in range(L * G) for r in range(0, gk, rows)]
    f, base = _open(w)
    with f:
        for b0, nb, r0, nr in pieces:
            n = nb * nr * N
            start = base + (b0 * gk + r0) * N
            f.seek(start)
            got = f.readinto(memoryview(raw)[:n])
            if got != n:
                raise CheckpointError(f"{w.file}: truncated while reading: wanted {n} bytes at {start}, got {got}")
            wi8 = torch.frombuffer(raw, dtype=torch.int8, count=n).view(nb, nr, N)
            out32 = buf32[:n].view(nb, nr, N)
            # int8 * bf16 is exact in fp32; copy-then-multiply is ~5x faster than a mixed-dtype mul
            out32.copy_(wi8)
            if buf16 is None:
                out32.mul_(scales[b0:b0 + nb])
                yield memoryview(out32.view(-1).view(torch.uint8).numpy())
            else:
                out16 = buf16[:n]
                # computed in fp32, rounded once (to nearest even) when stored as bf16
                torch.mul(out32, scales[b0:b0 + nb], out=out16.view(nb, nr, N))
                yield memoryview(out16.view(torch.uint8).numpy())


def tensor_chunks(t: OutTensor, ref: TensorRef, chunk_bytes: int) -> Iterator[memoryview]:
    """The bytes of output tensor ``t`` from its source ``ref``, in chunks of bounded size."""
    if t.part == "scales":
        assert isinstance(ref, QuantizedRef)
        yield from _copy_chunks(ref.scales, chunk_bytes)
    elif t.part == "weight" and t.dtype == "int8":
        assert isinstance(ref, QuantizedRef)
        yield from _copy_chunks(ref.weight, chunk_bytes)
    elif t.part == "weight":
        assert isinstance(ref, QuantizedRef)
        yield from _dequant_chunks(ref, t.dtype, max(1, chunk_bytes // 4))
    elif t.dtype == "float32":
        assert isinstance(ref, ArrayRef)
        yield from _copy_chunks(ref, chunk_bytes)
    else:
        assert isinstance(ref, ArrayRef)
        yield from _cast_chunks(ref, t.dtype, chunk_bytes)


# ---------------------------------------------------------------------------------------------
# Writing shards
# ---------------------------------------------------------------------------------------------
class _Progress:
    def __init__(self, total: int, initial: int, quiet: bool, desc: str = "grok-convert"):
        self.lock = threading.Lock()
        self.done = initial
        self.fault_after = int(os.environ.get(_FAULT_ENV, "0") or 0)
        self.fault_signal = getattr(signal, "SIG" + os.environ.get("GROK_CONVERT_FAULT_SIGNAL", "KILL"))
        self.bar = None
        if not quiet:
            from tqdm.auto import tqdm
            self.bar = tqdm(total=total, initial=initial, unit="B", unit_scale=True, unit_divisor=1024,
                            desc=desc, dynamic_ncols=True)

    def __call__(self, n: int) -> None:
        with self.lock:
            self.done += n
            if self.bar is not None:
                self.bar.update(n)
            if self.fault_after and self.done >= self.fault_after:
                self.fault_after = 0
                os.kill(os.getpid(), self.fault_signal)

    def close(self):
        if self.bar is not None:
            self.bar.close()


def _write_shard(out: Path, shard: Shard, refs: Dict[int, TensorRef], chunk_bytes: int,
                 progress: Callable[[int], None], stop: threading.Event) -> dict:
    final = out / shard.file
    tmp = out / (shard.file + ".partial")
    def pieces(t):
        for piece in tensor_chunks(t, refs[t.source_index], chunk_bytes):
            if stop.is_set():
                raise ConvertError("stopped")
            yield piece

    replaced = False
    try:
        with open(tmp, "wb") as f:
            digest = shard.write(f, pieces, progress, ConvertError)
        os.replace(tmp, final)
        replaced = True
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise ConvertError(f"disk full while writing {final}: {e.strerror}. Free at least "
                               f"{human(shard.size)} and rerun with --resume (finished shards are kept)") from None
        raise ConvertError(f"writing {final} failed: {e}") from e
    finally:
        # whatever ends the write (an error, "stopped", an interrupt between write and rename)
        if not replaced:
            tmp.unlink(missing_ok=True)
    return {"file": shard.file, "size": final.stat().st_size, "sha256": digest}


def _find_tokenizer(ckpt: Path, given: Optional[str], vocab_size: int, log) -> Optional[Path]:
    if given:
        p = Path(given)
        if not p.is_file():
            raise ConvertError(f"--tokenizer {p}: no such file")
        n = _tokenizer_size(p)
        if n != vocab_size:
            raise ConvertError(f"--tokenizer {p} has {n} pieces but the model's vocab_size is {vocab_size}")
        return p
    for cand in (ckpt.parent / "tokenizer.model", ckpt.parent.parent / "tokenizer.model"):
        if cand.is_file():
            n = _tokenizer_size(cand)
            if n == vocab_size:
                return cand
            log(f"not copying {cand}: {n} pieces, the model's vocab_size is {vocab_size}")
    return None


def _tokenizer_size(p: Path) -> int:
    from grok_torch.tokenizer import Tokenizer
    try:
        return Tokenizer(str(p)).vocab_size
    except (ValueError, OSError) as e:
        raise ConvertError(str(e)) from None


def _prepare_out(out: Path, resume: bool, overwrite: bool, plan_key: str, keep: Optional[Path] = None) -> Dict[str, dict]:
    """Returns the shards already finished (resume) after checking OUT may be written."""
    if out.is_symlink() and not out.exists():
        raise ConvertError(f"OUT {out} is a dangling symlink: remove it or choose another OUT directory")
    if out.exists() and not out.is_dir():
        raise ConvertError(f"OUT {out} is a file, not a directory: choose another OUT (a new or empty directory)")
    out.mkdir(parents=True, exist_ok=True)
    state_path = out / STATE_FILE
    entries = [p for p in out.iterdir()]
    if resume and state_path.exists():
        try:
            state = json.loads(state_path.read_text())
            done = {f: r for f, r in state["done"].items()
                    if (out / f).exists() and (out / f).stat().st_size == r["size"] and r["sha256"]}
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise ConvertError(f"{state_path} is unreadable ({type(e).__name__}: {e}); "
                               "rerun with --overwrite to start again") from None
        if state.get("plan_key") != plan_key:
            raise ConvertError(f"{out} holds an interrupted conversion with different source (or source files "
                               "changed since), options or config; rerun with the same arguments, or with "
                               "--overwrite to start again")
        for p in out.glob("*.partial"):
            p.unlink()
        return done
    if resume and (out / INDEX_FILE).exists():
        raise ConvertError(f"{out} already holds a finished conversion (nothing to resume); "
                           "use `grok-convert verify` to check it, or --overwrite to convert again")
    if entries and not overwrite:
        hint = " (no interrupted conversion to resume there)" if resume else ""
        raise ConvertError(f"{out} is not empty{hint}; pass --resume to continue an interrupted conversion, "
                           "--overwrite to replace a previous one, or choose an empty directory")
    if overwrite:
        for p in entries:
            if p.is_file() and _OUR_FILES.match(p.name) and not (keep and p.resolve() == keep.resolve()):
                p.unlink()
    return {}


@dataclass
class ConvertResult:
    out: Path
    config: GrokConfig
    shards: List[dict]
    total_size: int


def convert_checkpoint(src: "str | os.PathLike", out: "str | os.PathLike", *, dtype: str = "int8",
                       config: Union[None, str, GrokConfig] = None, shard_size: Union[str, int] = "5GB",
                       workers: Optional[int] = None, tokenizer: Optional[str] = None, resume: bool = False,
                       overwrite: bool = False, quiet: bool = False, plain_dtype: str = "fp32",
                       chunk_size: Union[str, int] = "64MiB") -> ConvertResult:
    """Convert an official Grok-1 checkpoint to safetensors shards in ``out``.

    Args:
        src: the directory holding ``ckpt-0/`` (the release's ``checkpoints/``) or ``ckpt-0/`` itself.
        out: output directory; must be empty unless ``resume`` or ``overwrite``.
        dtype: ``int8`` keeps the released int8 weights + bf16 scales byte for byte; ``bf16``
            dequantizes as the official code (one rounding); ``fp32`` holds the exact products.
        config: ``None`` detects a named config from the shapes; a name (``grok-1``, ``tiny``),
            a JSON path or a ``GrokConfig`` otherwise.
        shard_size: data bytes per shard ("5GB"); a larger tensor gets a shard of its own.
        workers: shards written in parallel (default: min(4, cpus)); memory is one chunk per worker.
        tokenizer: a SentencePiece ``tokenizer.model`` to copy; by default one next to ``src``
            is copied when its size matches the vocabulary.
        resume: finish an interrupted conversion into ``out`` (same arguments); the result is
            byte-identical to an uninterrupted run.
        overwrite: replace an earlier conversion in ``out`` (only files grok-convert writes are removed).
        plain_dtype: ``fp32`` (default) or ``bf16`` for the embedding, norms and routers.
        chunk_size: bytes read per step of one tensor.
    """
    if dtype not in DTYPE_NAMES:
        raise ConvertError(f"--dtype must be one of {', '.join(DTYPE_NAMES)}, got {dtype!r}")
    if plain_dtype not in ("fp32", "bf16"):
        raise ConvertError(f"--plain-dtype must be fp32 or bf16, got {plain_dtype!r}")
    if parse_size(chunk_size) < 1 << 16:
        raise ConvertError(f"--chunk-size must be at least 64KiB, got {chunk_size!r}")
    if parse_size(shard_size) < 1:
        raise ConvertError(f"--shard-size must be positive, got {shard_size!r} (examples: 5GB, 500MB)")
    if workers is not None and workers < 1:
        raise ConvertError(f"--workers must be at least 1, got {workers}")
    if resume and overwrite:
        raise ConvertError("--resume and --overwrite exclude each other: --resume finishes the conversion in OUT, "
                           "--overwrite starts it again; pass one of them")
    log = (lambda msg: None) if quiet else (lambda msg: print(f"grok-convert: {msg}", flush=True))
    out = Path(out)
    ckpt = find_ckpt_dir(src)
    if ckpt.resolve().is_relative_to(out.resolve()):
        raise ConvertError(f"OUT {out} contains the source checkpoint {ckpt}: choose a separate output directory")
    if config is None and (ckpt.parent / "config.json").is_file():
        # written beside ckpt-0 by `python -m grok_torch.convert.synthetic` (the release has none): a
        # model with fewer layers than its named config cannot be detected from the shapes
        config = _source_config(ckpt.parent / "config.json")
        log(f"config from {ckpt.parent / 'config.json'}")
    cfg, specs, refs = read_source(ckpt, config)
    cfg = cfg.replace(weight_format=dtype)
    tok = _find_tokenizer(ckpt, tokenizer, cfg.vocab_size, log)
    shards = plan_shards(plan_tensors(specs, dtype, plain_dtype), parse_size(shard_size))
    source_files = [{"name": s.file, "size": (ckpt / s.file).stat().st_size} for s in specs]
    options = {"dtype": dtype, "plain_dtype": plain_dtype, "shard_size": parse_size(shard_size)}
    mtimes = [(ckpt / s.file).stat().st_mtime_ns for s in specs]   # a replaced source must not resume
    plan_key = hashlib.sha256(json.dumps([options, cfg.to_dict(), source_files, mtimes],
                                         sort_keys=True).encode()).hexdigest()

    created = missing_dirs(out)
    done = _prepare_out(out, resume, overwrite, plan_key, keep=tok)
    state = {"plan_key": plan_key, "done": dict(done)}
    try:
        return _convert_into(out, ckpt, cfg, specs, refs, shards, source_files, options, tok, state,
                             dtype, workers, quiet, chunk_size, log)
    except BaseException:
        if not state["done"]:
            # nothing finished to --resume: leave nothing this run created (an OUT that existed keeps
            # what it had; finished shards are kept, with their record, for --resume)
            _remove_ours(out, created, keep=tok)
        raise


def _source_config(path: Path) -> GrokConfig:
    # hostile input (it came with the download): from_json opens it with open_regular (a FIFO swapped
    # in after the is_file() above is refused, not waited on), reads at most 1 MiB and checks every
    # field's type and range, so each problem is a ValueError/OSError naming the file: one line here
    try:
        return GrokConfig.from_json(path)
    except (ValueError, OSError) as e:
        raise ConvertError(f"{e} (read as the config of the checkpoint beside it): fix it, or pass --config") from None


def missing_dirs(path: Path) -> List[Path]:
    """``path`` and its parents that do not exist yet, deepest first: what a run may remove on failure."""
    return [d for d in (path, *path.parents) if not d.exists()]


def remove_empty_dirs(created: Sequence[Path]) -> None:
    """Remove the directories a failed run created (``missing_dirs``, deepest first), stopping at the
    first that holds something: a user's file there is never touched."""
    for d in created:
        try:
            d.rmdir()
        except OSError:          # not empty (someone else's file) or already gone
            break


def _remove_ours(out: Path, created: Sequence[Path], keep: Optional[Path]) -> None:
    if out.is_dir():
        for p in out.iterdir():
            if p.is_file() and _OUR_FILES.match(p.name) and not (keep and p.resolve() == keep.resolve()):
                p.unlink(missing_ok=True)
    remove_empty_dirs(created)


def _convert_into(out: Path, ckpt: Path, cfg: GrokConfig, specs, refs, shards, source_files, options, tok,
                  state: dict, dtype: str, workers: Optional[int], quiet: bool, chunk_size, log) -> "ConvertResult":
    done = state["done"]
    todo = [s for s in shards if s.file not in done]
    need = sum(s.size for s in todo)
    free = _free_bytes(out)
    if need > free:
        raise ConvertError(f"not enough disk space in {out}: the conversion needs {human(need)} more, "
                           f"{human(free)} are free")
    total = sum(s.size for s in shards)
    log(f"{ckpt}: config {cfg.name!r}, {len(specs)} tensors -> {len(shards)} shard(s), {human(total)} as {dtype}"
        + (f"; resuming, {len(done)} shard(s) already written" if done else ""))
    _write_json_atomic(out / STATE_FILE, state)

    nworkers = max(1, workers if workers else min(4, os.cpu_count() or 1))
    progress = _Progress(total, sum(done[f]["size"] for f in done), quiet)
    stop = threading.Event()
    lock = threading.Lock()
    chunk = parse_size(chunk_size)

    def job(shard: Shard) -> None:
        rec = _write_shard(out, shard, refs, chunk, progress, stop)
        with lock:
            state["done"][shard.file] = rec
            _write_json_atomic(out / STATE_FILE, state)

    pool = ThreadPoolExecutor(max_workers=nworkers)
    try:
        futures = [pool.submit(job, s) for s in todo]
        finished, _ = wait(futures, return_when=FIRST_EXCEPTION)
        failed = [f for f in finished if f.exception() is not None]
        if failed:
            raise failed[0].exception()
    except BaseException:
        # an error or Ctrl-C: the other workers stop at their next chunk and remove their partial
        # shard; finished shards stay, recorded for --resume
        stop.set()
        raise
    finally:
        while True:
            try:
                pool.shutdown(wait=True, cancel_futures=True)
                break
            except KeyboardInterrupt:
                # a second Ctrl-C: still wait (at most one chunk per worker) so that no worker is
                # left writing a partial shard as the process exits
                stop.set()
        progress.close()
        for p in out.glob("*.partial"):        # unconditional: nothing half-written survives
            if _OUR_FILES.match(p.name):
                p.unlink(missing_ok=True)

    records = [state["done"][s.file] for s in shards]
    cfg.to_json(out / "config.json")
    if tok is not None and tok.resolve() != (out / "tokenizer.model").resolve():
        shutil.copyfile(tok, out / "tokenizer.model")
    _write_json_atomic(out / RECORD_FILE, {
        "format_version": 1,
        "converter": "grok_torch.convert",
        "source": {"files": source_files},
        "options": options,
        "config_name": cfg.name,
        "config_sha256": _file_sha256(out / "config.json"),
        "shards": records,
    })
    weight_map = {t.name: s.file for s in shards for t in s.tensors}
    total_size = sum(s.data_bytes for s in shards)
    _write_json_atomic(out / INDEX_FILE, {"metadata": {"total_size": total_size}, "weight_map": weight_map})
    (out / STATE_FILE).unlink()
    log(f"wrote {len(shards)} shard(s), {human(total)} to {out}")
    return ConvertResult(out, cfg, records, total_size)
