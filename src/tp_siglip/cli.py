"""The ``tp-siglip`` command: ``tp-siglip encode ...`` (the main job) and ``tp-siglip env`` (facts for a bug report).

Installed as a console script by ``pip install``; ``python -m tp_siglip`` runs the same. Under torchrun,
use ``torchrun --nproc-per-node N -m tp_siglip.encode ...`` (or ``torchrun ... --no-python tp-siglip encode``).

Choices made: one sub-command per job, each a thin layer over a library module (`tp_siglip.encode`,
`tp_siglip.env`); the sub-command's options are the module's own (``encode.add_arguments``), so
``tp-siglip encode`` and ``python -m tp_siglip.encode`` cannot drift apart. As a command-line program it
prints, through `tp_siglip.console` (whole lines, one write each); the modules it calls log.
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from tp_siglip import __version__
from tp_siglip.console import write_line

__all__ = ["build_parser", "main"]


def build_parser(prog: str = "tp-siglip") -> argparse.ArgumentParser:
    from tp_siglip import encode

    parser = argparse.ArgumentParser(prog=prog, description="Tensor-parallel SigLIP vision encoder: command-line tools.")
    parser.add_argument("--version", action="version", version=f"tp-siglip {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    encode_parser = commands.add_parser(
        "encode",
        help="encode images into a safetensors file (one process, or under torchrun)",
        description=encode.DESCRIPTION,
        epilog=encode.EPILOG,
        formatter_class=encode.HelpFormatter,
    )
    encode.add_arguments(encode_parser)
    encode_parser.set_defaults(handler=lambda args: encode.run(args))
    env_parser = commands.add_parser("env", help="print versions, hardware, caches and settings for a bug report")
    env_parser.set_defaults(handler=_print_env)
    return parser


def _print_env(args: argparse.Namespace) -> int:
    from tp_siglip.env import environment, format_environment

    write_line(format_environment(environment()), sys.stdout)
    return 0


def main(argv: Optional[Sequence[str]] = None, prog: str = "tp-siglip") -> int:
    """Run ``tp-siglip`` with ``argv`` (default: ``sys.argv[1:]``); returns the exit status."""
    args = build_parser(prog).parse_args(argv)
    return int(args.handler(args))


if __name__ == "__main__":
    sys.exit(main())
