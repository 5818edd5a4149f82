"""`python -m transferlab ...`, as torchrun starts it: `torchrun --nproc-per-node N -m transferlab train ...`."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
