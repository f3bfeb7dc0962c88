"""grok_torch: xAI's Grok-1 in PyTorch.

    from grok_torch import Grok, GrokConfig
"""
from grok_torch.config import CONFIGS, GrokConfig

__all__ = ["CONFIGS", "GrokConfig"]
