"""The base of bsf-nnunet's errors (a leaf: it imports nothing else of the package). The ``BSF_*`` environment
variables are read by ``settings.py``; their unusable values are configuration errors.

Every error that reaches the user derives from :class:`BSFError` and keeps its built-in base for code that catches
that (``class ConfigurationError(BSFError, ValueError)``, ``class DiskFullError(BSFError, OSError)``). The message
names the file or case; most messages already say what to do, the others pass ``hint=``. ``bsf-nnunet`` prints
any of them as ``bsf-nnunet CMD: error: MESSAGE`` and exits with the error's :attr:`~BSFError.exit_code`.

Three exceptions stay outside on purpose, being control flow that never reaches the user: ``CaseError``
(``bsf_nnunet.evaluation.common``) and ``CaseProblem`` (``bsf_nnunet.datasets.convert``) mark one bad case; they
are caught where they are raised and the case is reported in the summary while the other cases go on.
``StopRequested`` (``bsf_nnunet.training.preemption``) ends a training on a stop signal as SystemExit(0).
"""
from __future__ import annotations

from typing import Optional


class BSFError(Exception):
    """An error meant for the user: ``str()`` is the message, then ``hint`` (what to do) on its own line."""

    exit_code = 2  # what ``bsf-nnunet`` exits with

    def __init__(self, *args, hint: Optional[str] = None):
        super().__init__(*args)
        self.hint = hint

    @property
    def message(self) -> str:
        """The message without the hint."""
        return super().__str__()

    def __str__(self) -> str:
        return format_error(self.message, self.hint)


class ConfigurationError(BSFError, ValueError):
    """A configuration (plans, variant, environment switch) that cannot be used; the message says what to do."""


ON_VALUES = ("1", "on", "true", "yes")
OFF_VALUES = ("0", "off", "false", "no")


def format_error(message: str, hint: Optional[str] = None) -> str:
    """``message``, then ``hint`` on its own line: how bsf-nnunet shows an error."""
    return message + (f"\n  what to do: {hint}" if hint else "")
