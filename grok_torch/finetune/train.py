"""The fine-tuning loop: LoRA over the frozen base (or every float weight), checkpoints that resume exactly.

    result = finetune(TrainConfig(model="/data/grok-1-int8", data=["train.jsonl"], output_dir="out",
                                  lora_rank=8, max_steps=1000))

One optimizer step = ``grad_accum`` micro-batches of ``batch_size`` packed rows of ``seq_len`` tokens
(``grok_torch.finetune.data``). Loss = next-token cross-entropy (mean over a micro-batch's target
tokens, averaged over the micro-batches) + ``aux_loss_weight`` x load balancing + ``z_loss_weight`` x
router z-loss (``losses.py``; both off by default, as in the official code). AdamW on the adapters,
gradient norm clipped to ``max_grad_norm``, LR warmed up linearly over ``warmup_steps`` then cosine
to 0 at ``max_steps`` (or constant).

Output directory (nothing of the user's is overwritten: a directory that holds another run needs
``resume`` or ``overwrite``):
    OUT/checkpoint-STEP/   adapter (PEFT layout) + trainer_state.pt (optimizer, scheduler, data
                           position, RNG states, the run's settings); written to a temporary
                           directory and renamed, so a checkpoint is complete or absent
    OUT/adapter_config.json, adapter_model.safetensors, grok_adapter.json   the final adapter
    OUT/metrics.jsonl      one JSON object per logged step (loss, lm/aux/z loss, lr, grad norm,
                           tokens/s, peak memory) and per evaluation (eval loss, perplexity)
    OUT/metrics.csv        the same, with ``csv=True``; OUT/tensorboard/ with ``tensorboard=True``
    OUT/loss.png           the loss curve, at the end
``resume=True`` continues from the newest checkpoint: adapters, optimizer, scheduler, data
position and RNG come back, metrics.jsonl is cut back to that step, so the curve and the final
adapter are an uninterrupted run's (``max_steps`` may be raised; the cosine schedule then follows
the new length from the resume step on). Settings that change the computation may not change.

Several processes (``torchrun --nproc_per_node W`` / ``accelerate launch``; WORLD_SIZE > 1 in the
environment): the process group is initialised here (gloo on CPUs, NCCL with ``device="cuda"``,
each rank on cuda:LOCAL_RANK; ``dist_timeout`` seconds) and the model is loaded with
``expert_parallel=True``: rank r holds experts [r*E/W, (r+1)*E/W) of every layer and trains their
adapters; attention, router and their adapters are replicated. By default (``data_parallel=True``)
this is also DATA parallelism: a step's global batch is ``batch_size * W`` rows, rank r reads rows
[r*batch_size, (r+1)*batch_size) of it (``load_corpus(rank=, world_size=)``), runs attention, router
and embedding on them alone, and its MoE blocks send its own tokens to the experts' ranks and back
(``set_tokens(model, "local")``, see ``grok_torch.parallel.distributed``). The loss is the global
batch's: each rank backpropagates (sum of its tokens' cross-entropies) / (target tokens of all ranks),
so the ranks' losses (and gradients) add up to the one-process mean over the global batch (the
router losses likewise: load balancing counts the routing over all ranks). After backward the
replicated adapters' gradients are summed over ranks (rank order, the same bits everywhere, so they
stay identical); the expert adapters' gradients are complete on their owner (the exchange's backward
brought every rank's rows there). W processes with ``batch_size`` B follow one process with W*B up to
fp32 summation order (tests/test_finetune_dp.py states the bounds). ``data_parallel=False``: every
rank reads the same batches and computes the same loss (expert parallelism only: W processes hold 1/W
of the experts each but process no more tokens; the one-process run bit for bit while the clip is
inactive). Either way the gradient norm that is clipped is the global one (replicated gradients once,
the experts' squares summed over ranks in rank order). Rank 0 writes OUT (metrics, plot, adapters: gathered
into the one-process layout, so the adapter is the same file whatever W was); each rank writes
its own optimizer / RNG state into the checkpoint (rank 0: trainer_state.pt, rank r:
trainer_state-rank{r}.pt), and a checkpoint is renamed into place only once every rank has
written its part (and counts for nobody before). Resuming needs the same W. Evaluation runs the
whole eval split on every rank. Not available with several processes: ``full``, ``device_map``; LoRA
dropout on experts without data parallelism; with data parallelism the "all_reduce" exchange.
"""
from __future__ import annotations

import json
import math
import os
import resource
import shutil
import tempfile
import time
import warnings
from datetime import timedelta
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch

from grok_torch.finetune.losses import IGNORE_INDEX, load_balancing_loss, lm_loss, lm_loss_sum, router_z_loss
from grok_torch.lora import (TARGETS, LoRAConfig, add_lora, load_adapter_weights, replicated_copies, save_adapter,
                             sync_replicated_grads)

__all__ = ["TrainConfig", "finetune", "latest_checkpoint"]

STATE_FILE = "trainer_state.pt"  # rank r > 0 of a multi-process run: trainer_state-rank{r}.pt
# settings that may change on --resume (they do not change what the run computes up to max_steps)
RESUMABLE = ("max_steps", "eval_every", "save_every", "log_every", "resume", "overwrite", "csv", "tensorboard",
             "progress", "output_dir", "model", "device", "plot", "dist_timeout")


@dataclass
class TrainConfig:
    """Every setting of a run (the CLI's flags, one to one)."""

    model: str
    data: Sequence[str]
    output_dir: str
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_targets: Sequence[str] = ("attn", "experts")
    full: bool = False
    seq_len: int = 512
    batch_size: int = 1
    grad_accum: int = 1
    lr: float = 1e-4
    lr_schedule: str = "cosine"
    warmup_steps: int = 0
    max_steps: int = 100
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    eval_every: int = 0
    eval_fraction: float = 0.0
    save_every: int = 0
    log_every: int = 1
    resume: bool = False
    overwrite: bool = False
    seed: int = 0
    aux_loss_weight: float = 0.0
    z_loss_weight: float = 0.0
    gradient_checkpointing: bool = False
    dtype: Optional[str] = None   # bf16 (the default, as released) or fp32; see resolve_dtype (accelerate)
    device: Optional[str] = None
    device_map: Optional[str] = None
    impl: str = "auto"
    tokenizer: Optional[str] = None
    data_format: Optional[str] = None
    csv: bool = False
    tensorboard: bool = False
    progress: bool = True
    plot: bool = True
    dist_timeout: float = 1800.0  # seconds a collective may wait for a peer (several processes only)
    loss_chunk: int = 1024           # positions per LM-head chunk of the loss (logits recomputed in backward)
    data_parallel: bool = True    # several processes: each rank its slice of the global batch (False: same tokens)

    def __post_init__(self):
        self.data = [str(d) for d in ([self.data] if isinstance(self.data, (str, os.PathLike)) else self.data)]
        self.lora_targets = tuple(self.lora_targets)
        self.dtype = resolve_dtype(self.dtype)
        checks = [
            (self.max_steps >= 1, "--max-steps must be >= 1"),
            (self.batch_size >= 1, "--batch-size must be >= 1"),
            (self.grad_accum >= 1, "--grad-accum must be >= 1"),
            (self.lr > 0, "--lr must be > 0"),
            (self.lr_schedule in ("cosine", "constant"), "--lr-schedule must be cosine or constant"),
            (self.warmup_steps >= 0, "--warmup-steps must be >= 0"),
            (min(self.eval_every, self.save_every) >= 0 and self.log_every >= 1,
             "--eval-every and --save-every must be >= 0, --log-every >= 1"),
            (self.aux_loss_weight >= 0 and self.z_loss_weight >= 0, "--aux-loss-weight / --z-loss-weight must be >= 0"),
            (self.max_grad_norm > 0, "--max-grad-norm must be > 0"),
            (self.loss_chunk >= 1, "--loss-chunk must be >= 1"),
            (self.dtype in ("bf16", "fp32"), "--dtype must be bf16 or fp32"),
            (not (self.resume and self.overwrite), "--resume continues OUT, --overwrite starts OUT over: pass one"),
            (bool(self.data), "--data: give at least one file"),
            (self.dist_timeout > 0, "--dist-timeout must be > 0 seconds"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(msg)
        bad = [t for t in self.lora_targets if t not in TARGETS]
        if bad or not self.lora_targets:
            raise ValueError(f"--lora-targets must be a comma list of {', '.join(TARGETS)}, got {','.join(self.lora_targets)}")

    def fingerprint(self) -> Dict:
        """The settings that define the computation (compared on resume), as JSON values."""
        return json.loads(json.dumps({k: v for k, v in asdict(self).items() if k not in RESUMABLE}))


def resolve_dtype(dtype: Optional[str]) -> str:
    """The activation dtype of a run: ``dtype`` if given, else what accelerate asks for, else bf16.

    Mixed precision comes through accelerate as its users set it: ``accelerate launch --mixed_precision
    bf16`` (or ``accelerate config``) exports ACCELERATE_MIXED_PRECISION, read here. Grok-1's own bf16
    mode IS mixed precision, the release's: bf16 activations and experts, fp32 norms, router, attention
    scores and softmax, plus fp32 adapters and AdamW state (``full``: the checkpoint's own weights train
    in their stored dtype, so a bf16 checkpoint's in bf16 with bf16 AdamW state, with a warning).
    accelerate's autocast is not used: it would run those fp32 parts in bf16 and leave the release's
    numerics. ``no`` (accelerate's default) leaves the model's precision alone, as accelerate does for
    a model loaded in bf16; fp16 and fp8 are refused (Grok-1 was trained and released in bf16, and its
    78.4x embedding scale overflows fp16); an explicit ``dtype`` that contradicts accelerate's bf16 too.
    """
    if dtype not in (None, "bf16", "fp32"):
        raise ValueError(f"--dtype must be bf16 or fp32, got {dtype!r}")
    mp = os.environ.get("ACCELERATE_MIXED_PRECISION", "").strip().lower()
    if mp not in ("", "no", "bf16"):
        raise ValueError(f"accelerate's mixed precision {mp!r} (accelerate launch --mixed_precision / accelerate "
                         "config) is not supported: Grok-1 trains in bf16 as released (--mixed_precision bf16) or fp32 "
                         "(--mixed_precision no --dtype fp32)")
    if dtype is None:
        return "bf16"
    if mp == "bf16" and dtype != "bf16":
        raise ValueError(f"--dtype {dtype} contradicts accelerate's --mixed_precision bf16: pass one of them "
                         "(--mixed_precision no --dtype fp32 for fp32)")
    return dtype


class _Ranks:
    """The processes of the run: rank, world size and the few collectives the loop needs (every call a
    no-op in one process). Read from the initialised torch.distributed default group."""

    def __init__(self):
        import torch.distributed as dist

        on = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        self.dist = dist if on else None
        self.rank, self.world = (dist.get_rank(), dist.get_world_size()) if on else (0, 1)

    @property
    def main(self) -> bool:
        return self.rank == 0

    def broadcast(self, obj):
        """Rank 0's ``obj`` on every rank."""
        if self.world == 1:
            return obj
        box = [obj]
        self.dist.broadcast_object_list(box, src=0)
        return box[0]

    def agree(self, error: Optional[BaseException]) -> None:
        """Raise on every rank if ``error`` is set on any (the others get a RuntimeError naming it)."""
        if self.world > 1:
            msgs = [None] * self.world
            self.dist.all_gather_object(msgs, None if error is None else f"{type(error).__name__}: {error}")
            failed = [(r, m) for r, m in enumerate(msgs) if m is not None]
            if failed and error is None:
                raise RuntimeError(f"rank {failed[0][0]} failed: {failed[0][1]}")
        if error is not None:
            raise error

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        """Sum of every rank's ``t`` (same shape everywhere), added in rank order: the same bits on every rank."""
        if self.world == 1:
            return t
        parts = [torch.empty_like(t) for _ in range(self.world)]
        self.dist.all_gather(parts, t.contiguous())
        acc = parts[0]
        for q in parts[1:]:
            acc = acc + q
        return acc

    def on_main(self, fn):
        """``fn()`` on rank 0, its result (or its error, raised everywhere) on every rank."""
        res, err = None, None
        if self.main:
            try:
                res = fn()
            except (ValueError, OSError) as e:
                err = e
        if self.world > 1:
            res, msg = self.broadcast((res, None if err is None else str(err)))
            if msg is not None and err is None:
                raise ValueError(msg)
        if err is not None:
            raise err
        return res


def _state_file(rank: int) -> str:
    return STATE_FILE if rank == 0 else f"trainer_state-rank{rank}.pt"


def _init_processes(cfg: "TrainConfig") -> bool:
    """Under torchrun / accelerate launch (WORLD_SIZE > 1): init the process group unless the caller did;
    True when it was initialised here (and is destroyed at the end)."""
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return False
    kind = torch.device(cfg.device).type if cfg.device else "cpu"
    if kind not in ("cpu", "cuda"):
        raise ValueError(f"--device {cfg.device}: with several processes pass cpu or cuda (rank uses cuda:LOCAL_RANK)")
    device = None
    if kind == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if kind == "cuda" else "gloo", timeout=timedelta(seconds=cfg.dist_timeout),
                            device_id=device)
    return True


def latest_checkpoint(out_dir) -> Optional[Path]:
    """OUT/checkpoint-STEP with the largest complete STEP (None when there is none)."""
    found = []
    for p in Path(out_dir).glob("checkpoint-*"):
        step = p.name.split("-", 1)[1]
        if step.isdigit() and (p / STATE_FILE).is_file():
            found.append((int(step), p))
    return max(found)[1] if found else None


def _prepare_output(cfg: TrainConfig) -> Optional[Path]:
    """Check OUT against resume / overwrite; returns the checkpoint to resume from."""
    out = Path(cfg.output_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--output-dir {out} is a file")
    ours = [p for p in out.glob("*") if p.name.startswith("checkpoint-") or p.name in ("metrics.jsonl", "adapter_model.safetensors")] \
        if out.is_dir() else []
    if cfg.resume:
        ckpt = latest_checkpoint(out)
        if ckpt is None:
            raise ValueError(f"--resume: no checkpoint in {out} (checkpoint-STEP/{STATE_FILE}); run without --resume")
        return ckpt
    if ours and not cfg.overwrite:
        raise ValueError(f"--output-dir {out} holds another run ({ours[0].name}): pass --resume to continue it or "
                         f"--overwrite to start over")
    if ours:
        for p in ours + [out / n for n in ("metrics.csv", "loss.png", "adapter_config.json", "grok_adapter.json")]:
            if p.is_dir():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()
    out.mkdir(parents=True, exist_ok=True)
    return None


def _lr_lambda(cfg: TrainConfig):
    def f(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / (cfg.warmup_steps + 1)
        if cfg.lr_schedule == "constant":
            return 1.0
        span = max(1, cfg.max_steps - cfg.warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - cfg.warmup_steps) / span)))
    return f


def _peak_memory(device) -> int:
    if device is not None and torch.device(device).type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class _Metrics:
    """metrics.jsonl (and .csv, TensorBoard) in OUT; on resume the lines after the checkpoint's step are dropped.

    ``write=False`` (ranks > 0): the rows are kept in memory only."""

    def __init__(self, out: Path, csv: bool, resume_step: Optional[int], tensorboard: bool = False,
                 write: bool = True):
        self.path, self.csv = out / "metrics.jsonl", out / "metrics.csv" if csv else None
        self.rows: List[dict] = []
        self.tb, self.write = None, write
        if not write:
            return
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise ValueError("--tensorboard needs the tensorboard package (pip install tensorboard)") from None
            self.tb = SummaryWriter(str(out / "tensorboard"), purge_step=resume_step)
        if resume_step is not None and self.path.exists():
            self.rows = [r for r in map(json.loads, self.path.read_text().splitlines()) if r["step"] <= resume_step]
        self.path.write_text("".join(json.dumps(r) + "\n" for r in self.rows))
        self._write_csv()

    def log(self, row: dict) -> None:
        self.rows.append(row)
        if not self.write:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        self._write_csv()
        if self.tb is not None:
            for k, v in row.items():
                if k != "step":
                    self.tb.add_scalar(k, v, row["step"])
            self.tb.flush()

    def _write_csv(self) -> None:
        if self.csv is None:
            return
        keys = sorted({k for r in self.rows for k in r}, key=lambda k: (k != "step", k))
        lines = [",".join(keys)] + [",".join("" if r.get(k) is None else str(r.get(k)) for k in keys) for r in self.rows]
        self.csv.write_text("\n".join(lines) + "\n")


def _load_model(cfg: TrainConfig, ranks: "_Ranks"):
    from grok_torch import Grok

    dtype = torch.bfloat16 if cfg.dtype == "bf16" else torch.float32
    kwargs = dict(device_map=cfg.device_map) if cfg.device_map else dict(device=cfg.device or "cpu")
    if ranks.world > 1:  # each rank: its share of the experts (cuda:LOCAL_RANK with NCCL)
        from grok_torch.parallel.distributed import default_device

        kwargs = dict(expert_parallel=True, device=default_device())
    model = Grok.from_pretrained(cfg.model, dtype=dtype, impl=cfg.impl, **kwargs)
    model.gradient_checkpointing = cfg.gradient_checkpointing
    return model


def _trainable(model, cfg: TrainConfig) -> List[torch.nn.Parameter]:
    if not cfg.full:
        return add_lora(model, LoRAConfig(cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_targets))
    frozen = [n for n, p in model.named_parameters() if not p.is_floating_point()]
    if frozen:
        raise ValueError(f"--full trains every weight, but {cfg.model} holds int8 ones ({frozen[0]}, ...): convert a "
                         f"float checkpoint (grok-convert --dtype bf16 or fp32) or train LoRA adapters")
    params = list(model.parameters())
    for p in params:
        p.requires_grad_(True)
    low = [n for n, p in model.named_parameters() if p.dtype != torch.float32]
    if low:
        # no fp32 master copy: --full is for small configs, and an fp32 checkpoint gives fp32 weights
        warnings.warn(f"--full trains {cfg.model}'s weights in their stored dtype: {len(low)} tensors ({low[0]}, ...) "
                      "are bf16, and so is their AdamW state; for fp32 weights and optimizer state convert an fp32 "
                      "checkpoint (grok-convert --dtype fp32)", stacklevel=2)
    return params


def _tokenizer(cfg: TrainConfig, vocab_size: int):
    """--tokenizer, else MODEL/tokenizer.model, else (a model of Grok-1's vocabulary) the Grok-1
    tokenizer bundled with the package, as grok-generate; None: only input_ids files can be read."""
    from grok_torch.tokenizer import Tokenizer

    if cfg.tokenizer:
        if not os.path.isfile(cfg.tokenizer):
            raise FileNotFoundError(f"--tokenizer {cfg.tokenizer} does not exist")
        return Tokenizer(cfg.tokenizer)
    return Tokenizer.for_model(cfg.model, vocab_size)


def _evaluate(model, data, device, batch_size) -> dict:
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for batch in data.eval_batches(batch_size):
            labels = batch["labels"].to(device)
            n = int((labels != -100).sum())
            if n:
                total += float(lm_loss(model(batch["input_ids"].to(device)), labels)) * n
                count += n
    model.train()
    loss = total / max(count, 1)
    return {"eval_loss": loss, "eval_ppl": math.exp(min(loss, 50.0)), "eval_tokens": count}


def _save_checkpoint(out: Path, step: int, model, cfg, opt, sched, data) -> Path:
    """Write checkpoint-STEP: in a temporary directory (rank 0 makes it; every rank writes its state file
    there), renamed by rank 0 once every rank has written; every rank returns after the rename."""
    ranks = _Ranks()
    final = out / f"checkpoint-{step}"
    tmp = Path(ranks.on_main(lambda: tempfile.mkdtemp(dir=out, prefix=f".checkpoint-{step}-")))
    try:
        error = None
        try:
            _save_weights(model, cfg, tmp)  # a collective under expert parallelism; rank 0 writes
            state = {"step": step, "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                     "data": data.state_dict(), "rng_cpu": torch.get_rng_state(),
                     "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
                     "config": json.dumps(cfg.fingerprint()), "world_size": ranks.world}
            torch.save(state, tmp / _state_file(ranks.rank))
        except Exception as e:
            error = e
        ranks.agree(error)  # every rank's part is written (or every rank raises)
        ranks.on_main(lambda: (shutil.rmtree(final) if final.exists() else None, os.replace(tmp, final)))
    except BaseException:
        if ranks.main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def _save_weights(model, cfg: TrainConfig, where: Path) -> None:
    if cfg.full:
        from safetensors.torch import save_file

        save_file({k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()},
                  str(where / "model.safetensors"))
    else:
        save_adapter(model, where, base_model=str(cfg.model))


def _restore(ckpt: Path, model, cfg, opt, sched, data) -> int:
    ranks = _Ranks()
    state = torch.load(ckpt / STATE_FILE, weights_only=True)  # every rank checks rank 0's: they agree
    if state.get("world_size", 1) != ranks.world:
        raise ValueError(f"--resume: {ckpt.name} was written by {state.get('world_size', 1)} process(es), this run has "
                         f"{ranks.world}: resume with the same number (each holds its experts' optimizer state)")
    if ranks.rank:
        state = torch.load(ckpt / _state_file(ranks.rank), weights_only=True)
    saved = json.loads(state["config"])
    saved.setdefault("loss_chunk", cfg.loss_chunk)  # older checkpoints (T <= chunk: the same computation)
    saved.setdefault("data_parallel", cfg.data_parallel if ranks.world == 1 else False)  # older checkpoints
    mine = cfg.fingerprint()
    changed = [k for k in sorted(set(saved) | set(mine)) if saved.get(k) != mine.get(k)]
    if changed:
        k = changed[0]
        raise ValueError(f"--resume with changed settings: --{k.replace('_', '-')} {mine.get(k)!r} "
                         f"(the checkpoint's: {saved.get(k)!r}); only {', '.join(RESUMABLE[:4])} may change")
    if cfg.full:
        from safetensors.torch import load_file

        model.load_state_dict(load_file(str(ckpt / "model.safetensors")))
    else:
        load_adapter_weights(model, ckpt)
    opt.load_state_dict(state["optimizer"])
    sched.load_state_dict(state["scheduler"])
    data.load_state_dict(state["data"])
    torch.set_rng_state(state["rng_cpu"])
    if state["rng_cuda"]:
        torch.cuda.set_rng_state_all(state["rng_cuda"])
    return int(state["step"])


def finetune(cfg: TrainConfig) -> dict:
    """Run (or resume) a fine-tuning run; returns {"steps", "final_loss", "eval", "output_dir", ...}.

    Under torchrun / accelerate launch (WORLD_SIZE > 1) every rank calls it (see the module docstring)."""
    from grok_torch.config import GrokConfig

    config_json = Path(cfg.model) / "config.json"
    if not config_json.is_file():
        raise ValueError(f"--model {cfg.model}: no config.json (pass a directory written by grok-convert)")
    max_len = GrokConfig.from_json(config_json).max_seq_len
    if cfg.seq_len < 1 or cfg.seq_len > max_len:
        raise ValueError(f"--seq-len {cfg.seq_len} exceeds the model context max_seq_len={max_len}"
                         if cfg.seq_len > 1 else f"--seq-len must be >= 1, got {cfg.seq_len}")
    created = _init_processes(cfg)
    try:
        return _finetune(cfg, _Ranks())
    finally:
        if created:
            import torch.distributed as dist

            dist.destroy_process_group()


def _clip_grad_norm(params, max_norm: float, local: set, ranks: _Ranks, copies=()) -> float:
    """``clip_grad_norm_`` over the whole model: with several processes the squares of the experts'
    gradients (ids in ``local``, held by one rank each) are summed over ranks in rank order, the
    replicated ones (the same on every rank) counted once: every rank gets the same norm. ``copies``:
    groups of in-process copies of one tensor (``device_map="ffn"``, gradients already synced): the first
    counts, the others get its clipped gradient (they stay bit-identical)."""
    if ranks.world == 1:
        extra = {id(p) for group in copies for p in group[1:]}
        norm = float(torch.nn.utils.clip_grad_norm_([p for p in params if id(p) not in extra], max_norm))
        for group in copies:
            for p in group[1:]:
                if group[0].grad is not None:
                    p.grad.copy_(group[0].grad)
        return norm
    grads = [p.grad for p in params if p.grad is not None]
    zero = torch.zeros((), device=grads[0].device)

    def squares(gs):
        return sum((torch.linalg.vector_norm(g.float()) ** 2 for g in gs), zero)

    shared = squares([p.grad for p in params if p.grad is not None and id(p) not in local])
    mine = squares([p.grad for p in params if p.grad is not None and id(p) in local]).reshape(1)
    parts = [torch.empty_like(mine) for _ in range(ranks.world)]
    ranks.dist.all_gather(parts, mine)
    experts = parts[0]
    for q in parts[1:]:
        experts = experts + q
    total = (shared + experts[0]).sqrt()
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    for g in grads:
        g.mul_(coef.to(g.dtype))
    return float(total)


def _sum_replicated_grads(params, local: set, ranks: _Ranks) -> None:
    """Data parallelism: every replicated parameter's gradient := the sum of the ranks' (rank order, one
    flat buffer; a missing gradient counts as zeros). The expert adapters' gradients are complete on their
    owner already (the exchange's backward brought every rank's rows there)."""
    shared = [p for p in params if id(p) not in local]
    if not shared:
        return
    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in shared])
    flat = ranks.sum(flat)
    i = 0
    for p in shared:
        n = p.numel()
        p.grad = flat[i:i + n].view_as(p).clone()
        i += n


def _dp_losses(ce_sum, labels, router_stats, valid, ranks: _Ranks):
    """This rank's parts of the global batch's losses (data parallelism): summed over ranks they are the
    one-process losses of the global batch (lm: the mean over ALL ranks' target tokens; load balancing:
    f counted over all ranks' tokens, P's sum divided by the global token count; z-loss: the global mean).
    ``ce_sum``: this rank's summed token cross-entropy (``lm_loss_sum``).
    Returns (lm, aux, z) (aux, z: None without router_stats)."""
    flat = labels.flatten().to(ce_sum.device)
    count = ranks.sum((flat != IGNORE_INDEX).sum().reshape(1)).clamp_min(1)   # exact: integers
    lm = ce_sum / count[0]
    if router_stats is None:
        return lm, None, None
    w = valid.to(ce_sum.device, torch.float32)
    routed = [(torch.nn.functional.one_hot(k, p.shape[-1]).to(p.dtype) * w.view(-1, 1, 1).to(p.dtype)).sum(0)
              for _, p, k in router_stats]                                       # [k, E] counts per layer
    counts = ranks.sum(torch.cat([torch.stack(routed).float().reshape(-1), w.sum().reshape(1)]))
    n = counts[-1].clamp_min(1)
    f = (counts[:-1].view(len(routed), *routed[0].shape) / n).to(router_stats[0][1].dtype)
    aux = torch.stack([p.shape[-1] * (f[i] * ((p.float() * w.view(-1, 1)).sum(0) / n)).sum()
                       for i, (_, p, _) in enumerate(router_stats)]).mean()
    z = torch.stack([(torch.logsumexp(lg.float(), -1) ** 2 * w).sum(0) / n for lg, _, _ in router_stats]).mean()
    return lm, aux, z


def _finetune(cfg: TrainConfig, ranks: _Ranks) -> dict:
    from grok_torch.finetune.data import load_corpus

    if ranks.world > 1:
        bad = [(cfg.full, "--full"), (cfg.device_map, "--device-map"),
               (cfg.lora_dropout > 0 and "experts" in cfg.lora_targets and not cfg.data_parallel,
                "--lora-dropout with experts in --lora-targets and --no-data-parallel")]
        for on, flag in bad:
            if on:
                raise ValueError(f"{flag} is not available with several processes (expert parallelism, WORLD_SIZE="
                                 f"{ranks.world}): each rank trains its experts' LoRA adapters")
    ckpt = ranks.on_main(lambda: _prepare_output(cfg))  # before the model loads: a refused OUT costs nothing
    out = Path(cfg.output_dir)
    torch.manual_seed(cfg.seed)
    model = _load_model(cfg, ranks)
    mcfg = model.config
    dp = ranks.world > 1 and cfg.data_parallel
    if dp:  # each rank's own tokens through the MoE exchange
        from grok_torch.parallel.distributed import set_tokens

        set_tokens(model, "local")
    tokenizer = _tokenizer(cfg, mcfg.vocab_size)
    train, evalset, stats = load_corpus(cfg.data, tokenizer, seq_len=cfg.seq_len, vocab_size=mcfg.vocab_size,
                                        eos_id=mcfg.eos_token_id, eval_fraction=cfg.eval_fraction, seed=cfg.seed,
                                        max_seq_len=mcfg.max_seq_len, format=cfg.data_format,
                                        batch_size=cfg.batch_size, rank=ranks.rank if dp else 0,
                                        world_size=ranks.world if dp else 1)
    params = _trainable(model, cfg)
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(cfg))
    device = model.embed.weight.device
    start = _restore(ckpt, model, cfg, opt, sched, train) if ckpt is not None else 0
    metrics = _Metrics(out, cfg.csv, start if ckpt is not None else None, cfg.tensorboard and ranks.main, ranks.main)
    if ranks.main:
        (out / "data_stats.txt").write_text(str(stats) + "\n")
    local = {id(p) for n, p in model.named_parameters() if ".moe.shards." in n} if ranks.world > 1 else set()
    copies = replicated_copies(model)

    from tqdm.auto import tqdm

    bar = tqdm(total=cfg.max_steps, initial=start, desc="fine-tuning", unit="step",
               disable=not (cfg.progress and ranks.main))
    model.train()
    want_stats = cfg.aux_loss_weight > 0 or cfg.z_loss_weight > 0
    row = {}
    for step in range(start, cfg.max_steps):
        t0, tokens, parts = time.perf_counter(), 0, {"lm_loss": 0.0, "aux_loss": 0.0, "z_loss": 0.0}
        for _ in range(cfg.grad_accum):
            batch = train.next_batch()
            ids, labels = batch["input_ids"].to(device), batch["labels"].to(device)
            router_stats = [] if want_stats else None
            hidden = model(ids, router_stats=router_stats, return_hidden=True)
            ce_sum = lm_loss_sum(model.head, hidden, labels, cfg.loss_chunk)
            valid = (ids != mcfg.pad_token_id).flatten()
            if dp:  # this rank's parts of the global batch's losses (their sums over ranks are logged)
                loss, aux, z = _dp_losses(ce_sum, labels, router_stats, valid, ranks)
                report = [x.detach().reshape(1) for x in (loss, aux, z) if x is not None]
                report = [float(v) for v in ranks.sum(torch.cat(report).float())]
                tokens += ids.numel() * ranks.world
            else:
                loss = ce_sum / (labels != IGNORE_INDEX).sum().clamp_min(1).to(ce_sum.device)
                aux, z = (load_balancing_loss(router_stats, valid), router_z_loss(router_stats, valid)) \
                    if want_stats else (None, None)
                report = [float(x.detach()) for x in (loss, aux, z) if x is not None]
                tokens += ids.numel()
            del hidden
            parts["lm_loss"] += report[0] / cfg.grad_accum
            if want_stats:
                loss = loss + cfg.aux_loss_weight * aux + cfg.z_loss_weight * z
                parts["aux_loss"] += report[1] / cfg.grad_accum
                parts["z_loss"] += report[2] / cfg.grad_accum
            (loss / cfg.grad_accum).backward()
        if not math.isfinite(sum(parts.values())):   # the same sums on every rank: all stop together
            raise ValueError(f"step {step + 1}: the loss is {sum(parts.values())} (the run diverged, or the model "
                             "computes non-finite values): lower --lr or raise --warmup-steps; the adapters were not "
                             "updated with it, and the newest checkpoint in OUT can be resumed")
        if dp:
            _sum_replicated_grads(params, local, ranks)
        sync_replicated_grads(model)  # device_map="ffn": each replicated adapter's copies get their sum
        grad_norm = _clip_grad_norm(params, cfg.max_grad_norm, local, ranks, copies)
        lr = sched.get_last_lr()[0]
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        done = step + 1
        total = parts["lm_loss"] + cfg.aux_loss_weight * parts["aux_loss"] + cfg.z_loss_weight * parts["z_loss"]
        row = {"step": done, "loss": total, **parts, "lr": lr, "grad_norm": grad_norm,
               "tokens_per_s": tokens / max(time.perf_counter() - t0, 1e-9), "peak_mem_bytes": _peak_memory(device)}
        if not want_stats:
            row.pop("aux_loss"), row.pop("z_loss")
        if done % cfg.log_every == 0 or done == cfg.max_steps:
            metrics.log(row)
        if evalset is not None and (cfg.eval_every and done % cfg.eval_every == 0 or done == cfg.max_steps):
            metrics.log({"step": done, **_evaluate(model, evalset, device, cfg.batch_size)})
        if cfg.save_every and done % cfg.save_every == 0 and done < cfg.max_steps:
            _save_checkpoint(out, done, model, cfg, opt, sched, train)
        bar.update(1)
        bar.set_postfix(loss=f"{total:.4f}", lr=f"{lr:.2e}")
    bar.close()
    _save_checkpoint(out, cfg.max_steps, model, cfg, opt, sched, train)
    _save_weights(model, cfg, out)  # a collective under expert parallelism; rank 0 writes
    if cfg.plot and ranks.main:
        from grok_torch.finetune.plot import plot_losses

        plot_losses(metrics.rows, out / "loss.png")
    evals = [r for r in metrics.rows if "eval_loss" in r]
    return {"steps": cfg.max_steps, "final_loss": row.get("loss"), "eval": evals[-1] if evals else None,
            "output_dir": str(out), "dtype": cfg.dtype, "world_size": ranks.world, "rank": ranks.rank, "trainable_parameters": sum(p.numel() for p in params), "data": stats.to_dict()}
