"""``python -m tdx_rules`` runs the ``tdx-rules`` command line."""

import sys

from .cli import main

sys.exit(main())
