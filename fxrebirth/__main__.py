"""``python -m fxrebirth`` is the ``fxrebirth`` command."""

import sys

from .cli import main

sys.exit(main())
