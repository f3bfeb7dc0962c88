"""The one mapping table: official checkpoint file index -> parameter path -> torch name, shape, layout.

Layout (written down once, consumed by the model and the kernels):

* Every matrix keeps the released ``[in, out]`` layout (haiku: ``y = x @ w``), NOT ``nn.Linear``'s
  ``[out, in]``. Keeping it means int8 weights and their scales are copied byte for byte.
* Experts stay stacked per layer: ``w1``/``w3`` are ``[E, D, F]`` and ``w2`` is ``[E, F, D]``.
* int8 checkpoints store ``<name>.weight`` (int8, as released) and ``<name>.scales`` (bf16,
  ``[*lead, G, out]``): one scale per output column per group of ``in/G`` consecutive input rows.
  G = 8 for ``wo`` and ``w2`` (row-parallel in the official mesh), 1 otherwise (SPEC §5.3).
* bf16/fp32 checkpoints store only ``<name>.weight``, dequantized as the official code does.

=====================================================  =================================  ============
official path (``ckpt-0/tensorNNNNN_000``)              torch name                         shape
=====================================================  =================================  ============
language_model/in_out_embed/embeddings                  embed.weight                       [V, D]
language_model/rms_norm/scale                           norm.weight                        [D]
transformer/decoder_layer_{i}/rms_norm/scale            layers.{i}.attn_norm.weight        [D]
transformer/decoder_layer_{i}/rms_norm_1/scale          layers.{i}.attn_post_norm.weight   [D]
transformer/decoder_layer_{i}/rms_norm_2/scale          layers.{i}.moe_norm.weight         [D]
transformer/decoder_layer_{i}/rms_norm_3/scale          layers.{i}.moe_post_norm.weight    [D]
transformer/decoder_layer_{i}/multi_head_attention/query/w   layers.{i}.attn.wq.weight     [D, Hq*dh]
transformer/decoder_layer_{i}/multi_head_attention/key/w     layers.{i}.attn.wk.weight     [D, Hkv*dh]
transformer/decoder_layer_{i}/multi_head_attention/value/w   layers.{i}.attn.wv.weight     [D, Hkv*dh]
transformer/decoder_layer_{i}/multi_head_attention/linear/w  layers.{i}.attn.wo.weight     [Hq*dh, D]
transformer/decoder_layer_{i}/router/w                  layers.{i}.moe.router.weight       [D, E]
transformer/decoder_layer_{i}/moe/linear/w   (gate)     layers.{i}.moe.w1.weight           [E, D, F]
transformer/decoder_layer_{i}/moe/linear_v/w (up)       layers.{i}.moe.w3.weight           [E, D, F]
transformer/decoder_layer_{i}/moe/linear_1/w (down)     layers.{i}.moe.w2.weight           [E, F, D]
=====================================================  =================================  ============

File order is the jax flatten order of the params dict: sorted keys, so layers come in
**lexicographic** order of their names (0, 1, 10, 11, ..., 19, 2, 20, ...) with 12 slots each
(SPEC §5.4). ``param_order`` reproduces it; the tiny fixture has 12 layers so numeric order fails.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Tuple

from grok_torch.config import GrokConfig

# The 12 per-layer leaves in the order jax flattens them (sorted module path, then param name).
LAYER_SLOTS = (
    "moe/linear/w", "moe/linear_1/w", "moe/linear_v/w",
    "multi_head_attention/key/w", "multi_head_attention/linear/w",
    "multi_head_attention/query/w", "multi_head_attention/value/w",
    "rms_norm/scale", "rms_norm_1/scale", "rms_norm_2/scale", "rms_norm_3/scale",
    "router/w",
)

# official per-layer leaf -> (torch module name, short key into GrokConfig.quant_groups or None)
_LAYER_NAMES = {
    "moe/linear/w": ("moe.w1", "w1"),
    "moe/linear_1/w": ("moe.w2", "w2"),
    "moe/linear_v/w": ("moe.w3", "w3"),
    "multi_head_attention/key/w": ("attn.wk", "wk"),
    "multi_head_attention/linear/w": ("attn.wo", "wo"),
    "multi_head_attention/query/w": ("attn.wq", "wq"),
    "multi_head_attention/value/w": ("attn.wv", "wv"),
    "rms_norm/scale": ("attn_norm", None),
    "rms_norm_1/scale": ("attn_post_norm", None),
    "rms_norm_2/scale": ("moe_norm", None),
    "rms_norm_3/scale": ("moe_post_norm", None),
    "router/w": ("moe.router", None),
}


@dataclass(frozen=True)
class ParamSpec:
    """One leaf of the official checkpoint and where it goes."""

    index: int                      # file tensor{index:05d}_000
    path: str                       # official parameter path
    torch_name: str                 # module name; tensors are <torch_name>.weight (+ .scales)
    shape: Tuple[int, ...]          # [in, out] layout, experts leading
    groups: Optional[int]           # scale groups along K for quantized leaves, None for plain fp32

    @property
    def quantized(self) -> bool:
        return self.groups is not None

    @property
    def scales_shape(self) -> Tuple[int, ...]:
        assert self.groups is not None
        return (*self.shape[:-2], self.groups, self.shape[-1])

    @property
    def file(self) -> str:
        return f"tensor{self.index:05d}_000"


def layer_order(num_layers: int) -> List[int]:
    """Layer numbers in the order jax flattens ``decoder_layer_{i}`` keys: lexicographic by name."""
    return sorted(range(num_layers), key=lambda i: f"decoder_layer_{i}")


def _layer_shape(cfg: GrokConfig, slot: str) -> Tuple[int, ...]:
    D, F, E = cfg.d_model, cfg.ffn_size, cfg.num_experts
    return {
        "moe/linear/w": (E, D, F), "moe/linear_v/w": (E, D, F), "moe/linear_1/w": (E, F, D),
        "multi_head_attention/query/w": (D, cfg.q_size),
        "multi_head_attention/key/w": (D, cfg.kv_size),
        "multi_head_attention/value/w": (D, cfg.kv_size),
        "multi_head_attention/linear/w": (cfg.q_size, D),
        "router/w": (D, E),
    }.get(slot, (D,))


def param_order(cfg: GrokConfig) -> List[ParamSpec]:
    """All leaves of the official checkpoint for ``cfg``, in file order."""
    specs = [
        ParamSpec(0, "language_model/in_out_embed/embeddings", "embed", (cfg.vocab_size, cfg.d_model), None),
        ParamSpec(1, "language_model/rms_norm/scale", "norm", (cfg.d_model,), None),
    ]
    for layer in layer_order(cfg.num_layers):
        for slot in LAYER_SLOTS:
            module, qkey = _LAYER_NAMES[slot]
            groups = cfg.quant_groups[qkey] if qkey else None
            specs.append(ParamSpec(len(specs), f"transformer/decoder_layer_{layer}/{slot}",
                                   f"layers.{layer}.{module}", _layer_shape(cfg, slot), groups))
    return specs


def num_tensors(cfg: GrokConfig) -> int:
    return 2 + 12 * cfg.num_layers
