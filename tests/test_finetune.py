"""grok-finetune on the tiny_ref model (int8 base, fp32 activations, CPU reference kernels).

* overfit: a 20-document corpus; the training loss falls below 30 % of its start well within a minute;
* an interrupted run (stopped after a checkpoint) resumed with --resume gives the uninterrupted
  run's loss curve and final adapter exactly (fp32, dropout on: RNG, data position, optimizer and
  scheduler all come back); a changed setting is refused on resume;
* OUT holding another run is refused without --resume / --overwrite; --overwrite starts over;
* the router losses are logged (load balancing = k at perfect balance), gradient checkpointing
  changes nothing, the eval split reports loss and perplexity, --full trains a float checkpoint and
  refuses an int8 one; the CLI's errors are one line; loss.png is a PNG.
"""
import json

import pytest
import torch

from grok_torch.finetune import train as train_mod
from grok_torch.finetune.cli import main
from grok_torch.finetune.losses import load_balancing_loss, router_z_loss
from grok_torch.finetune.train import TrainConfig, finetune


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """20 pre-tokenized documents of 40 tokens: arithmetic runs a small model can learn."""
    path = tmp_path_factory.mktemp("data") / "ids.jsonl"
    path.write_text("".join(json.dumps({"input_ids": [25 + (7 * i + j) % 400 for j in range(40)]}) + "\n"
                            for i in range(20)))
    return path


def cfg(converted, corpus, out, **kw):
    base = dict(model=str(converted("int8")), data=[str(corpus)], output_dir=str(out), seq_len=32, batch_size=4,
                lr=1e-2, max_steps=4, dtype="fp32", impl="torch", progress=False, plot=False, lora_rank=4)
    return TrainConfig(**{**base, **kw})


def losses(out):
    return [r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def test_overfits_a_small_corpus(converted, corpus, tmp_path):
    res = finetune(cfg(converted, corpus, tmp_path, max_steps=60, lora_targets=("attn", "experts", "router"),
                       plot=True))
    curve = losses(tmp_path)
    assert len(curve) == 60 and res["final_loss"] == curve[-1]
    assert min(curve[-5:]) < 0.3 * curve[0], f"start {curve[0]:.3f}, end {curve[-5:]}"
    assert (tmp_path / "adapter_model.safetensors").is_file() and (tmp_path / "checkpoint-60").is_dir()
    assert (tmp_path / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_resume_reproduces_the_uninterrupted_run(converted, corpus, tmp_path, monkeypatch):
    settings = dict(max_steps=6, save_every=2, lora_dropout=0.1, warmup_steps=1)
    finetune(cfg(converted, corpus, tmp_path / "a", **settings))

    real_save = train_mod._save_checkpoint

    def killed_after_step_4(out, step, *args):
        path = real_save(out, step, *args)
        if step == 4:
            raise KeyboardInterrupt
        return path

    monkeypatch.setattr(train_mod, "_save_checkpoint", killed_after_step_4)
    with pytest.raises(KeyboardInterrupt):
        finetune(cfg(converted, corpus, tmp_path / "b", **settings))
    monkeypatch.setattr(train_mod, "_save_checkpoint", real_save)
    assert len(losses(tmp_path / "b")) == 4
    finetune(cfg(converted, corpus, tmp_path / "b", resume=True, **settings))
    assert losses(tmp_path / "b") == losses(tmp_path / "a")
    a, b = ((tmp_path / d / "adapter_model.safetensors").read_bytes() for d in "ab")
    assert a == b
    with pytest.raises(ValueError, match="--resume with changed settings: --lr"):
        finetune(cfg(converted, corpus, tmp_path / "b", resume=True, **{**settings, "max_steps": 8}, lr=5e-3))
    # raising --max-steps is allowed
    finetune(cfg(converted, corpus, tmp_path / "b", resume=True, **{**settings, "max_steps": 7}))
    assert len(losses(tmp_path / "b")) == 7


def test_output_dir_is_never_silently_reused(converted, corpus, tmp_path):
    finetune(cfg(converted, corpus, tmp_path, max_steps=1))
    with pytest.raises(ValueError, match="holds another run .*--resume.*--overwrite"):
        finetune(cfg(converted, corpus, tmp_path, max_steps=1))
    with pytest.raises(ValueError, match="--resume: no checkpoint"):
        finetune(cfg(converted, corpus, tmp_path / "empty", max_steps=1, resume=True))
    finetune(cfg(converted, corpus, tmp_path, max_steps=2, overwrite=True))
    assert len(losses(tmp_path)) == 2 and not (tmp_path / "checkpoint-1").exists()


def test_router_losses_are_logged_and_balanced_routing_scores_k(converted, corpus, tmp_path):
    finetune(cfg(converted, corpus, tmp_path, max_steps=2, aux_loss_weight=0.01, z_loss_weight=1e-3))
    row = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])
    assert row["aux_loss"] > 0 and row["z_loss"] > 0
    assert row["loss"] == pytest.approx(row["lm_loss"] + 0.01 * row["aux_loss"] + 1e-3 * row["z_loss"])
    # perfect balance: 8 experts, top-2, every expert chosen equally often with uniform probabilities
    E, N = 8, 64
    probs = torch.full((N, E), 1 / E)
    topk = torch.stack([torch.arange(N) % E, (torch.arange(N) + 1) % E], 1)
    assert load_balancing_loss([(torch.zeros(N, E), probs, topk)]) == pytest.approx(2.0)
    assert router_z_loss([(torch.zeros(N, E), probs, topk)]) == pytest.approx(torch.log(torch.tensor(8.0)).item() ** 2)


def test_a_batch_without_targets_gives_zero_loss_not_nan():
    from grok_torch.finetune.losses import lm_loss

    logits = torch.randn(2, 3, 10, requires_grad=True)
    loss = lm_loss(logits, torch.full((2, 3), -100))
    loss.backward()
    assert loss.item() == 0 and torch.equal(logits.grad, torch.zeros_like(logits))
    labels = torch.tensor([[1, -100, 2], [3, 4, -100]])
    want = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)
    torch.testing.assert_close(lm_loss(logits, labels), want)


def test_chunked_loss_equals_one_cross_entropy(converted, corpus, tmp_path):
    """lm_loss_sum with chunks (the head recomputed per chunk in backward) == one cross-entropy, value
    and gradients; a run with --loss-chunk smaller than --seq-len follows the default run."""
    from grok_torch.finetune.losses import lm_loss, lm_loss_sum

    head = torch.nn.Linear(8, 50)
    hidden = torch.randn(2, 13, 8, requires_grad=True)
    labels = torch.randint(0, 50, (2, 13))
    labels[0, :4] = -100
    grads = []
    for chunk in (13, 4):
        hidden.grad = None
        loss = lm_loss_sum(head, hidden, labels, chunk) / (labels != -100).sum()
        loss.backward()
        grads.append((loss.detach(), hidden.grad.clone()))
    torch.testing.assert_close(grads[1][0], grads[0][0], rtol=1e-6, atol=0)
    torch.testing.assert_close(grads[1][1], grads[0][1], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(grads[0][0], lm_loss(head(hidden).detach(), labels), rtol=1e-6, atol=0)
    finetune(cfg(converted, corpus, tmp_path / "a", max_steps=3))
    finetune(cfg(converted, corpus, tmp_path / "b", max_steps=3, loss_chunk=5))
    a, b = losses(tmp_path / "a"), losses(tmp_path / "b")
    # step 1: the same weights, only the fp32 sum is reassociated; later steps: AdamW moves elements with
    # near-zero gradients by ~lr * sign(g), so reassociation noise grows (measured 8e-5 at step 3, lr 1e-2)
    assert b[0] == pytest.approx(a[0], rel=1e-6)
    torch.testing.assert_close(b, a, rtol=1e-3, atol=0)


def test_gradient_checkpointing_changes_nothing(converted, corpus, tmp_path):
    finetune(cfg(converted, corpus, tmp_path / "a", max_steps=2, lora_dropout=0.1))
    finetune(cfg(converted, corpus, tmp_path / "b", max_steps=2, lora_dropout=0.1, gradient_checkpointing=True))
    torch.testing.assert_close(losses(tmp_path / "b"), losses(tmp_path / "a"), rtol=1e-6, atol=0)


def test_eval_split_and_full_finetuning(converted, corpus, tmp_path):
    res = finetune(cfg(converted, corpus, tmp_path / "ev", max_steps=2, eval_fraction=0.2, eval_every=1))
    assert res["eval"]["eval_loss"] > 0 and res["eval"]["eval_ppl"] == pytest.approx(
        torch.tensor(res["eval"]["eval_loss"]).exp().item(), rel=1e-6)
    with pytest.raises(ValueError, match="--full trains every weight, but .* holds int8"):
        finetune(cfg(converted, corpus, tmp_path / "full8", full=True))
    res = finetune(cfg(converted, corpus, tmp_path / "full", model=str(converted("fp32")), full=True, lr=1e-4,
                       max_steps=3))
    assert res["trainable_parameters"] > 1e5 and (tmp_path / "full" / "model.safetensors").is_file()


def test_cli_help_run_and_errors(converted, corpus, tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "grok-finetune --model /tmp/grok-tiny --data /tmp/corpus.txt" in capsys.readouterr().out
    argv = ["--model", str(converted("int8")), "--data", str(corpus), "--output-dir", str(tmp_path / "o"),
            "--seq-len", "32", "--max-steps", "2", "--dtype", "fp32", "--no-progress", "--impl", "torch"]
    assert main(argv) == 0
    assert "2 steps (fp32), final loss" in capsys.readouterr().out
    for extra, needle in ((["--resume", "--overwrite"], "pass one"), (["--lora-targets", "mlp"], "--lora-targets"),
                          (["--seq-len", "100000"], "--seq-len 100000 exceeds"), ([], "holds another run")):
        assert main(argv + extra) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and needle in err[0], err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"input_ids": [1, 2]}\n{"input_ids": [1, 99999]}\n')
    assert main(argv[:2] + ["--data", str(bad)] + argv[4:] + ["--overwrite"]) == 2
    err = capsys.readouterr().err
    assert f"{bad}:2" in err and "99999" in err


def test_tensorboard_flag_needs_the_package(converted, corpus, tmp_path):
    try:
        import torch.utils.tensorboard  # noqa: F401
    except ImportError:
        with pytest.raises(ValueError, match="--tensorboard needs the tensorboard package"):
            finetune(cfg(converted, corpus, tmp_path, max_steps=1, tensorboard=True))
        return
    finetune(cfg(converted, corpus, tmp_path, max_steps=2, tensorboard=True))
    assert any((tmp_path / "tensorboard").iterdir())


def test_cli_merge(converted, corpus, tmp_path, capsys):
    finetune(cfg(converted, corpus, tmp_path / "run", max_steps=2))
    argv = ["merge", "--model", str(converted("int8")), "--adapter", str(tmp_path / "run"),
            "--output-dir", str(tmp_path / "merged"), "--dtype", "fp32", "--no-progress"]
    assert main(argv) == 0 and "wrote" in capsys.readouterr().out
    assert (tmp_path / "merged" / "config.json").is_file()
    assert main(argv) == 2  # OUT exists now
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("grok-finetune merge:") and "overwrite" in err[0]


def test_device_map_ffn_follows_the_one_device_run(converted, corpus, tmp_path, monkeypatch):
    """--device-map ffn (2 cpu devices standing in for GPUs): the replicated expert adapters stay
    bit-identical copies and the loss curve follows the one-device run (fp32 reassociation, lr 1e-3)."""
    from grok_torch import Grok
    from grok_torch.lora import replicated_copies

    real, models = Grok.from_pretrained, []

    def on_two_cpus(*a, **kw):
        if kw.get("device_map") == "ffn":
            kw["devices"] = ["cpu"] * 2
        models.append(real(*a, **kw))
        return models[-1]

    monkeypatch.setattr(Grok, "from_pretrained", on_two_cpus)
    kw = dict(lr=1e-3, max_steps=3, lora_targets=("attn", "experts", "router"), max_grad_norm=0.5)
    finetune(cfg(converted, corpus, tmp_path / "one", **kw))
    finetune(cfg(converted, corpus, tmp_path / "ffn", device_map="ffn", **kw))
    one, ffn = losses(tmp_path / "one"), losses(tmp_path / "ffn")
    assert max(abs(a - b) / a for a, b in zip(one, ffn)) < 1e-5, (one, ffn)
    norms = [[r["grad_norm"] for r in map(json.loads, (tmp_path / d / "metrics.jsonl").read_text().splitlines())
              if "grad_norm" in r] for d in ("one", "ffn")]
    assert min(norms[0]) > 0.5 and max(abs(a - b) / a for a, b in zip(*norms)) < 1e-5, norms  # clipped; copies once
    groups = replicated_copies(models[1])
    assert groups and all(torch.equal(p, g[0]) for g in groups for p in g[1:])


def test_a_non_finite_loss_stops_the_run_before_the_update(converted, corpus, tmp_path, monkeypatch):
    real = train_mod.lm_loss_sum
    calls = []

    def diverging(*a, **k):
        calls.append(1)
        out = real(*a, **k)
        return out * float("nan") if len(calls) == 3 else out     # the third step's loss is NaN

    monkeypatch.setattr(train_mod, "lm_loss_sum", diverging)
    with pytest.raises(ValueError, match=r"step 3: the loss is nan .* lower --lr"):
        finetune(cfg(converted, corpus, tmp_path / "o", max_steps=5, save_every=2))
    assert len(losses(tmp_path / "o")) == 2                       # steps 1-2 logged, step 3 refused
    assert (tmp_path / "o" / "checkpoint-2").is_dir()
