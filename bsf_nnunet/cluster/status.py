"""Per fold and trainer: done / running / queued / stopped / failed / interrupted / not started (/ unknown), from the
results folders and the states of the jobs in ``jobs.json``. A stopped job saved its state on a stop signal (the next
``run`` continues it); a failed one ended with an error."""
from __future__ import annotations

import json
from typing import Callable, List, Sequence

from ..lowdata.common import fmt_fraction
from .command import was_stopped
from .executors import job_states, log_tail
from .process import Job
from .registry import Registry, blocks_submission, job_key

STATUSES = ("done", "running", "queued", "stopped", "failed", "interrupted", "not started", "unknown")


def collect(jobs: Sequence[Job], dataset_name: str) -> List[dict]:
    """One row per job: fold, trainer, kind, fraction, repeat, status, job, log, folder."""
    entries = Registry(dataset_name).load()
    keys = [job_key(dataset_name, j.output_folder) for j in jobs]
    states = job_states({k: entries[k] for k in keys if k in entries})
    rows = []
    for job, key in zip(jobs, keys, strict=True):
        entry, state = entries.get(key), states.get(key)
        rows.append({"fold": job.fold, "trainer": job.trainer, "kind": job.kind, "fraction": job.fraction,
                     "repeat": job.repeat, "status": _status(job.status, entry, state),
                     "job": f"{entry['executor']} {entry['job_id']}" if entry else None,
                     "log": entry.get("log") if entry else None, "folder": job.output_folder})
    return rows


def _status(folder_status: str, entry, state) -> str:
    if folder_status == "done":
        return "done"
    if blocks_submission(state):
        return state
    if entry is not None:  # its job ended, the training did not finish: stopped (a signal, saved) or failed
        return "stopped" if was_stopped(log_tail(entry)) else "failed"
    return "interrupted" if folder_status in ("resume", "validate") else "not started"


def table(rows: Sequence[dict]) -> str:
    """A plain-text table (fraction and repeat only for low-data folds)."""
    lowdata = any(r["fraction"] is not None for r in rows)
    head = ["fold"] + (["fraction", "repeat"] if lowdata else []) + ["trainer", "status", "job"]
    body = [_cells(r, lowdata) for r in rows]
    widths = [max(len(x) for x in col) for col in zip(head, *body, strict=True)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip() for line in [head] + body]
    counts = {s: sum(r["status"] == s for r in rows) for s in STATUSES}
    lines.append(", ".join(f"{n} {s}" for s, n in counts.items() if n))
    return "\n".join(lines)


def _cells(r: dict, lowdata: bool) -> List[str]:
    cells = ["-" if r["fold"] is None else str(r["fold"])]
    if lowdata:
        cells += ["", ""] if r["fraction"] is None else [fmt_fraction(r["fraction"]), str(r["repeat"])]
    what = r["trainer"] + (" (stage 2)" if r["kind"] == "pretrain" else "")
    return cells + [what, r["status"], r["job"] or "-"]


def show(rows: Sequence[dict], as_json: bool, out: Callable[[str], None] = print, tail: int = 10) -> None:
    """Print the table and, for each failed training, the end of its job's log (or JSON for scripts)."""
    if as_json:
        out(json.dumps(rows, indent=2))
        return
    out(table(rows))
    for r in rows:
        if r["status"] == "failed":
            lines = "\n".join("    " + x for x in log_tail({"log": r["log"]}, tail))
            out(f"\nfold {r['fold']} {r['trainer']}: job {r['job']} failed; the end of {r['log']}:\n{lines}")
