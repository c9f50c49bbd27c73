"""Run the planned trainings of a study as submitit jobs.

SLURM: every unfinished training is submitted at once; a fine-tuning that starts from its fold's stage-2
pretraining waits for that job (``afterok``). Local: at most ``--max-parallel`` jobs run at once on this machine,
each on its own GPUs, and ``run`` waits for them. Either way a training with a job that is still queued or running
(``jobs.json``) is never submitted again, and one whose job ended without finishing it is reported with the end of
its log and submitted again (it continues from its last checkpoint).
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

from ..lowdata.common import results_dir
from .command import TrainCommand, was_stopped
from .executors import job_folder, job_states, log_tail, make_executor
from .options import ClusterOptions
from .process import Job, StopSignals, TrainingFailed, describe, job_status
from .registry import Registry, blocks_submission, job_key

Out = Callable[[str], None]


@dataclass
class Outcome:
    ids: Dict[str, str] = field(default_factory=dict)  # key -> id of its queued, running or new job
    submitted: List[str] = field(default_factory=list)
    failed: List[str] = field(default_factory=list)  # local: failed in this run
    stopped: List[str] = field(default_factory=list)  # local: stopped by a signal in this run (saved; run continues)
    skipped: List[str] = field(default_factory=list)
    done: int = 0


def launch(jobs: Sequence[Job], dry_run: bool, *, opts: ClusterOptions, dataset_name: str, device: str,
           out: Out = print, poll_s: float = 2.0) -> Outcome:
    """Submit (slurm) or run (local) ``jobs``; raises TrainingFailed when a local job failed."""
    if opts.executor == "slurm":
        outcome = _submit_all(jobs, opts, dataset_name, device, out, dry_run)
    else:
        outcome = _run_local(jobs, opts, dataset_name, device, out, dry_run, poll_s)
    _summary(jobs, outcome, opts, dry_run, out)
    if outcome.failed:
        raise TrainingFailed(f"{len(outcome.failed)} training(s) failed: {', '.join(outcome.failed)} (the end of each "
                             f"log is above). Fix the cause and run the same command again: finished trainings are "
                             f"skipped, the others continue from their last checkpoint.")
    return outcome


def _summary(jobs: Sequence[Job], outcome: Outcome, opts: ClusterOptions, dry_run: bool, out: Out) -> None:
    verb = "would submit" if dry_run else ("submitted" if opts.executor == "slurm" else "ran")
    active = len(outcome.ids) - len(outcome.submitted)
    out(f"{len(jobs)} trainings: {outcome.done} already done, {verb} {len(outcome.submitted)}"
        + (f", {active} already queued or running" if active > 0 else "")
        + (f", {len(outcome.skipped)} skipped" if outcome.skipped else "")
        + (f", {len(outcome.stopped)} stopped (saved; run again to continue them)" if outcome.stopped else "")
        + (f", {len(outcome.failed)} failed" if outcome.failed else ""))
    if opts.executor == "slurm" and outcome.submitted and not dry_run:
        out("Follow them with `bsf-nnunet lowdata status -d ...` (or `cv status`); `run` again resubmits what failed.")


def _command(job: Job) -> TrainCommand:
    return TrainCommand(job.fresh_cmd, job.output_folder, job.kind, job.needs, job.lock)


def _job_name(dataset_name: str, job: Job) -> str:
    return f"{dataset_name.split('_')[0]}_{job.trainer}_f{job.fold}"


def _submit(registry: Registry, key: str, opts: ClusterOptions, executor, job: Job, after: Sequence[str]):
    """Submit ``job`` and record it in the registry (inside its lock)."""
    return registry.submit(key, opts.executor, executor, _command(job), describe(job), trainer=job.trainer,
                           fold=job.fold, kind=job.kind, command=job.command_line, after=list(after))


def _needed_key(dataset_name: str, job: Job) -> Optional[str]:
    """The key of the training whose checkpoint ``job`` waits for (None if it waits for nothing)."""
    if not job.needs or os.path.isfile(job.needs):
        return None
    return job_key(dataset_name, os.path.dirname(job.needs))


def _report_ended(head: str, entry: dict, out: Out) -> bool:
    """Say how a job that left its training unfinished ended; True when it was stopped (saved), not failed."""
    lines = log_tail(entry)
    if was_stopped(lines):
        out(f"{head}: its {entry['executor']} job {entry['job_id']} was stopped (a stop signal; it saved its state: "
            f"{entry.get('log')}); it continues from there")
        return True
    tail = "\n".join("    " + line for line in lines)
    out(f"{head}: its {entry['executor']} job {entry['job_id']} ended without finishing the training; the end of "
        f"its log {entry.get('log')}:\n{tail}")
    return False


def _active_note(entry: dict, state: str, registry_path: str) -> str:
    note = f"{state} as {entry['executor']} job {entry['job_id']}, not submitted again"
    if state == "unknown":
        note += (f" (neither sacct nor squeue knows its state: check `sacct -j {entry['job_id']}`; if it is gone, "
                 f"delete its entry in {registry_path})")
    return note


# ---------------------------------------------------------------------------------------------------- SLURM
def _submit_all(jobs: Sequence[Job], opts: ClusterOptions, name: str, device: str, out: Out,
                dry_run: bool) -> Outcome:
    registry, outcome = Registry(name), Outcome()
    gpus = list(range(opts.gpus(device)))
    with registry.locked():
        entries = registry.load()
        keys = [job_key(name, j.output_folder) for j in jobs]
        states = job_states({k: entries[k] for k in keys if k in entries})
        for i, (job, key) in enumerate(zip(jobs, keys, strict=True), 1):
            head = f"[{i}/{len(jobs)}] {describe(job)}"
            if job.status == "done":
                outcome.done += 1
                out(f"{head}: done, skipped")
                continue
            entry, state = entries.get(key), states.get(key)
            if blocks_submission(state):
                outcome.ids[key] = str(entry["job_id"])
                out(f"{head}: {_active_note(entry, state, registry.path)}")
                continue
            if entry is not None:
                _report_ended(head, entry, out)
            pre = _needed_key(name, job)
            if pre is not None and pre not in outcome.ids:
                outcome.skipped.append(key)
                out(f"{head}: skipped, its stage-2 pretraining ({pre}) has no job")
                continue
            after = [outcome.ids[pre]] if pre else []
            when = f" after job {after[0]}" if after else ""
            if dry_run:
                outcome.ids[key] = f"<{key}>"
                outcome.submitted.append(key)
                out(f"{head}: would submit{when}\n  {job.command_line}")
                continue
            ex = make_executor(opts, job_folder(opts, results_dir(name), key), _job_name(name, job), gpus, after)
            sjob = _submit(registry, key, opts, ex, job, after)
            outcome.ids[key] = str(sjob.job_id)
            outcome.submitted.append(key)
            out(f"{head}: submitted as SLURM job {sjob.job_id}{when}\n  {job.command_line}\n  log: {sjob.paths.stdout}")
    return outcome


# ---------------------------------------------------------------------------------------------------- local
def gpu_pool(opts: ClusterOptions, device: str) -> List[int]:
    """GPU ids the local jobs are spread over: --local-gpus, else $CUDA_VISIBLE_DEVICES, else 0..N*G-1."""
    per = opts.gpus(device)
    if per == 0:
        return []
    if opts.local_gpus:
        return list(opts.local_gpus)
    env = [x.strip() for x in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if x.strip()]
    if env and all(x.isdigit() for x in env):
        return [int(x) for x in env]
    return list(range(opts.max_parallel * per))


@dataclass
class _Running:
    job: Job
    sjob: object
    gpus: List[int]
    start: float


def _run_local(jobs: Sequence[Job], opts: ClusterOptions, name: str, device: str, out: Out, dry_run: bool,
               poll_s: float) -> Outcome:
    outcome, pool = Outcome(), gpu_pool(opts, device)
    per = opts.gpus(device)
    slots = min(opts.max_parallel, len(pool) // per) if per else opts.max_parallel
    if slots < 1:
        raise ValueError(f"Each job needs {per} GPU(s) (--gpus-per-job) but only GPUs {pool} are given "
                         f"(--local-gpus or $CUDA_VISIBLE_DEVICES).")
    heads = {job_key(name, j.output_folder): f"[{i}/{len(jobs)}] {describe(j)}" for i, j in enumerate(jobs, 1)}
    pending: List[Job] = []
    for job in jobs:
        if job.status == "done":
            outcome.done += 1
            out(f"{heads[job_key(name, job.output_folder)]}: done, skipped")
        elif dry_run:
            outcome.submitted.append(job_key(name, job.output_folder))
            out(f"{heads[job_key(name, job.output_folder)]}: would run ({slots} at a time)\n  {job.command_line}")
        else:
            pending.append(job)
    running: Dict[str, _Running] = {}
    with StopSignals() as stop:  # a stop signal: the running jobs save and stop, no new one starts
        while pending or running:
            if stop.received and pending:
                out(f"Received {stop.received}: {len(pending)} training(s) not started; run the same command again "
                    "to continue.")
                pending.clear()
            _start_ready(pending, running, pool, per, slots, opts, name, heads, outcome, out)
            stop.children = [p for p in (getattr(r.sjob, "_process", None) for r in running.values()) if p]
            if running:
                time.sleep(poll_s)
            _collect_finished(running, pool, heads, outcome, out)
    return outcome


def _start_ready(pending: List[Job], running: Dict[str, _Running], pool: List[int], per: int, slots: int,
                 opts: ClusterOptions, name: str, heads: Dict[str, str], outcome: Outcome, out: Out) -> None:
    """Start pending jobs (in order) while slots and GPUs are free; drop those whose pretraining failed."""
    waiting_for = {job_key(name, j.output_folder) for j in pending} | set(running)
    for job in list(pending):
        if len(running) >= slots:
            return
        key = job_key(name, job.output_folder)
        pre = _needed_key(name, job)
        if pre is not None:
            if pre in waiting_for:
                continue
            pending.remove(job)
            outcome.skipped.append(key)
            out(f"{heads[key]}: skipped, its stage-2 pretraining ({pre}) did not finish")
            continue
        pending.remove(job)
        gpus = pool[:per]
        sjob = _claim(job, key, opts, name, gpus, heads[key], out)
        if sjob is None:
            outcome.skipped.append(key)
            continue
        del pool[:per]
        running[key] = _Running(job, sjob, gpus, time.time())
        outcome.ids[key] = str(sjob.job_id)
        outcome.submitted.append(key)


def _claim(job: Job, key: str, opts: ClusterOptions, name: str, gpus: List[int], head: str, out: Out):
    """Start the local job of ``job`` unless a job of another process is running it (under the registry lock)."""
    registry = Registry(name)
    with registry.locked():
        entry, state = registry.entry_and_state(key)
        if blocks_submission(state):
            out(f"{head}: running as {entry['executor']} job {entry['job_id']} of another process, skipped")
            return None
        if entry is not None:
            _report_ended(head, entry, out)
        ex = make_executor(opts, job_folder(opts, results_dir(name), key), _job_name(name, job), gpus)
        sjob = _submit(registry, key, opts, ex, job, [])
    on = f" on GPU {','.join(map(str, gpus))}" if gpus else ""
    out(f"{head}: started (local job {sjob.job_id}{on})\n  {job.command_line}\n  log: {sjob.paths.stdout}")
    return sjob


def _collect_finished(running: Dict[str, _Running], pool: List[int], heads: Dict[str, str], outcome: Outcome,
                      out: Out) -> None:
    for key, r in list(running.items()):
        if not r.sjob.done():
            continue
        del running[key]
        pool.extend(r.gpus)
        if job_status(r.job.output_folder, r.job.kind) == "done":
            out(f"{heads[key]}: finished ({time.time() - r.start:.0f} s)")
            continue
        entry = {"executor": "local", "job_id": r.sjob.job_id, "log": str(r.sjob.paths.stdout)}
        (outcome.stopped if _report_ended(heads[key], entry, out) else outcome.failed).append(key)
