"""`python -m batchd.emulator --port 8765 ...`: the same as `batchd emulator`."""

from __future__ import annotations

import argparse
import sys

from .cli import add_arguments, run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m batchd.emulator", description="Emulator of the Anthropic Message Batches API."
    )
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
