"""Read official Grok-1 ``ckpt-0/tensorNNNNN_000`` pickles safely and without loading their payloads.

The released files are protocol-4 pickles of a numpy array or of ``__main__.QuantizedWeight8bit``
(SPEC §5.2). ``pickle.load`` on a file from the internet executes whatever it names, and would also
pull a 1.6 GB payload into memory. Instead, this module interprets the handful of opcodes those
files use, itself:

* a global is resolved through ``ALLOWED_GLOBALS`` the moment it is named (GLOBAL/STACK_GLOBAL);
  anything else raises :class:`UnsafePickleError` naming the global and the file, before any
  call could happen. Nothing from the file is ever imported or called: the allowed globals map
  to inert stand-ins that only record what the pickle describes.
* large byte strings (the tensor payloads) are not read: the reader records their offset and
  length in the file, so the converter can stream them in bounded chunks.
* the file is hostile until proven otherwise (issue #12): only regular files are opened, every
  length is checked against the bytes left before anything is allocated, and the opcode count,
  stack, memo, nesting, string sizes and bytes held are capped at a generous multiple of what an
  official file needs. So any file is refused (or read) in time linear in its size and in memory
  bounded by a constant plus its small arrays, and every message is one line that names the file
  and shows values from it only escaped and cut (:func:`_describe`), never their repr.

The result is an :class:`ArrayRef` (plain fp32 tensors) or a :class:`QuantizedRef`
(int8 ``weight`` + bf16 ``scales``), both pointing into the file.
"""
from __future__ import annotations

import io
import os
import stat
import struct
from dataclasses import dataclass
from typing import Any, Dict, List, Tuple, Union

from grok_torch.config import quote_untrusted
from grok_torch.convert.safetensors_io import ITEMSIZE

# Payloads at least this large are skipped (offset recorded), smaller ones are read in memory.
_INLINE_LIMIT = 1 << 16

# Caps on what one file may make the reader do. An official file (pickle_layout.txt) runs ~115
# opcodes, keeps ~12 items on the stack, 3 open MARKs, ~45 memo entries, nests tuples 2 deep
# (the ndarray state holds the shape) and names nothing longer than 21 bytes; each cap is many
# times that, and together they bound the work and memory per file whatever its size.
_MAX_OPS = 4096                        # also bounds the number of objects created
_MAX_STACK = 64
_MAX_MARKS = 16
_MAX_MEMO = 512
_MAX_DEPTH = 8                         # tuples within tuples
_MAX_STR = 256                         # bytes in a module, class or dtype name (and a GLOBAL line)
_MAX_HELD = 4 * _INLINE_LIMIT          # bytes of strings and inline arrays held in memory, in all
_MAX_INT_BYTES = 8                     # LONG1: the official files hold no integer beyond 64 bits
_MAX_NDIM = 8                          # the official arrays have at most 3 dimensions


class CheckpointError(ValueError):
    """A checkpoint file is unreadable, corrupt, truncated or not what the config expects."""


class UnsafePickleError(CheckpointError):
    """A pickle names a global outside the allow-list; nothing from it was executed."""


_NUMPY_CODES = {"i1": "int8", "|i1": "int8", "b": "int8", "f4": "float32", "<f4": "float32"}


@dataclass(frozen=True)
class ArrayRef:
    """A C-ordered array whose bytes sit at ``offset`` in ``file`` (or inline in ``data``)."""

    file: str
    dtype: str                 # "int8" | "float32" | "bfloat16"
    shape: Tuple[int, ...]
    offset: int                # -1 when the bytes are inline
    nbytes: int
    data: bytes = b""          # the bytes themselves for small arrays

    def read(self, start: int = 0, length: int = -1) -> bytes:
        """Bytes [start, start+length) of the array (whole array by default)."""
        if length < 0:
            length = self.nbytes - start
        if self.offset < 0:
            return self.data[start:start + length]
        f, _ = open_regular(self.file)
        with f:
            f.seek(self.offset + start)
            out = f.read(length)
        if len(out) != length:
            raise CheckpointError(f"{self.file}: truncated: wanted {length} bytes at {self.offset + start}, got {len(out)}")
        return out


@dataclass(frozen=True)
class QuantizedRef:
    """``__main__.QuantizedWeight8bit``: int8 weight [*lead, K, N], bf16 scales [*lead, G, N]."""

    weight: ArrayRef
    scales: ArrayRef


TensorRef = Union[ArrayRef, QuantizedRef]


# ---------------------------------------------------------------------------------------------
# Inert stand-ins for the allowed globals
# ---------------------------------------------------------------------------------------------
class _Global:
    def __init__(self, kind: str, qualname: str):
        self.kind, self.qualname = kind, qualname

    def __repr__(self):
        return self.qualname


ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): "reconstruct",
    ("numpy._core.multiarray", "_reconstruct"): "reconstruct",   # numpy >= 2 writes this name
    ("numpy", "ndarray"): "ndarray",
    ("numpy", "dtype"): "dtype",
    ("ml_dtypes", "bfloat16"): "bfloat16",
    ("__main__", "QuantizedWeight8bit"): "qw8",
}


class _DType:
    def __init__(self, name: str):
        self.name = name


class _ArrayBuilder:
    """Result of ``_reconstruct(ndarray, (0,), b'b')``: an empty array waiting for its BUILD state."""

    result: Any = None


class _QW8:
    state: Any = None


@dataclass
class _Payload:
    offset: int
    length: int


class _Mark:
    pass


_MARK = _Mark()


def _describe(v: Any) -> str:
    """A short description of a value from a file. Never its repr: a shared tuple can have a
    repr of gigabytes, and a string can carry terminal escapes."""
    if isinstance(v, str):
        return f"the string {quote_untrusted(v)}"
    if isinstance(v, _Global):
        return v.qualname                            # allow-listed, so plain ASCII
    if isinstance(v, (bytes, _Payload)):
        return f"{len(v) if isinstance(v, bytes) else v.length} bytes"
    if v is None or isinstance(v, (bool, int)):
        return repr(v)                               # ints are at most 64 bits (_MAX_INT_BYTES)
    if isinstance(v, tuple):
        return f"a tuple of {len(v)} items"
    if isinstance(v, dict):
        return f"a dict of {len(v)} items"
    if isinstance(v, _DType):
        return f"dtype {v.name}"
    if isinstance(v, _ArrayBuilder):
        return "an ndarray"
    if isinstance(v, _QW8):
        return "a QuantizedWeight8bit"
    return f"a value of type {type(v).__name__}"


# ---------------------------------------------------------------------------------------------
# The interpreter
# ---------------------------------------------------------------------------------------------
def open_regular(path: str, buffering: int = -1) -> Tuple[io.RawIOBase, os.stat_result]:
    """Open ``path`` for reading only if it is a regular file (or a symlink to one).

    A FIFO would block open() forever and a device never ends: look before opening, then open
    without blocking and look again at what was opened (it may have been swapped in between).
    Every open of a checkpoint file goes through here, also the payload's second open.
    """
    _require_regular(path, os.stat(path))
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    try:
        st = os.fstat(fd)
        _require_regular(path, st)
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return os.fdopen(fd, "rb", buffering=buffering), st


def read_tensor_file(path: "str | os.PathLike") -> TensorRef:
    """Describe the tensor in one official checkpoint file without loading its payload.

    Raises :class:`UnsafePickleError` for any global outside the allow-list and
    :class:`CheckpointError` for a truncated, corrupt or unexpected file; both name the file.
    """
    path = os.fspath(path)
    try:
        f, st = open_regular(path)
        with f:
            return _Reader(path, f, st.st_size).run()
    except FileNotFoundError:
        raise CheckpointError(f"{path}: file not found") from None
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read: {e.strerror or type(e).__name__}") from None


_FILE_KINDS = [(stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISSOCK, "a socket"),
               (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device")]


def _require_regular(path: str, st: os.stat_result) -> None:
    if not stat.S_ISREG(st.st_mode):
        kind = next((k for test, k in _FILE_KINDS if test(st.st_mode)), "an unknown kind of file")
        raise CheckpointError(f"{path}: not a regular file but {kind}; refusing to read it")


class _Reader:
    def __init__(self, path: str, f: io.BufferedReader, size: int):
        self.path, self.f, self.size = path, f, size
        self.stack: List[Any] = []
        self.marks: List[int] = []
        self.memo: dict = {}
        # nesting depth of every tuple built, by id; the tuple rides along so that its id stays its own
        self.depths: Dict[int, Tuple[int, tuple]] = {}
        self.held = 0                                  # bytes of strings and inline arrays read so far

    # -- helpers --------------------------------------------------------------------------
    def fail(self, msg: str) -> CheckpointError:
        return CheckpointError(f"{self.path}: {msg}")

    def read(self, n: int) -> bytes:
        b = self.f.read(n)
        if len(b) != n:
            raise self.fail(f"truncated pickle: file ends at byte {self.size} inside an opcode")
        return b

    def length(self, fmt: str, what: str) -> int:
        """A length header, checked against the bytes left in the file before anything is allocated."""
        n = struct.unpack(fmt, self.read(struct.calcsize(fmt)))[0]
        start = self.f.tell()
        if n > self.size - start:
            raise self.fail(f"truncated: a {n}-byte {what} starts at byte {start} but the file has {self.size} bytes")
        return n

    def hold(self, n: int) -> bytes:
        """``n`` bytes read into memory, counted against what one tensor's small arrays need."""
        self.held += n
        if self.held > _MAX_HELD:
            raise self.fail(f"corrupt pickle: more than {_MAX_HELD} bytes of strings and small arrays by byte "
                            f"{self.f.tell()} (an official file holds one tensor)")
        return self.read(n)

    def string(self, n: int) -> str:
        at = self.f.tell()
        if n > _MAX_STR:
            raise self.fail(f"corrupt pickle: a {n}-byte string at byte {at}; the names in an official file "
                            f"are shorter than {_MAX_STR} bytes")
        try:
            return self.hold(n).decode("utf-8")
        except UnicodeDecodeError:
            raise self.fail(f"corrupt pickle: the string at byte {at} is not UTF-8") from None

    def bytes_value(self, n: int) -> Any:
        start = self.f.tell()
        if n < _INLINE_LIMIT:
            return self.hold(n)
        self.f.seek(n, io.SEEK_CUR)
        return _Payload(start, n)

    def push(self, v: Any) -> None:
        if len(self.stack) >= _MAX_STACK:
            raise self.fail(f"corrupt pickle: more than {_MAX_STACK} items on the stack "
                            "(an official file needs about a dozen)")
        self.stack.append(v)

    def pop_mark(self) -> List[Any]:
        if not self.marks:
            raise self.fail("corrupt pickle: MARK expected")
        k = self.marks.pop()
        items = self.stack[k:]
        del self.stack[k:]
        return items

    def pop(self) -> Any:
        if not self.stack or (self.marks and self.marks[-1] == len(self.stack)):
            raise self.fail("corrupt pickle: stack underflow")
        return self.stack.pop()

    def tuple(self, items: List[Any]) -> tuple:
        """A tuple of ``items``, refused when it nests deeper than any official file: hashing or
        printing a deep (or memo-shared) tuple recurses in C, so depth is counted as it is built."""
        depth = 1
        for x in items:
            if isinstance(x, dict):
                raise self.fail("corrupt pickle: a dict inside a tuple (the official files have none)")
            if isinstance(x, tuple):
                depth = max(depth, self.depths[id(x)][0] + 1)
        if depth > _MAX_DEPTH:
            raise self.fail(f"corrupt pickle: tuples nested more than {_MAX_DEPTH} deep "
                            "(an official file nests them 2 deep)")
        t = tuple(items)
        self.depths[id(t)] = (depth, t)
        return t

    def memoize(self, key: int) -> None:
        if not self.stack:
            raise self.fail("corrupt pickle: MEMOIZE on empty stack")
        if key not in self.memo and len(self.memo) >= _MAX_MEMO:
            raise self.fail(f"corrupt pickle: more than {_MAX_MEMO} memo entries (an official file needs about 45)")
        self.memo[key] = self.stack[-1]

    def set_item(self, d: Any, k: Any, v: Any) -> None:
        # keys are strings in the official files ('weight', 'scales'): a string hashes in linear time,
        # where a tuple key could take 2^depth work (memo-shared halves) or overflow the C stack
        if not isinstance(d, dict):
            raise self.fail(f"corrupt pickle: SETITEM on {_describe(d)}, not a dict")
        if not isinstance(k, str):
            raise self.fail(f"corrupt pickle: a dict key that is {_describe(k)}, not a string")
        if isinstance(v, dict):
            raise self.fail("corrupt pickle: a dict inside a dict (the official files have none)")
        d[k] = v

    def global_line(self) -> str:
        line = self.f.readline(_MAX_STR + 1)
        if not line.endswith(b"\n"):
            raise self.fail(f"corrupt pickle: a GLOBAL name at byte {self.f.tell() - len(line)} is longer than "
                            f"{_MAX_STR} bytes or has no end of line")
        return line[:-1].decode("utf-8", "replace")

    def resolve_global(self, module: str, name: str) -> _Global:
        kind = ALLOWED_GLOBALS.get((module, name))
        if kind is None:
            raise UnsafePickleError(
                f"{self.path}: refusing to load: the pickle references the global {quote_untrusted(module + '.' + name)}, "
                f"which is not one an official Grok-1 checkpoint uses (allowed: "
                f"{', '.join(sorted(m + '.' + n for m, n in ALLOWED_GLOBALS))}). Nothing was executed. "
                f"The file is corrupt, not a Grok-1 checkpoint, or malicious.")
        return _Global(kind, f"{module}.{name}")

    # -- object construction ---------------------------------------------------------------
    def reduce(self, fn: Any, args: Any) -> Any:
        if not isinstance(fn, _Global) or not isinstance(args, tuple):
            raise self.fail(f"unexpected REDUCE of {_describe(fn)} with {_describe(args)}")
        if fn.kind == "reconstruct":
            if len(args) == 3 and isinstance(args[0], _Global) and args[0].kind == "ndarray":
                return _ArrayBuilder()
        elif fn.kind == "dtype" and len(args) >= 1:
            spec = args[0]
            if isinstance(spec, _Global) and spec.kind == "bfloat16":
                return _DType("bfloat16")
            if isinstance(spec, str) and spec in _NUMPY_CODES:
                return _DType(_NUMPY_CODES[spec])
            raise self.fail(f"unsupported array dtype {_describe(spec)} "
                            "(the official files hold int8, float32 and bfloat16)")
        raise self.fail(f"unexpected call of {fn.qualname} with {_describe(args)}")

    def build(self, obj: Any, state: Any) -> Any:
        if isinstance(obj, _DType):
            # (version, byteorder, subarray, names, fields, elsize, alignment, flags)
            if isinstance(state, tuple) and len(state) > 1 and state[1] == ">":
                raise self.fail(f"big-endian {obj.name} arrays are not supported")
            return obj
        if isinstance(obj, _ArrayBuilder):
            if obj.result is not None:
                raise self.fail("corrupt pickle: an ndarray built twice")
            if not (isinstance(state, tuple) and len(state) == 5 and isinstance(state[2], _DType)):
                raise self.fail("corrupt ndarray state")
            _, shape, dt, fortran, data = state
            if not isinstance(shape, tuple) or not all(type(s) is int and s >= 0 for s in shape):
                raise self.fail(f"corrupt ndarray shape: {_describe(shape)} of non-negative ints expected")
            if len(shape) > _MAX_NDIM:
                # also keeps the shape (and its byte count) in messages short
                raise self.fail(f"corrupt ndarray shape: {len(shape)} dimensions (the official arrays have at most 3)")
            if not isinstance(data, (bytes, _Payload)):
                # numpy would also take a list or tuple of ints; the official files hold bytes
                raise self.fail(f"corrupt ndarray: its data is {_describe(data)}, not a byte string")
            n = ITEMSIZE[dt.name]
            for s in shape:
                n *= s
            if fortran and len(shape) > 1:
                raise self.fail("Fortran-ordered arrays are not supported (the official files are C-ordered)")
            length = data.length if isinstance(data, _Payload) else len(data)
            if length != n:
                raise self.fail(f"corrupt ndarray: {dt.name}{list(shape)} needs {n} bytes, the pickle holds {length}")
            if isinstance(data, _Payload):
                obj.result = ArrayRef(self.path, dt.name, shape, data.offset, n)
            else:
                obj.result = ArrayRef(self.path, dt.name, shape, -1, n, data)
            return obj
        if isinstance(obj, _QW8):
            if obj.state is not None or not isinstance(state, dict):
                raise self.fail("corrupt pickle: QuantizedWeight8bit state is not one dict")
            obj.state = state
            return obj
        raise self.fail(f"unexpected BUILD on {_describe(obj)}")

    # -- main loop --------------------------------------------------------------------------
    def run(self) -> TensorRef:
        try:
            return self._run()
        except CheckpointError:
            raise
        except (IndexError, KeyError, TypeError, AttributeError, ValueError, struct.error, OverflowError,
                RecursionError, MemoryError) as e:
            # malformed input reaching a Python operation: still one clear line naming the file. Not
            # str(e): that can hold a repr of a value from the file (a KeyError's key, say)
            raise self.fail(f"corrupt pickle near byte {self.f.tell()} ({type(e).__name__})") from None

    def _run(self) -> TensorRef:
        f, push, pop = self.f, self.push, self.pop
        for _ in range(_MAX_OPS):
            at = f.tell()
            op = f.read(1)
            if not op:
                raise self.fail(f"truncated pickle: file ends at byte {at} before the STOP opcode")
            o = op[0]
            if o == 0x80:                                     # PROTO
                if self.read(1)[0] > 5:
                    raise self.fail("unsupported pickle protocol")
            elif o == 0x95:                                   # FRAME (a length hint, but it must fit)
                self.length("<Q", "frame")
            elif o == 0x2E:                                   # STOP
                return self.finish()
            elif o == 0x28:                                   # MARK
                if len(self.marks) >= _MAX_MARKS:
                    raise self.fail(f"corrupt pickle: more than {_MAX_MARKS} open MARKs")
                self.marks.append(len(self.stack))
            elif o == 0x94:                                   # MEMOIZE
                self.memoize(len(self.memo))
            elif o == 0x71:                                   # BINPUT
                self.memoize(self.read(1)[0])
            elif o == 0x72:                                   # LONG_BINPUT
                self.memoize(struct.unpack("<I", self.read(4))[0])
            elif o in (0x68, 0x6A):                           # BINGET, LONG_BINGET
                key = self.read(1)[0] if o == 0x68 else struct.unpack("<I", self.read(4))[0]
                if key not in self.memo:
                    raise self.fail(f"corrupt pickle: memo key {key} missing")
                push(self.memo[key])
            elif o == 0x8C:                                   # SHORT_BINUNICODE
                push(self.string(self.length("<B", "string")))
            elif o == 0x58:                                   # BINUNICODE
                push(self.string(self.length("<I", "string")))
            elif o == 0x43:                                   # SHORT_BINBYTES
                push(self.bytes_value(self.length("<B", "byte string")))
            elif o == 0x42:                                   # BINBYTES
                push(self.bytes_value(self.length("<I", "byte string")))
            elif o == 0x8E:                                   # BINBYTES8
                push(self.bytes_value(self.length("<Q", "byte string")))
            elif o == 0x4B:                                   # BININT1
                push(self.read(1)[0])
            elif o == 0x4D:                                   # BININT2
                push(struct.unpack("<H", self.read(2))[0])
            elif o == 0x4A:                                   # BININT
                push(struct.unpack("<i", self.read(4))[0])
            elif o == 0x8A:                                   # LONG1
                n = self.length("<B", "integer")
                if n > _MAX_INT_BYTES:
                    raise self.fail(f"corrupt pickle: a {n}-byte integer at byte {at}")
                push(int.from_bytes(self.read(n), "little", signed=True))
            elif o == 0x4E:                                   # NONE
                push(None)
            elif o == 0x88:                                   # NEWTRUE
                push(True)
            elif o == 0x89:                                   # NEWFALSE
                push(False)
            elif o == 0x29:                                   # EMPTY_TUPLE
                push(self.tuple([]))
            elif o == 0x85:                                   # TUPLE1
                push(self.tuple([pop()]))
            elif o == 0x86:                                   # TUPLE2
                b, a = pop(), pop()
                push(self.tuple([a, b]))
            elif o == 0x87:                                   # TUPLE3
                c, b, a = pop(), pop(), pop()
                push(self.tuple([a, b, c]))
            elif o == 0x74:                                   # TUPLE
                push(self.tuple(self.pop_mark()))
            elif o == 0x7D:                                   # EMPTY_DICT
                push({})
            elif o == 0x75:                                   # SETITEMS
                items = self.pop_mark()
                d = pop()
                if len(items) % 2:
                    raise self.fail("corrupt pickle: bad SETITEMS")
                for k in range(0, len(items), 2):
                    self.set_item(d, items[k], items[k + 1])
                push(d)
            elif o == 0x73:                                   # SETITEM
                v, k = pop(), pop()
                self.set_item(self.stack[-1] if self.stack else None, k, v)
            elif o == 0x93:                                   # STACK_GLOBAL
                name, module = pop(), pop()
                if not (isinstance(module, str) and isinstance(name, str)):
                    raise self.fail("corrupt pickle: STACK_GLOBAL needs two strings")
                push(self.resolve_global(module, name))
            elif o == 0x63:                                   # GLOBAL (text protocol)
                module = self.global_line()
                push(self.resolve_global(module, self.global_line()))
            elif o == 0x52:                                   # REDUCE
                args, fn = pop(), pop()
                push(self.reduce(fn, args))
            elif o == 0x81:                                   # NEWOBJ
                args, cls = pop(), pop()
                if isinstance(cls, _Global) and cls.kind == "qw8" and args == ():
                    push(_QW8())
                else:
                    raise self.fail(f"unexpected NEWOBJ of {_describe(cls)} with {_describe(args)}")
            elif o == 0x62:                                   # BUILD
                state = pop()
                push(self.build(pop(), state))
            else:
                raise self.fail(f"corrupt or unsupported pickle: opcode 0x{o:02x} at byte {at} is not used by "
                                "official Grok-1 checkpoint files")
        raise self.fail(f"corrupt pickle: no STOP within {_MAX_OPS} opcodes (an official file has about 115)")

    def finish(self) -> TensorRef:
        if len(self.stack) != 1 or self.marks:
            raise self.fail("corrupt pickle: STOP with a malformed stack")
        obj = self.stack[0]
        if isinstance(obj, _ArrayBuilder) and obj.result is not None:
            return obj.result
        if isinstance(obj, _QW8) and isinstance(obj.state, dict):
            w, s = obj.state.get("weight"), obj.state.get("scales")
            if isinstance(w, _ArrayBuilder) and isinstance(s, _ArrayBuilder) and w.result and s.result:
                return QuantizedRef(w.result, s.result)
            raise self.fail("QuantizedWeight8bit without ndarray 'weight' and 'scales'")
        raise self.fail(f"the pickle holds {_describe(obj)}, not an array or QuantizedWeight8bit")
