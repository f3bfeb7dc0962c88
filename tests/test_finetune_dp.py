"""grok-finetune data parallel under expert parallelism (the torchrun default): 2 gloo processes with
``batch_size`` B each vs one process with 2B, the same data and seed (tiny_ref int8, fp32, reference kernels,
one thread a rank, LoRA on attn + experts + router; every launch bounded, see test_finetune_distributed.py).

Tolerance. The two runs compute the same sums in another order: each rank's replicated-adapter
gradient is its tokens' part (GEMMs over B rows), the parts added in rank order, where one process
reduces 2B rows at once; the loss is two partial sums / the global token count. Step 1 (before the
optimizer has acted) shows that reorder alone: measured loss 2e-10, grad norm 1.0e-7 relative
(bounds 1e-6). After that AdamW amplifies it (its update g / sqrt(v) is about lr * sign(g) for the
near-zero gradient entries, lr = 1e-2), so the curves drift apart by fp noise. Measured over 4 steps
(clipping on, router losses on): losses 1.2e-6, grad norms 1.1e-4 relative, adapters 1.3e-3 max
absolute (values up to 0.1), 9.7e-5 relative L2; without clipping (gradient checkpointing on; step 1
bit-equal there): 6.3e-6, 2.2e-4, 7.8e-3, 3.6e-4. A control with the same kind of reorder and no
parallelism at all, the one-process run at 2 threads instead of 1 (CPU GEMMs block their sums by
thread count), drifts as much: 2.4e-6, 2.2e-4, 4.6e-3, 2.4e-4 (first setting). Bounds: losses 5e-5,
norms 5e-3 relative, adapters 3e-3 relative L2 (about 8x over the largest measured drift) and 4e-2
max absolute (one entry whose gradient sign flips moves by up to 2 lr a step: 8e-2 over 4 steps). A
real bug (a rank's gradient part dropped or double counted, a wrong loss weight) breaks the step-1
bounds by orders of magnitude (the logged norm is the one before clipping).
"""
import shutil
import time

import pytest
import torch

from test_finetune import corpus  # noqa: F401  (the fixture: 20 documents of 40 tokens)
from test_finetune_distributed import adapters, one_rank, rows, settings, two_ranks


def dp_settings(converted, corpus, out, **kw):
    return settings(converted, corpus, out, **{"batch_size": 2, "data_parallel": True, **kw})


def compare(dp_out, one_out):
    la, lb = rows(dp_out), rows(one_out)
    na, nb = rows(dp_out, "grad_norm"), rows(one_out, "grad_norm")
    a, b = adapters(dp_out), adapters(one_out)
    assert a.keys() == b.keys() and len(la) == len(lb) == 4
    rel = lambda x, y: abs(x - y) / abs(y)  # noqa: E731
    assert rel(la[0], lb[0]) < 1e-6 and rel(na[0], nb[0]) < 1e-6      # step 1: the reorder alone
    loss_rel = max(map(rel, la, lb))
    norm_rel = max(map(rel, na, nb))
    adapter_abs = max(float((a[k] - b[k]).abs().max()) for k in a)
    adapter_l2 = (sum(float((a[k] - b[k]).norm() ** 2) for k in a) / sum(float(b[k].norm() ** 2) for k in a)) ** 0.5
    print(f"step 1: loss {rel(la[0], lb[0]):.1e} norm {rel(na[0], nb[0]):.1e}; 4 steps: losses {loss_rel:.1e} "
          f"norms {norm_rel:.1e} relative, adapters {adapter_abs:.1e} max abs, {adapter_l2:.1e} relative L2")
    assert loss_rel < 5e-5 and norm_rel < 5e-3 and adapter_l2 < 3e-3 and adapter_abs < 4e-2


def test_two_processes_data_parallel_train_like_one_with_the_global_batch(converted, corpus, tmp_path):
    # clipping active (norms ~4 > 1), router losses on: the global batch's losses over 2 ranks
    s = dp_settings(converted, corpus, tmp_path / "dp", aux_loss_weight=0.01, z_loss_weight=0.001)
    t0 = time.monotonic()
    dumps, seconds = two_ranks(s, tmp_path / "dump")
    one_rank({**s, "batch_size": 4, "output_dir": str(tmp_path / "one")})
    assert min(rows(tmp_path / "one", "grad_norm")) > 1.0
    compare(tmp_path / "dp", tmp_path / "one")
    for key in ("lm_loss", "aux_loss", "z_loss"):
        assert rows(tmp_path / "dp", key) == pytest.approx(rows(tmp_path / "one", key), rel=5e-5)
    # the replicated adapters stay the same bits on both ranks (their gradients are summed in rank order)
    rep0, rep1 = dumps[0]["replicated"], dumps[1]["replicated"]
    assert rep0.keys() == rep1.keys() and len(rep0) == 12 * 10
    assert all(torch.equal(rep0[k], rep1[k]) for k in rep0)

    # resumed by 2 processes from checkpoint-2: the uninterrupted run's curve and bytes
    shutil.copytree(tmp_path / "dp", tmp_path / "re")
    shutil.rmtree(tmp_path / "re" / "checkpoint-4")
    two_ranks({**s, "output_dir": str(tmp_path / "re"), "resume": True}, tmp_path / "dump_re")
    assert rows(tmp_path / "re") == rows(tmp_path / "dp")
    assert (tmp_path / "re" / "adapter_model.safetensors").read_bytes() == \
        (tmp_path / "dp" / "adapter_model.safetensors").read_bytes()
    print(f"2-process run: {seconds:.1f} s, test {time.monotonic() - t0:.1f} s")


def test_data_parallel_with_gradient_checkpointing_no_clipping(converted, corpus, tmp_path):
    s = dp_settings(converted, corpus, tmp_path / "dp", max_grad_norm=1e9, gradient_checkpointing=True)
    two_ranks(s, tmp_path / "dump")
    one_rank({**s, "batch_size": 4, "output_dir": str(tmp_path / "one")})
    compare(tmp_path / "dp", tmp_path / "one")


def test_data_parallel_refuses_the_all_reduce_exchange(converted, corpus, tmp_path):
    s = dp_settings(converted, corpus, tmp_path / "dp", max_steps=1, save_every=0)
    with pytest.raises(AssertionError, match="all_to_all"):
        two_ranks(s, tmp_path / "dump", exchange="all_reduce")


def test_data_parallel_trains_with_adapter_dropout(converted, corpus, tmp_path):
    """Dropout on every adapter, experts included: each rank draws its own masks (its own tokens), the
    replicated adapters stay the same bits on both ranks (summed gradients), and the loss goes down."""
    s = dp_settings(converted, corpus, tmp_path / "dp", lora_dropout=0.1, save_every=0)
    dumps, _ = two_ranks(s, tmp_path / "dump")
    rep0, rep1 = dumps[0]["replicated"], dumps[1]["replicated"]
    assert rep0.keys() == rep1.keys() and all(torch.equal(rep0[k], rep1[k]) for k in rep0)
    curve = rows(tmp_path / "dp")
    assert all(map(torch.isfinite, map(torch.tensor, curve))) and curve[-1] < curve[0]
