"""Text fine-tuning end to end on the README's demo model (config ``demo``: tiny shapes, Grok-1's real
131072-token vocabulary, the bundled tokenizer.model beside the converted weights).

The README's commands, as a newcomer runs them: a synthetic demo checkpoint, grok-convert, then
grok-finetune on a plain-text file and on prompt/completion JSONL (tokenized by the real tokenizer,
found in the model directory), then grok-generate with the adapter and a text prompt.
"""
import json

import pytest

from grok_torch.convert import convert_checkpoint
from grok_torch.convert.synthetic import write_checkpoint
from grok_torch.finetune.cli import main as finetune_main
from grok_torch.generate_cli import main as generate_main

LINES = ["The quick brown fox jumps over the lazy dog.", "Grok is a mixture of experts with eight experts a layer.",
         "Each token is routed to two of the experts.", "The weights stay in int8 as they were released.",
         "LoRA adapters train a low-rank update of every expert."]


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    write_checkpoint(root / "src", "demo")
    convert_checkpoint(root / "src", root / "model", quiet=True)
    assert (root / "model" / "tokenizer.model").is_file()
    return root / "model"


def _losses(out):
    return [r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def test_text_finetune_on_the_demo_model(demo, tmp_path, capsys):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(LINES * 4) + "\n")
    out = tmp_path / "ft"
    argv = ["--model", str(demo), "--data", str(corpus), "--output-dir", str(out), "--seq-len", "32",
            "--max-steps", "30", "--lr", "1e-2", "--dtype", "fp32", "--no-progress", "--eval-fraction", "0.2"]
    assert finetune_main(argv) == 0, capsys.readouterr().err
    assert "eval loss" in capsys.readouterr().out
    losses = _losses(out)
    first, last = losses[0], sum(losses[-5:]) / 5
    assert len(losses) == 30 and last < 0.7 * first, losses
    stats = (out / "data_stats.txt").read_text()
    assert "train: 16 docs" in stats and "eval: 4 docs" in stats

    # the adapter changes what the demo model says for a text prompt, through the real tokenizer
    gen = ["--model", str(demo), "--prompt", "The quick brown fox", "--max-new-tokens", "6", "--temperature", "0",
           "--dtype", "fp32"]
    assert generate_main(gen) == 0
    base = capsys.readouterr().out
    assert generate_main(gen + ["--adapter", str(out)]) == 0
    tuned = capsys.readouterr().out
    assert base.strip() and tuned.strip() and tuned != base


def test_text_without_a_tokenizer_in_the_model_dir_uses_the_bundled_one(demo, tmp_path, capsys):
    import shutil

    bare = tmp_path / "bare"
    shutil.copytree(demo, bare)
    (bare / "tokenizer.model").unlink()
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(LINES) + "\n")
    assert finetune_main(["--model", str(bare), "--data", str(corpus), "--output-dir", str(tmp_path / "ft"),
                          "--seq-len", "16", "--max-steps", "1", "--dtype", "fp32", "--no-progress"]) == 0, \
        capsys.readouterr().err


def test_prompt_completion_text_on_the_demo_model(demo, tmp_path, capsys):
    data = tmp_path / "pc.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Q: {line[:12]}", "completion": line[12:]}) + "\n"
                            for line in LINES * 4))
    out = tmp_path / "ft"
    assert finetune_main(["--model", str(demo), "--data", str(data), "--output-dir", str(out), "--seq-len", "24",
                          "--max-steps", "3", "--dtype", "fp32", "--no-progress", "--lr", "1e-3"]) == 0
    losses = _losses(out)
    assert len(losses) == 3 and all(x == x and x > 0 for x in losses)
