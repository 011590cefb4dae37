"""`python -m kerasft ...` is the `kerasft` command (`torchrun -m kerasft fit ...` runs it)."""

import sys

from kerasft.cli.entry import main

if __name__ == "__main__":
    sys.exit(main())
