"""grok-plan: will a Grok model fit these GPUs, and which expert split decodes faster? (issue #8)

Answered from the config alone, before a byte is loaded, so that ``from_pretrained`` can refuse a
placement that cannot fit instead of dying with an out-of-memory error halfway through 300 GB.

Placement (``placement``; the loader places tensors the same way), n GPUs, L layers:
* layer i lives on its "home" GPU ``i * n // L``: attention, 4 RMSNorms, router, KV cache;
* GPU 0 also holds the embedding (fp32, also the tied LM head) and the final norm;
* split "experts": GPU j holds experts ``j*E/n ...`` of every layer (n must divide E);
  split "ffn": GPU j holds hidden columns ``j*F/n ...`` of w1/w3 (rows of w2) of every expert
  (n must divide F and, for int8, w2's 8 scale groups, so a slice holds whole groups).
In-memory dtypes follow loading.py: int8 weights + bf16 scales stay as stored; float experts take
the activation dtype; attention keeps an fp32 checkpoint's fp32 (its math is fp32); the embedding,
norms and routers are fp32 (the converter's default).

Working memory is that of generation's largest forward, one prefill chunk (grok_torch/decode.py
``prefill``): Tc = min(context, prefill_chunk) positions x batch B through every layer, attention
reading the whole KV cache in place. Per GPU: activations (6 fp32 [B,Tc,D]) + the largest phase it
runs, phases running one after another: attention on a layer's home GPU (fp32 q with its RoPE
temporaries, k, v, the kernel's output o and the o_proj output; on CUDA the int8 GEMM dequantises
in registers and flash attention keeps its score tiles on chip, so neither a weight copy nor a
score tensor exists), the MoE for B*Tc*k routed rows, and on GPU 0 the head at each row's last
position only (``logits_to_keep``: 2 fp32 [B,V]). The KV cache (2 x [B, context, Hkv, dh] per
layer) and a per-GPU reserve (CUDA context, allocator) come on top. A decode step (Tc = 1) needs
less than any prefill chunk; the int8 GEMM's split-K partials (small M only) are a few MB, within the
reserve.

Units: GB = 1e9 bytes and GiB = 2**30. "80GB" is 80e9 bytes, below the 79.6 GiB (85.5e9) an H100
80GB reports, so verdicts err on the safe side; ``--gpu-mem 79.6GiB`` uses the whole card.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from fractions import Fraction
from math import comb, prod
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple, Union

from grok_torch.config import WEIGHT_FORMATS, GrokConfig

__all__ = ["SPLITS", "PlanError", "MemoryPlan", "Placed", "parse_bytes", "placement", "split_error",
           "weight_bytes_per_device", "plan_memory", "check_fits", "main"]

SPLITS = ("experts", "ffn")
ACT_BYTES = {"bf16": 2, "fp32": 4}
FORMAT_BYTES = {"int8": 1, "bf16": 2, "fp32": 4}
H100_BW = 3.35e12        # H100 SXM HBM3, bytes/s
PREFILL_CHUNK = 2048     # prompt positions per prefill forward (generate.stream's default)
_UNITS = {"": 1, "b": 1, "k": 1e3, "kb": 1e3, "m": 1e6, "mb": 1e6, "g": 1e9, "gb": 1e9, "t": 1e12, "tb": 1e12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
Bytes = Union[int, float, str]


class PlanError(ValueError):
    """The model does not fit; the message is the verdict line followed by the whole report."""


def parse_bytes(value: Bytes) -> int:
    """'80GB' -> 80e9, '80GiB' -> 80 * 2**30, '81920MiB', '1.5GiB', or plain bytes (int or '123')."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        n = value
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-z]*)\s*", str(value).lower())
        if not m or m.group(2) not in _UNITS:
            raise ValueError(f"cannot read {value!r} as a size (e.g. 80GB, 79.6GiB, 81920MiB, 85899345920)")
        n = float(m.group(1)) * _UNITS[m.group(2)]
    if n < 0:
        raise ValueError(f"a size cannot be negative, got {value!r}")
    return int(n)


def split_error(config: GrokConfig, gpus: int, split: str, weight_format: Optional[str] = None) -> Optional[str]:
    """Why ``split`` cannot use ``gpus`` GPUs (naming counts that work), or None when it can."""
    E, F = config.num_experts, config.ffn_size
    G = config.quant_groups["w2"] if (weight_format or config.weight_format) == "int8" else 1
    if split not in SPLITS:
        return f"split must be one of {SPLITS}, got {split!r}"
    if gpus < 1:
        return f"need at least 1 GPU, got {gpus}"
    ok = {"experts": lambda m: E % m == 0, "ffn": lambda m: F % m == 0 and (G == 1 or G % m == 0)}
    if ok[split](gpus):
        return None
    why = (f"split 'experts' needs a GPU count that divides the {E} experts" if split == "experts" else
           f"split 'ffn' needs a GPU count that divides ffn_size {F}" + (f" and w2's {G} int8 scale groups" if G > 1 else ""))
    other = SPLITS[split == "experts"]
    counts = "; ".join(f"{s}: {', '.join(str(m) for m in range(1, 65) if ok[s](m))}" for s in SPLITS)
    alt = f"use split '{other}' (--device-map {other})" if ok[other](gpus) else f"GPU counts that work (up to 64): {counts}"
    return f"{why}, got {gpus}: {alt}"


class Placed(NamedTuple):
    """One parameter, or one GPU's slice of it: ``full[index]`` (index ``()``: all of it) has ``shape``."""

    name: str
    gpu: int
    shape: Tuple[int, ...]
    itemsize: int
    index: Tuple[slice, ...] = ()


def placement(config: GrokConfig, gpus: int, split: str = "experts", weight_format: Optional[str] = None,
              act_dtype: str = "bf16") -> List[Placed]:
    """Every parameter (state_dict names) with its GPU, local shape, bytes per element and the
    slice of the checkpoint tensor it holds; an expert tensor appears once per GPU. The one
    description of where weights go: the planner counts it, the loader can follow it."""
    c, fmt, n = config, weight_format or config.weight_format, gpus
    err = split_error(c, n, split, fmt)
    if err:
        raise ValueError(err)
    q, a = fmt == "int8", ACT_BYTES[act_dtype]
    attn_b, exp_b = (1, 1) if q else (max(FORMAT_BYTES[fmt], a), a)
    D, F, E, L, G = c.d_model, c.ffn_size, c.num_experts, c.num_layers, c.quant_groups
    out = [Placed("embed.weight", 0, (c.vocab_size, D), 4), Placed("norm.weight", 0, (D,), 4)]

    def mat(name, gpu, shape, groups, itemsize, index=(), scale_index=None):
        out.append(Placed(name + ".weight", gpu, shape, itemsize, index))
        if q:  # scales [*lead, G, out], bf16
            out.append(Placed(name + ".scales", gpu, (*shape[:-2], groups, shape[-1]), 2,
                              index if scale_index is None else scale_index))

    (e_loc, f_loc), all_ = (E // n, F) if split == "experts" else (E, F // n), slice(None)
    g2 = G["w2"] // n if split == "ffn" and q else G["w2"]  # w2's scale groups per GPU
    for i in range(L):
        home, p = i * n // L, f"layers.{i}."
        for norm in ("attn_norm", "attn_post_norm", "moe_norm", "moe_post_norm"):
            out.append(Placed(p + norm + ".weight", home, (D,), 4))
        for w, shape in (("wq", (D, c.q_size)), ("wk", (D, c.kv_size)), ("wv", (D, c.kv_size)), ("wo", (c.q_size, D))):
            mat(p + "attn." + w, home, shape, G[w], attn_b)
        out.append(Placed(p + "moe.router.weight", home, (D, E), 4))
        for j in range(n):
            if split == "experts":
                up = down = down_s = (slice(j * e_loc, (j + 1) * e_loc),)
            else:
                f = slice(j * f_loc, (j + 1) * f_loc)
                up, down, down_s = (all_, all_, f), (all_, f), (all_, slice(j * g2, (j + 1) * g2))
            mat(p + "moe.w1", j, (e_loc, D, f_loc), G["w1"], exp_b, up)
            mat(p + "moe.w3", j, (e_loc, D, f_loc), G["w3"], exp_b, up)
            mat(p + "moe.w2", j, (e_loc, f_loc, D), g2, exp_b, down, down_s)
    return out


def weight_bytes_per_device(config: GrokConfig, n: int, split: str = "experts", weight_format: Optional[str] = None,
                            act_dtype: str = "bf16") -> List[int]:
    """Exact parameter bytes on each of ``n`` GPUs (weights, scales, norms, routers, embedding)."""
    per = [0] * n
    for t in placement(config, n, split, weight_format, act_dtype):
        per[t.gpu] += prod(t.shape) * t.itemsize
    return per


def _prefill_tokens(context: int, prefill_chunk: Optional[int]) -> int:
    """Positions per prefill forward: Tc = min(context, prefill_chunk); the whole context when None."""
    return context if prefill_chunk is None else min(context, prefill_chunk)


def _touched(E: int, k: int, B: int) -> float:
    """Expected distinct experts chosen by B tokens taking k of E each (uniform routing)."""
    return E * (1 - ((E - k) / E) ** B)


def _busiest(E: int, k: int, B: int, n: int) -> float:
    """Expected max over n GPUs (E/n experts each) of the chosen experts one GPU holds, exactly for
    uniform routing: p[s] = P(the chosen set is one given set of s experts) by inclusion-exclusion,
    and a DP over GPUs counts the sets by (size, most experts on one GPU)."""
    m, tot = E // n, comb(E, k) ** B
    p = [Fraction(sum((-1) ** (s - t) * comb(s, t) * comb(t, k) ** B for t in range(s + 1)), tot) for s in range(E + 1)]
    dist: Dict[Tuple[int, int], int] = {(0, 0): 1}
    for _ in range(n):
        nxt: Dict[Tuple[int, int], int] = defaultdict(int)
        for (s, mx), w in dist.items():
            for c in range(m + 1):
                nxt[s + c, max(mx, c)] += w * comb(m, c)
        dist = nxt
    return float(sum(w * p[s] * mx for (s, mx), w in dist.items()))


@dataclass
class MemoryPlan:
    """Per-GPU bytes (``devices``), the verdict, what would fit instead and the decode floors."""

    inputs: dict
    devices: List[dict]
    fits: bool
    verdict: str
    suggestions: List[str] = field(default_factory=list)
    decode_floor_s: Dict[str, Optional[float]] = field(default_factory=dict)
    decode_bytes: Dict[str, Optional[dict]] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    def report(self) -> str:
        gb = lambda b: f"{b / 1e9:.1f}"  # noqa: E731
        i, d0 = self.inputs, self.devices[0]["terms"]
        term = lambda b: f"{b / 1e9:.1f}" if b == 0 or b >= 5e7 else f"{b / 1e9:.4f}"  # noqa: E731  (1 MB: 0.0010)
        chunk = "prefill in one forward" if i["prefill_chunk"] is None else f"prefill chunk {i['prefill_chunk']}"
        tc = _prefill_tokens(i["context"], i["prefill_chunk"])
        lines = [f"{i['config']}: {i['weight_format']} weights, {i['act_dtype']} activations, {i['gpus']} GPU{'s' * (i['gpus'] > 1)} x "
                 f"{gb(i['gpu_mem'][0])} GB, split {i['split']}, context {i['context']}, batch {i['batch']}, "
                 f"{chunk} (GB = 1e9 bytes)",
                 "", "GPU  layers  " + ("experts" if i["split"] == "experts" else "ffn cols   ")
                 + "  weights  KV cache  working  reserve    total  capacity"]
        for d in self.devices:
            lay = f"{d['layers'][0]}-{d['layers'][1] - 1}" if d["layers"] else "-"
            r = d["experts"] if i["split"] == "experts" else d["ffn"]
            part = f"{r[0]}" if r[0] == r[1] else f"{r[0]}-{r[1]}"
            lines.append(f"{d['gpu']:>3}  {lay:>6}  {part:>{7 if i['split'] == 'experts' else 11}}"
                         + "".join(f"{gb(d[k]):>9}" for k in ("weights", "kv_cache", "working", "reserve", "total", "capacity")))
        lines += ["", f"working memory (GPU 0 shown) for one prefill forward of Tc = {tc} tokens x batch {i['batch']}, "
                  "attention reading the whole KV cache: activations + the largest phase the GPU runs (phases run one after another):",
                  f"  activations  {term(d0['activations'])} GB  6 fp32 [B,Tc,D] (residual, sublayer temporaries)",
                  f"  attention    {term(d0['attention'])} GB  fp32 q [B,Tc,Hq*dh] + 3 RoPE temporaries of its size + k, v [B,Tc,Hkv*dh] "
                  "+ kernel output o [B,Tc,Hq*dh] + o_proj output [B,Tc,D] (home GPUs; no weight copy, no score tensor)",
                  f"  MoE          {term(d0['moe'])} GB  act [B*Tc*k, F_local] {i['act_dtype']} + y [B*Tc*k, D] fp32 + x, partial [B*Tc, D] fp32",
                  f"  head         {term(d0['head'])} GB  logits [B,V] fp32 twice at each row's last position: x@E^T and its scaled copy (GPU 0)",
                  f"  + KV cache 2 x [B, context, Hkv, dh] {i['act_dtype']} per layer on its home GPU; "
                  f"+ reserve {gb(i['reserve'])} GB per GPU (CUDA context, allocator)", "", self.verdict]
        lines += [f"  would fit: {s}" for s in self.suggestions]
        lines += ["", f"decode floor at batch {i['batch']} (bytes the busiest GPU reads per step / "
                  f"{i['gpu_bw'] / 1e12:.2f} TB/s; communication not included; KV read at a full context):"]
        valid = {s: f for s, f in self.decode_floor_s.items() if f is not None}
        for s, f in self.decode_floor_s.items():
            b = self.decode_bytes[s]
            lines.append(f"  {s:<8} " + ("n/a: " + b["error"] if f is None else
                         f"{f * 1e3:6.2f} ms/step  (MoE {gb(b['moe'])} GB + attention/KV {gb(b['attention'])} GB "
                         f"+ head {gb(b['head'])} GB)" + ("  <- faster" if len(valid) > 1 and all(f < g for t, g in valid.items() if t != s) else "")))
        lines += ["  ffn: every GPU reads its slice of every chosen expert, so all GPUs work on every token; costs an",
                  "       all-reduce of the [B, D] partials per layer. Best at small batch (decode).",
                  "  experts: tokens go to their experts' GPUs and a GPU reads whole experts, so at batch 1 one GPU",
                  "       does each layer's expert work; converges to ffn as the batch grows; suits large batches / training."]
        return "\n".join(lines)


def _decode(c: GrokConfig, n: int, split: str, fmt: str, act_dtype: str, B: int, S: int) -> dict:
    """Bytes per decode step on the critical path: per layer, the home GPU's attention weights +
    norms + router + KV read, then the busiest expert holder; plus the embedding read by the head."""
    err = split_error(c, n, split, fmt)
    if err:
        return {"error": err}
    pl = placement(c, n, split, fmt, act_dtype)
    layer0 = sum(prod(t.shape) * t.itemsize for t in pl if t.name.startswith("layers.0.") and ".moe.w" not in t.name)
    expert = sum(prod(t.shape) * t.itemsize for t in pl if t.name.startswith("layers.0.moe.w") and t.gpu == 0) * n // c.num_experts
    k, E = c.num_experts_per_tok, c.num_experts
    chosen = _busiest(E, k, B, n) if split == "experts" else _touched(E, k, B) / n
    kv = 2 * B * S * c.kv_size * ACT_BYTES[act_dtype]
    return {"moe": c.num_layers * chosen * expert, "attention": c.num_layers * (layer0 + kv),
            "head": (c.vocab_size + 1) * c.d_model * 4}



def plan_memory(config: GrokConfig, *, gpus: int, gpu_mem: Union[Bytes, Sequence[Bytes]], split: str = "experts",
                weight_format: Optional[str] = None, act_dtype: str = "bf16", context: Optional[int] = None,
                batch: int = 1, gpu_bw: float = H100_BW, reserve: Bytes = "1.5GiB",
                prefill_chunk: Optional[int] = PREFILL_CHUNK, suggest: bool = True) -> MemoryPlan:
    """Plan generating ``batch`` sequences of ``context`` tokens (default: the model context) on
    ``gpus`` GPUs of ``gpu_mem`` each (one size, or one per GPU), the prompt prefilled
    ``prefill_chunk`` positions a forward (None: the whole context in one forward). ValueError on
    arguments that cannot be planned (a split that does not divide, a context beyond the model's,
    a chunk below 1)."""
    c, n, B = config, gpus, batch
    fmt, S = weight_format or c.weight_format, c.max_seq_len if context is None else context
    if fmt not in WEIGHT_FORMATS or act_dtype not in ACT_BYTES:
        raise ValueError(f"weight format must be one of {WEIGHT_FORMATS} and activations one of {tuple(ACT_BYTES)}")
    if not 1 <= S <= c.max_seq_len or B < 1 or gpu_bw <= 0:
        raise ValueError(f"need 1 <= context <= {c.max_seq_len} (max_seq_len), batch >= 1 and gpu_bw > 0; "
                         f"got context {S}, batch {B}, gpu_bw {gpu_bw}")
    if prefill_chunk is not None and (isinstance(prefill_chunk, bool) or not isinstance(prefill_chunk, int)
                                      or prefill_chunk < 1):
        raise ValueError(f"prefill_chunk must be an int >= 1 (or None for the whole context in one forward), "
                         f"got {prefill_chunk!r}")
    err = split_error(c, n, split, fmt)
    if err:
        raise ValueError(err)
    mem = [parse_bytes(m) for m in gpu_mem] if isinstance(gpu_mem, (list, tuple)) else [parse_bytes(gpu_mem)] * n
    if len(mem) != n:
        raise ValueError(f"gpu_mem lists {len(mem)} sizes for {n} GPUs")
    res, a = parse_bytes(reserve), ACT_BYTES[act_dtype]
    T = _prefill_tokens(S, prefill_chunk)
    D, F, E, L, k, V = c.d_model, c.ffn_size, c.num_experts, c.num_layers, c.num_experts_per_tok, c.vocab_size
    weights = weight_bytes_per_device(c, n, split, fmt, act_dtype)
    f_loc = F if split == "experts" else F // n
    # attention, all fp32: q and 3 RoPE temporaries of its size (raw projection, x*cos, rotated half
    # x sin), k and v, the kernel's output o, the o_proj output; summed although k/v are freed once
    # written to the cache. No dequantised weight (int8 GEMM in registers) and no score tensor (flash).
    attention = B * T * (5 * c.q_size + 2 * c.kv_size + D) * 4
    devices = []
    for j in range(n):
        layers = [i for i in range(L) if i * n // L == j]
        terms = {
            "activations": 6 * B * T * D * 4 if (layers or j == 0) else 0,
            "attention": attention if layers else 0,
            "moe": B * T * k * (f_loc * a + D * 4) + 2 * B * T * D * 4,
            "head": 2 * B * V * 4 if j == 0 else 0,
        }
        working = terms["activations"] + max(terms["attention"], terms["moe"], terms["head"])
        kv = len(layers) * 2 * B * S * c.kv_size * a
        devices.append(dict(gpu=j, layers=[layers[0], layers[-1] + 1] if layers else [],
                            experts=[j * E // n, (j + 1) * E // n - 1] if split == "experts" else [0, E - 1],
                            ffn=[0, F - 1] if split == "experts" else [j * f_loc, (j + 1) * f_loc - 1],
                            weights=weights[j], kv_cache=kv, working=working, reserve=res,
                            total=weights[j] + kv + working + res, capacity=mem[j], terms=terms))
    over = [d for d in devices if d["total"] > d["capacity"]]
    if over:
        w = max(over, key=lambda d: d["total"] - d["capacity"])
        verdict = (f"DOES NOT FIT: GPU {w['gpu']} needs {w['total'] / 1e9:.1f} GB of {w['capacity'] / 1e9:.1f} GB "
                   f"({(w['total'] - w['capacity']) / 1e9:.1f} GB over); {len(over)} of {n} GPUs are over")
    else:
        w = min(devices, key=lambda d: d["capacity"] - d["total"])
        verdict = (f"FITS: tightest is GPU {w['gpu']}, {w['total'] / 1e9:.1f} of {w['capacity'] / 1e9:.1f} GB "
                   f"({(w['capacity'] - w['total']) / 1e9:.1f} GB free)")
    inputs = dict(config=c.name, gpus=n, gpu_mem=mem, split=split, weight_format=fmt, act_dtype=act_dtype,
                  context=S, batch=B, gpu_bw=gpu_bw, reserve=res, prefill_chunk=prefill_chunk)
    dec = {s: _decode(c, n, s, fmt, act_dtype, B, S) for s in SPLITS}
    floors = {s: None if "error" in b else (b["moe"] + b["attention"] + b["head"]) / gpu_bw for s, b in dec.items()}
    plan = MemoryPlan(inputs, devices, not over, verdict, [], floors, dec)
    if over and suggest:
        plan.suggestions = _suggest(c, inputs)
    return plan


def _suggest(c: GrokConfig, inputs: dict) -> List[str]:
    """What would fit, each found by planning it: GPU counts, int8, fp32 -> bf16 activations,
    the largest prefill chunk, the longest context, the largest batch (binary searches: memory grows
    with each)."""
    base, out, mem = {k: v for k, v in inputs.items() if k != "config"}, [], inputs["gpu_mem"][0]

    def fits(**kw) -> bool:
        args = {**base, **kw}
        if split_error(c, args["gpus"], args["split"], args["weight_format"]):
            return False
        if "gpus" in kw:
            args["gpu_mem"] = [mem] * kw["gpus"]
        return plan_memory(c, suggest=False, **args).fits

    def fewest(**kw) -> Optional[int]:
        return next((m for m in range(1, 65) if fits(gpus=m, **kw)), None)

    for s in SPLITS:
        m = fewest(split=s)
        if m is not None:
            out.append(f"{m} GPUs with split '{s}' (--gpus {m} --device-map {s})")
    if inputs["weight_format"] != "int8":  # the current split first
        for s in sorted(SPLITS, key=lambda s: s != inputs["split"]):
            m = fewest(split=s, weight_format="int8")
            if m is not None:
                out.append(f"int8 weights on {m} GPUs with split '{s}' (--dtype int8 --gpus {m} --device-map {s}; "
                           "an int8 checkpoint: grok-convert --dtype int8)")
                break
    if inputs["act_dtype"] == "fp32" and fits(act_dtype="bf16"):
        out.append("bf16 activations (--act-dtype bf16)")
    tc = _prefill_tokens(inputs["context"], inputs["prefill_chunk"])
    for key, flag, now in (("prefill_chunk", "--prefill-chunk", tc), ("context", "--context", inputs["context"]),
                           ("batch", "--batch", inputs["batch"])):
        lo, hi = 0, now - 1  # largest value in [1, current) that fits, if any
        while lo < hi:
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if fits(**{key: mid}) else (lo, mid - 1)
        if lo:
            out.append(f"{key.replace('_', ' ')} {lo} ({flag} {lo})")
    return out or ["nothing tried fits (more GPUs up to 64, int8, a smaller prefill chunk, a shorter context, "
                   "a smaller batch)"]


def check_fits(config: GrokConfig, **kwargs) -> MemoryPlan:
    """``plan_memory(config, **kwargs)``, raising PlanError (verdict line + report) when it does not fit."""
    plan = plan_memory(config, **kwargs)
    if not plan.fits:
        raise PlanError(plan.verdict + "\n\n" + plan.report())
    return plan


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, no usage dump, exit 2
        self.exit(2, f"grok-plan: {message}\n")


EPILOG = """examples:
  grok-plan --config grok-1 --gpus 8 --gpu-mem 80GB --dtype int8 --context 8192
  grok-plan --config grok-1 --gpus 8 --dtype bf16                 # does not fit: says what would
  grok-plan --model /data/grok-1-int8 --device-map ffn --batch 4 --json
  grok-plan --config grok-1 --gpus 8 --batch 64 --prefill-chunk 512  # a smaller chunk, less working memory
  python -m grok_torch.plan --config tiny --gpus 1 --gpu-mem 1GB

exit status: 0 fits, 1 does not fit, 2 bad arguments. GB = 1e9 bytes, GiB = 2**30."""


def main(argv: Optional[Sequence[str]] = None) -> int:
    """grok-plan CLI: prints the report (or --json) and exits 0 when it fits, 1 when not, 2 on bad arguments."""
    p = _Parser(prog="grok-plan", description="Memory and decode-speed plan for a Grok model on GPUs.",
                epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", metavar="DIR", help="converted model directory (reads DIR/config.json)")
    src.add_argument("--config", metavar="NAME|JSON", help="grok-1, tiny, demo, or a config.json path")
    p.add_argument("--gpus", type=int, default=8, help="number of GPUs (default 8)")
    p.add_argument("--gpu-mem", default="80GB", help="memory per GPU: 80GB (=80e9), 79.6GiB, 81920MiB, bytes (default 80GB)")
    p.add_argument("--dtype", choices=WEIGHT_FORMATS, help="weight format (default: the config's weight_format)")
    p.add_argument("--device-map", choices=SPLITS, default="experts", help="how experts are split (default experts)")
    p.add_argument("--context", type=int, help="tokens per sequence (default: the model's max_seq_len)")
    p.add_argument("--batch", type=int, default=1, help="sequences at once (default 1)")
    p.add_argument("--prefill-chunk", type=int, default=PREFILL_CHUNK, metavar="N",
                   help=f"prompt positions per prefill forward, as grok-generate --prefill-chunk: working memory is "
                   f"that of N tokens (default {PREFILL_CHUNK}; 0 = the whole prompt in one forward)")
    p.add_argument("--gpu-bw", type=float, default=H100_BW, help="memory bandwidth, bytes/s (default 3.35e12, H100 SXM)")
    p.add_argument("--reserve", default="1.5GiB", help="per-GPU CUDA context/allocator reserve (default 1.5GiB)")
    p.add_argument("--act-dtype", choices=tuple(ACT_BYTES), default="bf16", help="activation dtype (default bf16)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    a = p.parse_args(argv)
    try:
        cfg = GrokConfig.from_json(a.model) if a.model else GrokConfig.load(a.config)
    except (OSError, ValueError, KeyError) as e:
        msg = str(e)
        p.error(msg if msg.startswith("--") else f"{'--model' if a.model else '--config'}: {msg}")
    for flag, v in (("--gpus", a.gpus), ("--batch", a.batch), ("--context", 1 if a.context is None else a.context)):
        if v < 1:
            p.error(f"{flag} must be at least 1, got {v}")
    if a.context is not None and a.context > cfg.max_seq_len:
        p.error(f"--context {a.context} exceeds the model's max_seq_len {cfg.max_seq_len}")
    if a.gpu_bw <= 0:
        p.error(f"--gpu-bw must be positive, got {a.gpu_bw}")
    if a.prefill_chunk < 0:
        p.error(f"--prefill-chunk must be >= 0 (0 = the whole prompt in one forward), got {a.prefill_chunk}")
    for flag, v in (("--gpu-mem", a.gpu_mem), ("--reserve", a.reserve)):
        try:
            parse_bytes(v)
        except ValueError as e:
            p.error(f"{flag}: {e}")
    err = split_error(cfg, a.gpus, a.device_map, a.dtype)
    if err:
        p.error(f"--device-map {a.device_map} --gpus {a.gpus}: {err}")
    plan = plan_memory(cfg, gpus=a.gpus, gpu_mem=a.gpu_mem, split=a.device_map, weight_format=a.dtype,
                       act_dtype=a.act_dtype, context=a.context, batch=a.batch, gpu_bw=a.gpu_bw, reserve=a.reserve,
                       prefill_chunk=a.prefill_chunk or None)
    print(json.dumps(plan.to_dict(), indent=2) if a.json else plan.report())
    return 0 if plan.fits else 1


if __name__ == "__main__":
    sys.exit(main())
