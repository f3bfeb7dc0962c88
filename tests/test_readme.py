"""Every example in README.md and in the package's front-door docstrings runs, on the demo model.

The README's examples name the real model's paths (``/data/grok-1-int8``, the release's
``/data/grok-1/checkpoints``) and the demo's (``/tmp/grok-tiny``). Here every ``/data/`` and
``/tmp/`` path is moved under one temporary directory, where ``data/grok-1/checkpoints`` is a demo
checkpoint in the official format (``python -m grok_torch.convert.synthetic``) and
``tmp/grok-tiny-src`` / ``tmp/grok-tiny`` are the quick start's two directories. Then:

- every ```` ```bash ```` block runs command by command (``\\`` continuations joined), in README
  order, and must exit 0, or the status that a trailing ``# exit N`` comment states;
- every ```` ```python ```` block runs, in README order, in one interpreter (a block may use the
  names an earlier one defined, as a reader who pastes them in turn would);
- a block that cannot run here (GPUs, several nodes, the suite itself) carries the marker line
  ``<!-- example: not run by tests/test_readme.py: REASON -->`` right above its fence; a
  ```` ```text ```` block is output or a layout, not code. Every fence has a language.

Docstrings: the indented Python examples of ``grok_torch/__init__.py`` and
``grok_torch/tokenizer.py``, and the command lines of the CLIs' ``--help`` examples that use the
demo model (``/tmp/`` paths; the ``/data/`` lines are the real model's, shown for 8 GPUs).
"""
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
NOT_RUN = re.compile(r"<!-- example: not run by tests/test_readme\.py: (?P<why>.+?) -->")
FENCE = re.compile(r"^(?P<indent>[ ]*)```(?P<lang>[\w-]*)[ ]*\n(?P<body>.*?)^(?P=indent)```[ ]*$", re.M | re.S)
EXIT = re.compile(r"#\s*exit (\d+)\b")


def readme_blocks():
    """(line, lang, code, reason-not-run or None) for every fenced block of README.md."""
    text = README.read_text()
    out = []
    for m in FENCE.finditer(text):
        line = text.count("\n", 0, m.start()) + 1
        before = text[:m.start()].rstrip("\n").rsplit("\n", 1)[-1]
        marker = NOT_RUN.search(before)
        out.append((line, m["lang"], textwrap.dedent(m["body"]), marker["why"] if marker else None))
    return out


def commands(script: str):
    """Shell commands of a block: continuation lines joined, comment-only and blank lines dropped."""
    joined, out = script.replace("\\\n", " "), []
    for cmd in joined.splitlines():
        if cmd.strip() and not cmd.lstrip().startswith("#"):
            out.append(cmd.strip())
    return out


def test_every_readme_block_is_classified():
    blocks = readme_blocks()
    assert blocks, "no fenced blocks found: the parser is broken"
    unlabelled = [line for line, lang, _, _ in blocks if not lang]
    assert not unlabelled, f"README.md: fences without a language at lines {unlabelled} (bash, python or text)"
    for line, lang, _, why in blocks:
        assert lang in ("bash", "python", "text"), f"README.md:{line}: unexpected language {lang!r}"
        assert not (why and lang == "text"), f"README.md:{line}: a text block needs no not-run marker"
    run = [b for b in blocks if b[1] != "text" and b[3] is None]
    # the examples that run stay the majority of the code blocks (6 need GPUs, nodes or are CI's own)
    assert len(run) >= 10 and len([b for b in blocks if b[3]]) <= 6, [(b[0], b[3]) for b in blocks]


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory):
    """ROOT/data/grok-1/checkpoints (official format) and ROOT/tmp/grok-tiny{,-src}, as the README expects."""
    from grok_torch.convert import convert_checkpoint
    from grok_torch.convert.synthetic import write_checkpoint

    root = tmp_path_factory.mktemp("readme")
    src = root / "data" / "grok-1" / "checkpoints"
    write_checkpoint(src, "demo")
    write_checkpoint(root / "tmp" / "grok-tiny-src", "demo")
    convert_checkpoint(src, root / "tmp" / "grok-tiny", quiet=True)
    return root


def localise(code: str, root: Path) -> str:
    # a path is a /data/ or /tmp/ right after a quote, a space, '=' or the start of a line
    return re.sub(r"(?<=[\s\"'=(])/(data|tmp)/", lambda m: f"{root}/{m[1]}/", " " + code)[1:]


def _env(root: Path):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop("CUDA_VISIBLE_DEVICES", None)
    return env


def _run_shell(cmd: str, root: Path, where: str):
    want = int(EXIT.search(cmd)[1]) if EXIT.search(cmd) else 0
    r = subprocess.run(["bash", "-c", "set -o pipefail; " + localise(cmd, root)], cwd=root, env=_env(root),
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == want, f"{where}: `{cmd}` exited {r.returncode} (expected {want})\n{r.stderr[-3000:]}"
    return r


def test_readme_bash_examples_run(sandbox):
    ran = 0
    for line, lang, code, why in readme_blocks():
        if lang == "bash" and why is None:
            for cmd in commands(code):
                _run_shell(cmd, sandbox, f"README.md:{line}")
                ran += 1
    assert ran >= 10


DRIVER = r"""
import json, sys, traceback
ns = {"__name__": "__main__"}
for where, code in json.load(open(sys.argv[1])):
    print(f"--- {where}", flush=True)
    try:
        exec(compile(code, where, "exec"), ns)
    except BaseException:
        traceback.print_exc()
        print(f"FAILED: {where}", file=sys.stderr)
        sys.exit(1)
"""


def _run_python(blocks, root: Path, name: str):
    (root / f"{name}.json").write_text(json.dumps([(w, localise(c, root)) for w, c in blocks]))
    (root / "driver.py").write_text(DRIVER)
    r = subprocess.run([sys.executable, str(root / "driver.py"), str(root / f"{name}.json")], cwd=root,
                       env=_env(root), capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    return r


def test_readme_python_examples_run(sandbox):
    if not (sandbox / "data" / "grok-1-int8").exists():   # the bash examples convert it; run alone, do it here
        from grok_torch.convert import convert_checkpoint

        convert_checkpoint(sandbox / "data" / "grok-1" / "checkpoints", sandbox / "data" / "grok-1-int8", quiet=True)
    blocks = [(f"README.md:{line}", code) for line, lang, code, why in readme_blocks() if lang == "python" and why is None]
    assert len(blocks) >= 4
    r = _run_python(blocks, sandbox, "readme")
    assert r.stdout.count("--- README.md:") == len(blocks)


def docstring_examples(path: Path):
    """Indented Python examples (4-space paragraphs that start with an import) of a module docstring."""
    import ast

    doc = ast.get_docstring(ast.parse(path.read_text()), clean=False) or ""
    out = []
    for para in re.split(r"\n\s*\n", doc):
        body = textwrap.dedent(para)
        if para.startswith("    ") and re.match(r"(#.*\n)*(from|import) ", body):
            out.append((f"{path.relative_to(ROOT)} docstring", body))
    return out


def test_docstring_examples_run(sandbox):
    blocks = [b for p in ("grok_torch/__init__.py", "grok_torch/tokenizer.py") for b in docstring_examples(ROOT / p)]
    assert len(blocks) >= 2
    _run_python(blocks, sandbox, "docstrings")


def help_commands():
    from grok_torch.finetune.cli import EXAMPLES
    from grok_torch.generate_cli import build_parser

    out = []
    for where, text in (("grok-generate --help", build_parser().epilog), ("grok-finetune --help", EXAMPLES)):
        for cmd in commands(textwrap.dedent(text)):
            if "/tmp/" in cmd and "/data/" not in cmd and not cmd.startswith(("examples:", "torchrun")):
                out.append((where, cmd))
    return out


def test_help_examples_on_the_demo_model_run(sandbox):
    cmds = help_commands()
    assert len(cmds) >= 5, cmds
    for where, cmd in cmds:
        _run_shell(cmd, sandbox, where)
