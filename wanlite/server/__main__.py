"""``python -m wanlite.server [serve] --model M ...``: the same as ``wanlite serve``."""

import sys

from .cli import main

sys.exit(main())
