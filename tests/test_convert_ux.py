"""What a newcomer hits with the converter's command lines (issue #11, issue #12 point 9).

The synthetic checkpoint writer (refuses to overwrite, one-line errors, writes the config that
grok-convert reads), grok-convert's flag checks, one-line config mismatches, detection that names
the bad file, nothing left behind by a failed run, verify's summary, and Ctrl-C handling.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import signal
import sys
from pathlib import Path

import pytest

from grok_torch.config import GrokConfig
from grok_torch.convert import ConvertError, convert_checkpoint, verify_conversion
from grok_torch.convert import cli
from grok_torch.convert import convert as convert_mod
from grok_torch.convert import synthetic
from grok_torch.convert.synthetic import _Random, write_checkpoint, write_tensor_file
from grok_torch.convert.weight_map import param_order

from test_convert import _cli

ONE_LAYER = GrokConfig.from_name("tiny", num_layers=1)          # 14 files: quick to write and convert


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def _one_line(err: str) -> None:
    assert err.count("\n") == 1 and "Traceback" not in err, err


@pytest.fixture
def synth(tmp_path):
    """The tiny config as released: ckpt-0 only, no config.json beside it (detected from the shapes)."""
    src = tmp_path / "src"
    write_checkpoint(src, "tiny", seed=3)
    (src / "config.json").unlink(missing_ok=True)
    return src


# ---------------------------------------------------------------------------------------------
# python -m grok_torch.convert.synthetic
# ---------------------------------------------------------------------------------------------
def test_synthetic_refuses_a_non_empty_dst_unless_overwrite(tmp_path, capsys):
    dst = tmp_path / "dst"
    assert synthetic.main([str(dst), "--config", "tiny", "--layers", "1"]) == 0
    first = dst / "ckpt-0" / "tensor00000_000"
    before = _sha(first)
    capsys.readouterr()
    assert synthetic.main([str(dst), "--config", "tiny", "--layers", "1", "--seed", "5"]) == 1
    err = capsys.readouterr().err
    _one_line(err)
    assert str(dst) in err and "not empty" in err and "--overwrite" in err
    assert _sha(first) == before
    with pytest.raises(FileExistsError, match="--overwrite"):
        write_checkpoint(dst, ONE_LAYER, seed=5)
    assert _sha(first) == before
    (dst / "notes.txt").write_text("mine")
    assert synthetic.main([str(dst), "--config", "tiny", "--layers", "1", "--seed", "5", "--overwrite"]) == 0
    assert _sha(first) != before and (dst / "notes.txt").read_text() == "mine"


def test_synthetic_overwrite_with_fewer_layers_leaves_no_stale_files(tmp_path):
    dst = tmp_path / "dst"
    write_checkpoint(dst, GrokConfig.from_name("tiny", num_layers=2))
    write_checkpoint(dst, ONE_LAYER, overwrite=True)
    assert len(list((dst / "ckpt-0").iterdir())) == 14
    assert convert_checkpoint(dst, tmp_path / "out", quiet=True).config.num_layers == 1


@pytest.mark.parametrize("args, names", [
    (["--config", "grok-2"], "'grok-2'"),
    (["--layers", "0"], "--layers"),
    (["--layers", "-2"], "--layers"),
    ("file", "is a file"),
], ids=["unknown-config", "layers-0", "layers-negative", "dst-is-a-file"])
def test_synthetic_errors_are_one_line(tmp_path, capsys, args, names):
    dst = tmp_path / "dst"
    if args == "file":
        dst.write_text("a file")
        args = []
    assert synthetic.main([str(dst), *args]) == 1
    err = capsys.readouterr().err
    _one_line(err)
    assert names in err
    assert dst.is_file() if names == "is a file" else not dst.exists()


def test_synthetic_leaves_nothing_when_interrupted(tmp_path, monkeypatch):
    real, calls = synthetic.write_tensor_file, []

    def interrupted(path, spec, rnd):
        calls.append(path)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return real(path, spec, rnd)

    monkeypatch.setattr(synthetic, "write_tensor_file", interrupted)
    with pytest.raises(KeyboardInterrupt):
        write_checkpoint(tmp_path / "a" / "dst", ONE_LAYER)
    assert not (tmp_path / "a").exists()


def test_synthetic_with_fewer_layers_converts_without_a_hand_written_config(tmp_path, capsys):
    # what `--config grok-1 --layers 1` does, at tiny dims: a model that is not a named config's
    # layer count (grok-convert used to look for the 146 files of 'tiny' and list 132 as missing)
    src, out = tmp_path / "src", tmp_path / "out"
    assert synthetic.main([str(src), "--config", "tiny", "--layers", "1"]) == 0
    assert cli.main([str(src), str(out), "--quiet"]) == 0, capsys.readouterr().err
    assert GrokConfig.from_json(out).num_layers == 1
    assert verify_conversion(out, src, quiet=True) == []


def test_synthetic_real_shapes_one_layer_writes_the_config(tmp_path, monkeypatch):
    # --config grok-1 --layers 1 with the writing stubbed out (real shapes are GBs): the config
    # beside ckpt-0 is what grok-convert reads
    monkeypatch.setattr(synthetic, "write_tensor_file", lambda path, spec, rnd: path.write_bytes(b""))
    assert synthetic.main([str(tmp_path / "d"), "--config", "grok-1", "--layers", "1"]) == 0
    cfg = GrokConfig.from_json(tmp_path / "d" / "config.json")
    assert cfg.same_architecture(GrokConfig.from_name("grok-1", num_layers=1))
    assert len(list((tmp_path / "d" / "ckpt-0").iterdir())) == 14


def test_missing_layers_are_listed_briefly_with_a_hint(tmp_path):
    src = tmp_path / "src"
    write_checkpoint(src, ONE_LAYER)
    (src / "config.json").unlink()                       # an older synthetic checkpoint: no config
    with pytest.raises(ConvertError) as e:
        convert_checkpoint(src, tmp_path / "out", quiet=True)
    msg = str(e.value)
    assert "132 of 146" in msg and "... and 122 more" in msg and len(msg.splitlines()) <= 13
    assert "1-layer model" in msg and "num_layers 1" in msg
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------
# grok-convert: flags and config mismatches
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("args, flag", [
    (["--shard-size", "0"], "--shard-size"),
    (["--workers", "0"], "--workers"),
    (["--workers", "-1"], "--workers"),
    (["--resume", "--overwrite"], "--resume and --overwrite"),
], ids=["shard-size-0", "workers-0", "workers-negative", "resume-overwrite"])
def test_convert_refuses_bad_flag_values(synth, tmp_path, capsys, args, flag):
    out = tmp_path / "out"
    assert cli.main([str(synth), str(out), "--quiet", *args]) == 1
    err = capsys.readouterr().err
    _one_line(err)
    assert flag in err
    assert not out.exists()


def test_wrong_named_config_is_one_line(synth, tmp_path, capsys):
    assert cli.main([str(synth), str(tmp_path / "out"), "--config", "grok-1", "--quiet"]) == 1
    err = capsys.readouterr().err
    _one_line(err)
    assert "does not look like config 'grok-1'" in err and "looks like 'tiny'" in err
    # files of no named config at all
    src = tmp_path / "mine"
    write_checkpoint(src, GrokConfig.from_name("tiny", num_kv_heads=4, num_layers=2).replace(name="mine"))
    assert cli.main([str(src), str(tmp_path / "out"), "--config", "grok-1", "--quiet"]) == 1
    err = capsys.readouterr().err
    _one_line(err)
    assert "does not look like config 'grok-1'" in err and "--config PATH.json" in err


def _bad_scales(synth):
    spec = param_order(GrokConfig.from_name("tiny"))[3]                  # layer 0 moe linear_1, int8
    bad = type(spec)(spec.index, spec.path, spec.torch_name, spec.shape, spec.groups + 1)
    write_tensor_file(synth / "ckpt-0" / spec.file, bad, _Random(0, False))
    return spec.file


def _float_for_int8(synth):
    spec = param_order(GrokConfig.from_name("tiny"))[5]                  # layer 0 attention key, int8
    bad = type(spec)(spec.index, spec.path, spec.torch_name, spec.shape, None)
    write_tensor_file(synth / "ckpt-0" / spec.file, bad, _Random(0, False))
    return spec.file


def _extra_file(synth):
    shutil.copyfile(synth / "ckpt-0" / "tensor00145_000", synth / "ckpt-0" / "tensor00146_000")
    return "tensor00146_000"


@pytest.mark.parametrize("damage", [_bad_scales, _float_for_int8, _extra_file],
                         ids=["scales-shape", "float32-for-int8", "extra-file"])
def test_detection_names_the_file_that_does_not_fit(synth, tmp_path, damage):
    name = damage(synth)
    with pytest.raises(ConvertError) as e:
        convert_checkpoint(synth, tmp_path / "out", quiet=True)
    msg = str(e.value)
    assert name in msg and "closest is 'tiny'" in msg, msg
    assert len(msg.splitlines()) == 1
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------
# A crafted config.json beside ckpt-0 (checkpoints are downloaded: the file is hostile input)
# ---------------------------------------------------------------------------------------------
@pytest.fixture
def crafted(tmp_path):
    """crafted(changes) -> a 1-layer checkpoint whose config.json beside ckpt-0 has ``changes``."""
    def make(changes):
        src = tmp_path / "src"
        write_checkpoint(src, ONE_LAYER)
        (src / "config.json").write_text(json.dumps({**ONE_LAYER.to_dict(), **changes}))
        return src
    return make


@pytest.mark.parametrize("changes, says", [
    ({"num_layers": 3_000_000}, "num_layers must be in [1, 1024], got 3000000"),      # once minutes and 13 GB
    ({"num_layers": 100_000_000}, "num_layers must be in [1, 1024]"),                 # once a MemoryError
    ({"num_layers": "12"}, "num_layers must be an integer, got '12' (string)"),
    ({"num_layers": None}, "num_layers must be an integer, got None (null)"),
    ({"num_kv_heads": 0}, "num_kv_heads must be in [1, 1024], got 0"),                # once ZeroDivisionError
    ({"\x1b[2J\x1b[31mx\ngrok-convert: wrote 1 shard(s)": 1}, "unknown GrokConfig field(s): '\\x1b[2J"),
], ids=["layers-3M", "layers-100M", "layers-str", "layers-null", "kv-heads-0", "escapes-in-a-name"])
def test_crafted_config_beside_the_checkpoint_is_one_line(crafted, tmp_path, changes, says):
    src, out = crafted(changes), tmp_path / "out"
    r = _cli(src, out, "--quiet", timeout=60)
    assert r.returncode == 1 and r.stdout == "", r
    _one_line(r.stderr)
    assert "\x1b" not in r.stderr and r.stderr.startswith(f"grok-convert: error: {src / 'config.json'}: "), r.stderr
    assert says in r.stderr and "pass --config" in r.stderr, r.stderr
    assert not out.exists()


def test_config_beside_the_checkpoint_is_read_only_if_small_and_regular(crafted, tmp_path, monkeypatch, capsys):
    from test_config import _unblock_readers

    src, out = crafted({}), tmp_path / "out"
    cfg = src / "config.json"
    cfg.write_text(" " * (2 << 20) + cfg.read_text())      # valid JSON, but no config is 2 MiB
    assert cli.main([str(src), str(out), "--quiet"]) == 1
    err = capsys.readouterr().err
    _one_line(err)
    assert f"{cfg}: larger than 1024 KiB" in err and not out.exists()
    # a FIFO swapped in after convert_checkpoint looked (is_file() said a file): refused, not a hang
    cfg.unlink()
    os.mkfifo(cfg)
    real_is_file = Path.is_file
    monkeypatch.setattr(Path, "is_file", lambda p: p == cfg or real_is_file(p))
    _unblock_readers(cfg)
    assert cli.main([str(src), str(out), "--quiet"]) == 1
    err = capsys.readouterr().err
    _one_line(err)
    assert f"{cfg}: not a regular file but a FIFO" in err and not out.exists()


# ---------------------------------------------------------------------------------------------
# Nothing left behind
# ---------------------------------------------------------------------------------------------
def test_not_enough_space_leaves_no_out_directory(synth, tmp_path, monkeypatch):
    monkeypatch.setattr(convert_mod, "_free_bytes", lambda p: 1000)
    out = tmp_path / "new" / "out"
    with pytest.raises(ConvertError, match="not enough disk space"):
        convert_checkpoint(synth, out, quiet=True)
    assert not (tmp_path / "new").exists()


def _disk_full_at_first_write(monkeypatch):
    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(convert_mod, "tensor_chunks", full)


def test_disk_full_before_any_shard_leaves_no_out_directory(synth, tmp_path, monkeypatch, capsys):
    _disk_full_at_first_write(monkeypatch)
    out = tmp_path / "out"
    assert cli.main([str(synth), str(out), "--quiet", "--workers", "2"]) == 1
    err = capsys.readouterr().err
    _one_line(err)
    assert "disk full" in err
    assert not out.exists()


def test_failed_run_into_an_existing_out_keeps_what_it_had(synth, tmp_path, monkeypatch):
    out = tmp_path / "out"
    convert_checkpoint(synth, out, quiet=True)
    (out / "notes.txt").write_text("mine")
    _disk_full_at_first_write(monkeypatch)
    with pytest.raises(ConvertError, match="disk full"):
        convert_checkpoint(synth, out, quiet=True, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]


@pytest.mark.parametrize("which", ["state-first", "shard", "state-worker", "record"])
def test_interrupt_between_write_and_rename_leaves_no_partial(synth, tmp_path, monkeypatch, which):
    """A Ctrl-C (KeyboardInterrupt, in the main thread or raised in a worker) at any rename."""
    real, seen = os.replace, {"state": 0}

    def replace(src, dst):
        name = Path(dst).name
        if name == ".grok-convert-state.json":
            seen["state"] += 1
        hit = {"state-first": name == ".grok-convert-state.json" and seen["state"] == 1,
               "shard": name.startswith("model-00002"),
               "state-worker": name == ".grok-convert-state.json" and seen["state"] == 2,
               "record": name == "grok_convert.json"}[which]
        if hit:
            raise KeyboardInterrupt
        return real(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        convert_checkpoint(synth, out, quiet=True, shard_size="1MB", workers=1)
    monkeypatch.setattr(os, "replace", real)
    left = [p.name for p in out.glob("*.partial")] if out.exists() else []
    assert left == []
    convert_checkpoint(synth, out, quiet=True, shard_size="1MB", workers=2, resume=True)
    assert verify_conversion(out, synth, quiet=True) == []


# ---------------------------------------------------------------------------------------------
# verify
# ---------------------------------------------------------------------------------------------
def test_verify_against_another_source_is_summarised(synth, tmp_path, capsys):
    out = tmp_path / "out"
    convert_checkpoint(synth, out, quiet=True)
    other = tmp_path / "other"
    write_checkpoint(other, "tiny", seed=4)
    assert cli.main(["verify", str(out), "--src", str(other), "--quiet"]) == 1
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == cli.MAX_PROBLEMS_SHOWN + 2, lines
    assert all("PROBLEM" in line for line in lines[:cli.MAX_PROBLEMS_SHOWN])
    problems = len(verify_conversion(out, other, quiet=True))
    assert lines[-2].endswith(f"... and {problems - cli.MAX_PROBLEMS_SHOWN} more problem(s)")
    assert f"FAILED, {problems} problem(s)" in lines[-1] and "converted from?" in lines[-1]


def test_verify_on_a_missing_directory_says_so(tmp_path, capsys):
    assert cli.main(["verify", str(tmp_path / "nope")]) == 1
    err = capsys.readouterr().err
    _one_line(err)
    assert "does not exist" in err and "grok_convert.json" not in err


# ---------------------------------------------------------------------------------------------
# Ctrl-C
# ---------------------------------------------------------------------------------------------
def test_ctrl_c_during_start_up_is_one_line(tmp_path, monkeypatch, capsys):
    class Interrupting:
        def __getattr__(self, name):
            raise KeyboardInterrupt

    # the converter's modules are imported after parsing: a Ctrl-C then used to escape main()
    monkeypatch.setitem(sys.modules, "grok_torch.convert.verify", Interrupting())
    assert cli.main([str(tmp_path / "src"), str(tmp_path / "out")]) == 130
    err = capsys.readouterr().err
    _one_line(err)
    assert "interrupted" in err


def test_ctrl_c_while_reading_the_source_is_one_line(synth, tmp_path, monkeypatch, capsys):
    def interrupted(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(convert_mod, "read_source", interrupted)
    assert cli.main([str(synth), str(tmp_path / "out")]) == 130
    _one_line(capsys.readouterr().err)
    assert not (tmp_path / "out").exists()


def test_ctrl_c_reaches_the_child_even_when_sigint_is_ignored_here(synth, tmp_path):
    # a background job (pytest ... &) runs with SIGINT ignored, which its children inherit
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        r = _cli(synth, tmp_path / "out", "--shard-size", "1MB", "--workers", "1", "--chunk-size", "64KiB",
                 "--quiet", env={"GROK_CONVERT_FAULT_AFTER_BYTES": "2000000", "GROK_CONVERT_FAULT_SIGNAL": "INT"})
    finally:
        signal.signal(signal.SIGINT, previous)
    assert r.returncode == 130, (r.returncode, r.stderr)
    _one_line(r.stderr)


def test_synthetic_ctrl_c_is_one_line_and_leaves_nothing(tmp_path, monkeypatch, capsys):
    def interrupted(*a, **k):              # e.g. while torch is still being imported
        raise KeyboardInterrupt
    monkeypatch.setattr(synthetic, "_Random", interrupted)
    assert synthetic.main([str(tmp_path / "dst"), "--config", "tiny"]) == 130
    _one_line(capsys.readouterr().err)
    assert not (tmp_path / "dst").exists()


def test_out_that_is_a_file_or_a_dangling_symlink_is_one_line(tmp_path):
    from grok_torch.convert.convert import ConvertError, convert_checkpoint
    from grok_torch.convert.synthetic import write_checkpoint

    src = tmp_path / "src"
    write_checkpoint(src, "tiny")
    (tmp_path / "afile").write_text("mine")
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    with pytest.raises(ConvertError, match="is a file, not a directory"):
        convert_checkpoint(src, tmp_path / "afile", quiet=True)
    with pytest.raises(ConvertError, match="is a dangling symlink"):
        convert_checkpoint(src, tmp_path / "dangling", quiet=True)
    assert (tmp_path / "afile").read_text() == "mine" and not (tmp_path / "nowhere").exists()
