"""The two halves of generation that run the model: prefill (chunked) and the decode step (graph-able).

    last_logits [B, V] = prefill(model, tokens [B, L], lengths [B], cache, chunk=2048)
    step = DecodeStep(model, cache, cuda_graph=None);  logits [B, V] = step(next_ids [B])

Prefill feeds the right-padded prompts ``chunk`` positions at a time through the cache, so a long
prompt's activations (MoE intermediates, attention tiles) are those of ``chunk`` tokens, and keeps
only the logits of each row's last prompt token (``logits_to_keep``: the head never runs on the rest).

The decode step is ``model(ids[:, None], cache, logits_to_keep=1, static_shapes=True)``: its shapes
never change (the whole preallocated cache with a mask, positions read from ``cache.pos`` on the
device) and it reads nothing back to the host, so on CUDA it is captured once in a
``torch.cuda.CUDAGraph`` and replayed: one graph launch per token instead of ~64 x a dozen kernel
launches. Eager and graph run the same kernels on the same shapes, so they give the same tokens.
"""
from __future__ import annotations

from typing import Optional

import torch

__all__ = ["prefill", "DecodeStep", "graph_blocker", "require_capturable"]


def prefill(model, tokens: torch.Tensor, lengths: torch.Tensor, cache, chunk: Optional[int] = None) -> torch.Tensor:
    """Write right-padded prompts ``tokens [B, L]`` into ``cache`` and return each row's last-token logits [B, V].

    ``lengths [B]``: each row's prompt length. ``chunk``: positions per forward (None: all at once).
    Afterwards ``cache.pos`` is each row's length, so decode continues after the row's own prompt
    (the pad slots beyond are masked keys and get overwritten).
    """
    B, L = tokens.shape
    chunk = chunk or L
    if chunk < 1:
        raise ValueError(f"prefill_chunk must be >= 1 (or None for the whole prompt), got {chunk}")
    last_pos = lengths.to(tokens.device) - 1
    last = None
    for c0 in range(0, L, chunk):
        c1 = min(L, c0 + chunk)
        keep = (last_pos - c0).clamp(0, c1 - c0 - 1)[:, None]  # [B, 1]: in-chunk index of the last token
        logits = model(tokens[:, c0:c1], cache, logits_to_keep=keep)[:, 0]
        here = ((last_pos >= c0) & (last_pos < c1))[:, None]
        last = logits if last is None else torch.where(here, logits, last)
    cache.pos.copy_(lengths)
    return last


def graph_blocker(model) -> Optional[str]:
    """Why ``model``'s decode step cannot be captured in a CUDA graph, or None when it can."""
    devices = {p.device for p in model.parameters()}
    if len(devices) != 1 or next(iter(devices)).type != "cuda":
        return f"the weights are on {sorted(map(str, devices))}, not on one CUDA device"
    from grok_torch.kernels import resolve_impl

    if resolve_impl(model.impl, model.embed.weight) != "triton":
        return "impl resolves to the PyTorch reference (its MoE reads expert row counts on the host)"
    for name, module in model.named_modules():
        if hasattr(module, "_hf_hook"):
            return f"{name or 'the model'} has an accelerate hook (device_map placement)"
        if not getattr(module, "capturable", True):
            return f"{name} ({type(module).__name__}) exchanges tokens between processes"
    return None


def require_capturable(model, flag: str = "cuda_graph=True", hint: str = "") -> None:
    """A one-line ValueError naming ``flag`` when ``model``'s decode step cannot be captured."""
    blocker = graph_blocker(model)
    if blocker:
        raise ValueError(f"{flag}, but the decode step cannot be captured: {blocker}{hint}")


class DecodeStep:
    """``step(ids [B]) -> logits [B, V]``: one decode step through ``cache``, advancing ``cache.pos`` by 1.

    ``cuda_graph``: None (default) captures when ``graph_blocker(model)`` finds nothing in the way,
    True insists (ValueError naming the obstacle otherwise), False stays eager. The returned logits
    of a captured step live in a static buffer that the next step overwrites.
    """

    def __init__(self, model, cache, cuda_graph: Optional[bool] = None):
        self.model, self.cache = model, cache
        device = cache.pos.device
        self.ids = torch.zeros(cache.batch, 1, dtype=torch.long, device=device)
        self.graph = None
        if cuda_graph:
            require_capturable(model)
        elif cuda_graph is None:
            cuda_graph = graph_blocker(model) is None
        if cuda_graph:
            self._capture()

    def _forward(self) -> torch.Tensor:
        return self.model(self.ids, self.cache, logits_to_keep=1, static_shapes=True)[:, 0]

    def _capture(self) -> None:
        # one eager run on a side stream first: Triton compiles its kernels and the allocator warms
        # up (neither may happen during capture). It writes K/V at the next position, which the
        # first real step overwrites, and its position advance is undone.
        pos = self.cache.pos.clone()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self._forward()
            self.cache.pos.copy_(pos)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = self._forward()

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        self.ids.copy_(ids.view(-1, 1))
        if self.graph is None:
            return self._forward()
        self.graph.replay()
        return self.logits
