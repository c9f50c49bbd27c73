"""The one process pool of the package: :func:`pool_imap` runs a function over a stream of items in spawned worker
processes. The converters and the evaluation use it through :func:`parallel_imap` (a dead worker stops the run with
one message; what finished is kept), ``bsf-nnunet check`` through :func:`~.check_report.run_cases` (a failing pool
is a warning, and the cases left are checked in this process)."""
from __future__ import annotations

import multiprocessing
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from typing import Callable, Iterable, Iterator, Optional

from .convert import ConversionError


def pool_imap(func: Callable, items: Iterable, num_workers: int, max_in_flight: int) -> Iterator:
    """Yield ``func(item)`` for each item, in completion order, computed in ``num_workers`` spawned processes with
    at most ``max_in_flight`` items submitted but not yet done (so an endless/huge item stream is consumed lazily).
    ``func`` and the items must pickle. An error of ``func`` or of the pool (:class:`BrokenProcessPool` when a worker
    died) is raised once the pool has shut down."""
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=num_workers, mp_context=ctx) as ex:
        pending = set()
        for it in items:
            pending.add(ex.submit(func, it))
            while len(pending) >= max_in_flight:
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                for f in done:
                    yield f.result()
        while pending:
            done, pending = wait(pending, return_when=FIRST_COMPLETED)
            for f in done:
                yield f.result()


def parallel_imap(func: Callable, items: Iterable, num_workers: int = 1, max_in_flight: Optional[int] = None,
                  ) -> Iterator:
    """Yield ``func(item)`` for each item, in completion order, with at most ``max_in_flight`` items submitted but
    not yet done (so an endless/huge item stream is consumed lazily). ``num_workers <= 1`` runs in this process."""
    if num_workers <= 1:
        for it in items:
            yield func(it)
        return
    try:
        yield from pool_imap(func, items, num_workers, max_in_flight or 4 * num_workers)
    except BrokenProcessPool:
        raise ConversionError("a worker process died (out of memory? or, when called from your own script, the "
                              "script lacks an 'if __name__ == \"__main__\":' guard). Everything finished so far "
                              "is kept: re-run the same command (with fewer workers, -j) to continue.") from None


class Indexed:
    """Picklable ``(i, item) -> (i, func(item))``, to put results that come in completion order back in order."""

    def __init__(self, func: Callable):
        self.func = func

    def __call__(self, job: tuple) -> tuple:
        i, item = job
        return i, self.func(item)
