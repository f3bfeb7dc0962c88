"""The repository keeps its promises: CI runs exactly the README's two commands."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _commands(text: str):
    return [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def test_ci_runs_exactly_the_readme_commands():
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)```", readme, flags=re.S)
    setup, tests = blocks[0].strip(), blocks[1].strip()
    ci = [c for c in _commands((ROOT / ".ci" / "run").read_text())
          if not c.startswith(("set ", "cd ", "export "))]
    assert ci == [setup, tests]
    assert "torch==2.13.0" in (ROOT / "setup.py").read_text() and "triton==3.7.1" in (ROOT / "setup.py").read_text()
