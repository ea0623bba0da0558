"""``python -m frugalseg`` = the ``frugalseg`` command (``torchrun -m frugalseg train ...`` for several processes)."""

from frugalseg.cli import main

main()
