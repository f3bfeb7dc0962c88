"""The transformers dialect (no transformers needed): from_pretrained(torch_dtype=, device_map=),
model.device / dtype / config, ``.to(dtype)`` as the activation dtype, ``model.generate`` -> a
[B, T + T_new] LongTensor, the callable Tokenizer. Each is checked against the native call (same tokens)."""
import numpy as np
import pytest
import torch

from grok_torch import Grok, GrokConfig, Tokenizer, generate, stream
from grok_torch.model import RMSNorm
from grok_torch.moe import Router
from grok_torch.tokenizer import BUNDLED_TOKENIZER

BF16, FP32 = torch.bfloat16, torch.float32
PROMPTS = [[25, 376, 378], [5, 48, 391, 9, 11], [90, 377]]


def random_model(name: str, dtype=FP32, seed: int = 0) -> Grok:
    """An in-memory model of config ``name`` with random weights (norm scales 1)."""
    torch.manual_seed(seed)
    m = Grok(GrokConfig.from_name(name), dtype, impl="torch")
    for n, p in m.named_parameters():
        if n.endswith("norm.weight"):
            p.data.fill_(1.0)
        elif p.dtype == torch.int8:
            p.data.random_(-127, 128)
        else:
            p.data.normal_(0, 0.02)
    return m.eval()


@pytest.fixture(scope="module")
def tiny():
    return random_model("tiny")


@pytest.fixture(scope="module")
def demo():
    """Grok-1's vocabulary (the bundled tokenizer's), tiny shapes."""
    return random_model("demo")


@pytest.fixture(scope="module")
def tok():
    return Tokenizer()


def left_padded(prompts, pad=0):
    T = max(map(len, prompts))
    ids = torch.tensor([[pad] * (T - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (T - len(p)) + [1] * len(p) for p in prompts])
    return ids, mask


def expected(native, T, eos, pad=0):
    """Native per-row tokens -> the rows transformers' generate appends: cut after the first eos,
    padded with ``pad`` to the longest row."""
    rows = []
    for toks in native:
        cut = next((i + 1 for i, t in enumerate(toks) if t in eos), len(toks))
        rows.append(toks[:cut])
    n = max(map(len, rows))
    return torch.tensor([r + [pad] * (n - len(r)) for r in rows])


# ---- from_pretrained / device / dtype / config ---------------------------------------------------

@pytest.mark.parametrize("spelling, want", [("bfloat16", BF16), ("bf16", BF16), ("float32", FP32), ("fp32", FP32),
                                            ("torch.float32", FP32), (BF16, BF16), ("auto", BF16)])
def test_from_pretrained_dtype_strings(converted, spelling, want):
    m = Grok.from_pretrained(converted("int8"), torch_dtype=spelling, device_map="cpu", impl="torch")
    assert m.dtype == want and m.device == torch.device("cpu")
    assert isinstance(m.config, GrokConfig) and m.config.vocab_size == 512


def test_from_pretrained_bad_dtype_and_device_map(converted):
    with pytest.raises(ValueError, match="torch_dtype='float16' is not a supported dtype"):
        Grok.from_pretrained(converted("int8"), torch_dtype="float16")
    with pytest.raises(ValueError, match="dtype.*disagree"):
        Grok.from_pretrained(converted("int8"), dtype="bf16", torch_dtype="fp32")
    with pytest.raises(ValueError, match="device_map='nowhere' is neither a device nor one of"):
        Grok.from_pretrained(converted("int8"), device_map="nowhere")


@pytest.mark.parametrize("fmt", ["int8", "fp32"])
@torch.no_grad()
def test_to_bf16_equals_loading_in_bf16(converted, fmt):
    """``.to(torch.bfloat16)`` switches the activation dtype: the norms, routers (and an fp32 checkpoint's
    attention matrices and embedding) stay fp32, so the logits are those of a model loaded in bf16."""
    x = torch.tensor(PROMPTS[1:2])
    want = Grok.from_pretrained(converted(fmt), dtype=BF16, impl="torch")(x)
    for switch in (lambda m: m.to(BF16), lambda m: m.bfloat16(), lambda m: m.to("cpu", BF16),
                   lambda m: m.to(dtype=BF16)):
        m = switch(Grok.from_pretrained(converted(fmt), dtype=FP32, impl="torch"))
        assert m.dtype == BF16 and m.layers[0].moe.dtype == BF16 and m.new_cache(1, 4).dtype == BF16
        got = m(x)
        assert got.dtype == BF16 and torch.equal(got, want)


@torch.no_grad()
def test_to_dtype_keeps_fp32_parts_and_round_trips(tiny):
    m = random_model("tiny")
    x = torch.tensor(PROMPTS[:1])
    fp32 = m(x)
    built = Grok(m.config, BF16, impl="torch")
    built.load_state_dict(m.state_dict())
    m.to(BF16)
    assert torch.equal(m(x), built.eval()(x))
    fp32_parts = [p for mod in m.modules() if isinstance(mod, (RMSNorm, Router)) for p in mod.parameters()]
    assert fp32_parts and all(p.dtype == FP32 for p in fp32_parts)
    assert m.layers[0].moe.w1.weight.dtype == torch.int8 and m.layers[0].attn.wq.scales.dtype == BF16
    assert torch.equal(m.float()(x), fp32) and m.dtype == FP32  # int8 weights: nothing was rounded
    assert m.to("cpu") is m and m.dtype == FP32


def test_unsupported_dtypes_are_refused(tiny):
    m = random_model("tiny")
    for call in (m.half, m.double, lambda: m.to(torch.float16), lambda: m.to("cpu", torch.float16)):
        with pytest.raises(ValueError, match="bfloat16.*float32.*model.bfloat16"):
            call()
    assert m.dtype == FP32 and all(p.dtype in (FP32, torch.int8, BF16) for p in m.parameters())


# ---- model.generate --------------------------------------------------------------------------

@torch.no_grad()
def test_generate_greedy_left_padded_equals_native(tiny):
    ids, mask = left_padded(PROMPTS)
    native = [r.tokens for r in generate(tiny, PROMPTS, 6, temperature=0, stop_at_eos=False)]
    out = tiny.generate(ids, attention_mask=mask, max_new_tokens=6)
    assert out.dtype == torch.long and out.shape == (3, ids.shape[1] + 6)
    assert torch.equal(out[:, :ids.shape[1]], ids)
    assert torch.equal(out[:, ids.shape[1]:], expected(native, ids.shape[1], eos={2}))
    # without a mask the pad id (0) marks the padding, as transformers infers it
    assert torch.equal(tiny.generate(ids, max_new_tokens=6), out)
    # one row without a mask: every position is the prompt
    assert torch.equal(tiny.generate(torch.tensor(PROMPTS[:1]), max_new_tokens=6)[0, 3:], torch.tensor(native[0]))


@torch.no_grad()
def test_generate_eos_pads_finished_rows_and_stops(tiny):
    """A row that produced an eos_token_id is padded with pad_token_id; generation ends when every row has."""
    ids, mask = left_padded(PROMPTS)
    native = [r.tokens for r in generate(tiny, PROMPTS, 8, temperature=0, stop_at_eos=False)]
    eos = {native[0][1], native[1][2]}  # row 0 ends at its 2nd token, row 1 at its 3rd (or earlier)
    if any(native[2][0] == e for e in eos):
        pytest.skip("row 2's first token is one of the chosen eos ids")
    out = tiny.generate(ids, mask, max_new_tokens=8, eos_token_id=sorted(eos), pad_token_id=7)
    want = expected(native, ids.shape[1], eos, pad=7)
    assert torch.equal(out[:, ids.shape[1]:], want)
    one = tiny.generate(ids[:2], mask[:2], max_new_tokens=8, eos_token_id=sorted(eos))
    assert one.shape[1] - ids.shape[1] == max(
        next(i + 1 for i, t in enumerate(r) if t in eos) for r in native[:2]) < 8


@torch.no_grad()
def test_generate_sampling_equals_native(tiny):
    ids, mask = left_padded(PROMPTS)
    kw = dict(temperature=0.8, top_p=0.9, top_k=40, seed=7)
    native = [r.tokens for r in generate(tiny, PROMPTS, 5, **kw)]
    out = tiny.generate(ids, mask, max_new_tokens=5, do_sample=True, **kw)
    assert torch.equal(out[:, ids.shape[1]:], expected(native, ids.shape[1], eos={2}))
    greedy = tiny.generate(ids, mask, max_new_tokens=5, do_sample=False, **kw)  # sampling settings unused
    native = [r.tokens for r in generate(tiny, PROMPTS, 5, temperature=0)]
    assert torch.equal(greedy[:, ids.shape[1]:], expected(native, ids.shape[1], eos={2}))


@torch.no_grad()
def test_generate_streamer_gets_prompt_then_each_step(tiny):
    class Recorder:
        def __init__(self):
            self.puts, self.ended = [], 0

        def put(self, value):
            self.puts.append(value.clone())

        def end(self):
            self.ended += 1

    ids, mask = left_padded(PROMPTS)
    rec = Recorder()
    out = tiny.generate(ids, mask, max_new_tokens=4, streamer=rec)
    assert rec.ended == 1 and torch.equal(rec.puts[0], ids)
    assert torch.equal(torch.stack(rec.puts[1:], dim=1), out[:, ids.shape[1]:])


def test_generate_bad_inputs(tiny):
    ids, mask = left_padded(PROMPTS)
    with pytest.raises(ValueError, match="attention_mask .* must have input_ids' shape"):
        tiny.generate(ids, mask[:, 1:], max_new_tokens=2)
    with pytest.raises(ValueError, match="row 0 of attention_mask has no 1"):
        tiny.generate(ids, torch.zeros_like(mask), max_new_tokens=2)
    with pytest.raises(ValueError, match="input_ids must be an integer"):
        tiny.generate(ids.float(), max_new_tokens=2)
    with pytest.raises(ValueError, match="max_new_tokens"):
        tiny.generate(ids, mask, max_new_tokens=0)


@torch.no_grad()
def test_generate_max_length_and_the_transformers_arguments_it_does_not_have(tiny):
    ids, mask = left_padded(PROMPTS)
    T = ids.shape[1]
    want = tiny.generate(ids, mask, max_new_tokens=4)
    assert torch.equal(tiny.generate(ids, mask, max_length=T + 4), want)     # prompt + new, transformers' spelling
    assert torch.equal(tiny.generate(ids, mask, max_new_tokens=4, use_cache=False, num_beams=1), want)
    with pytest.raises(ValueError, match="not both"):
        tiny.generate(ids, mask, max_new_tokens=4, max_length=T + 4)
    with pytest.raises(ValueError, match=f"max_length={T} leaves no room"):
        tiny.generate(ids, mask, max_length=T)
    with pytest.raises(ValueError, match="num_beams=4: beam search is not implemented"):
        tiny.generate(ids, mask, max_new_tokens=2, num_beams=4)
    with pytest.raises(ValueError, match="num_return_sequences=2 is not supported: repeat the rows"):
        tiny.generate(ids, mask, max_new_tokens=2, num_return_sequences=2)
    ctx = tiny.config.max_seq_len                                              # tiny: 64
    with pytest.warns(UserWarning, match=f"generating at most {ctx - T + 1} tokens, not the default 100"):
        assert tiny.generate(ids, mask).shape[1] <= ctx + 1
    with pytest.raises(ValueError, match=f"max_length={ctx + 2} is beyond the model's context of {ctx}"):
        tiny.generate(ids, mask, max_length=ctx + 2)
    with pytest.raises(TypeError, match="model.generate: unsupported argument.s. min_new_tokens, repetition_penalty"):
        tiny.generate(ids, mask, max_new_tokens=2, repetition_penalty=1.1, min_new_tokens=1)


@pytest.mark.parametrize("first", ["import grok_torch.generate", "from grok_torch.generate import stream",
                                   "from grok_torch import Grok", "from grok_torch import generate"])
def test_generate_is_the_function_and_the_module_whatever_was_imported_first(first):
    """``from grok_torch import generate`` calls like the function, ``import grok_torch.generate as g`` is the
    module (g.generate_ids, g.stream), in either import order (fresh interpreters)."""
    import subprocess
    import sys

    code = (f"{first}\n"
            "import grok_torch.generate as g\n"
            "from grok_torch import generate\n"
            "from grok_torch.generate import generate as fn, generate_ids\n"
            "assert g is generate and g.generate_ids is generate_ids and callable(g.stream), g\n"
            "from grok_torch.config import GrokConfig\n"
            "from grok_torch.model import Grok\n"
            "import torch\n"
            "torch.manual_seed(0)\n"
            "m = Grok(GrokConfig.from_name('tiny', num_layers=1), dtype=torch.float32)\n"
            "for p in m.parameters():\n"
            "    torch.nn.init.normal_(p, std=0.02) if p.is_floating_point() else None\n"
            "a = generate(m, [[5, 6]], 3, temperature=0)[0].tokens\n"
            "assert a == fn(m, [[5, 6]], 3, temperature=0)[0].tokens and len(a) == 3, a\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]


# ---- the tokenizer, alone and with generate ---------------------------------------------------

def test_tokenizer_call_padding_and_decode(tok, tmp_path):
    texts = ["The answer to life", "Hi"]
    one = tok(texts[0], return_tensors="pt")
    assert one["input_ids"].tolist() == [tok.encode(texts[0])] and one.attention_mask.tolist() == [[1] * 4]
    assert tok(texts[0]).input_ids == tok.encode(texts[0])
    batch = tok(texts, padding=True, return_tensors="pt")
    a, b = tok.encode(texts[0]), tok.encode(texts[1])
    assert batch.input_ids.tolist() == [a, [0] * (len(a) - len(b)) + b]
    assert batch.attention_mask.tolist() == [[1] * len(a), [0] * (len(a) - len(b)) + [1] * len(b)]
    right = tok(texts, padding=True, padding_side="right", return_tensors="np")
    assert isinstance(right["input_ids"], np.ndarray) and right["input_ids"][1].tolist() == b + [0] * (len(a) - len(b))
    assert tok(texts[0], add_special_tokens=True).input_ids[0] == tok.bos_token_id
    assert tok(texts[0], truncation=True, max_length=2).input_ids == a[:2]
    with pytest.raises(ValueError, match="padding=True"):
        tok(texts, return_tensors="pt")
    assert batch.to("cpu").input_ids.device.type == "cpu"

    assert tok.batch_decode(batch.input_ids, skip_special_tokens=True) == texts
    assert tok.batch_decode(batch["input_ids"])[1] == "[PAD]" * (len(a) - len(b)) + "Hi"
    assert tok.decode([*a, 2], skip_special_tokens=False) == texts[0] + "[EOS]"
    assert tok.decode(torch.tensor([*a, 2]), skip_special_tokens=True) == texts[0]
    with pytest.raises(ValueError, match="batch_decode"):
        tok.decode(batch.input_ids)
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.vocab_size) == (0, 1, 2, 131072)

    (tmp_path / "tokenizer.model").write_bytes(open(BUNDLED_TOKENIZER, "rb").read())
    assert Tokenizer.from_pretrained(tmp_path).encode(texts[0]) == a


@torch.no_grad()
def test_text_generation_hf_style_equals_native(demo, tok):
    """tok(texts, padding=True) -> model.generate -> batch_decode: the native generate's tokens and text."""
    texts = ["The answer to life", "Hi", "Grok"]
    native = generate(demo, texts, 5, tokenizer=tok, temperature=0)
    inputs = tok(texts, padding=True, return_tensors="pt")
    out = demo.generate(**inputs, max_new_tokens=5)
    T = inputs["input_ids"].shape[1]
    assert torch.equal(out[:, T:], expected([r.tokens for r in native], T, eos={2}))
    assert tok.batch_decode(out[:, T:], skip_special_tokens=True) == [r.text for r in native]


@torch.no_grad()
def test_stream_with_tokenizer_yields_text(demo, tok):
    """stream(..., tokenizer=) yields each row's new text; joined, it is Generation.text."""
    texts = ["The answer to life", "naïve café"]
    native = generate(demo, texts, 6, tokenizer=tok, temperature=0.9, seed=3)
    pieces = list(stream(demo, texts, 6, tokenizer=tok, temperature=0.9, seed=3))
    assert all(isinstance(p, str) for step in pieces for p in step if p is not None)
    assert ["".join(step[b] or "" for step in pieces) for b in range(2)] == [r.text for r in native]
