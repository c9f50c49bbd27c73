"""The per-case part of the raw-dataset and prediction-input checks (run in worker processes when num_workers > 1):
every file of a case readable, 3D, on the same grid as the case's first channel (shape, and the affine within the
shared tolerance of :mod:`.cases`), no NaN/Inf voxels, and label values that dataset.json declares."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import List, Optional, Tuple

import numpy as np

from .cases import (
    AFFINE_RTOL,
    affine_mismatch,
    count_nonfinite,
    diagnose_unreadable,
    fmt_shape,
    load_nifti,
    nonfinite_finding,
    read_voxels,
    voxel_sizes,
)
from .check_report import MAX_EXAMPLES


@dataclass
class CaseTask:
    case: str
    sub: str  # imagesTr or imagesTs
    images: List[Tuple[str, str]]  # (absolute path, path relative to the dataset folder)
    label: Optional[Tuple[str, str]]
    allowed_labels: Optional[List[int]]
    check_values: bool


@dataclass
class CaseResult:
    case: str
    sub: str
    errors: List[str] = field(default_factory=list)
    spacing: Optional[Tuple[float, ...]] = None
    shape: Optional[Tuple[int, ...]] = None
    flat_reported: bool = False  # the 2D error is given once per case, not once per file


def _load(path: str, rel: str, case: str, errors: List[str]):
    if os.path.islink(path) and not os.path.exists(path):
        errors.append(f"case {case}: {rel} is a symbolic link to {os.readlink(path)}, which does not exist (source "
                      f"moved or deleted, or a relative link broken by moving the dataset). Restore the source or "
                      f"rerun the converter (without --link it copies the files).")
        return None
    try:
        return load_nifti(path)
    except Exception as e:  # any reader failure is a bad file
        errors.append(_unreadable(e, path, rel, case, "cannot read"))
        return None


def _voxels(img, rel: str, case: str, errors: List[str]) -> Optional[np.ndarray]:
    try:
        return read_voxels(img)
    except Exception as e:  # truncated gzip, short file, ...
        errors.append(_unreadable(e, img.get_filename() or rel, rel, case, "cannot read the voxels of"))
        return None


def _unreadable(e: Exception, path: str, rel: str, case: str, verb: str) -> str:
    """The error for a file nibabel cannot read: what is wrong with it (an HTML page, cut short, ...) and the fix."""
    wrong, todo = diagnose_unreadable(path, e)
    return (f"case {case}: {verb} {rel}: the file {wrong.replace(path, rel)}. Fix: {todo}, or rerun the converter; "
            f"or remove the case's files to leave it out.")


def _nonfinite_error(case: str, rel: str, bad: int, size: int) -> str:
    effect = ("training would see wrong labels" if rel.startswith("labelsTr") else
              "prediction would see wrong intensities" if rel.startswith("imagesTs") else
              "training would see wrong intensities")
    return (f"{nonfinite_finding(case, rel, bad, size)}. SimpleITK, which nnU-Net uses to read "
            f"NIfTI, would silently read them as 0, so {effect} without any error. Fix: "
            f"replace them and re-save (e.g. img = nibabel.load(f); nibabel.save(nibabel.Nifti1Image("
            f"np.nan_to_num(img.get_fdata(), nan=0, posinf=0, neginf=0), img.affine, img.header), f)), or rerun "
            f"the converter (bsf-nnunet convert refuses such files), or leave the case out.")


def _geometry(img, rel: str, case: str, sub: str, res: CaseResult) -> bool:
    """Dimensionality checks of one file; False when the file cannot be compared further."""
    errors = res.errors
    shape = tuple(int(s) for s in img.shape)
    if len(shape) > 3:
        if any(s > 1 for s in shape[3:]):
            errors.append(f"case {case}: {rel} is a 4D file (shape {fmt_shape(shape)}) with {int(np.prod(shape[3:]))}"
                          f" volumes inside. nnU-Net wants one 3D file per channel: split it into {case}_0000, "
                          f"{case}_0001, ... (one per volume, each listed in dataset.json channel_names)"
                          + (" - a label must be a single 3D volume" if sub == "labelsTr" else "") + ".")
        else:
            errors.append(f"case {case}: {rel} has shape {fmt_shape(shape)}, i.e. extra singleton axes after the "
                          f"third. nnU-Net reads such files as 4D; drop the extra axes (np.squeeze) and save it as a "
                          f"3D file.")
        return False
    spatial = shape + (1,) * (3 - len(shape))
    if sum(s > 1 for s in spatial) < 3:
        if res.flat_reported:
            return False
        res.flat_reported = True
        errors.append(f"case {case}: {rel} is 2D (shape {fmt_shape(shape)}), but BrainSegFounder's Swin-UNETR is a "
                      f"3D network and needs 3D volumes. For 2D data use nnU-Net's 2d configuration with a stock "
                      f"trainer instead (nnUNetv2_plan_and_preprocess -d ID -c 2d; nnUNetv2_train ID 2d FOLD), not "
                      f"a BSFTrainer.")
        return False
    aff = np.asarray(img.affine, dtype=float)
    zooms = voxel_sizes(aff)
    if not np.all(np.isfinite(aff)) or not np.all(zooms > 0):
        errors.append(f"case {case}: {rel} has an invalid affine (voxel sizes {np.round(zooms, 4).tolist()}, "
                      f"non-finite or zero). Fix the header (set the voxel spacing and orientation), e.g. by "
                      f"re-saving it with the affine of a correct file of the same scan.")
        return False
    return True


def _compare(img, ref, rel: str, ref_rel: str, case: str, errors: List[str]) -> None:
    if tuple(img.shape) != tuple(ref.shape):
        errors.append(f"case {case}: shape mismatch: {rel} is {fmt_shape(img.shape)} but {ref_rel} is "
                      f"{fmt_shape(ref.shape)}. All channels and the label of a case must be on the same voxel "
                      f"grid; resample/crop them onto one grid (e.g. the first channel's) or leave the case out.")
        return
    mismatch = affine_mismatch(img.affine, ref.affine)
    if mismatch is not None:
        d, tol = mismatch
        sa = np.round(voxel_sizes(img.affine), 4).tolist()
        sb = np.round(voxel_sizes(ref.affine), 4).tolist()
        spacing = (f"voxel spacing {sa} vs {sb}" if not np.allclose(sa, sb, rtol=0, atol=tol)
                   else f"same spacing {sb}, different origin/orientation")
        errors.append(f"case {case}: affine mismatch: {rel} and {ref_rel} have different affines (largest "
                      f"difference {d:.4g}, tolerance {tol:.3g} = {AFFINE_RTOL:g} x voxel size; {spacing}). The "
                      f"files are not on the same grid: register/resample them onto one grid. If the difference "
                      f"is only header rounding, re-save {rel} with the affine and header of {ref_rel}.")


def check_case(task: CaseTask) -> CaseResult:
    res = CaseResult(task.case, task.sub)
    try:
        _check_case_inner(task, res)
    except Exception as e:  # the checker must never crash on a bad case
        res.errors.append(f"case {task.case}: the check failed unexpectedly ({type(e).__name__}: {e}). Inspect the "
                          f"case's files ({', '.join(r for _, r in task.images)}) by hand.")
    return res


def _check_case_inner(task: CaseTask, res: CaseResult) -> None:
    errors = res.errors
    ref = None  # (img, rel) of the first good image
    for path, rel in task.images:
        img = _load(path, rel, task.case, errors)
        if img is None or not _geometry(img, rel, task.case, task.sub, res):
            continue
        if ref is None:
            ref = (img, rel)
            res.spacing = tuple(float(z) for z in voxel_sizes(img.affine))
            res.shape = tuple(int(s) for s in img.shape[:3])
        else:
            _compare(img, ref[0], rel, ref[1], task.case, errors)
        if task.check_values:
            arr = _voxels(img, rel, task.case, errors)
            if arr is not None:
                bad = count_nonfinite(arr)
                if bad:
                    errors.append(_nonfinite_error(task.case, rel, bad, arr.size))
            del arr
    if task.label is None:
        return
    path, rel = task.label
    img = _load(path, rel, task.case, errors)
    if img is None or not _geometry(img, rel, task.case, "labelsTr", res):
        return
    if ref is not None:
        _compare(img, ref[0], rel, ref[1], task.case, errors)
    if not task.check_values:
        return
    arr = _voxels(img, rel, task.case, errors)
    if arr is None:
        return
    bad = count_nonfinite(arr)
    if bad:
        errors.append(_nonfinite_error(task.case, rel, bad, arr.size))
        arr = arr[np.isfinite(arr)]
    vals = np.unique(arr)
    del arr
    if vals.dtype.kind in "fc":
        frac = vals[vals != np.round(vals)]
        if frac.size:
            ex = ", ".join(f"{float(np.real(v)):g}" for v in frac[:MAX_EXAMPLES])
            errors.append(f"case {task.case}: label {rel} has non-integer values ({frac.size} distinct, e.g. {ex}). "
                          f"Labels must be integers: this usually means the label was resampled with linear "
                          f"interpolation or saved as a probability map. Redo it with nearest-neighbour "
                          f"interpolation (or round/threshold it) and save it with an integer data type.")
            vals = vals[vals == np.round(vals)]
    if task.allowed_labels is not None and vals.size:
        allowed = set(task.allowed_labels)
        extra = [v for v in (int(np.real(x)) for x in vals) if v not in allowed]
        if extra:
            shown = ", ".join(str(v) for v in extra[:20]) + (", ..." if len(extra) > 20 else "")
            errors.append(f"case {task.case}: label {rel} has value(s) {shown} that dataset.json labels does not "
                          f"declare (declared: {sorted(allowed)}). Fix the label file (e.g. map the values onto the "
                          f"declared ones) or add the labels to dataset.json.")
