"""ATLAS v2.0 (Anatomical Tracings of Lesions After Stroke, R2.0) -> nnU-Net v2 raw format.

Input: the BIDS-like release, searched recursively (e.g. ``ATLAS_2/Training/R001/...``)::

    .../sub-r001s001/ses-1/anat/sub-r001s001_ses-1_space-MNI152NLin2009aSym_T1w.nii.gz
    .../sub-r001s001/ses-1/anat/sub-r001s001_ses-1_space-MNI152NLin2009aSym_label-L_desc-T1lesion_mask.nii.gz

Output ``$nnUNet_raw/DatasetXXX_ATLAS2``: one channel (0 T1), label 1 = lesion (mask > 0). Case identifier
``sub-r001s001_ses-1``. T1w images without a lesion mask (the test release) go to imagesTs.
"""
from __future__ import annotations

import dataclasses
import os
import re
from typing import Iterator, Optional

from .convert import CaseSpec, ConversionError, DatasetInfo, nifti_stem, require_dir, walk_dirs
from .convert_run import run_conversion

DATASET_INFO = DatasetInfo(
    name="ATLAS2", channel_names=["T1"], labels={"background": 0, "lesion": 1},
    extra={"description": "ATLAS R2.0 stroke lesions on T1w MRI (MNI152NLin2009aSym); label 1 = lesion.",
           "reference": "Liew et al., Sci Data 2022; https://atlas.grand-challenge.org",
           "licence": "see the ATLAS R2.0 data use agreement"})

_T1 = re.compile(r"^(?P<prefix>.+?)_T1w$")
_ENT = re.compile(r"(?:^|_)(sub|ses)-([A-Za-z0-9]+)")


def case_id_from_name(prefix: str) -> str:
    """``sub-r001s001_ses-1_space-MNI...`` -> ``sub-r001s001_ses-1`` (the BIDS subject and session); other names
    are kept (the conversion makes them safe, :func:`~bsf_nnunet.datasets.convert.safe_case_id`)."""
    ents = _ENT.findall(prefix)
    if ents and ents[0][0] == "sub":
        return "_".join(f"{k}-{v}" for k, v in ents)
    return prefix


def iter_cases(src: str, split: str = "auto") -> Iterator[CaseSpec]:
    if split not in ("auto", "train", "test"):
        raise ConversionError(f"split must be auto, train or test, not {split!r}")
    src = require_dir(src, "ATLAS source folder")
    for dirpath, _dirs, files in walk_dirs(src):
        for n in files:
            stem = nifti_stem(n)
            m = _T1.match(stem) if stem else None
            if not m:
                continue
            prefix = m.group("prefix")
            # the mask: same subject/session prefix (up to the space- entity), '..._desc-T1lesion_mask'
            base = prefix.split("_space-")[0]
            masks = [f for f in files if f != n and f.startswith(base) and (nifti_stem(f) or "").endswith("_mask")
                     and "lesion" in f.lower()]
            problem, hint = None, ""
            if len(masks) > 1:
                problem = f"several lesion masks for {n}: {masks}"
                hint = "keep one lesion mask per T1w image"
            label = os.path.join(dirpath, masks[0]) if masks else None
            if split == "test" or (split == "auto" and label is None):
                spl, label = "Ts", None
            else:
                spl = "Tr"
                if label is None and not problem:
                    problem = f"no lesion mask (..._label-L_desc-T1lesion_mask.nii.gz) next to {n} in {dirpath}"
                    hint = "add it, or convert with --split auto/test to put the case into imagesTs"
            yield CaseSpec(case_id=case_id_from_name(prefix), images=[os.path.join(dirpath, n)], label=label,
                           split=spl, label_mode="binarize", problem=problem, hint=hint,
                           source=os.path.join(dirpath, n))


def convert_atlas2(src: str, dataset_id: int, raw_root: Optional[str] = None, *, split: str = "auto",
                   name: Optional[str] = None, **kw) -> dict:
    info = dataclasses.replace(DATASET_INFO, name=name) if name else DATASET_INFO
    return run_conversion(iter_cases(src, split), info, dataset_id, raw_root, source=os.path.abspath(src),
                          converter="atlas2", **kw)
