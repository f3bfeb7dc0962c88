"""``grok-finetune``: LoRA (or full) fine-tuning of a grok-convert model, and ``grok-finetune merge``."""
from __future__ import annotations

import argparse
import sys
from typing import List, Optional

__all__ = ["main", "build_parser", "build_merge_parser"]

EXAMPLES = """examples:
  # CPU, the demo model (python -m grok_torch.convert.synthetic /tmp/grok-tiny-src --overwrite &&
  # grok-convert /tmp/grok-tiny-src /tmp/grok-tiny --overwrite): random weights, the real vocabulary and tokenizer
  python -c "print('\\n'.join(['The quick brown fox jumps over the lazy dog.', 'Each token is routed to two of eight experts.'] * 10))" > /tmp/corpus.txt
  grok-finetune --model /tmp/grok-tiny --data /tmp/corpus.txt --output-dir /tmp/ft --seq-len 32 --max-steps 30 --lr 1e-2 --dtype fp32 --overwrite
  grok-generate --model /tmp/grok-tiny --adapter /tmp/ft --prompt "The quick brown" --max-new-tokens 8 --temperature 0

  # the real model on one 8-GPU node, text / prompt-completion JSONL, LoRA on attention and every expert
  grok-finetune --model /data/grok-1-int8 --data train.jsonl --output-dir out --device-map auto \\
      --seq-len 4096 --lora-rank 16 --lora-alpha 32 --gradient-checkpointing --max-steps 1000 --save-every 100

  # one process per GPU, each holding its share of every layer's experts and training their adapters
  torchrun --nproc_per_node 8 $(which grok-finetune) --model /data/grok-1-int8 --data train.jsonl --output-dir out
  accelerate launch --multi_gpu --num_processes 8 --mixed_precision bf16 -m grok_torch.finetune \\
      --model /data/grok-1-int8 --data train.jsonl --output-dir out

  # continue after an interruption (optionally with more steps), then use or merge the adapter
  grok-finetune ... --output-dir out --resume --max-steps 2000
  grok-generate --model /data/grok-1-int8 --adapter out --prompt "..."
  grok-finetune merge --model /data/grok-1-int8 --adapter out --output-dir /data/grok-1-merged
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="grok-finetune", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EXAMPLES,
        description="Fine-tune Grok-1: LoRA adapters on attention, every expert and/or the router over the frozen "
                    "base (int8 as released), or every weight of a float checkpoint (--full). "
                    "`grok-finetune merge --help`: fold an adapter into a checkpoint.")
    a = p.add_argument
    a("--model", required=True, metavar="DIR", help="directory written by grok-convert")
    a("--data", required=True, action="append", metavar="FILE",
      help="training data (repeatable): .txt (one document per line), JSONL with text, prompt/completion "
           "(loss on the completion only) or input_ids")
    a("--output-dir", required=True, metavar="OUT", help="checkpoints, final adapter, metrics.jsonl, loss.png")
    a("--lora-rank", type=int, default=8, metavar="R", help="adapter rank (default 8)")
    a("--lora-alpha", type=float, default=16.0, metavar="A", help="adapter scale alpha/R (default 16)")
    a("--lora-dropout", type=float, default=0.0, metavar="P", help="dropout on the adapters' input (default 0)")
    a("--lora-targets", default="attn,experts", metavar="LIST",
      help="comma list of attn, experts, router (default attn,experts)")
    a("--full", action="store_true", help="train every weight instead of adapters (a float checkpoint that fits)")
    a("--seq-len", type=int, default=512, help="tokens per packed row (default 512)")
    a("--batch-size", type=int, default=1, help="rows per micro-batch (default 1)")
    a("--grad-accum", type=int, default=1, metavar="N", help="micro-batches per optimizer step (default 1)")
    a("--lr", type=float, default=1e-4, help="peak learning rate (default 1e-4)")
    a("--lr-schedule", choices=("cosine", "constant"), default="cosine", help="after warm-up (default cosine)")
    a("--warmup-steps", type=int, default=0, metavar="N", help="linear warm-up steps (default 0)")
    a("--max-steps", type=int, default=100, metavar="N", help="optimizer steps (default 100)")
    a("--weight-decay", type=float, default=0.0, help="AdamW weight decay (default 0)")
    a("--max-grad-norm", type=float, default=1.0, help="gradient norm clip (default 1.0)")
    a("--eval-every", type=int, default=0, metavar="N", help="evaluate every N steps (default: at the end only)")
    a("--eval-fraction", type=float, default=0.0, metavar="F", help="documents held out for eval (default 0)")
    a("--save-every", type=int, default=0, metavar="N", help="checkpoint every N steps (default: at the end)")
    a("--log-every", type=int, default=1, metavar="N", help="metrics.jsonl row every N steps (default 1)")
    a("--resume", action="store_true", help="continue from the newest checkpoint in OUT")
    a("--overwrite", action="store_true", help="start over in an OUT that holds another run")
    a("--seed", type=int, default=0, help="adapter init, data order and split, dropout (default 0)")
    a("--aux-loss-weight", type=float, default=0.0, metavar="W",
      help="load-balancing loss weight (Switch/Mixtral; default 0 = off, as the official code)")
    a("--z-loss-weight", type=float, default=0.0, metavar="W", help="router z-loss weight (default 0 = off)")
    a("--gradient-checkpointing", action="store_true", help="recompute each layer in backward (less memory)")
    a("--loss-chunk", type=int, default=1024, metavar="N",
      help="positions per LM-head chunk of the loss; longer rows recompute the chunk's logits in backward "
           "instead of keeping [batch, seq, vocab] fp32 logits (default 1024)")
    a("--dtype", choices=("bf16", "fp32"),
      help="activation dtype: bf16 (default; the release's mixed precision: fp32 norms, router, attention "
           "scores, adapters and optimizer state) or fp32. Under accelerate launch, --mixed_precision bf16 "
           "selects bf16 and fp16 is refused")
    a("--device", help="one torch device (default cpu)")
    a("--device-map", choices=("experts", "ffn", "auto", "balanced", "sequential"),
      help="spread the model over this process's GPUs: experts (each GPU a range of every layer's experts) or "
           "accelerate's planners; each expert's adapters live with it")
    a("--impl", choices=("auto", "torch", "triton"), default="auto", help="kernels (default: triton on CUDA)")
    a("--no-data-parallel", action="store_true",
      help="under torchrun: every rank runs the same batch (expert parallelism only) instead of its own slice")
    a("--dist-timeout", type=float, default=1800.0, metavar="S",
      help="under torchrun / accelerate launch: seconds a collective waits for the other ranks (default 1800)")
    a("--tokenizer", help="tokenizer.model (default MODEL/tokenizer.model)")
    a("--data-format", choices=("text", "text-lines", "jsonl"), help="override the per-file format detection")
    a("--csv", action="store_true", help="also write OUT/metrics.csv")
    a("--tensorboard", action="store_true", help="also log to OUT/tensorboard (needs the tensorboard package)")
    a("--no-progress", action="store_true", help="no progress bar")
    return p


def build_merge_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="grok-finetune merge",
                                description="Fold a LoRA adapter into the base weights and write a bf16 or fp32 "
                                            "checkpoint (int8 experts are never re-quantized) that Grok.from_pretrained "
                                            "and grok-generate load.")
    p.add_argument("--model", required=True, metavar="DIR", help="the base model (grok-convert output)")
    p.add_argument("--adapter", required=True, metavar="DIR", help="a grok-finetune output (or checkpoint) directory")
    p.add_argument("--output-dir", required=True, metavar="OUT", help="where the merged checkpoint goes")
    p.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16", help="merged weight format (default bf16)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing OUT")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def _train(argv: List[str]) -> int:
    from grok_torch.finetune.train import TrainConfig, finetune

    args = build_parser().parse_args(argv)
    cfg = TrainConfig(
        model=args.model, data=args.data, output_dir=args.output_dir, lora_rank=args.lora_rank,
        lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
        lora_targets=[t.strip() for t in args.lora_targets.split(",") if t.strip()], full=args.full,
        seq_len=args.seq_len, batch_size=args.batch_size, grad_accum=args.grad_accum, lr=args.lr,
        lr_schedule=args.lr_schedule, warmup_steps=args.warmup_steps, max_steps=args.max_steps,
        weight_decay=args.weight_decay, max_grad_norm=args.max_grad_norm, eval_every=args.eval_every,
        eval_fraction=args.eval_fraction, save_every=args.save_every, log_every=args.log_every, resume=args.resume,
        overwrite=args.overwrite, seed=args.seed, aux_loss_weight=args.aux_loss_weight,
        z_loss_weight=args.z_loss_weight, gradient_checkpointing=args.gradient_checkpointing, dtype=args.dtype,
        device=args.device, device_map=args.device_map, impl=args.impl, tokenizer=args.tokenizer,
        data_format=args.data_format, csv=args.csv, tensorboard=args.tensorboard, dist_timeout=args.dist_timeout,
        data_parallel=not args.no_data_parallel, loss_chunk=args.loss_chunk,
        progress=not args.no_progress)
    res = finetune(cfg)
    if res["rank"] != 0:    # several processes: rank 0 reports for the run
        return 0
    ev = res["eval"]
    procs = f", {res['world_size']} processes" if res["world_size"] > 1 else ""
    print(f"grok-finetune: {res['steps']} steps ({res['dtype']}{procs}), final loss {res['final_loss']:.4f}"
          + (f", eval loss {ev['eval_loss']:.4f} (perplexity {ev['eval_ppl']:.2f})" if ev else "")
          + f"; adapter and metrics in {res['output_dir']}")
    return 0


def _merge(argv: List[str]) -> int:
    from grok_torch.finetune.merge import merge_adapter

    args = build_merge_parser().parse_args(argv)
    out = merge_adapter(args.model, args.adapter, args.output_dir, dtype=args.dtype, overwrite=args.overwrite,
                        progress=not args.no_progress)
    print(f"grok-finetune merge: wrote {out}")
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    merge = bool(argv) and argv[0] == "merge"
    try:
        return _merge(argv[1:]) if merge else _train(argv)
    except (ValueError, OSError, NotImplementedError) as e:
        print(f"grok-finetune{' merge' if merge else ''}: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("grok-finetune: interrupted (the last complete checkpoint in OUT can be resumed with --resume)",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
