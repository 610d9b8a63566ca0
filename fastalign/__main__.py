"""``python -m fastalign ...``: the same command line as the ``fastalign`` script."""

import sys

from fastalign.cli import main

if __name__ == "__main__":
    sys.exit(main())
