"""The job registry ``$nnUNet_results/DatasetXXX/jobs.json``: which job trains which (trainer, fold).

Keys are the training's output folder relative to the dataset's results folder
(``BSFTrainer__nnUNetPlans__3d_fullres/fold_5``); values name the executor, the job id, submitit's folder and log.
Written atomically under an flock, so two ``run`` processes never submit the same fold twice.

Every submission of ``lowdata run``, ``cv run`` and ``pretrain-job`` goes through ``Registry.submit`` (inside
``Registry.locked()``, after ``Registry.blocking_entry`` said no job of the training is queued or running).
"""
from __future__ import annotations

import contextlib
import os
import time
from typing import Dict, Iterator, Optional, Tuple

from ..io import atomic_write_json
from ..lowdata.common import read_json, results_dir
from .executors import ACTIVE, job_states, submit

REGISTRY_FILE = "jobs.json"
FORMAT_VERSION = 1


def blocks_submission(state: Optional[str]) -> bool:
    """A recorded job in this state keeps its training from being submitted again: it is queued or running, or
    SLURM no longer says (``unknown``: the user checks with sacct and deletes the entry)."""
    return state in ACTIVE or state == "unknown"


def job_key(dataset_name: str, output_folder: str) -> str:
    """'<trainer>__<plans>__<configuration>/fold_<F>' of a training's output folder."""
    return os.path.relpath(output_folder, results_dir(dataset_name)).replace(os.sep, "/")


class Registry:
    def __init__(self, dataset_name: str):
        self.path = os.path.join(results_dir(dataset_name), REGISTRY_FILE)

    def load(self) -> Dict[str, dict]:
        if not os.path.isfile(self.path):
            return {}
        data = read_json(self.path, "job registry")
        jobs = data.get("jobs") if isinstance(data, dict) else None
        if not isinstance(jobs, dict):
            raise ValueError(f"{self.path} is not a job registry written by bsf-nnunet (no 'jobs' mapping). Move it "
                             f"away; `status` then shows the results folders only.")
        return jobs

    def record(self, key: str, entry: dict) -> None:
        """Set the entry of ``key`` (the other entries are kept); call it inside ``locked()``."""
        jobs = self.load()
        jobs[key] = dict(entry, recorded=time.strftime("%Y-%m-%dT%H:%M:%S"))
        atomic_write_json(self.path, {"format_version": FORMAT_VERSION, "jobs": jobs}, sort_keys=True)

    def entry_and_state(self, key: str) -> Tuple[Optional[dict], Optional[str]]:
        """The recorded entry of ``key`` and its job's state (None, None when nothing is recorded); inside
        ``locked()``."""
        entry = self.load().get(key)
        return (entry, job_states({key: entry})[key]) if entry is not None else (None, None)

    def submit(self, key: str, executor_kind: str, executor, fn, what: str, **fields):
        """Submit ``fn`` (the job's callable) with ``executor`` and record its job under ``key`` (executor, job id,
        submitit's folder and log, plus ``fields``); inside ``locked()``. Returns submitit's job."""
        sjob = submit(executor, fn, what)
        self.record(key, {"executor": executor_kind, "job_id": str(sjob.job_id), "folder": str(sjob.paths.folder),
                          "log": str(sjob.paths.stdout), **fields})
        return sjob

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Exclusive flock on jobs.json.lock (blocking: submissions of two processes take turns)."""
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        with open(self.path + ".lock", "a") as fh:
            try:
                import fcntl
            except ImportError:  # not POSIX: no cross-process protection
                yield
                return
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)
