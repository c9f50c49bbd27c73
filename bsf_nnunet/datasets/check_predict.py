"""Check the input folder of ``nnUNetv2_predict -i`` against the model's dataset.json (:func:`check_prediction_input`):
one file per channel of each case, the per-case checks of :mod:`.check_case`, and a writable output folder."""
from __future__ import annotations

import os
from typing import Optional

from .cases import NIFTI_ENDINGS
from .check_case import CaseTask, check_case
from .check_json import DatasetMeta, check_dataset_json, read_dataset_json
from .check_layout import channel_layout_errors, guess_ending, list_files, scan_images
from .check_report import CheckReport, run_cases


def check_prediction_input(input_folder: str, dataset_folder: str, output_folder: Optional[str] = None,
                           check_values: bool = True, num_workers: int = 1) -> CheckReport:
    """Check the input folder of ``nnUNetv2_predict -i`` against the dataset.json of the model (``dataset_folder``:
    the raw dataset or the trained model's results folder, both hold dataset.json): every case has one file per
    channel of channel_names, shapes and affines agree between a case's channels, no NaN/Inf voxels; and, given
    ``output_folder``, that it can be written. Never raises for bad input and never writes into ``input_folder``."""
    input_folder = os.path.abspath(os.fspath(input_folder))
    report = CheckReport(folder=input_folder, values_checked=check_values, prediction_input=True)
    try:
        data = read_dataset_json(os.path.abspath(os.fspath(dataset_folder)), report)
        meta = check_dataset_json(data, report) if data is not None else DatasetMeta()
        if not os.path.isdir(input_folder):
            report.errors.append(f"{input_folder} is not a folder. nnUNetv2_predict -i takes a folder of "
                                 f"<case>_XXXX<file_ending> files, one per channel.")
            return report
        ending = meta.file_ending or guess_ending(list_files(input_folder)) or ".nii.gz"
        parent, sub = os.path.split(input_folder)
        cases = scan_images(parent, sub, ending, report)
        report.num_test = len(cases)
        if not cases:
            report.errors.append(f"{sub}: no cases found (files <case>_XXXX{ending}). Put one file per channel per "
                                 f"case there, named like imagesTs of an nnU-Net raw dataset.")
        tasks = []
        for case in sorted(cases):
            chans = cases[case]
            report.errors.extend(channel_layout_errors(sub, case, chans, meta.num_channels, ending, meta))
            if ending.lower() in NIFTI_ENDINGS:
                tasks.append(CaseTask(case, sub, [(chans[c], f"{sub}/{os.path.basename(chans[c])}")
                                                   for c in sorted(chans)], None, None, check_values))
        for r in run_cases(tasks, max(1, int(num_workers)), report, check_case):
            report.errors.extend(r.errors)
        if output_folder:
            _check_writable(os.path.abspath(os.fspath(output_folder)), report)
    except Exception as e:
        report.errors.append(f"the check itself failed unexpectedly ({type(e).__name__}: {e}). Please report this as "
                             f"a bsf-nnunet bug.")
    return report


def _check_writable(folder: str, report: CheckReport) -> None:
    probe = folder
    while not os.path.exists(probe):  # the nearest existing parent must let us create the folder
        parent = os.path.dirname(probe)
        if parent == probe:
            break
        probe = parent
    if os.path.exists(probe) and not os.path.isdir(probe):
        report.errors.append(f"output folder {folder}: {probe} exists and is a file, not a folder. Choose another "
                             f"-o for nnUNetv2_predict.")
    elif not os.access(probe, os.W_OK | os.X_OK):
        report.errors.append(f"output folder {folder} is not writable ({probe} does not allow this user to write). "
                             f"Choose another -o for nnUNetv2_predict or fix the permissions.")
