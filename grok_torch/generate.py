"""Batched generation with a preallocated KV cache (the official runner's scheme, SPEC §6).

    prompts -> right-pad with 0 to the longest -> prefill, ``prefill_chunk`` positions a forward
               (pads are masked keys; only each row's last-token logits are computed)
            -> each row's cache position := its own prompt length (pad slots get overwritten)
            -> decode: feed the last token of every row at its own RoPE position, one step per token
               (a CUDA graph replay on one GPU, eager elsewhere: ``grok_torch.decode``)

Every row therefore computes what a batch-1 run of it computes. Row b samples with its own
``torch.Generator`` seeded ``seed + b``, so a batched run equals one-by-one runs with those seeds.
Unlike the official runner (fixed ``max_len`` tokens, no stop), rows stop at EOS by default.
"""
from __future__ import annotations

import numbers
from dataclasses import dataclass, field
from typing import Iterator, List, Optional, Sequence, Union

import torch

from grok_torch.decode import DecodeStep, prefill, require_capturable
from grok_torch.sampling import SampleSettings, sample

__all__ = ["Generation", "stream", "generate", "encode_prompts"]

Prompt = Union[str, Sequence[int]]


@dataclass
class Generation:
    """One row's result: prompt ids, generated ids, text (when a tokenizer was given) and why it stopped."""

    prompt: List[int]
    tokens: List[int] = field(default_factory=list)
    text: Optional[str] = None
    finish_reason: str = "length"  # "eos" | "length"


def _plain(x):
    """numpy arrays / scalars and torch tensors -> (nested) Python lists / numbers; anything else as is."""
    if not isinstance(x, (str, bytes)) and hasattr(x, "tolist"):
        return x.tolist()
    return x


def _is_id(x) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def encode_prompts(prompts: Union[Prompt, Sequence[Prompt]], tokenizer=None) -> List[List[int]]:
    """A str, a sequence of ids, or a sequence of either -> list of id lists (str needs a tokenizer).

    Array-likes (numpy arrays, torch tensors, numpy integers) are accepted: 1-D is one prompt, 2-D a batch.
    """
    prompts = _plain(prompts)
    if isinstance(prompts, str):
        prompts = [prompts]
    if not hasattr(prompts, "__iter__"):
        raise TypeError(f"prompts must be a str, a sequence of token ids, or a sequence of those, "
                        f"got {type(prompts).__name__}")
    prompts = [_plain(p) for p in prompts]
    if not prompts:
        raise ValueError("no prompts given: pass a str, a list of token ids, or a list of prompts")
    if isinstance(prompts[0], numbers.Number):
        prompts = [prompts]  # one prompt of ids (non-integers are refused below)
    out = []
    for p in prompts:
        if isinstance(p, str):
            if tokenizer is None:
                raise ValueError("text prompts need a tokenizer (or pass token ids)")
            p = tokenizer.encode(p)
        if not hasattr(p, "__iter__"):
            raise TypeError(f"each prompt must be a str or a sequence of token ids, got {type(p).__name__}")
        ids = [_plain(i) for i in p]
        bad = [i for i in ids if not _is_id(i)]
        if bad:
            raise TypeError(f"token ids must be integers, got {bad[0]!r} ({type(bad[0]).__name__})")
        if not ids:
            raise ValueError("prompt is empty: at least one token is needed")
        out.append([int(i) for i in ids])
    return out


@torch.inference_mode()
def stream(model, prompts: Union[Prompt, Sequence[Prompt]], max_new_tokens: int = 100, *,
           temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0, seed: Optional[int] = None,
           stop_at_eos: bool = True, tokenizer=None, prefill_chunk: Optional[int] = 2048,
           cuda_graph: Optional[bool] = None) -> Iterator[List[Optional[int]]]:
    """Yield, per decode step, one new token id per row (None for rows that already stopped).

    prefill_chunk: prompt positions per prefill forward (None: the whole prompt at once); bounds a
    long prompt's activations. cuda_graph: capture the decode step in a CUDA graph (None: whenever
    the model is on one GPU with the Triton kernels; see ``grok_torch.decode.DecodeStep``).
    """
    settings = SampleSettings(temperature, top_p, top_k)
    ids = encode_prompts(prompts, tokenizer)
    cfg = model.config
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    lengths = [len(p) for p in ids]
    longest = max(lengths)
    # the last generated token is never fed back: prompt + max_new_tokens - 1 positions are used
    needed = longest + max_new_tokens - 1
    if longest > cfg.max_seq_len:
        raise ValueError(f"prompt length {longest} does not fit the context max_seq_len={cfg.max_seq_len}")
    if needed > cfg.max_seq_len:
        raise ValueError(f"prompt length {longest} + max_new_tokens {max_new_tokens} needs {needed} positions "
                         f"(the last token is not fed back), more than the context max_seq_len={cfg.max_seq_len}")
    for p in ids:
        bad = [t for t in p if not 0 <= t < cfg.vocab_size]
        if bad:
            raise ValueError(f"prompt token id {bad[0]} is out of range [0, vocab_size={cfg.vocab_size})")

    device = model.embed.weight.device
    B = len(ids)
    tokens = torch.full((B, longest), cfg.pad_token_id, dtype=torch.long, device=device)
    for b, p in enumerate(ids):
        tokens[b, :len(p)] = torch.tensor(p)
    gens = None
    if seed is not None:
        gens = [torch.Generator(device=device).manual_seed(seed + b) for b in range(B)]
    cache = model.new_cache(B, max_len=needed)
    length_t = torch.tensor(lengths, device=device)

    if cuda_graph:  # before any work, not at the first decode step
        require_capturable(model)
    last = prefill(model, tokens, length_t, cache, prefill_chunk)
    step_fn = None  # made (and captured) at the first decode step
    done = [False] * B
    for step in range(max_new_tokens):
        nxt = sample(last, settings, gens)
        ids_now = nxt.tolist()  # the one host read per token: the ids this step yields
        out: List[Optional[int]] = []
        for b in range(B):
            out.append(None if done[b] else ids_now[b])
            if stop_at_eos and not done[b] and ids_now[b] == cfg.eos_token_id:
                done[b] = True
        yield out
        if all(done) or step == max_new_tokens - 1:
            return
        step_fn = step_fn or DecodeStep(model, cache, cuda_graph)
        last = step_fn(nxt)


def generate(model, prompts: Union[Prompt, Sequence[Prompt]], max_new_tokens: int = 100, *,
             temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0, seed: Optional[int] = None,
             stop_at_eos: bool = True, tokenizer=None, prefill_chunk: Optional[int] = 2048,
             cuda_graph: Optional[bool] = None) -> List[Generation]:
    """Generate for a batch of prompts (text needs ``tokenizer``); returns one Generation per prompt.

    temperature 0 is greedy; top_p uses the official rule (ties at the threshold kept); EOS is kept
    in ``tokens`` and ends the row when ``stop_at_eos``. prefill_chunk and cuda_graph: see ``stream``.
    """
    ids = encode_prompts(prompts, tokenizer)
    results = [Generation(prompt=p) for p in ids]
    for step in stream(model, ids, max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                       seed=seed, stop_at_eos=stop_at_eos, prefill_chunk=prefill_chunk, cuda_graph=cuda_graph):
        for r, t in zip(results, step):
            if t is not None:
                r.tokens.append(t)
                if stop_at_eos and t == model.config.eos_token_id:
                    r.finish_reason = "eos"
    if tokenizer is not None:
        for r in results:
            toks = r.tokens[:-1] if r.finish_reason == "eos" else r.tokens
            r.text = tokenizer.decode(toks)
    return results
