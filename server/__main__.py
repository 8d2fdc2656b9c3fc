"""``python -m nextbest``: the same as the ``nextbest`` command."""

import sys

from nextbest.cli.main import main

if __name__ == "__main__":
    sys.exit(main())
