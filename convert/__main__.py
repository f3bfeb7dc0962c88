"""``python -m grok_torch.convert``: same as ``grok-convert``."""
import sys

from grok_torch.convert.cli import main

sys.exit(main())
