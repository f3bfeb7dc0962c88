"""One rank of grok-finetune under expert parallelism (tests/test_finetune_distributed.py starts one process a rank).

    RANK=r WORLD_SIZE=n MASTER_ADDR=127.0.0.1 MASTER_PORT=p SETTINGS='{...}' python tests/finetune_dist_worker.py DUMP

``finetune(TrainConfig(**SETTINGS))`` as torchrun would run it (finetune initialises the gloo group
itself, from the environment); then this rank's replicated adapters (attention, router: every LoRA
parameter outside the expert shards) go to DUMP/rank{r}.pt, so the test can check they are the same
bits on every rank. Any error: one line "rank R: <type>: <message>" on stderr, exit 1.
"""
import json
import os
import sys

import torch

from grok_torch.finetune import train as train_mod


def main() -> int:
    dump, rank = sys.argv[1], int(os.environ["RANK"])
    torch.set_num_threads(1)
    seen = {}
    real = train_mod._trainable

    def trainable(model, cfg):
        seen["model"] = model
        if os.environ.get("EXCHANGE"):  # the exchange of the MoE blocks (default all_to_all)
            from grok_torch.parallel.distributed import set_exchange

            set_exchange(model, os.environ["EXCHANGE"])
        return real(model, cfg)

    train_mod._trainable = trainable
    try:
        res = train_mod.finetune(train_mod.TrainConfig(**json.loads(os.environ["SETTINGS"])))
        model = seen["model"]
        torch.save({"replicated": {n: p.detach().clone() for n, p in model.named_parameters()
                                   if p.requires_grad and ".moe.shards." not in n},
                    "experts": {n: tuple(p.shape) for n, p in model.named_parameters()
                                if p.requires_grad and ".moe.shards." in n},
                    "result": {k: v for k, v in res.items() if k in ("steps", "final_loss")}},
                   os.path.join(dump, f"rank{rank}.pt"))
    except Exception as e:
        print(f"rank {rank}: {type(e).__name__}: {' '.join(str(e).split())}", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
