"""Grok-1 in PyTorch: the forward pass of xai-org/grok-1 ``model.py``, op for op (SPEC §3).

    tokens [B, T] -> embed * 78.5 -> 64 x DecoderLayer -> RMSNorm -> tied head * 0.578125 -> logits [B, T, V]

    DecoderLayer (sandwich norms):  h += post_norm(attn(pre_norm(h)));  h += post_norm(moe(pre_norm(h)))

Numerics (``dtype`` is the activation dtype: bf16 as released, or fp32 for the SPEC §8.1 variant):
* Python scalars are cast to the activation dtype before use, as jit does (bf16: 78.5, 0.578125).
* RMSNorm, RoPE, the router and the attention softmax are fp32. XLA deletes f32->bf16->f32 round
  trips (SPEC §3.4), so wherever the official graph feeds an fp32 value through a bf16 cast into
  another fp32 computation we keep the fp32 value (norm -> residual add, norm -> router).
* Masked attention logits are -1e30 (not -inf): a query with every key masked (left padding)
  attends uniformly to all keys, as the official code does.
* Token id 0 is padding wherever it appears: it is masked as an attention key (never as a query),
  and still goes through the MoE.

Single device: no placement happens here (see loading.py for from_pretrained).
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
from torch import nn

from grok_torch.config import GrokConfig
from grok_torch.loading import load_pretrained
from grok_torch.moe import MoE
from grok_torch.weights import SUPPORTED_DTYPES, Weight

__all__ = ["Grok", "KVCache", "RMSNorm", "Attention", "DecoderLayer", "apply_rope"]

MASK_VALUE = -1e30  # official value; -inf would turn fully masked rows into NaN


def as_dtype(c: float, dtype: torch.dtype) -> float:
    """A Python constant as ``dtype`` holds it: jit turns ``bf16_array * 78.38`` into ``* 78.5`` (SPEC §3.1)."""
    return torch.tensor(c, dtype=dtype).item()


class RMSNorm(nn.Module):
    """``scale * x * rsqrt(mean(x^2) + eps)`` in fp32, scale used as-is; returns fp32 (callers round)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(dim, dtype=torch.float32), requires_grad=False)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))


def apply_rope(x: torch.Tensor, pos_BT: torch.Tensor, base: float) -> torch.Tensor:
    """Rotate-half RoPE over the full head dim, fp32 math; x [B, T, H, dh], returns x's dtype."""
    dh = x.shape[-1]
    inv_freq = 1.0 / (base ** (torch.arange(0, dh, 2, dtype=torch.float32, device=x.device) / dh))
    phase = pos_BT.float()[:, :, None] * inv_freq            # [B, T, dh/2]
    phase = torch.cat([phase, phase], dim=-1)[:, :, None, :]  # [f0..f_{dh/2-1}, f0..], one per head
    xf = x.float()
    x1, x2 = xf.chunk(2, dim=-1)
    return (xf * phase.cos() + torch.cat([-x2, x1], dim=-1) * phase.sin()).to(x.dtype)


class KVCache:
    """Preallocated per-layer K/V ``[B, S, Hkv, dh]`` plus which slots hold a real (non-pad) key.

    ``pos[b]`` is the next write position of row b; rows advance independently, so prompts of
    different lengths decode together (each at its own RoPE position, like the official runner).
    ``k[i]`` / ``v[i]`` live on ``layer_devices[i]`` (default ``device``): a placed model keeps each
    layer's cache beside the layer; ``key_valid`` and ``pos`` stay on ``device``.
    """

    def __init__(self, cfg: GrokConfig, batch: int, max_len: int, dtype: torch.dtype, device=None,
                 layer_devices: Optional[Sequence] = None):
        if max_len > cfg.max_seq_len:
            raise ValueError(f"max_len {max_len} exceeds the model context max_seq_len={cfg.max_seq_len}")
        layer_devices = layer_devices or [device] * cfg.num_layers
        shape = (batch, max_len, cfg.num_kv_heads, cfg.head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=d) for d in layer_devices]
        self.v = [torch.zeros(shape, dtype=dtype, device=d) for d in layer_devices]
        self.key_valid = torch.zeros(batch, max_len, dtype=torch.bool, device=device)
        self.pos = torch.zeros(batch, dtype=torch.long, device=device)
        self.batch, self.max_len, self.dtype = batch, max_len, dtype


class Attention(nn.Module):
    """GQA attention with RoPE, fp32 scores * attn_output_multiplier, 30*tanh(s/30) cap, fp32 softmax."""

    def __init__(self, cfg: GrokConfig, dtype: torch.dtype, quantized: bool):
        super().__init__()
        D, g = cfg.d_model, cfg.quant_groups
        self.wq = Weight((D, cfg.q_size), g["wq"], quantized, dtype, fp32_math=True)
        self.wk = Weight((D, cfg.kv_size), g["wk"], quantized, dtype, fp32_math=True)
        self.wv = Weight((D, cfg.kv_size), g["wv"], quantized, dtype, fp32_math=True)
        self.wo = Weight((cfg.q_size, D), g["wo"], quantized, dtype, fp32_math=True)
        self.cfg, self.dtype = cfg, dtype
        self.query_chunk = 1024  # query rows per score block (bounds the attention workspace)

    def forward(self, x: torch.Tensor, pos_BT: torch.Tensor, mask_BTS: torch.Tensor,
                cache: Optional[KVCache] = None, layer: int = 0) -> torch.Tensor:
        """x [B, T, D] fp32 (the unrounded pre-norm output) -> fp32 [B, T, D] after o_proj.

        mask_BTS: True = may attend. All math is fp32, with int8 weights dequantized EXACTLY (not
        rounded to bf16) even in bf16 mode: XLA fuses the dequantization and the whole block in fp32
        (SPEC §3.4). Measured on tiny_ref (bf16): bf16 intermediates give block mean |d| 3.1e-3, fp32
        ones 2.4e-3, fp32 with exact weights 1.7e-3; end to end with its own routing, exact weights
        lift top-1 from 68 % to 90 % (bf16-rounded weights flip routing decisions).
        """
        cfg = self.cfg
        B, T, _ = x.shape
        Hq, Hkv, dh = cfg.num_q_heads, cfg.num_kv_heads, cfg.head_dim
        f32 = torch.float32
        q = apply_rope((x @ self.wq.dequant(f32)).view(B, T, Hq, dh), pos_BT, cfg.rope_base)
        k = apply_rope((x @ self.wk.dequant(f32)).view(B, T, Hkv, dh), pos_BT, cfg.rope_base)
        v = (x @ self.wv.dequant(f32)).view(B, T, Hkv, dh)
        if cache is not None:
            # the cache holds the activation dtype (bf16 in the release), so cached K/V are rounded
            rows = torch.arange(B, device=x.device)[:, None]
            cache.k[layer][rows, pos_BT] = k.to(cache.dtype)
            cache.v[layer][rows, pos_BT] = v.to(cache.dtype)
            S = mask_BTS.shape[-1]  # only the filled prefix of the cache takes part
            k, v = cache.k[layer][:, :S].float(), cache.v[layer][:, :S].float()
        # q head h uses kv head h // (Hq/Hkv): group consecutive q heads per kv head
        q = q.view(B, T, Hkv, Hq // Hkv, dh)
        # queries a chunk at a time: the fp32 scores (and their capped / softmaxed copies) are
        # [B, Hq, query_chunk, S], not [B, Hq, T, S] (12.9 GB each for one 8k sequence of Grok-1)
        o = torch.cat([self._attend(q[:, t:t + self.query_chunk], k, v, mask_BTS[:, t:t + self.query_chunk])
                       for t in range(0, T, self.query_chunk)], dim=1)
        return o.reshape(B, T, Hq * dh) @ self.wo.dequant(f32)

    def _attend(self, q, k, v, mask_BTS):
        """softmax(cap(q.k * mult), masked) @ v for q [B, Tq, Hkv, G, dh]; fp32; -> [B, Tq, Hkv, G, dh]."""
        cfg = self.cfg
        s = torch.einsum("btkgd,bskd->bkgts", q, k) * cfg.attn_output_multiplier
        s = cfg.attn_logit_cap * torch.tanh(s / cfg.attn_logit_cap)
        s = s.masked_fill(~mask_BTS[:, None, None], MASK_VALUE)
        return torch.einsum("bkgts,bskd->btkgd", torch.softmax(s, dim=-1), v)


class DecoderLayer(nn.Module):
    """Sandwich-normed attention and MoE sublayers (4 RMSNorms, names as in weight_map.py)."""

    def __init__(self, cfg: GrokConfig, dtype: torch.dtype, quantized: bool):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.rms_norm_eps)
        self.attn = Attention(cfg, dtype, quantized)
        self.attn_post_norm = RMSNorm(cfg.d_model, cfg.rms_norm_eps)
        self.moe_norm = RMSNorm(cfg.d_model, cfg.rms_norm_eps)
        self.moe = MoE(cfg, dtype, quantized)
        self.moe_post_norm = RMSNorm(cfg.d_model, cfg.rms_norm_eps)
        self.dtype = dtype

    def forward(self, h: torch.Tensor, pos_BT: torch.Tensor, mask_BTS: torch.Tensor,
                cache: Optional[KVCache] = None, layer: int = 0,
                expert_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        """h [B, T, D] fp32 residual stream -> new residual stream. expert_ids [B, T, k] forces routing.

        The residual stream stays fp32: XLA never materialises it in bf16 between these ops, and
        rounding it costs 1.3x in logits parity on tiny_ref. Only the MoE experts compute in the
        activation dtype (the kernel contract).
        """
        B, T, D = h.shape
        h = h + self.attn_post_norm(self.attn(self.attn_norm(h), pos_BT, mask_BTS, cache, layer))
        m_in = self.moe_norm(h).view(B * T, D)  # fp32: the router consumes the unrounded norm output
        ids = None if expert_ids is None else expert_ids.reshape(B * T, -1)
        m, _, _ = self.moe(m_in, ids)
        return h + self.moe_post_norm(m.view(B, T, D))


class Grok(nn.Module):
    """Grok-1. ``model(tokens)`` -> logits ``[B, T, V]`` in the activation dtype.

    ``dtype``: activation dtype, torch.bfloat16 (as released) or torch.float32 (exact fp32 path).
    ``impl``: MoE kernel choice passed to ``grok_torch.kernels.fused_moe`` ("auto" | "torch" | "triton").
    """

    def __init__(self, config: GrokConfig, dtype: torch.dtype = torch.bfloat16, impl: str = "auto"):
        super().__init__()
        if dtype not in SUPPORTED_DTYPES:
            raise ValueError(f"dtype must be torch.bfloat16 or torch.float32, got {dtype}")
        for field in ("residual_mlp_size", "attn_temperature_len"):
            if getattr(config, field):
                raise NotImplementedError(f"config.{field}={getattr(config, field)} (a Grok-2 feature) is not implemented")
        if not config.tie_word_embeddings:
            raise NotImplementedError("config.tie_word_embeddings=False (an untied head) is not implemented")
        self.config, self.dtype = config, dtype
        quantized = config.weight_format == "int8"
        # fp32 as released: the embedding rows are multiplied unrounded (see forward). Loading keeps
        # a bf16 table (a checkpoint converted with bf16 plain tensors) in bf16 in bf16 mode rather
        # than doubling it; the values are the same either way (forward and head upcast exactly)
        self.embed = nn.Module()
        self.embed.weight = nn.Parameter(torch.empty(config.vocab_size, config.d_model), requires_grad=False)
        self.layers = nn.ModuleList(DecoderLayer(config, dtype, quantized) for _ in range(config.num_layers))
        self.norm = RMSNorm(config.d_model, config.rms_norm_eps)
        self.impl = impl

    # ---- construction ----
    @classmethod
    def from_pretrained(cls, path, dtype: Optional[torch.dtype] = None,
                        device: Union[str, torch.device, None] = None, config: Optional[GrokConfig] = None,
                        impl: str = "auto", *, device_map=None, max_memory=None, devices=None,
                        expert_parallel: Union[bool, str] = False, process_group=None,
                        torch_dtype: Optional[torch.dtype] = None) -> "Grok":
        """Load a grok-convert output directory (config.json + safetensors) without a second copy.

        The model is built on the meta device and each loaded tensor becomes its parameter on its
        device. ``config`` (optional) must match the checkpoint's config.json, else a ValueError
        names the fields. ``dtype`` (alias ``torch_dtype``): activation dtype, bf16 by default.

        Where the weights go (one of):
          ``device``: one device (default "cpu").
          ``device_map``: several GPUs of this process (``grok_torch.parallel.placement``):
            "experts" (each GPU a contiguous range of every layer's experts), "ffn" (each GPU a slice
            of every expert's hidden dim), "auto" / "balanced" / "balanced_low_0" / "sequential"
            (accelerate's planners, ``max_memory`` as in accelerate), or a {module: device} dict.
            ``devices`` picks the devices for "experts" / "ffn" (default every visible GPU). The
            memory planner (``grok-plan``) checks the fit first and fails before reading anything.
          ``expert_parallel``: inside an initialised torch.distributed process group, this rank
            holds the shared weights and its share of the experts (True or "experts") or of every
            expert's hidden dim ("ffn"); see ``grok_torch.parallel.distributed``.
        """
        if torch_dtype is not None:
            if dtype is not None and dtype != torch_dtype:
                raise ValueError(f"dtype={dtype} and torch_dtype={torch_dtype} disagree (torch_dtype is an alias)")
            dtype = torch_dtype
        return load_pretrained(cls, path, dtype=dtype or torch.bfloat16, device=device, config=config, impl=impl,
                               device_map=device_map, max_memory=max_memory, devices=devices,
                               expert_parallel=expert_parallel, process_group=process_group)

    @property
    def impl(self) -> str:
        return self._impl

    @impl.setter
    def impl(self, value: str) -> None:
        """One switch for every MoE block's kernel implementation."""
        if value not in ("auto", "torch", "triton"):
            raise ValueError(f"impl must be 'auto', 'torch' or 'triton', got {value!r}")
        self._impl = value
        for layer in self.layers:
            layer.moe.impl = value

    def new_cache(self, batch: int, max_len: Optional[int] = None) -> KVCache:
        """A zeroed KV cache, each layer's K/V on that layer's device (default length: the model context)."""
        return KVCache(self.config, batch, max_len or self.config.max_seq_len, self.dtype, self.embed.weight.device,
                       layer_devices=[layer.attn.wq.weight.device for layer in self.layers])

    # ---- forward ----
    def _check_tokens(self, tokens: torch.Tensor, cache: Optional[KVCache]) -> None:
        cfg = self.config
        if not isinstance(tokens, torch.Tensor) or tokens.dim() != 2:
            raise ValueError(f"tokens must be a [batch, seq] tensor, got {getattr(tokens, 'shape', type(tokens))}")
        if tokens.dtype.is_floating_point or tokens.dtype == torch.bool or tokens.is_complex():
            raise TypeError(f"tokens must be an integer tensor, got dtype {tokens.dtype}")
        if tokens.numel() and (tokens.min() < 0 or tokens.max() >= cfg.vocab_size):
            bad = tokens[(tokens < 0) | (tokens >= cfg.vocab_size)][0].item()
            raise ValueError(f"token id {bad} is out of range [0, vocab_size={cfg.vocab_size})")
        T = tokens.shape[1]
        if cache is None and T > cfg.max_seq_len:
            raise ValueError(f"sequence length {T} exceeds the model context max_seq_len={cfg.max_seq_len}")
        if cache is not None:
            if cache.batch != tokens.shape[0]:
                raise ValueError(f"cache batch {cache.batch} != tokens batch {tokens.shape[0]}")
            end = int(cache.pos.max()) + T
            if end > cache.max_len:
                raise ValueError(f"cache overflow: positions up to {end} but the cache holds {cache.max_len}")

    def forward(self, tokens: torch.Tensor, cache: Optional[KVCache] = None,
                expert_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        """tokens [B, T] int -> logits [B, T, V] (activation dtype).

        cache: decode/prefill through a KVCache; tokens are written at ``cache.pos`` and it advances by T.
        expert_ids: [B, L, T, k] forces every layer's expert choice (parity tests, debugging).
        """
        self._check_tokens(tokens, cache)
        cfg, dt = self.config, self.dtype
        B, T = tokens.shape
        dev = tokens.device
        tokens = tokens.long()
        valid_BT = tokens != cfg.pad_token_id
        if cache is None:
            pos_BT = torch.arange(T, device=dev).expand(B, T)
            key_valid, S = valid_BT, T
        else:
            pos_BT = cache.pos[:, None] + torch.arange(T, device=dev)
            cache.key_valid[torch.arange(B, device=dev)[:, None], pos_BT] = valid_BT
            S = int(pos_BT.max()) + 1
            key_valid = cache.key_valid[:, :S]
        causal = torch.arange(S, device=dev)[None, None, :] <= pos_BT[:, :, None]
        mask_BTS = key_valid[:, None, :] & causal

        # jit makes the multiplier a bf16 constant (78.5) but multiplies the fp32 rows unrounded
        h = self.embed.weight[tokens].float() * as_dtype(cfg.embedding_multiplier, dt)
        for i, layer in enumerate(self.layers):
            ids = None if expert_ids is None else expert_ids[:, i]
            h = layer(h, pos_BT, mask_BTS, cache, i, ids)
        if cache is not None:
            cache.pos += T
        return self.head(self.norm(h))

    def head(self, x: torch.Tensor) -> torch.Tensor:
        """Tied LM head on the fp32 final-norm output: ``(x @ E^T) * output_multiplier``, returned in the activation dtype."""
        cfg, dt = self.config, self.dtype
        E = self.embed.weight
        if E.dtype == torch.float32:
            logits = x @ E.T
        else:  # a bf16 table: upcast a slice of the vocabulary at a time, never the whole table
            logits = torch.cat([x @ e.float().T for e in E.split(16384)], dim=-1)
        logits = logits * as_dtype(cfg.output_multiplier, dt)
        if cfg.final_logit_softcap:  # Grok-2
            logits = cfg.final_logit_softcap * torch.tanh(logits / cfg.final_logit_softcap)
        return logits.to(dt)
