"""``python -m flareseg.evaluate``: the flare-eval command."""

import sys

from flareseg.evaluate.cli import main

sys.exit(main())
