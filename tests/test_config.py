"""GrokConfig: named configs, derived sizes, JSON round trip, validation."""
import pytest

from grok_torch.config import CONFIGS, GrokConfig, ffn_size


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
