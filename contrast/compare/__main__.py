"""``python -m contrast.compare --help``."""
from contrast.compare.cli import main
from contrast.runtime import run_cli

if __name__ == "__main__":
    run_cli(main)
