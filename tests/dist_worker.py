"""One rank of the expert-parallel tests (tests/test_distributed.py starts one process per rank).

    RANK=r WORLD_SIZE=n MASTER_ADDR=127.0.0.1 MASTER_PORT=p python tests/dist_worker.py MODE OUT MODEL [MODEL_RANK1]

MODE "parity": every split the world size allows, fp32 and bf16: logits of the fixture tokens, a
greedy and a sampled generation, both exchanges of the "experts" split, the bytes this rank holds;
saved to OUT/rank{r}.pt. MODE "load": loading alone (a world size that cannot be used, a rank whose
checkpoint is unreadable: MODEL_RANK1 is rank 1's copy), then one forward. Any error: one line
"rank R: <type>: <message>" on stderr and exit 1, as an application would end.
"""
import datetime
import os
import sys
import time

import numpy as np
import torch
import torch.distributed as dist

from grok_torch import Grok, generate
from grok_torch.parallel.distributed import rank_bytes, set_exchange

PROMPTS = [[25, 376, 378], [7, 8]]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def parity(out_dir: str, model_dir: str, rank: int, world: int) -> None:
    tok = torch.from_numpy(np.load(os.environ["TOKENS"])).long()
    res = {}
    for split in ("experts", "ffn"):
        for name, dtype in DTYPES.items():
            m = Grok.from_pretrained(model_dir, dtype=dtype, impl="torch", expert_parallel=split)
            key = f"{split}/{name}"
            with torch.no_grad():
                res[key + "/logits"] = m(tok)
            res[key + "/greedy"] = [g.tokens for g in generate(m, PROMPTS, 6, temperature=0)]
            res[key + "/sampled"] = [g.tokens for g in generate(m, PROMPTS, 6, temperature=0.8, seed=3)]
            res[key + "/bytes"] = rank_bytes(m)
            res[key + "/shapes"] = {n: tuple(p.shape) for n, p in m.named_parameters() if ".moe.shards." in n}
            res[key + "/devices"] = {str(p.device) for p in m.parameters()}
            if split == "experts" and name == "fp32":
                set_exchange(m, "all_reduce")
                with torch.no_grad():
                    res[key + "/logits_all_reduce"] = m(tok)
                set_exchange(m, "all_reduce", deterministic=False)
                with torch.no_grad():
                    res[key + "/logits_all_reduce_nccl_style"] = m(tok)
    torch.save(res, os.path.join(out_dir, f"rank{rank}.pt"))


def load(out_dir: str, model_dir: str, rank: int, world: int) -> None:
    t0 = time.time()
    m = Grok.from_pretrained(model_dir, dtype=torch.float32, impl="torch", expert_parallel="experts")
    with torch.no_grad():
        m(torch.tensor([[25, 376, 378]]))
    print(f"rank {rank}: forward done in {time.time() - t0:.1f}s", file=sys.stderr)


def main() -> int:
    mode, out_dir, model_dir = sys.argv[1:4]
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if rank == 1 and len(sys.argv) > 4:
        model_dir = sys.argv[4]
    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=float(os.environ.get("DIST_TIMEOUT", 60))))
        {"parity": parity, "load": load}[mode](out_dir, model_dir, rank, world)
    except Exception as e:  # what an application does: report, end non-zero (the process exit closes its sockets)
        print(f"rank {rank}: {type(e).__name__}: {' '.join(str(e).split())}", file=sys.stderr, flush=True)
        if os.environ.get("HANG_ON_ERROR"):  # a rank that neither works nor exits: its peers time out
            time.sleep(600)
        return 1
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
