"""The Grok-1 tokenizer.model (SPEC §7): example ids, special ids, no BOS, streaming decode."""
import pytest

from conftest import TOKENIZER, require
from grok_torch.tokenizer import StreamDecoder, Tokenizer

EXAMPLE = "The answer to life the universe and everything is of course"
EXAMPLE_IDS = [422, 3033, 356, 1180, 333, 9072, 360, 2175, 391, 359, 1805]


@pytest.fixture(scope="module")
def tok():
    return Tokenizer(require(TOKENIZER, "Grok-1 tokenizer.model"))


def test_example_ids_without_bos(tok):
    assert tok.encode(EXAMPLE) == EXAMPLE_IDS
    assert tok.encode(EXAMPLE, bos=True) == [1, *EXAMPLE_IDS]
    assert tok.decode(EXAMPLE_IDS) == EXAMPLE


def test_special_ids_and_size(tok):
    assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.vocab_size) == (0, 1, 2, 131072)


def test_stream_decoder_rebuilds_text(tok):
    text = "naïve café — 日本語 ok"
    dec = StreamDecoder(tok)
    assert "".join(dec.push(i) for i in tok.encode(text)) == text


def test_bad_path_and_input(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer model not found"):
        Tokenizer(tmp_path)
    t = Tokenizer(require(TOKENIZER, "Grok-1 tokenizer.model"))
    with pytest.raises(TypeError, match="must be a str"):
        t.encode([1, 2])


def test_stream_decoder_flushes_an_unfinished_character(tok):
    """Generation can stop inside a byte-fallback character: flush() emits the held bytes."""
    ids = tok.encode("ok 🦙")                        # ... '▁', <0xF0>, <0x9F>, <0xA6>, <0x99>
    dec = StreamDecoder(tok)
    text = "".join(dec.push(i) for i in ids[:-2])   # stop two bytes short of the emoji
    assert "\ufffd" not in text
    rest = dec.flush()
    assert rest and text + rest == tok.decode(ids[:-2])
    assert dec.flush() == ""                         # nothing left
    dec = StreamDecoder(tok)
    assert "".join(dec.push(i) for i in ids) + dec.flush() == "ok 🦙"


def test_stream_decoder_decodes_a_bounded_window(tok, monkeypatch):
    """Each push decodes a bounded window of recent ids, not the whole sequence, and the pieces
    still add up to the full decode (leading spaces, byte-fallback characters)."""
    text = ("The answer to life 🦙 the universe, naïve café — 日本語 and ꙮ everything. " * 8).strip()
    ids = tok.encode(text)
    seen, decode = [], tok.decode
    monkeypatch.setattr(tok, "decode", lambda x, **kw: (seen.append(len(x)), decode(x, **kw))[1])
    dec = StreamDecoder(tok)
    out = "".join(dec.push(i) for i in ids) + dec.flush()
    assert out == text
    assert len(ids) > 100 and max(seen) <= 16, max(seen)
