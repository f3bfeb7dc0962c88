"""grok-finetune under `accelerate launch`: its process group and its mixed-precision setting.

`accelerate launch --multi_gpu --num_processes 2` on CPUs starts two gloo ranks as torchrun does;
the run must follow the one-process run with the global batch within the bounds that
tests/test_finetune_dp.py states and justifies (the same settings as its first test). Mixed
precision comes through accelerate (`--mixed_precision`, exported as ACCELERATE_MIXED_PRECISION):
bf16 selects the release's own bf16 mode, fp16 is refused, a contradicting --dtype too
(``train.resolve_dtype`` says why autocast is not used).
"""
import os
import shutil
import subprocess
import sys

import pytest

from grok_torch.finetune.train import resolve_dtype
from test_distributed import _free_port
from test_finetune import corpus  # noqa: F401  (the fixture: 20 documents of 40 tokens)
from test_finetune_distributed import PYTHONPATH, one_rank
from test_finetune_dp import compare, dp_settings

ACCELERATE = shutil.which("accelerate")


def test_resolve_dtype_follows_accelerate(monkeypatch):
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    assert resolve_dtype(None) == "bf16" and resolve_dtype("fp32") == "fp32"
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    assert resolve_dtype(None) == "bf16" and resolve_dtype("bf16") == "bf16"
    with pytest.raises(ValueError, match=r"--dtype fp32 contradicts accelerate's --mixed_precision bf16"):
        resolve_dtype("fp32")
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "no")      # accelerate's default: the model's own
    assert resolve_dtype(None) == "bf16" and resolve_dtype("fp32") == "fp32"
    with pytest.raises(ValueError, match="--dtype must be bf16 or fp32, got 'fp16'"):   # before the accelerate check
        resolve_dtype("fp16")
    for mp in ("fp16", "fp8"):
        monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", mp)
        with pytest.raises(ValueError, match=f"mixed precision '{mp}'.*not supported"):
            resolve_dtype(None)


def _accelerate(args, tmp_path, timeout=120):
    env = dict(os.environ, PYTHONPATH=PYTHONPATH, OMP_NUM_THREADS="1")
    env.pop("ACCELERATE_MIXED_PRECISION", None)
    return subprocess.run([ACCELERATE, "launch", "--main_process_port", str(_free_port()), "--num_machines", "1",
                           "--dynamo_backend", "no", *args], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=timeout)


def _flags(s: dict):
    return ["-m", "grok_torch.finetune", "--model", s["model"], "--data", *s["data"], "--output-dir", s["output_dir"],
            "--seq-len", str(s["seq_len"]), "--batch-size", str(s["batch_size"]), "--lr", str(s["lr"]),
            "--max-steps", str(s["max_steps"]), "--save-every", str(s["save_every"]), "--impl", s["impl"],
            "--lora-rank", str(s["lora_rank"]), "--lora-targets", ",".join(s["lora_targets"]),
            "--aux-loss-weight", str(s.get("aux_loss_weight", 0)), "--z-loss-weight", str(s.get("z_loss_weight", 0)),
            "--dist-timeout", "30", "--no-progress"]


@pytest.mark.skipif(ACCELERATE is None, reason="the accelerate CLI is not on PATH")
def test_accelerate_launch_two_processes_train_like_one(converted, corpus, tmp_path):
    s = dp_settings(converted, corpus, tmp_path / "acc", aux_loss_weight=0.01, z_loss_weight=0.001)
    r = _accelerate(["--multi_gpu", "--num_processes", "2", "--mixed_precision", "no",
                     *_flags(s), "--dtype", "fp32"], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    # rank 0 alone reports, naming the precision and the processes
    assert r.stdout.count("grok-finetune: 4 steps (fp32, 2 processes)") == 1, r.stdout
    one_rank({**s, "batch_size": 4, "output_dir": str(tmp_path / "one")})
    compare(tmp_path / "acc", tmp_path / "one")


@pytest.mark.skipif(ACCELERATE is None, reason="the accelerate CLI is not on PATH")
def test_accelerate_mixed_precision_is_honoured(converted, corpus, tmp_path):
    s = dp_settings(converted, corpus, tmp_path / "bf16", max_steps=1, save_every=0)
    r = _accelerate(["--num_processes", "1", "--mixed_precision", "bf16", *_flags(s)], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "grok-finetune: 1 steps (bf16)" in r.stdout
    for mp, extra, msg in (("fp16", [], "accelerate's mixed precision 'fp16'"),
                           ("bf16", ["--dtype", "fp32"], "--dtype fp32 contradicts accelerate's --mixed_precision bf16")):
        out = tmp_path / f"refused-{mp}"
        r = _accelerate(["--num_processes", "1", "--mixed_precision", mp,
                         *_flags({**s, "output_dir": str(out)}), *extra], tmp_path)
        assert r.returncode != 0 and f"grok-finetune: {msg}" in r.stderr, r.stderr[-3000:]
        assert not out.exists()         # refused before anything is written


def test_full_fine_tuning_of_a_bf16_checkpoint_warns_that_it_trains_bf16(converted, corpus, tmp_path):
    from grok_torch.finetune.train import TrainConfig, finetune

    s = dict(model=str(converted("bf16")), data=[str(corpus)], output_dir=str(tmp_path / "full"), seq_len=16,
             max_steps=1, full=True, lr=1e-5, dtype="bf16", impl="torch", progress=False, plot=False)
    with pytest.warns(UserWarning, match="are bf16, and so is their AdamW state.*grok-convert --dtype fp32"):
        finetune(TrainConfig(**s))
