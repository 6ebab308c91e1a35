"""``python -m empssl.cli ...``: the ``empssl`` command, as ``python -m empssl``."""

import sys

from .main import main

sys.exit(main())
