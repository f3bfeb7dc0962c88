"""SentencePiece wrapper for the Grok-1 ``tokenizer.model`` (SPEC §7).

No BOS is added by default, as the official runner (``tokenizer.encode(prompt)``). Ids: pad 0,
bos 1, eos 2, unk 3. ``StreamDecoder`` turns a growing id list into text pieces for streaming,
holding back bytes of an unfinished UTF-8 character (byte-fallback pieces) until ``flush()``.
"""
from __future__ import annotations

import os
from typing import List, Sequence, Union

__all__ = ["Tokenizer", "StreamDecoder", "BUNDLED_TOKENIZER"]

# Grok-1's own tokenizer.model (xai-org/grok-1, Apache-2.0; sha256 5c69d7cb...dd7f), shipped with the
# package so that the demo model and text prompts work without the 318 GB download.
BUNDLED_TOKENIZER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tokenizer.model")


class Tokenizer:
    """``Tokenizer(path)``: path to ``tokenizer.model`` or a directory holding one.

    ``Tokenizer()`` opens the Grok-1 tokenizer bundled with the package (``BUNDLED_TOKENIZER``),
    the same file as the release's ``tokenizer.model``.
    """

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

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    @property
    def pad_id(self) -> int:
        return self.sp.pad_id()

    @property
    def bos_id(self) -> int:
        return self.sp.bos_id()

    @property
    def eos_id(self) -> int:
        return self.sp.eos_id()

    def encode(self, text: str, bos: bool = False) -> List[int]:
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        ids = self.sp.encode(text)
        return [self.bos_id, *ids] if bos else ids

    def decode(self, ids: Sequence[int]) -> str:
        return self.sp.decode([int(i) for i in ids])


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
        done = self.tok.decode(self.ids[:self.read]) if self.read else ""
        text = self.tok.decode(self.ids)
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
