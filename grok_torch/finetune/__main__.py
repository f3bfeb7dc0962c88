"""``python -m grok_torch.finetune``: the same as ``grok-finetune``."""
import sys

from grok_torch.finetune.cli import main

sys.exit(main())
