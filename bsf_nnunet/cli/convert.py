"""``bsf-nnunet convert``: public datasets -> nnU-Net v2 raw format (see docs/datasets.md)."""
from __future__ import annotations

import argparse
import os
import sys

EPILOG = ("Output: $nnUNet_raw/DatasetXXX_<name> (or -o FOLDER/DatasetXXX_<name>) with imagesTr, labelsTr, "
          "imagesTs, dataset.json and conversion_report.json. Re-running the same command skips finished cases, so "
          "an interrupted conversion just continues. Exit code: 0 all cases ok, 1 some cases bad (listed), "
          "2 bad input.")


def _workers_default() -> int:
    return max(1, min(8, os.cpu_count() or 1))


def _common(p: argparse.ArgumentParser, dataset: bool = True) -> None:
    from ..datasets.cases import AFFINE_RTOL

    if dataset:
        p.add_argument("-d", "--dataset-id", type=int, required=True, help="nnU-Net dataset ID (1..999)")
        p.add_argument("-o", "--out", default=None,
                       help="nnU-Net raw folder to write into (default: $nnUNet_raw)")
        p.add_argument("--name", default=None, help="dataset name (folder DatasetXXX_<name>)")
        p.add_argument("--link", nargs="?", const="auto", default=None, choices=["auto", "hard", "symlink"],
                       help="link the images instead of copying them: hard link where possible, else symlink "
                            "(auto, the default with --link), or force one kind. Labels that need changing are "
                            "always written")
        p.add_argument("--dry-run", action="store_true", help="list what would be done; write nothing")
        p.add_argument("--affine-tol", type=float, default=AFFINE_RTOL,
                       help="largest allowed difference between the affines of a case's files, as a fraction of "
                            f"the smallest voxel size (default {AFFINE_RTOL:g}, the tolerance of bsf-nnunet check)")
    p.add_argument("-j", "--num-workers", type=int, default=_workers_default(),
                   help="parallel worker processes (default: CPU count, at most 8)")


def register(sub) -> None:
    p = sub.add_parser("convert", help="convert BraTS 2021, ATLAS v2.0, UK Biobank or an unlabelled image "
                                       "collection into nnU-Net raw format",
                       description="Convert a public dataset into nnU-Net v2 raw format. " + EPILOG)
    p.set_defaults(func=_no_target, _parser=p)
    sp = p.add_subparsers(dest="step", metavar="DATASET")

    q = sp.add_parser("brats2021", help="BraTS 2021 training/validation data",
                      description="SRC/BraTS2021_00000/BraTS2021_00000_{flair,t1,t1ce,t2,seg}.nii.gz -> channels "
                                  "FLAIR, T1ce, T1, T2; labels 0/1/2/4 -> 0/1/2/3 with regions whole tumour, tumour "
                                  "core, enhancing tumour. Cases without seg (validation data) go to imagesTs. "
                                  + EPILOG)
    q.add_argument("src", metavar="SRC", help="folder with the BraTS2021_XXXXX case folders")
    q.add_argument("--split", choices=["auto", "train", "test"], default="auto",
                   help="auto (default): cases with a seg file -> imagesTr/labelsTr, without -> imagesTs; "
                        "train: a missing seg is an error; test: everything -> imagesTs")
    _common(q)
    q.set_defaults(func=run_brats2021)

    q = sp.add_parser("brats2021-back", help="nnU-Net predictions (0/1/2/3) -> BraTS labels (0/1/2/4)",
                      description="Maps every NIfTI file in PRED from our BraTS2021 labels (1 NCR, 2 ED, 3 ET) to "
                                  "the BraTS convention (1, 2, 4) for submission; same names and geometry.")
    q.add_argument("pred", metavar="PRED", help="folder written by nnUNetv2_predict")
    q.add_argument("out", metavar="OUT", help="output folder (created)")
    _common(q, dataset=False)
    q.set_defaults(func=run_brats2021_back)

    q = sp.add_parser("atlas2", help="ATLAS v2.0 stroke lesions (T1w)",
                      description="Finds .../sub-*/ses-*/anat/*_T1w.nii.gz and *_label-L_desc-T1lesion_mask.nii.gz "
                                  "recursively under SRC -> one channel (T1), label 1 = lesion (mask > 0). T1w "
                                  "images without a mask (test release) go to imagesTs. " + EPILOG)
    q.add_argument("src", metavar="SRC", help="ATLAS R2.0 folder (e.g. ATLAS_2 or ATLAS_2/Training)")
    q.add_argument("--split", choices=["auto", "train", "test"], default="auto",
                   help="auto (default): with mask -> training, without -> imagesTs")
    _common(q)
    q.set_defaults(func=run_atlas2)

    q = sp.add_parser("ukb", help="UK Biobank T1 + T2 FLAIR (unlabelled, for pretraining)",
                      description="SRC/<eid>_20252_2_0/T1/T1_brain_to_MNI.nii.gz and "
                                  "SRC/<eid>_20253_2_0/T2_FLAIR/T2_FLAIR_brain_to_MNI.nii.gz -> channels T1, FLAIR; "
                                  "label 1 = non-zero (brain) mask. Subjects lacking one image are skipped and "
                                  "listed. " + EPILOG)
    q.add_argument("src", metavar="SRC", help="folder with the unzipped bulk folders")
    _common(q)
    q.set_defaults(func=run_ukb)

    q = sp.add_parser("unlabeled", help="any folder of unlabelled images (label = non-zero mask)",
                      description="One subfolder per subject holding one file per channel whose name contains the "
                                  "channel name (case-insensitive), or files named by --pattern. The label is the "
                                  "non-zero (brain) mask (label 1 'brain'), so nnUNetv2_plan_and_preprocess runs "
                                  "on the dataset. Subjects missing a channel are skipped and listed. " + EPILOG)
    q.add_argument("src", metavar="SRC", help="image folder")
    q.add_argument("--channels", nargs="+", required=True, metavar="NAME",
                   help="channel names in order, e.g. --channels T1 FLAIR")
    q.add_argument("--pattern", default=None,
                   help="path pattern relative to SRC with {subject} and {channel} (and * wildcards), e.g. "
                        "'{subject}_{channel}.nii.gz' or '{subject}/anat/*_{channel}.nii.gz'")
    _common(q)
    q.set_defaults(func=run_unlabeled)


def _no_target(args) -> int:
    args._parser.print_help(sys.stderr)
    return 2


def _conv_kwargs(args) -> dict:
    return dict(link=args.link, num_workers=args.num_workers, dry_run=args.dry_run, affine_tol=args.affine_tol,
                name=args.name)


def _rc(report: dict) -> int:
    return 1 if report["counts"]["bad"] else 0


def run_brats2021(args) -> int:
    from ..datasets.brats import convert_brats2021
    return _rc(convert_brats2021(args.src, args.dataset_id, args.out, split=args.split, **_conv_kwargs(args)))


def run_brats2021_back(args) -> int:
    from ..datasets.brats import convert_predictions_back
    res = convert_predictions_back(args.pred, args.out, num_workers=args.num_workers)
    return 1 if res["bad"] else 0


def run_atlas2(args) -> int:
    from ..datasets.atlas import convert_atlas2
    return _rc(convert_atlas2(args.src, args.dataset_id, args.out, split=args.split, **_conv_kwargs(args)))


def run_ukb(args) -> int:
    from ..datasets.ukb import convert_ukb
    return _rc(convert_ukb(args.src, args.dataset_id, args.out, **_conv_kwargs(args)))


def run_unlabeled(args) -> int:
    from ..datasets.unlabeled import convert_unlabeled
    return _rc(convert_unlabeled(args.src, args.dataset_id, args.channels, args.out, pattern=args.pattern,
                                 **_conv_kwargs(args)))
