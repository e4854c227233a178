"""What every stage entry point shares: one-line user errors and a non-zero exit, like `kip`."""
from __future__ import annotations

import argparse
import sys
from typing import Callable

from pipeline.errors import UserError


def run_stage(name: str, main: Callable[[argparse.Namespace], None], parser: argparse.ArgumentParser) -> None:
    args = parser.parse_args()
    try:
        main(args)
    except UserError as err:
        print(f"stage {name}: error: {err}", file=sys.stderr)
        sys.exit(2)
