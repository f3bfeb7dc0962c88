"""Loading a converted checkpoint: every tensor from the safetensors shards straight to its device.

    Grok.from_pretrained(dir, dtype, device | device_map=... | expert_parallel=True)
      -> GrokConfig.from_json(dir/config.json)           the config travels with the weights
      -> build Grok on the meta device                   no random init, no memory
      -> placement (grok_torch.parallel), when asked     expert shards built on meta; a device per
                                                         parameter; the memory planner's check first
      -> for each safetensors shard: safe_open, check name/shape/dtype; each parameter reads its
         slice (``get_slice``: an expert shard reads only its experts' bytes), moves to its device,
         casts only where needed (an fp32 checkpoint's attention matrices stay fp32)
      -> load_state_dict(assign=True)                    the loaded tensors ARE the parameters

Host memory holds one tensor (or slice) at a time: peak RSS does not grow with the model.

Layout is ``convert/weight_map.py``: matrices in the released ``[in, out]`` layout (``y = x @ w``),
experts stacked; int8 checkpoints carry ``<name>.weight`` int8 + ``<name>.scales`` bf16 ``[*lead, G, out]``.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from grok_torch.config import GrokConfig
from grok_torch.weights import SUPPORTED_DTYPES, Weight

__all__ = ["load_pretrained", "check_model_dir", "parse_dtype", "single_device"]

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
        with _open_shard(str(single)) as f:
            return {name: str(single) for name in f.keys()}
    raise FileNotFoundError(f"{path}: no model.safetensors.index.json or model.safetensors (convert with grok-convert)")


@contextlib.contextmanager
def _open_shard(shard: str):
    """``safe_open`` on the host; a missing file is a FileNotFoundError and an unreadable one (corrupt,
    truncated) a ValueError, both naming the file. Errors of the caller's own (ValueError) and torch's
    (RuntimeError: a device out of memory while moving a tensor) pass through as they are."""
    from safetensors import safe_open

    if not os.path.isfile(shard):
        raise FileNotFoundError(f"checkpoint shard {shard} does not exist")
    try:
        with safe_open(shard, framework="pt", device="cpu") as f:
            yield f
    except (ValueError, FileNotFoundError, RuntimeError):
        raise
    except Exception as e:  # SafetensorError (not a public class), OSError on a truncated mmap
        msg = " ".join(str(e).split())
        raise ValueError(f"{shard}: not a readable safetensors file ({type(e).__name__}: {msg})") from None


# dtype spellings from_pretrained accepts (transformers' torch_dtype strings and the CLI's short names)
DTYPE_NAMES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float32": torch.float32,
               "fp32": torch.float32, "float": torch.float32}


def parse_dtype(value, what: str = "dtype"):
    """A torch dtype, one of ``DTYPE_NAMES`` (also as "torch.bfloat16"), or "auto" (returned as is:
    the checkpoint decides, see ``load_pretrained``) -> torch.bfloat16 / torch.float32 / "auto"."""
    if isinstance(value, str):
        name = value.lower().removeprefix("torch.")
        if name == "auto":
            return "auto"
        if name not in DTYPE_NAMES:
            raise ValueError(f"{what}={value!r} is not a supported dtype: pass torch.bfloat16 / \"bfloat16\" / "
                             f"\"bf16\", torch.float32 / \"float32\" / \"fp32\", or \"auto\"")
        return DTYPE_NAMES[name]
    if value not in SUPPORTED_DTYPES:
        raise ValueError(f"{what} must be torch.bfloat16 or torch.float32 (or \"bf16\" / \"fp32\"), got {value}")
    return value


def single_device(device_map):
    """The one device a transformers-style ``device_map`` names ("cpu", "cuda:1", 0, torch.device,
    {"": device}), or None when it is a placement plan (our splits, accelerate's planners, a
    {module: device} dict)."""
    from grok_torch.parallel.placement import ACCELERATE_MAPS, SPLITS, as_device

    if isinstance(device_map, str) and device_map in SPLITS + ACCELERATE_MAPS:
        return None
    if isinstance(device_map, dict):
        if set(device_map) != {""}:
            return None
        device_map = device_map[""]
    if isinstance(device_map, (str, int, torch.device)) and not isinstance(device_map, bool):
        try:
            return as_device(device_map)
        except (RuntimeError, TypeError, ValueError) as e:
            raise ValueError(f"device_map={device_map!r} is neither a device nor one of "
                             f"{SPLITS + ACCELERATE_MAPS} ({' '.join(str(e).split())})") from None
    return None


def check_model_dir(path: Union[str, os.PathLike]) -> Path:
    """``path`` as a Path when it looks like a grok-convert output, else one line saying what it is
    instead: missing, a file, empty, or an official checkpoint that was never converted (the usual
    first mistake: ``--model`` pointed at the release's ``checkpoints/``)."""
    path = Path(path)
    convert_first = f"run grok-convert first (grok-convert CHECKPOINT {path})"
    if path.exists() and not path.is_dir():
        raise ValueError(f"model path {path} is not a directory (pass the directory written by grok-convert)")
    if not path.is_dir():
        raise FileNotFoundError(f"model directory {path} does not exist: {convert_first}")
    # what grok-convert accepts as its source (convert.find_ckpt_dir): DIR/ckpt-0/ or ckpt-0/ itself
    if (path / "ckpt-0").is_dir() or (path / "tensor00000_000").exists():
        raise ValueError(f"{path} is an official Grok-1 checkpoint (ckpt-0/tensorNNNNN_000 files), not a converted "
                         f"model: run grok-convert first (grok-convert {path} OUT, then load OUT)")
    if not any(path.iterdir()):
        raise FileNotFoundError(f"model directory {path} is empty: {convert_first}")
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} has no config.json, so it is not a grok-convert output: {convert_first}")
    return path


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


def _check_config(path: Path, config: Optional[GrokConfig]) -> GrokConfig:
    file_cfg = GrokConfig.from_json(path / "config.json")
    if config is None:
        return file_cfg
    if not config.same_architecture(file_cfg) or config.weight_format != file_cfg.weight_format:
        diff = {k: (v, file_cfg.to_dict().get(k)) for k, v in config.to_dict().items()
                if k != "name" and v != file_cfg.to_dict().get(k)}
        raise ValueError(f"config does not match the checkpoint in {path}: "
                         + ", ".join(f"{k}={a!r} (checkpoint: {b!r})" for k, (a, b) in diff.items()))
    return config


_SHARD_PARAM = re.compile(r"^(layers\.\d+\.moe)\.shards\.\d+\.(w[123])\.(weight|scales)$")
Source = Tuple[str, Optional[Tuple[slice, ...]]]


def checkpoint_sources(model: nn.Module) -> Dict[str, Source]:
    """Parameter name -> (checkpoint tensor, index into it or None for the whole tensor).

    An expert shard's ``layers.{i}.moe.shards.{j}.w1.weight`` is a slice of ``layers.{i}.moe.w1.weight``
    (its ``ShardSpec`` says which); every other parameter is the checkpoint tensor of the same name.
    """
    out: Dict[str, Source] = {}
    for name, _ in model.named_parameters():
        m = _SHARD_PARAM.match(name)
        if m is None:
            out[name] = (name, None)
            continue
        spec = model.get_submodule(name.rsplit(".", 2)[0]).spec
        out[name] = (f"{m.group(1)}.{m.group(2)}.{m.group(3)}", spec.slices(f"{m.group(2)}.{m.group(3)}"))
    return out


def _progress(total: int, desc: str):
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is a dependency; a bare environment still loads
        return None
    quiet = os.environ.get("RANK", "0") != "0"  # one bar per job, not one per rank
    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, disable=True if quiet else None, leave=False)


def read_checkpoint(path: Path, expected: Dict[str, torch.Tensor], targets: Dict[str, torch.device],
                    sources: Dict[str, Source], dtype_of) -> Dict[str, torch.Tensor]:
    """Read every parameter of ``targets`` (name -> device) from the shards of ``path``.

    expected: checkpoint tensor name -> meta tensor of its full shape (what the config implies).
    dtype_of(checkpoint name, stored dtype) -> the dtype the parameter is kept in.
    """
    shards = _shards(path)
    missing = sorted(set(expected) - set(shards))
    unexpected = sorted(set(shards) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{path}: checkpoint tensors do not match the config "
                         f"(missing: {missing[:8]}{'...' if len(missing) > 8 else ''}; "
                         f"unexpected: {unexpected[:8]}{'...' if len(unexpected) > 8 else ''})")
    readers: Dict[str, list] = {}
    for param, (src, _) in sources.items():
        if param in targets:
            readers.setdefault(src, []).append(param)
    files = sorted({shards[src] for src in readers})
    bar = _progress(sum(os.path.getsize(f) for f in files if os.path.isfile(f)), f"loading {path.name}")
    state: Dict[str, torch.Tensor] = {}
    try:
        for shard in files:
            with _open_shard(shard) as f:
                for name in list(f.keys()):
                    if name not in expected:
                        raise ValueError(f"{shard}: holds {name}, which the model does not have "
                                         "(the index does not match the shard)")
                    if name not in readers:
                        continue
                    sl = f.get_slice(name)
                    shape, want = tuple(sl.get_shape()), expected[name]
                    if shape != tuple(want.shape):
                        raise ValueError(f"{name}: checkpoint shape {shape} != model shape "
                                         f"{tuple(want.shape)} (config does not match the weights)")
                    for param in readers[name]:
                        index = sources[param][1]
                        t = f.get_tensor(name) if index is None else sl[index]
                        state[param] = t.to(device=targets[param], dtype=dtype_of(name, t.dtype))
                        del t  # the host copy goes before the next tensor is read
            if bar is not None:
                bar.update(os.path.getsize(shard))
    finally:
        if bar is not None:
            bar.close()
    absent = sorted(p for p in targets if p not in state)
    if absent:
        raise ValueError(f"{path}: tensors listed in the index are missing from their shards: "
                         f"{[sources[p][0] for p in absent[:8]]}{'...' if len(absent) > 8 else ''}")
    return state


def load_pretrained(
    cls,
    path: Union[str, os.PathLike],
    *,
    dtype: torch.dtype = torch.bfloat16,
    device: Union[str, torch.device, None] = None,
    config: Optional[GrokConfig] = None,
    impl: str = "auto",
    device_map=None,
    devices: Optional[Sequence] = None,
    max_memory: Optional[Dict] = None,
    expert_parallel: Union[bool, str] = False,
    process_group=None,
):
    """Build ``cls`` (a Grok) from a grok-convert output directory. See ``Grok.from_pretrained``."""
    dtype = parse_dtype(dtype)
    path = check_model_dir(path)
    if device_map is not None and expert_parallel:
        raise ValueError("pass device_map (several GPUs in this process) or expert_parallel (one "
                         "shard per process), not both")
    if device_map is not None and device is not None:
        raise ValueError("pass device (one device) or device_map (several), not both")
    if device_map is not None and single_device(device_map) is not None:
        device, device_map = single_device(device_map), None  # transformers' device_map="cuda:0" / {"": 0}
    config = _check_config(path, config)
    if dtype == "auto":  # transformers' torch_dtype="auto": what the checkpoint holds (int8 runs in bf16, as released)
        dtype = torch.float32 if config.weight_format == "fp32" else torch.bfloat16

    with torch.device("meta"):
        model = cls(config, dtype=dtype, impl=impl)
    expected = dict(model.state_dict())
    keep_fp32 = {f"{mod_name}.weight" for mod_name, mod in model.named_modules()
                 if isinstance(mod, Weight) and mod.fp32_math}
    # bf16 mode keeps a bf16 embedding table as stored (the model upcasts rows and head slices exactly)
    keep_bf16 = {"embed.weight"} if dtype == torch.bfloat16 else set()

    def dtype_of(name: str, stored: torch.dtype) -> torch.dtype:
        return _target_dtype(name, stored, expected[name].dtype, name in keep_fp32, name in keep_bf16)

    placement = None
    if expert_parallel:
        from grok_torch.parallel.distributed import prepare_expert_parallel

        split = "experts" if expert_parallel is True else expert_parallel
        targets = prepare_expert_parallel(model, split, device=device, process_group=process_group)
    elif device_map is not None:
        from grok_torch.parallel.placement import check_placement_fits, param_devices, plan_placement
        from grok_torch.parallel.sharded_moe import shard_moe_blocks

        placement = plan_placement(config, device_map, devices=devices, max_memory=max_memory, dtype=dtype)
        for d in set(placement.device_map.values()):
            _check_device(d)
        check_placement_fits(config, placement, dtype, max_memory)
        shard_moe_blocks(model, placement.specs)
        targets = param_devices(model, placement)
    else:
        device = _check_device("cpu" if device is None else device)
        targets = {name: device for name, _ in model.named_parameters()}
    state = read_checkpoint(path, expected, targets, checkpoint_sources(model), dtype_of)
    model.load_state_dict(state, strict=True, assign=True)
    if placement is not None:
        from grok_torch.parallel.placement import attach_hooks

        attach_hooks(model, placement)
    return model.eval()
