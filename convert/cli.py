"""Command line for the converter: ``grok-convert SRC OUT [...]`` and ``grok-convert verify OUT [--src SRC]``."""
from __future__ import annotations

import argparse
import sys
from typing import List, Optional

_EPILOG = """\
examples:
  grok-convert /data/grok-1/checkpoints /data/grok-1-int8             # int8 as released (~318 GB)
  grok-convert /data/grok-1/checkpoints /data/grok-1-bf16 --dtype bf16 --workers 8
  grok-convert ../shared/grok1/tiny_ref /tmp/grok-tiny                # the 12-layer test fixture
  grok-convert verify /data/grok-1-int8 --src /data/grok-1/checkpoints

SRC is the directory holding ckpt-0/ (the release's checkpoints/) or ckpt-0/ itself. OUT receives
config.json, model-000NN-of-000MM.safetensors, model.safetensors.index.json, tokenizer.model (when
given or found next to SRC) and grok_convert.json (a record of the source and the sha256 of every
shard, read by `grok-convert verify`). Nothing from the pickles is executed: an allow-listed reader
refuses any file that names another global. An interrupted run continues with --resume.
"""


def _convert_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="grok-convert",
        description="Convert the official Grok-1 checkpoint (ckpt-0 pickles) to safetensors shards, "
                    "without JAX and in bounded memory. Also: `grok-convert verify OUT [--src SRC]`.",
        epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", metavar="SRC", help="directory holding ckpt-0/, or ckpt-0/ itself")
    p.add_argument("out", metavar="OUT", help="output directory (created; must be empty unless --resume/--overwrite)")
    p.add_argument("--dtype", choices=["int8", "bf16", "fp32"], default="int8",
                   help="int8: released weights + scales byte for byte (default); bf16: dequantized exactly as "
                        "the official code; fp32: the exact products int8*scale")
    p.add_argument("--config", default=None, metavar="NAME|PATH.json",
                   help="grok-1, tiny, demo, or a JSON config; default: config.json beside ckpt-0/ if there is one "
                        "(python -m grok_torch.convert.synthetic writes it), else detected from the tensor shapes")
    p.add_argument("--shard-size", default="5GB", metavar="SIZE", help="data bytes per shard (default 5GB)")
    p.add_argument("--workers", type=int, default=None, metavar="N",
                   help="shards written in parallel (default: min(4, CPUs)); memory is one chunk per worker")
    p.add_argument("--tokenizer", default=None, metavar="PATH",
                   help="tokenizer.model to copy into OUT (default: one found next to SRC, if its size matches)")
    p.add_argument("--plain-dtype", choices=["fp32", "bf16"], default="fp32",
                   help="dtype of the embedding, norms and routers (default fp32, as released)")
    p.add_argument("--chunk-size", default="64MiB", metavar="SIZE", help="bytes processed per step (default 64MiB)")
    p.add_argument("--resume", action="store_true", help="finish an interrupted conversion into OUT")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier conversion in OUT")
    p.add_argument("--quiet", action="store_true", help="no progress bar or messages")
    return p


def _verify_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="grok-convert verify",
        description="Re-hash every shard of a conversion against its record (grok_convert.json) and report "
                    "any difference. With --src, also check the source files and re-derive every tensor.")
    p.add_argument("out", metavar="OUT", help="a directory written by grok-convert")
    p.add_argument("--src", default=None, metavar="SRC", help="the source checkpoint to compare against")
    p.add_argument("--quiet", action="store_true", help="print only problems")
    return p


# verify prints this many problems, then a count of the rest: a wrong --src differs in every tensor
MAX_PROBLEMS_SHOWN = 20


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        return _main(argv)
    except KeyboardInterrupt:
        # anywhere, start-up included: one line, the conventional 128 + SIGINT
        print("grok-convert verify: interrupted" if argv[:1] == ["verify"] else
              "grok-convert: interrupted; rerun with --resume to continue", file=sys.stderr)
        return 130


def _main(argv: List[str]) -> int:
    verify = bool(argv) and argv[0] == "verify"
    a = _verify_parser().parse_args(argv[1:]) if verify else _convert_parser().parse_args(argv)
    # imported after parsing so that --help answers without loading torch
    from grok_torch.convert.convert import ConvertError, convert_checkpoint
    from grok_torch.convert.grok_pickle import CheckpointError
    from grok_torch.convert.verify import verify_conversion
    try:
        if verify:
            problems = verify_conversion(a.out, a.src, quiet=a.quiet)
            for m in problems[:MAX_PROBLEMS_SHOWN]:
                print(f"grok-convert verify: PROBLEM: {m}", file=sys.stderr)
            if len(problems) > MAX_PROBLEMS_SHOWN:
                print(f"grok-convert verify: ... and {len(problems) - MAX_PROBLEMS_SHOWN} more problem(s)",
                      file=sys.stderr)
            if problems:
                differ = sum("differs from its conversion" in m for m in problems)
                hint = (f"; {differ} tensors differ from the source: is --src the checkpoint {a.out} was "
                        "converted from?" if a.src and differ > MAX_PROBLEMS_SHOWN else "")
                print(f"grok-convert verify: {a.out}: FAILED, {len(problems)} problem(s){hint}", file=sys.stderr)
            else:
                print(f"grok-convert verify: {a.out}: all shards match the record"
                      + (" and the source" if a.src else ""))
            return 1 if problems else 0
        convert_checkpoint(a.src, a.out, dtype=a.dtype, config=a.config, shard_size=a.shard_size,
                           workers=a.workers, tokenizer=a.tokenizer, resume=a.resume, overwrite=a.overwrite,
                           quiet=a.quiet, plain_dtype=a.plain_dtype, chunk_size=a.chunk_size)
        return 0
    except (ConvertError, CheckpointError, ValueError, KeyError, OSError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"grok-convert: error: {msg}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
