"""Expert parallelism across processes and nodes on torch.distributed (torchrun / accelerate launch).

    torchrun --nproc_per_node N $(which grok-generate) --model DIR ... [--device-map experts|ffn]

    import torch.distributed as dist
    dist.init_process_group(timeout=datetime.timedelta(seconds=300))   # nccl on GPUs, gloo on CPUs
    model = Grok.from_pretrained(DIR, expert_parallel=True)            # or "ffn"

Every rank holds the shared weights (embedding, attention, norms, routers) and its share of every
layer's experts, and reads only those bytes from the safetensors shards. ``prepare_expert_parallel``
(called by ``load_pretrained`` on the meta model) swaps each layer's ``MoE`` for an
``ExpertParallelMoE`` whose one ``ExpertShard`` holds this rank's ``ShardSpec``. Every rank runs the
whole model on the SAME tokens (attention is replicated); only the MoE blocks exchange data:

    x_TD (identical on every rank) -> moe_router (identical routing on every rank)
    split "experts" (rank r holds experts [r*E/W, (r+1)*E/W)), exchange "all_to_all" (default):
        rank r takes tokens [r*ceil(T/W), (r+1)*ceil(T/W)) (none at all for some ranks when T < W)
        -> one row per (token, slot), sorted by the rank holding its expert
        -> all_to_all_single of the W row counts, counts to the host (THE ONE SYNC PER LAYER)
        -> all_to_all_single of [x | gate | expert id] rows (fp32, uneven splits)
        -> each rank: moe_experts on the rows it received (k = 1 per row) -> fp32 gate * expert(x)
        -> all_to_all_single back (the reversed splits) -> the owner sums each token's k rows
           in slot order -> all_gather of the W token shares -> [T, D]
    split "experts", exchange "all_reduce" / split "ffn" (rank r holds F columns [r*F/W, (r+1)*F/W)
    of every expert):
        moe_experts over all T tokens with this rank's weights -> fp32 partial [T, D]
        -> sum of the W partials -> [T, D]
    -> one cast to the activation dtype

Exactness. The "experts" split gives the single-process logits bit for bit on the reference path
(impl="torch", at equal CPU thread counts: CPU GEMMs block their sums by thread count): the receiver computes each expert over the same rows, in the same order, as one
device does, and the owner adds a token's k terms in slot order, as one device does. The sum of
partials is "ordered" by default (``deterministic=True``): an all_to_all_single of 1/W of every
partial, a sum over ranks in rank order, an all_gather (the bytes of a ring all-reduce), so "ffn"
equals the in-process ``device_map="ffn"`` model bit for bit, whatever the backend's reduction
algorithm, and every rank holds the same bits. ``deterministic=False`` uses ``all_reduce`` (one
collective; the summation order is the backend's). On GPUs the Triton kernels choose tiles by rows
per call, so bit equality with one GPU is not promised there (SPEC §8's bounds are).

Host synchronisation. The all_to_all needs its split sizes on the host: one device-to-host copy
per layer (64 per decoded token for Grok-1), which stops the host from queueing the next layer's
kernels before this one finishes and rules out capturing the decode step in a CUDA graph (the
``ShardedMoE`` / kernel contract: no host reads). ``set_exchange(model, "all_reduce")`` makes the
"experts" split sync-free (every rank computes its experts' slots of all tokens, the partials are
summed: same bits at top-2, same compute, 2(W-1)/W of [T, D] fp32 on the wire per rank instead
of about (2k(W-1)/W^2 + (W-1)/W) of it, one or two collectives instead of four). "ffn" never syncs.

Faults. Collective failures (a peer that died, a timeout) become ``CollectiveError`` naming this
rank, the layer and the exchange. Set a timeout on the process group (``init_process_group(...,
timeout=...)``; grok-generate: ``--dist-timeout``) or a rank whose peer hangs waits for the default
(10 min for NCCL / 30 min for gloo).

Training (the "experts" split; LoRA, ``grok-finetune`` under torchrun). Gradients flow through both
exchanges. Every rank computes the same loss from the same tokens, so each replicated tensor's
gradient is the same on every rank (Megatron's convention), and one autograd node per MoE block
(``_Exchange``) does the rest: forward = the exchange above (the same ops, the same bits); backward =
  "all_reduce": this rank's experts' d(x), d(gates), d(its adapters) from the shared d(out)
      (the sum of partials is "identity" backward), then d(x) and d(gates) summed over ranks;
  "all_to_all": d(out) of my token share (the all_gather's backward is "take my rows"), the
      reversed all_to_all of the expert outputs' gradients, d(rows), d(adapters) where the experts
      are, d(rows) sent back (the reversed all_to_all), d(x), d(gates) of my share, summed over ranks
      (other ranks' shares are exact zeros here).
The gradient sums are the ordered sum above (every rank gets the same bits, so the replicated
adapters, attention and router, stay identical without an all-reduce of their gradients; each
rank's expert adapters get their gradients where they live). One node per block, so the
collectives of backward run on every rank in the same order even where a rank's experts received
no tokens. Not trainable: the "ffn" split (LoRA on experts is refused there anyway), LoRA dropout
on experts with replicated tokens (the masks would depend on which rank holds a row, so the ranks'
RNG streams, and then their replicated adapters' dropout masks, would diverge; with local tokens,
below, each rank's masks are its own and that is fine), ``retain_graph``.

Data parallelism (``set_tokens(model, "local")``; ``grok-finetune`` under torchrun does this). Each
rank runs the model on its OWN tokens (its slice of the global batch): attention, router and
embedding see the local tokens only, and the "all_to_all" exchange sends all of this rank's rows
(not a 1/W share of identical tokens) to the experts' ranks and brings the outputs back, with no
all_gather: the block returns [T_local, D], and T_local may differ between ranks. Backward: d(out)
of my tokens -> the reversed all_to_alls as above -> each owner's expert adapters get the gradient
of every rank's rows (complete there), and d(x), d(gates) of my tokens come back complete (every
expert term of a token returns to its rank), so they are NOT summed over ranks. The replicated
parameters' gradients then differ between ranks (each holds its tokens' part): the training loop
sums them over ranks (``grok_torch.finetune.train``). "all_reduce" and the "ffn" split need
replicated tokens (they are refused with local tokens). Inference stays "replicated".
"""
from __future__ import annotations

import os
from typing import Dict, Optional, Tuple

import torch
from torch import nn

from grok_torch.config import GrokConfig
from grok_torch.moe import RoutedMoE
from grok_torch.parallel.sharded_moe import SPLITS, ExpertShard, ShardSpec, replace_moe_blocks, shard_specs

__all__ = ["prepare_expert_parallel", "ExpertParallelMoE", "CollectiveError", "EXCHANGES", "TOKENS", "set_exchange",
           "set_tokens", "rank_bytes", "default_device"]

EXCHANGES = ("all_to_all", "all_reduce")
TOKENS = ("replicated", "local")


class CollectiveError(RuntimeError):
    """A collective of expert parallelism failed on this rank (a peer died or timed out)."""


def _dist():
    import torch.distributed as dist

    return dist


def _backend(process_group) -> str:
    return str(_dist().get_backend(process_group)).lower()


def default_device(process_group=None) -> torch.device:
    """``cuda:LOCAL_RANK`` when the group's backend is NCCL, else ``cpu`` (gloo)."""
    if "nccl" in _backend(process_group):
        n = torch.cuda.device_count()
        local = int(os.environ.get("LOCAL_RANK", _dist().get_rank() % max(n, 1)))
        return torch.device("cuda", local)
    return torch.device("cpu")


def _rank_device(device, process_group) -> torch.device:
    from grok_torch.loading import _check_device

    device = _check_device(default_device(process_group) if device is None else device)
    backend = _backend(process_group)
    if device.type == "cuda" and "nccl" not in backend:
        raise ValueError(f"expert_parallel: device {device} with a {backend!r} process group: initialise the "
                         "group with backend='nccl' to exchange CUDA tensors (gloo is for CPUs)")
    if device.type != "cuda" and "gloo" not in backend:
        raise ValueError(f"expert_parallel: device {device} with a {backend!r} process group: NCCL exchanges "
                         "CUDA tensors only; initialise the group with backend='gloo' on CPUs")
    return device


def prepare_expert_parallel(model: nn.Module, split: str = "experts", *, device=None,
                            process_group=None) -> Dict[str, torch.device]:
    """Give this rank its share of every MoE block of ``model`` (a Grok on the meta device).

    Replaces each layer's ``MoE`` by an ``ExpertParallelMoE`` holding the router and this rank's
    ``ExpertShard`` (parameters ``layers.{i}.moe.shards.0.w1.weight`` ..., which the loader reads as
    slices of the checkpoint tensors). Returns {parameter name: device}: everything on ``device``
    (default: ``cuda:LOCAL_RANK`` with NCCL, ``cpu`` with gloo).
    """
    dist = _dist()
    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError("expert_parallel needs an initialised torch.distributed process group: launch with "
                         "torchrun (or accelerate launch) and call torch.distributed.init_process_group("
                         "timeout=...) before from_pretrained (grok-generate does this itself)")
    rank, world = dist.get_rank(process_group), dist.get_world_size(process_group)
    if rank < 0:
        raise ValueError("expert_parallel: this process is not a member of process_group")
    if split not in SPLITS:
        raise ValueError(f"expert_parallel must be True, 'experts' or 'ffn', got {split!r}")
    cfg: GrokConfig = model.config
    try:
        specs = shard_specs(cfg, split, world)
    except ValueError as e:
        raise ValueError(f"expert_parallel: world size {world}: {e}") from None
    device = _rank_device(device, process_group)
    quantized = cfg.weight_format == "int8"
    replace_moe_blocks(model, lambda i: ExpertParallelMoE(cfg, model.dtype, quantized, specs[rank], split=split,
                                                          rank=rank, world=world, process_group=process_group,
                                                          layer=i))
    return {name: device for name, _ in model.named_parameters()}


def _blocks(model: nn.Module) -> list:
    """The expert-parallel MoE blocks of ``model`` (ValueError when there are none)."""
    blocks = [layer.moe for layer in model.layers if isinstance(layer.moe, ExpertParallelMoE)]
    if not blocks:
        raise ValueError("the model is not expert-parallel (load it with expert_parallel=...)")
    return blocks


def set_exchange(model: nn.Module, exchange: str, deterministic: Optional[bool] = None) -> None:
    """Choose how every expert-parallel MoE block of ``model`` exchanges data (see the module docstring):
    ``exchange`` "all_to_all" | "all_reduce" ("experts" split only; "ffn" always sums partials),
    ``deterministic`` the ordered sum (True) or the backend's all_reduce (False)."""
    if exchange not in EXCHANGES:
        raise ValueError(f"exchange must be one of {EXCHANGES}, got {exchange!r}")
    blocks = _blocks(model)
    for moe in blocks:
        moe.exchange = exchange
        if deterministic is not None:
            moe.deterministic = deterministic


def set_tokens(model: nn.Module, tokens: str) -> None:
    """Whose tokens the expert-parallel MoE blocks of ``model`` see: "replicated" (default: every rank
    the same tokens, inference and expert-parallel training) or "local" (data parallelism: each rank
    its own tokens, sent to the experts' ranks and back, no all_gather; the "all_to_all" exchange of
    the "experts" split only; see "Data parallelism" in the module docstring)."""
    if tokens not in TOKENS:
        raise ValueError(f"tokens must be one of {TOKENS}, got {tokens!r}")
    blocks = _blocks(model)
    for moe in blocks:
        moe.tokens = tokens


def rank_bytes(model: nn.Module) -> Dict[str, int]:
    """Bytes of parameters this process holds: {"shared": ..., "experts": ..., "total": ...}."""
    experts = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if ".moe.shards." in n)
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    return {"shared": total - experts, "experts": experts, "total": total}


class ExpertParallelMoE(RoutedMoE):
    """Drop-in for ``MoE`` (same forward contract) holding this rank's share of the experts.

    Every rank must call it with the same ``x_TD`` (the model replicates attention), in the same
    order: it runs collectives on ``process_group``. With ``tokens = "local"`` (``set_tokens``: data
    parallelism) each rank calls it with its own tokens instead, still in the same order.
    """

    capturable = False  # the all_to_all exchange reads the row counts on the host; NCCL calls

    def __init__(self, cfg: GrokConfig, dtype: torch.dtype, quantized: bool, spec: ShardSpec, *, split: str,
                 rank: int, world: int, process_group=None, layer: int = 0):
        super().__init__(cfg, dtype)
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        self.shards = nn.ModuleList([ExpertShard(cfg, spec, dtype, quantized)])
        self.split, self.rank, self.world, self.layer = split, rank, world, layer
        self.group = process_group
        self.experts_per_rank = spec.num_experts
        self.exchange = "all_to_all"
        self.deterministic = True
        self.tokens = "replicated"

    @property
    def spec(self) -> ShardSpec:
        return self.shards[0].spec

    def extra_repr(self) -> str:
        return (f"split={self.split!r}, rank={self.rank}, world={self.world}, exchange={self.exchange!r}, "
                f"tokens={self.tokens!r}")

    def forward(
        self, x_TD: torch.Tensor, expert_ids_TK: Optional[torch.Tensor] = None
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        params = [p for p in self.shards[0].parameters() if p.requires_grad]
        grad = torch.is_grad_enabled() and (x_TD.requires_grad or params or self.router.weight.requires_grad
                                            or self.router.lora is not None)
        if grad and self.split != "experts":
            raise NotImplementedError("expert parallelism trains with the 'experts' split only: the 'ffn' split is "
                                      "inference-only (run under torch.no_grad())")
        if self.tokens == "local" and not (self.split == "experts" and self.exchange == "all_to_all"):
            raise ValueError("local tokens (data parallelism) need the 'experts' split and the 'all_to_all' exchange, "
                             f"not split {self.split!r} with exchange {self.exchange!r}")
        probs, gates, ids = self.route(x_TD, expert_ids_TK)
        if self.world == 1:
            out = self.shards[0](x_TD, gates, ids, self.dtype, self.impl)
            return out.to(self.dtype), probs, ids
        if torch.is_grad_enabled() and (x_TD.requires_grad or gates.requires_grad or params):
            lora = getattr(self.shards[0].w1, "lora", None)
            # with replicated tokens the ranks must draw the same masks everywhere else, which the experts'
            # rank-local draws would break; with local tokens (data parallelism) each rank's masks are its own
            if self.training and lora is not None and lora.p and self.tokens != "local":
                raise NotImplementedError("LoRA dropout on experts needs data parallelism under expert parallelism (the "
                                          "ranks' RNG streams would diverge): use --lora-dropout 0 or leave "
                                          "experts out of the targets")
            out = _Exchange.apply(self, x_TD, gates, ids, *params)
        else:
            out = self._exchange(x_TD, gates, ids)
        return out.to(self.dtype), probs, ids

    def _exchange(self, x: torch.Tensor, gates: torch.Tensor, ids: torch.Tensor, graph: Optional[dict] = None
                  ) -> torch.Tensor:
        """The fp32 [T, D] output; ``graph``: filled with what backward needs (autograd on locally)."""
        if self.split == "experts" and self.exchange == "all_to_all":
            return self._all_to_all(x, gates, ids, graph)
        partial = self.shards[0](x, gates, ids, self.dtype, self.impl)
        if graph is not None:
            graph.update(kind="sum", out=partial)
            partial = partial.detach().clone()  # the sum may work in place
        return self._sum_over_ranks(partial)

    def _backward(self, graph: dict, grad: torch.Tensor, x: torch.Tensor, gates: torch.Tensor, params) -> list:
        """[d x, d gates, *d params] of this block from d out (the same on every rank; local tokens: each
        rank's own)."""
        if graph.get("kind") == "sum":       # the sum of partials: identity backward
            dx, dg, *dp = _grads(graph["out"], [x, gates, *params], grad)
        elif graph.get("kind") == "a2a":
            g, W, r, share = graph, self.world, self.rank, graph["share"]
            if g["local"]:                  # my tokens: d out is d mine
                (d_back,) = _grads(g["mine"], [g["back"]], grad)
            else:
                mine = grad.new_zeros(W * share, grad.shape[1])
                mine[: grad.shape[0]] = grad
                (d_back,) = _grads(g["mine"], [g["back"]], mine[r * share:(r + 1) * share])   # my token share
            d_y = d_back.new_empty(sum(g["recv"]), d_back.shape[1])
            self._collective("all_to_all_single (output gradients)", _dist().all_to_all_single, d_y,
                             d_back.contiguous(), output_split_sizes=g["recv"], input_split_sizes=g["send"])
            d_got, *dp = _grads(g["y"], [g["got"], *params], d_y)
            d_payload = d_got.new_empty(sum(g["send"]), d_got.shape[1])
            self._collective("all_to_all_single (row gradients)", _dist().all_to_all_single, d_payload,
                             d_got.contiguous(), output_split_sizes=g["send"], input_split_sizes=g["recv"])
            dx, dg = _grads(g["payload"], [x, gates], d_payload)
        else:                                # no tokens (T = 0 on every rank): nothing exchanged
            dx, dg, *dp = [torch.zeros_like(t) for t in (x, gates, *params)]
        if graph.get("kind") is not None and not graph.get("local"):
            # each rank holds its experts' part of d x, d gates: sum them (local tokens: d x, d gates of my
            # tokens are complete here, every expert's term came back through the reversed all_to_all)
            D = dx.shape[1]
            both = self._sum_over_ranks(torch.cat([dx.float(), dg.float()], dim=1), ordered=True)
            dx, dg = both[:, :D].to(x.dtype), both[:, D:].to(gates.dtype)
        return [dx, dg, *dp]

    # ---- collectives ----------------------------------------------------------------------------

    def _collective(self, what: str, fn, *args, **kwargs):
        """A collective on this block's group; a failure is a one-line CollectiveError naming the rank."""
        try:
            fn(*args, group=self.group, **kwargs)
        except RuntimeError as e:  # DistBackendError, gloo's "Connection closed by peer", timeouts
            msg = " ".join(str(e).split())
            raise CollectiveError(f"rank {self.rank}: {what} of layer {self.layer} failed ({type(e).__name__}: "
                                  f"{msg}); a peer process failed or timed out, see its error") from None

    def _gather(self, out: torch.Tensor, inp: torch.Tensor, what: str) -> None:
        dist = _dist()
        self._collective(what, dist.all_gather_single, out, inp)

    def _sum_over_ranks(self, partial: torch.Tensor, ordered: Optional[bool] = None) -> torch.Tensor:
        """Sum of every rank's fp32 partial [T, D], the same bits on every rank.

        Ordered (default, ``self.deterministic``; gradients always): rank j receives piece j of every
        partial (one all_to_all_single), adds them in rank order (as ``ShardedMoE`` adds its shards),
        and the pieces are all-gathered."""
        dist, W = _dist(), self.world
        if not (self.deterministic if ordered is None else ordered):
            self._collective("all_reduce (partial outputs)", dist.all_reduce, partial)
            return partial
        T, D = partial.shape
        n = T * D
        piece = -(-n // W)
        flat = partial.new_zeros(W * piece)
        flat[:n] = partial.reshape(-1)
        got = torch.empty_like(flat)
        self._collective("all_to_all_single (partial outputs)", dist.all_to_all_single, got, flat)
        got = got.view(W, piece)
        acc = got[0]
        for j in range(1, W):
            acc = acc + got[j]
        full = torch.empty_like(flat)
        self._gather(full, acc.contiguous(), "all_gather (summed outputs)")
        return full[:n].view(T, D)

    def _all_to_all(self, x: torch.Tensor, gates: torch.Tensor, ids: torch.Tensor, graph: Optional[dict] = None
                    ) -> torch.Tensor:
        """The "experts" split with tokens sent to their experts' ranks (see the module docstring).

        ``graph`` (training): the local pieces keep their autograd graphs (x, gates -> payload rows;
        received rows -> expert outputs; returned outputs -> my token share), cut at each collective."""
        track = graph is not None
        dist, W, r = _dist(), self.world, self.rank
        T, D = x.shape
        K = ids.shape[1]
        acc = torch.promote_types(x.dtype, torch.float32)
        local = self.tokens == "local"
        if T == 0 and not local:                                 # every rank: T = 0 (the tokens are replicated)
            return x.new_zeros(0, D, dtype=acc)
        if local:                                                # all my tokens (T may differ between ranks)
            share, s, e = T, 0, T
        else:
            share = -(-T // W)                                  # tokens per rank (the last ones may get fewer)
            s, e = min(r * share, T), min((r + 1) * share, T)
        slot_ids = ids[s:e].reshape(-1)                          # rows (t, k) of my tokens, slot order
        dest = slot_ids // self.experts_per_rank
        order = torch.argsort(dest, stable=True)                 # grouped by rank, (t, k) order kept within
        ranks = torch.arange(W, device=x.device)
        send_counts = (dest[:, None] == ranks[None, :]).sum(0)   # no bincount: it validates on the host
        recv_counts = torch.empty_like(send_counts)
        self._collective("all_to_all_single (row counts)", dist.all_to_all_single, recv_counts, send_counts)
        counts = torch.cat([send_counts, recv_counts]).tolist()  # the one host sync of the layer
        send, recv = counts[:W], counts[W:]

        payload = torch.cat([x[s:e].to(acc)[order // K], gates[s:e].reshape(-1)[order, None].to(acc),
                             slot_ids[order, None].to(acc)], dim=1)
        got = payload.new_empty(sum(recv), D + 2)
        self._collective("all_to_all_single (token rows)", dist.all_to_all_single, got, payload.detach(),
                         output_split_sizes=recv, input_split_sizes=send)
        got.requires_grad_(track)
        if got.shape[0]:
            y = self.shards[0](got[:, :D].contiguous(), got[:, D:D + 1].contiguous(),
                               got[:, D + 1:].long(), self.dtype, self.impl)  # gate * expert(x), fp32
        else:
            y = payload.new_zeros(0, D)
        back = y.new_empty(sum(send), D)
        self._collective("all_to_all_single (expert outputs)", dist.all_to_all_single, back, y.detach().contiguous(),
                         output_split_sizes=send, input_split_sizes=recv)
        back.requires_grad_(track)
        rows = torch.empty_like(back).index_copy(0, order, back).view(e - s, K, D)
        mine = x.new_zeros(share, D, dtype=back.dtype)
        if e > s:
            out = rows[:, 0]
            for k in range(1, K):                                # slot order, as one device adds them
                out = out + rows[:, k]
            mine[: e - s] = out
        if track:
            graph.update(kind="a2a", share=share, send=send, recv=recv, payload=payload, got=got, y=y, back=back,
                         mine=mine, local=local)
        if local:
            return mine.detach() if track else mine
        full = mine.new_empty(W * share, D)
        self._gather(full, mine.detach(), "all_gather (token shares)")
        return full[:T]


def _grads(out: torch.Tensor, inputs, grad: torch.Tensor) -> list:
    """d(out)/d(inputs) applied to ``grad``, zeros for an input ``out`` does not depend on (a rank whose
    experts received no rows still returns a zero gradient: AdamW treats zero and None differently)."""
    live = [i for i, t in enumerate(inputs) if t.requires_grad]
    res = [None] * len(inputs)
    if out.requires_grad and live and out.numel():
        got = torch.autograd.grad(out, [inputs[i] for i in live], grad, allow_unused=True)
        for i, g in zip(live, got):
            res[i] = g
    return [torch.zeros_like(t) if g is None else g for g, t in zip(res, inputs)]


class _Exchange(torch.autograd.Function):
    """One MoE block's exchange as one autograd node (see "Training" in the module docstring).

    Forward runs the exchange with autograd on for the local pieces only (leaf copies of x and gates);
    backward differentiates those pieces and runs the reversed collectives. Being one node, its
    backward runs on every rank whenever the block's output is used, so no rank skips a collective."""

    @staticmethod
    def forward(ctx, block: "ExpertParallelMoE", x: torch.Tensor, gates: torch.Tensor, ids: torch.Tensor,
                *params: torch.Tensor) -> torch.Tensor:
        need = ctx.needs_input_grad
        ctx.block, ctx.params, ctx.graph = block, params, {}
        with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(_same, _same):
            # own leaves; identity hooks: the local graphs keep their tensors even inside
            # torch.utils.checkpoint (whose recomputation reruns this forward on every rank alike)
            ctx.x, ctx.gates = x.detach().requires_grad_(need[1]), gates.detach().requires_grad_(need[2])
            return block._exchange(ctx.x, ctx.gates, ids, ctx.graph)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        if ctx.graph is None:
            raise RuntimeError("expert-parallel MoE: backward through the exchange a second time "
                               "(retain_graph is not supported)")
        with torch.enable_grad():
            dx, dg, *dp = ctx.block._backward(ctx.graph, grad.contiguous(), ctx.x, ctx.gates, ctx.params)
        ctx.graph = ctx.x = ctx.gates = None
        return (None, dx if ctx.needs_input_grad[1] else None, dg if ctx.needs_input_grad[2] else None, None, *dp)


def _same(t):
    return t
