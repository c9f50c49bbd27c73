"""``bsf-nnunet evaluate``: challenge metrics for BraTS and ATLAS v2.0 predictions (see docs/datasets.md)."""
from __future__ import annotations

import os
import sys

EPILOG = ("Cases are matched by file name (PRED/<case>.nii.gz <-> GT/<case>.nii.gz). Writes <task>_metrics.csv "
          "(per case) and <task>_summary.json (means, missing predictions, failures) into -o (default PRED). Exit "
          "code: 0 ok, 1 some predictions missing or cases failed (listed), 2 bad input.")


def _common(p) -> None:
    p.add_argument("pred", metavar="PRED", help="folder with the predicted label maps")
    p.add_argument("gt", metavar="GT", help="folder with the ground-truth label maps")
    p.add_argument("-o", "--output-dir", default=None, help="where to write the CSV and JSON (default PRED)")
    p.add_argument("-j", "--num-workers", type=int, default=max(1, min(8, os.cpu_count() or 1)),
                   help="parallel worker processes")


def register(sub) -> None:
    p = sub.add_parser("evaluate", help="BraTS / ATLAS v2.0 challenge metrics of a prediction folder",
                       description="Challenge metrics of a folder of predictions. " + EPILOG)
    p.set_defaults(func=_no_target, _parser=p)
    sp = p.add_subparsers(dest="step", metavar="TASK")
    q = sp.add_parser("brats", help="Dice and HD95 of ET, TC, WT",
                      description="Dice and 95% Hausdorff distance (mm) of enhancing tumour, tumour core and whole "
                                  "tumour. Both empty: Dice 1, HD95 0; one empty: Dice 0, HD95 373.13 mm (the "
                                  "BraTS penalty). GT may also be a BraTS training folder (<case>/<case>_seg). "
                                  + EPILOG)
    _common(q)
    q.add_argument("--labels", choices=["auto", "brats", "nnunet"], default="auto",
                   help="label convention of the files: brats 0/1/2/4, nnunet 0/1/2/3 (our BraTS2021 dataset), "
                        "auto (default): per file, 4 -> brats, 3 -> nnunet")
    q.set_defaults(func=run_brats)
    q = sp.add_parser("atlas", help="Dice, lesion-wise F1, lesion count and volume difference",
                      description="ATLAS v2.0 metrics: Dice, lesion-wise F1 (26-connected components; a GT lesion "
                                  "overlapped by the prediction is detected, a predicted component overlapping no "
                                  "GT lesion is a false positive), simple lesion count difference, absolute volume "
                                  "difference (voxels). " + EPILOG)
    _common(q)
    q.set_defaults(func=run_atlas)


def _no_target(args) -> int:
    args._parser.print_help(sys.stderr)
    return 2


def _rc(summary: dict) -> int:
    return 1 if summary["missing_predictions"] or summary["failed"] else 0


def run_brats(args) -> int:
    from ..evaluation.brats import evaluate_brats
    return _rc(evaluate_brats(args.pred, args.gt, labels=args.labels, output_dir=args.output_dir,
                              num_workers=args.num_workers))


def run_atlas(args) -> int:
    from ..evaluation.atlas import evaluate_atlas
    return _rc(evaluate_atlas(args.pred, args.gt, output_dir=args.output_dir, num_workers=args.num_workers))
