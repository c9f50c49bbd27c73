"""The dataset checks of ``bsf-nnunet check``, under one public name (documented in docs/troubleshooting.md as
``bsf_nnunet.datasets.check.check_raw_dataset``).

This module only re-exports; the checks live in one module each, sharing one case reader and one affine tolerance
(:mod:`.cases`):

* :mod:`.check_raw`: an nnU-Net raw dataset before ``nnUNetv2_plan_and_preprocess`` (:func:`check_raw_dataset`),
  built from :mod:`.check_json` (dataset.json), :mod:`.check_layout` (file names) and :mod:`.check_case` (one
  case's files);
* :mod:`.check_predict`: the input folder of ``nnUNetv2_predict`` (:func:`check_prediction_input`);
* :mod:`.check_preprocessed`: nnU-Net's preprocessed data (:func:`check_preprocessed_dataset`).

Code inside bsf_nnunet imports from those modules directly.
"""
from __future__ import annotations

from .cases import AFFINE_RTOL, NIFTI_ENDINGS, count_nonfinite_voxels, nonfinite_finding
from .check_json import REQUIRED_KEYS
from .check_layout import channel_file_errors, parse_channel_file
from .check_predict import check_prediction_input
from .check_preprocessed import (
                                 PreprocessedFolder,
                                 check_preprocessed_dataset,
                                 describe_preprocessed_folder,
                                 preprocessed_case_error,
                                 preprocessed_case_problems,
)
from .check_raw import ANISOTROPY_LIMIT, SMALL_AXIS, check_raw_dataset
from .check_report import MAX_EXAMPLES, CheckReport

__all__ = [
    "AFFINE_RTOL", "ANISOTROPY_LIMIT", "MAX_EXAMPLES", "NIFTI_ENDINGS", "REQUIRED_KEYS", "SMALL_AXIS",
    "CheckReport", "PreprocessedFolder",
    "channel_file_errors", "check_prediction_input", "check_preprocessed_dataset", "check_raw_dataset",
    "count_nonfinite_voxels", "describe_preprocessed_folder", "nonfinite_finding", "parse_channel_file",
    "preprocessed_case_error", "preprocessed_case_problems",
]
