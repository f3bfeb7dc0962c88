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
from grok_torch.kernels.attention import attention
from grok_torch.loading import load_pretrained, parse_dtype
from grok_torch.moe import MoE
from grok_torch.weights import SUPPORTED_DTYPES, Weight

__all__ = ["Grok", "KVCache", "RMSNorm", "Attention", "DecoderLayer", "apply_rope", "keep_positions"]

def as_dtype(c: float, dtype: torch.dtype) -> float:
    """A Python constant as ``dtype`` holds it: jit turns ``bf16_array * 78.38`` into ``* 78.5`` (SPEC §3.1)."""
    return torch.tensor(c, dtype=dtype).item()


def keep_positions(h: torch.Tensor, keep: Union[int, torch.Tensor]) -> torch.Tensor:
    """h [B, T, D] at the positions ``logits_to_keep`` names (see ``Grok.forward``)."""
    if isinstance(keep, torch.Tensor):
        if keep.dim() == 1:
            return h[:, keep.to(h.device)]
        if keep.dim() == 2 and keep.shape[0] == h.shape[0]:
            return h.gather(1, keep.to(h.device)[:, :, None].expand(-1, -1, h.shape[-1]))
        raise ValueError(f"logits_to_keep as a tensor must be [K] or [batch, K] positions, got {tuple(keep.shape)}")
    if isinstance(keep, bool) or not isinstance(keep, int) or keep < 0:
        raise ValueError(f"logits_to_keep must be an int >= 0 (0 = every position) or an index tensor, got {keep!r}")
    return h if keep == 0 else h[:, -keep:]


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
    layer's cache beside the layer; ``key_valid`` and ``pos`` stay on ``device``. Attention reads the
    whole preallocated cache in place (its dtype, never an fp32 copy), slots past a row's position
    being invisible to it, so a decode step's shapes do not grow with the tokens (as in the official
    runner's memory; a query with no visible key averages over all ``max_len`` slots there too).
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
    """GQA attention with RoPE, fp32 scores * attn_output_multiplier, 30*tanh(s/30) cap, fp32 softmax.

    ``precision``: "fp32" (default, the faithful path: exact int8 weights, fp32 products) or "bf16"
    (projections and the two attention products on bf16 operands with fp32 accumulation: tensor
    cores on a GPU; parity stays within SPEC §8's bf16 bounds, see the README). ``impl`` picks the
    kernels ("auto": Triton on CUDA, the PyTorch reference elsewhere).
    """

    def __init__(self, cfg: GrokConfig, dtype: torch.dtype, quantized: bool):
        super().__init__()
        D, g = cfg.d_model, cfg.quant_groups
        self.wq = Weight((D, cfg.q_size), g["wq"], quantized, dtype, fp32_math=True)
        self.wk = Weight((D, cfg.kv_size), g["wk"], quantized, dtype, fp32_math=True)
        self.wv = Weight((D, cfg.kv_size), g["wv"], quantized, dtype, fp32_math=True)
        self.wo = Weight((cfg.q_size, D), g["wo"], quantized, dtype, fp32_math=True)
        self.cfg, self.dtype = cfg, dtype
        self.precision, self.impl = "fp32", "auto"

    def forward(self, x: torch.Tensor, pos_BT: torch.Tensor, key_valid: torch.Tensor,
                cache: Optional[KVCache] = None, layer: int = 0, causal_offset: Optional[int] = None) -> torch.Tensor:
        """x [B, T, D] fp32 (the unrounded pre-norm output) -> fp32 [B, T, D] after o_proj.

        key_valid [B, S]: which keys are real tokens (S = T without a cache; with one, the whole
        preallocated cache: its unwritten tail is invisible by position). Query (b, t) at position
        ``pos_BT[b, t]`` sees key j iff key_valid[b, j] and j <= pos_BT[b, t]. ``causal_offset``: see
        ``grok_torch.kernels.attention`` (a host-known bound that lets whole key blocks be skipped).

        All math is fp32, with int8 weights dequantized EXACTLY (not rounded to bf16) even in bf16
        mode: XLA fuses the dequantization and the whole block in fp32 (SPEC §3.4). Measured on
        tiny_ref (bf16): bf16 intermediates give block mean |d| 3.1e-3, fp32 ones 2.4e-3, fp32 with
        exact weights 1.7e-3; end to end with its own routing, exact weights lift top-1 from 68 % to
        90 % (bf16-rounded weights flip routing decisions).
        """
        cfg, prec, impl = self.cfg, self.precision, self.impl
        B, T, _ = x.shape
        Hq, Hkv, dh = cfg.num_q_heads, cfg.num_kv_heads, cfg.head_dim
        q = apply_rope(self.wq(x, prec, impl).view(B, T, Hq, dh), pos_BT, cfg.rope_base)
        k = apply_rope(self.wk(x, prec, impl).view(B, T, Hkv, dh), pos_BT, cfg.rope_base)
        v = self.wv(x, prec, impl).view(B, T, Hkv, dh)
        if cache is not None:
            # the cache holds the activation dtype (bf16 in the release), so cached K/V are rounded;
            # attention then reads the cache where it lies (no fp32 copy of it)
            rows = torch.arange(B, device=x.device)[:, None]
            cache.k[layer][rows, pos_BT] = k.to(cache.dtype)
            cache.v[layer][rows, pos_BT] = v.to(cache.dtype)
            k, v = cache.k[layer], cache.v[layer]
        o = attention(q, k, v, pos_BT, key_valid, scale=cfg.attn_output_multiplier, cap=cfg.attn_logit_cap,
                      precision=prec, causal_offset=causal_offset, impl=impl)
        return self.wo(o.reshape(B, T, Hq * dh), prec, impl)


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

    def forward(self, h: torch.Tensor, pos_BT: torch.Tensor, key_valid: torch.Tensor,
                cache: Optional[KVCache] = None, layer: int = 0,
                expert_ids: Optional[torch.Tensor] = None, causal_offset: Optional[int] = None,
                router_stats: Optional[list] = None) -> torch.Tensor:
        """h [B, T, D] fp32 residual stream -> new residual stream. expert_ids [B, T, k] forces routing.
        router_stats: a list that receives (router logits [B*T, E] fp32, probs, top-k ids) of this layer.

        The residual stream stays fp32: XLA never materialises it in bf16 between these ops, and
        rounding it costs 1.3x in logits parity on tiny_ref. Only the MoE experts compute in the
        activation dtype (the kernel contract).
        """
        B, T, D = h.shape
        h = h + self.attn_post_norm(self.attn(self.attn_norm(h), pos_BT, key_valid, cache, layer, causal_offset))
        m_in = self.moe_norm(h).view(B * T, D)  # fp32: the router consumes the unrounded norm output
        ids = None if expert_ids is None else expert_ids.reshape(B * T, -1)
        m, probs, topk = self.moe(m_in, ids)
        if router_stats is not None:  # for the auxiliary losses of fine-tuning (grok_torch.finetune.losses)
            router_stats.append((m_in @ self.moe.router.effective_weight(), probs, topk))
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
        self.gradient_checkpointing = False  # fine-tuning: recompute each layer in backward
        self.lora_config = None  # set by grok_torch.lora when adapters are attached

    # ---- construction ----
    @classmethod
    def from_pretrained(cls, path, dtype: Union[torch.dtype, str, None] = None,
                        device: Union[str, torch.device, None] = None, config: Optional[GrokConfig] = None,
                        impl: str = "auto", *, device_map=None, max_memory=None, devices=None,
                        expert_parallel: Union[bool, str] = False, process_group=None,
                        torch_dtype: Union[torch.dtype, str, None] = None, adapter=None) -> "Grok":
        """Load a grok-convert output directory (config.json + safetensors) without a second copy.

        The model is built on the meta device and each loaded tensor becomes its parameter on its
        device. ``config`` (optional) must match the checkpoint's config.json, else a ValueError
        names the fields. ``dtype`` (alias ``torch_dtype``): activation dtype, bf16 by default; also
        as a string ("bfloat16" / "bf16", "float32" / "fp32"), or "auto": fp32 for an fp32 checkpoint,
        else bf16 (the released int8 weights run in bf16).

        Where the weights go (one of):
          ``device``: one device (default "cpu"). ``device_map`` naming one device ("cpu", "cuda:0",
            0, {"": 0}: the transformers spellings) means the same.
          ``device_map``: several GPUs of this process (``grok_torch.parallel.placement``):
            "experts" (each GPU a contiguous range of every layer's experts), "ffn" (each GPU a slice
            of every expert's hidden dim), "auto" / "balanced" / "balanced_low_0" / "sequential"
            (accelerate's planners, ``max_memory`` as in accelerate), or a {module: device} dict.
            ``devices`` picks the devices for "experts" / "ffn" (default every visible GPU). The
            memory planner (``grok-plan``) checks the fit first and fails before reading anything.
          ``expert_parallel``: inside an initialised torch.distributed process group, this rank
            holds the shared weights and its share of the experts (True or "experts") or of every
            expert's hidden dim ("ffn"); see ``grok_torch.parallel.distributed``.

        ``adapter``: a LoRA adapter directory (``grok-finetune`` output or ``grok_torch.lora.save_adapter``)
        applied on top of the loaded weights without merging; refused when trained for another model.
        """
        dtype = None if dtype is None else parse_dtype(dtype)
        if torch_dtype is not None:
            torch_dtype = parse_dtype(torch_dtype, "torch_dtype")
            if dtype is not None and dtype != torch_dtype:
                raise ValueError(f"dtype={dtype} and torch_dtype={torch_dtype} disagree (torch_dtype is an alias)")
            dtype = torch_dtype
        if adapter is not None:  # fail on a bad adapter before reading any weight
            from grok_torch.lora import read_adapter_config

            read_adapter_config(adapter)
        model = load_pretrained(cls, path, dtype=dtype or torch.bfloat16, device=device, config=config, impl=impl,
                                device_map=device_map, max_memory=max_memory, devices=devices,
                                expert_parallel=expert_parallel, process_group=process_group)
        if adapter is not None:
            from grok_torch.lora import load_adapter

            load_adapter(model, adapter)
            model.eval()
            for p in model.parameters():
                p.requires_grad_(False)  # inference: the adapters are applied, not trained
        return model

    @property
    def impl(self) -> str:
        return self._impl

    @impl.setter
    def impl(self, value: str) -> None:
        """One switch for every kernel (MoE, attention, attention projections): Triton or the PyTorch reference."""
        if value not in ("auto", "torch", "triton"):
            raise ValueError(f"impl must be 'auto', 'torch' or 'triton', got {value!r}")
        self._impl = value
        for layer in self.layers:
            layer.moe.impl = layer.attn.impl = value

    @property
    def attn_precision(self) -> str:
        return self.layers[0].attn.precision if len(self.layers) else "fp32"

    @attn_precision.setter
    def attn_precision(self, value: str) -> None:
        """"fp32" (default, faithful) or "bf16" (tensor-core attention; within SPEC §8's bf16 bounds)."""
        if value not in ("fp32", "bf16"):
            raise ValueError(f"attn_precision must be 'fp32' or 'bf16', got {value!r}")
        for layer in self.layers:
            layer.attn.precision = value

    # ---- dtype and device: nn.Module's casts would round the fp32 norms, routers and embedding ----
    @property
    def device(self) -> torch.device:
        """Where inputs go (transformers' ``model.device``): the embedding's device."""
        return self.embed.weight.device

    def set_dtype(self, dtype: Union[torch.dtype, str]) -> "Grok":
        """Switch the activation dtype in place; ``.to(dtype)``, ``.bfloat16()`` and ``.float()`` do this.

        The model then computes what ``from_pretrained(dtype=dtype)`` of the same weights computes
        (bit for bit, up to precision an earlier switch to bf16 rounded away): int8 weights, their
        bf16 scales, the fp32 norms and routers and LoRA adapters are untouched; float expert
        matrices take the new dtype; the embedding and the fp32-math attention matrices become fp32
        for fp32 and are otherwise kept as they are (loading keeps fp32 ones in bf16 mode).
        """
        try:
            parsed = parse_dtype(dtype)
        except ValueError:
            parsed = None
        if parsed in (None, "auto"):
            raise ValueError(f"cannot run Grok in {dtype if isinstance(dtype, torch.dtype) else repr(dtype)}: "
                             "its activation dtype is torch.bfloat16 (as released) or torch.float32; use "
                             "model.to(torch.bfloat16) / model.bfloat16() or model.float()")
        dtype = parsed
        for module in self.modules():
            if isinstance(module, Weight) and module.weight.is_floating_point() and (
                    dtype == torch.float32 or not module.fp32_math):
                module.weight.data = module.weight.data.to(dtype)
            if isinstance(getattr(module, "dtype", None), torch.dtype):  # Grok, layers, attention, MoE blocks
                module.dtype = dtype
        if dtype == torch.float32:
            self.embed.weight.data = self.embed.weight.data.float()
        return self

    def to(self, *args, **kwargs) -> "Grok":
        """nn.Module.to, except that a dtype is the activation dtype (``set_dtype``): ``.to("cuda")``,
        ``.to(torch.bfloat16)``, ``.to(device, dtype)``."""
        device, dtype, non_blocking, memory_format = torch._C._nn._parse_to(*args, **kwargs)
        if dtype is not None:
            self.set_dtype(dtype)
        if device is not None or memory_format is not None:
            moves = {"device": device, "memory_format": memory_format}
            super().to(**{k: v for k, v in moves.items() if v is not None}, non_blocking=non_blocking)
        return self

    def bfloat16(self) -> "Grok":
        return self.set_dtype(torch.bfloat16)

    def float(self) -> "Grok":
        return self.set_dtype(torch.float32)

    def half(self) -> "Grok":
        return self.set_dtype(torch.float16)  # refused, naming what to use instead

    def double(self) -> "Grok":
        return self.set_dtype(torch.float64)

    def type(self, dst_type) -> "Grok":
        return self.set_dtype(dst_type)

    def new_cache(self, batch: int, max_len: Optional[int] = None) -> KVCache:
        """A zeroed KV cache, each layer's K/V on that layer's device (default length: the model context)."""
        return KVCache(self.config, batch, max_len or self.config.max_seq_len, self.dtype, self.embed.weight.device,
                       layer_devices=[layer.attn.wq.weight.device for layer in self.layers])

    def generate(self, input_ids, attention_mask=None, **kwargs) -> torch.Tensor:
        """transformers-style generation: ``input_ids [B, T]`` -> LongTensor ``[B, T + T_new]``, e.g.
        ``model.generate(**tok(texts, padding=True, return_tensors="pt"), max_new_tokens=20)``.

        Keywords (``grok_torch.generate.generate_ids``): max_new_tokens (or max_length), do_sample (False: greedy),
        temperature, top_p, top_k, eos_token_id, pad_token_id, streamer, seed, prefill_chunk,
        cuda_graph. ``grok_torch.generate(model, prompts, ...)`` is the native API (a ``Generation``
        per prompt, text prompts, EOS handling, finish reasons).
        """
        from grok_torch.generate import generate_ids

        return generate_ids(self, input_ids, attention_mask, **kwargs)

    # ---- forward ----
    def _check_shapes(self, tokens: torch.Tensor, cache: Optional[KVCache]) -> None:
        """Checks that read no device value (what a captured decode step can afford)."""
        if not isinstance(tokens, torch.Tensor) or tokens.dim() != 2:
            raise ValueError(f"tokens must be a [batch, seq] tensor, got {getattr(tokens, 'shape', type(tokens))}")
        if tokens.dtype.is_floating_point or tokens.dtype == torch.bool or tokens.is_complex():
            raise TypeError(f"tokens must be an integer tensor, got dtype {tokens.dtype}")
        if cache is None and tokens.shape[1] > self.config.max_seq_len:
            raise ValueError(f"sequence length {tokens.shape[1]} exceeds the model context "
                             f"max_seq_len={self.config.max_seq_len}")
        if cache is not None and cache.batch != tokens.shape[0]:
            raise ValueError(f"cache batch {cache.batch} != tokens batch {tokens.shape[0]}")

    def _check_values(self, tokens: torch.Tensor, cache: Optional[KVCache]) -> Optional[int]:
        """Token ids in range and no cache overflow (reads device values); returns max(cache.pos)."""
        cfg = self.config
        if tokens.numel() and (tokens.min() < 0 or tokens.max() >= cfg.vocab_size):
            bad = tokens[(tokens < 0) | (tokens >= cfg.vocab_size)][0].item()
            raise ValueError(f"token id {bad} is out of range [0, vocab_size={cfg.vocab_size})")
        if cache is None:
            return None
        start = int(cache.pos.max())
        if start + tokens.shape[1] > cache.max_len:
            raise ValueError(f"cache overflow: positions up to {start + tokens.shape[1]} but the cache holds "
                             f"{cache.max_len}")
        return start

    def forward(self, tokens: torch.Tensor, cache: Optional[KVCache] = None,
                expert_ids: Optional[torch.Tensor] = None, *, logits_to_keep: Union[int, torch.Tensor] = 0,
                static_shapes: bool = False, router_stats: Optional[list] = None,
                return_hidden: bool = False) -> torch.Tensor:
        """tokens [B, T] int -> logits [B, T, V] (activation dtype).

        cache: decode/prefill through a KVCache; tokens are written at ``cache.pos`` and it advances by T.
        expert_ids: [B, L, T, k] forces every layer's expert choice (parity tests, debugging).
        logits_to_keep (the transformers name): 0 (default) every position; an int k > 0 the last k
            positions (``[B, k, V]``); an index tensor ``[K]`` (the same positions for every row) or
            ``[B, K]`` (per row, e.g. each prompt's last token) -> ``[B, K, V]``. The final norm and the
            head (131072 columns for Grok-1) only run on the kept positions.
        static_shapes: the decode step a CUDA graph holds. Nothing is read back to the host: the
            token ids and the cache bound are not checked (the caller vouches for them: ``stream``
            checks prompts on the host, sampled ids are in range by construction) and attention
            visits the whole preallocated cache with a mask instead of skipping its unwritten tail.
            Same values as the default path up to fp32 summation order.
        router_stats: a list that receives each layer's (router logits, probs, top-k ids), for the
            load-balancing and z losses of fine-tuning.
        return_hidden: return the final norm's fp32 output [B, T, D] instead of the logits (``head``
            applies the LM head; fine-tuning computes its loss a chunk of positions at a time).

        With ``model.gradient_checkpointing = True`` and autograd recording, each layer's activations
        are recomputed in backward instead of kept (``torch.utils.checkpoint``, RNG state preserved,
        so dropout masks repeat).
        """
        self._check_shapes(tokens, cache)
        start = None if static_shapes else self._check_values(tokens, cache)
        cfg, dt = self.config, self.dtype
        B, T = tokens.shape
        dev = tokens.device
        tokens = tokens.long()
        valid_BT = tokens != cfg.pad_token_id
        if cache is None:
            pos_BT = torch.arange(T, device=dev).expand(B, T)
            key_valid, causal_offset = valid_BT, 0
        else:
            pos_BT = cache.pos[:, None] + torch.arange(T, device=dev)
            cache.key_valid[torch.arange(B, device=dev)[:, None], pos_BT] = valid_BT
            key_valid, causal_offset = cache.key_valid, start  # every row's positions are <= start + t

        # jit makes the multiplier a bf16 constant (78.5) but multiplies the fp32 rows unrounded
        h = self.embed.weight[tokens].float() * as_dtype(cfg.embedding_multiplier, dt)
        checkpoint = self.gradient_checkpointing and torch.is_grad_enabled() and cache is None
        for i, layer in enumerate(self.layers):
            ids = None if expert_ids is None else expert_ids[:, i]
            if checkpoint:
                from torch.utils.checkpoint import checkpoint as recompute

                h = recompute(layer, h, pos_BT, key_valid, None, i, ids, causal_offset, router_stats,
                              use_reentrant=False)
            else:
                h = layer(h, pos_BT, key_valid, cache, i, ids, causal_offset, router_stats)
        if cache is not None:
            cache.pos += T
        h = self.norm(keep_positions(h, logits_to_keep))
        return h if return_hidden else self.head(h)

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
