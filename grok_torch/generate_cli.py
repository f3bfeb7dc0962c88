"""grok-generate: stream text (or token ids) from a converted Grok checkpoint.

    # the demo model: Grok-1's shapes scaled down, its real 131072-token vocabulary and tokenizer,
    # RANDOM weights (its output is random text); a few seconds on a CPU
    python -m grok_torch.convert.synthetic /tmp/grok-tiny-src --overwrite && grok-convert /tmp/grok-tiny-src /tmp/grok-tiny --overwrite
    grok-generate --model /tmp/grok-tiny --prompt "The answer to life" --max-new-tokens 20
    grok-generate --model /tmp/grok-tiny --prompt-ids 422,3033,356 --max-new-tokens 8 --temperature 0

    # the real model (grok-convert the release's checkpoints/ first; tokenizer.model is copied beside it)
    grok-generate --model /data/grok-1-int8 --prompt "The answer to life" --max-new-tokens 100

    # one process, several GPUs (device_map=); or one process per GPU (expert parallelism)
    grok-generate --model /data/grok-1-int8 --device-map experts --prompt "The answer to life"
    torchrun --nproc_per_node 8 $(which grok-generate) --model /data/grok-1-int8 --prompt "The answer to life"

Also ``python -m grok_torch.generate_cli ...``.
"""
from __future__ import annotations

import argparse
import os
import re
import sys
from typing import List, Optional, TextIO

__all__ = ["main"]

DEFAULT_NEW_TOKENS = 100
# the library's parameter names, as this CLI's flags, in the errors it prints
# a parameter name standing alone, never one inside a path or a longer name (/data/top_k-runs)
_FLAGS = re.compile(r"(?<![\w/.-])(max_new_tokens|temperature|top_p|top_k|prefill_chunk)(?![\w/.-])")


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
    p.add_argument("--tokenizer", help="tokenizer.model for --prompt and for decoding the output (default: "
                   "MODEL/tokenizer.model, else Grok-1's, bundled). --prompt-ids prints ids unless --tokenizer is given")
    p.add_argument("--max-new-tokens", type=int, metavar="N",
                   help=f"tokens to generate (default {DEFAULT_NEW_TOKENS}, or what the model's context leaves room for)")
    p.add_argument("--temperature", type=float, default=1.0, metavar="T", help="sampling temperature; 0 = greedy (default 1.0)")
    p.add_argument("--top-p", type=float, default=1.0, metavar="P",
                   help="nucleus sampling, the official rule (ties at the threshold kept); 1.0 = off (default)")
    p.add_argument("--top-k", type=int, default=0, metavar="K", help="keep the K most likely tokens; 0 = off (default)")
    p.add_argument("--seed", type=int, default=42, help="sampling seed (default 42, the official runner's)")
    p.add_argument("--no-stop", action="store_true", help="do not stop at EOS (the official runner's behaviour)")
    p.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16",
                   help="activation dtype: bf16 as released (default) or the exact fp32 path")
    p.add_argument("--device", help="torch device, e.g. cuda:0 (default cpu); under torchrun: cpu or cuda "
                   "(each rank takes cuda:LOCAL_RANK; default cuda when there is a GPU)")
    p.add_argument("--device-map", choices=("experts", "ffn", "auto"),
                   help="one process: spread the model over every visible GPU (experts: a range of experts per "
                   "GPU; ffn: a slice of every expert's hidden dim; auto: accelerate's planner). Under torchrun / "
                   "accelerate launch (WORLD_SIZE > 1): how the ranks split the experts, experts (default) or ffn")
    p.add_argument("--dist-timeout", type=float, default=300.0, metavar="S",
                   help="under torchrun: seconds a collective waits for the other ranks before failing (default 300)")
    p.add_argument("--impl", choices=("auto", "torch", "triton"), default="auto",
                   help="kernels (MoE, attention, attention projections): triton on CUDA / the PyTorch reference "
                   "elsewhere (auto, default), or forced")
    p.add_argument("--adapter", metavar="DIR",
                   help="apply a LoRA adapter (a grok-finetune output directory) without merging it")
    p.add_argument("--attn-precision", choices=("fp32", "bf16"), default="fp32",
                   help="attention math: fp32 (default, faithful: exact int8 weights, fp32 products) or bf16 "
                   "(bf16 operands, fp32 accumulation: tensor cores on a GPU; within SPEC 8's bf16 bounds)")
    p.add_argument("--prefill-chunk", type=int, default=2048, metavar="N",
                   help="prompt positions per prefill forward: bounds a long prompt's activations (default 2048; "
                   "0 = the whole prompt at once)")
    p.add_argument("--cuda-graph", choices=("auto", "on", "off"), default="auto",
                   help="capture the decode step in a CUDA graph: auto (default: when the model is on one GPU "
                   "with the Triton kernels), on (fail if it cannot), off (eager)")
    return p


def _one_line(e: BaseException) -> str:
    """The error on one line, with library parameter names spelled as this CLI's flags (not in an
    OSError's message: that names a path, which may hold any word)."""
    line = " ".join(str(e).split()) or type(e).__name__
    return line if isinstance(e, OSError) else _FLAGS.sub(lambda m: "--" + m.group(1).replace("_", "-"), line)


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return _main_distributed(args)
    try:
        return _run(args)
    # OSError: FileNotFoundError, NotADirectoryError, ...; NotImplementedError: a config switch this
    # port does not run (e.g. Grok-2's untied head)
    except (ValueError, TypeError, OSError, NotImplementedError) as e:
        print(f"grok-generate: {_one_line(e)}", file=sys.stderr)
        return 2


def _main_distributed(args) -> int:
    """One rank of a torchrun / accelerate launch job: every rank loads its share and runs the same
    generation; rank 0 prints. Any error ends this rank with one line naming it; the others fail at
    their next collective (a peer that closed its connection, or the --dist-timeout)."""
    import datetime

    import torch
    import torch.distributed as dist

    from grok_torch.parallel.distributed import CollectiveError

    rank = int(os.environ.get("RANK", "0"))
    rc = 0
    try:
        if args.device_map == "auto":
            raise ValueError("--device-map auto spreads the model over the GPUs of one process; under torchrun "
                             "each rank holds a share of the experts: use --device-map experts (default) or ffn")
        if not args.dist_timeout > 0:
            raise ValueError(f"--dist-timeout must be > 0 seconds, got {args.dist_timeout}")
        kind = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        if kind not in ("cpu", "cuda"):
            raise ValueError(f"--device {kind}: under torchrun pass cpu or cuda (each rank uses cuda:LOCAL_RANK)")
        device = "cpu"
        if kind == "cuda":
            if not torch.cuda.is_available():
                raise ValueError("--device cuda: CUDA is not available on this machine")
            device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
            torch.cuda.set_device(torch.device(device))
        dist.init_process_group("nccl" if kind == "cuda" else "gloo",
                                timeout=datetime.timedelta(seconds=args.dist_timeout),
                                device_id=torch.device(device) if kind == "cuda" else None)
        out = sys.stdout if rank == 0 else open(os.devnull, "w")
        try:
            return _run(args, out=out, device=device, expert_parallel=args.device_map or "experts", rank=rank)
        finally:
            if out is not sys.stdout:
                out.close()
    except CollectiveError as e:
        print(f"grok-generate: {_one_line(e)}", file=sys.stderr)  # names the rank already
        rc = 1
    except (ValueError, TypeError, OSError, RuntimeError) as e:  # RuntimeError: rendezvous, backend errors
        print(f"grok-generate: rank {rank}: {_one_line(e)}", file=sys.stderr)
        rc = 2 if not isinstance(e, RuntimeError) else 1
    finally:
        # always for gloo (a group left to the interpreter's exit can abort the process); not for
        # NCCL after a failed collective, where tearing down may wait on the failed communicator
        if dist.is_initialized() and (rc != 1 or "nccl" not in str(dist.get_backend())):
            try:
                dist.destroy_process_group()
            except Exception:  # noqa: BLE001 - ending anyway; the error is already printed
                pass
    return rc


def _agree(failure: Optional[BaseException], what: str, rank: int) -> None:
    """Every rank says whether it got through ``what``: a rank that failed raises its error, the others
    a ValueError naming the ranks that failed (instead of waiting for them in a collective)."""
    import torch
    import torch.distributed as dist

    from grok_torch.parallel.distributed import CollectiveError

    flag = torch.tensor([0 if failure is None else 1], dtype=torch.int32)
    if "nccl" in str(dist.get_backend()):
        flag = flag.cuda()
    flags = [torch.zeros_like(flag) for _ in range(dist.get_world_size())]
    try:
        dist.all_gather(flags, flag)
    except RuntimeError as e:
        raise CollectiveError(f"rank {rank}: telling the other ranks how {what} went failed ({_one_line(e)}); "
                              "a peer process failed or timed out, see its error") from None
    if failure is not None:
        raise failure
    failed = [r for r, f in enumerate(flags) if int(f)]
    if failed:
        raise ValueError(f"rank(s) {', '.join(map(str, failed))} failed while {what} (see their error)")


def _run(args, out: TextIO = None, device: Optional[str] = None, expert_parallel=False, rank: Optional[int] = None
         ) -> int:
    import torch

    from grok_torch.config import GrokConfig
    from grok_torch.decode import require_capturable
    from grok_torch.generate import check_tokenizer, stream
    from grok_torch.loading import check_model_dir
    from grok_torch.model import Grok
    from grok_torch.sampling import SampleSettings

    out = out or sys.stdout
    talk = rank in (None, 0)  # notes on stderr: once per job
    failure = None
    try:
        # missing, empty or never converted: one line before anything else is looked at
        config = GrokConfig.from_json(check_model_dir(args.model) / "config.json")
        SampleSettings(args.temperature, args.top_p, args.top_k)  # bad settings fail before the model loads
        if args.prefill_chunk < 0:
            raise ValueError(f"--prefill-chunk must be >= 0 (0 = the whole prompt at once), got {args.prefill_chunk}")
        tokenizer = _tokenizer(args, config)
        if args.prompt is not None:
            check_tokenizer(tokenizer, config, hint="pass the model's own --tokenizer, or --prompt-ids")
        prompt = tokenizer.encode(args.prompt) if args.prompt is not None else args.prompt_ids
        _check_prompt(prompt, config, args.prompt is not None)   # before the model loads (minutes on Grok-1)
        max_new_tokens = _max_new_tokens(args.max_new_tokens, len(prompt), config, talk)
        dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
        if expert_parallel:
            model = Grok.from_pretrained(args.model, dtype=dtype, device=device, impl=args.impl,
                                         expert_parallel=expert_parallel, adapter=args.adapter)
        elif args.device_map is not None:
            if args.device is not None:
                raise ValueError("pass --device (one device) or --device-map (several GPUs), not both")
            model = Grok.from_pretrained(args.model, dtype=dtype, device_map=args.device_map, impl=args.impl, adapter=args.adapter)
        else:
            model = Grok.from_pretrained(args.model, dtype=dtype, device=args.device or "cpu", impl=args.impl, adapter=args.adapter)
        model.attn_precision = args.attn_precision
        if args.cuda_graph == "on":
            require_capturable(model, "--cuda-graph on", " (use --cuda-graph auto or off)")
    except (ValueError, TypeError, OSError, RuntimeError) as e:  # RuntimeError: e.g. out of memory
        if rank is None:
            raise
        failure = e  # under torchrun: told to the other ranks first, then raised
    if rank is not None:
        _agree(failure, "loading", rank)
    if talk and model.config.name == "demo":
        print(f"grok-generate: {args.model} is the demo model: its weights are random, so its output is random text",
              file=sys.stderr)
    # with a tokenizer, stream yields each step's text (held-back bytes of a character included at the end)
    steps = stream(model, [prompt], max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                   top_k=args.top_k, seed=args.seed, stop_at_eos=not args.no_stop, tokenizer=tokenizer,
                   prefill_chunk=args.prefill_chunk or None,
                   cuda_graph={"auto": None, "on": True, "off": False}[args.cuda_graph])
    first = True
    for step in steps:
        t = step[0]
        if t is None:
            break
        out.write(t if tokenizer is not None else ("" if first else ",") + str(t))
        first = False
        out.flush()
    out.write("\n")
    return 0


def _check_prompt(prompt: List[int], config, text: bool) -> None:
    flag = "--prompt" if text else "--prompt-ids"
    if not prompt:
        raise ValueError(f"{flag} is empty: give at least one token")
    bad = [t for t in prompt if not 0 <= t < config.vocab_size]
    if bad:
        raise ValueError(f"{flag}: token id {bad[0]} is out of range [0, {config.vocab_size}) of this model's vocabulary")


def _tokenizer(args, config):
    """The tokenizer that decodes the output (and encodes --prompt); None: ids are printed.

    --tokenizer if given. Else, for --prompt: MODEL/tokenizer.model, else (a model of Grok-1's
    vocabulary) the Grok-1 tokenizer bundled with the package. --prompt-ids without --tokenizer:
    none, ids in and ids out."""
    from grok_torch.tokenizer import Tokenizer

    if args.tokenizer:
        return Tokenizer(args.tokenizer)
    if args.prompt is None:
        return None
    tokenizer = Tokenizer.for_model(args.model, config.vocab_size)
    if tokenizer is None:
        raise ValueError(f"--prompt needs a tokenizer; none at {os.path.join(args.model, 'tokenizer.model')} "
                         "(pass --tokenizer or use --prompt-ids)")
    return tokenizer


def _max_new_tokens(asked: Optional[int], prompt_len: int, config, talk: bool) -> int:
    """--max-new-tokens, checked against the context; the default is cut to what fits, with a note."""
    from grok_torch.generate import new_token_room

    context, room = config.max_seq_len, new_token_room(config, prompt_len)
    if prompt_len > context:
        raise ValueError(f"the prompt is {prompt_len} tokens, more than the model's context of {context}: "
                         "shorten --prompt / --prompt-ids")
    if asked is None:
        if room < DEFAULT_NEW_TOKENS and talk:
            print(f"grok-generate: warning: generating at most {room} tokens, not {DEFAULT_NEW_TOKENS}: the model's "
                  f"context is {context} and the prompt {prompt_len} tokens", file=sys.stderr)
        return min(DEFAULT_NEW_TOKENS, room)
    if asked < 1:
        raise ValueError(f"--max-new-tokens must be >= 1, got {asked}")
    if prompt_len and asked > room:
        raise ValueError(f"--max-new-tokens {asked} does not fit: the prompt is {prompt_len} tokens and the model's "
                         f"context {context}, which leaves room for {room} (pass --max-new-tokens {room} or fewer)")
    return asked


if __name__ == "__main__":
    sys.exit(main())
