"""``python -m kumazone``: the same as the ``kumazone`` command."""

import sys

from kumazone.cli import main

sys.exit(main())
