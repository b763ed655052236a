"""`python -m raysft ...` (so `ray job submit -- python -m raysft train cfg.yaml` works)."""

import sys

from raysft.cli import main

sys.exit(main())
