"""Weights: how a stored matrix is held (``Weight``) and how a converted checkpoint is loaded.

    Grok.from_pretrained(dir, dtype, device)
      -> GrokConfig.from_json(dir/config.json)           the config travels with the weights
      -> build Grok on the meta device                   no random init, no memory
      -> for each safetensors shard: safe_open, check name/shape/dtype, cast only where needed
         (an fp32 checkpoint's attention matrices stay fp32: the attention math is fp32)
      -> load_state_dict(assign=True)                    the loaded tensors ARE the parameters

Layout is ``convert/weight_map.py``: matrices in the released ``[in, out]`` layout (``y = x @ w``),
experts stacked; int8 checkpoints carry ``<name>.weight`` int8 + ``<name>.scales`` bf16 ``[*lead, G, out]``.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Dict, Optional, Sequence, Union

import torch
from torch import nn

from grok_torch.config import GrokConfig
from grok_torch.kernels.reference import dequantize  # one dequantization for attention and experts

__all__ = ["Weight", "dequantize", "load_pretrained", "SUPPORTED_DTYPES"]

# Activation dtypes the faithful model supports: bf16 (the release's fprop dtype) and fp32 (SPEC §8.1).
SUPPORTED_DTYPES = (torch.bfloat16, torch.float32)


class Weight(nn.Module):
    """One stored matrix ``weight [*lead, in, out]`` and, when quantized, ``scales [*lead, G, out]`` (bf16).

    ``fp32_math``: the consumer computes in fp32 (attention). Loading then keeps an fp32 float
    checkpoint's matrix in fp32 instead of rounding it to the activation dtype, so it holds the same
    exact int8*scale products the int8 path dequantizes to.
    """

    def __init__(self, shape: Sequence[int], groups: int, quantized: bool, dtype: torch.dtype,
                 fp32_math: bool = False):
        super().__init__()
        shape = tuple(shape)
        self.fp32_math = fp32_math
        self.weight = nn.Parameter(torch.empty(shape, dtype=torch.int8 if quantized else dtype), requires_grad=False)
        if quantized:
            scales = torch.empty(*shape[:-2], groups, shape[-1], dtype=torch.bfloat16)
            self.scales = nn.Parameter(scales, requires_grad=False)
        else:
            self.scales = None

    @property
    def quantized(self) -> bool:
        return self.scales is not None

    def dequant(self, dtype: torch.dtype) -> torch.Tensor:
        """The matrix in ``dtype`` (int8 is dequantized on the fly: the reference path)."""
        return dequantize(self.weight, self.scales, dtype)


# ---------------------------------------------------------------------------------------------
# Loading


def _shards(path: Path) -> Dict[str, str]:
    """tensor name -> shard file, from model.safetensors.index.json or a single model.safetensors."""
    index = path / "model.safetensors.index.json"
    if index.exists():
        try:
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
            if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                raise TypeError("weight_map is not a {tensor name: shard file} object")
        except (ValueError, KeyError, TypeError) as e:
            what = "no weight_map" if isinstance(e, KeyError) else e
            raise ValueError(f"{index}: not a valid safetensors index ({what})") from None
        return {name: str(path / shard) for name, shard in weight_map.items()}
    single = path / "model.safetensors"
    if single.exists():
        return {name: str(single) for name in _read_shard(str(single), "cpu", keys_only=True)}
    raise FileNotFoundError(f"{path}: no model.safetensors.index.json or model.safetensors (convert with grok-convert)")


def _read_shard(shard: str, device: str, keys_only: bool = False):
    """Yield a shard's tensor names (``keys_only``) or (name, tensor) pairs; a missing file is a
    FileNotFoundError and an unreadable one (corrupt, truncated) a ValueError, both naming the file."""
    from safetensors import safe_open

    if not os.path.isfile(shard):
        raise FileNotFoundError(f"checkpoint shard {shard} does not exist")
    try:
        with safe_open(shard, framework="pt", device=device) as f:
            for name in list(f.keys()):
                yield name if keys_only else (name, f.get_tensor(name))
    except (ValueError, FileNotFoundError):
        raise
    except Exception as e:  # SafetensorError (not a public class), OSError on a truncated mmap
        msg = " ".join(str(e).split())
        raise ValueError(f"{shard}: not a readable safetensors file ({type(e).__name__}: {msg})") from None


def _check_device(device) -> torch.device:
    """torch.device(device), or a ValueError saying why it cannot hold the model."""
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"invalid device {device!r}: {' '.join(str(e).split())}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device}: CUDA is not available on this machine")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"device {device}: only {torch.cuda.device_count()} CUDA device(s) present")
    try:
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError) as e:
        raise ValueError(f"device {device} is not usable: {' '.join(str(e).split())}") from None
    return device


def _target_dtype(name: str, stored: torch.dtype, expected: torch.dtype, keep_fp32: bool = False,
                  keep_bf16: bool = False) -> torch.dtype:
    """The dtype a stored tensor is kept in. int8 stays int8 and scales stay bf16; floats follow the
    model, except that an fp32 matrix of an fp32-math ``Weight`` (``keep_fp32``) stays fp32 and a
    bf16 tensor whose consumers upcast it exactly (``keep_bf16``) stays bf16."""
    if expected == torch.int8 or stored == torch.int8:
        if stored != expected:
            raise ValueError(f"{name}: checkpoint holds {stored}, the model expects {expected} "
                             "(config weight_format does not match the weights)")
        return stored
    if name.endswith(".scales"):
        if stored != torch.bfloat16:
            raise ValueError(f"{name}: scales must be bfloat16, checkpoint holds {stored}")
        return stored
    if (keep_fp32 and stored == torch.float32) or (keep_bf16 and stored == torch.bfloat16):
        return stored
    return expected


def load_pretrained(
    cls,
    path: Union[str, os.PathLike],
    *,
    dtype: torch.dtype = torch.bfloat16,
    device: Union[str, torch.device] = "cpu",
    config: Optional[GrokConfig] = None,
    impl: str = "auto",
):
    """Build ``cls`` (a Grok) from a grok-convert output directory. See ``Grok.from_pretrained``."""
    if dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"dtype must be torch.bfloat16 or torch.float32, got {dtype}")
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"model path {path} is not a directory (pass the directory written by grok-convert)")
    if not path.is_dir():
        raise FileNotFoundError(f"model directory {path} does not exist")
    device = _check_device(device)
    file_cfg = GrokConfig.from_json(path / "config.json")
    if config is None:
        config = file_cfg
    elif not config.same_architecture(file_cfg) or config.weight_format != file_cfg.weight_format:
        diff = {k: (v, file_cfg.to_dict().get(k)) for k, v in config.to_dict().items()
                if k != "name" and v != file_cfg.to_dict().get(k)}
        raise ValueError(f"config does not match the checkpoint in {path}: "
                         + ", ".join(f"{k}={a!r} (checkpoint: {b!r})" for k, (a, b) in diff.items()))

    with torch.device("meta"):
        model = cls(config, dtype=dtype, impl=impl)
    expected = {name: t for name, t in model.state_dict().items()}
    keep_fp32 = {f"{mod_name}.weight" for mod_name, mod in model.named_modules()
                 if isinstance(mod, Weight) and mod.fp32_math}
    # bf16 mode keeps a bf16 embedding table as stored (the model upcasts rows and head slices exactly)
    keep_bf16 = {"embed.weight"} if dtype == torch.bfloat16 else set()
    shards = _shards(path)
    missing = sorted(set(expected) - set(shards))
    unexpected = sorted(set(shards) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{path}: checkpoint tensors do not match the config "
                         f"(missing: {missing[:8]}{'...' if len(missing) > 8 else ''}; "
                         f"unexpected: {unexpected[:8]}{'...' if len(unexpected) > 8 else ''})")

    state: Dict[str, torch.Tensor] = {}
    for shard in sorted(set(shards.values())):
        for name, t in _read_shard(shard, str(device)):
            if name not in expected:
                raise ValueError(f"{shard}: holds {name}, which the model does not have "
                                 "(the index does not match the shard)")
            want = expected[name]
            if tuple(t.shape) != tuple(want.shape):
                raise ValueError(f"{name}: checkpoint shape {tuple(t.shape)} != model shape "
                                 f"{tuple(want.shape)} (config does not match the weights)")
            state[name] = t.to(_target_dtype(name, t.dtype, want.dtype, name in keep_fp32, name in keep_bf16))
    absent = sorted(set(expected) - set(state))
    if absent:
        raise ValueError(f"{path}: tensors listed in the index are missing from their shards: "
                         f"{absent[:8]}{'...' if len(absent) > 8 else ''}")
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval()
