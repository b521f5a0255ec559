"""C{python -m kumazone}: the same as the C{kumazone} command."""

import sys

from kumazone.cli import main

sys.exit(main())
