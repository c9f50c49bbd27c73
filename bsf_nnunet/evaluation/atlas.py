"""ATLAS v2.0 evaluation: Dice, lesion-wise F1, simple lesion count difference and absolute volume difference
(voxels), as in the ATLAS R2.0 challenge. Masks: any non-zero voxel is lesion. Definitions and empty-mask
conventions: :mod:`bsf_nnunet.evaluation.metrics`."""
from __future__ import annotations

import os
from typing import Optional

import numpy as np

from .common import EvaluationError, check_same_grid, evaluate_folder, load, nifti_files, run_guarded
from .metrics import dice, lesion_metrics, volume_difference

METRICS = ["Dice", "lesion_F1", "lesion_count_diff", "volume_diff_voxels"]


def evaluate_case(pred_path: str, gt_path: str) -> dict:
    pred = load(pred_path, "prediction")
    gt = load(gt_path, "ground truth")
    check_same_grid(pred, gt, pred_path, gt_path)
    p, g = pred[0] != 0, gt[0] != 0
    les = lesion_metrics(p, g)
    vd = volume_difference(p, g)
    return {"Dice": dice(p, g), "lesion_F1": les["lesion_f1"], "lesion_count_diff": les["lesion_count_diff"],
            "volume_diff_voxels": vd, "volume_diff_mm3": vd * float(np.prod(gt[1])),
            "n_gt_lesions": les["n_gt_lesions"], "n_pred_lesions": les["n_pred_lesions"], "tp": les["tp"],
            "fp": les["fp"], "fn": les["fn"]}


def _case(job) -> dict:
    case, pred, gt = job
    return {"case": case, **evaluate_case(pred, gt)}


def _job(job) -> dict:
    return run_guarded(_case, job)


def evaluate_atlas(pred_dir: str, gt_dir: str, output_dir: Optional[str] = None, num_workers: int = 1) -> dict:
    if not os.path.isdir(gt_dir):
        raise EvaluationError(f"ground-truth folder {gt_dir} does not exist; check the path.")
    gt = nifti_files(gt_dir)
    if not gt:
        raise EvaluationError(f"no label files (<case>.nii.gz) in {gt_dir}; give e.g. the labelsTr folder of the "
                              f"dataset made by 'bsf-nnunet convert atlas2'.")
    return evaluate_folder(
        pred_dir, gt, _job, METRICS, "atlas", output_dir, num_workers,
        extra_summary={"ground_truth_folder": os.path.abspath(gt_dir), "conventions": {
            "lesions": "connected components, 26-connectivity; GT lesion overlapped by the prediction = TP, "
                       "not overlapped = FN; predicted component overlapping no GT lesion = FP",
            "dice_both_empty": 1.0, "lesion_f1_no_lesions": 1.0}})
