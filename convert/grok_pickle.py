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

The result is an :class:`ArrayRef` (plain fp32 tensors) or a :class:`QuantizedRef`
(int8 ``weight`` + bf16 ``scales``), both pointing into the file.
"""
from __future__ import annotations

import io
import os
import struct
from dataclasses import dataclass
from typing import Any, List, Tuple, Union

from grok_torch.convert.safetensors_io import ITEMSIZE

# Payloads at least this large are skipped (offset recorded), smaller ones are read in memory.
_INLINE_LIMIT = 1 << 16


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
        with open(self.file, "rb") as f:
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


# ---------------------------------------------------------------------------------------------
# The interpreter
# ---------------------------------------------------------------------------------------------
def read_tensor_file(path: "str | os.PathLike") -> TensorRef:
    """Describe the tensor in one official checkpoint file without loading its payload.

    Raises :class:`UnsafePickleError` for any global outside the allow-list and
    :class:`CheckpointError` for a truncated, corrupt or unexpected file; both name the file.
    """
    path = os.fspath(path)
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            return _Reader(path, f, size).run()
    except FileNotFoundError:
        raise CheckpointError(f"{path}: file not found") from None


class _Reader:
    def __init__(self, path: str, f: io.BufferedReader, size: int):
        self.path, self.f, self.size = path, f, size
        self.stack: List[Any] = []
        self.marks: List[int] = []
        self.memo: dict = {}

    # -- helpers --------------------------------------------------------------------------
    def fail(self, msg: str) -> CheckpointError:
        return CheckpointError(f"{self.path}: {msg}")

    def read(self, n: int) -> bytes:
        b = self.f.read(n)
        if len(b) != n:
            raise self.fail(f"truncated pickle: file ends at byte {self.size} inside an opcode")
        return b

    def bytes_value(self, n: int) -> Any:
        start = self.f.tell()
        if start + n > self.size:
            raise self.fail(f"truncated: a {n}-byte payload starts at byte {start} but the file has {self.size} bytes")
        if n < _INLINE_LIMIT:
            return self.read(n)
        self.f.seek(n, io.SEEK_CUR)
        return _Payload(start, n)

    def pop_mark(self) -> List[Any]:
        if not self.marks:
            raise self.fail("corrupt pickle: MARK expected")
        k = self.marks.pop()
        items = self.stack[k:]
        del self.stack[k:]
        return items

    def pop(self) -> Any:
        if not self.stack:
            raise self.fail("corrupt pickle: stack underflow")
        return self.stack.pop()

    def resolve_global(self, module: str, name: str) -> _Global:
        kind = ALLOWED_GLOBALS.get((module, name))
        if kind is None:
            raise UnsafePickleError(
                f"{self.path}: refusing to load: the pickle references the global '{module}.{name}', which is not "
                f"one an official Grok-1 checkpoint uses (allowed: "
                f"{', '.join(sorted(m + '.' + n for m, n in ALLOWED_GLOBALS))}). Nothing was executed. "
                f"The file is corrupt, not a Grok-1 checkpoint, or malicious.")
        return _Global(kind, f"{module}.{name}")

    # -- object construction ---------------------------------------------------------------
    def reduce(self, fn: Any, args: Any) -> Any:
        if not isinstance(fn, _Global) or not isinstance(args, tuple):
            raise self.fail(f"unexpected REDUCE of {fn!r}")
        if fn.kind == "reconstruct":
            if len(args) == 3 and isinstance(args[0], _Global) and args[0].kind == "ndarray":
                return _ArrayBuilder()
        elif fn.kind == "dtype" and len(args) >= 1:
            spec = args[0]
            if isinstance(spec, _Global) and spec.kind == "bfloat16":
                return _DType("bfloat16")
            if isinstance(spec, str) and spec in _NUMPY_CODES:
                return _DType(_NUMPY_CODES[spec])
            raise self.fail(f"unsupported array dtype {spec!r} (the official files hold int8, float32 and bfloat16)")
        raise self.fail(f"unexpected call {fn!r}{args!r}")

    def build(self, obj: Any, state: Any) -> Any:
        if isinstance(obj, _DType):
            # (version, byteorder, subarray, names, fields, elsize, alignment, flags)
            if isinstance(state, tuple) and len(state) > 1 and state[1] == ">":
                raise self.fail(f"big-endian {obj.name} arrays are not supported")
            return obj
        if isinstance(obj, _ArrayBuilder):
            if not (isinstance(state, tuple) and len(state) == 5 and isinstance(state[2], _DType)):
                raise self.fail("corrupt ndarray state")
            _, shape, dt, fortran, data = state
            if not isinstance(shape, tuple) or not all(isinstance(s, int) and s >= 0 for s in shape):
                raise self.fail(f"corrupt ndarray shape {shape!r}")
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
                obj.result = ArrayRef(self.path, dt.name, shape, -1, n, bytes(data))
            return obj
        if isinstance(obj, _QW8):
            obj.state = state
            return obj
        raise self.fail(f"unexpected BUILD on {type(obj).__name__}")

    # -- main loop --------------------------------------------------------------------------
    def run(self) -> TensorRef:
        try:
            return self._run()
        except CheckpointError:
            raise
        except (IndexError, KeyError, TypeError, AttributeError, UnicodeDecodeError, struct.error,
                OverflowError, RecursionError) as e:
            # malformed input reaching a Python operation: still a clear error naming the file
            raise self.fail(f"corrupt pickle near byte {self.f.tell()}: {type(e).__name__}: {e}") from None

    def _run(self) -> TensorRef:
        f, st = self.f, self.stack
        u8 = struct.Struct("<B").unpack
        while True:
            at = f.tell()
            op = f.read(1)
            if not op:
                raise self.fail(f"truncated pickle: file ends at byte {at} before the STOP opcode")
            o = op[0]
            if o == 0x80:                                     # PROTO
                if self.read(1)[0] > 5:
                    raise self.fail("unsupported pickle protocol")
            elif o == 0x95:                                   # FRAME (a length hint)
                self.read(8)
            elif o == 0x2E:                                   # STOP
                return self.finish()
            elif o == 0x28:                                   # MARK
                self.marks.append(len(st))
            elif o == 0x94:                                   # MEMOIZE
                if not st:
                    raise self.fail("corrupt pickle: MEMOIZE on empty stack")
                self.memo[len(self.memo)] = st[-1]
            elif o == 0x71:                                   # BINPUT
                self.memo[self.read(1)[0]] = st[-1]
            elif o == 0x72:                                   # LONG_BINPUT
                self.memo[struct.unpack("<I", self.read(4))[0]] = st[-1]
            elif o in (0x68, 0x6A):                           # BINGET, LONG_BINGET
                key = self.read(1)[0] if o == 0x68 else struct.unpack("<I", self.read(4))[0]
                if key not in self.memo:
                    raise self.fail(f"corrupt pickle: memo key {key} missing")
                st.append(self.memo[key])
            elif o == 0x8C:                                   # SHORT_BINUNICODE
                st.append(self.read(u8(self.read(1))[0]).decode("utf-8"))
            elif o == 0x58:                                   # BINUNICODE
                st.append(self.read(struct.unpack("<I", self.read(4))[0]).decode("utf-8"))
            elif o == 0x43:                                   # SHORT_BINBYTES
                st.append(self.read(self.read(1)[0]))
            elif o == 0x42:                                   # BINBYTES
                st.append(self.bytes_value(struct.unpack("<I", self.read(4))[0]))
            elif o == 0x8E:                                   # BINBYTES8
                st.append(self.bytes_value(struct.unpack("<Q", self.read(8))[0]))
            elif o == 0x4B:                                   # BININT1
                st.append(self.read(1)[0])
            elif o == 0x4D:                                   # BININT2
                st.append(struct.unpack("<H", self.read(2))[0])
            elif o == 0x4A:                                   # BININT
                st.append(struct.unpack("<i", self.read(4))[0])
            elif o == 0x8A:                                   # LONG1
                n = self.read(1)[0]
                st.append(int.from_bytes(self.read(n), "little", signed=True))
            elif o == 0x4E:                                   # NONE
                st.append(None)
            elif o == 0x88:                                   # NEWTRUE
                st.append(True)
            elif o == 0x89:                                   # NEWFALSE
                st.append(False)
            elif o == 0x29:                                   # EMPTY_TUPLE
                st.append(())
            elif o == 0x85:                                   # TUPLE1
                st.append((self.pop(),))
            elif o == 0x86:                                   # TUPLE2
                b, a = self.pop(), self.pop()
                st.append((a, b))
            elif o == 0x87:                                   # TUPLE3
                c, b, a = self.pop(), self.pop(), self.pop()
                st.append((a, b, c))
            elif o == 0x74:                                   # TUPLE
                st.append(tuple(self.pop_mark()))
            elif o == 0x7D:                                   # EMPTY_DICT
                st.append({})
            elif o == 0x75:                                   # SETITEMS
                items = self.pop_mark()
                d = self.pop()
                if not isinstance(d, dict) or len(items) % 2:
                    raise self.fail("corrupt pickle: bad SETITEMS")
                for k in range(0, len(items), 2):
                    d[items[k]] = items[k + 1]
                st.append(d)
            elif o == 0x73:                                   # SETITEM
                v, k = self.pop(), self.pop()
                d = st[-1] if st else None
                if not isinstance(d, dict):
                    raise self.fail("corrupt pickle: bad SETITEM")
                d[k] = v
            elif o == 0x93:                                   # STACK_GLOBAL
                name, module = self.pop(), self.pop()
                if not (isinstance(module, str) and isinstance(name, str)):
                    raise self.fail("corrupt pickle: STACK_GLOBAL needs two strings")
                st.append(self.resolve_global(module, name))
            elif o == 0x63:                                   # GLOBAL (text protocol)
                module = f.readline().decode("utf-8", "replace").rstrip("\n")
                name = f.readline().decode("utf-8", "replace").rstrip("\n")
                st.append(self.resolve_global(module, name))
            elif o == 0x52:                                   # REDUCE
                args, fn = self.pop(), self.pop()
                st.append(self.reduce(fn, args))
            elif o == 0x81:                                   # NEWOBJ
                args, cls = self.pop(), self.pop()
                if isinstance(cls, _Global) and cls.kind == "qw8" and args == ():
                    st.append(_QW8())
                else:
                    raise self.fail(f"unexpected NEWOBJ of {cls!r}")
            elif o == 0x62:                                   # BUILD
                state = self.pop()
                st.append(self.build(self.pop(), state))
            else:
                raise self.fail(f"corrupt or unsupported pickle: opcode 0x{o:02x} at byte {at} is not used by "
                                "official Grok-1 checkpoint files")

    def finish(self) -> TensorRef:
        if len(self.stack) != 1:
            raise self.fail("corrupt pickle: STOP with a malformed stack")
        obj = self.stack[0]
        if isinstance(obj, _ArrayBuilder) and obj.result is not None:
            return obj.result
        if isinstance(obj, _QW8) and isinstance(obj.state, dict):
            w, s = obj.state.get("weight"), obj.state.get("scales")
            if isinstance(w, _ArrayBuilder) and isinstance(s, _ArrayBuilder) and w.result and s.result:
                return QuantizedRef(w.result, s.result)
            raise self.fail("QuantizedWeight8bit without ndarray 'weight' and 'scales'")
        raise self.fail(f"the pickle holds a {type(obj).__name__}, not an array or QuantizedWeight8bit")
