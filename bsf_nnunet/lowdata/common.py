"""Shared pieces of the low-data study: dataset and folder resolution, the layout file.

The layout of a study lives next to nnU-Net's ``splits_final.json`` in ``lowdata.json``; the training runs are plain
``nnUNetv2_train`` calls, so nothing here imports ``bsf_nnunet.training``.
"""
from __future__ import annotations

import json
import os
from typing import List, Optional

from ..paths import NNUNET_FOLDERS, nnunet_folder

LAYOUT_FILE = "lowdata.json"
SPLITS_FILE = "splits_final.json"


def resolve_dataset(dataset) -> str:
    """DatasetXXX_Name from an ID or a name, exactly like nnU-Net (errors as ValueError with the fix)."""
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name

    try:
        return str(maybe_convert_to_dataset_name(str(dataset)))
    except ValueError as e:
        raise ValueError(f"Dataset {dataset!r} is neither an integer ID nor a name starting with 'Dataset'. Give -d "
                         f"as an ID (e.g. 4) or a full name (e.g. Dataset004_Hippocampus).") from e
    except RuntimeError as e:
        where = ", ".join(f"{k}={nnunet_folder(k, required=False)}" for k in NNUNET_FOLDERS)
        raise ValueError(
            f"Could not resolve dataset {dataset!r}: {' '.join(str(e).split())} Check the ID, that the dataset "
            f"exists in one of these folders ({where}) and that "
            f"exactly one folder name starts with Dataset{int(dataset) if str(dataset).isdigit() else dataset}_."
        ) from e


def raw_dataset_dir(dataset_name: str):
    """``$nnUNet_raw/<dataset>``, or None when nnUNet_raw is not set (the raw data is optional to these tools)."""
    root = nnunet_folder("nnUNet_raw", required=False)
    return os.path.join(root, dataset_name) if root else None


def preprocessed_dir(dataset_name: str) -> str:
    return os.path.join(nnunet_folder("nnUNet_preprocessed"), dataset_name)


def results_dir(dataset_name: str) -> str:
    return os.path.join(nnunet_folder("nnUNet_results"), dataset_name)


def fold_dir(dataset_name: str, trainer: str, plans: str, configuration: str, fold: int) -> str:
    """nnU-Net's output folder of one training: <results>/<dataset>/<trainer>__<plans>__<configuration>/fold_<F>."""
    from nnunetv2.utilities.file_path_utilities import get_output_folder

    nnunet_folder("nnUNet_results")  # unset: our ConfigurationError with the fix (nnU-Net: RuntimeError)
    return get_output_folder(dataset_name, trainer, plans, configuration, fold)


def read_json(path: str, what: str):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{what} {path} is not valid JSON ({e}). Restore it from a backup or delete it and "
                         f"re-create it.") from e


def load_layout(dataset_name: str) -> dict:
    """The study layout (``lowdata.json``), checked against ``splits_final.json`` (which nnU-Net trains from)."""
    pre = preprocessed_dir(dataset_name)
    path = os.path.join(pre, LAYOUT_FILE)
    if not os.path.isfile(path):
        raise ValueError(f"No low-data layout for {dataset_name}: {path} does not exist. Create the folds first with "
                         f"`bsf-nnunet lowdata splits -d {dataset_name}`.")
    layout = read_json(path, "low-data layout")
    if not isinstance(layout, dict) or "folds" not in layout or "test" not in layout:
        raise ValueError(f"{path} is not a low-data layout written by `bsf-nnunet lowdata splits`. Re-create it with "
                         f"`bsf-nnunet lowdata splits -d {dataset_name} --overwrite`.")
    splits_path = os.path.join(pre, SPLITS_FILE)
    if not os.path.isfile(splits_path):
        raise ValueError(f"{splits_path} is missing although {path} exists, so nnU-Net would not train the low-data "
                         f"folds. Re-create them with `bsf-nnunet lowdata splits -d {dataset_name}` (same settings).")
    splits = read_json(splits_path, "nnU-Net split file")
    for fd in layout["folds"]:
        f = fd["fold"]
        if (f >= len(splits) or sorted(splits[f].get("train", [])) != sorted(fd["train"])
                or sorted(splits[f].get("val", [])) != sorted(fold_test(layout, fd))):
            raise ValueError(f"Fold {f} of {splits_path} differs from the low-data layout in {path} (the split file "
                             f"was edited or replaced). Re-create the folds with `bsf-nnunet lowdata splits -d "
                             f"{dataset_name} --overwrite` (results of old low-data folds no longer match then).")
    return layout


def fold_test(layout: dict, fold: dict) -> List[str]:
    """The test cases (nnU-Net's 'val') of a low-data fold: its own when the layout redraws them per repeat."""
    return list(fold["test"]) if fold.get("test") is not None else list(layout["test"])


def finetune_folds(layout: dict) -> List[dict]:
    return [f for f in layout["folds"] if f.get("role", "finetune") == "finetune"]


def select_folds(layout: dict, folds: Optional[List[int]], dataset_name: str) -> List[dict]:
    """The fine-tuning folds of the layout, or the requested subset (unknown fold numbers are an error)."""
    all_ft = finetune_folds(layout)
    if not folds:
        return all_ft
    by_fold = {f["fold"]: f for f in all_ft}
    bad = [f for f in folds if f not in by_fold]
    if bad:
        raise ValueError(f"Fold(s) {bad} are not low-data fine-tuning folds of {dataset_name}; they are "
                         f"{_ranges(sorted(by_fold))} (see {LAYOUT_FILE} or `bsf-nnunet lowdata splits`).")
    return [by_fold[f] for f in sorted(set(folds))]


def _ranges(nums: List[int]) -> str:
    if not nums:
        return "none"
    out, start, prev = [], nums[0], nums[0]
    for n in nums[1:] + [None]:
        if n is not None and n == prev + 1:
            prev = n
            continue
        out.append(str(start) if start == prev else f"{start}-{prev}")
        if n is not None:
            start = prev = n
    return ", ".join(out)


def fmt_fraction(fr: float) -> str:
    pct = fr * 100
    return f"{pct:g}%"
