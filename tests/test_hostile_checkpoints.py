"""Crafted and mutated ``ckpt-0`` tensor files through the allow-listed pickle reader (issue #12).

Checkpoints come from the internet, so every file must be refused (or read) in time linear in its
size and in memory bounded by a small constant plus the real tensor's size, with one line naming
the file: never a traceback, a signal, a hang or a raw byte from the file. Each hostile file is
built here from its bytes and read in a subprocess under an address-space limit and a timeout, so
that a regression shows up as a failed assertion, not as a hung or killed test run. A seeded fuzz
test pushes random mutations of the fixture's real tensor files through the same reader.
"""
from __future__ import annotations

import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import TINY_REF, require

_LIMIT_AS = 1 << 30           # address space of the reading subprocess: far below any blow-up
_TIMEOUT = 10                 # seconds; a refusal takes well under one, even on a slow shared core

# Reads argv[1]; exit 3 with the error on stdout for a CheckpointError, 0 when the file reads.
# Anything else (another exception, MemoryError, a signal, a hang) is a failure of the reader.
_CHILD = f"""
import resource, sys
resource.setrlimit(resource.RLIMIT_AS, ({_LIMIT_AS}, {_LIMIT_AS}))
from grok_torch.convert.grok_pickle import CheckpointError, read_tensor_file
try:
    ref = read_tensor_file(sys.argv[1])
except CheckpointError as e:
    print(e)
    sys.exit(3)
print("read", type(ref).__name__)
"""


def _read_in_child(path: Path) -> subprocess.CompletedProcess:
    try:
        return subprocess.run([sys.executable, "-c", _CHILD, str(path)], capture_output=True, timeout=_TIMEOUT)
    except subprocess.TimeoutExpired:
        pytest.fail(f"reading {path.name} did not finish within {_TIMEOUT} s (a hang or super-linear work)")


def _assert_one_clean_line(text: str, path: Path, limit: int = 1000) -> str:
    """``text`` is one printable ASCII line that names ``path``; returns it without the newline."""
    assert text.endswith("\n") and text.count("\n") == 1, f"not one line: {text[:300]!r}"
    line = text[:-1]
    assert line.startswith(f"{path}: "), f"the message does not start with the file: {line[:300]!r}"
    assert line.isascii() and line.isprintable(), f"raw bytes from the file in the message: {line[:300]!r}"
    assert len(line) < limit, f"a {len(line)}-character message: {line[:300]!r}"
    return line


def _refused(path: Path, data: "bytes | None" = None) -> str:
    """Write ``data`` to ``path`` (unless None), read it in a limited child, expect one clean refusal."""
    if data is not None:
        path.write_bytes(data)
    try:
        r = _read_in_child(path)
    finally:
        if data is not None and len(data) > 1 << 20:
            path.unlink()                            # pytest keeps tmp dirs; do not keep 64 MiB files
    assert r.returncode == 3, (f"exit status {r.returncode}, expected a CheckpointError; "
                               f"stderr: {r.stderr.decode(errors='replace')[-2000:]}")
    assert r.stderr == b"", r.stderr.decode(errors="replace")[-2000:]
    return _assert_one_clean_line(r.stdout.decode("ascii", errors="backslashreplace"), path)


def _f(tmp_path: Path) -> Path:
    return tmp_path / "tensor00000_000"


def _levels(n: int) -> bytes:
    """t_{i+1} = (t_i, t_i) for i < n, every level a memo reference to the previous one (issue recipe)."""
    return b"".join(b"j" + struct.pack("<I", i) + b"j" + struct.pack("<I", i) + b"\x86\x94" for i in range(n))


def _s(text: "str | bytes") -> bytes:
    b = text.encode() if isinstance(text, str) else text
    return b"\x8c" + bytes([len(b)]) + b                                   # SHORT_BINUNICODE


def _array_pickle(data_ops: bytes) -> bytes:
    """A float32 [2] numpy array (the official opcode structure) whose data is pushed by ``data_ops``."""
    return (b"\x80\x04" + _s("numpy.core.multiarray") + _s("_reconstruct") + b"\x93" + _s("numpy") + _s("ndarray")
            + b"\x93K\x00\x85C\x01b\x87R(K\x01K\x02\x85" + _s("numpy") + _s("dtype") + b"\x93" + _s("f4")
            + b"\x89\x88\x87R(K\x03" + _s("<") + b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb\x89"
            + data_ops + b"tb.")


def test_a_valid_array_pickle_reads(tmp_path):
    # the helper above is right: with bytes as data it reads (so the refusals below are about the data)
    f = _f(tmp_path)
    f.write_bytes(_array_pickle(b"C\x08" + bytes(range(8))))
    r = _read_in_child(f)
    assert (r.returncode, r.stdout, r.stderr) == (0, b"read ArrayRef\n", b"")


# ---------------------------------------------------------------------------------------------
# 1-3: nesting and shared structure (hash bomb, repr bomb, C-stack overflow)
# ---------------------------------------------------------------------------------------------
def test_hash_bomb_dict_key_is_refused_quickly(tmp_path):
    data = b"\x80\x04}(C\xc8" + b"A" * 200 + b"\x94" + _levels(64) + b"tNs."
    assert len(data) == 979
    _refused(_f(tmp_path), data)


def test_shared_tuple_as_reduce_callable_is_refused_without_its_repr(tmp_path):
    _refused(_f(tmp_path), b"\x80\x04C\xc8" + b"A" * 200 + b"\x94" + _levels(40) + b")R.")


def test_error_messages_describe_values_in_bounded_form(tmp_path):
    # a flat (not deep) tuple of 60 long strings with terminal escapes, called: the message stays short
    evil = "\x1b[2J\rwrote 1 shard(s)\n" + "X" * 200
    data = b"\x80\x04(" + b"".join(_s(evil) for _ in range(60)) + b"t)R."
    msg = _refused(_f(tmp_path), data)
    assert "XXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXX" not in msg


def test_a_huge_shape_gives_a_short_message(tmp_path):
    # 60 dimensions of 2^63-1 (LONG1): the shape and its byte count would make a message of kilobytes
    dims = b"(" + (b"\x8a\x08" + b"\xff" * 7 + b"\x7f") * 60 + b"t"
    data = _array_pickle(b"C\x08" + bytes(8)).replace(b"(K\x01K\x02\x85", b"(K\x01" + dims)
    assert len(data) > 600
    _refused(_f(tmp_path), data)


def test_deeply_nested_tuple_is_refused_not_a_segfault(tmp_path):
    assert "nested" in _refused(_f(tmp_path), b"\x80\x04})" + b"\x85" * 1_000_000 + b"Ns.")


@pytest.mark.parametrize("data,why", [
    (b"\x80\x04)" + b"\x85" * 100 + b".", "nested"),                 # deep, no dict involved
    (b"\x80\x04N\x94" + _levels(30) + b".", "nested"),                 # memo-shared, no dict
    (b"\x80\x04}" + _s("k") + b"}s.", "dict inside a dict"),
    (b"\x80\x04(}t.", "dict inside a tuple"),
    (b"\x80\x04})K\x01s.", "not a string"),                          # a tuple as a dict key
], ids=["deep-tuple", "shared-tuple", "nested-dict", "dict-in-tuple", "tuple-key"])
def test_nesting_beyond_the_official_files_is_refused(tmp_path, data, why):
    assert why in _refused(_f(tmp_path), data)


# ---------------------------------------------------------------------------------------------
# 4: every length header is checked against the bytes left before anything is allocated
# ---------------------------------------------------------------------------------------------
_Q = struct.pack("<Q", (1 << 63) + 5)
_I = b"\xff\xff\xff\xff"


@pytest.mark.parametrize("data", [
    bytes.fromhex("800458ffffffff6162632e"),                       # the file
    b"\x80\x04X" + _I + b"abc.",                                   # BINUNICODE
    b"\x80\x04\x8c\xffabc.",                                       # SHORT_BINUNICODE
    b"\x80\x04\x8d" + _Q + b"abc.",                                # BINUNICODE8
    b"\x80\x04C\xffabc.",                                          # SHORT_BINBYTES
    b"\x80\x04B" + _I + b"abc.",                                   # BINBYTES
    b"\x80\x04\x8e" + _Q + b"abc.",                                # BINBYTES8
    b"\x80\x04\x96" + _Q + b"abc.",                                # BYTEARRAY8
    b"\x80\x04\x8a\xffabc.",                                       # LONG1
    b"\x80\x04\x8b" + _I + b"abc.",                                # LONG4
    b"\x80\x04T" + b"\xff\xff\xff\x7f" + b"abc.",                  # BINSTRING
    b"\x80\x04U\xffabc.",                                          # SHORT_BINSTRING
    b"\x80\x04\x95" + _Q + b"N.",                                  # FRAME
    b"\x80\x04X" + struct.pack("<I", 20 << 20) + b"a" * (20 << 20) + _s("b") + b"\x93.",  # present, but no name
], ids=["issue", "BINUNICODE", "SHORT_BINUNICODE", "BINUNICODE8", "SHORT_BINBYTES", "BINBYTES", "BINBYTES8",
        "BYTEARRAY8", "LONG1", "LONG4", "BINSTRING", "SHORT_BINSTRING", "FRAME", "20MB-string"])
def test_length_headers_are_checked_before_allocating(tmp_path, data):
    _refused(_f(tmp_path), data)


# ---------------------------------------------------------------------------------------------
# 5: amplification (bytes of RSS per file byte); 64 MiB files, refused at the first few KB
# ---------------------------------------------------------------------------------------------
_BIG = 64 << 20


@pytest.mark.parametrize("head,unit,why", [
    (b"", b"}", "stack"),                                 # EMPTY_DICT: the file
    (b"", b"(", "MARK"),
    (b"", b")", "stack"),                                 # EMPTY_TUPLE
    (b"N", b"\x94", "memo"),                              # MEMOIZE
    (b"N\x94", b"h\x00", "stack"),                        # BINGET of one object
    (b"", b"\x95" + bytes(8), "no STOP"),                 # empty FRAMEs: no object at all, only opcodes
    (b"", b"\x80\x04", "no STOP"),                        # PROTO over and over
    (b"", b"B" + struct.pack("<I", 60000) + b"z" * 60000, "bytes of strings"),   # many inline arrays' data
], ids=["EMPTY_DICT", "MARK", "EMPTY_TUPLE", "MEMOIZE", "BINGET", "FRAME", "PROTO", "BINBYTES"])
def test_memory_and_time_do_not_amplify(tmp_path, head, unit, why):
    data = b"\x80\x04" + head + unit * (_BIG // len(unit)) + b"."
    assert why in _refused(_f(tmp_path), data)


# ---------------------------------------------------------------------------------------------
# 6: only regular files are opened
# ---------------------------------------------------------------------------------------------
def test_fifo_is_refused_not_opened(tmp_path):
    f = _f(tmp_path)
    os.mkfifo(f)
    assert "FIFO" in _refused(f)


@pytest.mark.parametrize("kind", ["directory", "char-device", "dangling-symlink", "symlink-to-fifo"])
def test_non_regular_files_are_refused(tmp_path, kind):
    f = _f(tmp_path)
    if kind == "directory":
        f.mkdir()
    elif kind == "char-device":
        f.symlink_to("/dev/zero")
    elif kind == "dangling-symlink":
        f.symlink_to(tmp_path / "nowhere")
    else:
        os.mkfifo(tmp_path / "fifo")
        f.symlink_to(tmp_path / "fifo")
    _refused(f)


_SWAP_CHILD = r"""
import os, sys
from grok_torch.convert.convert import _copy_chunks
from grok_torch.convert.grok_pickle import CheckpointError, read_tensor_file
path = sys.argv[1]
ref = read_tensor_file(path)                      # read while it was a regular file ...
os.replace(path, path + ".real")
os.mkfifo(path)                                   # ... then swapped for a FIFO before the payload is copied
for step in ("ArrayRef.read", "convert"):
    try:
        ref.read() if step == "ArrayRef.read" else b"".join(_copy_chunks(ref, 1 << 20))
        print(step, "read a FIFO")
    except CheckpointError as e:
        print(step, e)
"""


def test_a_file_swapped_for_a_fifo_after_reading_is_refused(tmp_path):
    # the converter opens each file twice (describe, then copy the payload): both opens look first
    from grok_torch.convert.synthetic import write_checkpoint

    f = write_checkpoint(tmp_path / "src", "tiny") / "tensor00000_000"   # the embedding: 256 KiB left on disk
    try:
        r = subprocess.run([sys.executable, "-c", _SWAP_CHILD, str(f)], capture_output=True, text=True,
                           timeout=_TIMEOUT)
    except subprocess.TimeoutExpired:
        pytest.fail("the payload's second open blocked on a FIFO")
    lines = r.stdout.splitlines()
    assert r.returncode == 0 and len(lines) == 2, r.stdout + r.stderr[-2000:]
    assert all("FIFO" in line and str(f) in line for line in lines), lines


def test_symlink_to_a_regular_file_reads(tmp_path):
    real = tmp_path / "real"
    real.write_bytes(_array_pickle(b"C\x08" + bytes(range(8))))
    _f(tmp_path).symlink_to(real)
    r = _read_in_child(_f(tmp_path))
    assert (r.returncode, r.stdout, r.stderr) == (0, b"read ArrayRef\n", b"")


# ---------------------------------------------------------------------------------------------
# 7: names from the file are escaped and cut; the GLOBAL line read is bounded
# ---------------------------------------------------------------------------------------------
_FORGED = "\x1b]0;pwned\x07\x1b[2J\x1b[1A\rgrok-convert: wrote 1 shard(s)\u202e\x9b"


@pytest.mark.parametrize("data", [
    b"\x80\x04c" + _FORGED.encode() + b"\nsystem\n.",                           # GLOBAL
    b"\x80\x04c" + b"os\xff\x9b\x1b[31m\nsys\rtem\n.",                          # GLOBAL, invalid UTF-8
    b"\x80\x04" + _s("posix\nwrote 1 shard(s)\n" + _FORGED) + _s("x\ny") + b"\x93.",  # STACK_GLOBAL
    b"\x80\x04c" + b"A" * 10_000_000 + b"\nB\n.",                               # a 10 MB GLOBAL line
    b"\x80\x04c" + b"A" * 10_000_000 + b".",                                    # ... without an end of line
    b"\x80\x04" + _s("numpy") + _s("dtype") + b"\x93" + _s(_FORGED) + b"\x89\x88\x87R.",   # a dtype name
], ids=["GLOBAL-escapes", "GLOBAL-bad-utf8", "STACK_GLOBAL-newlines", "GLOBAL-10MB", "GLOBAL-no-eol", "dtype"])
def test_names_from_the_file_are_escaped_and_cut(tmp_path, data):
    msg = _refused(_f(tmp_path), data)
    assert "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA" not in msg


# ---------------------------------------------------------------------------------------------
# 8: array data is bytes
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("data_ops", [
    b"(" + b"M\x2c\x01" * 8 + b"t",                 # a tuple of ints out of byte range (ValueError escaped)
    b"(" + b"K\x07" * 8 + b"t",                     # a tuple of byte-sized ints (was accepted)
    _s("abcdefgh"),                                 # a str
    b"K\x08",                                       # an int
    b"N",                                           # None
], ids=["tuple-of-big-ints", "tuple-of-ints", "str", "int", "none"])
def test_array_data_must_be_bytes(tmp_path, data_ops):
    _refused(_f(tmp_path), _array_pickle(data_ops))


# ---------------------------------------------------------------------------------------------
# The whole converter: one line, non-zero exit, nothing written
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", ["escapes", "deep-tuple", "fifo"])
def test_converter_refuses_a_hostile_file_in_one_line(tmp_path, bad):
    from grok_torch.convert.synthetic import write_checkpoint
    ckpt = write_checkpoint(tmp_path / "src", "tiny", seed=1)
    f = ckpt / "tensor00005_000"
    f.unlink()
    if bad == "fifo":
        os.mkfifo(f)
    elif bad == "deep-tuple":
        f.write_bytes(b"\x80\x04})" + b"\x85" * 1_000_000 + b"Ns.")
    else:
        f.write_bytes(b"\x80\x04" + _s("posix\nwrote 1 shard(s)\n" + _FORGED) + _s("system") + b"\x93.")
    out = tmp_path / "out"
    try:
        r = subprocess.run([sys.executable, "-m", "grok_torch.convert", str(tmp_path / "src"), str(out), "--quiet"],
                           capture_output=True, timeout=300)
    except subprocess.TimeoutExpired:
        pytest.fail("grok-convert hung on a hostile tensor file")
    assert r.returncode == 1 and r.stdout == b"", (r.returncode, r.stdout[-500:], r.stderr[-2000:])
    err = r.stderr.decode("ascii", errors="backslashreplace")
    assert err.count("\n") == 1 and "Traceback" not in err, err[-2000:]
    assert err.startswith(f"grok-convert: error: {f}: "), err
    assert err[:-1].isascii() and err[:-1].isprintable(), err
    assert not out.exists() or not any(out.iterdir()), sorted(p.name for p in out.iterdir())


# ---------------------------------------------------------------------------------------------
# Fuzz: random mutations of the fixture's real files
# ---------------------------------------------------------------------------------------------
_FUZZ_SEED = int(os.environ.get("GROK_FUZZ_SEED", "20240317"))
_FUZZ_N = int(os.environ.get("GROK_FUZZ_N", "3000"))

# Runs in one child under the address-space limit: mutates, reads, and checks every outcome. Prints
# "ok N read R" or the first failure with what reproduces it (seed, iteration, mutations) and exits 1.
_FUZZ_CHILD = f"""
import os, pickletools, random, resource, struct, sys, time
resource.setrlimit(resource.RLIMIT_AS, ({_LIMIT_AS}, {_LIMIT_AS}))
from grok_torch.convert.grok_pickle import ArrayRef, CheckpointError, QuantizedRef, read_tensor_file

src, work, seed, n = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
files = sorted(os.listdir(src))
originals = {{}}
for name in files:
    data = open(os.path.join(src, name), "rb").read()
    # where each opcode's argument starts, from the stdlib's disassembler of the valid original
    args = [pos + 1 for op, arg, pos in pickletools.genops(data) if op.arg is not None]
    originals[name] = (data, args)

def mutate(rng, data, args):
    data = bytearray(data)
    steps = []
    for _ in range(rng.choice((1, 1, 1, 2, 3))):
        kind = rng.choice(("flip", "byte", "truncate", "insert", "delete", "duplicate", "length", "length"))
        # most structure sits in the first few hundred bytes and the last few: aim there mostly
        if rng.random() < 0.8:
            i = rng.choice((rng.randrange(min(len(data), 400) or 1), max(0, len(data) - 1 - rng.randrange(64))))
        else:
            i = rng.randrange(len(data) or 1)
        i = min(i, max(0, len(data) - 1))
        if kind == "flip" and data:
            data[i] ^= 1 << rng.randrange(8)
        elif kind == "byte" and data:
            data[i] = rng.randrange(256)
        elif kind == "truncate":
            del data[i:]
        elif kind == "insert":
            data[i:i] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 16)))
        elif kind == "delete":
            del data[i:i + rng.randint(1, 32)]
        elif kind == "duplicate":
            span = data[i:i + rng.randint(1, 256)]
            j = rng.randrange(len(data) + 1)
            data[j:j] = span * rng.randint(1, 4)
        elif kind == "length" and args:
            a = rng.choice(args)
            width = rng.choice((1, 2, 4, 8))
            value = rng.choice((0, 1, 255, 65535, 2 ** 31 - 1, 2 ** 32 - 1, 2 ** 63, 2 ** 64 - 1,
                                rng.randrange(2 ** (8 * width))))
            if a < len(data):
                data[a:a + width] = (value % 2 ** (8 * width)).to_bytes(width, "little")
            i = a
        steps.append((kind, i))
    return bytes(data), steps

def check(ref, size):
    arrays = [ref] if isinstance(ref, ArrayRef) else [ref.weight, ref.scales]
    for a in arrays:
        assert a.nbytes >= 0, a
        if a.offset < 0:
            assert len(a.data) == a.nbytes, (len(a.data), a.nbytes)
        else:
            assert a.offset + a.nbytes <= size, ("payload past the end", a.offset, a.nbytes, size)

rng = random.Random(seed)
path = os.path.join(work, "tensor00000_000")
counts = {{"read": 0, "refused": 0}}
slowest = 0.0
for it in range(n):
    name = rng.choice(files)
    data, steps = mutate(rng, *originals[name])
    with open(path, "wb") as f:
        f.write(data)
    t = time.perf_counter()
    try:
        try:
            check(read_tensor_file(path), len(data))
            counts["read"] += 1
        except CheckpointError as e:
            msg = str(e)
            assert msg.startswith(path + ": ") and "\\n" not in msg, ("message", msg[:300])
            assert msg.isascii() and msg.isprintable() and len(msg) < 1000, ("message", msg[:300])
            counts["refused"] += 1
        dt = time.perf_counter() - t
        slowest = max(slowest, dt)
        assert dt < 2.0, ("slow", dt)
    except BaseException as e:
        keep = os.path.join(work, "failing_" + name)
        os.replace(path, keep)
        print(f"FAIL seed={{seed}} iteration={{it}} file={{name}} steps={{steps}} kept={{keep}}: "
              f"{{type(e).__name__}}: {{str(e)[:500]}}")
        sys.exit(1)
print("ok", n, counts, round(slowest, 4))
"""


def test_fuzzed_fixture_files_read_or_are_refused(tmp_path):
    src = require(TINY_REF / "ckpt-0", "tiny_ref fixture")
    try:
        r = subprocess.run([sys.executable, "-c", _FUZZ_CHILD, str(src), str(tmp_path), str(_FUZZ_SEED),
                            str(_FUZZ_N)], capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired:
        pytest.fail(f"fuzzing (seed {_FUZZ_SEED}, {_FUZZ_N} mutations) did not finish within 120 s")
    assert r.returncode == 0, (r.stdout[-2000:] + r.stderr[-3000:])
    assert r.stdout.startswith(f"ok {_FUZZ_N} "), r.stdout


def test_every_fixture_file_reads_within_the_limits(tmp_path):
    # the caps (opcodes, stack, memo, nesting, string sizes) leave the official files readable
    src = require(TINY_REF / "ckpt-0", "tiny_ref fixture")
    from grok_torch.convert.grok_pickle import read_tensor_file
    for p in sorted(src.iterdir()):
        read_tensor_file(p)
