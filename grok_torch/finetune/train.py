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
"""
from __future__ import annotations

import json
import math
import os
import resource
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch

from grok_torch.finetune.losses import load_balancing_loss, lm_loss, router_z_loss
from grok_torch.lora import TARGETS, LoRAConfig, add_lora, load_adapter_weights, save_adapter

__all__ = ["TrainConfig", "finetune", "latest_checkpoint"]

STATE_FILE = "trainer_state.pt"
# settings that may change on --resume (they do not change what the run computes up to max_steps)
RESUMABLE = ("max_steps", "eval_every", "save_every", "log_every", "resume", "overwrite", "csv", "tensorboard",
             "progress", "output_dir", "model", "device", "plot")


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
    dtype: str = "bf16"
    device: Optional[str] = None
    device_map: Optional[str] = None
    impl: str = "auto"
    tokenizer: Optional[str] = None
    data_format: Optional[str] = None
    csv: bool = False
    tensorboard: bool = False
    progress: bool = True
    plot: bool = True

    def __post_init__(self):
        self.data = [str(d) for d in ([self.data] if isinstance(self.data, (str, os.PathLike)) else self.data)]
        self.lora_targets = tuple(self.lora_targets)
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
            (self.dtype in ("bf16", "fp32"), "--dtype must be bf16 or fp32"),
            (not (self.resume and self.overwrite), "--resume continues OUT, --overwrite starts OUT over: pass one"),
            (bool(self.data), "--data: give at least one file"),
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
    """metrics.jsonl (and .csv, TensorBoard) in OUT; on resume the lines after the checkpoint's step are dropped."""

    def __init__(self, out: Path, csv: bool, resume_step: Optional[int], tensorboard: bool = False):
        self.path, self.csv = out / "metrics.jsonl", out / "metrics.csv" if csv else None
        self.rows: List[dict] = []
        self.tb = None
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


def _load_model(cfg: TrainConfig):
    from grok_torch import Grok

    dtype = torch.bfloat16 if cfg.dtype == "bf16" else torch.float32
    kwargs = dict(device_map=cfg.device_map) if cfg.device_map else dict(device=cfg.device or "cpu")
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
    return params


def _tokenizer(cfg: TrainConfig):
    from grok_torch.tokenizer import Tokenizer

    path = cfg.tokenizer or os.path.join(cfg.model, "tokenizer.model")
    if cfg.tokenizer and not os.path.isfile(path):
        raise FileNotFoundError(f"--tokenizer {path} does not exist")
    return Tokenizer(path) if os.path.isfile(path) else None


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
    final = out / f"checkpoint-{step}"
    tmp = Path(tempfile.mkdtemp(dir=out, prefix=f".checkpoint-{step}-"))
    try:
        _save_weights(model, cfg, tmp)
        state = {"step": step, "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                 "data": data.state_dict(), "rng_cpu": torch.get_rng_state(),
                 "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
                 "config": json.dumps(cfg.fingerprint())}
        torch.save(state, tmp / STATE_FILE)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
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
    state = torch.load(ckpt / STATE_FILE, weights_only=True)
    saved = json.loads(state["config"])
    changed = [k for k in sorted(set(saved) | set(cfg.fingerprint())) if saved.get(k) != cfg.fingerprint().get(k)]
    if changed:
        k = changed[0]
        raise ValueError(f"--resume with changed settings: --{k.replace('_', '-')} {cfg.fingerprint().get(k)!r} "
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
    """Run (or resume) a fine-tuning run; returns {"steps", "final_loss", "eval", "output_dir", ...}."""
    from grok_torch.finetune.data import load_corpus

    from grok_torch.config import GrokConfig

    config_json = Path(cfg.model) / "config.json"
    if not config_json.is_file():
        raise ValueError(f"--model {cfg.model}: no config.json (pass a directory written by grok-convert)")
    max_len = GrokConfig.from_json(config_json).max_seq_len
    if cfg.seq_len < 1 or cfg.seq_len > max_len:
        raise ValueError(f"--seq-len {cfg.seq_len} exceeds the model context max_seq_len={max_len}"
                         if cfg.seq_len > 1 else f"--seq-len must be >= 1, got {cfg.seq_len}")
    ckpt = _prepare_output(cfg)  # before the model loads: a refused OUT costs nothing
    out = Path(cfg.output_dir)
    torch.manual_seed(cfg.seed)
    model = _load_model(cfg)
    mcfg = model.config
    train, evalset, stats = load_corpus(cfg.data, _tokenizer(cfg), seq_len=cfg.seq_len, vocab_size=mcfg.vocab_size,
                                        eos_id=mcfg.eos_token_id, eval_fraction=cfg.eval_fraction, seed=cfg.seed,
                                        max_seq_len=mcfg.max_seq_len, format=cfg.data_format,
                                        batch_size=cfg.batch_size)
    params = _trainable(model, cfg)
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(cfg))
    device = model.embed.weight.device
    start = _restore(ckpt, model, cfg, opt, sched, train) if ckpt is not None else 0
    metrics = _Metrics(out, cfg.csv, start if ckpt is not None else None, cfg.tensorboard)
    (out / "data_stats.txt").write_text(str(stats) + "\n")

    from tqdm.auto import tqdm

    bar = tqdm(total=cfg.max_steps, initial=start, desc="fine-tuning", unit="step", disable=not cfg.progress)
    model.train()
    want_stats = cfg.aux_loss_weight > 0 or cfg.z_loss_weight > 0
    row = {}
    for step in range(start, cfg.max_steps):
        t0, tokens, parts = time.perf_counter(), 0, {"lm_loss": 0.0, "aux_loss": 0.0, "z_loss": 0.0}
        for _ in range(cfg.grad_accum):
            batch = train.next_batch()
            ids, labels = batch["input_ids"].to(device), batch["labels"].to(device)
            router_stats = [] if want_stats else None
            loss = lm_loss(model(ids, router_stats=router_stats), labels)
            parts["lm_loss"] += float(loss.detach()) / cfg.grad_accum
            if want_stats:
                valid = (ids != mcfg.pad_token_id).flatten()
                aux, z = load_balancing_loss(router_stats, valid), router_z_loss(router_stats, valid)
                loss = loss + cfg.aux_loss_weight * aux + cfg.z_loss_weight * z
                parts["aux_loss"] += float(aux.detach()) / cfg.grad_accum
                parts["z_loss"] += float(z.detach()) / cfg.grad_accum
            (loss / cfg.grad_accum).backward()
            tokens += ids.numel()
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm))
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
    _save_weights(model, cfg, out)
    if cfg.plot:
        from grok_torch.finetune.plot import plot_losses

        plot_losses(metrics.rows, out / "loss.png")
    evals = [r for r in metrics.rows if "eval_loss" in r]
    return {"steps": cfg.max_steps, "final_loss": row.get("loss"), "eval": evals[-1] if evals else None,
            "output_dir": str(out), "trainable_parameters": sum(p.numel() for p in params), "data": stats.to_dict()}
