"""Importing the kernels leaves the process environment alone, and impl="triton" on CPU tensors without
Triton's interpreter fails with one clear error (issue #11).

The interpreter is chosen by `triton.jit` when a kernel is defined, from TRITON_INTERPRET. It used to
be switched on by importing grok_torch.kernels.ops (and flash_attention, int8_linear) wherever CUDA was
missing, for the whole process: `python -m grok_torch.kernels.aot` then got interpreter objects and
crashed. Now only the tests (tests/conftest.py) and the user opt in. This test process runs under the
interpreter (conftest), so each check runs in a fresh subprocess with TRITON_INTERPRET removed.
"""
import json
import os
import subprocess
import sys
import textwrap

import pytest


def _run(code: str) -> dict:
    """Run ``code`` in a fresh interpreter without TRITON_INTERPRET (or GROK_MOE_IMPL); its last line is JSON."""
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "GROK_MOE_IMPL")}
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_importing_the_kernels_leaves_the_environment_unchanged():
    got = _run("""
        import json, os
        before = dict(os.environ)
        import grok_torch.kernels, grok_torch.kernels.ops, grok_torch.kernels.flash_attention
        import grok_torch.kernels.int8_linear
        after = dict(os.environ)
        print(json.dumps({k: [before.get(k), after.get(k)] for k in set(before) | set(after)
                          if before.get(k) != after.get(k)}))
    """)
    assert got == {}, f"importing grok_torch.kernels changed the environment: {got}"


def test_cpu_without_interpreter_auto_is_the_reference_and_triton_one_clear_error():
    got = _run("""
        import json, sys
        import torch
        from grok_torch.kernels import fused_moe, moe_experts, moe_router, route
        from grok_torch.kernels.attention import attention

        torch.manual_seed(0)
        T, D, F, E = 4, 16, 32, 4
        x, rw = torch.randn(T, D), torch.randn(D, E)
        w1, w3, w2 = torch.randn(E, D, F), torch.randn(E, D, F), torch.randn(E, F, D)
        _, gates, ids = route(x, rw, 2)
        q, k, v = torch.randn(1, 3, 4, 8), torch.randn(1, 3, 2, 8), torch.randn(1, 3, 2, 8)
        pos, valid = torch.arange(3)[None], torch.ones(1, 3, dtype=torch.bool)
        out = {}
        # impl="auto" on the CPU: the reference, without even importing Triton's kernels
        fused_moe(x, rw, w1, w3, w2)
        attention(q, k, v, pos, valid, scale=0.35, cap=30.0)
        out["auto_imported_kernels"] = sorted(m for m in sys.modules if m.startswith("grok_torch.kernels.")
                                              and m.split(".")[-1] in ("ops", "flash_attention", "int8_linear"))
        from grok_torch.kernels.int8_linear import int8_linear_triton

        calls = {
            "fused_moe": lambda: fused_moe(x, rw, w1, w3, w2, impl="triton"),
            "moe_router": lambda: moe_router(x, rw, impl="triton"),
            "moe_experts": lambda: moe_experts(x, gates, ids, w1, w3, w2, impl="triton"),
            "attention": lambda: attention(q, k, v, pos, valid, scale=0.35, cap=30.0, impl="triton"),
            "int8_linear_triton": lambda: int8_linear_triton(
                x, torch.ones(D, F, dtype=torch.int8), torch.ones(1, F, dtype=torch.bfloat16)),
        }
        for name, call in calls.items():
            try:
                call()
                out[name] = "no error"
            except Exception as exc:
                out[name] = f"{type(exc).__name__}: {exc}"
        print(json.dumps(out))
    """)
    assert got.pop("auto_imported_kernels") == []
    for name, msg in got.items():
        assert msg.startswith("RuntimeError: ") and "CPU tensors" in msg and "CUDA" in msg \
            and "TRITON_INTERPRET=1" in msg, f"{name}: {msg}"


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="needs this process under the interpreter")
def test_the_interpreter_still_runs_the_kernels_on_cpu_here():
    """What conftest opts into: impl="triton" on CPU tensors runs (and agrees with the reference)."""
    import torch

    from grok_torch.kernels import fused_moe

    torch.manual_seed(0)
    x, rw = torch.randn(4, 16), torch.randn(16, 4)
    ws = torch.randn(4, 16, 32) / 4, torch.randn(4, 16, 32) / 4, torch.randn(4, 32, 16) / 6
    got = fused_moe(x, rw, *ws, impl="triton", compute_dtype=torch.float32)[0]
    want = fused_moe(x, rw, *ws, impl="torch", compute_dtype=torch.float32)[0]
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
