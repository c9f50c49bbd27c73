"""The vocabulary of the dataset converters: the errors, what a case is (:class:`CaseSpec`) and where its files go,
what a dataset is (:class:`DatasetInfo`), case identifiers and the dataset folder, walking a source tree.

A converter (:mod:`.brats`, :mod:`.atlas`, :mod:`.ukb`, :mod:`.unlabeled`) lists its cases as a stream of
:class:`CaseSpec` (one per case: the source file of each channel in order, an optional label file and how to turn it
into an nnU-Net label) and calls :func:`~.convert_run.run_conversion`. The machinery is split by job:

* :mod:`.convert_run`: the conversion driver (resumable; its guarantees are listed there);
* :mod:`.convert_cases`: verify and write one case (atomic file writes, label remapping);
* :mod:`.convert_report`: ``dataset.json`` and ``conversion_report.json``, and what is printed;
* :mod:`.parallel`: the process pool (also used by ``bsf-nnunet check`` and the evaluation).
"""
from __future__ import annotations

import os
import re
import unicodedata
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Optional

from ..errors import BSFError
from ..paths import nnunet_folder
from .cases import AFFINE_RTOL, NIFTI_ENDINGS

FILE_ENDING = ".nii.gz"
NIFTI_SUFFIXES = NIFTI_ENDINGS


class ConversionError(BSFError, ValueError):
    """Bad input or setup; the message names the file/case and says what to do."""


class CaseProblem(Exception):
    """A problem with one case (reported, the other cases go on)."""

    def __init__(self, reason: str, hint: str = ""):
        super().__init__(reason)
        self.reason = reason
        self.hint = hint


# ---------------------------------------------------------------------------------------------------------------
# case identifiers and the dataset folder


def nifti_stem(name: str) -> Optional[str]:
    """``'a_t1.nii.gz'`` -> ``'a_t1'``; None when the name is not a NIfTI file."""
    low = name.lower()
    for suf in NIFTI_SUFFIXES:
        if low.endswith(suf):
            return name[: -len(suf)]
    return None


_SAFE_ID = re.compile(r"[^A-Za-z0-9._-]+")


def safe_case_id(name: str) -> str:
    """A case identifier that nnU-Net file names and shell commands take as it is: ASCII letters, digits, ``.``,
    ``_`` and ``-`` (accents dropped, any other character, path separators and whitespace included, becomes
    ``_``), never starting with ``.`` (hidden file, ``..``) or ``-`` (read as a command-line option)."""
    plain = "".join(c for c in unicodedata.normalize("NFKD", name) if not unicodedata.combining(c))
    out = _SAFE_ID.sub("_", plain).lstrip("._-").rstrip("_")
    if not out:
        raise ConversionError(f"cannot make a case identifier from {name!r}: nothing usable is left after removing "
                              f"spaces, punctuation and leading dots/dashes",
                              hint="rename the source folder/file to start with a letter or digit")
    return out


def resolve_raw_root(out: Optional[str]) -> str:
    """``--out`` if given, else ``$nnUNet_raw``; a clear error when neither is set."""
    root = out or nnunet_folder("nnUNet_raw", instead="pass -o/--out FOLDER (where the dataset should go)")
    return os.path.abspath(os.path.expanduser(root))


def dataset_folder(raw_root: str, dataset_id: int, name: str) -> str:
    """``raw_root/DatasetXXX_name``; refuses an ID that another dataset folder already uses."""
    if not 1 <= int(dataset_id) <= 999:
        raise ConversionError(f"dataset ID {dataset_id} is out of range: nnU-Net dataset IDs are 1..999.")
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
        raise ConversionError(f"dataset name {name!r} may only contain letters, digits, '_', '-' and '.'.")
    folder_name = f"Dataset{int(dataset_id):03d}_{name}"
    others = other_datasets_with_id(raw_root, dataset_id, folder_name)
    if others:
        raise ConversionError(f"dataset ID {dataset_id} is already used by {os.path.join(raw_root, others[0])}; "
                              f"nnU-Net needs unique IDs. Pick another -d, or remove/rename that folder.")
    return os.path.join(raw_root, folder_name)


def other_datasets_with_id(raw_root: str, dataset_id: int, folder_name: str) -> List[str]:
    """The folders ``Dataset<ID>_*`` in ``raw_root`` other than ``folder_name``, sorted (nnU-Net needs unique
    IDs)."""
    if not os.path.isdir(raw_root):
        return []
    prefix = f"Dataset{int(dataset_id):03d}_"
    with os.scandir(raw_root) as it:
        return sorted(e.name for e in it if e.is_dir() and e.name.startswith(prefix) and e.name != folder_name)


# ---------------------------------------------------------------------------------------------------------------
# cases and datasets


@dataclass
class CaseSpec:
    """One case to convert.

    images: source file per channel, in the dataset's channel order (None = missing).
    label: source label file (None: no label; with ``label_mode='nonzero'`` the label is made from the images).
    split: "Tr" (imagesTr + labelsTr) or "Ts" (imagesTs, images only).
    label_mode: "none", "map" (value -> new value by ``label_map``; values not in it are an error), "binarize"
        (> 0 -> 1; negative values are an error) or "nonzero" (label 1 where any channel is non-zero).
    problem / hint: set by the lister when the case is known to be bad already (e.g. a missing channel).
    original_id: the name the case had in the source when :func:`safe_case_id` changed it ("" otherwise).
    """
    case_id: str
    images: List[Optional[str]]
    label: Optional[str] = None
    split: str = "Tr"
    label_mode: str = "none"
    label_map: Optional[Dict[int, int]] = None
    problem: Optional[str] = None
    hint: str = ""
    source: str = ""
    original_id: str = ""


@dataclass
class Options:
    out_dir: str
    channel_names: List[str]
    link: Optional[str] = None
    affine_tol: float = AFFINE_RTOL  # a fraction of the smallest voxel size (cases.affine_tolerance)
    label_hint: str = ""        # appended to label-value problems


def output_files(spec: CaseSpec, out_dir: str) -> List[str]:
    img_dir = os.path.join(out_dir, "images" + spec.split)
    files = [os.path.join(img_dir, f"{spec.case_id}_{i:04d}{FILE_ENDING}") for i in range(len(spec.images))]
    if spec.split == "Tr":
        files.append(os.path.join(out_dir, "labelsTr", spec.case_id + FILE_ENDING))
    return files


def case_finished(spec: CaseSpec, out_dir: str) -> bool:
    return all(os.path.exists(f) for f in output_files(spec, out_dir))


@dataclass
class DatasetInfo:
    """What a converter produces (besides the cases)."""
    name: str                      # folder suffix, e.g. "BraTS2021"
    channel_names: List[str]
    labels: dict
    regions_class_order: Optional[List[int]] = None
    extra: dict = field(default_factory=dict)   # more dataset.json keys (description, reference, ...)
    label_hint: str = ""


# ---------------------------------------------------------------------------------------------------------------
# listing helpers


def walk_dirs(root: str) -> Iterator[tuple]:
    """Depth-first, sorted per folder, lazily: yields (dirpath, [sub dir names], [file names]).

    Symlinked folders are followed (subject folders on another disk are common on clusters), but each real folder
    is visited once, so a symlink cycle ends instead of recursing forever."""
    stack = [root]
    seen = set()
    while stack:
        d = stack.pop()
        try:
            st = os.stat(d)
            if (st.st_dev, st.st_ino) in seen:
                continue
            seen.add((st.st_dev, st.st_ino))
            with os.scandir(d) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError:
            continue
        dirs = [e.name for e in entries if _is_dir(e)]
        files = [e.name for e in entries if not _is_dir(e)]
        yield d, dirs, files
        stack.extend(os.path.join(d, n) for n in reversed(dirs) if not n.startswith("."))


def _is_dir(entry: os.DirEntry) -> bool:
    try:
        return entry.is_dir()
    except OSError:  # a dangling or unreadable link
        return False


def require_dir(path: str, what: str = "source folder") -> str:
    if not os.path.isdir(path):
        raise ConversionError(f"{what} {path} does not exist or is not a folder; check the path.")
    return os.path.abspath(path)
