"""KV-cache decoding, sampling rules and generation on the tiny_ref model.

Covered: the official teacher_forced_decode top-8 probabilities through our KV-cache path;
prefill + cached decode == full forward; batched generation == one-by-one (right-padded prompts of
different lengths); the official top-p rule (ties at the threshold kept); greedy; bad inputs.
"""
import json

import pytest
import torch

from grok_torch import Grok, generate
from grok_torch.sampling import SampleSettings, next_token_probs, sample, top_p_filter

BF16, FP32 = torch.bfloat16, torch.float32


@pytest.fixture(scope="module")
def model(tiny_int8_model):
    return tiny_int8_model


@pytest.fixture(scope="module")
def gen_ref(tiny_ref):
    return json.loads((tiny_ref / "tiny_reference.json").read_text())["generation"]


@torch.no_grad()
def test_teacher_forced_decode_top8(model, gen_ref):
    """Official prefill + sample_step with forced inputs (bf16, temperature 1): per-step top-8 probs.

    The official decode path itself differs from its full forward by ~1e-3..3e-2 (SPEC §3.4), so:
    |d prob| < 1e-2 at the reference top-8 ids, and the same top-1 wherever the reference top-1
    leads its runner-up by > 5 % (step 0 is a 1.5 % near-tie).
    """
    g = gen_ref["teacher_forced_decode"]
    m = model(BF16)
    cache = m.new_cache(1, 32)
    steps = [m(torch.tensor([g["prompt"]]), cache)[:, -1]]
    steps += [m(torch.tensor([[t]]), cache)[:, -1] for t in g["forced_inputs"]]
    for j, (lg, ids, want) in enumerate(zip(steps, g["top_k_token_ids"], g["top_k_probs"])):
        p = next_token_probs(lg, SampleSettings())[0]
        d = (p[ids] - torch.tensor(want)).abs().max().item()
        assert d < 1e-2, f"step {j}: max |d prob| {d:.3g}"
        if want[0] > 1.05 * want[1]:
            assert p.argmax().item() == ids[0], f"step {j}: top-1 {p.argmax().item()} != {ids[0]}"


@torch.no_grad()
def test_prefill_then_decode_equals_full_forward(model):
    """fp32: logits of prefill(8) + 8 single-token steps == one forward of the 16 tokens."""
    m = model(FP32)
    seq = torch.tensor([[25, 376, 378, 114, 444, 88, 404, 445, 247, 31, 83, 350, 22, 344, 72, 313]])
    full = m(seq).float()
    cache = m.new_cache(1)
    parts = [m(seq[:, :8], cache)] + [m(seq[:, i:i + 1], cache) for i in range(8, 16)]
    torch.testing.assert_close(torch.cat(parts, 1).float(), full, atol=1e-4, rtol=0)


@torch.no_grad()
def test_bf16_cache_path_probabilities(model):
    """bf16: the cache holds K/V in bf16 like the official runner, so the cached path is not the
    full forward bit for bit (in the official code either, SPEC §3.4: ~1e-3, 3e-2 after a routing
    flip). Reported here: next-token probabilities of both paths."""
    m = model(BF16)
    seq = torch.tensor([[25, 376, 378, 114, 444, 88, 404, 445, 247, 31, 83, 350, 22, 344, 72, 313]])
    full = torch.softmax(m(seq).float(), -1)
    cache = m.new_cache(1)
    parts = [m(seq[:, :8], cache)] + [m(seq[:, i:i + 1], cache) for i in range(8, 16)]
    cached = torch.softmax(torch.cat(parts, 1).float(), -1)
    d = (cached - full).abs().max().item()
    assert d < 3e-2, f"max |d prob| {d:.3g}"


@torch.no_grad()
def test_batched_generation_equals_one_by_one(model):
    m = model(BF16)
    prompts = [[25, 376, 378, 114, 444, 88, 404], [5, 48, 391], [90, 377, 358, 472, 397]]
    for kw in (dict(temperature=0), dict(temperature=1.0, top_p=0.9, seed=11)):
        batched = generate(m, prompts, 8, stop_at_eos=False, **kw)
        for i, p in enumerate(prompts):
            kw_i = dict(kw, seed=kw["seed"] + i) if "seed" in kw else kw  # row i samples with seed + i
            single = generate(m, [p], 8, stop_at_eos=False, **kw_i)[0]
            assert batched[i].tokens == single.tokens, (kw, i)


@torch.no_grad()
def test_greedy_and_seeded_sampling_are_deterministic(model):
    m = model(BF16)
    p = [25, 376, 378]
    a = generate(m, p, 6, temperature=0.8, seed=3)[0].tokens
    assert a == generate(m, p, 6, temperature=0.8, seed=3)[0].tokens
    greedy = generate(m, p, 1, temperature=0)[0].tokens
    assert greedy == [m(torch.tensor([p]), m.new_cache(1, 4))[0, -1].float().argmax().item()]


def _eos_after(m, monkeypatch, calls_before_eos, rows=None):
    """Make the LM head put EOS on top at its ``calls_before_eos``-th call (rows: which batch rows)."""
    head, n = m.head, {"calls": 0}

    def forced(x):
        logits = head(x)
        n["calls"] += 1
        if n["calls"] == calls_before_eos:
            logits[rows if rows is not None else slice(None), ..., m.config.eos_token_id] = 1e4
        return logits

    monkeypatch.setattr(m, "head", forced)


@torch.no_grad()
def test_stops_at_eos(model, monkeypatch):
    m = model(BF16)
    eos = m.config.eos_token_id
    _eos_after(m, monkeypatch, 3)                 # prefill picks token 1, decode calls 2 and 3
    out = generate(m, [25, 376], 30, temperature=0)[0]
    assert out.tokens[-1] == eos and len(out.tokens) == 3 and out.finish_reason == "eos"
    _eos_after(m, monkeypatch, 3)
    out = generate(m, [25, 376], 10, temperature=0, stop_at_eos=False)[0]
    assert out.tokens[2] == eos and len(out.tokens) == 10 and out.finish_reason == "length"


@torch.no_grad()
def test_batched_row_stops_alone(model, monkeypatch):
    m = model(BF16)
    alone = generate(m, [5, 6, 7], 6, temperature=0)[0].tokens
    _eos_after(m, monkeypatch, 2, rows=0)         # only row 0 sees EOS, at its second token
    a, b = generate(m, [[25, 376], [5, 6, 7]], 6, temperature=0)
    assert a.tokens[-1] == m.config.eos_token_id and len(a.tokens) == 2 and a.finish_reason == "eos"
    assert b.tokens == alone and b.finish_reason == "length"


def test_top_p_official_rule_keeps_ties():
    logits = torch.tensor([[3.0, 1.0, 1.0, 0.0, -1.0]])
    # p small: only the max survives
    assert (top_p_filter(logits, 0.1) > -1e9).tolist() == [[True, False, False, False, False]]
    # the threshold lands on a tied logit: both copies are kept
    probs = torch.softmax(logits, -1)[0]
    p = float(probs[0] + probs[1]) - 1e-3
    assert (top_p_filter(logits, p) > -1e9).tolist() == [[True, True, True, False, False]]
    assert torch.equal(top_p_filter(logits, 1.0), logits)


def test_top_p_tiny_keeps_only_the_max():
    """top_p=1e-8: the fp32 cumsum never reaches 1 - 1e-8, so the threshold is the largest logit and
    exactly the max (and its ties) survive, rather than every token."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 512, generator=g)
    logits[1, 7] = logits[1].max()                 # a row with a tie at the max
    kept = top_p_filter(logits, 1e-8) > -1e9
    assert torch.equal(kept, logits == logits.max(dim=-1, keepdim=True).values)
    assert kept.sum(-1).tolist() == [1, 2, 1, 1]
    for dtype in (torch.bfloat16, torch.float32):
        probs = next_token_probs(logits.to(dtype), SampleSettings(1.0, 1e-8))
        assert torch.equal(probs > 0, kept)


def test_sample_greedy_and_seeded():
    logits = torch.tensor([[0.0, 2.0, 2.0, 1.0]])
    assert sample(logits, SampleSettings(temperature=0)).tolist() == [1]  # ties -> lower id
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    s = SampleSettings(temperature=1.0)
    assert [sample(logits, s, [g1]).item() for _ in range(5)] == [sample(logits, s, [g2]).item() for _ in range(5)]
    with pytest.raises(ValueError, match="top_p"):
        SampleSettings(top_p=0.0)


@torch.no_grad()
def test_nucleus_step0_matches_official(model, gen_ref):
    """Official nucleus run (temperature 1, top_p 0.5), step 0: top-8 of the filtered distribution.

    The filter must show: the same official top-8 ids survive (official probs are 0 for filtered
    ids), and the renormalised probs match to 8e-3 (measured 0.0068; with top-p filtering disabled
    the unrenormalised probs are 0.0099 off, which the 1e-2 bound alone would let through).

    Known gap, not emulated: the official filter keeps more than top_p of the mass. Its own
    teacher-forced step-0 probs (temperature 1, no filter) divided by these filtered ones give a kept
    mass of 0.61 for every top-8 id, where the rule keeps 0.51 (80 of 512 tokens; the official ~122).
    A softmax denominator accumulated in bf16 largest-term-first (43.5 instead of 58.5) reproduces it
    (max |d| 9e-4 here, better on 14 of the 16 steps of the run); bf16 cumsum or softmax in any other
    order does not. Which XLA behaviour does that is unconfirmed, so the rule is kept as written.
    """
    g = gen_ref["nucleus"]
    m = model(BF16)
    p = next_token_probs(m(torch.tensor([g["prompt"]]))[:, -1], SampleSettings(1.0, g["nucleus_p"]))[0]
    ids, want = g["top_k_token_ids"][0], torch.tensor(g["top_k_probs"][0])
    d = (p[ids] - want).abs().max().item()
    assert d < 1e-2, f"max |d prob| {d:.3g}"
    assert (p[ids] > 0).tolist() == (want > 0).tolist()
    assert d < 8e-3, f"max |d prob| {d:.3g} (is the top-p filter applied?)"


@torch.no_grad()
def test_context_boundary(model, monkeypatch):
    """The last generated token is never fed back, so prompt + max_new_tokens - 1 positions are
    needed: on the 64-token context, 3 + 62 and 64 + 1 fit, 3 + 63 and 65 + 1 do not; the KV cache
    holds exactly what is needed."""
    m = model(BF16)
    ctx = m.config.max_seq_len
    assert ctx == 64
    sizes, new_cache = [], m.new_cache

    def spy(batch, max_len=None):
        sizes.append(max_len)
        return new_cache(batch, max_len)

    monkeypatch.setattr(m, "new_cache", spy)
    for prompt_len, n in ((3, ctx - 2), (ctx, 1), ([3, 5], ctx - 4)):
        prompts = [[7] * k for k in prompt_len] if isinstance(prompt_len, list) else [7] * prompt_len
        out = generate(m, prompts, n, temperature=0, stop_at_eos=False)
        assert all(len(r.tokens) == n for r in out)
        assert sizes[-1] == max(len(r.prompt) for r in out) + n - 1 <= ctx
    with pytest.raises(ValueError, match="needs 65 positions"):
        generate(m, [7] * 3, ctx - 1)
    with pytest.raises(ValueError, match="prompt length 65 does not fit"):
        generate(m, [7] * (ctx + 1), 1)


def test_encode_prompts_accepts_array_likes():
    import numpy as np

    from grok_torch.generate import encode_prompts

    assert encode_prompts(np.array([1, 2, 3])) == [[1, 2, 3]]
    assert encode_prompts(np.array([[1, 2], [3, 4]])) == [[1, 2], [3, 4]]
    assert encode_prompts([np.int64(5), np.int32(6)]) == [[5, 6]]
    assert encode_prompts(torch.tensor([7, 8])) == [[7, 8]]
    assert encode_prompts(torch.tensor([[7, 8], [9, 10]])) == [[7, 8], [9, 10]]
    assert encode_prompts([torch.tensor([1, 2]), np.array([3]), (4, 5)]) == [[1, 2], [3], [4, 5]]
    for empty in ([], np.array([], dtype=np.int64), torch.zeros(0, 3, dtype=torch.long)):
        with pytest.raises(ValueError, match="no prompts given"):
            encode_prompts(empty)
    with pytest.raises(ValueError, match="prompt is empty"):
        encode_prompts([[1], []])
    with pytest.raises(TypeError, match="token ids must be integers"):
        encode_prompts([1.5, 2])
    with pytest.raises(TypeError, match="prompts must be"):
        encode_prompts(None)


@torch.no_grad()
def test_generate_with_array_prompts(model):
    import numpy as np

    m = model(BF16)
    want = generate(m, [[25, 376, 378], [5, 48, 391]], 3, temperature=0)
    for prompts in (np.array([[25, 376, 378], [5, 48, 391]]), torch.tensor([[25, 376, 378], [5, 48, 391]]),
                    [np.array([25, 376, 378]), torch.tensor([5, 48, 391])]):
        assert [r.tokens for r in generate(m, prompts, 3, temperature=0)] == [r.tokens for r in want]
    assert generate(m, np.array([25, 376, 378]), 3, temperature=0)[0].tokens == want[0].tokens
    with pytest.raises(ValueError, match="no prompts given"):
        generate(m, [], 3)


# ---- bad input -----------------------------------------------------------------------------

@torch.no_grad()
def test_bad_inputs_name_the_problem(model, converted):
    m = model(BF16)
    V, ctx = m.config.vocab_size, m.config.max_seq_len
    with pytest.raises(ValueError, match=f"token id {V} is out of range"):
        m(torch.tensor([[1, V]]))
    with pytest.raises(ValueError, match="token id -1 is out of range"):
        m(torch.tensor([[1, -1]]))
    with pytest.raises(TypeError, match="integer tensor"):
        m(torch.tensor([[1.0, 2.0]]))
    with pytest.raises(ValueError, match="exceeds the model context"):
        m(torch.ones(1, ctx + 1, dtype=torch.long))
    with pytest.raises(ValueError, match="prompt length"):
        generate(m, [1] * (ctx + 1), 1)   # a prompt of ctx tokens can still take 1 new token
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(m, [1] * 10, ctx)
    with pytest.raises(ValueError, match="prompt token id"):
        generate(m, [1, V + 5], 2)
    with pytest.raises(ValueError, match="tokenizer"):
        generate(m, "hello", 2)
    with pytest.raises(ValueError, match="dtype"):
        Grok.from_pretrained(converted("int8"), dtype=torch.float16)
    wrong = m.config.replace(num_layers=m.config.num_layers - 1)
    with pytest.raises(ValueError, match="num_layers"):
        Grok.from_pretrained(converted("int8"), config=wrong)
