"""``bsf-nnunet cv``: nnU-Net's 5-fold cross-validation as jobs, then nnUNetv2_find_best_configuration."""
from __future__ import annotations

import sys

from ..cluster.options import add_executor_arguments
from ..devices import DEVICE_CHOICES


def register(sub) -> None:
    p = sub.add_parser("cv", help="5-fold cross-validation (sequential, local jobs or SLURM) + find_best_configuration",
                       description="Train folds 0-4 of each trainer with the stock nnUNetv2_train ... --npz (as jobs "
                                   "with --executor local or slurm), then run nnUNetv2_find_best_configuration, which "
                                   "prints the ensemble and postprocessing it picks (docs/lowdata.md).")
    p.set_defaults(func=_no_step, _parser=p)
    sp = p.add_subparsers(dest="step", metavar="STEP")

    q = sp.add_parser("run", help="train the folds, then find the best configuration (restartable)",
                      description="Finished folds are skipped, interrupted ones continued with --c, folds trained "
                                  "without --npz validated again with --val --npz. With --executor slurm the folds "
                                  "are submitted at once and find_best_configuration as a last job that waits for "
                                  "them (afterok); if every fold is done already it runs here. Exit code 1 when a "
                                  "training fails.")
    _common(q)
    q.add_argument("--device", default="auto", choices=list(DEVICE_CHOICES),
                   help="auto (default): cuda where PyTorch sees a GPU, else cpu (with --executor slurm: cuda)")
    q.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    add_executor_arguments(q)
    q.set_defaults(func=_run)

    q = sp.add_parser("status", help="per fold and trainer: done / running / queued / failed / not started",
                      description="From the results folders and the jobs in $nnUNet_results/DatasetXXX/jobs.json; "
                                  "failed jobs with the end of their log; the find_best_configuration step and, once "
                                  "it ran, its inference instructions.")
    _common(q)
    q.add_argument("--json", action="store_true", help="print the rows as JSON (for scripts)")
    q.add_argument("--tail", type=int, default=10, metavar="N", help="log lines shown per failed job (default 10)")
    q.set_defaults(func=_status)


def _common(q) -> None:
    q.add_argument("-d", "--dataset", required=True, help="dataset ID or name")
    q.add_argument("-c", "--configuration", default="3d_fullres", help="configuration (default 3d_fullres)")
    q.add_argument("-tr", "--trainers", nargs="+", required=True, help="one or more trainers, e.g. BSFTrainer")
    q.add_argument("-p", "--plans", default="nnUNetPlans", help="plans identifier (default nnUNetPlans)")
    q.add_argument("--folds", type=int, nargs="+", default=[0, 1, 2, 3, 4], help="folds (default 0 1 2 3 4)")


def _no_step(args) -> int:
    args._parser.print_help(sys.stderr)
    return 2


def _run(args) -> int:
    from ..cluster.cv import run_cv
    from ..cluster.options import import_submitit, options_from_args
    from ..devices import resolve_device

    opts = options_from_args(args)
    if opts.executor != "sequential":
        import_submitit()
    device = resolve_device(args.device, opts.executor)
    run_cv(args.dataset, args.configuration, args.trainers, args.plans, args.folds, device, opts, args.dry_run)
    return 0


def _status(args) -> int:
    from ..cluster.cv import find_best_row, instructions, plan_cv_jobs
    from ..cluster.status import collect, show
    from ..lowdata.common import resolve_dataset

    name = resolve_dataset(args.dataset)
    jobs = plan_cv_jobs(args.dataset, args.configuration, args.trainers, args.plans, args.folds)
    rows = collect(jobs, name)
    rows.append(find_best_row(name, args.configuration, args.trainers, args.plans, rows))
    show(rows, args.json, tail=args.tail)
    text = instructions(name) if rows[-1]["status"] == "done" and not args.json else None
    if text:
        print(f"\n{text.rstrip()}")
    return 0
