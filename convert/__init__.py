"""grok_torch.convert: the official Grok-1 checkpoint to safetensors, JAX-free and streaming.

    from grok_torch.convert import convert_checkpoint, verify_conversion
    convert_checkpoint("/data/grok-1/checkpoints", "/data/grok-1-int8", dtype="int8")

The tensor naming and layout table is in ``grok_torch.convert.weight_map``; the allow-listed
pickle reader in ``grok_pickle``; a writer of official-format test checkpoints in ``synthetic``.
"""
import importlib

_EXPORTS = {
    "ConvertError": "convert", "ConvertResult": "convert", "convert_checkpoint": "convert",
    "verify_conversion": "verify",
    "CheckpointError": "grok_pickle", "UnsafePickleError": "grok_pickle", "read_tensor_file": "grok_pickle",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
    # lazy, so that `grok-convert --help` answers without importing torch
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"grok_torch.convert.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'grok_torch.convert' has no attribute {name!r}")
