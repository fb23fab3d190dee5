"""``python -m uniseg_cli`` runs the ``uniseg`` command."""

import sys

from uniseg_cli.cli import main

sys.exit(main())
