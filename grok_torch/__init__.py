"""grok_torch: xAI's Grok-1 in PyTorch.

    # the demo model (random weights, so random text): python -m grok_torch.convert.synthetic
    # /tmp/grok-tiny-src --overwrite && grok-convert /tmp/grok-tiny-src /tmp/grok-tiny --overwrite
    from grok_torch import Grok, Tokenizer, generate
    model = Grok.from_pretrained("/tmp/grok-tiny")   # the real one: device_map="experts" over every GPU
    tok = Tokenizer.from_pretrained("/tmp/grok-tiny")
    print(generate(model, ["The answer to life"], 20, tokenizer=tok)[0].text)

    # the same in transformers' spelling: a [batch, prompt + new] LongTensor of ids
    inputs = tok(["The answer to life"], return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=20)
    print(tok.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)[0])

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
        module = importlib.import_module(f"grok_torch.{_LAZY[name]}")
        # `generate` is the submodule itself, callable as its generate() function (see
        # grok_torch.generate._CallableModule): importing the submodule binds it here under that name
        value = module if name == "generate" else getattr(module, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'grok_torch' has no attribute {name!r}")
