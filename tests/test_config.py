"""GrokConfig: named configs, derived sizes, JSON round trip, validation (a config.json is hostile input)."""
import json
import os
import threading
import time

import pytest

from grok_torch.config import CONFIGS, QUANT_GROUPS, GrokConfig, ffn_size


def test_named_configs():
    g = GrokConfig.from_name("grok-1")
    assert (g.vocab_size, g.d_model, g.num_layers, g.num_q_heads, g.num_kv_heads, g.head_dim) == (131072, 6144, 64, 48, 8, 128)
    assert g.ffn_size == 32768 and g.q_per_kv == 6 and g.num_experts == 8 and g.num_experts_per_tok == 2
    t = GrokConfig.from_name("tiny")
    assert t.ffn_size == 176 and t.q_per_kv == 2 and t.max_seq_len == 64  # 170 rounded UP to 176
    assert set(CONFIGS) >= {"grok-1", "tiny"}


def test_ffn_rounds_up_to_multiple_of_8():
    assert ffn_size(128, 2) == 176 and ffn_size(6144, 8) == 32768


def test_grok2_switches_default_off():
    g = GrokConfig.from_name("grok-1")
    assert g.router_logit_softcap is None and g.final_logit_softcap is None
    assert g.residual_mlp_size == 0 and g.attn_temperature_len == 0
    assert g.tie_word_embeddings and g.rope_base == 10000.0 and not g.renormalize_gates


def test_json_round_trip(tmp_path):
    c = GrokConfig.from_name("tiny", weight_format="bf16")
    c.to_json(tmp_path / "config.json")
    assert GrokConfig.from_json(tmp_path) == c
    assert GrokConfig.load(str(tmp_path / "config.json")) == c


def test_overrides_and_errors(tmp_path):
    assert GrokConfig.from_name("tiny", num_layers=2).num_layers == 2
    with pytest.raises(KeyError, match="unknown config"):
        GrokConfig.from_name("grok-9")
    with pytest.raises(ValueError, match="weight_format"):
        GrokConfig(weight_format="int4")
    with pytest.raises(ValueError, match="num_kv_heads"):
        GrokConfig(num_q_heads=6, num_kv_heads=4)
    (tmp_path / "config.json").write_text('{"bogus": 1}')
    with pytest.raises(ValueError, match="bogus"):
        GrokConfig.from_json(tmp_path / "config.json")


def test_same_architecture_ignores_storage():
    a = GrokConfig.from_name("tiny")
    assert a.same_architecture(a.replace(weight_format="fp32", name="x"))
    assert not a.same_architecture(a.replace(num_layers=3))


# ---------------------------------------------------------------------------------------------
# A config.json comes with a downloaded checkpoint: hostile input (every way in is __post_init__)
# ---------------------------------------------------------------------------------------------
def _grok1(**changes):
    return {**GrokConfig.from_name("grok-1").to_dict(), **changes}


def _fails_on_one_line(d, field):
    with pytest.raises(ValueError) as e:
        GrokConfig.from_dict(d)
    msg = str(e.value)
    assert field in msg and "\n" not in msg and "\x1b" not in msg and len(msg) < 400, msg
    return msg


@pytest.mark.parametrize("field, value", [
    ("num_layers", "12"), ("num_layers", None), ("num_layers", 1.5), ("num_layers", [1]), ("num_layers", True),
    ("num_layers", 0), ("num_layers", 3_000_000), ("num_layers", 100_000_000), ("num_layers", 10 ** 1000),
    ("num_kv_heads", 0), ("num_q_heads", -48), ("head_dim", 4096), ("d_model", 1 << 20), ("vocab_size", 0),
    ("vocab_size", 2 ** 24 + 1), ("max_seq_len", 2 ** 22 + 1), ("num_experts", 0), ("num_experts", 1 << 20),
    ("num_experts_per_tok", 0), ("num_experts_per_tok", 9), ("ffn_size", -8), ("ffn_size", 1 << 30),
    ("residual_mlp_size", -1), ("attn_temperature_len", -1), ("pad_token_id", -1), ("eos_token_id", 131072),
    ("widening_factor", "8"), ("widening_factor", float("nan")), ("widening_factor", float("inf")),
    ("widening_factor", 0), ("widening_factor", 10 ** 400), ("widening_factor", 1e6),
    ("embedding_multiplier", float("-inf")), ("attn_logit_cap", 0), ("rms_norm_eps", -1e-5), ("rope_base", 0),
    ("router_logit_softcap", 0.0), ("final_logit_softcap", "30"), ("final_logit_softcap", float("nan")),
    ("tie_word_embeddings", 1), ("renormalize_gates", "false"), ("name", 5), ("name", ""), ("name", "x" * 300),
    ("weight_format", ["int8"]), ("weight_format", "int4\x1b[2J" * 50),
    ("quant_groups", [1] * 7), ("quant_groups", {"wq": 1}), ("quant_groups", {**QUANT_GROUPS, "wx": 1}),
    ("quant_groups", {**QUANT_GROUPS, "wo": 0}), ("quant_groups", {**QUANT_GROUPS, "wo": "8"}),
    ("quant_groups", {**QUANT_GROUPS, "w2": 5}), ("quant_groups", {**QUANT_GROUPS, "wq": 1 << 20}),
    # finite but absurd: they overflow fp32 activations to inf / NaN (grok-generate crashed, training went NaN)
    ("embedding_multiplier", 1e300), ("output_multiplier", 1e5), ("attn_output_multiplier", -0.1),
    ("rope_base", 1e-300), ("rms_norm_eps", 0.5), ("attn_logit_cap", 1e30), ("head_dim", 127),   # odd: RoPE pairs
], ids=lambda v: ascii(v)[:24])
def test_each_field_is_checked_for_type_and_range(field, value):
    msg = _fails_on_one_line(_grok1(**{field: value}), field)
    if isinstance(value, str) and len(value) > 100:
        assert "..." in msg              # a long value is cut


@pytest.mark.parametrize("changes, words", [
    # each size within its cap, the products not: what loading or a full-context cache would allocate
    (dict(num_layers=1024, num_experts=1024), "parameters"),
    (dict(d_model=65536, ffn_size=0, widening_factor=16), "parameters"),
    (dict(num_layers=256, max_seq_len=2 ** 22), "KV-cache"),
    (dict(d_model=65536, ffn_size=0, widening_factor=1000), "widening_factor"),   # derived ffn_size over its cap
    (dict(ffn_size=0, widening_factor=1e-9), "widening_factor"),                 # derived ffn_size 0
])
def test_derived_sizes_are_capped(changes, words):
    _fails_on_one_line(_grok1(**changes), words)


def test_float_weights_need_no_scale_groups():
    # an fp32 / bf16 checkpoint holds no scales, so an ffn_size the int8 groups do not divide is fine there
    GrokConfig.from_name("tiny", ffn_size=100, weight_format="fp32")
    _fails_on_one_line({**GrokConfig.from_name("tiny").to_dict(), "ffn_size": 100}, "quant_groups['w2']")


def test_every_named_config_and_the_defaults_pass():
    for name in CONFIGS:
        c = GrokConfig.from_name(name)
        assert GrokConfig.from_dict(c.to_dict()) == c
    assert GrokConfig().num_parameters() == GrokConfig.from_name("grok-1").num_parameters()
    # an int where a float is declared is fine (JSON writes 8.0 as 8 in other tools)
    assert GrokConfig.from_dict(_grok1(widening_factor=8, rope_base=10000, router_logit_softcap=30)).ffn_size == 32768


def test_errors_from_a_file_name_the_file(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(_grok1(num_kv_heads=0)))
    with pytest.raises(ValueError, match=r"config\.json: num_kv_heads must be in \[1, 1024\], got 0$"):
        GrokConfig.from_json(tmp_path)


def test_unknown_field_names_are_escaped_and_few():
    forged = "\x1b[31mevil\ngrok-convert: wrote 1 shard(s)"
    msg = _fails_on_one_line(_grok1(**{forged: 1}), "unknown GrokConfig field")
    assert ascii(forged[:32]) in msg             # escaped, and cut
    names = {f"bogus_{i:02d}" + "y" * 200: i for i in range(12)}
    msg = _fails_on_one_line(_grok1(**names), "unknown GrokConfig field")
    assert msg.count("bogus_") == 5 and "and 7 more" in msg and "y" * 100 not in msg
    for not_an_object in ([1, 2], "x", 3, None):
        _fails_on_one_line(not_an_object, "JSON object")


def _unblock_readers(fifo, seconds=3.0):
    """Open ``fifo`` for writing (and close it) as soon as a reader waits on it, for ``seconds``: a
    reader that wrongly opened it gets EOF instead of hanging the test; returns the thread."""
    def run():
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            try:
                os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))   # ENXIO while nobody reads
                return
            except OSError:
                time.sleep(0.02)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def test_from_json_reads_only_a_small_regular_file(tmp_path):
    fifo = tmp_path / "config.json"
    os.mkfifo(fifo)
    _unblock_readers(fifo)
    with pytest.raises(ValueError, match=r"config\.json: not a regular file but a FIFO"):
        GrokConfig.from_json(tmp_path)
    big = tmp_path / "big.json"
    big.write_text(" " * (2 << 20) + GrokConfig.from_name("tiny").to_json())
    with pytest.raises(ValueError, match=r"big\.json: larger than 1024 KiB"):
        GrokConfig.from_json(big)
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(ValueError, match=r"deep\.json: not valid JSON"):
        GrokConfig.from_json(deep)


def test_grok_generate_with_a_bad_config_is_one_line(tmp_path, capsys):
    from grok_torch.generate_cli import main

    (tmp_path / "config.json").write_text(json.dumps({**GrokConfig.from_name("tiny").to_dict(), "num_kv_heads": 0}))
    assert main(["--model", str(tmp_path), "--prompt-ids", "1,2"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith("grok-generate: ") and "config.json: num_kv_heads must be in [1, 1024], got 0" in err
