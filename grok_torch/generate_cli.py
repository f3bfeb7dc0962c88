"""grok-generate: stream text (or token ids) from a converted Grok checkpoint.

    # tiny CPU model converted from the fixture, token ids in and out (no tokenizer)
    grok-convert ../shared/grok1/tiny_ref /tmp/tiny --config tiny
    grok-generate --model /tmp/tiny --prompt-ids 25,376,378 --max-new-tokens 16 --temperature 0

    # the real model (tokenizer.model in the model directory, or --tokenizer PATH)
    grok-generate --model /data/grok-1-int8 --prompt "The answer to life" --max-new-tokens 100

Also ``python -m grok_torch.generate_cli ...``.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import List, Optional

__all__ = ["main"]


def _parse_ids(s: str) -> List[int]:
    try:
        return [int(x) for x in s.replace(" ", "").split(",") if x]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--prompt-ids must be comma-separated integers, got {s!r}") from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="grok-generate", description="Stream text (or token ids) from a checkpoint written by grok-convert.",
        epilog=__doc__.split("\n\n", 1)[1].rsplit("\n\n", 1)[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="directory written by grok-convert")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="prompt text (needs a tokenizer)")
    src.add_argument("--prompt-ids", type=_parse_ids, help="prompt as token ids, e.g. 25,376,378")
    p.add_argument("--tokenizer", help="tokenizer.model (default: MODEL/tokenizer.model when present)")
    p.add_argument("--max-new-tokens", type=int, default=100, metavar="N", help="tokens to generate (default 100)")
    p.add_argument("--temperature", type=float, default=1.0, metavar="T", help="sampling temperature; 0 = greedy (default 1.0)")
    p.add_argument("--top-p", type=float, default=1.0, metavar="P",
                   help="nucleus sampling, the official rule (ties at the threshold kept); 1.0 = off (default)")
    p.add_argument("--top-k", type=int, default=0, metavar="K", help="keep the K most likely tokens; 0 = off (default)")
    p.add_argument("--seed", type=int, default=42, help="sampling seed (default 42, the official runner's)")
    p.add_argument("--no-stop", action="store_true", help="do not stop at EOS (the official runner's behaviour)")
    p.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16",
                   help="activation dtype: bf16 as released (default) or the exact fp32 path")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cuda:0 (default cpu)")
    p.add_argument("--impl", choices=("auto", "torch", "triton"), default="auto",
                   help="MoE kernels: triton on CUDA / the PyTorch reference elsewhere (auto, default), or forced")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return _run(args)
    except (ValueError, TypeError, OSError) as e:  # OSError: FileNotFoundError, NotADirectoryError, ...
        msg = " ".join(str(e).split()) or type(e).__name__
        print(f"grok-generate: {msg}", file=sys.stderr)
        return 2


def _run(args) -> int:
    import torch

    from grok_torch.generate import stream
    from grok_torch.model import Grok
    from grok_torch.sampling import SampleSettings
    from grok_torch.tokenizer import StreamDecoder, Tokenizer

    if os.path.exists(args.model) and not os.path.isdir(args.model):
        raise ValueError(f"--model {args.model} is not a directory (pass the directory written by grok-convert)")
    SampleSettings(args.temperature, args.top_p, args.top_k)  # bad settings fail before the model loads
    tok_path = args.tokenizer or os.path.join(args.model, "tokenizer.model")
    tokenizer = Tokenizer(tok_path) if (args.tokenizer or os.path.exists(tok_path)) else None
    if args.prompt is not None and tokenizer is None:
        print(f"grok-generate: --prompt needs a tokenizer; none at {tok_path} (pass --tokenizer or use --prompt-ids)",
              file=sys.stderr)
        return 2
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    model = Grok.from_pretrained(args.model, dtype=dtype, device=args.device, impl=args.impl)
    prompt = tokenizer.encode(args.prompt) if args.prompt is not None else args.prompt_ids
    decoder = StreamDecoder(tokenizer) if tokenizer is not None else None
    steps = stream(model, [prompt], args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                   top_k=args.top_k, seed=args.seed, stop_at_eos=not args.no_stop)
    first = True
    for step in steps:
        t = step[0]
        if t is None:
            break
        if decoder is not None:
            if t != model.config.eos_token_id:
                sys.stdout.write(decoder.push(t))
        else:
            sys.stdout.write(("" if first else ",") + str(t))
        first = False
        sys.stdout.flush()
    if decoder is not None:
        sys.stdout.write(decoder.flush())  # bytes of a character cut off by the end of generation
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
