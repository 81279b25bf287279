"""``python -m wanlite ...`` (as under ``torchrun -m wanlite generate ... --parallel cfg=2``)."""

import sys

from .cli import main

sys.exit(main())
