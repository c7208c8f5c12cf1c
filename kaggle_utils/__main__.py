"""``python -m kaggle_utils``: see :mod:`kaggle_utils.cli`."""

import sys

from .cli import main

sys.exit(main())
