"""``python -m empssl ...``: the ``empssl`` command (what ``torchrun -m empssl`` runs)."""

import sys

from .cli import main

sys.exit(main())
