"""Where every tensor of a Grok model goes in one process: device maps, applied from outside the model.

    device_map="experts" | "ffn"         our splits over ``devices`` (default: every visible GPU):
                                          layer i's attention, norms, router and KV cache on GPU
                                          i*n//L; the experts split as ``shard_specs`` says;
                                          embedding and final norm (the tied head) on the first GPU
    device_map="auto" | "balanced" | "balanced_low_0" | "sequential"
                                          accelerate's own planners (get_balanced_memory,
                                          infer_auto_device_map) over modules in which every
                                          expert is addressable: ``layers.{i}.moe.shards.{e}``
    device_map={module name: device}     accelerate's format, same addressable modules

The result is a ``Placement``: the expert shards to build and a device per module (a partition of
the model in accelerate's format, kept as ``model.hf_device_map``). ``attach_hooks`` then adds
accelerate's ``AlignDevicesHook`` to each decoder layer (its inputs move to the layer's device) and
to the model (tokens in on the embedding's device, logits back where the tokens came from).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional, Sequence, Union

import torch
from torch import nn

from grok_torch.config import GrokConfig
from grok_torch.parallel.sharded_moe import SPLITS, ShardSpec, shard_specs

__all__ = ["Placement", "plan_placement", "attach_hooks", "device_bytes", "visible_gpus", "ACCELERATE_MAPS"]

ACCELERATE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")
# modules accelerate may not cut: whole attention blocks, norms, routers and expert shards
NO_SPLIT = ["Attention", "RMSNorm", "Router", "ExpertShard"]
LAYER_PARTS = ("attn_norm", "attn", "attn_post_norm", "moe_norm", "moe.router", "moe_post_norm")

DeviceLike = Union[int, str, torch.device]


def as_device(d: DeviceLike) -> torch.device:
    """accelerate's device spelling (0 = cuda:0, "cpu", "cuda:1", torch.device) as a torch.device."""
    if isinstance(d, bool):
        raise ValueError(f"not a device: {d!r}")
    if isinstance(d, int):
        return torch.device("cuda", d)
    if d == "disk":
        raise ValueError("offloading to 'disk' is not supported: give every module a GPU or 'cpu'")
    try:
        return torch.device(d)
    except (RuntimeError, TypeError):
        raise ValueError(f"not a device: {d!r}") from None


def accelerate_name(d: torch.device) -> Union[int, str]:
    """torch.device -> the value accelerate writes in a device map (GPU index or device string)."""
    return d.index if d.type == "cuda" and d.index is not None else str(d)


def visible_gpus() -> List[torch.device]:
    return [torch.device("cuda", i) for i in range(torch.cuda.device_count())]


@dataclass
class Placement:
    """Expert shards (``specs``, applied with ``shard_moe_blocks``) and a device per module."""

    split: str                           # "experts" | "ffn" | "accelerate" (auto / dict maps: one expert a shard)
    specs: List[ShardSpec]
    device_map: Dict[str, torch.device]  # partition of the model: module name -> device

    @property
    def layer_devices(self) -> List[torch.device]:
        n = 1 + max(int(k.split(".")[1]) for k in self.device_map if k.startswith("layers."))
        return [self.device_map[f"layers.{i}.attn"] for i in range(n)]

    @property
    def main_device(self) -> torch.device:
        return self.device_map["embed"]

    def shard_device(self, layer: int, shard: int) -> torch.device:
        return self.device_map[f"layers.{layer}.moe.shards.{shard}"]

    def hf_device_map(self) -> Dict[str, Union[int, str]]:
        return {k: accelerate_name(v) for k, v in self.device_map.items()}


def _partition(cfg: GrokConfig, main: torch.device, homes: Sequence[torch.device],
               shard_devs: Sequence[Sequence[torch.device]]) -> Dict[str, torch.device]:
    m = {"embed": main}
    for i, home in enumerate(homes):
        for part in LAYER_PARTS:
            m[f"layers.{i}.{part}"] = home
        for j, d in enumerate(shard_devs[i]):
            m[f"layers.{i}.moe.shards.{j}"] = d
    m["norm"] = main  # the final norm feeds the tied head, which lives with the embedding
    return m


def plan_placement(
    cfg: GrokConfig,
    device_map: Union[str, Mapping[str, DeviceLike]],
    *,
    devices: Optional[Sequence[DeviceLike]] = None,
    max_memory: Optional[Mapping[DeviceLike, Union[int, str]]] = None,
    dtype: torch.dtype = torch.bfloat16,
) -> Placement:
    """Resolve a ``device_map`` (see the module docstring) for a model of ``cfg``. Nothing is loaded.

    ``devices`` (our splits only): the devices to spread over, in order; default every visible GPU,
    or the GPUs named in ``max_memory``. Device ids are not checked here (a meta-device plan can name
    GPUs this machine lacks); loading checks them.
    """
    if isinstance(device_map, str):
        if device_map in SPLITS:
            return _split_placement(cfg, device_map, devices, max_memory)
        if device_map in ACCELERATE_MAPS:
            return _accelerate_placement(cfg, device_map, max_memory, dtype)
        raise ValueError(f"device_map must be one of {SPLITS + ACCELERATE_MAPS} or a {{module: device}} dict, "
                         f"got {device_map!r}")
    if isinstance(device_map, Mapping):
        return _dict_placement(cfg, {k: as_device(v) for k, v in device_map.items()}, strict=True)
    raise TypeError(f"device_map must be a str or a dict, got {type(device_map).__name__}")


def _split_placement(cfg, split, devices, max_memory) -> Placement:
    if devices is None and max_memory:
        devices = [k for k in max_memory if not (isinstance(k, str) and k in ("cpu", "disk", "mps"))]
    devs = [as_device(d) for d in devices] if devices is not None else visible_gpus()
    if not devs:
        raise ValueError(f"device_map={split!r} spreads the model over GPUs and none is visible "
                         "(pass devices=[...] to choose them, or device='cpu' for one device)")
    specs = shard_specs(cfg, split, len(devs))
    L = cfg.num_layers
    homes = [devs[i * len(devs) // L] for i in range(L)]
    return Placement(split, specs, _partition(cfg, devs[0], homes, [devs] * L))


def _one_expert_shards(cfg: GrokConfig) -> List[ShardSpec]:
    return shard_specs(cfg, "experts", cfg.num_experts)


def _meta_model(cfg: GrokConfig, dtype: torch.dtype) -> nn.Module:
    from grok_torch.model import Grok
    from grok_torch.parallel.sharded_moe import shard_moe_blocks

    with torch.device("meta"):
        model = Grok(cfg, dtype=dtype)
    shard_moe_blocks(model, _one_expert_shards(cfg))
    return model


def _accelerate_placement(cfg, kind, max_memory, dtype) -> Placement:
    """accelerate plans on a meta model whose experts are one module each; the result is then
    normalised: a layer's norms and router join its attention, the final norm joins the embedding."""
    from accelerate.utils import get_balanced_memory, infer_auto_device_map

    model = _meta_model(cfg, dtype)
    if kind != "sequential":
        max_memory = get_balanced_memory(model, max_memory=max_memory, no_split_module_classes=NO_SPLIT,
                                         low_zero=kind == "balanced_low_0")
    found = infer_auto_device_map(model, max_memory=max_memory, no_split_module_classes=NO_SPLIT)
    if any(v == "disk" for v in found.values()):
        raise ValueError(f"device_map={kind!r}: the model does not fit the devices' memory "
                         f"({max_memory}) without disk offload, which is not supported; see grok-plan")
    return _dict_placement(cfg, {k: as_device(v) for k, v in found.items()}, strict=False)


def _dict_placement(cfg: GrokConfig, given: Dict[str, torch.device], strict: bool) -> Placement:
    """A {module prefix: device} dict over one-expert shards -> our partition.

    Every module takes the device of the longest key that is a prefix of its name. ``strict`` (a
    user's dict): a layer's norms and router must be on its attention's device and the final norm on
    the embedding's, else a ValueError says so; otherwise (accelerate's plan) they are moved there.
    """
    def lookup(name: str) -> torch.device:
        d = _device_of(given, name)
        if d is None:
            raise ValueError(f"device_map does not place {name!r}: add it (or a parent module) to the map")
        return d

    known = {name for name, _ in _meta_model(cfg, torch.float32).named_modules()}
    for k in given:
        if k not in known:
            raise ValueError(f"device_map key {k!r} is not a module of this model (keys look like 'embed', "
                             f"'layers', 'layers.3', 'layers.3.attn', 'layers.3.moe.shards.5' (expert 5), 'norm')")
    main = lookup("embed.weight")
    E, L = cfg.num_experts, cfg.num_layers
    homes, shard_devs = [], []
    for i in range(L):
        home = lookup(f"layers.{i}.attn.wq.weight")
        for part in LAYER_PARTS:
            d = lookup(f"layers.{i}.{part}.weight" if part != "attn" else f"layers.{i}.attn.wo.weight")
            if strict and d != home:
                raise ValueError(f"device_map puts layers.{i}.{part} on {d} and layers.{i}.attn on {home}: a layer's "
                                 "norms, router and attention share a device (only its experts "
                                 f"layers.{i}.moe.shards.N may go elsewhere)")
        homes.append(home)
        shard_devs.append([lookup(f"layers.{i}.moe.shards.{e}.w1.weight") for e in range(E)])
    if strict and lookup("norm.weight") != main:
        raise ValueError(f"device_map puts norm on {lookup('norm.weight')} and embed on {main}: the final norm "
                         "feeds the tied head, which uses the embedding; give them one device")
    return Placement("accelerate", _one_expert_shards(cfg), _partition(cfg, main, homes, shard_devs))


def _device_of(device_map: Mapping[str, torch.device], name: str) -> Optional[torch.device]:
    """The device of the longest key of ``device_map`` naming ``name`` or a module above it ("" = all)."""
    best = None
    for k in device_map:
        if (k == "" or name == k or name.startswith(k + ".")) and (best is None or len(k) > len(best)):
            best = k
    return None if best is None else device_map[best]


def param_devices(model: nn.Module, placement: Placement) -> Dict[str, torch.device]:
    """Parameter name -> the device its module is placed on."""
    return {name: _device_of(placement.device_map, name) for name, _ in model.named_parameters()}


def device_bytes(model: nn.Module, placement: Placement) -> Dict[torch.device, int]:
    """Bytes of parameters each device holds under ``placement`` (model sharded like it; meta is fine)."""
    out: Dict[torch.device, int] = {}
    devices = param_devices(model, placement)
    for name, p in model.named_parameters():
        out[devices[name]] = out.get(devices[name], 0) + p.numel() * p.element_size()
    return out


def attach_hooks(model: nn.Module, placement: Placement) -> None:
    """accelerate's AlignDevicesHook on every decoder layer (inputs to the layer's device), on the
    final norm (to the embedding's device, for the tied head) and on the model (tokens to the
    embedding's device, logits back to the tokens' device). The KV cache is not moved: each layer's
    K/V already live on its device (``Grok.new_cache``)."""
    from accelerate.hooks import AlignDevicesHook, add_hook_to_module

    for layer, dev in zip(model.layers, placement.layer_devices):
        add_hook_to_module(layer, AlignDevicesHook(execution_device=dev))
    add_hook_to_module(model.norm, AlignDevicesHook(execution_device=placement.main_device))
    add_hook_to_module(model, AlignDevicesHook(execution_device=placement.main_device, io_same_device=True))
    model.hf_device_map = placement.hf_device_map()


def check_placement_fits(cfg: GrokConfig, placement: Placement, dtype: torch.dtype,
                         max_memory: Optional[Mapping] = None) -> None:
    """For our splits over GPUs: the memory planner's verdict at the model's full context, batch 1,
    before anything is read. Raises the planner's ``PlanError`` (a ValueError) with its report."""
    devs = sorted(set(placement.device_map.values()), key=str)
    if placement.split not in SPLITS:
        return  # accelerate's maps sized themselves against max_memory
    if not all(d.type == "cuda" for d in devs):
        return  # host memory is the operating system's to judge
    from grok_torch.plan import check_fits

    if max_memory:
        from accelerate.utils import convert_file_size_to_int

        mem = min(convert_file_size_to_int(v) for k, v in max_memory.items() if as_device(k) in devs)
    else:
        mem = min(torch.cuda.get_device_properties(d).total_memory for d in devs)
    check_fits(cfg, gpus=len(placement.specs), gpu_mem=mem, split=placement.split,
               act_dtype="bf16" if dtype == torch.bfloat16 else "fp32")
