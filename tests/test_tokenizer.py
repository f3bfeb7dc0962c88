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
