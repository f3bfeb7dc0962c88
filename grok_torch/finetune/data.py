"""Fine-tuning data (issue #10): read, tokenize, split, pack and serve batches that resume exactly.

Input files (the format is detected per file; ``format=`` overrides it for every file):

* ``text-lines`` (default for any file not detected as JSONL, e.g. ``.txt``): one document per
  non-blank line; the line ending (``\\n`` or ``\\r\\n``) is not part of the document.
* ``text``: the whole file is one document (trailing line breaks removed).
* ``jsonl`` (default for ``.jsonl``, ``.ndjson``, ``.json``, and for a file of another extension
  whose first non-blank line starts with ``{``): one JSON object per non-blank line, all rows of a
  file of ONE kind:
  - ``{"text": str}``: every token carries loss;
  - ``{"prompt": str, "completion": str}``: loss only on the completion's tokens (and its EOS);
  - ``{"input_ids": [int, ...]}``: pre-tokenized, every token carries loss; ids are checked
    against the model's vocabulary (``0 <= id < vocab_size``; note that the model treats id 0 as
    padding wherever it appears). These files need no tokenizer (``tokenizer=None``).
  Other fields are ignored. A UTF-8 byte-order mark at the start of a file is skipped.

Tokenization: the Grok SentencePiece tokenizer, no BOS (as the official runner), EOS appended to
every document. A prompt/completion row is tokenized as ``encode(prompt + completion)``; its prompt
tokens are the longest common prefix of that and ``encode(prompt)`` (SentencePiece's dummy prefix
makes ``encode(completion)`` alone start with an extra space), so a token that straddles the
boundary counts as completion. Put the separator at the start of the completion (``"A:"`` +
``" 4"``) so that the prompt's tokens are exactly those ``grok-generate`` feeds the model.
Documents with no token at all (``""``, ``[]``) are skipped and counted (``stats.skipped_empty``).

Split: a document goes to the held-out split by a hash of ``(seed, its index in the document
list)`` -- files in the given order, rows in file order -- so the split does not depend on
``seq_len``, packing or the batch size. ``eval_fraction = f > 0`` holds out ``ceil(f * n)``
documents, at least 1 and at most ``n - 1``; with fewer than 2 documents it is an error (an eval
split that silently disappears would hide a mistake).

Packing (standard, document boundaries NOT masked): each split's documents are concatenated in
order into one token stream ``s`` (document, EOS, document, EOS, ...) and cut into rows of
``seq_len + 1`` tokens that overlap by one: row ``k`` is ``s[k*seq_len : k*seq_len + seq_len + 1]``,
so every token after the first is a target exactly once. The last row is padded with the pad id 0
(the model masks id 0 as a key) and its padded targets carry no loss. A position attends to the
previous documents of its row; it predicts the next document's first token after an EOS.

Batches: ``{"input_ids": LongTensor [B, seq_len], "labels": LongTensor [B, seq_len]}`` with
``input_ids = row[:-1]`` and ``labels`` ALREADY SHIFTED: ``labels[b, t]`` is the target of position
``t`` (``row[t + 1]``), or ``IGNORE_INDEX`` (-100) where that target is padding or prompt. So
``F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)`` is the loss; do not
shift again.

Order and resume: ``PackedDataset.next_batch()`` walks an endless stream of row indices, one seeded
permutation of the rows per epoch (``numpy`` PCG64 seeded with ``(seed, epoch)``); a batch that
crosses the end of an epoch takes the remaining rows and continues with the next epoch's first ones,
so every batch is full. ``state_dict()`` = ``{epoch, index, seed, num_rows, fingerprint}`` (JSON
serialisable); ``load_state_dict`` on a dataset built from the same data puts it where the saved one
was, so the next batch is the one an uninterrupted run would have drawn (the batch size may change
on resume; the data, checked by the fingerprint, may not).
"""
from __future__ import annotations

import hashlib
import json
import math
import numbers
import os
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np

__all__ = [
    "IGNORE_INDEX", "FORMATS", "DataError", "Document", "SplitStats", "CorpusStats", "PackedDataset",
    "detect_format", "read_documents", "split_documents", "pack_documents", "load_corpus",
]

IGNORE_INDEX = -100
FORMATS = ("text", "text-lines", "jsonl")
_JSONL_EXTS = (".jsonl", ".ndjson", ".json")
_TEXT_EXTS = (".txt", ".text")
_KINDS = {"text": "'text'", "pc": "'prompt'/'completion'", "ids": "'input_ids'"}

PathLike = Union[str, "os.PathLike[str]"]


class DataError(ValueError):
    """Bad fine-tuning data: a one-line message naming the file (and line, 1-based, where relevant)."""


@dataclass(frozen=True)
class Document:
    """One document: its token ids (EOS last), how many leading tokens are prompt, where it came from."""

    ids: np.ndarray          # int32 [n]
    prompt_len: int          # ids[:prompt_len] are never loss targets
    source: str              # "path:line" (line 1 for a whole-file text document)


@dataclass
class SplitStats:
    documents: int = 0
    tokens: int = 0          # document tokens including their EOS, without padding
    rows: int = 0            # packed rows of seq_len + 1 tokens
    loss_tokens: int = 0     # targets that carry loss


@dataclass
class CorpusStats:
    train: SplitStats
    eval: Optional[SplitStats]
    files: List[str] = field(default_factory=list)
    seq_len: int = 0
    skipped_empty: int = 0   # documents with no token at all (not counted in documents)

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)

    def __str__(self) -> str:
        def one(name, s):
            return f"{name}: {s.documents} docs, {s.tokens} tokens, {s.rows} rows, {s.loss_tokens} loss tokens"
        parts = [one("train", self.train)] + ([one("eval", self.eval)] if self.eval else [])
        skipped = f" ({self.skipped_empty} empty documents skipped)" if self.skipped_empty else ""
        return f"{len(self.files)} file(s), seq_len {self.seq_len}; " + "; ".join(parts) + skipped


# --------------------------------------------------------------------------------------- reading

def detect_format(path: PathLike) -> str:
    """``jsonl`` for .jsonl/.ndjson/.json, ``text-lines`` for .txt/.text, else by the first
    non-blank line: ``jsonl`` when it starts with ``{``, ``text-lines`` otherwise."""
    ext = os.path.splitext(os.fspath(path))[1].lower()
    if ext in _JSONL_EXTS:
        return "jsonl"
    if ext in _TEXT_EXTS:
        return "text-lines"
    try:
        with open(path, "rb") as f:
            for raw in f:
                line = raw.lstrip(b"\xef\xbb\xbf").strip()
                if line:
                    return "jsonl" if line.startswith(b"{") else "text-lines"
    except OSError:
        pass
    return "text-lines"


def _lines(path: str) -> List[Tuple[int, str]]:
    """(1-based line number, text without its line ending), decoded strictly one line at a time."""
    if not os.path.exists(path):
        raise DataError(f"{path}: no such file")
    if os.path.isdir(path):
        raise DataError(f"{path}: is a directory, expected a data file")
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror or e})") from None
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    raws = data.split(b"\n")
    if raws and raws[-1] == b"":
        raws.pop()
    out = []
    for i, raw in enumerate(raws, 1):
        try:
            text = raw.decode("utf-8", errors="strict")
        except UnicodeDecodeError as e:
            raise DataError(f"{path}:{i}: not valid UTF-8 (byte 0x{raw[e.start]:02x} at byte "
                            f"{e.start + 1} of the line)") from None
        out.append((i, text[:-1] if text.endswith("\r") else text))
    if not any(t.strip() for _, t in out):
        raise DataError(f"{path}: empty file (no documents)")
    return out


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


class _Reader:
    def __init__(self, tokenizer, vocab_size: int, eos_id: int):
        self.tok, self.vocab_size, self.eos_id = tokenizer, vocab_size, eos_id

    def encode(self, text: str, where: str, kind: str) -> List[int]:
        if self.tok is None:
            raise DataError(f"{where}: {_KINDS[kind]} rows need a tokenizer (tokenizer=None only "
                            f"reads pre-tokenized 'input_ids' files)")
        try:
            return list(self.tok.encode(text))
        except Exception as e:  # noqa: BLE001 - a tokenizer failure on one row names that row
            raise DataError(f"{where}: cannot tokenize ({_one_line(e)})") from None

    def doc(self, ids: Sequence[int], prompt_len: int, where: str) -> Optional[Document]:
        if not ids:
            return None
        arr = np.empty(len(ids) + 1, dtype=np.int32)
        arr[:-1] = ids
        arr[-1] = self.eos_id
        return Document(arr, prompt_len, where)

    def text_row(self, text: str, where: str) -> Optional[Document]:
        return self.doc(self.encode(text, where, "text"), 0, where)

    def pc_row(self, prompt: str, completion: str, where: str) -> Optional[Document]:
        full = self.encode(prompt + completion, where, "pc")
        p = self.encode(prompt, where, "pc") if prompt else []
        n = 0
        while n < min(len(p), len(full)) and p[n] == full[n]:
            n += 1
        return self.doc(full, n, where)

    def ids_row(self, ids: Any, where: str) -> Optional[Document]:
        if not isinstance(ids, list) or not all(type(i) is int for i in ids):
            raise DataError(f"{where}: field 'input_ids' must be a list of integers")
        for i in ids:
            if not 0 <= i < self.vocab_size:
                raise DataError(f"{where}: token id {i} out of range for the vocabulary "
                                f"(size {self.vocab_size}: ids 0..{self.vocab_size - 1})")
        return self.doc(ids, 0, where)

    def read(self, path: str, fmt: str) -> Tuple[List[Document], int]:
        lines = _lines(path)
        if fmt == "text":
            text = "\n".join(t for _, t in lines).rstrip("\r\n")
            docs = [self.text_row(text, f"{path}:1")]
        elif fmt == "text-lines":
            docs = [self.text_row(t, f"{path}:{i}") for i, t in lines if t.strip()]
        else:
            docs = self.read_jsonl(path, lines)
        kept = [d for d in docs if d is not None]
        if not kept:
            raise DataError(f"{path}: no tokens (every document in it is empty)")
        return kept, len(docs) - len(kept)

    def read_jsonl(self, path: str, lines: List[Tuple[int, str]]) -> List[Optional[Document]]:
        docs: List[Optional[Document]] = []
        file_kind: Optional[Tuple[str, int]] = None
        for i, line in lines:
            if not line.strip():
                continue
            where = f"{path}:{i}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: invalid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(obj, dict):
                raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
            present = [k for k, has in (("ids", "input_ids" in obj),
                                        ("pc", "prompt" in obj or "completion" in obj),
                                        ("text", "text" in obj)) if has]
            if not present:
                raise DataError(f"{where}: missing field: a row needs 'text', 'prompt' and "
                                f"'completion', or 'input_ids'")
            if len(present) > 1:
                raise DataError(f"{where}: ambiguous row: it has both {_KINDS[present[0]]} and "
                                f"{_KINDS[present[1]]} fields")
            kind = present[0]
            if file_kind is None:
                file_kind = (kind, i)
            elif kind != file_kind[0]:
                raise DataError(f"{where}: {_KINDS[kind]} row in a file of {_KINDS[file_kind[0]]} "
                                f"rows (as line {file_kind[1]}); use one kind of row per file")
            if kind == "ids":
                docs.append(self.ids_row(obj["input_ids"], where))
                continue
            names = ("text",) if kind == "text" else ("prompt", "completion")
            for name in names:
                if name not in obj:
                    raise DataError(f"{where}: missing field '{name}' (a prompt/completion row needs both)")
                if not isinstance(obj[name], str):
                    raise DataError(f"{where}: field '{name}' must be a string, got "
                                    f"{type(obj[name]).__name__}")
            docs.append(self.text_row(obj["text"], where) if kind == "text"
                        else self.pc_row(obj["prompt"], obj["completion"], where))
        return docs


def _paths(paths: Union[PathLike, Sequence[PathLike]]) -> List[str]:
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    out = [os.fspath(p) for p in paths]
    if not out:
        raise DataError("no data files given")
    return out


def _read_all(paths, tokenizer, vocab_size, eos_id, format) -> Tuple[List[Document], int]:
    if format is not None and format not in FORMATS:
        raise DataError(f"format must be one of {', '.join(FORMATS)}, got {format!r}")
    if not 0 <= eos_id < vocab_size:
        raise DataError(f"eos id {eos_id} out of range for the vocabulary (size {vocab_size})")
    tok_vocab = getattr(tokenizer, "vocab_size", None)
    if tokenizer is not None and isinstance(tok_vocab, int) and tok_vocab > vocab_size:
        raise DataError(f"the tokenizer has {tok_vocab} tokens, more than the model's vocabulary "
                        f"({vocab_size})")
    reader = _Reader(tokenizer, vocab_size, eos_id)
    docs: List[Document] = []
    skipped = 0
    for path in _paths(paths):
        d, s = reader.read(path, format or detect_format(path))
        docs += d
        skipped += s
    return docs, skipped


def read_documents(paths: Union[PathLike, Sequence[PathLike]], tokenizer=None, *, vocab_size: int,
                   eos_id: int, format: Optional[str] = None) -> List[Document]:
    """Every non-empty document of ``paths``, in order, tokenized, EOS appended (see the module doc)."""
    return _read_all(paths, tokenizer, vocab_size, eos_id, format)[0]


# -------------------------------------------------------------------------------- split and pack

def split_documents(docs: Sequence[Document], eval_fraction: float, seed: int = 0
                    ) -> Tuple[List[Document], List[Document]]:
    """(train, eval), each in the original order; eval is ``ceil(f * n)`` documents chosen by a hash of
    (seed, index), at least 1 and at most n - 1 when f > 0; an error with fewer than 2 documents."""
    if not (isinstance(eval_fraction, (int, float)) and 0 <= eval_fraction < 1):
        raise DataError(f"eval_fraction must be in [0, 1), got {eval_fraction!r}")
    n = len(docs)
    if eval_fraction == 0:
        return list(docs), []
    if n < 2:
        raise DataError(f"eval_fraction {eval_fraction} needs at least 2 documents to hold one out, got {n}")
    n_eval = min(n - 1, max(1, math.ceil(eval_fraction * n - 1e-9)))
    key = lambda i: hashlib.sha256(f"{int(seed)}:{i}".encode()).digest()  # noqa: E731
    held = set(sorted(range(n), key=key)[:n_eval])
    return ([d for i, d in enumerate(docs) if i not in held], [d for i, d in enumerate(docs) if i in held])


def pack_documents(docs: Sequence[Document], seq_len: int, pad_id: int = 0
                   ) -> Tuple[np.ndarray, np.ndarray]:
    """(tokens int32 [rows, seq_len + 1], loss_mask bool [rows, seq_len]); loss_mask[k, t] says
    whether target tokens[k, t + 1] carries loss. Rows overlap by one token (see the module doc)."""
    if not docs:
        raise DataError("no documents to pack")
    stream = np.concatenate([d.ids for d in docs])
    flags = np.ones(len(stream), dtype=bool)
    start = 0
    for d in docs:
        flags[start:start + d.prompt_len] = False
        start += len(d.ids)
    rows = max(1, -(-(len(stream) - 1) // seq_len))
    total = rows * seq_len + 1
    tokens = np.full(total, pad_id, dtype=np.int32)
    tokens[:len(stream)] = stream
    loss = np.zeros(total, dtype=bool)
    loss[:len(stream)] = flags
    idx = np.arange(rows)[:, None] * seq_len + np.arange(seq_len + 1)[None, :]
    return tokens[idx], loss[idx[:, 1:]]


# --------------------------------------------------------------------------------------- dataset

class PackedDataset:
    """Packed rows served as batches in a seeded order that resumes exactly (see the module doc).

    ``next_batch()`` (or iterating, which never ends) returns this rank's ``batch_size`` rows of the
    next global batch of ``batch_size * world_size`` rows; every rank advances by the global batch,
    so all ranks hold the same state. ``eval_batches()`` is one ordered pass over all rows that does
    not touch the state.
    """

    def __init__(self, tokens: np.ndarray, loss_mask: np.ndarray, *, batch_size: int = 1, seed: int = 0,
                 shuffle: bool = True, rank: int = 0, world_size: int = 1):
        tokens, loss_mask = np.asarray(tokens), np.asarray(loss_mask, dtype=bool)
        if tokens.ndim != 2 or tokens.shape[0] < 1 or tokens.shape[1] < 2:
            raise ValueError(f"tokens must be [rows >= 1, seq_len + 1 >= 2], got {list(tokens.shape)}")
        if loss_mask.shape != (tokens.shape[0], tokens.shape[1] - 1):
            raise ValueError(f"loss_mask must be {[tokens.shape[0], tokens.shape[1] - 1]}, got {list(loss_mask.shape)}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not (world_size >= 1 and 0 <= rank < world_size):
            raise ValueError(f"need 0 <= rank < world_size, got rank {rank}, world_size {world_size}")
        self.tokens, self.loss_mask = tokens, loss_mask
        self.batch_size, self.seed, self.shuffle = int(batch_size), int(seed), bool(shuffle)
        self.rank, self.world_size = int(rank), int(world_size)
        self.epoch, self.index = 0, 0
        self._order: Optional[Tuple[int, np.ndarray]] = None
        self._fingerprint: Optional[str] = None

    def __len__(self) -> int:
        return self.tokens.shape[0]

    @property
    def seq_len(self) -> int:
        return self.tokens.shape[1] - 1

    @property
    def steps_per_epoch(self) -> int:
        """Global batches per epoch (the last one of an epoch may reach into the next)."""
        return -(-len(self) // (self.batch_size * self.world_size))

    @property
    def loss_tokens(self) -> int:
        return int(self.loss_mask.sum())

    def epoch_order(self, epoch: int) -> np.ndarray:
        """The row indices of ``epoch`` in the order they are served."""
        if not self.shuffle:
            return np.arange(len(self))
        if self._order is None or self._order[0] != epoch:
            rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([self.seed, int(epoch)])))
            self._order = (epoch, rng.permutation(len(self)))
        return self._order[1]

    def batch(self, rows: Sequence[int]) -> Dict[str, "torch.Tensor"]:  # noqa: F821
        """The batch of the given row indices: ``input_ids`` and shifted ``labels`` (-100 = no loss)."""
        import torch

        rows = np.asarray(rows, dtype=np.int64)
        tok = self.tokens[rows].astype(np.int64)
        labels = np.where(self.loss_mask[rows], tok[:, 1:], IGNORE_INDEX)
        return {"input_ids": torch.from_numpy(np.ascontiguousarray(tok[:, :-1])),
                "labels": torch.from_numpy(np.ascontiguousarray(labels))}

    def next_rows(self) -> np.ndarray:
        """Advance by one global batch; this rank's row indices."""
        need, taken = self.batch_size * self.world_size, []
        while need:
            order = self.epoch_order(self.epoch)
            part = order[self.index:self.index + need]
            taken.append(part)
            need -= len(part)
            self.index += len(part)
            if self.index == len(self):
                self.epoch, self.index = self.epoch + 1, 0
        rows = np.concatenate(taken)
        return rows[self.rank * self.batch_size:(self.rank + 1) * self.batch_size]

    def next_batch(self) -> Dict[str, "torch.Tensor"]:  # noqa: F821
        return self.batch(self.next_rows())

    def __iter__(self) -> Iterator[Dict[str, "torch.Tensor"]]:  # noqa: F821
        while True:
            yield self.next_batch()

    def eval_batches(self, batch_size: Optional[int] = None) -> Iterator[Dict[str, "torch.Tensor"]]:  # noqa: F821
        """Every row once, in order, ``batch_size`` (default: the dataset's) at a time; the last may be smaller."""
        b = batch_size or self.batch_size
        for start in range(0, len(self), b):
            yield self.batch(range(start, min(start + b, len(self))))

    @property
    def fingerprint(self) -> str:
        """sha256 of the packed rows and their loss mask: the data a saved state belongs to."""
        if self._fingerprint is None:
            h = hashlib.sha256(repr((self.tokens.shape, str(self.tokens.dtype))).encode())
            h.update(np.ascontiguousarray(self.tokens, dtype=np.int32).tobytes())
            h.update(np.packbits(self.loss_mask).tobytes())
            self._fingerprint = h.hexdigest()
        return self._fingerprint

    def state_dict(self) -> Dict[str, Any]:
        return {"epoch": self.epoch, "index": self.index, "seed": self.seed, "shuffle": self.shuffle,
                "num_rows": len(self), "fingerprint": self.fingerprint}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        for k in ("seed", "shuffle", "num_rows", "fingerprint"):
            if k in state and state[k] != self.state_dict()[k]:
                raise ValueError(f"data state does not match this dataset: {k} {state[k]!r} saved, "
                                 f"{self.state_dict()[k]!r} now (the data, seq_len or seed changed)")
        epoch, index = int(state["epoch"]), int(state["index"])
        if epoch < 0 or not 0 <= index < len(self):
            raise ValueError(f"data state out of range: epoch {epoch}, index {index} of {len(self)} rows")
        self.epoch, self.index = epoch, index


# ------------------------------------------------------------------------------------ load_corpus

def _stats(docs: Sequence[Document], ds: PackedDataset) -> SplitStats:
    return SplitStats(len(docs), int(sum(len(d.ids) for d in docs)), len(ds), ds.loss_tokens)


def load_corpus(paths: Union[PathLike, Sequence[PathLike]], tokenizer=None, *, seq_len: int,
                vocab_size: int, eos_id: int, eval_fraction: float = 0.0, seed: int = 0,
                max_seq_len: Optional[int] = None, format: Optional[str] = None, batch_size: int = 1,
                pad_id: int = 0, rank: int = 0, world_size: int = 1
                ) -> Tuple[PackedDataset, Optional[PackedDataset], CorpusStats]:
    """Read ``paths``, split by document, pack each split: ``(train, eval or None, stats)``.

    ``train`` is shuffled per epoch with ``seed``; ``eval`` (when ``eval_fraction > 0``) is served in
    order. ``tokenizer=None`` is allowed when every file is pre-tokenized (``input_ids`` rows).
    Raises ``DataError`` (a ``ValueError``) with a one-line message naming file and line.
    """
    if isinstance(seq_len, bool) or not isinstance(seq_len, numbers.Integral) or seq_len < 1:
        raise DataError(f"seq_len must be a positive integer, got {seq_len!r}")
    if max_seq_len is not None and seq_len > max_seq_len:
        raise DataError(f"seq_len {seq_len} is beyond the model context (max_seq_len {max_seq_len})")
    if not (isinstance(eval_fraction, (int, float)) and 0 <= eval_fraction < 1):
        raise DataError(f"eval_fraction must be in [0, 1), got {eval_fraction!r}")
    seq_len = int(seq_len)
    files = _paths(paths)
    docs, skipped = _read_all(files, tokenizer, vocab_size, eos_id, format)
    train_docs, eval_docs = split_documents(docs, eval_fraction, seed)
    kw = dict(batch_size=batch_size, seed=seed, rank=rank, world_size=world_size)
    train = PackedDataset(*pack_documents(train_docs, seq_len, pad_id), shuffle=True, **kw)
    evalset = PackedDataset(*pack_documents(eval_docs, seq_len, pad_id), shuffle=False, **kw) if eval_docs else None
    stats = CorpusStats(_stats(train_docs, train), _stats(eval_docs, evalset) if evalset else None,
                        files=files, seq_len=seq_len, skipped_empty=skipped)
    return train, evalset, stats
