"""``bsf-nnunet plan``: write and preprocess a BrainSegFounder-like plans file (e.g. BSFPlans)."""
from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser("plan", help="plan + preprocess a BrainSegFounder-like 3d_fullres configuration (-p BSFPlans)",
                       description="Runs nnU-Net's fingerprinting/planning/preprocessing with a fixed spacing and "
                                   "writes a named plans file whose 3d_fullres configuration is a Swin-UNETR one. "
                                   "Then: nnUNetv2_train ID 3d_fullres FOLD -tr BSFTrainer -p BSFPlans")
    p.add_argument("-d", "--dataset", type=int, required=True, help="dataset ID")
    p.add_argument("--variant", default=None, help="toy, tiny, small (default), big, large")
    p.add_argument("--patch", type=int, nargs=3, default=None, metavar=("Z", "Y", "X"),
                   help="patch size (multiples of 32, >= 64; default 128 128 128)")
    p.add_argument("--spacing", type=float, nargs=3, default=None, metavar=("Z", "Y", "X"),
                   help="target spacing in mm (default 1 1 1)")
    p.add_argument("--batch-size", type=int, default=None, help="batch size (default 2; the trainer lowers it "
                                                                  "if it does not fit the device)")
    p.add_argument("--plans-name", default=None, help="plans identifier (default BSFPlans)")
    p.add_argument("--normalization", choices=("zscore", "robust"), default=None,
                   help="intensity normalization of every channel: zscore (nnU-Net's) or robust (z-score with the "
                        "mean and standard deviation of the centre of the head, after clipping to the 0.5-99.5 "
                        "percentiles: for whole-head images whose scalp brightness varies; docs/robustness.md)")
    p.add_argument("-np", "--num-processes", type=int, default=4)
    p.add_argument("--no-preprocess", action="store_true", help="only write the plans file")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..planning.bsf_plans import plan_dataset
    from ..planning.presets import get_variant

    if args.variant:
        get_variant(args.variant)
    plan_dataset(args.dataset, variant=args.variant, patch_size=args.patch, spacing=args.spacing,
                 plans_name=args.plans_name, batch_size=args.batch_size, num_processes=args.num_processes,
                 preprocess=not args.no_preprocess, normalization=args.normalization)
    return 0
