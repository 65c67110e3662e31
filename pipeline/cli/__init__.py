"""genbench command line: prepare | fit | benchmark | leaderboard | run | submit | generate | serve | train-auditor |
fetch-weights. ``parser`` defines the options, ``commands`` what each command does."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Optional

from pipeline.cli import commands
from pipeline.cli.parser import COMMANDS, INCEPTION_FILE, build_parser
from pipeline.console import configure

__all__ = ["COMMANDS", "INCEPTION_FILE", "main"]


def main(argv: Optional[list[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    configure(verbose_flag="--verbose" in argv)
    argv = [a for a in argv if a != "--verbose"]
    if argv[:1] == ["fit"]:
        return commands.cmd_fit(argv[1:])
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    if extra and args.command != "run":
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return commands.COMMAND_FUNCS[args.command](args, extra)
    except (FileNotFoundError, FileExistsError, ValueError, RuntimeError, argparse.ArgumentError) as e:
        return commands.fail(e)
    except KeyboardInterrupt:  # Ctrl-C: every write is atomic, so one line says it, not a traceback
        print(f"genbench {args.command}: interrupted", file=sys.stderr)
        return 130
