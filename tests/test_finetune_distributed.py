"""grok-finetune under expert parallelism: 2 gloo processes (as torchrun starts them) vs one process.

These tests run expert parallelism WITHOUT data parallelism (``data_parallel=False``: every rank the
same batches); the default, data parallel, is tests/test_finetune_dp.py.

Each rank is tests/finetune_dist_worker.py (finetune() initialises the group from RANK / WORLD_SIZE /
MASTER_*), one thread, the tiny_ref int8 model, fp32, reference kernels, LoRA on attn + experts +
router. Every launch is bounded (60 s, the group's timeout 30 s): a failure never hangs the suite.

Tolerance. With clipping inactive, the 2-process run is the one-process run bit for bit (loss curve
and the adapter file's bytes): the forward is bit-equal (the exchange's contract), and so is every
gradient, because with top-2 a token's d(x) gets at most two expert terms, added in the same order
(or as an exact 0 plus one term) by the rank-ordered sum of the exchange's backward. The one sum
whose order differs is the gradient NORM: torch's clip_grad_norm_ takes each [E, in, r] tensor's
norm whole, the 2-process run sums its ranks' squares (the full tensors are never gathered). Where
clipping is active the clip factor may thus differ in its last bits (measured: norm 4.3540263 vs
4.3540268, 1.1e-7 relative), and every parameter with it: bounded here by 1e-6 relative on the
norm and losses, 1e-6 absolute on the adapters (measured: losses equal, adapters 7.5e-9).
"""
import json
import os
import shutil
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from grok_torch.finetune.train import TrainConfig, finetune
from test_distributed import launch, one_thread
from test_finetune import corpus  # noqa: F401  (the fixture: 20 documents of 40 tokens)

WORKER = Path(__file__).with_name("finetune_dist_worker.py")
# the workers import this checkout's grok_torch (not whichever one the environment's install points at)
PYTHONPATH = os.pathsep.join([str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)


def settings(converted, corpus, out, **kw):
    return {**dict(model=str(converted("int8")), data=[str(corpus)], output_dir=str(out), seq_len=32, batch_size=4,
                   lr=1e-2, max_steps=4, save_every=2, dtype="fp32", impl="torch", progress=False, plot=False,
                   lora_rank=4, lora_targets=["attn", "experts", "router"], dist_timeout=30.0, data_parallel=False),
            **kw}


def two_ranks(s: dict, dump: Path, exchange: str = ""):
    dump.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    ranks = launch([[sys.executable, WORKER, dump]] * 2, dump, timeout=60,
                   env={r: {"SETTINGS": json.dumps(s), "EXCHANGE": exchange, "PYTHONPATH": PYTHONPATH} for r in range(2)})
    assert all(r.rc == 0 for r in ranks), [r.err[-2000:] for r in ranks]
    return [torch.load(dump / f"rank{r}.pt") for r in range(2)], time.monotonic() - t0


def one_rank(s: dict):
    with one_thread():
        finetune(TrainConfig(**s))


def rows(out: Path, key="loss"):
    return [r[key] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if key in r]


def adapters(out: Path):
    return load_file(str(out / "adapter_model.safetensors"))


def test_two_processes_train_like_one(converted, corpus, tmp_path):
    # clipping inactive: bit for bit, with the default (all_to_all) exchange and gradient checkpointing
    s = settings(converted, corpus, tmp_path / "ep", max_grad_norm=1e9, gradient_checkpointing=True)
    dumps, seconds = two_ranks(s, tmp_path / "dump")
    one_rank({**s, "output_dir": str(tmp_path / "one")})
    assert rows(tmp_path / "ep") == rows(tmp_path / "one") and len(rows(tmp_path / "one")) == 4
    assert rows(tmp_path / "ep", "grad_norm") != [] and max(rows(tmp_path / "ep", "grad_norm")) < 1e9
    assert (tmp_path / "ep" / "adapter_model.safetensors").read_bytes() == \
        (tmp_path / "one" / "adapter_model.safetensors").read_bytes()
    # each rank trained half of every layer's experts; the replicated adapters are the same bits on both
    shapes = dumps[0]["experts"]
    assert shapes["layers.0.moe.shards.0.w1.lora.A"] == (4, 128, 4) == dumps[1]["experts"]["layers.0.moe.shards.0.w1.lora.A"]
    rep0, rep1 = dumps[0]["replicated"], dumps[1]["replicated"]
    assert rep0.keys() == rep1.keys() and len(rep0) == 12 * 10  # 4 attn + 1 router matrices, A and B, 12 layers
    assert all(torch.equal(rep0[k], rep1[k]) for k in rep0)
    # rank 0 wrote OUT; every rank its state into each checkpoint
    for step in (2, 4):
        names = {p.name for p in (tmp_path / "ep" / f"checkpoint-{step}").iterdir()}
        assert {"trainer_state.pt", "trainer_state-rank1.pt", "adapter_model.safetensors"} <= names
    assert not list((tmp_path / "ep").glob(".checkpoint-*"))

    # interrupted after checkpoint-2, resumed by 2 processes: the uninterrupted run's curve and bytes
    shutil.copytree(tmp_path / "ep", tmp_path / "re")
    shutil.rmtree(tmp_path / "re" / "checkpoint-4")
    two_ranks({**s, "output_dir": str(tmp_path / "re"), "resume": True}, tmp_path / "dump_re")
    assert rows(tmp_path / "re") == rows(tmp_path / "ep")
    assert (tmp_path / "re" / "adapter_model.safetensors").read_bytes() == \
        (tmp_path / "ep" / "adapter_model.safetensors").read_bytes()
    # a 2-process checkpoint is not resumed by one process (each rank holds its experts' optimizer state)
    with pytest.raises(ValueError, match="written by 2 process"):
        one_rank({**s, "output_dir": str(tmp_path / "re"), "resume": True})
    print(f"2-process run: {seconds:.1f} s")


def test_with_clipping_and_the_all_reduce_exchange(converted, corpus, tmp_path):
    s = settings(converted, corpus, tmp_path / "ep")  # max_grad_norm 1.0: clipping active (norms ~4)
    two_ranks(s, tmp_path / "dump", exchange="all_reduce")
    one_rank({**s, "output_dir": str(tmp_path / "one")})
    norms_ep, norms_one = rows(tmp_path / "ep", "grad_norm"), rows(tmp_path / "one", "grad_norm")
    assert min(norms_one) > 1.0
    assert norms_ep == pytest.approx(norms_one, rel=1e-6)
    assert rows(tmp_path / "ep") == pytest.approx(rows(tmp_path / "one"), rel=1e-6)
    a, b = adapters(tmp_path / "ep"), adapters(tmp_path / "one")
    assert a.keys() == b.keys()
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-6


def test_refused_with_several_processes(converted, corpus, tmp_path):
    s = settings(converted, corpus, tmp_path / "ep", lora_dropout=0.1)
    ranks = launch([[sys.executable, WORKER, tmp_path]] * 2, tmp_path, timeout=60,
                   env={r: {"SETTINGS": json.dumps(s), "PYTHONPATH": PYTHONPATH} for r in range(2)})
    assert all(r.rc == 1 for r in ranks)
    assert "--lora-dropout with experts in --lora-targets and --no-data-parallel is not available with several " \
        "processes" in ranks[0].err
    assert not (tmp_path / "ep").exists()
