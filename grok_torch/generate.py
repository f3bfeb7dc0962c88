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
import sys
import types
import warnings
from dataclasses import dataclass, field
from typing import Iterator, List, Optional, Sequence, Union

import torch

from grok_torch.decode import DecodeStep, prefill, require_capturable
from grok_torch.sampling import SampleSettings, sample

__all__ = ["Generation", "stream", "generate", "generate_ids", "encode_prompts", "check_tokenizer", "new_token_room"]

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


def check_tokenizer(tokenizer, config, hint: str = "use the model's own tokenizer, or pass token ids") -> None:
    """A tokenizer with more tokens than the model's vocabulary is another model's: its ids for a
    text prompt can lie outside the model's embedding (the tiny test model's 512 vs Grok-1's 131072)."""
    if tokenizer.vocab_size > config.vocab_size:
        raise ValueError(f"the tokenizer ({getattr(tokenizer, 'path', 'given')}, {tokenizer.vocab_size} tokens) does "
                         f"not match the model (vocab_size {config.vocab_size}): {hint}")


@torch.inference_mode()
def stream(model, prompts: Union[Prompt, Sequence[Prompt]], max_new_tokens: int = 100, *,
           temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0, seed: Optional[int] = None,
           stop_at_eos: bool = True, tokenizer=None, prefill_chunk: Optional[int] = 2048,
           cuda_graph: Optional[bool] = None) -> Iterator[List[Union[int, str, None]]]:
    """Yield, per decode step, one new token id per row (None for rows that already stopped).

    With a ``tokenizer`` (which also encodes text prompts) each row's entry is instead the text that
    step adds (``tokenizer.StreamDecoder``): "" while the bytes of an unfinished character are held
    back, and the EOS token adds none. Whatever is still held is added to a row's last piece, so
    ``"".join`` of a row's pieces is ``Generation.text``::

        from grok_torch import Grok, Tokenizer, stream
        model, tok = Grok.from_pretrained("/tmp/grok-tiny"), Tokenizer.from_pretrained("/tmp/grok-tiny")
        for pieces in stream(model, "The answer to life", 20, tokenizer=tok):
            print(pieces[0], end="", flush=True)
        print()

    prefill_chunk: prompt positions per prefill forward (None: the whole prompt at once); bounds a
    long prompt's activations. cuda_graph: capture the decode step in a CUDA graph (None: whenever
    the model is on one GPU with the Triton kernels; see ``grok_torch.decode.DecodeStep``).
    """
    settings = SampleSettings(temperature, top_p, top_k)
    cfg = model.config
    if tokenizer is not None and _has_text(prompts):
        check_tokenizer(tokenizer, cfg)
    ids = encode_prompts(prompts, tokenizer)
    if tokenizer is not None:
        yield from _text_pieces(_stream_ids(model, ids, max_new_tokens, settings, seed, stop_at_eos, prefill_chunk,
                                            cuda_graph), tokenizer, len(ids), cfg.eos_token_id if stop_at_eos else None,
                                max_new_tokens - 1)
        return
    yield from _stream_ids(model, ids, max_new_tokens, settings, seed, stop_at_eos, prefill_chunk, cuda_graph)


def _has_text(prompts) -> bool:
    return isinstance(prompts, str) or (isinstance(prompts, (list, tuple)) and any(isinstance(p, str) for p in prompts))


def _text_pieces(steps, tokenizer, rows: int, eos: Optional[int], last_step: int) -> Iterator[List[Optional[str]]]:
    """Token-id steps -> text-piece steps (see ``stream``); a row's held bytes go out with its last piece."""
    from grok_torch.tokenizer import StreamDecoder

    decoders = [StreamDecoder(tokenizer) for _ in range(rows)]
    for n, step in enumerate(steps):
        out: List[Optional[str]] = []
        for dec, t in zip(decoders, step):
            if t is None:
                out.append(None)
                continue
            piece = "" if t == eos else dec.push(t)
            out.append(piece + dec.flush() if t == eos or n == last_step else piece)
        yield out


def new_token_room(config, prompt_len: int) -> int:
    """How many new tokens fit after a prompt of ``prompt_len`` tokens in the model's context: the last
    generated token is never fed back, so prompt + new - 1 positions are used."""
    return config.max_seq_len - prompt_len + 1


@torch.inference_mode()
def _stream_ids(model, ids: List[List[int]], max_new_tokens: int, settings: SampleSettings, seed: Optional[int],
                stop_at_eos: bool, prefill_chunk: Optional[int], cuda_graph: Optional[bool]
                ) -> Iterator[List[Optional[int]]]:
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
            r.text = tokenizer.decode(toks, skip_special_tokens=True)
    return results


_GENERATE_ARGS = ("max_new_tokens", "max_length", "do_sample", "temperature", "top_p", "top_k", "eos_token_id",
                  "pad_token_id", "streamer", "seed", "prefill_chunk", "cuda_graph", "use_cache", "num_beams",
                  "num_return_sequences")


def generate_ids(model, input_ids, attention_mask=None, *, max_new_tokens: Optional[int] = None,
                 max_length: Optional[int] = None, do_sample: bool = False,
                 temperature: Optional[float] = None, top_p: Optional[float] = None, top_k: Optional[int] = None,
                 eos_token_id: Union[int, Sequence[int], None] = None, pad_token_id: Optional[int] = None,
                 streamer=None, seed: Optional[int] = None, prefill_chunk: Optional[int] = 2048,
                 cuda_graph: Optional[bool] = None, use_cache: bool = True, num_beams: int = 1,
                 num_return_sequences: int = 1, **unsupported) -> torch.Tensor:
    """transformers' ``model.generate``: ``input_ids [B, T]`` -> LongTensor ``[B, T + T_new]`` (``Grok.generate``).

    Row b's prompt is ``input_ids[b]`` where ``attention_mask[b]`` is 1 (left padding from the
    tokenizer: ``tok(texts, padding=True, return_tensors="pt")``; None: every position that does not
    hold ``pad_token_id``, as transformers infers it), so each row
    computes what ``generate(model, prompts)`` computes for it: the same tokens. The output keeps
    ``input_ids`` as given; ``T_new`` is the longest row's count; a row that produced an
    ``eos_token_id`` (default: the model's; an int or a list) is padded after it with ``pad_token_id``
    (default: the model's, 0). ``do_sample=False`` is greedy; True samples with ``temperature``,
    ``top_p``, ``top_k`` (None: 1.0, 1.0, 0 = off; transformers' generation config would say top_k 50)
    and ``seed`` (row b draws from a generator seeded ``seed + b``; None: torch's global RNG).
    ``streamer``: an object with ``put(ids)`` / ``end()`` (transformers' ``TextStreamer``): it gets
    the prompt ``[B, T]`` first, then each step's new ids ``[B]``.
    ``max_length`` (prompt + new, transformers' older spelling) instead of ``max_new_tokens``
    (default 100 new tokens, as the native API; transformers' generation config would say 20 in all).
    ``use_cache`` is accepted and always on (a KV cache gives the same tokens); beam search
    (``num_beams`` > 1) and ``num_return_sequences`` > 1 are not implemented and say so, as does any
    other transformers argument.
    """
    if unsupported:
        raise TypeError(f"model.generate: unsupported argument(s) {', '.join(sorted(unsupported))}; "
                        f"supported: {', '.join(_GENERATE_ARGS)}")
    if num_beams != 1:
        raise ValueError(f"model.generate: num_beams={num_beams}: beam search is not implemented "
                         "(greedy: do_sample=False, or sampling: do_sample=True)")
    if num_return_sequences != 1:
        raise ValueError(f"model.generate: num_return_sequences={num_return_sequences} is not supported: "
                         "repeat the rows of input_ids (and attention_mask) instead, e.g. input_ids.repeat(n, 1)")
    cfg = model.config
    ids = input_ids if isinstance(input_ids, torch.Tensor) else torch.tensor(_plain(input_ids))
    if ids.dim() == 1:
        ids = ids[None]
    if ids.dim() != 2 or ids.dtype.is_floating_point or ids.dtype == torch.bool or ids.is_complex():
        raise ValueError(f"input_ids must be an integer [batch, seq] tensor, got {ids.dtype} {tuple(ids.shape)}")
    if attention_mask is None:
        # as transformers: without a mask, the pad id marks padding (Grok-1 masks id 0 as a key anyway)
        mask = ids != (cfg.pad_token_id if pad_token_id is None else int(pad_token_id))
    else:
        mask = attention_mask if isinstance(attention_mask, torch.Tensor) else torch.tensor(_plain(attention_mask))
        mask = mask.reshape(ids.shape) if mask.numel() == ids.numel() and mask.dim() < 2 else mask
        if mask.shape != ids.shape:
            raise ValueError(f"attention_mask {tuple(mask.shape)} must have input_ids' shape {tuple(ids.shape)}")
        if not ((mask == 0) | (mask == 1)).all():
            raise ValueError("attention_mask must hold 0 (padding) and 1 (prompt token) only")
        mask = mask.to(device=ids.device, dtype=torch.bool)
    if max_new_tokens is not None and max_length is not None:
        raise ValueError("model.generate: pass max_new_tokens or max_length (prompt + new), not both")
    default_length = max_new_tokens is None and max_length is None
    if max_new_tokens is None:
        max_new_tokens = 100 if max_length is None else max_length - ids.shape[1]
        if max_length is not None and max_new_tokens < 1:
            raise ValueError(f"model.generate: max_length={max_length} leaves no room after the "
                             f"{ids.shape[1]}-token input_ids: use max_new_tokens")
    prompts = [row[m].tolist() for row, m in zip(ids, mask)]
    empty = [b for b, p in enumerate(prompts) if not p]
    if empty:
        raise ValueError(f"row {empty[0]} of attention_mask has no 1: that row has no prompt to continue")
    room = new_token_room(cfg, max(map(len, prompts)))
    if default_length and max_new_tokens > room >= 1:
        # transformers warns and stops at the model's limit when its default length does not fit
        warnings.warn(f"model.generate: generating at most {room} tokens, not the default {max_new_tokens}: the "
                      f"model's context is {cfg.max_seq_len}", stacklevel=3)
        max_new_tokens = room
    elif max_length is not None and max_new_tokens > room:
        raise ValueError(f"model.generate: max_length={max_length} is beyond the model's context of "
                         f"{cfg.max_seq_len} (+1 for the last token, which is never fed back)")
    if do_sample:
        settings = dict(temperature=1.0 if temperature is None else temperature,
                        top_p=1.0 if top_p is None else top_p, top_k=top_k or 0)
    else:
        settings = dict(temperature=0.0)  # greedy: temperature / top_p / top_k do not apply
    eos = {cfg.eos_token_id} if eos_token_id is None else (
        {int(eos_token_id)} if _is_id(eos_token_id) else {int(e) for e in eos_token_id})
    pad = cfg.pad_token_id if pad_token_id is None else int(pad_token_id)

    if streamer is not None:
        streamer.put(ids.cpu())
    new: List[List[int]] = []
    done = [False] * len(prompts)
    for step in stream(model, prompts, max_new_tokens, seed=seed, stop_at_eos=False, prefill_chunk=prefill_chunk,
                       cuda_graph=cuda_graph, **settings):
        now = [pad if d else t for d, t in zip(done, step)]
        done = [d or t in eos for d, t in zip(done, now)]
        new.append(now)
        if streamer is not None:
            streamer.put(torch.tensor(now))
        if all(done):
            break  # closes the stream: no further decode step runs
    if streamer is not None:
        streamer.end()
    return torch.cat([ids.long(), torch.tensor(new, dtype=torch.long, device=ids.device).T.reshape(len(prompts), -1)],
                     dim=1)


class _CallableModule(types.ModuleType):
    """``grok_torch.generate`` is this module and, called, its ``generate`` function.

    A package's attribute named after a submodule is that submodule once it is imported, so
    ``from grok_torch import generate`` and ``import grok_torch.generate`` must name one object:
    ``generate(model, prompts, ...)`` calls the function, ``grok_torch.generate.stream`` /
    ``.generate_ids`` are this module's, whichever import came first."""

    def __call__(self, *args, **kwargs):
        return generate(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
