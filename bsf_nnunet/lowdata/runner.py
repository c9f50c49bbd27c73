"""Train every low-data fold with every trainer by calling ``nnUNetv2_train`` in subprocesses.

Restartable at any time: a fold with ``checkpoint_final.pth`` is skipped (or only validated, with ``--val``, when its
``validation/summary.json`` is missing), a fold with ``checkpoint_latest.pth``/``checkpoint_best.pth`` is continued
with ``--c``, others start fresh. Each (trainer, fold) holds an flock while it runs, so several ``lowdata run``
processes (e.g. one per GPU) share the work without training a fold twice.
"""
from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Sequence

from .common import fmt_fraction, fold_dir, load_layout, resolve_dataset, results_dir, select_folds

# a runner gets (command, log file, environment) and returns the exit code
Runner = Callable[[List[str], str, dict], int]


class TrainingFailed(RuntimeError):
    """An nnUNetv2_train subprocess failed; the message names the fold, trainer and log."""


@dataclass
class Job:
    fold: int
    trainer: str
    fraction: float
    repeat: int
    status: str  # done | validate | resume | new
    cmd: List[str] = field(default_factory=list)
    output_folder: str = ""
    log: str = ""

    @property
    def command_line(self) -> str:
        return shlex.join(self.cmd)


def is_scratch(trainer: str) -> bool:
    """Baselines never take -pretrained_weights (by name: '...scratch...')."""
    return "scratch" in trainer.lower()


def fold_status(folder: str) -> str:
    if os.path.isfile(os.path.join(folder, "checkpoint_final.pth")):
        if os.path.isfile(os.path.join(folder, "validation", "summary.json")):
            return "done"
        return "validate"
    if any(os.path.isfile(os.path.join(folder, c)) for c in ("checkpoint_latest.pth", "checkpoint_best.pth")):
        return "resume"
    return "new"


def plan_jobs(dataset, trainers: Sequence[str], configuration: str = "3d_fullres", plans: str = "nnUNetPlans",
              folds: Optional[Sequence[int]] = None, device: str = "cuda",
              pretrained_weights: Optional[str] = None, extra_args: Sequence[str] = ()) -> List[Job]:
    """One job per (low-data fold, trainer), fold-major (pretrained and baseline of a fold run back to back)."""
    if not trainers:
        raise ValueError("--trainers needs at least one trainer, e.g. --trainers BSFTrainer BSFTrainer_scratch.")
    if device not in ("cuda", "cpu", "mps"):
        raise ValueError(f"--device must be cuda, cpu or mps (nnUNetv2_train -device); got {device!r}.")
    name = resolve_dataset(dataset)
    layout = load_layout(name)
    jobs = []
    for fd in select_folds(layout, list(folds) if folds else None, name):
        for tr in trainers:
            out = fold_dir(name, tr, plans, configuration, fd["fold"])
            st = fold_status(out)
            cmd = ["nnUNetv2_train", str(dataset), configuration, str(fd["fold"]), "-tr", tr, "-p", plans,
                   "-device", device]
            if st == "resume":
                cmd.append("--c")  # nnU-Net refuses --c together with -pretrained_weights (and needs neither)
            elif st == "validate":
                cmd.append("--val")
            elif pretrained_weights and not is_scratch(tr):
                cmd += ["-pretrained_weights", pretrained_weights]
            cmd += list(extra_args)
            log = os.path.join(results_dir(name), "lowdata_logs",
                               f"{tr}__{plans}__{configuration}_fold_{fd['fold']}.log")
            jobs.append(Job(fd["fold"], tr, fd["fraction"], fd["repeat"], st, cmd, out, log))
    return jobs


def _executable(cmd: List[str]) -> List[str]:
    """nnUNetv2_train of this Python environment, else on PATH, else ``python -m nnunetv2.run.run_training``."""
    if cmd[0] != "nnUNetv2_train":
        return cmd
    here = os.path.join(os.path.dirname(sys.executable), "nnUNetv2_train")
    if os.path.isfile(here) and os.access(here, os.X_OK):
        return [here] + cmd[1:]
    found = shutil.which("nnUNetv2_train")
    if found:
        return [found] + cmd[1:]
    return [sys.executable, "-m", "nnunetv2.run.run_training"] + cmd[1:]


def subprocess_runner(cmd: List[str], log: str, env: dict) -> int:
    """Run ``cmd``, showing its output and appending it to ``log``."""
    os.makedirs(os.path.dirname(log), exist_ok=True)
    with open(log, "a", encoding="utf-8", errors="replace") as lf:
        lf.write(f"\n$ {shlex.join(cmd)}\n")
        lf.flush()
        p = subprocess.Popen(_executable(cmd), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             errors="replace", bufsize=1)
        try:
            for line in p.stdout:
                sys.stdout.write(line)
                sys.stdout.flush()
                lf.write(line)
            return p.wait()
        except BaseException:
            p.terminate()
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
            raise


class _FoldLock:
    """Exclusive, non-blocking flock per (trainer, fold); released by the OS if the process dies."""

    def __init__(self, path: str):
        self.path, self.fh = path, None

    def acquire(self) -> bool:
        try:
            import fcntl
        except ImportError:  # not POSIX: no cross-process protection
            return True
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        self.fh = open(self.path, "a")
        try:
            fcntl.flock(self.fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except OSError:
            self.fh.close()
            self.fh = None
            return False

    def release(self) -> None:
        if self.fh is not None:
            self.fh.close()  # closing drops the lock
            self.fh = None


def run_lowdata(dataset, trainers: Sequence[str], configuration: str = "3d_fullres", plans: str = "nnUNetPlans",
                folds: Optional[Sequence[int]] = None, device: str = "cuda", dry_run: bool = False,
                pretrained_weights: Optional[str] = None, extra_args: Sequence[str] = (),
                runner: Optional[Runner] = None, out: Callable[[str], None] = print,
                env: Optional[dict] = None) -> List[Job]:
    """Train (or with ``dry_run`` list) all low-data folds; returns the jobs. Raises TrainingFailed on a failure."""
    if pretrained_weights and not dry_run and not os.path.isfile(pretrained_weights):
        raise ValueError(f"--pretrained-weights {pretrained_weights} does not exist. Run the stage-2 pretraining "
                         f"first (see `bsf-nnunet lowdata splits` for the pretraining fold) or fix the path.")
    jobs = plan_jobs(dataset, trainers, configuration, plans, folds, device, pretrained_weights, extra_args)
    runner = runner or subprocess_runner
    env = dict(os.environ if env is None else env)
    if not pretrained_weights and any(not is_scratch(t) for t in trainers):
        out("note: no --pretrained-weights: BSF trainers start from their stage-chaining pretraining of the same fold "
            "(e.g. BSFPretrainTrainer fold_F) if it exists, else from random initialisation. For the low-data study "
            "pass the stage-2 checkpoint of the pretraining fold (docs/lowdata.md); check the 'Initialised from' line "
            "of the training logs.")
    counts = {"done": 0, "run": 0, "busy": 0}
    for i, job in enumerate(jobs, 1):
        head = (f"[{i}/{len(jobs)}] fold {job.fold} ({fmt_fraction(job.fraction)}, repeat {job.repeat}) "
                f"{job.trainer}")
        if job.status == "done":
            out(f"{head}: done, skipped ({job.output_folder}/checkpoint_final.pth)")
            counts["done"] += 1
            continue
        what = {"new": "train", "resume": "continue (--c)", "validate": "validate only (--val)"}[job.status]
        if dry_run:
            out(f"{head}: would {what}\n  {job.command_line}")
            counts["run"] += 1
            continue
        lock = _FoldLock(job.log[:-4] + ".lock")
        if not lock.acquire():
            out(f"{head}: another `lowdata run` is training it, skipped")
            counts["busy"] += 1
            continue
        try:
            # re-check: another process may have finished it meanwhile
            if fold_status(job.output_folder) == "done":
                out(f"{head}: done meanwhile, skipped")
                counts["done"] += 1
                continue
            out(f"{head}: {what}\n  {job.command_line}\n  log: {job.log}")
            rc = runner(list(job.cmd), job.log, env)
        finally:
            lock.release()
        if rc != 0:
            raise TrainingFailed(
                f"Training of fold {job.fold} ({fmt_fraction(job.fraction)}, repeat {job.repeat}) with {job.trainer} "
                f"failed (exit code {rc}). Log: {job.log}; nnU-Net's own log: {job.output_folder}/training_log_*.txt. "
                f"Fix the cause and run the same `bsf-nnunet lowdata run` again: finished folds are skipped and this "
                f"one continues from its last checkpoint.")
        counts["run"] += 1
    verb = "would run" if dry_run else "ran"
    out(f"{len(jobs)} trainings: {counts['done']} already done, {verb} {counts['run']}"
        + (f", {counts['busy']} busy in another process" if counts["busy"] else ""))
    return jobs
