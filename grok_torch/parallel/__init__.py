"""Placement of Grok over several devices, applied from outside the single-device model.

    sharded_moe.py   ShardSpec / shard_specs (the "experts" and "ffn" splits), ExpertShard, ShardedMoE
    placement.py     device maps in one process: our splits, accelerate's planners, accelerate's hooks
    distributed.py   expert parallelism across processes / nodes on torch.distributed
"""
from grok_torch.parallel.placement import Placement, device_bytes, plan_placement
from grok_torch.parallel.sharded_moe import SPLITS, ExpertShard, ShardedMoE, ShardSpec, shard_specs

__all__ = ["SPLITS", "ShardSpec", "shard_specs", "ExpertShard", "ShardedMoE", "Placement", "plan_placement",
           "device_bytes"]
