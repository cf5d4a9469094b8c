"""``python -m sd35.cli`` is ``sd35``."""

import sys

from sd35.cli import main

sys.exit(main())
