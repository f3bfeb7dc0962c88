"""grok_torch: xAI's Grok-1 in PyTorch.

    from grok_torch import Grok, Tokenizer, generate
    model = Grok.from_pretrained("grok-1-int8", device_map="experts")   # every visible GPU
    tok = Tokenizer("grok-1-int8/tokenizer.model")
    print(generate(model, ["The answer to life"], 20, tokenizer=tok)[0].text)

Exports are resolved lazily so that ``import grok_torch.config`` (the converter, CLIs' --help)
does not pay for importing torch.
"""
import importlib

from grok_torch.config import CONFIGS, GrokConfig

_LAZY = {
    "Grok": "model", "KVCache": "model",
    "Tokenizer": "tokenizer",
    "generate": "generate", "stream": "generate", "Generation": "generate",
    "SampleSettings": "sampling", "sample": "sampling", "top_p_filter": "sampling",
}
__all__ = ["CONFIGS", "GrokConfig", *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        value = getattr(importlib.import_module(f"grok_torch.{_LAZY[name]}"), name)
        # importing grok_torch.generate binds the *module* to the name `generate`; the function wins
        globals()[name] = value
        return value
    raise AttributeError(f"module 'grok_torch' has no attribute {name!r}")
