"""grok-generate on the converted tiny model: token ids in and out, and clear errors."""
import subprocess
import sys

import pytest

from grok_torch.generate_cli import main


def test_prompt_ids_greedy_prints_ids(converted, capsys):
    assert main(["--model", str(converted("int8")), "--prompt-ids", "25,376,378",
                 "--max-new-tokens", "4", "--temperature", "0", "--no-stop"]) == 0
    ids = capsys.readouterr().out.strip().split(",")
    assert len(ids) == 4 and all(0 <= int(i) < 512 for i in ids)


def test_text_prompt_without_tokenizer_is_an_error(converted, capsys):
    assert main(["--model", str(converted("int8")), "--prompt", "hello"]) == 2
    assert "needs a tokenizer" in capsys.readouterr().err


def test_python_dash_m_runs(converted):
    r = subprocess.run([sys.executable, "-m", "grok_torch.generate_cli", "--model", str(converted("int8")),
                        "--prompt-ids", "25,999", "--max-new-tokens", "2"], capture_output=True, text=True)
    assert r.returncode == 2 and "token id 999 is out of range" in r.stderr
