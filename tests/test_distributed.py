"""Expert parallelism across processes (grok_torch.parallel.distributed) on the official tiny fixture.

Real processes on gloo (CPU), started the way torchrun starts them (RANK / WORLD_SIZE / MASTER_* in
the environment, one process per rank; tests/dist_worker.py is one rank), and grok-generate under
torchrun and accelerate launch themselves. Every launch has a wall-clock bound and its process
group a short timeout: a failure ends as a test failure, never as a hung suite.

Workers run one thread each, and so do the single-process references here: CPU fp32 GEMMs block
their reductions by the thread count, so bit equality is a claim about equal thread counts.
"""
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import require
from grok_torch import Grok, generate
from grok_torch.config import GrokConfig

WORKER = Path(__file__).with_name("dist_worker.py")
GROK_GENERATE = Path(sys.executable).with_name("grok-generate")
PROMPTS = [[25, 376, 378], [7, 8]]  # as in dist_worker.py
FP32, BF16 = torch.float32, torch.bfloat16
DTYPES = {"fp32": FP32, "bf16": BF16}


@contextmanager
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Rank:
    def __init__(self, rc, out, err, seconds):
        self.rc, self.out, self.err, self.seconds = rc, out, err, seconds


def launch(argvs, tmp_path, timeout=60.0, env=None, wait=None):
    """Start one process per argv as torchrun would (rank r gets argvs[r], env[r] added); wait at most
    ``timeout`` seconds for the ranks in ``wait`` (default all), kill whatever is left (whole process
    groups), and fail if one of ``wait`` was still running."""
    n, port = len(argvs), _free_port()
    procs, files = [], []
    t0 = time.monotonic()
    for r, argv in enumerate(argvs):
        e = dict(os.environ, RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE=str(n), LOCAL_WORLD_SIZE=str(n),
                 MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1", **(env or {}).get(r, {}))
        out, err = open(tmp_path / f"out{r}", "w+"), open(tmp_path / f"err{r}", "w+")
        files.append((out, err))
        procs.append(subprocess.Popen([str(a) for a in argv], stdout=out, stderr=err, env=e, text=True,
                                      start_new_session=True))
    ended, wait = [None] * n, range(n) if wait is None else wait
    while any(ended[r] is None for r in wait) and time.monotonic() - t0 < timeout:
        for r, p in enumerate(procs):
            if ended[r] is None and p.poll() is not None:
                ended[r] = time.monotonic() - t0
        time.sleep(0.05)
    for p in procs:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
    ranks = []
    for p, (out, err), t in zip(procs, files, ended):
        out.seek(0), err.seek(0)
        ranks.append(Rank(p.returncode, out.read(), err.read(), t))
        out.close(), err.close()
    hung = [r for r in wait if ended[r] is None]
    assert not hung, f"ranks {hung} still running after {timeout}s: " + " | ".join(x.err[-400:] for x in ranks)
    return ranks


def worker(n, mode, model, tmp_path, rank1_model=None, **kw):
    argv = [sys.executable, WORKER, mode, tmp_path, model] + ([rank1_model] if rank1_model else [])
    return launch([argv] * n, tmp_path, **kw)


# ---- fixtures ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def fixture(tiny_ref, converted):
    return converted("int8"), torch.from_numpy(np.load(tiny_ref / "tokens.npy")).long(), tiny_ref


@pytest.fixture(scope="module")
def parity_runs(fixture, tmp_path_factory):
    """world size -> every rank's results of dist_worker.py parity (one launch per world size)."""
    path, _, tiny_ref = fixture
    cache = {}

    def get(n):
        if n not in cache:
            d = tmp_path_factory.mktemp(f"ep{n}")
            ranks = worker(n, "parity", path, d, timeout=90, env={r: {"TOKENS": str(tiny_ref / "tokens.npy")}
                                                                   for r in range(n)})
            assert all(r.rc == 0 for r in ranks), [r.err[-2000:] for r in ranks]
            cache[n] = [torch.load(d / f"rank{r}.pt") for r in range(n)]
        return cache[n]

    return get


@pytest.fixture(scope="module")
def reference(fixture):
    """Single-process results, one thread: plain model, and the in-process ffn split over n cpus."""
    path, tok, _ = fixture
    cache = {}

    def get(kind, dtype, n=1):
        key = (kind, dtype, n)
        if key not in cache:
            kw = {} if kind == "single" else dict(device_map="ffn", devices=["cpu"] * n)
            with one_thread(), torch.no_grad():
                m = Grok.from_pretrained(path, dtype=DTYPES[dtype], impl="torch", **kw)
                cache[key] = {"logits": m(tok),
                              "greedy": [g.tokens for g in generate(m, PROMPTS, 6, temperature=0)],
                              "sampled": [g.tokens for g in generate(m, PROMPTS, 6, temperature=0.8, seed=3)]}
        return cache[key]

    return get


# ---- parity: 2 and 4 gloo processes, both splits, fp32 and bf16 -------------------------------

@pytest.mark.parametrize("n", [2, 4])
def test_experts_split_equals_single_process_bit_for_bit(parity_runs, reference, n):
    """Tokens sent to their experts' ranks and back (all_to_all_single, uneven splits; at n = 4 and
    batch-1-per-row decode some ranks send nothing): logits and generations = one process."""
    ranks = parity_runs(n)
    for dtype in DTYPES:
        want, key = reference("single", dtype), f"experts/{dtype}"
        for r, res in enumerate(ranks):  # every rank ends with the same logits (sampling agrees)
            assert torch.equal(res[key + "/logits"], want["logits"]), (dtype, r)
            assert res[key + "/greedy"] == want["greedy"] and res[key + "/sampled"] == want["sampled"], (dtype, r)
    # the sync-free exchange (partials summed: ordered, and the backend's all_reduce) gives the same bits
    for r, res in enumerate(ranks):
        assert torch.equal(res["experts/fp32/logits_all_reduce"], reference("single", "fp32")["logits"]), r
        assert torch.equal(res["experts/fp32/logits_all_reduce_nccl_style"], reference("single", "fp32")["logits"])


@pytest.mark.parametrize("n", [2, 4])
def test_ffn_split_equals_the_in_process_split(parity_runs, reference, n):
    """F sliced over the ranks, partials summed in rank order: bit-equal to device_map="ffn" over n
    devices of one process; fp32 within 1e-5 of the largest logit of the unsplit model (2.8e-6 measured)."""
    ranks = parity_runs(n)
    for dtype in DTYPES:
        want, key = reference("ffn", dtype, n), f"ffn/{dtype}"
        for r, res in enumerate(ranks):
            assert torch.equal(res[key + "/logits"], want["logits"]), (dtype, r)
            assert res[key + "/greedy"] == want["greedy"] and res[key + "/sampled"] == want["sampled"], (dtype, r)
    got, single = ranks[0]["ffn/fp32/logits"], reference("single", "fp32")["logits"]
    assert (got - single).abs().max() <= 1e-5 * single.abs().max()


def _bytes_by_hand(cfg: GrokConfig, world: int):
    """(shared bytes, expert bytes one rank holds) of the int8 tiny model, from the config alone."""
    D, F, E, L, V = cfg.d_model, cfg.ffn_size, cfg.num_experts, cfg.num_layers, cfg.vocab_size
    g = cfg.quant_groups

    def int8(lead, k, n, groups):  # int8 [*, k, n] + bf16 scales [*, groups, n]
        return lead * (k * n + groups * n * 2)

    attn = (int8(1, D, cfg.q_size, g["wq"]) + int8(1, D, cfg.kv_size, g["wk"]) + int8(1, D, cfg.kv_size, g["wv"])
            + int8(1, cfg.q_size, D, g["wo"]))
    shared = V * D * 4 + D * 4 + L * (4 * D * 4 + D * E * 4 + attn)  # fp32 embedding, norms and routers
    experts = L * (int8(E, D, F, g["w1"]) + int8(E, D, F, g["w3"]) + int8(E, F, D, g["w2"]))
    return shared, experts // world


@pytest.mark.parametrize("n", [2, 4])
def test_each_rank_holds_shared_weights_and_its_share(parity_runs, fixture, n):
    cfg = GrokConfig.from_json(fixture[0] / "config.json")
    shared, share = _bytes_by_hand(cfg, n)
    E, D, F = cfg.num_experts, cfg.d_model, cfg.ffn_size
    for r, res in enumerate(parity_runs(n)):
        for split in ("experts", "ffn"):
            for dtype in DTYPES:
                key = f"{split}/{dtype}"
                assert res[key + "/bytes"] == {"shared": shared, "experts": share, "total": shared + share}, (key, r)
                assert res[key + "/devices"] == {"cpu"}
            shapes = res[f"{split}/fp32/shapes"]
            if split == "experts":
                assert shapes["layers.0.moe.shards.0.w1.weight"] == (E // n, D, F)
                assert shapes["layers.11.moe.shards.0.w2.scales"] == (E // n, 8, D)
            else:
                assert shapes["layers.0.moe.shards.0.w1.weight"] == (E, D, F // n)
                assert shapes["layers.11.moe.shards.0.w2.scales"] == (E, 8 // n, D)


# ---- grok-generate under torchrun and accelerate launch -------------------------------------------

def _single_cli(capsys, argv):
    from grok_torch.generate_cli import main

    with one_thread():
        assert main(argv) == 0
    return capsys.readouterr().out


@pytest.mark.parametrize("split, extra", [
    ("experts", ["--temperature", "0.8", "--seed", "5"]),            # bf16 (default), seeded sampling
    ("ffn", ["--temperature", "0", "--dtype", "fp32"]),               # fp32, greedy
])
def test_grok_generate_under_torchrun(fixture, tmp_path, capsys, split, extra):
    """rank 0 prints what one process prints; rank 1 prints nothing."""
    require(GROK_GENERATE, "the grok-generate entry script (pip install -e .)")
    path = fixture[0]
    args = ["--model", str(path), "--prompt-ids", "25,376,378", "--max-new-tokens", "10", "--no-stop", *extra]
    want = _single_cli(capsys, args)
    logs = tmp_path / "logs"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "--redirects", "3",
           "--log-dir", str(logs), str(GROK_GENERATE), *args, "--device-map", split, "--dist-timeout", "60"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=90, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 0, r.stderr[-2000:]
    out = {int(p.parent.name): p.read_text() for p in logs.rglob("stdout.log")}
    assert out == {0: want, 1: ""}, (out, want)


def test_grok_generate_under_accelerate_launch(fixture, tmp_path, capsys):
    """accelerate launch --multi_gpu is torchrun underneath (also on CPUs: gloo). (``--cpu
    --num_processes N`` starts ONE process unless MPI is set up: not a way to run this.)"""
    require(GROK_GENERATE, "the grok-generate entry script (pip install -e .)")
    args = ["--model", str(fixture[0]), "--prompt-ids", "7,8", "--max-new-tokens", "6", "--temperature", "0.7"]
    want = _single_cli(capsys, args)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(_free_port()), str(GROK_GENERATE), *args, "--dist-timeout", "60"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=90, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout == want


# ---- faults end on every rank, in bounded time, naming the rank ---------------------------------

@pytest.fixture
def unreadable(fixture, tmp_path):
    """A copy of the checkpoint whose shard holding layer 0's experts is cut in half."""
    src = fixture[0]
    d = shutil.copytree(src, tmp_path / "bad")
    shard = d / json.loads((src / "model.safetensors.index.json").read_text())["weight_map"]["layers.0.moe.w1.weight"]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    return d, shard


def _gen_cli(model):
    return [sys.executable, "-m", "grok_torch.generate_cli", "--model", model, "--prompt-ids", "25,376", "--max-new-tokens", "3", "--dist-timeout", "30"]


def test_grok_generate_rank_with_unreadable_shard(fixture, unreadable, tmp_path):
    """The failing rank names the file; the others learn which rank failed; all exit non-zero."""
    bad, shard = unreadable
    ranks = launch([_gen_cli(fixture[0]), _gen_cli(bad)], tmp_path, timeout=60)
    assert [r.rc for r in ranks] == [2, 2], [r.err for r in ranks]
    assert ranks[1].err.startswith(f"grok-generate: rank 1: {shard}: not a readable safetensors file")
    assert ranks[0].err.strip() == "grok-generate: rank 0: rank(s) 1 failed while loading (see their error)"
    assert ranks[0].out == ranks[1].out == ""


@pytest.mark.parametrize("hang", [False, True])
def test_python_api_rank_with_unreadable_shard(fixture, unreadable, tmp_path, hang):
    """Grok.from_pretrained(expert_parallel=...) raises on the rank that cannot read its bytes; the
    other rank fails in its first collective: at once when the failed process exits (connection
    closed), after the group's timeout (5 s here) when it lingers. The error names rank and layer."""
    bad, shard = unreadable
    env = {0: {"DIST_TIMEOUT": "5"}, 1: {"DIST_TIMEOUT": "5", **({"HANG_ON_ERROR": "1"} if hang else {})}}
    ranks = worker(2, "load", fixture[0], tmp_path, rank1_model=bad, env=env, wait=[0] if hang else None)
    r0, r1 = ranks
    assert r0.rc == 1 and r0.err.startswith("rank 0: CollectiveError: rank 0: all_to_all_single (row counts) of layer 0")
    assert ("Timed out" if hang else "by peer") in r0.err, r0.err  # connection closed or reset by peer
    assert r0.seconds < 30
    assert r1.err.startswith(f"rank 1: ValueError: {shard}: not a readable")
    assert r1.rc == (-signal.SIGKILL if hang else 1)  # a lingering rank 1 is killed by this test


def test_world_size_that_cannot_be_used(fixture, tmp_path):
    """3 ranks cannot split 8 experts: every rank says so and exits non-zero (before reading weights)."""
    ranks = launch([_gen_cli(fixture[0])] * 3, tmp_path, timeout=60)
    for r, res in enumerate(ranks):
        assert res.rc == 2
        assert res.err.strip().splitlines()[-1] == (f"grok-generate: rank {r}: expert_parallel: world size 3: split 'experts' needs a "
                                   "device count that divides the 8 experts, got 3 (use 1, 2, 4, 8 devices, or split "
                                   "'ffn')"), res.err


# ---- in this process ----------------------------------------------------------------------------

def test_needs_an_initialised_process_group(fixture):
    with pytest.raises(ValueError, match="initialised torch.distributed process group.*torchrun"):
        Grok.from_pretrained(fixture[0], expert_parallel=True)
    with pytest.raises(ValueError, match="not both"):
        Grok.from_pretrained(fixture[0], expert_parallel=True, device_map="experts")


def test_one_rank_group(fixture, reference, tmp_path):
    """World size 1: the rank holds everything and no collective runs; misuse is a clear error."""
    import torch.distributed as dist

    from grok_torch.parallel.distributed import ExpertParallelMoE, rank_bytes, set_exchange

    path, tok, _ = fixture
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        with one_thread(), torch.no_grad():
            m = Grok.from_pretrained(path, dtype=FP32, impl="torch", expert_parallel="ffn")
            assert all(isinstance(layer.moe, ExpertParallelMoE) for layer in m.layers)
            assert torch.equal(m(tok), reference("single", "fp32")["logits"])
        cfg = GrokConfig.from_json(path / "config.json")
        assert rank_bytes(m)["total"] == sum(_bytes_by_hand(cfg, 1))
        with pytest.raises(ValueError, match="exchange must be one of"):
            set_exchange(m, "broadcast")
        with pytest.raises(NotImplementedError, match="inference-only"):
            m.layers[0].moe(torch.zeros(1, cfg.d_model, requires_grad=True))
        with pytest.raises(ValueError, match="expert_parallel must be True, .experts. or .ffn., got .rows."):
            Grok.from_pretrained(path, expert_parallel="rows")
        if not torch.cuda.is_available():
            with pytest.raises(ValueError, match="CUDA is not available"):
                Grok.from_pretrained(path, expert_parallel=True, device="cuda")
    finally:
        dist.destroy_process_group()
    with pytest.raises(ValueError, match="not expert-parallel"):
        set_exchange(Grok.from_pretrained(path), "all_reduce")
