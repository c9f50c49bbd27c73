"""Entry point of the ``bsf-nnunet`` command."""
from __future__ import annotations

import argparse
import importlib
import sys

from ..errors import BSFError, format_error

# sub-command modules, each with register(subparsers); a command with steps stores the step in args.step
COMMANDS = ["plan", "convert", "evaluate", "lowdata", "import-model", "export", "demo", "info", "check", "weights",
            "cv", "pretrain-job"]
# errors shown as "bsf-nnunet CMD [STEP]: error: ..." instead of a traceback: ours, and bad input found by the
# libraries (a DiskFullError is a BSFError)
USER_ERRORS = (BSFError, ValueError, FileNotFoundError, NotADirectoryError, PermissionError)


class CLIError(BSFError):
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


def _report_error(args, error: Exception) -> int:
    """Print ``error`` as ``bsf-nnunet CMD [STEP]: error: MESSAGE`` (on one line, then its hint) to stderr; return
    the exit code (the error's ``exit_code``, 2 for bad input)."""
    label = " ".join(filter(None, ("bsf-nnunet", args.command, getattr(args, "step", None))))
    message, hint = (error.message, error.hint) if isinstance(error, BSFError) else (str(error), None)
    print(f"{label}: error: {format_error(' '.join(message.split()), hint)}", file=sys.stderr)
    return getattr(error, "exit_code", 2)


def run_command(args) -> int:
    """Run the parsed command ``args.func(args)``; the one place where user errors become a message and exit code."""
    try:
        rc = args.func(args)
    except USER_ERRORS as e:
        return _report_error(args, e)
    return int(rc or 0)


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return run_command(args)


if __name__ == "__main__":
    sys.exit(main())
