"""Train every low-data fold with every trainer by calling ``nnUNetv2_train`` in subprocesses.

Restartable at any time: a fold with ``checkpoint_final.pth`` is skipped (or only validated, with ``--val``, when its
``validation/summary.json`` is missing, also right after a trainer that skips nnU-Net's final validation), a fold
with ``checkpoint_latest.pth``/``checkpoint_best.pth`` is continued with ``--c``, others start fresh. Each (trainer,
fold) holds an flock while it runs, so several ``lowdata run`` processes (e.g. one per GPU) share the work without
training a fold twice.

Stage 2 (``--stage2``, see ``stage2.py``): by default every low-data fold is first pretrained on its own training
cases (the pretrained trainer's ``BSFPretrainTrainer*`` on the same fold, ``-pretrained_weights`` = the stage-1
checkpoint), and its fine-tuning starts from that run's ``checkpoint_final.pth`` (passed explicitly, so a missing
pretraining fails loudly instead of falling back to random initialisation). A pretraining is done with its
``checkpoint_final.pth``; a fine-tuning whose pretraining is still running elsewhere is skipped until the next run.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence

from ..cluster.process import (
    FoldLock,
    Job,
    StopSignals,
    TrainingFailed,
    command_for,
    describe,
    fold_status,
    job_status,
    run_to_measure,
    subprocess_runner,
)
from .common import finetune_folds, fmt_fraction, fold_dir, load_layout, resolve_dataset, results_dir, select_folds
from .stage2 import (
    DEFAULT_MODE,
    PER_FOLD,
    check_mode,
    check_modes,
    entry,
    pretrain_trainer_of,
    record_modes,
    weights_role,
)

# a runner gets (command, log file, environment) and returns the exit code
Runner = Callable[[List[str], str, dict], int]
# an executor gets the planned jobs and whether it is a dry run, and submits or runs them
Executor = Callable[[List["Job"], bool], object]


@dataclass(frozen=True)
class _Study:
    """What every command of one `lowdata run` shares."""
    dataset: str  # as the user gave it (ID or name), for the command lines
    name: str
    configuration: str
    plans: str
    device: str
    weights: Optional[str]  # --pretrained-weights
    extra_args: tuple

    def folder(self, trainer: str, fold: int) -> str:
        return fold_dir(self.name, trainer, self.plans, self.configuration, fold)

    def log(self, trainer: str, fold: int) -> str:
        return os.path.join(results_dir(self.name), "lowdata_logs",
                            f"{trainer}__{self.plans}__{self.configuration}_fold_{fold}.log")


def is_scratch(trainer: str) -> bool:
    """Baselines never take -pretrained_weights (by name: '...scratch...')."""
    return "scratch" in trainer.lower()


def _check_trainers_and_device(trainers: Sequence[str], device: str) -> None:
    if not trainers:
        raise ValueError("--trainers needs at least one trainer, e.g. --trainers BSFTrainer BSFTrainer_scratch.")
    if device not in ("cuda", "cpu", "mps"):
        raise ValueError(f"--device must be cuda, cpu or mps (nnUNetv2_train -device); got {device!r}.")


def pretrain_trainers(trainers: Sequence[str], stage2: str, pretrain_trainer: Optional[str] = None) -> dict:
    """{pretrained trainer: its stage-2 trainer} for --stage2 per-fold (empty otherwise; scratch trainers left out)."""
    if stage2 != PER_FOLD:
        return {}
    return {t: pretrain_trainer or pretrain_trainer_of(t) for t in trainers if not is_scratch(t)}


def plan_jobs(dataset, trainers: Sequence[str], configuration: str = "3d_fullres", plans: str = "nnUNetPlans",
              folds: Optional[Sequence[int]] = None, device: str = "cuda",
              pretrained_weights: Optional[str] = None, extra_args: Sequence[str] = (),
              stage2: str = DEFAULT_MODE, pretrain_trainer: Optional[str] = None) -> List[Job]:
    """The jobs fold by fold: with --stage2 per-fold first the fold's stage-2 pretraining(s), then every trainer
    (pretrained and baseline of a fold run back to back)."""
    _check_trainers_and_device(trainers, device)
    check_mode(stage2, pretrained_weights, pretrain_trainer)
    name = resolve_dataset(dataset)
    layout = load_layout(name)
    study = _Study(str(dataset), name, configuration, plans, device, pretrained_weights, tuple(extra_args))
    selected = select_folds(layout, list(folds) if folds else None, name)
    pretrainers = pretrain_trainers(trainers, stage2, pretrain_trainer)
    return [job for fd in selected for job in _fold_jobs(study, fd, trainers, pretrainers)]


def _fold_jobs(study: _Study, fd: dict, trainers: Sequence[str], pretrainers: dict) -> List[Job]:
    """One fold: its stage-2 pretrainings (one per distinct stage-2 trainer), then the trainers in the given order."""
    from ..training.handover import finished_checkpoint, handover_checkpoint  # (the trainers' package is heavy)

    pre = {p: _job(study, fd, p, "pretrain", study.weights) for p in dict.fromkeys(pretrainers.values())}
    jobs = list(pre.values())
    for tr in trainers:
        if is_scratch(tr):
            jobs.append(_job(study, fd, tr, "finetune", None))
        elif tr in pretrainers:  # starts from the fold's own stage 2
            folder = pre[pretrainers[tr]].output_folder
            jobs.append(_job(study, fd, tr, "finetune", handover_checkpoint(folder), needs=finished_checkpoint(folder)))
        else:
            jobs.append(_job(study, fd, tr, "finetune", study.weights))
    return jobs


def _job(study: _Study, fd: dict, trainer: str, kind: str, weights: Optional[str], needs: str = "") -> Job:
    out = study.folder(trainer, fd["fold"])
    st = job_status(out, kind)
    fresh = ["nnUNetv2_train", study.dataset, study.configuration, str(fd["fold"]), "-tr", trainer, "-p",
             study.plans, "-device", study.device] + (["-pretrained_weights", weights] if weights else [])
    fresh += list(study.extra_args)
    return Job(fd["fold"], trainer, fd["fraction"], fd["repeat"], st, command_for(fresh, st), out,
               study.log(trainer, fd["fold"]), kind, needs if st == "new" else "", fresh)


def run_lowdata(dataset, trainers: Sequence[str], configuration: str = "3d_fullres", plans: str = "nnUNetPlans",
                folds: Optional[Sequence[int]] = None, device: str = "cuda", dry_run: bool = False,
                pretrained_weights: Optional[str] = None, extra_args: Sequence[str] = (),
                runner: Optional[Runner] = None, out: Callable[[str], None] = print,
                env: Optional[dict] = None, stage2: Optional[str] = None,
                pretrain_trainer: Optional[str] = None, executor: Optional[Executor] = None) -> List[Job]:
    """Train (or with ``dry_run`` list) all low-data folds; returns the jobs. Raises TrainingFailed on a failure.

    ``stage2`` None means the default (per-fold) chosen implicitly: folds started before the mode was recorded are
    then refused rather than silently continued with another stage 2. ``executor`` (e.g. a submitit executor of
    ``bsf_nnunet.cluster``) gets the planned jobs instead of running them one after the other here.
    """
    mode = check_mode(stage2 or DEFAULT_MODE, pretrained_weights, pretrain_trainer)
    if mode == "shared" and load_layout(resolve_dataset(dataset))["pretrain_fold"] is None:
        raise ValueError("--stage2 shared pretrains once on all non-test cases, but this layout draws a new test set "
                         "for every repeat (--redraw-test-per-repeat), so every case is a test case of some repeat. "
                         "Use --stage2 per-fold (the default) or none.")
    if pretrained_weights and not dry_run and not os.path.isfile(pretrained_weights):
        raise ValueError(f"--pretrained-weights {pretrained_weights} does not exist; with --stage2 {mode} it is "
                         f"{weights_role(mode)}. Fix the path (docs/lowdata.md).")
    jobs = plan_jobs(dataset, trainers, configuration, plans, folds, device, pretrained_weights, extra_args, mode,
                     pretrain_trainer)
    _check_and_record_mode(resolve_dataset(dataset), trainers, configuration, plans, mode, stage2 is not None,
                           pretrain_trainers(trainers, mode, pretrain_trainer), pretrained_weights, not dry_run)
    _note_weights(mode, pretrained_weights, trainers, out)
    if executor is not None:
        executor(jobs, dry_run)
    else:
        run_sequential(jobs, dry_run, runner, env, out)
    return jobs


def run_sequential(jobs: Sequence[Job], dry_run: bool = False, runner: Optional[Runner] = None,
                   env: Optional[dict] = None, out: Callable[[str], None] = print) -> dict:
    """Run (or list) the jobs one after the other in this process; returns the counts done / run / busy."""
    runner = runner or subprocess_runner
    env = dict(os.environ if env is None else env)
    counts = {"done": 0, "run": 0, "busy": 0, "stopped": 0}
    with StopSignals() as stop:
        for i, job in enumerate(jobs, 1):
            if stop.received:
                out(f"Received {stop.received}: the remaining trainings are not started; run the same command again "
                    "to continue.")
                break
            counts[_do_job(job, f"[{i}/{len(jobs)}] {describe(job)}", dry_run, runner, env, out, stop)] += 1
    n_pre = sum(j.kind == "pretrain" for j in jobs)
    verb = "would run" if dry_run else "ran"
    out(f"{len(jobs)} trainings{f' ({n_pre} of them stage-2 pretrainings)' if n_pre else ''}: {counts['done']} "
        f"already done, {verb} {counts['run']}"
        + (f", {counts['stopped']} stopped (saved; run again to continue)" if counts["stopped"] else "")
        + (f", {counts['busy']} busy in another process" if counts["busy"] else ""))
    return counts


def _check_and_record_mode(name: str, trainers: Sequence[str], configuration: str, plans: str, mode: str,
                           explicit: bool, pretrainers: dict, weights: Optional[str], write: bool) -> None:
    """Refuse to mix stage-2 modes within a trainer's folds; record the mode (not in a dry run)."""
    tuned = [t for t in trainers if not is_scratch(t)]
    keys = {t: f"{t}__{plans}__{configuration}" for t in tuned}
    folds = [f["fold"] for f in finetune_folds(load_layout(name))]
    started = {keys[t]: any(fold_status(fold_dir(name, t, plans, configuration, f)) != "new" for f in folds)
               for t in tuned}
    entries = {keys[t]: entry(mode, pretrainers.get(t), weights) for t in tuned}
    check_modes(name, entries, started, explicit)
    if write and entries:
        record_modes(name, entries)


def _note_weights(mode: str, weights: Optional[str], trainers: Sequence[str], out: Callable[[str], None]) -> None:
    if weights or all(is_scratch(t) for t in trainers):
        return
    if mode == PER_FOLD:
        out("note: no --pretrained-weights: the stage-2 pretrainings start from random initialisation. For "
            "BrainSegFounder's recipe pass the stage-1 checkpoint (docs/lowdata.md).")
    else:
        out("note: no --pretrained-weights: BSF trainers start from their stage-chaining pretraining of the same fold "
            "(e.g. BSFPretrainTrainer fold_F) if it exists, else from random initialisation. With --stage2 shared "
            "pass the stage-2 checkpoint of the pretraining fold (docs/lowdata.md); check the 'Initialised from' "
            "line of the training logs.")


def _do_job(job: Job, head: str, dry_run: bool, runner: Runner, env: dict, out: Callable[[str], None],
            stop: Optional[StopSignals] = None) -> str:
    """Run (or list) one job; returns 'done', 'run', 'stopped' or 'busy'. Raises TrainingFailed on a failure."""
    if job.status == "done":
        out(f"{head}: done, skipped ({job.output_folder}/checkpoint_final.pth)")
        return "done"
    what = {"new": "pretrain" if job.kind == "pretrain" else "train", "resume": "continue (--c)",
            "validate": "validate only (--val)"}[job.status]
    if dry_run:
        out(f"{head}: would {what}\n  {job.command_line}")
        return "run"
    if job.needs and not os.path.isfile(job.needs):
        out(f"{head}: its stage-2 pretraining is not finished ({job.needs} missing: another `lowdata run` is "
            f"training it, or it was interrupted), skipped; run `lowdata run` again to continue")
        return "busy"
    lock = FoldLock(job.lock)
    if not lock.acquire():
        out(f"{head}: another process (a `run` or a cluster job) is training it, skipped")
        return "busy"
    try:
        if job_status(job.output_folder, job.kind) == "done":  # another process may have finished it meanwhile
            out(f"{head}: done meanwhile, skipped")
            return "done"
        out(f"{head}: {what}\n  {job.command_line}\n  log: {job.log}")
        rc = run_to_measure(job.cmd, job.fresh_cmd, job.output_folder, job.kind,
                            lambda cmd: runner(cmd, job.log, env), stop)
    finally:
        lock.release()
    if rc != 0:
        where = f" ({fmt_fraction(job.fraction)}, repeat {job.repeat})" if job.fraction is not None else ""
        raise TrainingFailed(
            f"{'Stage-2 pretraining' if job.kind == 'pretrain' else 'Training'} of fold {job.fold}{where} with "
            f"{job.trainer} failed (exit code {rc}). Log: {job.log}; nnU-Net's own log: "
            f"{job.output_folder}/training_log_*.txt. Fix the cause and run the same command again: finished "
            f"steps are skipped and this one continues from its last checkpoint.")
    if job_status(job.output_folder, job.kind) != "done":  # exit code 0 before the end: a stop, saved
        why = f"received {stop.received}" if stop is not None and stop.received else "a stop signal or " \
            "BSF_STOP_AFTER_EPOCH"
        out(f"{head}: stopped before its end ({why}); it saved its state and the next run continues it")
        return "stopped"
    return "run"
