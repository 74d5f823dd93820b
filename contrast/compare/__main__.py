"""``python -m contrast.compare --help``."""
import sys

from contrast.compare.cli import main
from contrast.runtime import run_cli

if __name__ == "__main__":
    sys.argv[0] = "contrast.compare"   # the name in one-line errors
    run_cli(main)
