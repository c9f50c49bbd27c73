"""``bsf-nnunet check``: check an nnU-Net raw dataset before ``nnUNetv2_plan_and_preprocess``, the input of
``nnUNetv2_predict`` (``--predict-input``) or the preprocessed cases of a configuration before a long training run
(``--preprocessed``). See docs/troubleshooting.md, "Dataset check"."""
from __future__ import annotations

import os
import re

from ..paths import nnunet_folder
from .main import CLIError

EPILOG = ("Checks dataset.json, the file layout (all channels and a label per case), shapes and affines, NaN/Inf "
          "voxels (which SimpleITK, and so nnU-Net, silently reads as 0), label values, 2D/4D files; warns about "
          "strongly anisotropic spacing and images smaller than 64 voxels. Never writes into the dataset. Exit code: "
          "0 no errors (warnings allowed), 1 errors found, 2 the dataset could not be found.")


def register(sub) -> None:
    p = sub.add_parser("check", help="check a raw dataset before nnUNetv2_plan_and_preprocess",
                       description="Check an nnU-Net raw dataset (DatasetXXX_Name with dataset.json, imagesTr, "
                                   "labelsTr, optional imagesTs) for problems that would break or silently spoil "
                                   "preprocessing and training. " + EPILOG)
    p.add_argument("-d", "--dataset", required=True, metavar="ID_OR_NAME_OR_FOLDER",
                   help="dataset ID (4) or name (Dataset004_Hippocampus), looked up in $nnUNet_raw, or the path "
                        "of a dataset folder")
    p.add_argument("--no-values", action="store_true",
                   help="do not read voxel values (faster: skips the NaN/Inf and label-value checks and the "
                        "detection of truncated files)")
    p.add_argument("-np", "--num-processes", type=int, default=1, dest="num_processes",
                   help="parallel worker processes (default 1)")
    p.add_argument("--predict-input", metavar="FOLDER",
                   help="instead of the dataset, check FOLDER (what you pass to nnUNetv2_predict -i) against the "
                        "channel_names of -d, which may also be a trained model's results folder (it holds "
                        "dataset.json): one file per channel per case, matching shapes/affines, no NaN/Inf")
    p.add_argument("-o", "--output", metavar="FOLDER",
                   help="with --predict-input: also check that the prediction output folder can be written")
    p.add_argument("--preprocessed", action="store_true",
                   help="instead of the raw dataset, check the preprocessed cases of one configuration (-d looked "
                        "up in $nnUNet_preprocessed): read every case's data, seg and properties completely and name "
                        "each missing, truncated or corrupt file, with the command that remakes them")
    p.add_argument("-c", "--configuration", default="3d_fullres",
                   help="with --preprocessed: the configuration (default 3d_fullres)")
    p.add_argument("-p", "--plans", default="nnUNetPlans",
                   help="with --preprocessed: the plans name (default nnUNetPlans)")
    p.set_defaults(func=run)


def resolve_dataset_folder(spec: str, root_var: str = "nnUNet_raw") -> str:
    """The dataset folder that ``-d`` names: an ID or a DatasetXXX_Name in ``$root_var`` (the raw datasets by
    default), or a folder path."""
    spec = spec.strip()
    is_id = spec.isdigit()
    is_name = bool(re.fullmatch(r"Dataset\d{3}_[^/\\]+", spec))
    if not is_id and os.path.isdir(spec):
        return os.path.abspath(spec)
    if not (is_id or is_name):
        raise CLIError(f"{spec} is not a folder (and not a dataset ID such as 4 or a name such as "
                       f"Dataset004_Hippocampus). Pass the path of the dataset folder.")
    raw = nnunet_folder(root_var, instead=f"pass the dataset folder path (-d {spec} is looked up in ${root_var})")
    if not os.path.isdir(raw):
        raise CLIError(f"${root_var} is {raw}, which is not a folder. Fix the environment variable or pass the "
                       f"dataset folder path instead.")
    if is_name:
        path = os.path.join(raw, spec)
        if not os.path.isdir(path):
            raise CLIError(f"there is no dataset {spec} in ${root_var} ({raw}). Check the name, or pass the folder "
                           f"path.")
        return path
    prefix = f"Dataset{int(spec):03d}_"
    hits = sorted(n for n in os.listdir(raw) if n.startswith(prefix) and os.path.isdir(os.path.join(raw, n)))
    if not hits:
        raise CLIError(f"no dataset with ID {int(spec)} ({prefix}*) in ${root_var} ({raw}). Convert the dataset "
                       f"first (bsf-nnunet convert ...; nnUNetv2_plan_and_preprocess for $nnUNet_preprocessed) or "
                       f"pass the folder path.")
    if len(hits) > 1:
        raise CLIError(f"dataset ID {int(spec)} is ambiguous in ${root_var} ({raw}): {', '.join(hits)}. Pass the "
                       f"full name (-d {hits[0]}) and give the other dataset another ID.")
    return os.path.join(raw, hits[0])


def run(args) -> int:
    from ..datasets.check_raw import check_raw_dataset

    if args.num_processes < 1:
        raise CLIError(f"-np must be at least 1, not {args.num_processes}")
    folder = resolve_dataset_folder(args.dataset, "nnUNet_preprocessed" if args.preprocessed else "nnUNet_raw")
    if args.preprocessed:
        from ..datasets.check_preprocessed import check_preprocessed_dataset

        report = check_preprocessed_dataset(folder, args.configuration, args.plans, num_workers=args.num_processes)
        print(report.format())
        return 0 if report.ok else 1
    if args.predict_input:
        from ..datasets.check_predict import check_prediction_input

        report = check_prediction_input(args.predict_input, folder, args.output, check_values=not args.no_values,
                                        num_workers=args.num_processes)
        print(report.format())
        return 0 if report.ok else 1
    report = check_raw_dataset(folder, check_values=not args.no_values, num_workers=args.num_processes)
    print(report.format())
    return 0 if report.ok else 1
