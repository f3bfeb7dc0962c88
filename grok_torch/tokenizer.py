"""SentencePiece wrapper for the Grok-1 ``tokenizer.model`` (SPEC §7).

No BOS is added by default, as the official runner (``tokenizer.encode(prompt)``). Ids: pad 0,
bos 1, eos 2, unk 3. ``StreamDecoder`` turns a growing id list into text pieces for streaming,
holding back bytes of an unfinished UTF-8 character (byte-fallback pieces) until ``flush()``.

The transformers spellings work too (no dependency on transformers)::

    from grok_torch import Tokenizer
    tok = Tokenizer.from_pretrained("/tmp/grok-tiny")
    batch = tok(["The answer to life", "Hi"], padding=True, return_tensors="pt")  # left-padded with 0
    print(batch["input_ids"].shape, batch.attention_mask.tolist())
    print(tok.batch_decode(batch.input_ids, skip_special_tokens=True))
"""
from __future__ import annotations

import os
from typing import Any, Dict, List, Optional, Sequence, Union

__all__ = ["Tokenizer", "StreamDecoder", "BatchEncoding", "BUNDLED_TOKENIZER"]

# Grok-1's own tokenizer.model (xai-org/grok-1, Apache-2.0; sha256 5c69d7cb...dd7f), shipped with the
# package so that the demo model and text prompts work without the 318 GB download.
BUNDLED_TOKENIZER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tokenizer.model")


class BatchEncoding(dict):
    """What calling a ``Tokenizer`` returns: a dict (``input_ids``, ``attention_mask``) whose keys are
    also attributes, so that ``model.generate(**enc)`` and ``enc.input_ids`` both work (as transformers')."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def to(self, device) -> "BatchEncoding":
        """Tensors moved to ``device`` (``tok(..., return_tensors="pt").to(model.device)``)."""
        return BatchEncoding({k: v.to(device) if hasattr(v, "to") else v for k, v in self.items()})


class Tokenizer:
    """``Tokenizer(path)``: path to ``tokenizer.model`` or a directory holding one.

    ``Tokenizer()`` opens the Grok-1 tokenizer bundled with the package (``BUNDLED_TOKENIZER``),
    the same file as the release's ``tokenizer.model``; ``Tokenizer.from_pretrained(model_dir)`` is
    ``Tokenizer(model_dir)``. Calling it (``tok(texts, padding=True, return_tensors="pt")``),
    ``decode`` / ``batch_decode`` with ``skip_special_tokens`` and the ``*_token_id`` attributes
    follow transformers.
    """

    padding_side = "left"  # for generation: every row's last prompt token at the end

    def __init__(self, path: Union[str, os.PathLike, None] = None):
        import sentencepiece as spm

        path = BUNDLED_TOKENIZER if path is None else os.fspath(path)
        if os.path.isdir(path):
            path = os.path.join(path, "tokenizer.model")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"tokenizer model not found: {path}")
        try:
            self.sp = spm.SentencePieceProcessor(model_file=path)
        except (RuntimeError, OSError) as e:
            raise ValueError(f"{path} is not a SentencePiece tokenizer model "
                             f"({' '.join(str(e).split())})") from None
        self.path = path

    @classmethod
    def from_pretrained(cls, path: Union[str, os.PathLike, None] = None) -> "Tokenizer":
        """A model directory holding ``tokenizer.model`` (grok-convert copies it there), or the file."""
        return cls(path)

    @classmethod
    def for_model(cls, model_dir: Union[str, os.PathLike], vocab_size: int) -> "Optional[Tokenizer]":
        """The tokenizer of a grok-convert directory: ``model_dir/tokenizer.model``, else, for a model
        of Grok-1's vocabulary, the bundled Grok-1 tokenizer; None when neither fits."""
        path = os.path.join(os.fspath(model_dir), "tokenizer.model")
        if os.path.isfile(path):
            return cls(path)
        bundled = cls()
        return bundled if bundled.vocab_size == vocab_size else None

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    def __len__(self) -> int:
        return self.vocab_size

    @property
    def pad_id(self) -> int:
        return self.sp.pad_id()

    @property
    def bos_id(self) -> int:
        return self.sp.bos_id()

    @property
    def eos_id(self) -> int:
        return self.sp.eos_id()

    # transformers' names
    pad_token_id = pad_id
    bos_token_id = bos_id
    eos_token_id = eos_id

    def encode(self, text: str, bos: bool = False) -> List[int]:
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        ids = self.sp.encode(text)
        return [self.bos_id, *ids] if bos else ids

    def _ids(self, ids) -> List[int]:
        """A sequence of ids (list, 1-D tensor or array) -> checked Python ints."""
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        if isinstance(ids, int):
            ids = [ids]
        out = []
        for i in ids:
            if isinstance(i, (list, tuple)):
                raise ValueError("decode takes one sequence of ids; use batch_decode for a batch")
            if not 0 <= int(i) < self.vocab_size:
                raise ValueError(f"token id {int(i)} is out of range [0, {self.vocab_size}) for this tokenizer")
            out.append(int(i))
        return out

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        """Text of ``ids`` (a list, 1-D tensor or array). The control tokens [PAD] [BOS] [EOS] appear
        as those strings, unless ``skip_special_tokens`` (transformers' default: shown)."""
        ids = self._ids(ids)
        text = self.sp.decode(ids)  # SentencePiece drops control tokens
        if skip_special_tokens:
            return text
        out, done, last = [], 0, -1
        for k, i in enumerate(ids):
            if self.sp.is_control(i):
                # the text before token k ends where the decode of ids[:k] ends (controls decode to "");
                # a run of controls (padding) shares one cut
                cut = done if last == k - 1 else len(self.sp.decode(ids[:k]))
                out += [text[done:cut], self.sp.id_to_piece(i)]
                done, last = cut, k
        return "".join(out) + text[done:]

    def batch_decode(self, sequences, skip_special_tokens: bool = False) -> List[str]:
        """``decode`` of each row of a ``[B, T]`` tensor / array or a list of id lists."""
        if hasattr(sequences, "tolist"):
            sequences = sequences.tolist()
        return [self.decode(s, skip_special_tokens=skip_special_tokens) for s in sequences]

    def __call__(self, text: Union[str, Sequence[str]], *, return_tensors: Optional[str] = None,
                 padding: Union[bool, str] = False, truncation: bool = False, max_length: Optional[int] = None,
                 add_special_tokens: bool = False, padding_side: Optional[str] = None) -> BatchEncoding:
        """transformers' call: ``input_ids`` and ``attention_mask`` for a text or a list of texts.

        return_tensors: None (lists; one text -> one list), "pt" (LongTensor [B, T]) or "np".
        padding: True / "longest" pads every row to the longest with Grok's pad id 0, on the
        ``padding_side`` (default the attribute, "left": what ``Grok.generate`` wants); tensors need
        equal lengths otherwise. truncation with max_length keeps the first max_length ids.
        add_special_tokens: prepend BOS (default False: Grok-1's runner adds none).
        """
        single = isinstance(text, str)
        texts = [text] if single else list(text)
        if not texts or not all(isinstance(t, str) for t in texts):
            raise TypeError("text must be a str or a non-empty list of str")
        if return_tensors not in (None, "pt", "np"):
            raise ValueError(f"return_tensors must be None, 'pt' or 'np', got {return_tensors!r}")
        if padding not in (False, True, "longest", "do_not_pad"):
            raise ValueError(f"padding must be True / 'longest' or False, got {padding!r} (max_length padding is "
                             "not supported)")
        side = padding_side or self.padding_side
        if side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {side!r}")
        rows = [self.encode(t, bos=add_special_tokens) for t in texts]
        if truncation and max_length is not None:
            rows = [r[:max_length] for r in rows]
        masks = [[1] * len(r) for r in rows]
        longest = max(map(len, rows))
        if padding in (True, "longest"):
            fill = [longest - len(r) for r in rows]
            if side == "left":
                rows = [[self.pad_id] * n + r for n, r in zip(fill, rows)]
                masks = [[0] * n + m for n, m in zip(fill, masks)]
            else:
                rows = [r + [self.pad_id] * n for n, r in zip(fill, rows)]
                masks = [m + [0] * n for n, m in zip(fill, masks)]
        out: Dict[str, Any] = {"input_ids": rows, "attention_mask": masks}
        if return_tensors is not None:
            if len(set(map(len, rows))) > 1:
                raise ValueError(f"texts encode to different lengths ({min(map(len, rows))} to {longest} tokens): "
                                 "pass padding=True to make a tensor of them")
            if return_tensors == "pt":
                import torch

                out = {k: torch.tensor(v, dtype=torch.long) for k, v in out.items()}
            else:
                import numpy as np

                out = {k: np.array(v, dtype=np.int64) for k, v in out.items()}
        elif single:
            out = {k: v[0] for k, v in out.items()}
        return BatchEncoding(out)


class StreamDecoder:
    """Incremental detokenization: ``push(id)`` returns the new text (possibly empty); ``flush()``
    returns what is still held back (bytes of an unfinished character) when generation stops.

    Only a bounded window is decoded per token: the new ids plus up to ``context`` ids before them.
    Both the window's old part and the whole window are decoded from the same first id, so
    SentencePiece's leading-space and byte-fallback handling cancel out in the difference.
    """

    def __init__(self, tokenizer: Tokenizer, context: int = 8):
        if context < 1:
            raise ValueError(f"context must be >= 1, got {context}")
        self.tok, self.context = tokenizer, context
        self.ids: List[int] = []  # the window: already-emitted context ids, then the pending ones
        self.read = 0             # ids[:read] are emitted; ids[read:] are held back

    def _new_text(self, hold: bool) -> str:
        done = self.tok.decode(self.ids[:self.read], skip_special_tokens=True) if self.read else ""
        text = self.tok.decode(self.ids, skip_special_tokens=True)
        if hold and text.endswith("\ufffd"):  # an unfinished multi-byte character: wait for its other bytes
            return ""
        new = text[len(done):]
        keep = max(0, len(self.ids) - self.context)
        self.ids, self.read = self.ids[keep:], len(self.ids) - keep
        return new

    def push(self, token_id: int) -> str:
        self.ids.append(int(token_id))
        return self._new_text(hold=True)

    def flush(self) -> str:
        """The held-back text (an unfinished character decodes to U+FFFD), or ""."""
        if self.read == len(self.ids):
            return ""
        return self._new_text(hold=False)
