"""``bsf-nnunet lowdata``: the low-data fine-tuning study (BrainSegFounder's Figure 5), see docs/lowdata.md."""
from __future__ import annotations

import sys

from ..cluster.options import add_executor_arguments
from ..devices import DEVICE_CHOICES
from ..lowdata.stage2 import MODES as STAGE2_MODES

DEFAULT_FRACTIONS = [0.05, 0.1, 0.2, 0.4, 0.6, 0.8, 1.0]


def register(sub) -> None:
    p = sub.add_parser("lowdata", help="low-data study: fraction folds, training runner, report (Figure 5)",
                       description="Fine-tune on 5-100% of the training cases, several random draws per fraction, "
                                   "evaluated on one fixed test set; pretrained vs scratch. Steps: splits -> run -> "
                                   "report (docs/lowdata.md).")
    p.set_defaults(func=_no_step, _parser=p)
    sp = p.add_subparsers(dest="step", metavar="STEP")
    _add_splits(sp)
    _add_run(sp)
    _add_status(sp)
    _add_report(sp)


def _add_splits(sp) -> None:
    """``lowdata splits``: the low-data folds in splits_final.json."""
    q = sp.add_parser("splits", help="append the low-data folds to splits_final.json",
                      description="Write the low-data folds into $nnUNet_preprocessed/DatasetXXX/splits_final.json "
                                  "after the existing folds (kept as they are; nnU-Net's default 5-fold split is "
                                  "created first if there is none) and lowdata.json next to it. Each fold trains on "
                                  "a fraction of the non-test cases and validates on the fixed test set; subsets of "
                                  "one repeat are nested. Same settings again: no change.")
    q.add_argument("-d", "--dataset", required=True, help="dataset ID or name")
    q.add_argument("--fractions", type=float, nargs="+", default=DEFAULT_FRACTIONS,
                   help="fractions of the non-test cases (default: %(default)s)")
    q.add_argument("--repeats", type=int, default=5, help="random draws per fraction (default 5)")
    q.add_argument("--test-fraction", type=float, default=0.2, help="held-out test share of all cases (default 0.2)")
    q.add_argument("--seed", type=int, default=0, help="random seed of the test set and draws (default 0)")
    q.add_argument("-c", "--configuration", default="3d_fullres",
                   help="configuration whose preprocessed cases are used (default 3d_fullres)")
    q.add_argument("-p", "--plans", default="nnUNetPlans", help="plans identifier (default nnUNetPlans)")
    q.add_argument("--redraw-test-per-repeat", action="store_true",
                   help="the official protocol: a new test set for every repeat (default: one fixed test set, so "
                        "every fraction and repeat is scored on the same cases; docs/fidelity.md)")
    q.add_argument("--overwrite", action="store_true", help="replace a different existing low-data layout")
    q.set_defaults(func=_splits)


def _add_run(sp) -> None:
    """``lowdata run``: train every low-data fold (stage 2 first by default)."""
    q = sp.add_parser("run", help="train all low-data folds (restartable)",
                      description="Run nnUNetv2_train DATASET C FOLD -tr T -p P -device D for every low-data fold and "
                                  "trainer; by default (--stage2 per-fold) each fold is first pretrained "
                                  "self-supervised on its own training cases, as in the original study, and its "
                                  "pretrained fine-tuning starts from that. Finished steps are skipped, interrupted "
                                  "ones continued with --c; stop and restart at any time. Exit code 1 when a training "
                                  "fails (fold and log named).")
    q.add_argument("-d", "--dataset", required=True, help="dataset ID or name")
    q.add_argument("--trainers", nargs="+", default=["BSFTrainer", "BSFTrainer_scratch"],
                   help="trainers (default: BSFTrainer BSFTrainer_scratch)")
    q.add_argument("-c", "--configuration", default="3d_fullres")
    q.add_argument("-p", "--plans", default="nnUNetPlans")
    q.add_argument("--folds", type=int, nargs="+", default=None, help="only these low-data folds")
    q.add_argument("--device", default="auto", choices=list(DEVICE_CHOICES),
                   help="auto (default): cuda where PyTorch sees a GPU, else cpu (with --executor slurm: cuda)")
    q.add_argument("--stage2", choices=list(STAGE2_MODES), default=None,
                   help="stage 2 (self-supervised pretraining on this dataset) of the pretrained trainers: per-fold "
                        "(default): the trainer's BSFPretrainTrainer* on every low-data fold's own training cases "
                        "first, as the original study; shared: one pretraining on all non-test cases that you ran "
                        "yourself, given with --pretrained-weights (the previous behaviour); none: fine-tune straight "
                        "from --pretrained-weights. Recorded in $nnUNet_results/DatasetXXX/lowdata_run.json")
    q.add_argument("--pretrain-trainer", default=None, metavar="TRAINER",
                   help="stage-2 trainer for --stage2 per-fold (default: each trainer's own, its bsf_pretrain_trainer, "
                        "e.g. BSFPretrainTrainer for BSFTrainer)")
    q.add_argument("--pretrained-weights", default=None, metavar="CKPT",
                   help="-pretrained_weights of new trainings, never of *scratch* ones: with --stage2 per-fold the "
                        "stage-1 checkpoint, given to each stage-2 pretraining; shared: the stage-2 checkpoint of the "
                        "pretraining fold, given to the fine-tunings; none: the stage-1 checkpoint, given to the "
                        "fine-tunings. A file, or bsf:NAME / hf://OWNER/REPO/FILE (downloaded once)")
    q.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    add_executor_arguments(q)
    q.set_defaults(func=_run)


def _add_status(sp) -> None:
    """``lowdata status``: the state of every low-data training."""
    q = sp.add_parser("status", help="per fold and trainer: done / running / queued / failed / not started",
                      description="The state of every low-data training, from the results folders and the jobs "
                                  "recorded in $nnUNet_results/DatasetXXX/jobs.json (SLURM: asked from sacct). Failed "
                                  "jobs are listed with the end of their log. Trainers and stage 2 default to those "
                                  "of the study (recorded by `run`).")
    q.add_argument("-d", "--dataset", required=True, help="dataset ID or name")
    q.add_argument("--trainers", nargs="+", default=None,
                   help="trainers (default: those with jobs or results, else BSFTrainer BSFTrainer_scratch)")
    q.add_argument("-c", "--configuration", default="3d_fullres")
    q.add_argument("-p", "--plans", default="nnUNetPlans")
    q.add_argument("--folds", type=int, nargs="+", default=None, help="only these low-data folds")
    q.add_argument("--stage2", choices=list(STAGE2_MODES), default=None, help="as for run (default: the recorded one)")
    q.add_argument("--pretrain-trainer", default=None, metavar="TRAINER", help="as for run")
    q.add_argument("--json", action="store_true", help="print the rows as JSON (for scripts)")
    q.add_argument("--tail", type=int, default=10, metavar="N", help="log lines shown per failed job (default 10)")
    q.set_defaults(func=_status)


def _add_report(sp) -> None:
    """``lowdata report``: CSV, markdown and plot of the test-set Dice."""
    q = sp.add_parser("report", help="CSV, markdown and plot of the test-set Dice",
                      description="Collect fold_F/validation/summary.json of every low-data fold and trainer; write "
                                  "lowdata_results.csv, lowdata_report.md (mean ± sd over repeats, paired pretrained "
                                  "- baseline comparison, missing folds) and lowdata_dice.png.")
    q.add_argument("-d", "--dataset", required=True, help="dataset ID or name")
    q.add_argument("--trainers", nargs="+", default=None,
                   help="trainers (default: those with low-data results in $nnUNet_results)")
    q.add_argument("-c", "--configuration", default="3d_fullres")
    q.add_argument("-p", "--plans", default="nnUNetPlans")
    q.add_argument("--out", default=None, help="output folder (default $nnUNet_results/DatasetXXX/lowdata_report)")
    q.add_argument("--pretrained", default=None,
                   help="pretrained trainer of the comparison (default: T of a pair T, T_scratch; else BSFTrainer)")
    q.add_argument("--baseline", default=None, help="baseline trainer (default: T_scratch; else BSFTrainer_scratch)")
    q.add_argument("--test", choices=["ttest", "wilcoxon"], default="ttest",
                   help="paired test across repeats: paired t-test (default) or Wilcoxon signed-rank")
    q.add_argument("--xscale", choices=["log", "linear"], default="log", help="x axis of the plot (default log)")
    q.set_defaults(func=_report)


def _no_step(args) -> int:
    args._parser.print_help(sys.stderr)
    return 2


def _splits(args) -> int:
    from ..lowdata.splits import create_splits

    create_splits(args.dataset, args.fractions, args.repeats, args.test_fraction, args.seed, args.configuration,
                  args.plans, overwrite=args.overwrite, redraw_test=args.redraw_test_per_repeat)
    return 0


def _run(args) -> int:
    from ..cluster.options import options_from_args
    from ..devices import resolve_device
    from ..lowdata.runner import run_lowdata
    from ..weights.hub import is_hub_spec, resolve_checkpoint
    from ..weights.loader import UNSAFE_PICKLE_ENV

    args.device = resolve_device(args.device, options_from_args(args).executor)
    executor = _executor(args)  # checked before anything is downloaded or run
    weights = args.pretrained_weights
    if weights and is_hub_spec(weights) and not args.dry_run:
        # bsf:NAME / hf://: downloaded once here; the trainers recognise a published file by its place in the cache
        from ..settings import value

        unsafe = value(UNSAFE_PICKLE_ENV)
        weights = resolve_checkpoint(weights, allow_unsafe_pickle=unsafe).path
    run_lowdata(args.dataset, args.trainers, args.configuration, args.plans, folds=args.folds, device=args.device,
                dry_run=args.dry_run, pretrained_weights=weights, stage2=args.stage2,
                pretrain_trainer=args.pretrain_trainer, executor=executor)
    return 0


def _executor(args):
    """None (sequential), or the submitit launcher of --executor local/slurm (submitit and the data checked)."""
    import functools

    from ..cluster.cv import check_preprocessed
    from ..cluster.launch import launch
    from ..cluster.options import import_submitit, options_from_args
    from ..lowdata.common import resolve_dataset

    opts = options_from_args(args)
    if opts.executor == "sequential":
        return None
    import_submitit()
    name = resolve_dataset(args.dataset)
    check_preprocessed(name, args.plans, args.configuration)
    return functools.partial(launch, opts=opts, dataset_name=name, device=args.device)


def _status(args) -> int:
    from ..cluster.status import collect, show
    from ..lowdata.common import resolve_dataset
    from ..lowdata.runner import plan_jobs

    name = resolve_dataset(args.dataset)
    trainers, stage2, pretrain_trainer, weights = _study_of(name, args)
    jobs = plan_jobs(args.dataset, trainers, args.configuration, args.plans, args.folds, "cuda", weights,
                     stage2=stage2, pretrain_trainer=pretrain_trainer)
    show(collect(jobs, name), args.json, tail=args.tail)
    return 0


def _study_of(name: str, args):
    """Trainers, stage-2 mode, stage-2 trainer and weights for `status`: the flags, else what `run` recorded."""
    from ..cluster.registry import Registry
    from ..lowdata.common import finetune_folds, load_layout
    from ..lowdata.report import discover_trainers
    from ..lowdata.runner import is_scratch
    from ..lowdata.stage2 import DEFAULT_MODE, read_modes

    suffix = f"__{args.plans}__{args.configuration}"
    recorded = read_modes(name)
    trainers = args.trainers
    if not trainers:
        folds = [f["fold"] for f in finetune_folds(load_layout(name))]
        jobs = [e for k, e in Registry(name).load().items() if k.split("/")[0].endswith(suffix)]
        stage2_trainers = {e.get("trainer") for e in jobs if e.get("kind") == "pretrain"}
        stage2_trainers |= {e.get("pretrain_trainer") for e in recorded.values()}
        found = discover_trainers(name, args.plans, args.configuration, folds) + [e.get("trainer") for e in jobs]
        found = {t for t in found if t and t not in stage2_trainers}
        # each trainer before its baseline
        trainers = sorted(found, key=lambda t: (t.replace("_scratch", ""), is_scratch(t)))
        trainers = trainers or ["BSFTrainer", "BSFTrainer_scratch"]
    entry = next((recorded[t + suffix] for t in trainers if not is_scratch(t) and t + suffix in recorded), {})
    stage2 = args.stage2 or entry.get("mode") or DEFAULT_MODE
    pretrain_trainer = args.pretrain_trainer or (entry.get("pretrain_trainer") if stage2 == "per-fold" else None)
    return trainers, stage2, pretrain_trainer, entry.get("pretrained_weights")


def _report(args) -> int:
    from ..lowdata.report import build_report

    build_report(args.dataset, args.trainers, args.configuration, args.plans, out_dir=args.out,
                 pretrained=args.pretrained, baseline=args.baseline, test=args.test, xscale=args.xscale)
    return 0
