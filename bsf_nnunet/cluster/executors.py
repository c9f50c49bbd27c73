"""submitit executors (SLURM, local processes), submission with dependencies, and the state of recorded jobs."""
from __future__ import annotations

import contextlib
import getpass
import io
import os
import subprocess
from typing import Dict, List, Optional, Sequence

from ..errors import BSFError
from .options import ClusterOptions, import_submitit, time_minutes

ACTIVE = ("queued", "running")
_LOCAL_DEFAULT_TIMEOUT_MIN = 365 * 24 * 60
_SLURM_SIGNAL_DELAY_S = 120  # submitit's USR2 this long before the time limit: the training gets 90 s to save

_SLURM_QUEUED = {"PENDING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "RESV_DEL_HOLD", "CONFIGURING", "SUSPENDED"}
_SLURM_RUNNING = {"RUNNING", "COMPLETING", "STAGE_OUT", "SIGNALING", "RESIZING"}


class SubmissionRefused(BSFError, ValueError):
    """sbatch (or the local executor) refused a job; the message is sbatch's own."""


def job_folder(opts: ClusterOptions, results: str, key: str) -> str:
    """submitit's folder for the jobs of one training, <jobs>/<trainer>__<plans>__<configuration>/fold_F: scripts,
    pickles and logs named by job id (<id>_0_log.out)."""
    return os.path.join(opts.job_folder or os.path.join(results, "jobs"), key)


def make_executor(opts: ClusterOptions, folder: str, name: str, gpus: Sequence[int] = (), after: Sequence[str] = (),
                  **slurm_params):
    """A submitit executor for one job: a local process that sees the GPUs ``gpus`` (ids), or a SLURM job with
    len(gpus) GPUs, the options, ``afterok`` on the job ids ``after`` and any further submitit ``slurm_params``."""
    submitit = import_submitit()
    if opts.executor == "local":
        ex = submitit.LocalExecutor(folder, max_num_timeout=opts.max_requeues)
        ex.update_parameters(timeout_min=time_minutes(opts.time) if opts.time else _LOCAL_DEFAULT_TIMEOUT_MIN,
                             gpus_per_node=len(gpus), visible_gpus=tuple(gpus), stderr_to_stdout=True,
                             setup=list(opts.setup))
        return ex
    try:
        ex = submitit.SlurmExecutor(folder, max_num_timeout=opts.max_requeues)
    except RuntimeError as e:
        raise ValueError("--executor slurm: no `srun` on PATH, so this is not a SLURM login node. Run the command "
                         "where you run sbatch, or use --executor local.") from e
    extra = dict(opts.sbatch)
    if after:
        extra["kill-on-invalid-dep"] = "yes"  # a dependency that failed cancels the job instead of leaving it
    params = dict(job_name=name, time=time_minutes(opts.time), partition=opts.partition, account=opts.account,
                  qos=opts.qos, cpus_per_task=opts.cpus_per_job, mem=f"{opts.mem_gb:g}GB" if opts.mem_gb else None,
                  gres=f"gpu:{len(gpus)}" if gpus else None,
                  dependency="afterok:" + ":".join(after) if after else None, setup=list(opts.setup) or None,
                  stderr_to_stdout=True, signal_delay_s=_SLURM_SIGNAL_DELAY_S, additional_parameters=extra or None)
    params.update(slurm_params)
    ex.update_parameters(**{k: v for k, v in params.items() if v is not None})
    return ex


def submit(executor, fn, what: str):
    """executor.submit(fn); sbatch's refusal as SubmissionRefused with sbatch's own message."""
    from submitit.core.utils import FailedJobError

    quiet = io.StringIO()
    try:
        with contextlib.redirect_stderr(quiet):  # submitit also prints sbatch's stderr; it is in our message
            return executor.submit(fn)
    except FailedJobError as e:
        msg = " ".join(str(e).split()) or quiet.getvalue().strip() or "no message"
        raise SubmissionRefused(f"sbatch refused the job for {what}: {msg}. Fix the option it names (--partition, "
                                f"--account, --sbatch ...) and run again.") from e


def job_states(entries: Dict[str, dict]) -> Dict[str, str]:
    """'queued' | 'running' | 'ended' | 'unknown' of each recorded job (SLURM: one sacct call, squeue when sacct has
    no answer; local: whether its process is alive)."""
    states = {k: _local_state(e) for k, e in entries.items() if e.get("executor") == "local"}
    slurm = {k: e for k, e in entries.items() if e.get("executor") == "slurm"}
    if slurm:
        states.update(_slurm_states(slurm))
    return states


def _slurm_states(entries: Dict[str, dict]) -> Dict[str, str]:
    submitit = import_submitit()
    jobs = {k: submitit.SlurmJob(folder=e["folder"], job_id=str(e["job_id"])) for k, e in entries.items()}
    watcher = submitit.SlurmJob.watcher
    with contextlib.redirect_stderr(io.StringIO()):
        watcher.update()  # one sacct call for all registered jobs
    states = {k: _slurm_state(watcher.get_state(j.job_id, mode="cache")) for k, j in jobs.items()}
    unknown = [k for k, s in states.items() if s == "unknown"]
    queue = _squeue() if unknown else None
    for k in unknown:
        if queue is not None:
            states[k] = _slurm_state(queue[jobs[k].job_id]) if jobs[k].job_id in queue else "ended"
    return states


def _slurm_state(raw: str) -> str:
    word = (raw or "UNKNOWN").split()[0].upper()  # e.g. "CANCELLED by 1234"
    if word in _SLURM_QUEUED:
        return "queued"
    if word in _SLURM_RUNNING:
        return "running"
    return "unknown" if word == "UNKNOWN" else "ended"


def _squeue() -> Optional[Dict[str, str]]:
    """{job id: state} of this user's queued and running jobs, or None if squeue does not answer."""
    try:
        p = subprocess.run(["squeue", "-h", "-u", getpass.getuser(), "-o", "%i %T"], capture_output=True, text=True,
                           timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if p.returncode != 0:
        return None
    return {parts[0]: parts[1] for parts in (line.split() for line in p.stdout.splitlines()) if len(parts) >= 2}


def _local_state(entry: dict) -> str:
    """A local job runs while its submitit controller process lives."""
    pid = int(entry["job_id"])
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return "ended"
    except PermissionError:
        return "running"
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return "running" if b"submitit" in f.read() else "ended"  # a zombie's cmdline is empty
    except OSError:
        return "running"


def log_tail(entry: dict, lines: int = 15) -> List[str]:
    """The last lines of a job's log up to the training's exit (submitit's own traceback after it is left out)."""
    from .command import END_MARK, STOP_MARK

    path = entry.get("log", "")
    if not path or not os.path.isfile(path):
        return [f"(no log at {path or 'an unrecorded path'})"]
    with open(path, encoding="utf-8", errors="replace") as f:
        text = [line.rstrip("\n") for line in f.readlines()]
    ends = [i for i, line in enumerate(text) if line.startswith(END_MARK)]
    if ends and ends[-1] + 1 < len(text) and text[ends[-1] + 1].startswith(STOP_MARK):
        ends[-1] += 1  # the job's own verdict: stopped, not failed
    return text[:ends[-1] + 1][-lines:] if ends else text[-lines:]
