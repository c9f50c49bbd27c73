"""UK Biobank brain MRI (bulk fields 20252 T1 and 20253 T2 FLAIR, unzipped) -> unlabelled nnU-Net v2 dataset.

Input (searched recursively; the unzipped bulk downloads)::

    SRC/<eid>_20252_2_0/T1/T1_brain_to_MNI.nii.gz
    SRC/<eid>_20253_2_0/T2_FLAIR/T2_FLAIR_brain_to_MNI.nii.gz

Output ``$nnUNet_raw/DatasetXXX_UKB``: channels 0 T1, 1 FLAIR (both skull-stripped, in MNI space), case
identifier ``<eid>_<instance>_<array>`` (e.g. ``1000001_2_0``), label 1 = non-zero (brain) mask, for
self-supervised pretraining. Subjects without both images are listed and skipped.
"""
from __future__ import annotations

import os
import re
from typing import Dict, Iterator, Optional, Tuple

from .convert import CaseSpec, ConversionError, require_dir, walk_dirs
from .unlabeled import convert_subjects, dataset_info, subject_spec

CHANNELS = ["T1", "FLAIR"]
FIELDS = {"20252": ("T1", os.path.join("T1", "T1_brain_to_MNI.nii.gz")),
          "20253": ("FLAIR", os.path.join("T2_FLAIR", "T2_FLAIR_brain_to_MNI.nii.gz"))}
_DIR = re.compile(r"^(?P<eid>\d+)_(?P<field>20252|20253)_(?P<inst>\d+)_(?P<arr>\d+)$")
_ZIP = re.compile(r"^\d+_(20252|20253)_\d+_\d+\.zip$")


def iter_subjects(src: str) -> Iterator[CaseSpec]:
    src = require_dir(src, "UK Biobank source folder")
    pending: Dict[Tuple[str, str, str], Dict[str, list]] = {}
    notes: Dict[Tuple[str, str, str], list] = {}
    n_dirs = n_zips = 0
    for dirpath, dirs, files in walk_dirs(src):
        n_zips += sum(1 for f in files if _ZIP.match(f))
        keep = []
        for d in dirs:
            m = _DIR.match(d)
            if not m:
                keep.append(d)
                continue
            n_dirs += 1
            key = (m.group("eid"), m.group("inst"), m.group("arr"))
            ch, rel = FIELDS[m.group("field")]
            found = pending.setdefault(key, {})
            path = os.path.join(dirpath, d, rel)
            if os.path.isfile(path):
                found.setdefault(ch, []).append(path)
            else:
                notes.setdefault(key, []).append(f"{os.path.join(dirpath, d)} has no {rel} (incomplete unzip?)")
            if all(c in found for c in CHANNELS):
                yield _spec(key, pending.pop(key), notes.pop(key, []))
        dirs[:] = keep      # do not descend into the subject folders
    if n_dirs == 0:
        if n_zips:
            raise ConversionError(f"{src} holds {n_zips} UK Biobank zip file(s) but no unzipped folders: unzip each "
                                  f"<eid>_20252_2_0.zip into a folder of the same name (e.g. for f in *.zip; do "
                                  f"unzip -q \"$f\" -d \"${{f%.zip}}\"; done) and run again.")
        raise ConversionError(f"no UK Biobank folders (<eid>_20252_2_0 with T1/T1_brain_to_MNI.nii.gz, "
                              f"<eid>_20253_2_0 with T2_FLAIR/T2_FLAIR_brain_to_MNI.nii.gz) under {src}.")
    for key in sorted(pending):
        yield _spec(key, pending[key], notes.get(key, []))


def _spec(key, found, notes) -> CaseSpec:
    eid, inst, arr = key
    return subject_spec(f"{eid}_{inst}_{arr}", found, CHANNELS, source=f"eid {eid} instance {inst}.{arr}",
                        notes=notes)


def convert_ukb(src: str, dataset_id: int, raw_root: Optional[str] = None, *, name: Optional[str] = None,
                **kw) -> dict:
    info = dataset_info(CHANNELS, name or "UKB", "UK Biobank T1 + T2 FLAIR brain images (MNI, skull-stripped), "
                                                 "unlabelled; label 1 = non-zero (brain) mask")
    return convert_subjects(iter_subjects(src), info, dataset_id, raw_root, source=os.path.abspath(src),
                            converter="ukb", **kw)
