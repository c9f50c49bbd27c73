"""Check an nnU-Net raw dataset folder before ``nnUNetv2_plan_and_preprocess``.

:func:`check_raw_dataset` looks at ``DatasetXXX_Name/`` (``dataset.json``, ``imagesTr/``, ``labelsTr/`` and the
optional ``imagesTs/``) and returns a :class:`CheckReport`: a list of errors (each one paragraph that names the case
and the file and says what to do) and a list of warnings (things that work but may surprise). It never raises for a
bad dataset, and it never writes anything into the dataset folder.

What it checks:

* ``dataset.json``: readable JSON; the keys ``channel_names``, ``labels``, ``numTraining`` and ``file_ending``;
  ``labels`` with ``"background": 0``, integer values (lists of integers for region-based training, which also
  needs ``regions_class_order``), consecutive label values; ``channel_names`` keyed ``"0"`` .. ``"N-1"``;
  ``numTraining`` equal to the number of training cases found (a warning otherwise);
* the file layout: every case has all of its channel files (``<case>_XXXX<file_ending>``) and a label file
  (``labelsTr/<case><file_ending>``), every label has images;
* per case (NIfTI only, read with nibabel one file at a time): readable file, 3D (not 2D, not 4D), the same shape
  and the same affine (tolerance relative to the voxel size) for all channels and the label; with
  ``check_values``: no NaN/Inf voxels (SimpleITK, which nnU-Net uses to read NIfTI, silently reads them as 0),
  integer label values that ``dataset.json`` declares;
* warnings: strongly anisotropic spacing (max/min > 3) and images smaller than 64 voxels on an axis.

Voxel values are read with nibabel on purpose: SimpleITK 2.5 turns NaN/Inf voxels into 0 without a word, so a
check through SimpleITK would pass files that train on garbage.

The parts: :mod:`.check_json` (dataset.json), :mod:`.check_layout` (file names), :mod:`.check_case` (one case's
files, with the affine tolerance of :mod:`.cases`), :mod:`.check_report` (the report and the worker pool).
"""
from __future__ import annotations

import os
from typing import Dict, List, Optional

from .cases import NIFTI_ENDINGS, fmt_shape
from .check_case import CaseTask, check_case
from .check_json import DatasetMeta, check_dataset_json, read_dataset_json
from .check_layout import channel_layout_errors, guess_ending, list_files, scan_images
from .check_report import MAX_EXAMPLES, CheckReport, examples, run_cases

ANISOTROPY_LIMIT = 3.0
SMALL_AXIS = 64


def check_raw_dataset(folder: str, check_values: bool = True, num_workers: int = 1) -> CheckReport:
    """Check the nnU-Net raw dataset in ``folder`` (``DatasetXXX_Name`` with dataset.json, imagesTr, labelsTr and an
    optional imagesTs). Never raises for a bad dataset and never writes into ``folder``; see the module docs."""
    folder = os.path.abspath(os.fspath(folder))
    report = CheckReport(folder=folder, values_checked=check_values)
    try:
        _check(folder, check_values, max(1, int(num_workers)), report)
    except Exception as e:  # a bug here must still give a report, not a traceback
        report.errors.append(f"the check itself failed unexpectedly ({type(e).__name__}: {e}); the problems listed "
                             f"before this one were found before it stopped. Please report this as a bsf-nnunet bug "
                             f"with the folder layout.")
    return report


def _check(folder: str, check_values: bool, num_workers: int, report: CheckReport) -> None:
    if not os.path.isdir(folder):
        report.errors.append(f"{folder} is not a folder. Pass an nnU-Net raw dataset folder (DatasetXXX_Name with "
                             f"dataset.json, imagesTr/ and labelsTr/).")
        return
    data = read_dataset_json(folder, report)
    meta = check_dataset_json(data, report) if data is not None else DatasetMeta()
    has = _subfolders(folder, report)
    try:
        names = [n for sub, present in has.items() if present for n in list_files(os.path.join(folder, sub))]
    except OSError as e:
        report.errors.append(f"cannot list the dataset folder ({e}); check the permissions.")
        return
    ending = _file_ending(meta, names, has, data is not None, report)
    if ending is None:
        return
    train = scan_images(folder, "imagesTr", ending, report) if has["imagesTr"] else {}
    label_files = _scan_labels(folder, ending, report) if has["labelsTr"] else {}
    report.num_training = len(train)
    tasks = _training_tasks(folder, train, label_files, has, names, ending, meta, check_values, report)
    if has["imagesTs"]:
        tasks += _test_tasks(folder, ending, meta, check_values, report)
    _report_geometry(run_cases(tasks, num_workers, report, check_case), report)


def _subfolders(folder: str, report: CheckReport) -> Dict[str, bool]:
    """Which of imagesTr, labelsTr and imagesTs exist; the first two missing are errors."""
    has = {sub: os.path.isdir(os.path.join(folder, sub)) for sub in ("imagesTr", "labelsTr", "imagesTs")}
    for sub in ("imagesTr", "labelsTr"):
        if not has[sub]:
            report.errors.append(f"{sub}: the folder {os.path.join(folder, sub)} is missing. An nnU-Net raw dataset "
                                 f"keeps the training images in imagesTr/<case>_XXXX<file_ending> and their labels "
                                 f"in labelsTr/<case><file_ending>; create it and put the files there.")
    return has


def _file_ending(meta: DatasetMeta, names: List[str], has: Dict[str, bool], have_json: bool,
                 report: CheckReport) -> Optional[str]:
    """dataset.json's file_ending, else the one the files have (a warning); None (an error) when none is usable."""
    if meta.file_ending is not None:
        return meta.file_ending
    ending = guess_ending(names)
    if ending is None:
        if names:
            report.errors.append("no NIfTI files (.nii.gz/.nii) found and dataset.json gives no usable "
                                 "file_ending, so no case could be checked. Fix file_ending in dataset.json.")
        elif has["imagesTr"]:
            report.errors.append("imagesTr: no image files found. Put the training images there as "
                                 "<case>_0000.nii.gz, <case>_0001.nii.gz, ... (one file per channel).")
        return None
    if have_json:
        report.warnings.append(f"dataset.json: file_ending unknown, the files were checked as {ending!r}.")
    return ending


def _scan_labels(folder: str, ending: str, report: CheckReport) -> Dict[str, str]:
    """case -> path of the files in labelsTr; reports the files nnU-Net ignores."""
    label_files: Dict[str, str] = {}
    other = []
    for name in list_files(os.path.join(folder, "labelsTr")):
        if name.endswith(ending):
            label_files[name[:-len(ending)]] = os.path.join(folder, "labelsTr", name)
        else:
            other.append(name)
    if other:
        report.warnings.append(f"labelsTr: {len(other)} file(s) do not end in file_ending {ending!r} and are "
                               f"ignored by nnU-Net (e.g. {', '.join(other[:MAX_EXAMPLES])}).")
    return label_files


def _training_tasks(folder: str, train: Dict[str, Dict[int, str]], label_files: Dict[str, str],
                    has: Dict[str, bool], names: List[str], ending: str, meta: DatasetMeta, check_values: bool,
                    report: CheckReport) -> List[CaseTask]:
    """Reports the layout errors of the training cases (channels, labels, numTraining); returns the per-case checks
    (NIfTI only)."""
    if has["imagesTr"] and not train:
        others = [n for n in names if not n.endswith(ending)]
        hint = (f" (the folders do hold {len(others)} file(s) with another ending, e.g. {others[0]}: is file_ending "
                f"right?)" if others else "")
        report.errors.append(f"imagesTr: no training cases found (files <case>_XXXX{ending}){hint}. Put the training "
                             f"images there, one file per channel.")
    tasks = []
    for case in sorted(train):
        chans = train[case]
        report.errors.extend(channel_layout_errors("imagesTr", case, chans, meta.num_channels, ending, meta))
        lab = label_files.get(case)
        if lab is None and has["labelsTr"]:
            report.errors.append(f"case {case}: the label file labelsTr/{case}{ending} is missing (the case has "
                                 f"images in imagesTr). Every training case needs a label; add it, or move the "
                                 f"case's images to imagesTs (unlabelled/test cases).")
        if ending.lower() in NIFTI_ENDINGS:
            tasks.append(CaseTask(case, "imagesTr",
                                   [(chans[c], f"imagesTr/{os.path.basename(chans[c])}") for c in sorted(chans)],
                                   (lab, f"labelsTr/{case}{ending}") if lab else None,
                                   meta.allowed_labels, check_values))
    for case in sorted(set(label_files) - set(train)):
        report.errors.append(f"case {case}: the label labelsTr/{case}{ending} has no images in imagesTr (expected "
                             f"imagesTr/{case}_0000{ending}, ...). Add the images or remove the label (a case-name "
                             f"typo is common).")
    if meta.num_training is not None and has["imagesTr"] and meta.num_training != len(train):
        report.warnings.append(f"dataset.json: numTraining is {meta.num_training}, but imagesTr holds {len(train)} "
                               f"training case(s). Set numTraining to {len(train)} (nnUNetv2_plan_and_preprocess "
                               f"--verify_dataset_integrity stops on the difference).")
    return tasks


def _test_tasks(folder: str, ending: str, meta: DatasetMeta, check_values: bool, report: CheckReport) -> List[CaseTask]:
    """Reports the channel layout errors of the imagesTs cases; returns their per-case checks (NIfTI only)."""
    test = scan_images(folder, "imagesTs", ending, report)
    report.num_test = len(test)
    tasks = []
    for case in sorted(test):
        chans = test[case]
        report.errors.extend(channel_layout_errors("imagesTs", case, chans, meta.num_channels, ending, meta))
        if ending.lower() in NIFTI_ENDINGS:
            tasks.append(CaseTask(case, "imagesTs",
                                   [(chans[c], f"imagesTs/{os.path.basename(chans[c])}") for c in sorted(chans)],
                                   None, None, check_values))
    return tasks


def _report_geometry(results: list, report: CheckReport) -> None:
    """The per-case errors, and warnings for anisotropic spacing and small images."""
    aniso, small = [], []
    for r in results:
        report.errors.extend(r.errors)
        if r.spacing is not None and min(r.spacing) > 0 and max(r.spacing) / min(r.spacing) > ANISOTROPY_LIMIT:
            aniso.append(f"{r.case} ({'x'.join(f'{s:.3g}' for s in r.spacing)} mm)")
        if r.shape is not None and min(r.shape) < SMALL_AXIS:
            small.append(f"{r.case} ({fmt_shape(r.shape)})")
    if aniso:
        report.warnings.append(f"anisotropic spacing (max/min > {ANISOTROPY_LIMIT:g}) in {len(aniso)} case(s): "
                               f"{examples(aniso)}. This works: nnU-Net resamples (and may plan a lower-resolution "
                               f"or anisotropic setup); just be aware that thick slices limit what the model sees.")
    if small:
        report.warnings.append(f"image smaller than {SMALL_AXIS} voxels on an axis in {len(small)} case(s): "
                               f"{examples(small)}. This works: such images are padded by nnU-Net to the patch "
                               f"(Swin-UNETR patches are at least {SMALL_AXIS} per axis).")
