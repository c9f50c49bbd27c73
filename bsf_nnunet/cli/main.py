"""Entry point of the ``bsf-nnunet`` command."""
from __future__ import annotations

import argparse
import importlib
import sys

from ..io import DiskFullError

# sub-command modules, each with register(subparsers)
COMMANDS = ["plan", "convert", "evaluate", "lowdata", "import-model", "export", "demo", "info", "check", "weights",
            "cv", "pretrain-job"]


class CLIError(Exception):
    """An error whose message is meant for the user as is."""


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__

    parser = argparse.ArgumentParser(
        prog="bsf-nnunet",
        description="BrainSegFounder (Swin-UNETR foundation model for brain MRI) inside nnU-Net v2. Training and "
                    "prediction use the stock nnUNetv2_* commands with -tr BSFTrainer...; this tool adds planning, "
                    "dataset conversion, evaluation, pretrained-weight import and the low-data study.")
    parser.add_argument("--version", action="version", version=f"bsf-nnunet {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"{__package__}.{name.replace('-', '_')}").register(sub)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        rc = args.func(args)
    except (CLIError, ValueError, FileNotFoundError, PermissionError, DiskFullError) as e:
        print(f"bsf-nnunet {args.command}: error: {e}", file=sys.stderr)
        return 2
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
