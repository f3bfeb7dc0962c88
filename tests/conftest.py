"""Shared fixtures: the tiny_ref reference data (SPEC §8) converted once per weight format.

The fixture lives beside the repository (../shared/grok1). Tests that need it SKIP when it is
absent, except under CI (env CI set), where a missing fixture is a failure.

Without CUDA this file also turns on Triton's interpreter for the test process (below), so the
kernel tests run the Triton kernels on the CPU.
"""
import os
from pathlib import Path

import pytest
import torch

# Without CUDA the Triton kernels can run only in Triton's interpreter, which `triton.jit` picks when a
# kernel is defined: opt this test process (and the subprocesses it starts) into it before any test
# module imports grok_torch.kernels. The library never sets it itself (issue #11); an explicit
# TRITON_INTERPRET in the environment wins.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

SHARED = Path(__file__).resolve().parents[2] / "shared" / "grok1"
TINY_REF = SHARED / "tiny_ref"
TOKENIZER = SHARED / "tokenizer.model"


def require(path: Path, what: str) -> Path:
    """Skip (or fail under CI) when a shared reference file is missing."""
    if not path.exists():
        msg = f"{what} not found at {path}"
        if os.environ.get("CI"):
            pytest.fail(msg + " (required when CI is set)")
        pytest.skip(msg)
    return path


@pytest.fixture(scope="session")
def tiny_ref() -> Path:
    return require(TINY_REF / "tiny_reference.json", "tiny_ref fixture").parent


@pytest.fixture(scope="session")
def converted(tiny_ref, tmp_path_factory):
    """converted(fmt) -> directory with tiny_ref converted by grok_torch.convert (cached per format)."""
    from grok_torch.convert import convert_checkpoint

    cache = {}

    def get(fmt: str) -> Path:
        if fmt not in cache:
            out = tmp_path_factory.mktemp(f"tiny_{fmt}")
            convert_checkpoint(tiny_ref, out, dtype=fmt, config="tiny", quiet=True, overwrite=True)
            cache[fmt] = out
        return cache[fmt]

    return get


@pytest.fixture(scope="session")
def tiny_int8_model(converted):
    """tiny_int8_model(dtype) -> the int8 tiny_ref model on the CPU reference kernels (cached per dtype)."""
    from grok_torch import Grok

    cache = {}

    def get(dtype):
        if dtype not in cache:
            cache[dtype] = Grok.from_pretrained(converted("int8"), dtype=dtype, impl="torch")
        return cache[dtype]
    return get
