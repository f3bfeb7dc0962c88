"""GrokConfig: the one description of a Grok model, shared by the converter, the model and the kernels.

Named configs live in ``CONFIGS``; every number cites its source. The converter writes
``config.json`` (``GrokConfig.to_json``) next to the safetensors shards and ``from_pretrained``
reads it back, so the config always travels with the weights.

This module imports nothing heavy (no torch) so that the converter and tools can use it cheaply.

Grok-2 switches (router / final-logit softcaps, the dense residual MLP, attention temperature,
an untied head, another RoPE base) are fields with Grok-1 defaults that turn them off, so a
Grok-2 config is a new entry in ``CONFIGS``, not a new class.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Tuple

# Weight formats a checkpoint can hold (config.weight_format). "int8" keeps the released int8
# weights with their bf16 scales; "bf16" and "fp32" hold dequantized weights.
WEIGHT_FORMATS = ("int8", "bf16", "fp32")

# The quantized projections and their scale groups G along the input (K) dimension, as released:
# row-parallel weights (o_proj, moe down) carry one scale per K/8 rows (SPEC §5.3).
QUANT_GROUPS = {"wq": 1, "wk": 1, "wv": 1, "wo": 8, "w1": 1, "w3": 1, "w2": 8}


# A config.json comes with a downloaded checkpoint, so it is hostile input: every field is checked
# for its type and range before anything is sized from it (a 766-byte file with num_layers 3000000
# once made grok-convert plan minutes and 13 GB of tensor names). The caps are far above Grok-1
# (64 layers, d_model 6144, 48/8 heads of 128, 8 experts, 131072 tokens, context 8192) and Grok-2
# (64 layers, d_model 8192, 64/8 heads, 131072-token context), so no real model meets them; they
# only keep a crafted file from sizing absurd loops and allocations. (lo, hi) inclusive.
_INT_LIMITS: Dict[str, Tuple[int, int]] = {
    "vocab_size": (1, 2 ** 24),          # 128x Grok-1's 131072
    "d_model": (1, 65536),               # 10x Grok-1's 6144
    "num_layers": (1, 1024),             # 16x Grok-1's 64
    "num_q_heads": (1, 1024),
    "num_kv_heads": (1, 1024),
    "head_dim": (1, 1024),               # 8x Grok-1's 128
    "ffn_size": (0, 2 ** 20),            # 0 = derived from widening_factor; 32x Grok-1's 32768
    "num_experts": (1, 1024),            # 128x Grok-1's 8
    "num_experts_per_tok": (1, 1024),    # and at most num_experts
    "max_seq_len": (1, 2 ** 22),         # 4M tokens: 512x Grok-1's 8192, 32x Grok-2's 131072
    "pad_token_id": (0, 2 ** 24 - 1),    # and below vocab_size
    "eos_token_id": (0, 2 ** 24 - 1),
    "bos_token_id": (0, 2 ** 24 - 1),
    "residual_mlp_size": (0, 2 ** 20),   # 0 = none
    "attn_temperature_len": (0, 2 ** 22),  # 0 = off
}
# Floats must be finite (JSON allows NaN, Infinity and 1e999) and in (lo, hi]: a finite but absurd
# multiplier (1e300) overflows fp32 activations into inf and NaN as surely as an infinite one.
# Grok-1's values: widening 8, multipliers 78.4 / 0.577 / 0.0884, cap 30, eps 1e-5, RoPE base 1e4
# (Grok-2's 2.1e8); softcaps are Optional (None = off).
_FLOAT_RANGES: Dict[str, Tuple[float, float]] = {
    "widening_factor": (0.0, 1024.0), "embedding_multiplier": (0.0, 1e4), "output_multiplier": (0.0, 1e4),
    "attn_output_multiplier": (0.0, 1e4), "attn_logit_cap": (0.0, 1e4), "rms_norm_eps": (0.0, 0.1),
    "rope_base": (1.0, 1e12), "router_logit_softcap": (0.0, 1e4), "final_logit_softcap": (0.0, 1e4),
}
_MAX_QUANT_GROUPS = 65536       # scale groups per projection (released: 1 or 8)
# The sizes a config implies: parameters (what loading allocates) and one sequence's KV cache at the
# full context (what generation may allocate). Grok-1: 3.2e11 (2**38.2) and 1.1e9 elements.
_MAX_PARAMS = 2 ** 42           # 4.4e12, 14x Grok-1
_MAX_KV_CACHE = 2 ** 40         # elements; Grok-2's 131072-token context needs 2**34
MAX_CONFIG_BYTES = 1 << 20      # a config.json is about 1 KB: refuse to read a huge file whole
_SHOW = 60                      # characters of a bad value or name shown in a message
_MAX_NAMES_SHOWN = 5            # unknown field names listed in a message


def quote_untrusted(text: str, limit: int = _SHOW) -> str:
    """Text from a (possibly hostile) file, safe to print: quoted, ASCII-escaped (no control bytes,
    no newline), cut to ``limit`` characters. Shared by the config and the checkpoint readers."""
    return ascii(text[:limit]) + ("..." if len(text) > limit else "")


def _show(value: Any, cut: int = _SHOW) -> str:
    """A value from a (possibly hostile) file for a one-line message: escaped, and cut short."""
    if isinstance(value, str) and len(value) > cut:
        return quote_untrusted(value, cut) + f" ({len(value)} characters)"
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 64:
        return f"an integer of {value.bit_length()} bits"   # str() of a huge int is slow or refused
    s = ascii(value)
    return s if len(s) <= cut else s[:cut] + "..."


def _kind(value: Any) -> str:
    """What a value is, in JSON's words where it came from JSON (bool is not an integer here)."""
    for t, name in ((bool, "boolean"), (int, "int"), (float, "float"), (str, "string"), (type(None), "null"),
                    (list, "list"), (dict, "object")):
        if isinstance(value, t):
            return name
    return type(value).__name__


def ffn_size(d_model: int, widening_factor: float) -> int:
    """Expert hidden size exactly as the official code: int(wf*d)*2//3, rounded UP to a multiple of 8."""
    f = int(widening_factor * d_model) * 2 // 3
    return f + (8 - f) % 8


@dataclass
class GrokConfig:
    """Architecture + numerics of a Grok model. Field names are ours; comments give the official ones."""

    name: str = "custom"
    vocab_size: int = 131072            # vocab_size (128*1024)
    d_model: int = 6144                 # emb_size (48*128)
    num_layers: int = 64                # num_layers
    num_q_heads: int = 48               # num_q_heads
    num_kv_heads: int = 8               # num_kv_heads (GQA: q head h uses kv head h // (Hq/Hkv))
    head_dim: int = 128                 # key_size (value size = key size)
    widening_factor: float = 8.0        # widening_factor -> ffn_size
    ffn_size: int = 0                   # derived from widening_factor when 0
    num_experts: int = 8                # num_experts
    num_experts_per_tok: int = 2        # num_selected_experts
    max_seq_len: int = 8192             # sequence_len
    # Multipliers exactly as the config floats; the model applies them in the activation dtype,
    # which under jit makes them bf16 constants (78.5, 0.578125) in bf16 mode (SPEC §3.1).
    embedding_multiplier: float = 78.38367176906169   # embedding_multiplier_scale
    output_multiplier: float = 0.5773502691896257     # output_multiplier_scale
    attn_output_multiplier: float = 0.08838834764831845  # applied to fp32 q.k, exact
    attn_logit_cap: float = 30.0        # max_attn_val: 30*tanh(s/30), hard-coded in the official code
    rms_norm_eps: float = 1e-5          # hk RMSNorm default
    rope_base: float = 10000.0          # int(1e4)
    pad_token_id: int = 0               # any id 0 is padding (masked as an attention key)
    eos_token_id: int = 2
    bos_token_id: int = 1               # exists in the tokenizer, never added by the runner
    # ---- Grok-2 switches (all off for Grok-1) ----
    router_logit_softcap: Optional[float] = None   # Grok-2: cap*tanh(logits/cap) before the softmax
    final_logit_softcap: Optional[float] = None    # Grok-2: cap*tanh(logits/cap) on the LM logits
    residual_mlp_size: int = 0          # Grok-2: dense MLP in parallel with the MoE; 0 = none
    attn_temperature_len: int = 0       # Grok-2: length-dependent attention temperature; 0 = off
    tie_word_embeddings: bool = True    # Grok-1 ties the LM head to the input embedding
    renormalize_gates: bool = False     # Grok-1 uses the un-renormalised top-k softmax probabilities
    # ---- How the weights are stored (written by grok-convert) ----
    weight_format: str = "int8"         # one of WEIGHT_FORMATS
    quant_groups: Dict[str, int] = field(default_factory=lambda: dict(QUANT_GROUPS))

    def __post_init__(self):
        # every way in (from_json, from_dict, from_name, replace, the constructor) lands here, so
        # nothing sized from a config ever sees a wrong type or an absurd value
        self._check_fields()
        if not self.ffn_size:
            derived = ffn_size(self.d_model, self.widening_factor)
            if not 1 <= derived <= _INT_LIMITS["ffn_size"][1]:
                raise ValueError(f"widening_factor {_show(self.widening_factor)} with d_model {self.d_model} gives "
                                 f"ffn_size {derived}, outside [1, {_INT_LIMITS['ffn_size'][1]}]")
            self.ffn_size = derived
        if self.num_q_heads % self.num_kv_heads:
            raise ValueError(f"num_q_heads ({self.num_q_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})")
        if self.num_experts_per_tok > self.num_experts:
            raise ValueError(f"num_experts_per_tok must be in [1, {self.num_experts}], got {self.num_experts_per_tok}")
        for name in ("pad_token_id", "eos_token_id", "bos_token_id"):
            if getattr(self, name) >= self.vocab_size:
                raise ValueError(f"{name} must be below vocab_size ({self.vocab_size}), got {getattr(self, name)}")
        # each int8 projection's K rows split into G equal scale groups (SPEC §5.3); float weights have none
        k_dims = {"wq": self.d_model, "wk": self.d_model, "wv": self.d_model, "wo": self.q_size,
                  "w1": self.d_model, "w3": self.d_model, "w2": self.ffn_size}
        for name, k in k_dims.items():
            if self.weight_format == "int8" and k % self.quant_groups[name]:
                raise ValueError(f"quant_groups[{name!r}] ({self.quant_groups[name]}) must divide the projection's "
                                 f"input size {k}")
        params, kv = self.num_parameters(), self.num_layers * self.max_seq_len * 2 * self.kv_size
        if params > _MAX_PARAMS:
            raise ValueError(f"these sizes make a model of {params:.3g} parameters, more than the {_MAX_PARAMS:.3g} "
                             f"this code accepts (Grok-1 has 3.2e+11): check num_layers, d_model, ffn_size, "
                             f"num_experts, vocab_size")
        if kv > _MAX_KV_CACHE:
            raise ValueError(f"num_layers x max_seq_len x 2 x num_kv_heads x head_dim is {kv:.3g} KV-cache elements per "
                             f"sequence, more than the {_MAX_KV_CACHE:.3g} this code accepts: check max_seq_len")

    def _check_fields(self) -> None:
        """Each field's declared type and range; one line naming the field and the (escaped, cut) value."""
        for f in dataclasses.fields(self):
            v, kind = getattr(self, f.name), f.type          # f.type is the annotation as a string
            if kind == "int":
                if _kind(v) != "int":
                    raise ValueError(f"{f.name} must be an integer, got {_show(v)} ({_kind(v)})")
                lo, hi = _INT_LIMITS[f.name]
                if not lo <= v <= hi:
                    raise ValueError(f"{f.name} must be in [{lo}, {hi}], got {_show(v)}")
            elif kind in ("float", "Optional[float]"):
                if v is None and kind == "Optional[float]":
                    continue
                if _kind(v) not in ("int", "float"):
                    raise ValueError(f"{f.name} must be a number{' or null' if kind != 'float' else ''}, "
                                     f"got {_show(v)} ({_kind(v)})")
                try:
                    finite = math.isfinite(v)
                except OverflowError:              # an int too large for a float
                    finite = False
                if not finite:
                    raise ValueError(f"{f.name} must be finite, got {_show(v)}")
                lo, hi = _FLOAT_RANGES[f.name]
                if not lo < v <= hi:
                    raise ValueError(f"{f.name} must be in ({lo:g}, {hi:g}], got {_show(v)}")
            elif kind == "bool":
                if not isinstance(v, bool):
                    raise ValueError(f"{f.name} must be true or false, got {_show(v)}")
            elif kind == "str":
                if not isinstance(v, str):
                    raise ValueError(f"{f.name} must be a string, got {_show(v)}")
            elif kind != "Dict[str, int]":
                raise AssertionError(f"GrokConfig.{f.name}: no check for type {kind}")   # a new field: add one
        if not 1 <= len(self.name) <= 256:
            raise ValueError(f"name must be 1 to 256 characters, got {_show(self.name)}")
        if self.weight_format not in WEIGHT_FORMATS:
            raise ValueError(f"weight_format must be one of {WEIGHT_FORMATS}, got {_show(self.weight_format)}")
        g = self.quant_groups
        if not isinstance(g, dict) or set(g) != set(QUANT_GROUPS):
            raise ValueError(f"quant_groups must map each of {', '.join(QUANT_GROUPS)} to a group count, "
                             f"got {_show(g)}")
        for name, n in g.items():
            if _kind(n) != "int" or not 1 <= n <= _MAX_QUANT_GROUPS:
                raise ValueError(f"quant_groups[{name!r}] must be an integer in [1, {_MAX_QUANT_GROUPS}], got {_show(n)}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even (RoPE rotates pairs of dimensions), got {self.head_dim}")

    # ---- derived sizes ----
    @property
    def q_per_kv(self) -> int:
        return self.num_q_heads // self.num_kv_heads

    @property
    def q_size(self) -> int:
        return self.num_q_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def num_parameters(self) -> int:
        """Weights the model holds (int8 scales not counted): embedding (and an untied head), per
        layer the attention projections, router, experts, optional residual MLP and four norms."""
        D = self.d_model
        per_layer = (D * (self.q_size + 2 * self.kv_size) + self.q_size * D + D * self.num_experts
                     + 3 * self.num_experts * D * self.ffn_size + 3 * D * self.residual_mlp_size + 4 * D)
        head = 0 if self.tie_word_embeddings else self.vocab_size * D
        return self.vocab_size * D + head + self.num_layers * per_layer + D

    # ---- construction ----
    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> "GrokConfig":
        if name not in CONFIGS:
            raise KeyError(f"unknown config {name!r}; known: {', '.join(sorted(CONFIGS))} (or pass a JSON path)")
        return cls(**{"name": name, **CONFIGS[name], **overrides})

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "GrokConfig":
        if not isinstance(d, dict):
            raise ValueError(f"a config must be a JSON object of GrokConfig fields, got {_show(d)}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted((k for k in d if k not in known), key=ascii)
        if unknown:
            # the names come from the file: escaped (no terminal escapes or forged lines) and few
            shown = ", ".join(_show(k, 32) for k in unknown[:_MAX_NAMES_SHOWN])
            more = f" and {len(unknown) - _MAX_NAMES_SHOWN} more" if len(unknown) > _MAX_NAMES_SHOWN else ""
            raise ValueError(f"unknown GrokConfig field(s): {shown}{more}")
        return cls(**d)

    @classmethod
    def from_json(cls, path: "str | os.PathLike") -> "GrokConfig":
        """Read a config.json written by grok-convert (or by hand). A directory means DIR/config.json.

        The file comes with a downloaded checkpoint: only a regular file is opened (a FIFO swapped in
        would hang the open), at most ``MAX_CONFIG_BYTES`` of it is read, and every field is checked."""
        # the converter's opener: it looks before and after a non-blocking open (no torch imported)
        from grok_torch.convert.grok_pickle import open_regular

        path = os.fspath(path)
        if os.path.isdir(path):
            path = os.path.join(path, "config.json")
        f, st = open_regular(path)
        with f:
            data = f.read(MAX_CONFIG_BYTES + 1)
        if len(data) > MAX_CONFIG_BYTES:
            raise ValueError(f"{path}: larger than {MAX_CONFIG_BYTES // 1024} KiB, too large for a config "
                             f"(grok-convert writes about 1 KB): is it the right file?")
        try:
            d = json.loads(data)
        except (ValueError, RecursionError) as e:  # also bad UTF-8, a number of too many digits, deep nesting
            raise ValueError(f"{path}: not valid JSON ({e})") from None
        try:
            return cls.from_dict(d)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{path}: {e}") from None

    @classmethod
    def load(cls, spec: str) -> "GrokConfig":
        """A named config (``grok-1``, ``tiny``) or a path to a JSON file."""
        if spec in CONFIGS:
            return cls.from_name(spec)
        if os.path.exists(spec):
            return cls.from_json(spec)
        raise ValueError(f"--config {spec!r} is neither a named config ({', '.join(sorted(CONFIGS))}) nor an existing JSON file")

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self, path: "str | os.PathLike | None" = None) -> str:
        s = json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"
        if path is not None:
            with open(path, "w") as f:
                f.write(s)
        return s

    def replace(self, **changes: Any) -> "GrokConfig":
        return dataclasses.replace(self, **changes)

    def same_architecture(self, other: "GrokConfig") -> bool:
        """True when two configs describe the same tensors (ignores name and storage format)."""
        skip = {"name", "weight_format"}
        a = {k: v for k, v in self.to_dict().items() if k not in skip}
        b = {k: v for k, v in other.to_dict().items() if k not in skip}
        return a == b


CONFIGS: Dict[str, Dict[str, Any]] = {
    # The released model: xai-org/grok-1 run.py @7050ed2 (LanguageModelConfig / TransformerConfig).
    "grok-1": dict(
        vocab_size=128 * 1024, d_model=48 * 128, num_layers=64, num_q_heads=48, num_kv_heads=8,
        head_dim=128, widening_factor=8, num_experts=8, num_experts_per_tok=2, max_seq_len=8192,
    ),
    # The fixture of ../shared/grok1/tiny_ref (SPEC §8): same code paths, 12 layers so the
    # lexicographic file order is observable, ffn 170 rounded up to 176, the REAL scalars.
    "tiny": dict(
        vocab_size=512, d_model=128, num_layers=12, num_q_heads=16, num_kv_heads=8, head_dim=8,
        widening_factor=2, num_experts=8, num_experts_per_tok=2, max_seq_len=64,
    ),
    # The README's demo model (``python -m grok_torch.convert.synthetic``): tiny's shapes with the
    # real 131072-token vocabulary and 8192-token context, so the real tokenizer, text prompts and
    # text fine-tuning work end to end on a CPU. Its weights are random: its text is random too.
    "demo": dict(
        vocab_size=128 * 1024, d_model=128, num_layers=12, num_q_heads=16, num_kv_heads=8, head_dim=8,
        widening_factor=2, num_experts=8, num_experts_per_tok=2, max_seq_len=8192,
    ),
}
