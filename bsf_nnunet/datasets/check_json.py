"""The ``dataset.json`` part of the dataset checks: read it and check its keys, channel names and labels
(:func:`read_dataset_json`, :func:`check_dataset_json`); what the case checks need from it is a
:class:`DatasetMeta`."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import numpy as np

from .cases import NIFTI_ENDINGS
from .check_report import CheckReport

REQUIRED_KEYS = ("channel_names", "labels", "numTraining", "file_ending")


@dataclass
class DatasetMeta:
    """What the case checks need from dataset.json (best guesses where dataset.json is broken)."""

    file_ending: Optional[str] = None
    num_channels: Optional[int] = None
    channel_names: Dict[str, str] = field(default_factory=dict)
    allowed_labels: Optional[List[int]] = None  # None: labels unusable, label values not checked
    num_training: Optional[int] = None


def _is_int(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def read_dataset_json(folder: str, report: CheckReport) -> Optional[dict]:
    path = os.path.join(folder, "dataset.json")
    if not os.path.isfile(path):
        report.errors.append(f"dataset.json: {path} does not exist. Every nnU-Net raw dataset needs one; write it "
                             f"with nnunetv2.dataset_conversion.generate_dataset_json.generate_dataset_json (or "
                             f"let a bsf-nnunet convert command write it).")
        return None
    try:
        with open(path, "rb") as f:
            raw = f.read()
        text = raw.decode("utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        report.errors.append(f"dataset.json: cannot read {path} ({e}). Save it as UTF-8 text.")
        return None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        line = text.splitlines()[e.lineno - 1] if 0 < e.lineno <= len(text.splitlines()) else ""
        report.errors.append(f"dataset.json: {path} is not valid JSON: {e.msg} at line {e.lineno}, column "
                             f"{e.colno} (near {line.strip()[:60]!r}). Fix the syntax (a trailing comma, single "
                             f"quotes and comments are common culprits; python -m json.tool {path} shows the spot).")
        return None
    if not isinstance(data, dict):
        report.errors.append(f"dataset.json: {path} holds a JSON {type(data).__name__}, not an object "
                             f"({{\"channel_names\": ..., \"labels\": ..., ...}}). Rewrite it.")
        return None
    return data


def check_dataset_json(data: dict, report: CheckReport) -> DatasetMeta:
    meta = DatasetMeta()
    data = _check_required_keys(data, report)
    if "file_ending" in data:
        meta.file_ending = _check_file_ending(data["file_ending"], report)
    if data.get("channel_names") is not None:
        meta.channel_names = _check_channel_names(data["channel_names"], report)
        meta.num_channels = len(meta.channel_names) or None
    if data.get("labels") is not None:
        meta.allowed_labels = _check_labels(data["labels"], data, report)
    if "numTraining" in data:
        meta.num_training = _check_num_training(data["numTraining"], report)
    if "dataset" in data:
        report.warnings.append("dataset.json: has a 'dataset' entry (explicit file lists); this check only looks at "
                               "imagesTr/labelsTr/imagesTs and not at those lists.")
    return meta


def _check_required_keys(data: dict, report: CheckReport) -> dict:
    """Report missing keys; returns ``data`` with nnU-Net v1's 'modality' read as 'channel_names'."""
    missing = [k for k in REQUIRED_KEYS if k not in data]
    if "channel_names" in missing and "modality" in data:
        missing.remove("channel_names")
        report.errors.append("dataset.json: uses the old key 'modality' (nnU-Net v1); nnU-Net v2 calls it "
                             "'channel_names' and its dataset integrity check refuses the old name. Rename the key.")
        data = dict(data, channel_names=data["modality"])
    if missing:
        report.errors.append(f"dataset.json: the key(s) {', '.join(repr(k) for k in missing)} are missing. nnU-Net "
                             f"v2 needs channel_names (e.g. {{\"0\": \"T1\"}}), labels (e.g. {{\"background\": 0, "
                             f"\"lesion\": 1}}), numTraining (the number of training cases) and file_ending (e.g. "
                             f"\".nii.gz\"); add them.")
    return data


def _check_file_ending(fe, report: CheckReport) -> Optional[str]:
    """The file ending, or None when it is unusable."""
    if not isinstance(fe, str) or not fe.startswith(".") or len(fe) < 2:
        report.errors.append(f"dataset.json: file_ending must be a string such as \".nii.gz\", not {fe!r}. Fix it.")
        return None
    if fe.lower() not in NIFTI_ENDINGS:
        report.warnings.append(f"dataset.json: file_ending {fe!r} is not NIfTI; this check reads NIfTI only, so "
                               f"only the file layout was checked (no shapes, affines or voxel values).")
    return fe


def _check_channel_names(cn, report: CheckReport) -> Dict[str, str]:
    """The channel names keyed "0" .. "N-1", or {} when they are unusable."""
    if not isinstance(cn, dict) or not cn:
        report.errors.append(f"dataset.json: channel_names must be a non-empty object mapping \"0\", \"1\", ... to "
                             f"channel names (e.g. {{\"0\": \"FLAIR\", \"1\": \"T1\"}}), not {cn!r}. Fix it.")
        return {}
    names: Dict[str, str] = {}
    keys = [str(k) for k in cn]
    if sorted(keys, key=lambda k: (len(k), k)) != [str(i) for i in range(len(cn))]:
        report.errors.append(f"dataset.json: channel_names keys must be \"0\" .. \"{len(cn) - 1}\" (one per "
                             f"channel file _0000, _0001, ...), but they are {keys}. Renumber them.")
    else:
        names = {str(k): str(v) for k, v in cn.items()}
    bad = [k for k, v in cn.items() if not isinstance(v, str)]
    if bad:
        report.warnings.append(f"dataset.json: channel_names values should be strings (e.g. \"T1\", \"CT\"); "
                               f"key(s) {bad} are not.")
    return names


def _check_num_training(nt, report: CheckReport) -> Optional[int]:
    if not _is_int(nt) or nt < 0:
        report.errors.append(f"dataset.json: numTraining must be a non-negative integer (the number of training "
                             f"cases), not {nt!r}. Fix it.")
        return None
    return int(nt)


def _check_labels(labels, data: dict, report: CheckReport) -> Optional[List[int]]:
    where = "dataset.json"
    if not isinstance(labels, dict) or not labels:
        report.errors.append(f"{where}: labels must be a non-empty object mapping names to integer values, e.g. "
                             f"{{\"background\": 0, \"tumor\": 1}}, not {labels!r}. Fix it.")
        return None
    ok = True
    bad = {}
    values: List[int] = []
    regions = False
    for name, v in labels.items():
        if _is_int(v):
            values.append(int(v))
        elif isinstance(v, (list, tuple)) and v and all(_is_int(x) for x in v) and name != "ignore":
            regions = regions or len(v) > 1
            values.extend(int(x) for x in v)
        else:
            bad[name] = v
    if bad:
        ok = False
        report.errors.append(f"{where}: label value(s) {', '.join(f'{k!r}: {v!r}' for k, v in bad.items())} are not "
                             f"integers. Each label must map to an integer (e.g. \"tumor\": 1), or, for region-based "
                             f"training, to a list of integers (e.g. \"whole tumor\": [1, 2, 3]); the ignore label "
                             f"must be a single integer. Fix them.")
    if "background" not in labels:
        ok = False
        zero = [k for k, v in labels.items() if _is_int(v) and v == 0]
        hint = f" (you call label 0 {zero[0]!r}: rename it to \"background\")" if zero else ""
        report.errors.append(f"{where}: labels has no background 0 entry{hint}. nnU-Net requires "
                             f"\"background\": 0 in labels; add it.")
    elif not (_is_int(labels["background"]) and labels["background"] == 0):
        ok = False
        report.errors.append(f"{where}: labels has \"background\": {labels['background']!r}, but the background "
                             f"must be 0 (a single integer). Set \"background\": 0 and renumber the other labels.")
    if regions and "regions_class_order" not in data:
        ok = False
        report.errors.append(f"{where}: labels defines regions (lists of labels) but regions_class_order is "
                             f"missing. Region-based training needs regions_class_order (one label per region, in "
                             f"order); add it or use plain integer labels.")
    if bad:
        return None
    uniq = sorted(set(values) | {0})
    if ok:
        gaps = [b for a, b in zip(uniq, uniq[1:], strict=False) if b != a + 1]
        if uniq[0] < 0:
            report.errors.append(f"{where}: label values must not be negative ({uniq}). Renumber them 0, 1, 2, ...")
        elif gaps:
            report.errors.append(f"{where}: label values must be consecutive (0, 1, 2, ...), but they are {uniq}. "
                                 f"Renumber the labels in dataset.json and in the label files (nnU-Net refuses gaps; "
                                 f"a 'bsf-nnunet convert' label map can do the renumbering).")
    return uniq
