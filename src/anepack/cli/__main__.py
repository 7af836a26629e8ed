"""Entry point for ``python -m anepack.cli``."""

from anepack.cli import main

main()
