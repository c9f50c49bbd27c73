"""The report of the dataset checks (:class:`CheckReport`) and the runner that checks cases in worker processes
(:func:`run_cases`), shared by :mod:`.check_raw`, :mod:`.check_predict` and :mod:`.check_preprocessed`."""
from __future__ import annotations

import textwrap
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

from .convert_report import printable
from .parallel import Indexed, pool_imap

MAX_EXAMPLES = 5


@dataclass
class CheckReport:
    """Result of :func:`check_raw_dataset`."""

    folder: str
    errors: List[str] = field(default_factory=list)
    warnings: List[str] = field(default_factory=list)
    num_training: int = 0
    num_test: int = 0
    values_checked: bool = True
    prediction_input: bool = False
    preprocessed: Optional[str] = None  # the configuration of a check of preprocessed data
    fix: Optional[str] = None  # one paragraph for all errors (preprocessed data: how to remake it)

    @property
    def ok(self) -> bool:
        return not self.errors

    def format(self, width: int = 110) -> str:
        def para(prefix: str, text: str) -> str:
            return textwrap.fill(" ".join(text.split()), width=width, initial_indent=prefix,
                                 subsequent_indent=" " * len(prefix), break_long_words=False,
                                 break_on_hyphens=False)

        counts = (f"{self.num_test} case(s) to predict" if self.prediction_input else
                  f"{self.num_training} preprocessed case(s) of {self.preprocessed}" if self.preprocessed else
                  f"{self.num_training} training case(s), {self.num_test} test case(s)")
        lines = [f"Checked {self.folder}: {counts}"
                 + ("" if self.values_checked else " (voxel values not read: --no-values)")]
        if self.errors:
            lines.append(f"\nERRORS ({len(self.errors)}):")
            lines += [para("- ", e) for e in self.errors]
        if self.errors and self.fix:
            lines.append("\n" + para("FIX: ", self.fix))
        if self.warnings:
            lines.append(f"\nWARNINGS ({len(self.warnings)}):")
            lines += [para("- ", w) for w in self.warnings]
        next_step = ("nnUNetv2_predict" if self.prediction_input else "nnUNetv2_train" if self.preprocessed else
                     "nnUNetv2_plan_and_preprocess")
        if self.ok:
            lines.append(f"\nOK: no errors ({len(self.warnings)} warning(s)). The dataset is ready for "
                         f"{next_step}.")
        else:
            lines.append(f"\nFAILED: {len(self.errors)} error(s), {len(self.warnings)} warning(s). Fix the errors "
                         f"before {next_step}.")
        return printable("\n".join(lines))


def examples(items: List[str]) -> str:
    more = f" and {len(items) - MAX_EXAMPLES} more" if len(items) > MAX_EXAMPLES else ""
    return ", ".join(items[:MAX_EXAMPLES]) + more


def run_cases(tasks: list, num_workers: int, report: CheckReport, check: Callable) -> list:
    """``check(task)`` for every task, in ``num_workers`` processes (``check`` and the tasks must pickle); a pool
    that fails is reported as a warning and the cases left are checked in this process."""
    if num_workers <= 1 or len(tasks) <= 1:
        return [check(t) for t in tasks]
    results: Dict[int, object] = {}
    try:  # all tasks submitted at once
        for i, r in pool_imap(Indexed(check), enumerate(tasks), min(num_workers, len(tasks)), len(tasks)):
            results[i] = r
    except Exception as e:  # BrokenProcessPool (a worker died), pickling, spawn failures
        left = [t for i, t in enumerate(tasks) if i not in results]
        why = "a worker process died (out of memory?)" if isinstance(e, BrokenProcessPool) else \
            f"the worker processes failed ({type(e).__name__}: {e})"
        report.warnings.append(f"{why} while checking; the "
                               f"{len(left)} case(s) left were checked in this process instead. Use -np 1 (or "
                               f"fewer workers) for big images.")
        for i, t in enumerate(tasks):
            if i not in results:
                results[i] = check(t)
    return [results[i] for i in range(len(tasks))]
