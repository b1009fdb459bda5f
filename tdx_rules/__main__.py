"""``python -m tdx_rules`` runs the ``tdx-rules`` command line."""

import sys

from .cli.main import main

sys.exit(main())
