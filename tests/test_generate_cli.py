"""grok-generate on the converted tiny model: token ids in and out, and clear errors."""
import json
import shutil
import subprocess
import sys

import pytest
import torch

from grok_torch.generate_cli import main


def test_prompt_ids_greedy_prints_ids(converted, capsys):
    assert main(["--model", str(converted("int8")), "--prompt-ids", "25,376,378",
                 "--max-new-tokens", "4", "--temperature", "0", "--no-stop"]) == 0
    ids = capsys.readouterr().out.strip().split(",")
    assert len(ids) == 4 and all(0 <= int(i) < 512 for i in ids)


def test_text_output_flushes_held_bytes(converted, capsys):
    """With a tokenizer the ids are printed as text; a generation ending inside a byte-fallback
    character still prints those bytes (the tiny model emits mostly byte pieces)."""
    from conftest import TOKENIZER, require
    from grok_torch.tokenizer import Tokenizer

    tok = Tokenizer(require(TOKENIZER, "Grok-1 tokenizer.model"))
    base = ["--model", str(converted("int8")), "--prompt-ids", "25,376,378", "--temperature", "0", "--no-stop"]
    assert main(base + ["--max-new-tokens", "8"]) == 0
    ids = [int(i) for i in capsys.readouterr().out.strip().split(",")]
    cut = 0
    for n in range(1, 9):
        assert main(base + ["--max-new-tokens", str(n), "--tokenizer", str(TOKENIZER)]) == 0
        want = tok.decode([i for i in ids[:n] if i != 2])
        assert capsys.readouterr().out == want + "\n", n
        cut += want.endswith("\ufffd")
    assert cut, "no run ended inside a character: the test does not exercise flush()"


def test_text_prompt_without_tokenizer_is_an_error(converted, capsys):
    assert main(["--model", str(converted("int8")), "--prompt", "hello"]) == 2
    assert "needs a tokenizer" in capsys.readouterr().err


def test_python_dash_m_runs(converted):
    r = subprocess.run([sys.executable, "-m", "grok_torch.generate_cli", "--model", str(converted("int8")),
                        "--prompt-ids", "25,999", "--max-new-tokens", "2"], capture_output=True, text=True)
    assert r.returncode == 2 and "token id 999 is out of range" in r.stderr


# ---- every bad input: non-zero exit, one line naming the problem, no traceback ----------------

def _fails(capsys, argv, *needles):
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc != 0, argv
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


def _ids(model, *extra):
    return ["--model", str(model), "--prompt-ids", "25,376", "--max-new-tokens", "2", *extra]


def test_bad_tokenizer_paths(converted, capsys, tmp_path):
    m = converted("int8")
    _fails(capsys, ["--model", str(m), "--prompt", "hi", "--tokenizer", "/nonexistent"],
           "tokenizer model not found", "/nonexistent")
    junk = tmp_path / "junk.model"
    junk.write_bytes(b"this is not a sentencepiece model")
    _fails(capsys, ["--model", str(m), "--prompt", "hi", "--tokenizer", str(junk)],
           str(junk), "not a SentencePiece")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_cuda_without_gpu(converted, capsys):
    _fails(capsys, _ids(converted("int8"), "--device", "cuda"), "cuda", "not available")


def test_unknown_device(converted, capsys):
    _fails(capsys, _ids(converted("int8"), "--device", "foo"), "invalid device 'foo'")


@pytest.mark.parametrize("flag, value", [
    ("--temperature", "nan"), ("--temperature", "-1"), ("--temperature", "inf"), ("--top-p", "nan"),
    ("--top-p", "1.5"), ("--top-p", "0"), ("--top-k", "-3"), ("--max-new-tokens", "0"), ("--max-new-tokens", "64")])
def test_bad_sampling_settings(converted, capsys, flag, value):
    """Errors name the flag, not the library's parameter (top_p, max_new_tokens)."""
    line = _fails(capsys, _ids(converted("int8"), flag, value), flag)
    assert f" {flag[2:].replace('-', '_')} " not in line.replace(flag, ""), line


def test_sample_settings_reject_nan_and_negatives():
    from grok_torch.sampling import SampleSettings

    for kw in (dict(temperature=float("nan")), dict(temperature=-0.5), dict(top_p=float("nan")),
               dict(top_p=1.01), dict(top_p=0.0), dict(top_k=-1), dict(top_k=1.5)):
        with pytest.raises(ValueError):
            SampleSettings(**kw)


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_corrupt_and_truncated_shards(converted, capsys, tmp_path):
    src = converted("int8")
    shard_name = json.loads((src / "model.safetensors.index.json").read_text())["weight_map"]["embed.weight"]
    for kind in ("truncated", "corrupt"):
        d = _copy(src, tmp_path / kind)
        shard = d / shard_name
        data = shard.read_bytes()
        shard.write_bytes(data[: len(data) // 2] if kind == "truncated" else b"\xff" * 64 + data[64:])
        _fails(capsys, _ids(d), str(shard), "not a readable safetensors file")


def test_bad_index(converted, capsys, tmp_path):
    d = _copy(converted("int8"), tmp_path / "noweightmap")
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}}))
    _fails(capsys, _ids(d), "model.safetensors.index.json", "no weight_map")
    (d / "model.safetensors.index.json").write_text("{not json")
    _fails(capsys, _ids(d), "model.safetensors.index.json", "not a valid safetensors index")


def test_model_is_a_file(converted, capsys):
    cfg = converted("int8") / "config.json"
    _fails(capsys, _ids(cfg), str(cfg), "is not a directory")
    _fails(capsys, _ids("/nonexistent/model"), "/nonexistent/model", "does not exist")


def test_loading_errors_name_the_file(converted, tmp_path):
    """The library (not only the CLI) says what is wrong, and with which file."""
    from grok_torch import Grok

    d = _copy(converted("int8"), tmp_path / "m")
    (d / "model.safetensors.index.json").write_text("{}")
    with pytest.raises(ValueError, match="index.json.*no weight_map"):
        Grok.from_pretrained(d)
    with pytest.raises(ValueError, match="is not a directory"):
        Grok.from_pretrained(d / "config.json")
    with pytest.raises(ValueError, match="invalid device"):
        Grok.from_pretrained(converted("int8"), device="foo")


# ---- several devices: --device-map (one process) and torchrun (tests/test_distributed.py) ------

def test_device_map_auto_prints_what_one_device_prints(converted, capsys):
    """One process: --device-map is from_pretrained's device_map (on a CPU-only machine "auto" puts
    everything on the CPU, through accelerate's planner and hooks)."""
    argv = ["--model", str(converted("int8")), "--prompt-ids", "25,376,378", "--max-new-tokens", "5",
            "--temperature", "0.7"]
    assert main(argv) == 0
    want = capsys.readouterr().out
    assert main(argv + ["--device-map", "auto"]) == 0
    assert capsys.readouterr().out == want


def test_device_map_errors(converted, capsys):
    m = converted("int8")
    _fails(capsys, _ids(m, "--device", "cpu", "--device-map", "ffn"), "--device", "--device-map", "not both")
    if not torch.cuda.is_available():
        _fails(capsys, _ids(m, "--device-map", "experts"), "none is visible")


@pytest.mark.parametrize("extra, needle", [
    (["--device-map", "auto"], "--device-map auto spreads the model over the GPUs of one process"),
    (["--dist-timeout", "0"], "--dist-timeout must be > 0"),
    (["--device", "cuda:1"], "under torchrun pass cpu or cuda"),
])
def test_torchrun_refusals_before_the_process_group(converted, capsys, monkeypatch, extra, needle):
    """Under torchrun (WORLD_SIZE > 1) options that cannot work fail on every rank before any rank
    waits for another, one line naming the rank."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    line = _fails(capsys, _ids(converted("int8"), *extra), needle)
    assert line.startswith("grok-generate: rank 1: ")


def test_inference_flags(converted, capsys):
    """--prefill-chunk changes nothing greedy fp32 decoding can see; --attn-precision bf16 runs; --cuda-graph
    on refuses (one line, naming the flag) where the step cannot be captured; bad values name the flag."""
    argv = ["--model", str(converted("int8")), "--prompt-ids", "25,376,378,9,11", "--max-new-tokens", "5",
            "--temperature", "0", "--dtype", "fp32"]  # fp32: bf16 greedy tokens may part on an ulp flip
    assert main(argv) == 0
    want = capsys.readouterr().out
    assert main(argv + ["--prefill-chunk", "2"]) == 0
    assert capsys.readouterr().out == want
    assert main(argv + ["--attn-precision", "bf16", "--cuda-graph", "off"]) == 0
    assert len(capsys.readouterr().out.strip().split(",")) == 5
    _fails(capsys, argv + ["--cuda-graph", "on"], "--cuda-graph on", "not on one CUDA device")
    _fails(capsys, argv + ["--prefill-chunk", "-3"], "--prefill-chunk")


# ---- a newcomer's first runs (issue 11) ---------------------------------------------------------

def test_default_max_new_tokens_is_clamped_to_the_context(converted, capsys):
    """The default 100 does not fit the tiny model's 64-token context: clamp with a one-line warning;
    an explicit --max-new-tokens that does not fit is an error naming the flag."""
    argv = ["--model", str(converted("int8")), "--prompt-ids", "25,376,378", "--temperature", "0", "--no-stop"]
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert len(captured.out.strip().split(",")) == 64 - 3 + 1
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and "warning" in lines[0] and "62" in lines[0], lines
    _fails(capsys, argv + ["--max-new-tokens", "100"], "--max-new-tokens 100", "62 or fewer")


def test_text_prompt_with_another_models_tokenizer(converted, capsys):
    from grok_torch.tokenizer import BUNDLED_TOKENIZER

    _fails(capsys, ["--model", str(converted("int8")), "--prompt", "The answer to life", "--tokenizer",
                    BUNDLED_TOKENIZER], "does not match the model", "vocab_size 512", "--prompt-ids")


def test_unconverted_empty_or_missing_model_dir(capsys, tmp_path):
    """--model at the release's checkpoints/ (ckpt-0/tensor*_000), at ckpt-0/ itself, at an empty or a
    missing directory: one line saying so and "run grok-convert first"; the library says it too."""
    from grok_torch import Grok

    official = tmp_path / "checkpoints"
    (official / "ckpt-0").mkdir(parents=True)
    (official / "ckpt-0" / "tensor00000_000").write_bytes(b"\0")
    (official / "tokenizer.model").write_bytes(b"\0")  # a text prompt must not fail on it first
    (tmp_path / "empty").mkdir()
    cases = [(official, "official Grok-1 checkpoint"), (official / "ckpt-0", "official Grok-1 checkpoint"),
             (tmp_path / "empty", "is empty"), (tmp_path / "missing", "does not exist")]
    for path, what in cases:
        _fails(capsys, ["--model", str(path), "--prompt", "hi"], str(path), what, "run grok-convert first")
        with pytest.raises((ValueError, OSError), match=f"{what}.*run grok-convert first"):
            Grok.from_pretrained(path)


def test_help_uses_the_demo_model(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert "../shared" not in out and "grok-generate --model /tmp/grok-tiny --prompt" in out
    assert "python -m grok_torch.convert.synthetic /tmp/grok-tiny-src --overwrite && grok-convert /tmp/grok-tiny-src /tmp/grok-tiny --overwrite" in out


def test_demo_model_says_its_output_is_random(converted, capsys, tmp_path):
    d = _copy(converted("int8"), tmp_path / "demo")
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "name": "demo"}))
    assert main(["--model", str(d), "--prompt-ids", "25,376", "--max-new-tokens", "2"]) == 0
    err = capsys.readouterr().err
    assert err.count("random") >= 1 and len(err.strip().splitlines()) == 1, err
    assert main(_ids(converted("int8"))) == 0
    assert capsys.readouterr().err == ""


def test_prompt_ids_print_ids_even_with_a_tokenizer_in_the_model_dir(converted, capsys, tmp_path):
    """--prompt-ids: ids in, ids out (the README's example), though MODEL/tokenizer.model exists;
    --tokenizer asks for text."""
    from conftest import TOKENIZER, require

    d = _copy(converted("int8"), tmp_path / "m")
    shutil.copy(require(TOKENIZER, "Grok-1 tokenizer.model"), d / "tokenizer.model")
    base = ["--model", str(d), "--prompt-ids", "25,376,378", "--max-new-tokens", "3", "--temperature", "0"]
    assert main(base) == 0
    out = capsys.readouterr().out.strip()
    assert all(x.isdigit() for x in out.split(",")) and len(out.split(",")) == 3, out
    assert main(base + ["--tokenizer", str(TOKENIZER)]) == 0
    assert not capsys.readouterr().out.strip().replace(",", "").isdigit()


def test_flag_names_never_rewrite_a_path(capsys, tmp_path):
    official = tmp_path / "runs-top_k" / "checkpoints"     # parameter names inside the path stay as they are
    (official / "ckpt-0").mkdir(parents=True)
    (official / "ckpt-0" / "tensor00000_000").write_bytes(b"\0")
    _fails(capsys, ["--model", str(official), "--prompt-ids", "1"], str(official), "run grok-convert first")


def test_bad_prompts_fail_before_the_model_loads(converted, capsys, monkeypatch, tmp_path):
    from grok_torch.model import Grok

    def never(*a, **k):
        raise AssertionError("the model was loaded before the prompt was checked")

    monkeypatch.setattr(Grok, "from_pretrained", classmethod(lambda cls, *a, **k: never()))
    tiny = str(converted("int8"))
    _fails(capsys, ["--model", tiny, "--prompt-ids", "1,999999"], "--prompt-ids: token id 999999 is out of range [0, 512)")
    _fails(capsys, ["--model", tiny, "--prompt-ids", ""], "--prompt-ids is empty")
    # a text prompt needs a model of the tokenizer's vocabulary: the config alone is read before loading
    d = _copy(converted("int8"), tmp_path / "real-vocab")
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "vocab_size": 131072}))
    _fails(capsys, ["--model", str(d), "--prompt", ""], "--prompt is empty")


def test_a_config_switch_this_port_does_not_run_is_one_line(converted, capsys, tmp_path):
    d = _copy(converted("int8"), tmp_path / "untied")
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "tie_word_embeddings": False}))
    _fails(capsys, _ids(d), "tie_word_embeddings", "not implemented")
