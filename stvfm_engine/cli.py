"""The ``stvfm-engine`` command line: argparse sub-commands over the library's typed functions.

Each command group is one module of :mod:`stvfm_engine.commands` with ``register(subparsers)``; the
layers below expose typed functions and never parse arguments.
Results go to stdout; progress and logs to stderr. An expected failure (:class:`STVFMError`, or an
:class:`OSError` such as an unwritable output path) is one line on stderr and exit code 2; ``--debug``
shows the traceback instead.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from typing import Optional, Sequence

from stvfm_engine.errors import STVFMError
from stvfm_engine.version import __version__

COMMAND_MODULES = (
    "stvfm_engine.commands.model",  # init, train, eval, demo
    "stvfm_engine.commands.build",  # build, inspect, env
    "stvfm_engine.commands.run",  # run
    "stvfm_engine.commands.bench",  # bench
    "stvfm_engine.commands.serve",  # serve, export-triton
)

DESCRIPTION = """\
Build, verify, serve and profile ST-VFM forecasting engines.

Typical flow:
  stvfm-engine init --preset tiny -o tiny.pt          # random-weight checkpoint
  stvfm-engine train --init tiny.pt --data ../shared/data/nyc/NYBike_flow -o bike.pt
  stvfm-engine eval bike.pt --data ../shared/data/nyc/NYBike_flow
  stvfm-engine build bike.pt -o bike.engine           # parity-gated ONNX / AOTInductor artifacts
  stvfm-engine run bike.engine --input in.npz --output out.npz
  stvfm-engine bench bike.engine --batch 1,8
  stvfm-engine demo                                   # all of it on synthetic data, no downloads
"""


class OneLineErrorParser(argparse.ArgumentParser):
    """Usage errors are one line on stderr too (exit code 2), pointing at ``--help``."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrorParser(prog="stvfm-engine", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"stvfm-engine {__version__}")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks instead of one-line errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (STVFMError, OSError) as e:  # OSError: an unwritable/unreadable path, a full disk
        if args.debug:
            raise
        print(f"stvfm-engine {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"stvfm-engine {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
