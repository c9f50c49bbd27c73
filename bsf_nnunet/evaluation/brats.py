"""BraTS evaluation: Dice and HD95 of enhancing tumour (ET), tumour core (TC) and whole tumour (WT).

Label conventions (per file, auto-detected unless given):

* ``brats``: 1 NCR, 2 ED, 4 ET -> ET = {4}, TC = {1, 4}, WT = {1, 2, 4};
* ``nnunet``: our BraTS2021 dataset (``bsf-nnunet convert brats2021``): 1 NCR, 2 ED, 3 ET -> ET = {3},
  TC = {1, 3}, WT = {1, 2, 3}. (nnU-Net's own Dataset137 swaps 1 and 2; convert such files first.)

Auto-detection: a file with a 4 is ``brats``, with a 3 ``nnunet``; with only 0/1/2 both read the same.
Empty-mask conventions and the HD95 penalty (373.13 mm): see :mod:`bsf_nnunet.evaluation.metrics`.
"""
from __future__ import annotations

import os
from typing import Dict, Optional

import numpy as np

from .common import CaseError, EvaluationError, check_same_grid, evaluate_folder, load, nifti_files, run_guarded
from .metrics import HD95_PENALTY_MM, dice, hd95

REGIONS = ("ET", "TC", "WT")
METRICS = [f"Dice_{r}" for r in REGIONS] + [f"HD95_{r}" for r in REGIONS]
CONVENTIONS = ("auto", "brats", "nnunet")
_ET = {"brats": 4, "nnunet": 3}


def detect_convention(arr: np.ndarray, path: str, labels: str = "auto") -> str:
    vals = set(int(v) for v in np.unique(arr))
    allowed = {0, 1, 2, 3, 4} if labels == "auto" else {0, 1, 2, _ET[labels]}
    bad = sorted(vals - allowed)
    if bad:
        if labels == "auto":
            raise CaseError(f"{path} has label value(s) {bad}; BraTS files hold 0/1/2/4, nnU-Net BraTS2021 "
                            f"predictions 0/1/2/3")
        raise CaseError(f"{path} has label value(s) {bad}, not possible with --labels {labels} "
                        f"(expected {sorted(allowed)}); use --labels auto")
    if labels != "auto":
        return labels
    if 3 in vals and 4 in vals:
        raise CaseError(f"{path} has both 3 and 4: neither BraTS (0/1/2/4) nor nnU-Net (0/1/2/3) labels")
    return "brats" if 4 in vals else "nnunet"   # only 0/1/2: both conventions agree


def region_masks(arr: np.ndarray, convention: str) -> Dict[str, np.ndarray]:
    et = arr == _ET[convention]
    tc = et | (arr == 1)
    wt = tc | (arr == 2)
    return {"ET": et, "TC": tc, "WT": wt}


def evaluate_case(pred_path: str, gt_path: str, labels: str = "auto") -> dict:
    pred = load(pred_path, "prediction")
    gt = load(gt_path, "ground truth")
    check_same_grid(pred, gt, pred_path, gt_path)
    spacing = gt[1]
    cp = detect_convention(pred[0], pred_path, labels)
    cg = detect_convention(gt[0], gt_path, labels)
    rp, rg = region_masks(pred[0], cp), region_masks(gt[0], cg)
    out = {}
    for r in REGIONS:
        out[f"Dice_{r}"] = dice(rp[r], rg[r])
    for r in REGIONS:
        out[f"HD95_{r}"] = hd95(rp[r], rg[r], spacing)
    for r in REGIONS:
        out[f"voxels_pred_{r}"] = int(np.count_nonzero(rp[r]))
        out[f"voxels_gt_{r}"] = int(np.count_nonzero(rg[r]))
    return out


def _case(job) -> dict:
    case, pred, gt, labels = job
    return {"case": case, **evaluate_case(pred, gt, labels)}


def _job(job) -> dict:
    return run_guarded(_case, job)


def gt_files(gt_dir: str) -> Dict[str, str]:
    """Ground truth: NIfTI files in ``gt_dir`` (e.g. labelsTr), or the BraTS training layout
    ``gt_dir/<case>/<case>_seg.nii.gz``."""
    if not os.path.isdir(gt_dir):
        raise EvaluationError(f"ground-truth folder {gt_dir} does not exist; check the path.")
    gt = nifti_files(gt_dir)
    with os.scandir(gt_dir) as it:
        for e in it:
            if e.is_dir():
                for ext in (".nii.gz", ".nii"):
                    p = os.path.join(e.path, f"{e.name}_seg{ext}")
                    if os.path.isfile(p):
                        gt.setdefault(e.name, p)
                        break
    if not gt:
        raise EvaluationError(f"no ground truth in {gt_dir}: expected label files (<case>.nii.gz, e.g. a "
                              f"labelsTr folder) or BraTS case folders (<case>/<case>_seg.nii.gz).")
    return gt


def evaluate_brats(pred_dir: str, gt_dir: str, labels: str = "auto", output_dir: Optional[str] = None,
                   num_workers: int = 1) -> dict:
    if labels not in CONVENTIONS:
        raise EvaluationError(f"--labels must be one of {CONVENTIONS}, not {labels!r}")
    return evaluate_folder(
        pred_dir, gt_files(gt_dir), _job, METRICS, "brats", output_dir, num_workers, job_args=(labels,),
        extra_summary={"ground_truth_folder": os.path.abspath(gt_dir), "labels": labels, "conventions": {
            "regions": "ET = enhancing tumour; TC = ET + necrotic core; WT = TC + oedema",
            "dice_both_empty": 1.0, "hd95_both_empty": 0.0, "hd95_one_empty_mm": HD95_PENALTY_MM,
            "hd95": "max of the two directed 95th-percentile surface distances, mm from the header spacing"}})
