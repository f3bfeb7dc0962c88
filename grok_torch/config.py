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
import os
from dataclasses import dataclass, field
from typing import Any, Dict, Optional

# Weight formats a checkpoint can hold (config.weight_format). "int8" keeps the released int8
# weights with their bf16 scales; "bf16" and "fp32" hold dequantized weights.
WEIGHT_FORMATS = ("int8", "bf16", "fp32")

# The quantized projections and their scale groups G along the input (K) dimension, as released:
# row-parallel weights (o_proj, moe down) carry one scale per K/8 rows (SPEC §5.3).
QUANT_GROUPS = {"wq": 1, "wk": 1, "wv": 1, "wo": 8, "w1": 1, "w3": 1, "w2": 8}


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
        if not self.ffn_size:
            self.ffn_size = ffn_size(self.d_model, self.widening_factor)
        if self.weight_format not in WEIGHT_FORMATS:
            raise ValueError(f"weight_format must be one of {WEIGHT_FORMATS}, got {self.weight_format!r}")
        if self.num_q_heads % self.num_kv_heads:
            raise ValueError(f"num_q_heads ({self.num_q_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})")
        if not 1 <= self.num_experts_per_tok <= self.num_experts:
            raise ValueError(f"num_experts_per_tok must be in [1, {self.num_experts}], got {self.num_experts_per_tok}")

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

    # ---- construction ----
    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> "GrokConfig":
        if name not in CONFIGS:
            raise KeyError(f"unknown config {name!r}; known: {', '.join(sorted(CONFIGS))} (or pass a JSON path)")
        return cls(**{"name": name, **CONFIGS[name], **overrides})

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "GrokConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown GrokConfig field(s): {', '.join(unknown)}")
        return cls(**d)

    @classmethod
    def from_json(cls, path: "str | os.PathLike") -> "GrokConfig":
        """Read a config.json written by grok-convert (or by hand). A directory means DIR/config.json."""
        path = os.fspath(path)
        if os.path.isdir(path):
            path = os.path.join(path, "config.json")
        with open(path) as f:
            try:
                d = json.load(f)
            except json.JSONDecodeError as e:
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
