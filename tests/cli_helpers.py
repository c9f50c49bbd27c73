"""Shared by the CLI tests of every folder (tests/ is on sys.path through its conftest.py)."""
import argparse

from bsf_nnunet.cli.main import run_command


def run_subcommand(module, *argv) -> int:
    """``bsf-nnunet`` with only ``module``'s subcommand registered, run in this process with bsf-nnunet's error
    handling (the exit code; output goes to capsys)."""
    p = argparse.ArgumentParser(prog="bsf-nnunet")
    module.register(p.add_subparsers(dest="command"))
    return run_command(p.parse_args([str(a) for a in argv]))
