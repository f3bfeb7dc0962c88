"""grok_torch.convert: the official Grok-1 checkpoint to safetensors, JAX-free and streaming.

    from grok_torch.convert import convert_checkpoint, verify_conversion
    convert_checkpoint("/data/grok-1/checkpoints", "/data/grok-1-int8", dtype="int8")

The tensor naming and layout table is in ``grok_torch.convert.weight_map``.
"""
from grok_torch.convert.convert import ConvertError, ConvertResult, convert_checkpoint, verify_conversion
from grok_torch.convert.grok_pickle import CheckpointError, UnsafePickleError, read_tensor_file

__all__ = ["CheckpointError", "ConvertError", "ConvertResult", "UnsafePickleError", "convert_checkpoint",
           "read_tensor_file", "verify_conversion"]
