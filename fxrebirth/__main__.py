"""``python -m fxrebirth`` is the ``fxrebirth`` command."""

import sys

from fxrebirth.cli import main

sys.exit(main())
