"""LoRA adapters over the frozen Grok-1 base (int8 as released): attention, every expert, the router.

    add_lora(model, LoRAConfig(rank=8, alpha=16, targets=("attn", "experts")))   # B = 0: logits unchanged
    ... train the adapters (model.lora_parameters()) ...
    save_adapter(model, "out/")            # adapter_config.json + adapter_model.safetensors (PEFT layout)
    load_adapter(model, "out/")            # onto a freshly loaded base; checked against the base config

One low-rank pair per target matrix ``W [in, out]``: ``y = x @ W + scale * (dropout(x) @ A) @ B`` with
``A [in, r]``, ``B [r, out]``, ``scale = alpha / r``; A starts like PEFT's (Kaiming-uniform), B at 0.
Targets:
  "attn":    wq, wk, wv, wo of every layer (``Weight.forward`` adds the adapter's output).
  "experts": w1, w3, w2 of every layer, one pair per expert (``A [E, in, r]``, ``B [E, r, out]``),
             applied inside the MoE block: the gate and up deltas enter before the GELU
             (``grok_torch.kernels.ExpertLoRA``). No ``W + A B`` is ever formed.
  "router":  the [D, E] router; its delta is tiny and is added to the router weight (no dropout).
Adapters are fp32 parameters on their matrix's device; the base stays frozen in its dtype.
Experts split over devices: by experts, each shard holds its experts' adapters; by the hidden dim
(``device_map="ffn"``), each shard holds w1/w3's ``B[:, :, F_j]`` and w2's ``A[:, F_j]`` plus a copy of
w1/w3's ``A`` and w2's ``B``: call ``sync_replicated_grads(model)`` after backward (the copies' gradients
summed, so they stay identical; count ``replicated_copies`` once in a gradient norm). With dropout, each
shard draws its own masks. Not with the hidden dim split across processes.

Saved layout (PEFT's ``save_pretrained`` names: ``base_model.model.<module>.lora_A.weight`` /
``lora_B.weight``, i.e. ``A^T [r, in]`` and ``B^T [out, r]``). A stacked expert matrix is stored the way
PEFT's ``target_parameters`` wrapper lays out ``(E, in, out)`` parameters: ``lora_A.weight [E*r, in]``
(expert e's rows ``e*r ... e*r + r - 1``) and ``lora_B.weight [out, E*r]`` (its columns), whatever the
placement (shards' adapters are concatenated along E or F; replicated ones saved once). Beside
``adapter_config.json`` (read by ``peft.PeftConfig.from_pretrained``) ``grok_adapter.json`` records the
base model's architecture, so an adapter is refused on a model it was not trained for.
"""
from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import nn

__all__ = ["LoRAConfig", "LoRA", "TARGETS", "add_lora", "lora_modules", "lora_state_dict", "save_adapter",
           "load_adapter", "load_adapter_weights", "read_adapter_config", "is_main_process", "replicated_copies",
           "sync_replicated_grads"]

TARGETS = {"attn": ("wq", "wk", "wv", "wo"), "experts": ("w1", "w3", "w2"), "router": ("router",)}
ADAPTER_CONFIG, ADAPTER_WEIGHTS, GROK_ADAPTER = "adapter_config.json", "adapter_model.safetensors", "grok_adapter.json"
PREFIX = "base_model.model."


@dataclass
class LoRAConfig:
    """rank r, alpha (scale = alpha / r), dropout on each adapter's input, which targets (see TARGETS)."""

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: Tuple[str, ...] = ("attn", "experts")

    def __post_init__(self):
        self.targets = tuple(self.targets)
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"LoRA rank must be an int >= 1, got {self.rank!r}")
        if not self.alpha > 0:
            raise ValueError(f"LoRA alpha must be > 0, got {self.alpha!r}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {self.dropout!r}")
        bad = [t for t in self.targets if t not in TARGETS]
        if bad or not self.targets:
            raise ValueError(f"LoRA targets must be a non-empty subset of {tuple(TARGETS)}, got {self.targets}")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


class LoRA(nn.Module):
    """``scale * (dropout(x) @ A) @ B`` for a matrix ``[in, out]``, or a stack ``[E, in, out]`` (A, B per expert)."""

    def __init__(self, shape: Sequence[int], rank: int, alpha: float, dropout: float = 0.0, device=None):
        super().__init__()
        *lead, fan_in, fan_out = shape
        # PEFT's init for lora_A (kaiming_uniform_, a=sqrt(5), on [r, in]): U(-1/sqrt(in), 1/sqrt(in))
        bound = 1.0 / math.sqrt(fan_in)
        self.A = nn.Parameter(torch.empty(*lead, fan_in, rank, device=device).uniform_(-bound, bound))
        self.B = nn.Parameter(torch.zeros(*lead, rank, fan_out, device=device))
        self.rank, self.scale, self.p = rank, alpha / rank, dropout

    @classmethod
    def wrap(cls, A: torch.Tensor, B: torch.Tensor, alpha: float, dropout: float = 0.0) -> "LoRA":
        """An adapter holding these A, B (no draw: the RNG does not move)."""
        lo = cls.__new__(cls)
        nn.Module.__init__(lo)
        lo.A, lo.B = nn.Parameter(A), nn.Parameter(B)
        lo.rank = A.shape[-1]
        lo.scale, lo.p = alpha / lo.rank, dropout
        return lo

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., in] -> fp32 [..., out] (2-D adapters; stacked ones go through kernels.ExpertLoRA)."""
        x = nn.functional.dropout(x.float(), self.p, self.training) if self.p else x.float()
        return (x @ self.A) @ self.B * self.scale

    def delta(self) -> torch.Tensor:
        """``scale * A @ B`` [*lead, in, out] (merging, the router)."""
        return self.A @ self.B * self.scale


def _expert_holders(moe) -> Tuple[Optional[list], bool]:
    """(the modules holding ``moe``'s experts, in layout order, or None if LoRA cannot adapt them; ffn split?)."""
    if hasattr(moe, "w1"):
        return [moe], False
    if not hasattr(moe, "shards"):
        return None, False
    if moe.split == "experts":
        return sorted(moe.shards, key=lambda shard: shard.spec.expert_start), False
    if hasattr(moe, "world"):  # the hidden dim split across processes: not available
        return None, True
    return sorted(moe.shards, key=lambda shard: shard.spec.f_start), True


def _targets(model) -> Iterator[Tuple[str, str, List[nn.Module], bool]]:
    """(target kind, canonical name, modules holding the matrix, F split?) for every matrix LoRA can adapt.

    One holder, except the experts of a ``ShardedMoE``: its shards in layout order. Split by experts
    (``device_map="experts"`` or an accelerate map) their adapters are saved concatenated along E; split
    by the hidden dim (``device_map="ffn"``, the flag True) along F (see ``_FFN``). Either way an adapter
    does not depend on the placement it was trained with. An ``ExpertParallelMoE`` (experts split across
    processes) yields this rank's one shard: experts [r*E/W, (r+1)*E/W) (see ``_ep``).
    """
    for i, layer in enumerate(model.layers):
        for name in TARGETS["attn"]:
            yield "attn", f"layers.{i}.attn.{name}", [getattr(layer.attn, name)], False
        holders, ffn = _expert_holders(layer.moe)
        if holders is not None:
            for name in TARGETS["experts"]:
                yield "experts", f"layers.{i}.moe.{name}", [getattr(h, name) for h in holders], ffn
        yield "router", f"layers.{i}.moe.router", [layer.moe.router], False


# The F split (device_map="ffn"): shard j holds hidden columns F_j of every expert. w1 / w3 (x @ A @ B,
# B [E, r, F]): A is replicated on every shard, B's columns F_j are the shard's. w2 (a @ A @ B, A [E, F, r]):
# A's rows F_j are the shard's, B is replicated; each shard adds (a_j @ A[F_j]) @ B to its partial and the
# partials are summed, so the total is (a @ A) @ B. Per matrix: (replicated tensor, split tensor, its F dim).
_FFN = {"w1": ("A", "B", 2), "w3": ("A", "B", 2), "w2": ("B", "A", 1)}


def _ffn_roles(name: str) -> Tuple[str, str, int]:
    return _FFN[name.rsplit(".", 1)[1]]


def _ffn_pieces(name: str, A: torch.Tensor, B: torch.Tensor, holders) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
    """Each F shard's (A, B) of the canonical [E, in, r] / [E, r, out] pair, on the shard's device."""
    rep, part, dim = _ffn_roles(name)
    full = {"A": A, "B": B}
    sizes = [h.weight.shape[dim] for h in holders]  # w1/w3 [E, D, F_j], w2 [E, F_j, D]
    for h, piece in zip(holders, full[part].split(sizes, dim=dim)):
        dev = h.weight.device
        got = {rep: full[rep].detach().to(dev).clone(), part: piece.detach().to(dev).clone()}
        yield got["A"], got["B"]


def add_lora(model, config: LoRAConfig) -> List[nn.Parameter]:
    """Attach fresh adapters (B = 0) to ``config.targets``; returns the new trainable parameters.

    The base stays frozen (``requires_grad=False``). Experts can be adapted on one device, with the
    experts split over devices (``device_map`` "experts" or accelerate's maps), with their hidden dim
    split over devices (``device_map="ffn"``: the one-device draw, sliced along F / replicated per shard,
    see ``_FFN``; the replicated copies are kept equal by ``sync_replicated_grads``) and across processes
    (``expert_parallel=True``: each rank holds its experts' adapters, initialised as the slice of the
    one-process [E, in, r] draw, so every rank's replicated adapters and the run match one process);
    not with the hidden dim split across processes (``expert_parallel`` with "ffn").
    """
    if model.lora_config is not None:
        raise ValueError("the model already has LoRA adapters (load the base model again to start over)")
    if "experts" in config.targets and not all(_expert_holders(layer.moe)[0] is not None for layer in model.layers):
        kind = type(model.layers[0].moe).__name__
        split = getattr(model.layers[0].moe, "split", "across processes")
        raise NotImplementedError(f"LoRA on experts is not available with the experts' hidden dim split across "
                                  f"processes ({kind}, {split}): use expert parallelism by experts, "
                                  f"device_map='ffn' in one process, or --lora-targets attn")
    params = []
    ep = _ep(model)
    for kind, name, holders, ffn in _targets(model):
        if kind in config.targets:
            if ffn:  # one draw of the whole [E, in, r] A (as on one device), split / replicated over the shards
                w = holders[0].weight
                dim = _ffn_roles(name)[2]
                shape = list(w.shape)
                shape[dim] = sum(h.weight.shape[dim] for h in holders)
                full = LoRA(shape, config.rank, config.alpha, config.dropout, device=w.device)
                for module, (a, b) in zip(holders, _ffn_pieces(name, full.A, full.B, holders)):
                    module.lora = LoRA.wrap(a, b, config.alpha, config.dropout)
                    params += [module.lora.A, module.lora.B]
                continue
            for module in holders:
                w = module.weight
                if kind == "experts" and ep is not None:  # draw all E experts' A (the RNG moves alike on every rank)
                    lo = LoRA((ep.num_experts, *w.shape[1:]), config.rank, config.alpha, config.dropout, device=w.device)
                    part = slice(ep.rank * w.shape[0], (ep.rank + 1) * w.shape[0])  # experts [r*E/W, (r+1)*E/W)
                    lo.A, lo.B = (nn.Parameter(t.data[part].clone()) for t in (lo.A, lo.B))
                    module.lora = lo
                else:
                    module.lora = LoRA(w.shape, config.rank, config.alpha, config.dropout, device=w.device)
                params += [module.lora.A, module.lora.B]
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    model.lora_config = config
    return params


def lora_modules(model) -> Dict[str, LoRA]:
    """{module path: its adapter} for every adapted matrix (a sharded expert matrix: one per shard)."""
    return {f"{path}.lora": m for path, m in model.named_modules() if isinstance(m, LoRA)}


def _adapted(model) -> Iterator[Tuple[str, List[LoRA], bool]]:
    for _, name, holders, ffn in _targets(model):
        loras = [getattr(h, "lora", None) for h in holders]
        if loras[0] is not None:
            yield name, loras, ffn


def replicated_copies(model) -> List[List[nn.Parameter]]:
    """The adapter tensors held in several copies (``device_map="ffn"``: each expert matrix's replicated
    A or B, one copy per shard, in shard order); empty for every other placement."""
    return [[getattr(lo, _ffn_roles(name)[0]) for lo in loras] for name, loras, ffn in _adapted(model) if ffn]


@torch.no_grad()
def sync_replicated_grads(model) -> None:
    """After backward: every copy of a replicated adapter gets the sum of the copies' gradients (shard order,
    summed on the first copy's device; a missing gradient counts as zeros), so the copies' gradient is the
    one-device gradient and an optimizer step keeps them identical. No-op without replicated adapters."""
    for copies in replicated_copies(model):
        grads = [p.grad for p in copies]
        if all(g is None for g in grads):
            continue
        dev = copies[0].device
        total = None
        for g in grads:
            if g is not None:
                total = g.to(dev) if total is None else total + g.to(dev)
        for p in copies:
            p.grad = total.to(p.device, copy=True)


class _EP:
    """The expert parallelism of a model: its process group, this rank, the world, E (all experts)."""

    def __init__(self, moe):
        self.group, self.rank, self.world = moe.group, moe.rank, moe.world
        self.num_experts = moe.experts_per_rank * moe.world

    def gather(self, t: torch.Tensor) -> torch.Tensor:
        """Every rank's ``t`` [E_local, ...] concatenated in rank order (all ranks must call it)."""
        import torch.distributed as dist

        parts = [torch.empty_like(t) for _ in range(self.world)]
        dist.all_gather(parts, t.contiguous(), group=self.group)
        return torch.cat(parts)


def _ep(model) -> Optional[_EP]:
    """``_EP`` when the model's experts are split across processes (world size > 1), else None."""
    moe = model.layers[0].moe if len(model.layers) else None
    if moe is not None and getattr(moe, "world", 1) > 1 and hasattr(moe, "group"):
        return _EP(moe)
    return None


def is_main_process(model) -> bool:
    """False on the ranks > 0 of an expert-parallel model (rank 0 writes the files)."""
    ep = _ep(model)
    return ep is None or ep.rank == 0


def lora_state_dict(model) -> Dict[str, torch.Tensor]:
    """The adapters in the saved (PEFT) layout: ``base_model.model.<name>.lora_A.weight`` [E*r or r, in] etc.

    Expert parallelism: a collective (every rank must call it): the experts' adapters of all ranks are
    gathered (fp32, rank order = expert order), so every rank returns the one-process layout."""
    out, ep = {}, _ep(model)
    for name, loras, ffn in _adapted(model):
        if ffn:  # the replicated tensor from the first shard, the split one concatenated along F
            rep, part, dim = _ffn_roles(name)
            got = {rep: getattr(loras[0], rep).detach().cpu(),
                   part: torch.cat([getattr(lo, part).detach().cpu() for lo in loras], dim=dim)}
            A, B = got["A"], got["B"]
        elif len(loras) > 1:
            A, B = (torch.cat([getattr(lo, w).detach().cpu() for lo in loras]) for w in "AB")
        else:
            A, B = loras[0].A.detach().cpu(), loras[0].B.detach().cpu()
        if A.dim() == 3 and ep is not None:
            dev = loras[0].A.device  # NCCL gathers CUDA tensors
            A, B = (ep.gather(torch.cat([getattr(lo, w).detach() for lo in loras]).to(dev)).cpu() for w in "AB")
        if A.dim() == 3:  # [E, in, r] -> [E*r, in];  [E, r, out] -> [out, E*r]
            a, b = A.transpose(1, 2).reshape(-1, A.shape[1]), B.permute(2, 0, 1).reshape(B.shape[2], -1)
        else:
            a, b = A.T, B.T
        out[f"{PREFIX}{name}.lora_A.weight"] = a.contiguous()
        out[f"{PREFIX}{name}.lora_B.weight"] = b.contiguous()
    return out


def _peft_config(model, config: LoRAConfig, base_model: Optional[str]) -> dict:
    mods = [n for t in config.targets if t != "experts" for n in TARGETS[t]]
    params = [f"moe.{n}.weight" for n in TARGETS["experts"]] if "experts" in config.targets else []
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": config.rank, "lora_alpha": config.alpha,
            "lora_dropout": config.dropout, "bias": "none", "target_modules": mods, "target_parameters": params,
            "base_model_name_or_path": base_model, "inference_mode": True, "fan_in_fan_out": False}


def save_adapter(model, out_dir, *, base_model: Optional[str] = None, overwrite: bool = True) -> Path:
    """Write the adapters to ``out_dir`` (created; files replaced atomically, nothing half-written).

    Expert parallelism: every rank calls it (the experts' adapters are gathered); rank 0 writes."""
    from safetensors.torch import save_file

    config = model.lora_config
    if config is None:
        raise ValueError("the model has no LoRA adapters to save (add_lora or load_adapter first)")
    out = Path(out_dir)
    state = lora_state_dict(model)  # first: under expert parallelism every rank takes part in the gather
    if not is_main_process(model):
        return out
    out.mkdir(parents=True, exist_ok=True)
    if not overwrite and (out / ADAPTER_WEIGHTS).exists():
        raise FileExistsError(f"{out / ADAPTER_WEIGHTS} exists (pass overwrite=True to replace it)")
    files = {
        ADAPTER_CONFIG: json.dumps(_peft_config(model, config, base_model), indent=2),
        GROK_ADAPTER: json.dumps({"format": 1, "lora": asdict(config), "base_config": model.config.to_dict(),
                                  "expert_layout": "lora_A [E*r, in] rows e*r.., lora_B [out, E*r] cols e*r.."},
                                 indent=2),
    }
    with tempfile.TemporaryDirectory(dir=out, prefix=".tmp-") as tmp:
        save_file(state, os.path.join(tmp, ADAPTER_WEIGHTS), metadata={"format": "pt"})
        for name, text in files.items():
            Path(tmp, name).write_text(text + "\n")
        for name in (ADAPTER_WEIGHTS, *files):
            os.replace(os.path.join(tmp, name), out / name)
    return out


def read_adapter_config(adapter_dir) -> Tuple[LoRAConfig, dict]:
    """(LoRAConfig, base config dict) of a saved adapter, with one-line errors naming the file."""
    d = Path(adapter_dir)
    if not d.is_dir():
        raise FileNotFoundError(f"adapter directory {d} does not exist")
    for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS, GROK_ADAPTER):
        if not (d / name).is_file():
            raise FileNotFoundError(f"{d / name} is missing: not an adapter written by grok_torch (save_adapter / "
                                    f"grok-finetune)")
    try:
        meta = json.loads((d / GROK_ADAPTER).read_text())
        return LoRAConfig(**meta["lora"]), meta["base_config"]
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{d / GROK_ADAPTER} is not a valid adapter description: {e}") from None


def load_adapter(model, adapter_dir) -> LoRAConfig:
    """Attach the adapters saved in ``adapter_dir``; refuses a model of another architecture."""
    config, base = read_adapter_config(adapter_dir)
    mine = model.config.to_dict()
    diff = sorted(k for k in set(base) | set(mine)
                  if k not in ("name", "weight_format") and base.get(k) != mine.get(k))
    if diff:
        raise ValueError(f"adapter {adapter_dir} was trained for another base model: "
                         + ", ".join(f"{k} {base.get(k)!r} (model: {mine.get(k)!r})" for k in diff[:4]))
    add_lora(model, config)
    load_adapter_weights(model, adapter_dir)
    return config


def load_adapter_weights(model, adapter_dir) -> None:
    """Copy the saved tensors of ``adapter_dir`` into the model's existing adapters (same config).

    Expert parallelism: each rank reads the file and keeps its experts' slice (no collective)."""
    from safetensors.torch import load_file

    want = {f"{PREFIX}{name}.lora_{w}.weight" for name, _, _ in _adapted(model) for w in "AB"}
    got = load_file(str(Path(adapter_dir) / ADAPTER_WEIGHTS))
    missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
    if missing or extra:
        raise ValueError(f"adapter {adapter_dir}: tensors do not match its config (missing {missing[:2]}, "
                         f"unexpected {extra[:2]})")
    ep = _ep(model)
    for name, loras, ffn in _adapted(model):
        a, b = got[f"{PREFIX}{name}.lora_A.weight"], got[f"{PREFIX}{name}.lora_B.weight"]
        if loras[0].A.dim() == 3:
            E = sum(lo.A.shape[0] for lo in loras) if ep is None and not ffn else \
                loras[0].A.shape[0] if ffn else ep.num_experts
            fin, r = loras[0].A.shape[1:]
            if ffn and _ffn_roles(name)[1] == "A":  # w2: in = F, split over the shards
                fin = sum(lo.A.shape[1] for lo in loras)
            if a.numel() != E * r * fin:
                raise ValueError(f"adapter {adapter_dir}: {name}.lora_A has shape {tuple(a.shape)}, expected "
                                 f"({E * r}, {fin})")
            a, b = a.reshape(E, r, fin).transpose(1, 2), b.reshape(b.shape[0], E, r).permute(1, 2, 0)
            if ep is not None:  # this rank's experts
                n = loras[0].A.shape[0]
                a, b = (t[ep.rank * n:(ep.rank + 1) * n] for t in (a, b))
            if ffn:
                rep, part, dim = _ffn_roles(name)
                full = {"A": a, "B": b}
                sizes = [getattr(lo, part).shape[dim] for lo in loras]
                if full[part].shape[dim] != sum(sizes):
                    raise ValueError(f"adapter {adapter_dir}: {name}.lora_{part} has shape "
                                     f"{tuple(got[f'{PREFIX}{name}.lora_{part}.weight'].shape)}, which does not "
                                     f"hold the {sum(sizes)} hidden columns")
                pieces = [(lo, *((full[rep], p) if rep == "A" else (p, full[rep])))
                          for lo, p in zip(loras, full[part].split(sizes, dim=dim))]
            else:
                sizes = [lo.A.shape[0] for lo in loras]
                pieces = zip(loras, a.split(sizes), b.split(sizes))
        else:
            pieces = [(loras[0], a.T, b.T)]
        for lora, pa, pb in pieces:
            for dst, src, which in ((lora.A, pa, "lora_A"), (lora.B, pb, "lora_B")):
                if dst.shape != src.shape:
                    raise ValueError(f"adapter {adapter_dir}: {name}.{which} has shape {tuple(src.shape)}, "
                                     f"expected {tuple(dst.shape)}")
                with torch.no_grad():
                    dst.copy_(src)
