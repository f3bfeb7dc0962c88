"""Fine-tuning data (issue #10): formats, prompt masking, packing, split, exact resume, bad input."""
import json

import numpy as np
import pytest

from conftest import TOKENIZER, require
from grok_torch.finetune.data import (IGNORE_INDEX, DataError, PackedDataset, load_corpus, pack_documents,
                                      read_documents, split_documents)

V, EOS = 1000, 2                 # the vocabulary of the pre-tokenized tests


@pytest.fixture(scope="module")
def tok():
    from grok_torch.tokenizer import Tokenizer
    return Tokenizer(require(TOKENIZER, "Grok-1 tokenizer.model"))


class ByteTok:
    """A stand-in tokenizer for the error cases: one id per UTF-8 byte, ids 3..258."""
    vocab_size = 259

    def encode(self, text):
        return [b + 3 for b in text.encode("utf-8")]


def put(tmp_path, name, content):
    p = tmp_path / name
    (p.write_bytes if isinstance(content, bytes) else p.write_text)(content)
    return p


def jsonl(tmp_path, name, rows):
    return put(tmp_path, name, "".join(json.dumps(r) + "\n" for r in rows))


def ids_of(docs):
    return [d.ids.tolist() for d in docs]


# ------------------------------------------------------------------------------------- formats

def test_text_lines_one_document_per_non_blank_line(tmp_path, tok):
    p = put(tmp_path, "a.txt", b"\xef\xbb\xbfHello world\r\n\n   \nSecond line here\n")
    docs = read_documents(p, tok, vocab_size=tok.vocab_size, eos_id=tok.eos_id)
    assert ids_of(docs) == [tok.encode("Hello world") + [tok.eos_id], tok.encode("Second line here") + [tok.eos_id]]
    assert [d.source for d in docs] == [f"{p}:1", f"{p}:4"] and all(d.prompt_len == 0 for d in docs)


def test_text_whole_file_is_one_document(tmp_path, tok):
    p = put(tmp_path, "a.txt", "First paragraph.\n\nSecond one.\n")
    docs = read_documents(p, tok, vocab_size=tok.vocab_size, eos_id=tok.eos_id, format="text")
    assert ids_of(docs) == [tok.encode("First paragraph.\n\nSecond one.") + [tok.eos_id]]


def test_jsonl_text_and_detection(tmp_path, tok):
    rows = [{"text": "The answer to life", "id": 1}, {"text": "naïve café"}]
    for name in ("a.jsonl", "noext"):
        docs = read_documents(jsonl(tmp_path, name, rows), tok, vocab_size=tok.vocab_size, eos_id=tok.eos_id)
        assert ids_of(docs) == [tok.encode(r["text"]) + [tok.eos_id] for r in rows]


def test_jsonl_input_ids_need_no_tokenizer(tmp_path):
    p = jsonl(tmp_path, "ids.jsonl", [{"input_ids": [5, 6, 999]}, {"input_ids": [0, 7]}])
    docs = read_documents(p, None, vocab_size=V, eos_id=EOS)
    assert ids_of(docs) == [[5, 6, 999, EOS], [0, 7, EOS]] and all(d.prompt_len == 0 for d in docs)


def test_prompt_completion_loss_only_on_completion_and_eos(tmp_path, tok):
    rows = [{"prompt": "Q: 2+2?\nA:", "completion": " 4"}, {"prompt": "Say hi:", "completion": " hi there"}]
    docs = read_documents(jsonl(tmp_path, "pc.jsonl", rows), tok, vocab_size=tok.vocab_size, eos_id=tok.eos_id)
    expect = []
    for r, d in zip(rows, docs):
        p = tok.encode(r["prompt"])
        full = tok.encode(r["prompt"] + r["completion"])
        assert full[:len(p)] == p and d.prompt_len == len(p) and d.ids.tolist() == full + [tok.eos_id]
        assert tok.decode(d.ids[len(p):-1]).strip() == r["completion"].strip()
        expect += [False] * len(p) + [True] * (len(full) - len(p) + 1)
    n = sum(len(d.ids) for d in docs)
    tokens, mask = pack_documents(docs, seq_len=n + 3)           # one row, 4 targets of padding
    assert tokens.shape == (1, n + 4) and mask.shape == (1, n + 3)
    # target t is stream token t + 1: masked when that token is a prompt token or padding
    assert mask[0].tolist() == expect[1:] + [False] * 4
    # the second document's first (prompt) token, predicted after the first EOS, carries no loss
    first_eos = len(docs[0].ids) - 1
    assert tokens[0, first_eos] == tok.eos_id and not mask[0, first_eos]
    assert mask[0, first_eos - 1]                                 # the first document's EOS is a target
    batch = PackedDataset(tokens, mask).batch([0])
    labels = batch["labels"][0].tolist()
    assert [t for t, m in enumerate(mask[0]) if m] == [t for t, y in enumerate(labels) if y != IGNORE_INDEX]
    assert all(labels[t] == tokens[0, t + 1] for t in range(n + 3) if mask[0, t])


def test_load_corpus_text_end_to_end(tmp_path, tok):
    lines = [f"Line number {i} of a small corpus." for i in range(20)]
    p = put(tmp_path, "c.txt", "\n".join(lines) + "\n")
    train, ev, stats = load_corpus(p, tok, seq_len=16, vocab_size=131072, eos_id=tok.eos_id,
                                   eval_fraction=0.1, max_seq_len=8192, batch_size=2)
    assert stats.train.documents == 18 and stats.eval.documents == 2
    assert stats.train.tokens + stats.eval.tokens == sum(len(tok.encode(s)) + 1 for s in lines)
    b = train.next_batch()
    assert b["input_ids"].shape == b["labels"].shape == (2, 16) and str(b["input_ids"].dtype) == "torch.int64"
    assert "train: 18 docs" in str(stats)


# ------------------------------------------------------------------------------------- packing

def test_packing_rows_eos_and_final_padding(tmp_path):
    p = jsonl(tmp_path, "ids.jsonl", [{"input_ids": [10, 11, 12, 13, 14]}, {"input_ids": [20, 21, 22]},
                                      {"input_ids": [30, 31, 32, 33]}])
    train, ev, stats = load_corpus(p, seq_len=4, vocab_size=V, eos_id=EOS)
    stream = [10, 11, 12, 13, 14, EOS, 20, 21, 22, EOS, 30, 31, 32, 33, EOS]   # 15 tokens, 14 targets
    assert ev is None and train.seq_len == 4 and len(train) == 4
    assert train.tokens.tolist() == [stream[0:5], stream[4:9], stream[8:13], stream[12:15] + [0, 0]]
    assert train.loss_mask.tolist() == [[True] * 4] * 3 + [[True, True, False, False]]
    assert (stats.train.documents, stats.train.tokens, stats.train.rows, stats.train.loss_tokens) == (3, 15, 4, 14)
    b = train.eval_batches(batch_size=4).__next__()
    assert b["input_ids"].tolist() == [r[:-1] for r in train.tokens.tolist()]
    assert b["labels"].tolist()[3] == [33, EOS, IGNORE_INDEX, IGNORE_INDEX]
    # every target is the next stream token: each token after the first is a target exactly once
    targets = [y for row in b["labels"].tolist() for y in row if y != IGNORE_INDEX]
    assert targets == stream[1:]


def test_packing_exact_fit_has_no_padding():
    from grok_torch.finetune.data import Document
    tokens, mask = pack_documents([Document(np.array([5, 6, 7, 8, EOS], dtype=np.int32), 0, "x:1")], 2)
    assert tokens.tolist() == [[5, 6, 7], [7, 8, EOS]] and mask.all()


# ----------------------------------------------------------------------------------------- split

def _docs_file(tmp_path, n=20):
    return jsonl(tmp_path, "ids.jsonl", [{"input_ids": [10 + i] * (1 + i % 5)} for i in range(n)])


def test_split_deterministic_disjoint_and_independent_of_packing(tmp_path):
    docs = read_documents(_docs_file(tmp_path), vocab_size=V, eos_id=EOS)
    tr, ev = split_documents(docs, 0.25, seed=3)
    assert len(ev) == 5 and len(tr) == 15
    src = lambda ds: [d.source for d in ds]  # noqa: E731
    assert set(src(tr)).isdisjoint(src(ev)) and sorted(src(tr) + src(ev)) == sorted(src(docs))
    assert src(split_documents(docs, 0.25, seed=3)[1]) == src(ev)
    assert src(split_documents(docs, 0.25, seed=4)[1]) != src(ev)
    # the same documents are held out whatever the packing
    firsts = lambda ds: sorted(int(r[0]) for r in ds.tokens if r[0] != EOS)  # noqa: E731
    for seq_len in (1, 3, 64):
        _, e, stats = load_corpus(_docs_file(tmp_path), seq_len=seq_len, vocab_size=V, eos_id=EOS,
                                  eval_fraction=0.25, seed=3)
        assert stats.eval.documents == 5 and stats.eval.tokens == sum(len(d.ids) for d in ev)
        assert {int(t) for t in e.tokens.ravel()} - {0, EOS} == {int(d.ids[0]) for d in ev}
    # at least one eval document, and never all of them
    assert len(split_documents(docs[:2], 0.01)[1]) == 1 and len(split_documents(docs[:2], 0.99)[0]) == 1
    assert split_documents(docs, 0.0) == (docs, [])
    with pytest.raises(DataError, match="at least 2 documents"):
        split_documents(docs[:1], 0.5)


# ---------------------------------------------------------------------------------------- resume

def _train(tmp_path, n=7, batch_size=3, **kw):
    p = jsonl(tmp_path, "r.jsonl", [{"input_ids": [100 + i, 200 + i, 300 + i]} for i in range(n)])
    return load_corpus(p, seq_len=4, vocab_size=V, eos_id=EOS, seed=11, batch_size=batch_size, **kw)[0]


def test_epochs_are_seeded_permutations(tmp_path):
    ds = _train(tmp_path)
    assert len(ds) == 7 and ds.steps_per_epoch == 3
    orders = [ds.epoch_order(e).tolist() for e in range(3)]
    assert all(sorted(o) == list(range(7)) for o in orders) and orders[0] != orders[1]
    assert _train(tmp_path).epoch_order(1).tolist() == orders[1]
    rows = np.concatenate([ds.next_rows() for _ in range(7)]).tolist()   # 21 rows = 3 epochs exactly
    assert rows == sum(orders, []) and ds.state_dict()["epoch"] == 3 and ds.state_dict()["index"] == 0


@pytest.mark.parametrize("k", [0, 1, 2, 3, 5])
def test_resume_gives_the_uninterrupted_batches(tmp_path, k):
    ref = _train(tmp_path)
    want = [ref.next_batch() for _ in range(8)]                           # 24 rows: crosses 3 epoch ends
    ds = _train(tmp_path)
    got = [ds.next_batch() for _ in range(k)]
    state = json.loads(json.dumps(ds.state_dict()))
    assert set(state) >= {"epoch", "index", "seed"}
    fresh = _train(tmp_path)
    fresh.load_state_dict(state)
    got += [fresh.next_batch() for _ in range(8 - k)]
    for a, b in zip(got, want):
        assert a["input_ids"].equal(b["input_ids"]) and a["labels"].equal(b["labels"])


def test_resume_refuses_other_data(tmp_path):
    state = _train(tmp_path).state_dict()
    with pytest.raises(ValueError, match="num_rows"):
        _train(tmp_path, n=8).load_state_dict(state)
    other = load_corpus(jsonl(tmp_path, "o.jsonl", [{"input_ids": [9, 9, 9]}] * 7), seq_len=4, vocab_size=V,
                        eos_id=EOS, seed=11)[0]
    with pytest.raises(ValueError, match="fingerprint"):
        other.load_state_dict(state)


def test_ranks_split_the_global_batch(tmp_path):
    whole = _train(tmp_path, batch_size=4)
    ranks = [_train(tmp_path, batch_size=2, rank=r, world_size=2) for r in range(2)]
    for _ in range(5):
        w = whole.next_batch()["input_ids"]
        parts = [r.next_batch()["input_ids"] for r in ranks]
        assert w[:2].equal(parts[0]) and w[2:].equal(parts[1])
    assert ranks[0].state_dict() == ranks[1].state_dict() == whole.state_dict()


def test_eval_batches_are_ordered_and_leave_the_state(tmp_path):
    ds = _train(tmp_path)
    ds.next_batch()
    before = ds.state_dict()
    batches = list(ds.eval_batches(batch_size=3))
    assert [len(b["input_ids"]) for b in batches] == [3, 3, 1]
    assert np.concatenate([b["input_ids"].numpy() for b in batches]).tolist() == ds.tokens[:, :-1].tolist()
    assert ds.state_dict() == before


# ---------------------------------------------------------------------------------------- errors

BAD_FILES = [
    # (file name, content, format, message) -- "{p}" is the file's path
    ("e.txt", "", None, "{p}: empty file"),
    ("e.jsonl", "\n  \n\n", None, "{p}: empty file"),
    ("j.jsonl", '{"text": "a"}\n{"text": "b",}\n', None, "{p}:2: invalid JSON"),
    ("j.jsonl", '[1, 2]\n', None, "{p}:1: expected a JSON object, got list"),
    ("j.jsonl", '{"text": "a"}\n\n{"body": "b"}\n', None, "{p}:3: missing field"),
    ("j.jsonl", '{"prompt": "a"}\n', None, "{p}:1: missing field 'completion'"),
    ("j.jsonl", '{"completion": "a"}\n', None, "{p}:1: missing field 'prompt'"),
    ("j.jsonl", '{"text": "a"}\n{"text": 5}\n', None, "{p}:2: field 'text' must be a string, got int"),
    ("j.jsonl", '{"prompt": "a", "completion": null}\n', None, "{p}:1: field 'completion' must be a string"),
    ("u.txt", b"fine\nbad \xff byte\n", None, "{p}:2: not valid UTF-8 (byte 0xff"),
    ("u.jsonl", b'{"text": "ok"}\n{"text": "\xc3("}\n', None, "{p}:2: not valid UTF-8"),
    ("u.txt", b"fine\n\xfe\n", "text", "{p}:2: not valid UTF-8"),
    ("i.jsonl", '{"input_ids": [1, 2]}\n{"input_ids": [5, 1000]}\n', None,
     "{p}:2: token id 1000 out of range for the vocabulary (size 1000"),
    ("i.jsonl", '{"input_ids": [-1]}\n', None, "{p}:1: token id -1 out of range"),
    ("i.jsonl", '{"input_ids": [1.5]}\n', None, "{p}:1: field 'input_ids' must be a list of integers"),
    ("i.jsonl", '{"input_ids": "1 2"}\n', None, "{p}:1: field 'input_ids' must be a list of integers"),
    ("m.jsonl", '{"text": "a"}\n{"text": "b"}\n{"input_ids": [4]}\n', None,
     "{p}:3: 'input_ids' row in a file of 'text' rows (as line 1)"),
    ("m.jsonl", '{"text": "a", "prompt": "b", "completion": "c"}\n', None, "{p}:1: ambiguous row"),
    ("z.jsonl", '{"text": ""}\n{"text": ""}\n', None, "{p}: no tokens"),
    ("z.jsonl", '{"input_ids": []}\n', None, "{p}: no tokens"),
]


@pytest.mark.parametrize("name,content,fmt,msg", BAD_FILES)
def test_bad_files_name_file_and_line(tmp_path, name, content, fmt, msg):
    p = put(tmp_path, name, content)
    with pytest.raises(DataError) as e:
        load_corpus([p], ByteTok(), seq_len=8, vocab_size=V, eos_id=EOS, format=fmt)
    assert str(e.value).startswith(msg.format(p=p)) and "\n" not in str(e.value)


def test_bad_arguments(tmp_path):
    good = jsonl(tmp_path, "g.jsonl", [{"text": "abc"}, {"text": "def"}])
    kw = dict(vocab_size=V, eos_id=EOS)
    cases = [
        (dict(paths=[tmp_path / "nope.txt"], seq_len=8), f"{tmp_path / 'nope.txt'}: no such file"),
        (dict(paths=[tmp_path], seq_len=8), f"{tmp_path}: is a directory"),
        (dict(paths=[], seq_len=8), "no data files given"),
        (dict(paths=good, seq_len=0), "seq_len must be a positive integer, got 0"),
        (dict(paths=good, seq_len=65, max_seq_len=64), "seq_len 65 is beyond the model context (max_seq_len 64)"),
        (dict(paths=good, seq_len=8, eval_fraction=1.0), "eval_fraction must be in [0, 1), got 1.0"),
        (dict(paths=good, seq_len=8, eval_fraction=-0.1), "eval_fraction must be in [0, 1)"),
        (dict(paths=good, seq_len=8, format="csv"), "format must be one of"),
    ]
    for args, msg in cases:
        paths = args.pop("paths")
        with pytest.raises(DataError) as e:
            load_corpus(paths, ByteTok(), **kw, **args)
        assert str(e.value).startswith(msg), (args, str(e.value))
    with pytest.raises(DataError, match=r"g.jsonl:1: 'text' rows need a tokenizer"):
        load_corpus(good, None, seq_len=8, **kw)
    with pytest.raises(DataError, match="the tokenizer has 259 tokens, more than the model's vocabulary"):
        load_corpus(good, ByteTok(), seq_len=8, vocab_size=100, eos_id=EOS)
    with pytest.raises(DataError, match="at least 2 documents"):
        load_corpus(jsonl(tmp_path, "one.jsonl", [{"text": "x"}]), ByteTok(), seq_len=8, eval_fraction=0.5, **kw)


def test_empty_documents_are_skipped_and_counted(tmp_path):
    p = jsonl(tmp_path, "s.jsonl", [{"text": ""}, {"text": "ab"}, {"text": ""}])
    train, _, stats = load_corpus(p, ByteTok(), seq_len=8, vocab_size=V, eos_id=EOS)
    assert stats.skipped_empty == 2 and stats.train.documents == 1
    assert train.tokens.tolist() == [[ord("a") + 3, ord("b") + 3, EOS] + [0] * 6]
