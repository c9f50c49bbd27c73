"""The ``bsf-nnunet`` command.

Each sub-command lives in its own module of this package and exposes ``register(subparsers)``, which adds its
parser(s) and sets ``func`` (called with the parsed ``argparse.Namespace``; returns an exit code or None).
"""
