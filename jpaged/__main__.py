"""`python -m jpaged`: the command line (`jpaged/cli.py`)."""

import sys

from jpaged.cli import main

if __name__ == "__main__":
    sys.exit(main())
