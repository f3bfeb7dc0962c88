"""grok-finetune merge: a LoRA adapter folded into its base model, written as a grok-convert output.

    merge_adapter("grok-1-int8", "run/", "grok-1-merged", dtype="bf16")
    Grok.from_pretrained("grok-1-merged")          # or: grok-generate --model grok-1-merged

Every matrix is streamed from the source shards in bounded row blocks (never a whole tensor, let
alone the model, in memory): an int8 block is dequantized as the converter does (the exact fp32
product ``int8 * scale``), its rows of the adapter's ``scale * A @ B`` are added in fp32, and the sum
is rounded once to the output dtype. Matrices the adapter does not touch are copied (an int8 one
dequantized into the output dtype, byte-identical to ``grok-convert --dtype bf16|fp32``).

The output is the converter's format: ``config.json`` (``weight_format`` "bf16" or "fp32"), shards
planned and named by ``grok_torch.convert.safetensors_io``, ``model.safetensors.index.json``,
``tokenizer.model`` when the model has one, and the record ``grok_convert.json`` (shard sha256s and
options, plus what was merged), so ``grok-convert verify OUT`` checks it. The quantized-in-release
matrices (wq wk wv wo w1 w3 w2) take ``dtype``; the embedding, norms and router stay fp32 (bf16 only
where the source stored them in bf16 and ``dtype`` is bf16), as ``grok-convert --plain-dtype``.
An int8 output is refused: re-quantizing the merged weights would silently change them.

Nothing is half-written: the files go to a hidden directory next to OUT, renamed to OUT at the end
and removed on any error.
"""
from __future__ import annotations

import contextlib
import os
import secrets
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Dict, Iterator, Optional, Tuple, Union

import torch
from torch import nn

from grok_torch.config import GrokConfig
from grok_torch.convert.convert import (_OUR_FILES, DTYPE_NAMES, INDEX_FILE, RECORD_FILE, _file_sha256,
                                        _free_bytes, _Progress, _write_json_atomic, human, parse_size)
from grok_torch.convert.safetensors_io import OutTensor, Shard, plan_shards
from grok_torch.convert.weight_map import ParamSpec, param_order
from grok_torch.loading import _open_shard, _shards
from grok_torch.lora import LoRA, LoRAConfig, load_adapter

__all__ = ["MergeError", "merge_adapter", "OUTPUT_DTYPES"]

OUTPUT_DTYPES = ("bf16", "fp32")
_TORCH = {"bfloat16": torch.bfloat16, "float32": torch.float32}


class MergeError(ValueError):
    """A merge that cannot proceed; the one-line message names the path (model, adapter or OUT)."""


# ---------------------------------------------------------------------------------------------
# Checking the inputs
# ---------------------------------------------------------------------------------------------
def _check_model(model_dir: Path) -> Tuple[GrokConfig, Dict[str, str]]:
    """(config, tensor name -> shard file) of a grok-convert output, or a MergeError."""
    if not model_dir.exists():
        raise MergeError(f"model directory {model_dir} does not exist")
    if not model_dir.is_dir():
        raise MergeError(f"model path {model_dir} is not a directory (pass the directory written by grok-convert)")
    if not (model_dir / "config.json").is_file():
        raise MergeError(f"{model_dir} is not a grok-convert output: no config.json")
    try:
        cfg = GrokConfig.from_json(model_dir / "config.json")
        shards = _shards(model_dir)
    except (ValueError, OSError) as e:
        raise MergeError(f"{model_dir} is not a readable grok-convert output: {' '.join(str(e).split())}") from None
    want = {f"{s.torch_name}.{part}" for s in param_order(cfg)
            for part in (("weight", "scales") if s.quantized and cfg.weight_format == "int8" else ("weight",))}
    missing, extra = sorted(want - set(shards)), sorted(set(shards) - want)
    if missing or extra:
        raise MergeError(f"{model_dir}: its tensors do not match its config.json ({cfg.weight_format}; missing "
                         f"{missing[:3]}, unexpected {extra[:3]}): not a grok-convert output")
    return cfg, shards


def _adapters(adapter_dir: Path, cfg: GrokConfig) -> Tuple[LoRAConfig, Dict[str, LoRA]]:
    """(its config, {matrix name: its LoRA}) read with ``load_adapter`` (its architecture and tensor checks) onto a
    weightless skeleton of the model: every parameter a zero-stride CPU view, so no memory is used."""
    from grok_torch.model import Grok

    with torch.device("meta"):
        skeleton = Grok(cfg, dtype=torch.float32, impl="torch")
    for mod in skeleton.modules():
        for name, p in list(mod._parameters.items()):
            if p is not None:
                mod._parameters[name] = nn.Parameter(torch.empty((), dtype=p.dtype).expand(p.shape),
                                                     requires_grad=False)
    try:
        with torch.random.fork_rng(devices=[]):  # add_lora's A init must not move the caller's RNG
            config = load_adapter(skeleton, adapter_dir)
    except (ValueError, OSError) as e:
        raise MergeError(" ".join(str(e).split())) from None
    # on one device an adapter is the submodule "lora" of its matrix's module (the checkpoint name's module)
    loras = {path.rsplit(".", 1)[0]: m for path, m in skeleton.named_modules() if isinstance(m, LoRA)}
    unknown = sorted(set(loras) - {s.torch_name for s in param_order(cfg)})
    if unknown:
        raise RuntimeError(f"merge: adapters on {unknown[:3]} match no checkpoint matrix (grok_torch.lora naming)")
    return config, loras


def _output_dtype(dtype) -> str:
    names = {"bf16": "bf16", "bfloat16": "bf16", torch.bfloat16: "bf16",
             "fp32": "fp32", "float32": "fp32", torch.float32: "fp32"}
    if dtype in ("int8", torch.int8):
        raise MergeError("merge writes bf16 or fp32 weights: an int8 output would re-quantize the merged matrices "
                         "(silently changing them); pass dtype bf16 or fp32")
    if not isinstance(dtype, (str, torch.dtype)) or dtype not in names:
        raise MergeError(f"merge output dtype must be one of {', '.join(OUTPUT_DTYPES)}, got {dtype!r}")
    return names[dtype]


def _check_out(out: Path, overwrite: bool, sources: Tuple[Path, ...]) -> None:
    if out.exists() and not out.is_dir():
        raise MergeError(f"output path {out} is a file, not a directory")
    for src in sources:
        if src.resolve().is_relative_to(out.resolve()):
            raise MergeError(f"output directory {out} holds {src}: choose a separate output directory")
    entries = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    if entries and not overwrite:
        raise MergeError(f"output directory {out} is not empty; pass overwrite=True (--overwrite) to replace the "
                         "model there, or choose an empty directory")
    foreign = [n for n in entries if not (_OUR_FILES.match(n) and (out / n).is_file())]
    if foreign:
        raise MergeError(f"output directory {out} holds files a model directory does not ({', '.join(foreign[:3])}"
                         f"{' ...' if len(foreign) > 3 else ''}): refusing to replace it; choose another directory")


# ---------------------------------------------------------------------------------------------
# One tensor, in row blocks
# ---------------------------------------------------------------------------------------------
def _merged_blocks(f, where: str, name: str, spec: ParamSpec, quantized: bool, lora: Optional[LoRA],
                   out_dtype: torch.dtype, chunk_elems: int) -> Iterator[torch.Tensor]:
    """The merged tensor ``spec`` in ``out_dtype``, as consecutive row blocks (C order) of ~chunk_elems."""
    sl = f.get_slice(name)
    shape = tuple(sl.get_shape())
    if shape != spec.shape:
        raise MergeError(f"{where}: {name} has shape {shape}, its config.json implies {spec.shape}")
    stored = sl.get_dtype()
    if quantized != (stored == "I8") or stored not in ("I8", "BF16", "F32"):
        raise MergeError(f"{where}: {name} is stored as {stored}, which its config.json's weight_format "
                         "does not hold")
    if len(shape) == 1:
        yield f.get_tensor(name).float().to(out_dtype)
        return
    *lead, K, N = shape
    scales = f.get_slice(name[: -len("weight")] + "scales") if quantized else None
    gk = K // spec.groups if quantized else K
    rows = max(1, min(K, chunk_elems // N))
    for idx in (torch.cartesian_prod(*[torch.arange(d) for d in lead]).view(-1, len(lead)).tolist() if lead
                else [[]]):
        at = tuple(slice(i, i + 1) for i in idx)
        A = B = None
        if lora is not None:
            A, B = lora.A.detach()[tuple(idx)], lora.B.detach()[tuple(idx)]
        for r0 in range(0, K, rows):
            r1 = min(K, r0 + rows)
            w = sl[at + (slice(r0, r1),)].reshape(r1 - r0, N).float()
            if scales is not None:  # the exact fp32 product int8 * bf16 scale of row k's group k // (K/G)
                g0, g1 = r0 // gk, (r1 - 1) // gk + 1
                s = scales[at + (slice(g0, g1),)].reshape(g1 - g0, N).float()
                w.mul_(s[torch.arange(r0, r1) // gk - g0])
            if A is not None:  # rows r0..r1 of LoRA.delta() = A @ B * scale, added in fp32
                w.add_(A[r0:r1] @ B * lora.scale)
            yield w.to(out_dtype)


# ---------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------
class _Reader:
    """One source shard open at a time (the converter's shard order makes switching rare)."""

    def __init__(self, shards: Dict[str, str]):
        self.shards, self.file, self.stack, self.handle = shards, None, None, None

    def __call__(self, name: str):
        if self.shards[name] != self.file:
            self.close()
            self.stack = contextlib.ExitStack()
            self.handle = self.stack.enter_context(_open_shard(self.shards[name]))
            self.file = self.shards[name]
        return self.handle

    def close(self):
        if self.stack is not None:
            self.stack.close()
        self.file = self.stack = self.handle = None


def _write_shard(path: Path, shard: Shard, specs: Dict[str, ParamSpec], read: _Reader, quantized: bool,
                 loras: Dict[str, LoRA], chunk_elems: int, progress) -> dict:
    def pieces(t):
        spec = specs[t.name]
        f = read(t.name)
        for block in _merged_blocks(f, read.file, t.name, spec, quantized and spec.quantized,
                                    loras.get(spec.torch_name), _TORCH[t.dtype], chunk_elems):
            yield memoryview(block.contiguous().view(-1).view(torch.uint8).numpy())

    with open(path, "wb") as out:
        digest = shard.write(out, pieces, progress, MergeError)
    return {"file": shard.file, "size": path.stat().st_size, "sha256": digest}


def _write_model(tmp: Path, plan, specs: Dict[str, ParamSpec], read: _Reader, quantized: bool,
                 loras: Dict[str, LoRA], chunk_elems: int, progress: bool) -> list:
    """Every shard of ``plan`` into ``tmp``; their records (file, size, sha256) for grok_convert.json."""
    bar = _Progress(sum(s.size for s in plan), 0, quiet=not progress, desc="grok-finetune merge")
    try:
        return [_write_shard(tmp / s.file, s, specs, read, quantized, loras, chunk_elems, bar) for s in plan]
    finally:
        read.close()
        bar.close()


def _install(tmp: Path, out: Path) -> None:
    """Rename the finished ``tmp`` to ``out``, replacing an empty or (checked) earlier model directory."""
    if not out.exists():
        os.replace(tmp, out)
        return
    old = out.with_name(f".{out.name}.old-{secrets.token_hex(4)}")
    os.replace(out, old)
    try:
        os.replace(tmp, out)
    except BaseException:
        os.replace(old, out)
        raise
    shutil.rmtree(old, ignore_errors=True)


def merge_adapter(model_dir: Union[str, os.PathLike], adapter_dir: Union[str, os.PathLike],
                  out_dir: Union[str, os.PathLike], *, dtype: str = "bf16", overwrite: bool = False,
                  progress: bool = True, shard_size: Union[str, int] = "5GB",
                  chunk_size: Union[str, int] = "64MiB") -> Path:
    """Fold the LoRA adapter in ``adapter_dir`` into the grok-convert model ``model_dir``; write ``out_dir``.

    Args:
        model_dir: a grok-convert output (int8, bf16 or fp32).
        adapter_dir: a ``save_adapter`` / ``grok-finetune`` adapter trained for that architecture.
        out_dir: the merged model directory (created); must not exist or be empty unless ``overwrite``.
        dtype: "bf16" (default) or "fp32": the merged matrices' dtype (``weight_format`` of the output).
            "int8" is refused: merged weights are never re-quantized.
        overwrite: replace an earlier model directory at ``out_dir`` (one holding only model files).
        progress: show a tqdm bar.
        shard_size: data bytes per output shard, as ``grok-convert --shard-size``.
        chunk_size: fp32 bytes of one row block held while merging (memory stays bounded by it).
    Returns ``out_dir`` as a Path. Raises ``MergeError`` (a ValueError) with a one-line message naming
    the path at fault; OUT is then untouched and no temporary directory is left behind.
    """
    model_dir, adapter_dir, out = Path(model_dir), Path(adapter_dir), Path(out_dir)
    fmt = _output_dtype(dtype)
    cfg, shards = _check_model(model_dir)
    lora_cfg, loras = _adapters(adapter_dir, cfg)
    _check_out(out, overwrite, (model_dir, adapter_dir))
    try:
        size, chunk_elems = parse_size(shard_size), max(1, parse_size(chunk_size) // 4)
    except ValueError as e:
        raise MergeError(str(e)) from None
    quantized = cfg.weight_format == "int8"

    specs = param_order(cfg)
    embed = f"{specs[0].torch_name}.weight"
    try:
        with _open_shard(shards[embed]) as f:  # the converter's --plain-dtype, kept where bf16 is asked for
            plain = "bf16" if fmt == "bf16" and f.get_slice(embed).get_dtype() == "BF16" else "fp32"
    except (ValueError, OSError) as e:
        raise MergeError(f"{model_dir}: {' '.join(str(e).split())}") from None
    tensors = [OutTensor(f"{s.torch_name}.weight", DTYPE_NAMES[fmt if s.quantized else plain], s.shape, s.index,
                         "weight" if s.quantized else "array") for s in specs]
    by_name = {f"{s.torch_name}.weight": s for s in specs}
    plan = plan_shards(tensors, size)
    total = sum(s.size for s in plan)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise MergeError(f"cannot create the parent directory of {out}: {e}") from None
    if total > _free_bytes(out.parent):
        raise MergeError(f"not enough disk space for {out}: the merged model needs {human(total)}, "
                         f"{human(_free_bytes(out.parent))} are free")

    tmp = out.with_name(f".{out.name}.merge-{secrets.token_hex(4)}")
    try:
        os.mkdir(tmp)
    except OSError as e:
        raise MergeError(f"cannot create a directory next to {out}: {e}") from None
    try:
        try:
            records = _write_model(tmp, plan, by_name, _Reader(shards), quantized, loras, chunk_elems, progress)
            out_cfg = cfg.replace(weight_format=fmt)
            out_cfg.to_json(tmp / "config.json")
            if (model_dir / "tokenizer.model").is_file():
                shutil.copyfile(model_dir / "tokenizer.model", tmp / "tokenizer.model")
            _write_json_atomic(tmp / RECORD_FILE, {
                "format_version": 1,
                "converter": "grok_torch.finetune.merge",
                "source": {"files": [], "model": str(model_dir.resolve()), "adapter": str(adapter_dir.resolve()),
                           "model_weight_format": cfg.weight_format, "adapter_lora": asdict(lora_cfg)},
                "options": {"dtype": fmt, "plain_dtype": plain, "shard_size": size},
                "config_name": out_cfg.name,
                "config_sha256": _file_sha256(tmp / "config.json"),
                "shards": records,
            })
            _write_json_atomic(tmp / INDEX_FILE, {"metadata": {"total_size": sum(s.data_bytes for s in plan)},
                                                  "weight_map": {t.name: s.file for s in plan for t in s.tensors}})
            _install(tmp, out)
        except MergeError:
            raise
        except (OSError, ValueError) as e:  # a full disk, a source shard unreadable halfway
            raise MergeError(f"writing the merged model to {out} failed: {' '.join(str(e).split())}") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
