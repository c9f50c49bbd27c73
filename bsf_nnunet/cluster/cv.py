"""``bsf-nnunet cv``: nnU-Net's 5-fold cross-validation (``nnUNetv2_train D C F -tr T --npz``) for one or more
trainers, then ``nnUNetv2_find_best_configuration D -c C -tr T ...`` once every fold is done.

With ``--executor slurm`` find_best_configuration is a last job that depends on every fold job still queued or
running (``afterok``); when all folds are done already, ``cv run`` runs it itself. With ``sequential`` and
``local`` it runs at the end of ``cv run``. It prints, and writes to
``$nnUNet_results/DatasetXXX/inference_instructions.txt``, the ensemble and postprocessing commands it picks.
"""
from __future__ import annotations

import os
import shlex
import subprocess
import sys
from typing import Callable, List, Optional, Sequence

from ..io import atomic_write_json
from ..lowdata.common import SPLITS_FILE, fold_dir, preprocessed_dir, read_json, resolve_dataset, results_dir
from ..lowdata.runner import run_sequential
from ..lowdata.splits import CV_FOLDS as CV_SPLITS
from ..lowdata.splits import CV_SEED, find_case_ids
from .executors import job_folder, make_executor
from .launch import launch
from .options import ClusterOptions
from .process import Job, TrainingFailed, command_for, executable, job_status
from .registry import Registry, blocks_submission, job_key

Out = Callable[[str], None]
CV_FOLDS = (0, 1, 2, 3, 4)
INSTRUCTIONS = "inference_instructions.txt"


def check_preprocessed(dataset_name: str, plans: str, configuration: str) -> None:
    """ValueError with the fix unless ``configuration`` of ``plans`` is planned and preprocessed."""
    pre = preprocessed_dir(dataset_name)
    path = os.path.join(pre, plans + ".json")
    if not os.path.isfile(path):
        raise ValueError(f"{dataset_name} has no plans {plans}: {path} does not exist. Plan and preprocess it first "
                         f"(nnUNetv2_plan_and_preprocess -d {dataset_name} -c {configuration}, or `bsf-nnunet plan` "
                         f"for BSFPlans); nothing was submitted.")
    configs = (read_json(path, "nnU-Net plans") or {}).get("configurations", {})
    conf = configs.get(configuration)
    if conf is None:
        raise ValueError(f"{path} has no configuration {configuration!r} (it has {', '.join(configs)}); nothing was "
                         f"submitted.")
    while "data_identifier" not in conf and conf.get("inherits_from") in configs:  # as nnU-Net's PlansManager
        conf = configs[conf["inherits_from"]]
    data = os.path.join(pre, str(conf.get("data_identifier")))
    if not os.path.isdir(data) or not os.listdir(data):
        raise ValueError(f"{dataset_name} is planned but not preprocessed for {configuration}: {data} is missing or "
                         f"empty. Run nnUNetv2_preprocess -d {dataset_name} -c {configuration} -plans_name {plans}; "
                         f"nothing was submitted.")


def ensure_split(dataset_name: str, plans: str, configuration: str, out: Out) -> None:
    """Write nnU-Net's default 5-fold split_final.json if there is none, exactly as nnUNetTrainer.do_split would:
    folds trained in parallel would otherwise each write it at the same time."""
    path = os.path.join(preprocessed_dir(dataset_name), SPLITS_FILE)
    if os.path.isfile(path):
        return
    from nnunetv2.utilities.crossval_split import generate_crossval_split

    cases, _ = find_case_ids(dataset_name, configuration, plans)
    folds = [{"train": [str(c) for c in f["train"]], "val": [str(c) for c in f["val"]]}
             for f in generate_crossval_split(cases, seed=CV_SEED, n_splits=CV_SPLITS)]
    atomic_write_json(path, folds, sort_keys=True, indent=4)  # nnU-Net's save_json layout
    out(f"wrote nnU-Net's default {CV_SPLITS}-fold split (seed {CV_SEED}) to {path}")


def plan_cv_jobs(dataset, configuration: str, trainers: Sequence[str], plans: str = "nnUNetPlans",
                 folds: Sequence[int] = CV_FOLDS, device: str = "cuda", extra_args: Sequence[str] = ()) -> List[Job]:
    """The cross-validation trainings, trainer by trainer (``--npz``: the validation probabilities that
    find_best_configuration ensembles)."""
    if not trainers:
        raise ValueError("-tr needs at least one trainer, e.g. -tr BSFTrainer nnUNetTrainer.")
    name = resolve_dataset(dataset)
    check_preprocessed(name, plans, configuration)
    jobs = []
    for tr in trainers:
        for f in folds:
            out = fold_dir(name, tr, plans, configuration, f)
            st = job_status(out, "cv")
            fresh = ["nnUNetv2_train", str(dataset), configuration, str(f), "-tr", tr, "-p", plans, "-device",
                     device, "--npz", *extra_args]
            log = os.path.join(results_dir(name), "cv_logs", f"{tr}__{plans}__{configuration}_fold_{f}.log")
            jobs.append(Job(f, tr, None, None, st, command_for(fresh, st), out, log, "cv", fresh_cmd=fresh))
    return jobs


def find_best_command(dataset, configuration: str, trainers: Sequence[str], plans: str,
                      folds: Sequence[int]) -> List[str]:
    return ["nnUNetv2_find_best_configuration", str(dataset), "-c", configuration, "-tr", *trainers, "-p", plans,
            "-f", *map(str, folds)]


def find_best_key(configuration: str, trainers: Sequence[str], plans: str) -> str:
    return f"find_best_configuration/{'+'.join(trainers)}__{plans}__{configuration}"


def run_cv(dataset, configuration: str, trainers: Sequence[str], plans: str = "nnUNetPlans",
           folds: Sequence[int] = CV_FOLDS, device: str = "cuda", opts: Optional[ClusterOptions] = None,
           dry_run: bool = False, out: Out = print) -> None:
    """Train the folds (sequentially, locally in parallel, or as SLURM jobs), then find the best configuration."""
    opts = opts or ClusterOptions()
    name = resolve_dataset(dataset)
    jobs = plan_cv_jobs(dataset, configuration, trainers, plans, folds, device)
    if not dry_run:
        ensure_split(name, plans, configuration, out)
    if opts.executor == "sequential":
        run_sequential(jobs, dry_run, out=out)
        ids = {}
    else:
        ids = launch(jobs, dry_run, opts=opts, dataset_name=name, device=device, out=out).ids
    best = find_best_command(dataset, configuration, trainers, plans, folds)
    if dry_run:
        out(f"then, once every fold is done:\n  {shlex.join(best)}")
        return
    waiting = [j for j in jobs if job_status(j.output_folder, "cv") != "done"]
    if not waiting:
        run_find_best(best, out)
    elif opts.executor == "slurm" and all(_key(name, j) in ids for j in waiting):
        _submit_find_best(best, sorted({ids[_key(name, j)] for j in waiting}), opts, name,
                          find_best_key(configuration, trainers, plans), out)
    else:
        out(f"{len(waiting)} fold(s) not finished: run `bsf-nnunet cv run` again once they are; it then runs "
            f"{shlex.join(best)}")


def _key(name: str, job: Job) -> str:
    return job_key(name, job.output_folder)


def run_find_best(cmd: List[str], out: Out) -> None:
    """Run find_best_configuration here, its output (the chosen ensemble and postprocessing) shown as it comes."""
    out(f"all folds done: {shlex.join(cmd)}")
    sys.stdout.flush()
    rc = subprocess.run(executable(cmd)).returncode
    if rc != 0:
        raise TrainingFailed(f"{shlex.join(cmd)} failed (exit code {rc}; its output is above).")


def _submit_find_best(cmd: List[str], after: List[str], opts: ClusterOptions, name: str, key: str,
                      out: Out) -> None:
    from .options import import_submitit

    registry = Registry(name)
    with registry.locked():
        entry, state = registry.entry_and_state(key)
        if blocks_submission(state):
            out(f"find_best_configuration: already {state} as SLURM job {entry['job_id']} (it waits for the folds "
                f"of its own submission); run `cv run` again when all folds are done if it does not run")
            return
        submitit = import_submitit()
        fn = submitit.helpers.CommandFunction(executable(cmd), verbose=True)
        ex = make_executor(opts, job_folder(opts, results_dir(name), key), f"{name.split('_')[0]}_find_best",
                           (), after)
        sjob = registry.submit(key, opts.executor, ex, fn, "find_best_configuration", kind="find_best",
                               command=shlex.join(cmd), after=after)
    out(f"find_best_configuration: submitted as SLURM job {sjob.job_id} after jobs {', '.join(after)}\n"
        f"  {shlex.join(cmd)}\n  log: {sjob.paths.stdout} (the ensemble and postprocessing it picks; also in "
        f"{os.path.join(results_dir(name), INSTRUCTIONS)})")


def find_best_row(name: str, configuration: str, trainers: Sequence[str], plans: str, rows: Sequence[dict]) -> dict:
    """The status row of the find_best_configuration step."""
    key = find_best_key(configuration, trainers, plans)
    entry, state = Registry(name).entry_and_state(key)
    done = all(r["status"] == "done" for r in rows) and os.path.isfile(os.path.join(results_dir(name), INSTRUCTIONS))
    status = "done" if done else (state if blocks_submission(state) else
                                  "failed" if entry else "not started")
    return {"fold": None, "trainer": "find_best_configuration", "kind": "find_best", "fraction": None,
            "repeat": None, "status": status, "job": f"{entry['executor']} {entry['job_id']}" if entry else None,
            "log": entry.get("log") if entry else None, "folder": results_dir(name)}


def instructions(name: str) -> Optional[str]:
    path = os.path.join(results_dir(name), INSTRUCTIONS)
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        return f.read()
