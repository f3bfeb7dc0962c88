"""grok-convert against the official tiny checkpoint (../shared/grok1/tiny_ref) and crafted bad input.

Covers: bit-exactness per dtype (sha256 of the official dequantization, exact fp32 products,
byte-for-byte int8), the lexicographic file order, the allow-listed unpickler, missing / truncated /
mis-shaped files, resume after a kill, refusing a non-empty OUT, disk space, verify, config
detection, bounded memory and the CLI.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import pickle
import pickletools
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from grok_torch.config import GrokConfig
from grok_torch.convert import (CheckpointError, ConvertError, UnsafePickleError, convert_checkpoint,
                                read_tensor_file, verify_conversion)
from grok_torch.convert import convert as convert_mod
from grok_torch.convert.synthetic import write_checkpoint
from grok_torch.convert.weight_map import layer_order, param_order

from conftest import require

TINY = Path(__file__).resolve().parents[2] / "shared" / "grok1" / "tiny_ref"


def _need_tiny():
    if not (TINY / "ckpt-0").is_dir():
        if os.environ.get("CI"):
            pytest.fail(f"the reference fixture {TINY} is missing on CI")
        pytest.skip(f"reference fixture {TINY} not present (it ships in ../shared of the development checkout)")


@pytest.fixture(scope="module")
def tiny_json():
    _need_tiny()
    return json.loads((TINY / "tiny_reference.json").read_text())


@pytest.fixture(scope="module")
def converted_all(tmp_path_factory):
    """The fixture converted once per dtype, with small shards so several are written."""
    _need_tiny()
    root = tmp_path_factory.mktemp("converted")
    return {d: convert_checkpoint(TINY, root / d, dtype=d, shard_size="1MB", quiet=True).out
            for d in ("int8", "bf16", "fp32")}


def _load(out: Path, name: str) -> torch.Tensor:
    shard = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"][name]
    with safe_open(str(out / shard), "pt") as f:
        return f.get_tensor(name)


def _sha(t: torch.Tensor) -> str:
    return hashlib.sha256(t.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()


def _payloads(path: Path):
    """The raw array payloads of an official pickle, found with pickletools (independent of our reader)."""
    return [arg for op, arg, _ in pickletools.genops(path.read_bytes())
            if op.name in ("BINBYTES", "BINBYTES8", "SHORT_BINBYTES") and len(arg) > 1]


# ---------------------------------------------------------------------------------------------
# Bit-exact output
# ---------------------------------------------------------------------------------------------
def test_bf16_matches_official_dequantization_sha256(converted_all, tiny_json):
    specs = param_order(GrokConfig.from_name("tiny"))
    for spec, ref in zip(specs, tiny_json["checkpoint"]["tensors"]):
        assert spec.path == ref["path"] and spec.index == ref["index"]
        t = _load(converted_all["bf16"], f"{spec.torch_name}.weight")
        if spec.quantized:
            assert t.dtype == torch.bfloat16
            assert _sha(t) == ref["dequant_bf16_sha256"], spec.path
        else:
            assert t.dtype == torch.float32
            assert _sha(t) == ref["sha256"], spec.path


def test_fp32_is_the_exact_product_per_k_group(converted_all):
    for spec in param_order(GrokConfig.from_name("tiny")):
        if not spec.quantized:
            continue
        w = _load(converted_all["int8"], f"{spec.torch_name}.weight")
        s = _load(converted_all["int8"], f"{spec.torch_name}.scales")
        got = _load(converted_all["fp32"], f"{spec.torch_name}.weight")
        *lead, K, N = w.shape
        G = s.shape[-2]
        expect = (w.float().reshape(*lead, G, K // G, N) * s.float().unsqueeze(-2)).reshape(w.shape)
        assert got.dtype == torch.float32 and torch.equal(got, expect), spec.path
        if G > 1:   # a converter using only scales[0] (or broadcasting [G, N]) would differ here
            assert not torch.equal(got, w.float() * s[..., :1, :].float()), spec.path


def test_int8_is_byte_for_byte_as_released(converted_all):
    for spec in param_order(GrokConfig.from_name("tiny")):
        payloads = _payloads(TINY / "ckpt-0" / spec.file)
        if spec.quantized:
            w = _load(converted_all["int8"], f"{spec.torch_name}.weight")
            s = _load(converted_all["int8"], f"{spec.torch_name}.scales")
            assert (w.dtype, tuple(w.shape), s.dtype, tuple(s.shape)) == (
                torch.int8, spec.shape, torch.bfloat16, spec.scales_shape)
            assert w.view(torch.uint8).numpy().tobytes() == payloads[0], spec.path
            assert s.view(torch.uint8).numpy().tobytes() == payloads[1], spec.path
        else:
            t = _load(converted_all["int8"], f"{spec.torch_name}.weight")
            assert t.numpy().tobytes() == payloads[0], spec.path


def test_output_files_config_and_index(converted_all):
    out = converted_all["int8"]
    cfg = GrokConfig.from_json(out / "config.json")
    assert cfg.same_architecture(GrokConfig.from_name("tiny")) and cfg.weight_format == "int8"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted({f for f in index["weight_map"].values()})
    assert len(shards) > 1 and all(f.endswith(f"-of-{len(shards):05d}.safetensors") for f in shards)
    total = 0
    for f in shards:
        with safe_open(str(out / f), "pt") as h:
            total += sum(h.get_tensor(k).numel() * h.get_tensor(k).element_size() for k in h.keys())
    assert index["metadata"]["total_size"] == total
    assert len(index["weight_map"]) == 2 + 12 * (7 * 2 + 5)     # 7 quantized (+scales), 5 plain per layer
    assert not list(out.glob("*.partial")) and not (out / ".grok-convert-state.json").exists()
    record = json.loads((out / "grok_convert.json").read_text())
    assert [s["file"] for s in record["shards"]] == shards and len(record["source"]["files"]) == 146


def test_layer_order_is_lexicographic():
    assert layer_order(12) == [0, 1, 10, 11, 2, 3, 4, 5, 6, 7, 8, 9]
    specs = param_order(GrokConfig.from_name("grok-1"))
    assert specs[14].path == "transformer/decoder_layer_1/moe/linear/w"
    assert specs[26].path == "transformer/decoder_layer_10/moe/linear/w"
    assert specs[158].path == "transformer/decoder_layer_20/moe/linear/w"
    assert specs[769].path == "transformer/decoder_layer_9/router/w"


# ---------------------------------------------------------------------------------------------
# Safety
# ---------------------------------------------------------------------------------------------
class _Evil:
    def __init__(self, fn, arg):
        self.fn, self.arg = fn, arg

    def __reduce__(self):
        return self.fn, (self.arg,)


@pytest.mark.parametrize("make", [
    lambda marker: _Evil(os.system, f"touch {marker}"),
    lambda marker: _Evil(eval, f"open({str(marker)!r}, 'w')"),
    lambda marker: _Evil(subprocess.call, ["touch", str(marker)]),
], ids=["os.system", "builtins.eval", "subprocess"])
def test_malicious_pickle_is_refused_without_running(tmp_path, make):
    marker = tmp_path / "pwned"
    bad = tmp_path / "tensor00000_000"
    bad.write_bytes(pickle.dumps(make(marker), protocol=4))
    with pytest.raises(UnsafePickleError) as e:
        read_tensor_file(bad)
    assert str(bad) in str(e.value) and "refusing" in str(e.value)
    assert not marker.exists()


def test_malicious_file_inside_a_checkpoint_stops_the_conversion(tmp_path):
    src = tmp_path / "src"
    ckpt = write_checkpoint(src, "tiny", seed=1)
    marker = tmp_path / "pwned"
    (ckpt / "tensor00007_000").write_bytes(pickle.dumps(_Evil(os.system, f"touch {marker}"), protocol=4))
    with pytest.raises(UnsafePickleError, match="posix.system|os.system|nt.system"):
        convert_checkpoint(src, tmp_path / "out", quiet=True)
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_no_jax_and_no_unrestricted_pickle_in_the_package():
    root = Path(__file__).resolve().parents[1]
    for sub in ("convert", "grok_torch", "kernels"):
        for py in (root / sub).rglob("*.py"):
            text = py.read_text()
            assert "import jax" not in text and "from jax" not in text, py
            assert "pickle.load(" not in text and "pickle.loads(" not in text, py


# ---------------------------------------------------------------------------------------------
# Bad input: nothing half-written
# ---------------------------------------------------------------------------------------------
def _assert_no_output(out: Path):
    assert not (out / "model.safetensors.index.json").exists()
    assert not list(out.glob("model-*.safetensors")) if out.exists() else True


@pytest.fixture
def synth(tmp_path):
    src = tmp_path / "src"
    write_checkpoint(src, "tiny", seed=3)
    return src


def test_missing_files_are_listed_in_one_error(synth, tmp_path):
    (synth / "ckpt-0" / "tensor00026_000").unlink()
    (synth / "ckpt-0" / "tensor00100_000").unlink()
    with pytest.raises(ConvertError) as e:
        convert_checkpoint(synth, tmp_path / "out", config="tiny", quiet=True)
    msg = str(e.value)
    assert "2 of 146" in msg
    assert "tensor00026_000  transformer/decoder_layer_10/moe/linear/w" in msg
    assert "tensor00100_000" in msg and "decoder_layer_" in msg
    _assert_no_output(tmp_path / "out")


def test_truncated_pickle_names_file_and_parameter(synth, tmp_path):
    f = synth / "ckpt-0" / "tensor00015_000"
    f.write_bytes(f.read_bytes()[:5000])
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "-m", "grok_torch.convert", str(synth), str(out), "--quiet"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode != 0
    assert "tensor00015_000" in r.stderr and "truncated" in r.stderr
    assert "transformer/decoder_layer_1/moe/linear_1/w" in r.stderr
    _assert_no_output(out)


def test_corrupt_pickle_is_an_error(synth, tmp_path):
    f = synth / "ckpt-0" / "tensor00009_000"
    data = bytearray(f.read_bytes())
    data[2] = 0xFF                                   # not an opcode
    f.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="tensor00009_000.*opcode"):
        convert_checkpoint(synth, tmp_path / "out", config="tiny", quiet=True)
    _assert_no_output(tmp_path / "out")


def test_wrong_shape_or_dtype_names_expected_and_found(synth, tmp_path):
    from grok_torch.convert.synthetic import _Random, write_tensor_file
    specs = param_order(GrokConfig.from_name("tiny"))
    wrong = specs[5]                                  # layer 0 attention key, int8 (128, 64)
    bad = type(wrong)(wrong.index, wrong.path, wrong.torch_name, (128, 72), 1)
    write_tensor_file(synth / "ckpt-0" / wrong.file, bad, _Random(0, False))
    with pytest.raises(ConvertError) as e:
        convert_checkpoint(synth, tmp_path / "out", config="tiny", quiet=True)
    msg = str(e.value)
    assert wrong.file in msg and wrong.path in msg and "[128, 64]" in msg and "[128, 72]" in msg
    plain = specs[9]                                  # an RMSNorm scale written as int8
    write_tensor_file(synth / "ckpt-0" / wrong.file, wrong, _Random(0, False))
    write_tensor_file(synth / "ckpt-0" / plain.file, specs[5], _Random(0, False))
    with pytest.raises(ConvertError, match=f"{plain.file}.*expected a float32 array"):
        convert_checkpoint(synth, tmp_path / "out", config="tiny", quiet=True)
    _assert_no_output(tmp_path / "out")


def test_config_detection_and_json_config(synth, tmp_path):
    (synth / "config.json").unlink()                  # as released: no config beside ckpt-0, detected
    res = convert_checkpoint(synth, tmp_path / "a", quiet=True)
    assert res.config.name == "tiny"
    other = GrokConfig.from_name("tiny", num_kv_heads=4).replace(name="mine")
    (tmp_path / "mine.json").write_text(other.to_json())
    src2 = tmp_path / "src2"
    write_checkpoint(src2, other)
    (src2 / "config.json").unlink()
    with pytest.raises(ConvertError, match="matches no named config.*--config"):
        convert_checkpoint(src2, tmp_path / "b", quiet=True)
    res = convert_checkpoint(src2 / "ckpt-0", tmp_path / "b", config=str(tmp_path / "mine.json"), quiet=True)
    assert GrokConfig.from_json(tmp_path / "b").num_kv_heads == 4


# ---------------------------------------------------------------------------------------------
# Resume, overwrite, disk space, verify
# ---------------------------------------------------------------------------------------------
def _default_sigint():
    # a child of a background job (pytest &) inherits SIGINT as ignored, and Python then installs no
    # KeyboardInterrupt handler: the interrupt tests need the disposition of an interactive terminal
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _cli(*args, env=None, timeout=300):
    return subprocess.run([sys.executable, "-m", "grok_torch.convert", *map(str, args)],
                          capture_output=True, text=True, env={**os.environ, **(env or {})},
                          preexec_fn=_default_sigint, timeout=timeout)


def _tree_bytes(d: Path):
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


@pytest.mark.parametrize("dtype", ["int8", "bf16"])
def test_killed_run_resumes_to_identical_output(synth, tmp_path, dtype):
    ref, out = tmp_path / "ref", tmp_path / "out"
    args = ["--dtype", dtype, "--shard-size", "1MB", "--workers", "2", "--chunk-size", "64KiB", "--quiet"]
    assert _cli(synth, ref, *args).returncode == 0
    killed = _cli(synth, out, *args, env={"GROK_CONVERT_FAULT_AFTER_BYTES": "3500000"})
    assert killed.returncode == -9                                 # SIGKILL mid-shard
    assert not (out / "model.safetensors.index.json").exists()
    assert list(out.glob("*.partial")), "the kill should have left a partial shard behind"
    refused = _cli(synth, out, *args)
    assert refused.returncode != 0 and "--resume" in refused.stderr
    resumed = _cli(synth, out, *args, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert _tree_bytes(out) == _tree_bytes(ref)


def test_non_empty_out_needs_overwrite(synth, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(ConvertError, match="not empty"):
        convert_checkpoint(synth, out, quiet=True)
    convert_checkpoint(synth, out, quiet=True, overwrite=True)
    assert (out / "notes.txt").read_text() == "mine"              # only our own files are replaced
    with pytest.raises(ConvertError, match="already holds a finished conversion"):
        convert_checkpoint(synth, out, quiet=True, resume=True)


def test_not_enough_disk_space_is_known_before_writing(synth, tmp_path, monkeypatch):
    monkeypatch.setattr(convert_mod, "_free_bytes", lambda p: 1000)
    with pytest.raises(ConvertError, match="not enough disk space.*needs"):
        convert_checkpoint(synth, tmp_path / "out", quiet=True)
    _assert_no_output(tmp_path / "out")


def test_disk_full_while_writing_is_a_clean_error(synth, tmp_path, monkeypatch):
    real = convert_mod.tensor_chunks
    calls = {"n": 0}

    def failing(*a, **k):
        calls["n"] += 1
        if calls["n"] == 40:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(*a, **k)

    monkeypatch.setattr(convert_mod, "tensor_chunks", failing)
    out = tmp_path / "out"
    with pytest.raises(ConvertError, match="disk full.*--resume"):
        convert_checkpoint(synth, out, quiet=True, shard_size="1MB", workers=1)
    assert not list(out.glob("*.partial"))
    _assert_no_output_index = not (out / "model.safetensors.index.json").exists()
    assert _assert_no_output_index
    monkeypatch.setattr(convert_mod, "tensor_chunks", real)
    convert_checkpoint(synth, out, quiet=True, shard_size="1MB", workers=1, resume=True)
    assert verify_conversion(out, synth, quiet=True) == []


def test_verify_detects_a_flipped_byte_in_any_shard(synth, tmp_path):
    out = tmp_path / "out"
    convert_checkpoint(synth, out, shard_size="1MB", quiet=True)
    assert verify_conversion(out, synth, quiet=True) == []
    shards = sorted(out.glob("model-*.safetensors"))
    assert len(shards) > 2
    for shard in shards:
        original = shard.read_bytes()
        flipped = bytearray(original)
        flipped[len(flipped) // 2] ^= 0x01
        shard.write_bytes(bytes(flipped))
        problems = verify_conversion(out, quiet=True)
        assert len(problems) == 1 and shard.name in problems[0] and "sha256" in problems[0]
        shard.write_bytes(original)
    r = _cli("verify", out)
    assert r.returncode == 0, r.stderr
    shards[0].write_bytes(b"\0" + shards[0].read_bytes()[1:])
    r = _cli("verify", out)
    assert r.returncode == 1 and shards[0].name in r.stderr


def test_verify_with_source_rederives_every_tensor(synth, tmp_path):
    out = tmp_path / "out"
    convert_checkpoint(synth, out, dtype="bf16", shard_size="1MB", quiet=True)
    # change the source under an unchanged record: only the re-derivation can notice
    f = synth / "ckpt-0" / "tensor00002_000"
    data = bytearray(f.read_bytes())
    data[-100] ^= 0x01
    f.write_bytes(bytes(data))
    problems = verify_conversion(out, synth, quiet=True)
    assert any("differs from its conversion" in p and "tensor00002_000" in p for p in problems)


# ---------------------------------------------------------------------------------------------
# Bounded memory and CLI
# ---------------------------------------------------------------------------------------------
_RSS_CHILD = r"""
import resource, sys
from grok_torch.convert import convert_checkpoint
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
convert_checkpoint(sys.argv[1], sys.argv[2], dtype=sys.argv[3], config=sys.argv[4], workers=1,
                   chunk_size="4MiB", quiet=True)
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)
"""


@pytest.mark.parametrize("dtype", ["bf16", "int8"])
def test_memory_does_not_grow_with_tensor_size(tmp_path, dtype):
    # one layer with 64 MiB int8 expert tensors (128 MiB bf16 out, 256 MiB as fp32 temporaries)
    cfg = GrokConfig(name="wide", vocab_size=256, d_model=1024, num_layers=1, num_q_heads=8, num_kv_heads=8,
                     head_dim=128, ffn_size=8192, max_seq_len=64)
    (tmp_path / "wide.json").write_text(cfg.to_json())
    write_checkpoint(tmp_path / "src", cfg, repeat=True)
    r = subprocess.run([sys.executable, "-c", _RSS_CHILD, str(tmp_path / "src"), str(tmp_path / "out"), dtype,
                        str(tmp_path / "wide.json")], capture_output=True, text=True, check=True, timeout=300)
    grew_kib = int(r.stdout.strip().splitlines()[-1])
    assert grew_kib < 48 * 1024, f"peak RSS grew by {grew_kib / 1024:.0f} MiB converting 64 MiB tensors"


def test_cli_help_reads_well():
    for args in (["--help"], ["verify", "--help"]):
        r = _cli(*args)
        assert r.returncode == 0
        assert "usage: grok-convert" in r.stdout
    r = _cli("--help")
    for flag in ("--dtype", "--config", "--shard-size", "--workers", "--tokenizer", "--resume", "--quiet",
                 "--overwrite", "examples:"):
        assert flag in r.stdout
    r = _cli("/nonexistent/src", "/tmp/x")
    assert r.returncode == 1 and "does not exist" in r.stderr and "Traceback" not in r.stderr


def test_tokenizer_is_copied_when_it_matches(synth, tmp_path):
    tok = require(TINY.parent / "tokenizer.model", "the real Grok-1 tokenizer.model")
    with pytest.raises(ConvertError, match="131072 pieces.*vocab_size is 512"):
        convert_checkpoint(synth, tmp_path / "a", tokenizer=str(tok), quiet=True)
    _assert_no_output(tmp_path / "a")


def test_tokenizer_found_next_to_src_is_copied(tmp_path):
    tok = require(TINY.parent / "tokenizer.model", "the real Grok-1 tokenizer.model")
    cfg = GrokConfig.from_name("tiny", vocab_size=131072, num_layers=1).replace(name="tiny-bigvocab")
    write_checkpoint(tmp_path / "release" / "checkpoints", cfg)
    shutil.copyfile(tok, tmp_path / "release" / "tokenizer.model")      # the release's layout
    (tmp_path / "c.json").write_text(cfg.to_json())
    convert_checkpoint(tmp_path / "release" / "checkpoints", tmp_path / "out", config=str(tmp_path / "c.json"),
                       quiet=True)
    assert (tmp_path / "out" / "tokenizer.model").read_bytes() == tok.read_bytes()


def test_plain_dtype_bf16_rounds_only_the_plain_tensors(synth, tmp_path):
    a = convert_checkpoint(synth, tmp_path / "a", quiet=True).out
    b = convert_checkpoint(synth, tmp_path / "b", quiet=True, plain_dtype="bf16").out
    for name in ("embed.weight", "norm.weight", "layers.10.moe.router.weight"):
        assert torch.equal(_load(b, name), _load(a, name).to(torch.bfloat16)), name
    assert torch.equal(_load(b, "layers.3.moe.w2.weight"), _load(a, "layers.3.moe.w2.weight"))


def test_ctrl_c_stops_promptly_and_resumes(synth, tmp_path):
    out = tmp_path / "out"
    args = ["--shard-size", "1MB", "--workers", "2", "--chunk-size", "64KiB", "--quiet"]
    r = _cli(synth, out, *args, env={"GROK_CONVERT_FAULT_AFTER_BYTES": "3500000", "GROK_CONVERT_FAULT_SIGNAL": "INT"})
    assert r.returncode == 130 and "--resume" in r.stderr and "Traceback" not in r.stderr
    assert not list(out.glob("*.partial")) and not (out / "model.safetensors.index.json").exists()
    kept = sorted(out.glob("model-*.safetensors"))
    assert kept, "shards finished before the interrupt are kept"
    total = int(kept[0].name.split("-of-")[1][:5])
    assert len(kept) <= total - 3, f"{len(kept)} of {total} shards written: the interrupt did not stop the queue"
    assert _cli(synth, out, *args, "--resume").returncode == 0
    assert verify_conversion(out, synth, quiet=True) == []


def test_auto_detection_reports_missing_and_truncated_files_fully(synth, tmp_path):
    (synth / "ckpt-0" / "tensor00145_000").unlink()           # the last file: the count no longer fits
    (synth / "ckpt-0" / "tensor00004_000").unlink()           # a file the detection reads
    with pytest.raises(ConvertError) as e:
        convert_checkpoint(synth, tmp_path / "out", quiet=True)
    assert "2 of 146" in str(e.value) and "tensor00145_000" in str(e.value) and "tensor00004_000" in str(e.value)
    f = synth / "ckpt-0" / "tensor00003_000"
    f.write_bytes(f.read_bytes()[:3000])
    with pytest.raises(CheckpointError, match=r"tensor00003_000.*truncated.*decoder_layer_0/moe/linear_1/w"):
        convert_checkpoint(synth, tmp_path / "out", quiet=True)
    _assert_no_output(tmp_path / "out")


@pytest.mark.parametrize("data", [
    b"\x80\x04q\x00.",                                    # BINPUT with nothing on the stack
    b"\x80\x04\x8c\x02\xff\xfe.",                        # invalid UTF-8 in a string
    b"\x80\x04}(}K\x01u.",                                 # a dict used as a dict key
    b"\x80\x04\x8c\x15numpy.core.multiarray\x8c\x0c_reconstruct\x93\x8c\x05numpy\x8c\x07ndarray\x93"
    b"K\x00\x85C\x01b\x87R(K\x01K\x02\x85\x8c\x05numpy\x8c\x05dtype\x93\x8c\x02f4\x89\x88\x87R"
    b"\x89K\x07tb.",                                         # array data that is an int, not bytes
], ids=["binput-empty", "bad-utf8", "unhashable-key", "int-data"])
def test_malformed_pickles_are_checkpoint_errors(tmp_path, data):
    f = tmp_path / "tensor00000_000"
    f.write_bytes(data)
    with pytest.raises(CheckpointError, match="tensor00000_000.*corrupt"):
        read_tensor_file(f)


def test_out_must_not_contain_the_source(tmp_path):
    src = tmp_path / "release"
    write_checkpoint(src, "tiny")
    (src / "tokenizer.model").write_bytes(b"the user's file")
    for out in (src, src / "ckpt-0", tmp_path):
        with pytest.raises(ConvertError, match="contains the source checkpoint"):
            convert_checkpoint(src, out, overwrite=True, quiet=True)
    assert (src / "tokenizer.model").read_bytes() == b"the user's file"


def test_chunk_size_must_be_reasonable(synth, tmp_path):
    with pytest.raises(ConvertError, match="--chunk-size must be at least 64KiB"):
        convert_checkpoint(synth, tmp_path / "out", chunk_size=2, quiet=True)


def test_overwrite_removes_stale_partials(synth, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    for name in ("grok_convert.json.partial", ".grok-convert-state.json.partial", "model-00001-of-00003.safetensors.partial"):
        (out / name).write_text("stale")
    convert_checkpoint(synth, out, overwrite=True, quiet=True)
    assert not list(out.glob("*.partial")) and not list(out.glob(".*.partial"))


def test_verify_checks_that_the_output_loads(synth, tmp_path):
    out = tmp_path / "out"
    convert_checkpoint(synth, out, shard_size="1MB", quiet=True)
    index_path = out / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    good_index, good_cfg = index_path.read_text(), (out / "config.json").read_text()

    del index["weight_map"]["layers.0.attn.wq.scales"]
    index_path.write_text(json.dumps(index))
    problems = verify_conversion(out, quiet=True)
    assert any("missing: layers.0.attn.wq.scales" in p for p in problems), problems

    index_path.write_text("[]")
    assert any("malformed" in p for p in verify_conversion(out, quiet=True))
    index_path.write_text(good_index)

    (out / "config.json").write_text(good_cfg.replace('"num_kv_heads": 8', '"num_kv_heads": 4'))
    assert any("config.json differs" in p for p in verify_conversion(out, quiet=True))
    (out / "config.json").unlink()
    assert "config.json is missing" in verify_conversion(out, quiet=True)
    (out / "config.json").write_text(good_cfg)
    assert verify_conversion(out, synth, quiet=True) == []


def test_verify_reports_a_garbage_header_by_shard(synth, tmp_path):
    out = tmp_path / "out"
    convert_checkpoint(synth, out, shard_size="1MB", quiet=True)
    shard = sorted(out.glob("model-*.safetensors"))[1]
    data = bytearray(shard.read_bytes())
    data[8:12] = b"\xff\xfe\xfd\xfc"
    shard.write_bytes(bytes(data))
    problems = verify_conversion(out, synth, quiet=True)
    assert any(shard.name in p and "sha256" in p for p in problems)
    assert any(shard.name in p and "header" in p for p in problems)
    r = _cli("verify", out, "--src", synth)
    assert r.returncode == 1 and "Traceback" not in r.stderr


def test_resume_refuses_a_replaced_source(synth, tmp_path):
    out = tmp_path / "out"
    args = ["--shard-size", "1MB", "--workers", "1", "--quiet"]
    assert _cli(synth, out, *args, env={"GROK_CONVERT_FAULT_AFTER_BYTES": "3500000"}).returncode == -9
    f = synth / "ckpt-0" / "tensor00100_000"
    f.write_bytes(f.read_bytes())                   # same size, rewritten since the interrupted run
    os.utime(f, ns=(f.stat().st_atime_ns, f.stat().st_mtime_ns + 10**9))
    r = _cli(synth, out, *args, "--resume")
    assert r.returncode == 1 and "changed since" in r.stderr
