"""Shared machinery of the dataset converters: case verification, atomic writes, a parallel and resumable runner,
the dataset.json writer and the conversion report.

A converter only has to produce a stream of :class:`CaseSpec` (one per case: the source file of each channel in
order, an optional label file and how to turn it into an nnU-Net label) and call :func:`run_conversion`.

Guarantees:

* every output file is written under a temporary name (``.tmp_<name>.<random>``, :mod:`bsf_nnunet.io`) and
  renamed into place, so a file that exists is complete; a case is *finished* when all of its output files exist,
  and a re-run skips finished cases (resumable); a full disk stops the conversion with one message;
* each case is verified before anything of it is written: all channels present, 3D, the same shape and the same
  affine across channels and label (within ``affine_tol`` times the smallest voxel size: the one affine tolerance of
  :mod:`.cases`, which the dataset check uses too), finite values (read with nibabel: SimpleITK turns
  NaN/Inf into 0 without a word), label values in the allowed set. A bad case is reported by name with the reason
  and what to do, and never stops the others;
* case identifiers are made safe (:func:`safe_case_id`: no spaces, non-ASCII characters or path separators, no
  leading ``.`` or ``-``), so every file is written inside the dataset folder; renames are listed under ``renamed``
  in the report, a name with nothing usable left is a bad case; unreadable files are diagnosed by name
  (:func:`~.cases.diagnose_unreadable`: an HTML page saved by a failed download, a gzip file cut short, ...);
* ``dataset.json`` is written last and atomically, with ``numTraining`` = the complete training cases in
  ``imagesTr``; ``conversion_report.json`` lists what happened.
"""
from __future__ import annotations

import dataclasses
import gzip
import itertools
import json
import multiprocessing
import os
import re
import shutil
import sys
import time
import unicodedata
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Sequence

import numpy as np

from ..errors import BSFError
from ..io import DiskFullError, atomic_path, atomic_write_bytes, atomic_write_json, remove_stale_temporaries
from .cases import (
    AFFINE_RTOL,
    NIFTI_ENDINGS,
    affine_mismatch,
    count_nonfinite,
    diagnose_unreadable,
    load_nifti,
    read_voxels,
)

FILE_ENDING = ".nii.gz"
NIFTI_SUFFIXES = NIFTI_ENDINGS
REPORT_NAME = "conversion_report.json"
LINK_MODES = ("auto", "hard", "symlink")


class ConversionError(BSFError, ValueError):
    """Bad input or setup; the message names the file/case and says what to do."""


class CaseProblem(Exception):
    """A problem with one case (reported, the other cases go on)."""

    def __init__(self, reason: str, hint: str = ""):
        super().__init__(reason)
        self.reason = reason
        self.hint = hint


# ---------------------------------------------------------------------------------------------------------------
# small helpers


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


def place_file(src: str, dst: str, link: Optional[str] = None) -> str:
    """Copy (``link=None``) or link ``src`` to ``dst`` atomically; returns how (``copy``, ``hardlink``,
    ``symlink``, ``gzip`` for an uncompressed .nii source, which cannot be linked under a .nii.gz name)."""
    with atomic_path(dst, keep_extension=False) as tmp:
        if src.lower().endswith(".nii") and dst.lower().endswith(".nii.gz"):
            with open(src, "rb") as fi, gzip.GzipFile(tmp, "wb", compresslevel=1, mtime=0) as fo:
                shutil.copyfileobj(fi, fo, 1 << 20)
            return "gzip"
        if link is None:
            shutil.copyfile(src, tmp)
            return "copy"
        if link in ("auto", "hard"):
            try:
                os.link(src, tmp)
                return "hardlink"
            except OSError:
                if link == "hard":
                    raise
        os.symlink(os.path.abspath(src), tmp)
        return "symlink"


def save_nifti_atomic(img, path: str, compresslevel: int = 1) -> None:
    """Save a nibabel image to ``path`` (.nii.gz or .nii) atomically (gzip without a time stamp, so the same image
    gives the same bytes)."""
    path = os.fspath(path)
    data = img.to_bytes()
    if path.lower().endswith(".gz"):
        data = gzip.compress(data, compresslevel=compresslevel, mtime=0)
    atomic_write_bytes(path, data)


def label_image_like(data: np.ndarray, ref_img):
    """A uint8 NIfTI image holding ``data`` with the geometry (header, sform/qform) of ``ref_img``."""
    hdr = ref_img.header.copy()
    img = type(ref_img)(np.asarray(data, dtype=np.uint8), None, header=hdr)
    img.set_data_dtype(np.uint8)
    return img


def present_values(arr: np.ndarray) -> np.ndarray:
    """Sorted distinct values of an array (fast path for small non-negative integers)."""
    if arr.size == 0:
        return np.zeros(0, arr.dtype)
    if np.issubdtype(arr.dtype, np.integer) or arr.dtype == bool:
        a = arr.ravel()
        lo, hi = int(a.min()), int(a.max())
        if lo >= 0 and hi < 1 << 16:
            return np.flatnonzero(np.bincount(a.astype(np.intp, copy=False), minlength=hi + 1)).astype(np.int64)
    return np.unique(arr)


def resolve_raw_root(out: Optional[str]) -> str:
    """``--out`` if given, else ``$nnUNet_raw``; a clear error when neither is set."""
    root = out or os.environ.get("nnUNet_raw")
    if not root:
        raise ConversionError("where should the dataset go? Set the environment variable nnUNet_raw (nnU-Net's raw "
                              "data folder, e.g. export nnUNet_raw=/data/nnUNet_raw) or pass -o/--out FOLDER.")
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
# cases


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


def _read(path: str, what: str):
    try:
        img = load_nifti(path)
    except Exception as e:  # any reader error is a case problem
        wrong, todo = diagnose_unreadable(path, e)
        raise CaseProblem(f"cannot read {what}: {path} {wrong}", f"{todo}, or leave the case out") from None
    if len(img.shape) != 3:
        raise CaseProblem(f"{what} {path} has shape {tuple(img.shape)}; a 3D volume is expected",
                          "save it as a 3D file (split 4D files into one 3D file per channel)")
    return img


def _data(img, path: str, what: str) -> np.ndarray:
    try:
        arr = read_voxels(img)
    except Exception as e:
        wrong, todo = diagnose_unreadable(path, e)
        raise CaseProblem(f"cannot read the voxels of {what}: {path} {wrong}", f"{todo}, or leave the case out"
                          ) from None
    bad = count_nonfinite(arr)
    if bad:
        raise CaseProblem(f"{what} {path} has {bad} NaN/Inf voxel(s)",
                          "replace them (e.g. with 0) in the source file, or leave the case out")
    return arr


def _check_geometry(img, ref, path: str, what: str, ref_what: str, rtol: float) -> None:
    """Same shape, and the same affine within the dataset check's tolerance (:func:`~.cases.affine_tolerance`:
    ``rtol`` times the smallest voxel size). Relative, not a fixed number of millimetres: the same fraction of a
    voxel at any resolution, and a case the converter writes passes ``bsf-nnunet check``."""
    if tuple(img.shape) != tuple(ref.shape):
        raise CaseProblem(f"shape {tuple(img.shape)} of {what} ({path}) differs from {tuple(ref.shape)} of "
                          f"{ref_what}", "resample the files onto one grid, or leave the case out")
    mismatch = affine_mismatch(img.affine, ref.affine, rtol)
    if mismatch is not None:
        d, tol = mismatch
        raise CaseProblem(f"affine of {what} ({path}) differs from that of {ref_what} by up to {d:.4g} "
                          f"(tolerance {tol:.3g} = {rtol:g} x voxel size)", "register/resample the files onto one "
                          "grid (or raise --affine-tol if the difference is only rounding)")


def _num(v):
    v = float(v)
    return int(v) if v.is_integer() else v


def _new_label(spec: CaseSpec, arr: np.ndarray, path: str, hint: str):
    """Returns (label array to write or None when the source can be used as is)."""
    if not (np.issubdtype(arr.dtype, np.integer) or arr.dtype == bool):
        if not np.all(arr == np.round(arr)) and spec.label_mode == "map":
            raise CaseProblem(f"label {path} has non-integer values", "labels must be integers; fix the file")
    vals = present_values(arr)
    if spec.label_mode == "map":
        allowed = set(spec.label_map)
        extra = [_num(v) for v in vals if float(v) not in allowed]
        if extra:
            raise CaseProblem(f"label {path} has value(s) {extra}; allowed are {sorted(allowed)}",
                              hint or "fix the label file or leave the case out")
        identity = all(spec.label_map[int(v)] == int(v) for v in vals)
        if identity and np.issubdtype(arr.dtype, np.integer):
            return None
        lut = np.zeros(max(spec.label_map) + 1, np.uint8)
        for k, v in spec.label_map.items():
            lut[k] = v
        return lut[arr.astype(np.int64)]
    if spec.label_mode == "binarize":
        if vals.size and float(vals[0]) < 0:
            raise CaseProblem(f"mask {path} has negative values (min {float(vals[0]):g})",
                              hint or "a lesion mask should be 0 (background) / >0 (lesion); fix the file")
        if np.issubdtype(arr.dtype, np.integer) and set(int(v) for v in vals) <= {0, 1}:
            return None
        return (arr > 0).astype(np.uint8)
    raise AssertionError(spec.label_mode)


def verify_and_write(spec: CaseSpec, opts: Options) -> dict:
    """Verify one case and write its outputs. Raises CaseProblem when the case is bad (nothing written)."""
    names = opts.channel_names
    refs = []
    ref = None
    mask = None
    for ch, path in enumerate(spec.images):
        what = f"channel {ch} ({names[ch]})"
        if path is None:
            raise CaseProblem(f"{what} is missing", "add the file or leave the case out")
        img = _read(path, what)
        if ref is None:
            ref = (img, path, what)
        else:
            _check_geometry(img, ref[0], path, what, ref[2], opts.affine_tol)
        arr = _data(img, path, what)
        if spec.label_mode == "nonzero" and spec.split == "Tr":
            nz = arr != 0
            mask = nz if mask is None else (mask | nz)
        del arr
        refs.append(img)
    new_label = None
    label_img = None
    if spec.split == "Tr":
        if spec.label_mode == "nonzero":
            if mask is None or not mask.any():
                raise CaseProblem("all channels are zero everywhere (empty image)",
                                  "check the source files (failed export?) or leave the case out")
            new_label = mask.astype(np.uint8)
            label_img = ref[0]
        else:
            if spec.label is None:
                raise CaseProblem("the label file is missing", "add it, or convert the case as a test case")
            label_img = _read(spec.label, "label")
            _check_geometry(label_img, ref[0], spec.label, "label", ref[2], opts.affine_tol)
            arr = _data(label_img, spec.label, "label")
            new_label = _new_label(spec, arr, spec.label, opts.label_hint)
            del arr
    # --- all checks passed: write
    outs = output_files(spec, opts.out_dir)
    hows = []
    for src, dst in zip(spec.images, outs, strict=False):  # outs ends with the label
        hows.append(place_file(src, dst, opts.link))
    if spec.split == "Tr":
        if new_label is None:
            # values already right: the label file can be used as is
            hows.append(place_file(spec.label, outs[-1], opts.link))
        else:
            save_nifti_atomic(label_image_like(new_label, label_img), outs[-1])
            hows.append("written")
    return {"files": hows}


def process_case(spec: CaseSpec, opts: Options) -> dict:
    """Convert one case; never raises for a bad case (returns status 'bad' with reason and hint); a full disk
    raises :class:`~bsf_nnunet.io.DiskFullError`."""
    res = {"case": spec.case_id, "split": spec.split}
    try:
        if spec.problem:
            raise CaseProblem(spec.problem, spec.hint)
        info = verify_and_write(spec, opts)
        res.update(status="converted", **info)
    except CaseProblem as e:
        _remove_partial(spec, opts.out_dir)
        res.update(status="bad", reason=e.reason, hint=e.hint)
    except DiskFullError:  # not the case's fault, and every later case would fail the same way
        _remove_partial(spec, opts.out_dir)
        raise
    except Exception as e:  # one case must not stop the others
        _remove_partial(spec, opts.out_dir)
        res.update(status="bad", reason=f"{type(e).__name__}: {e}",
                   hint="unexpected error; check the case's files (see reason) and re-run")
    if spec.source:
        res["source"] = spec.source
    return res


def _remove_partial(spec: CaseSpec, out_dir: str) -> None:
    """A bad case must not leave outputs of an earlier, interrupted attempt (nnU-Net would pick them up)."""
    for f in output_files(spec, out_dir):
        try:
            os.remove(f)
        except FileNotFoundError:
            pass
        except OSError:
            pass


# ---------------------------------------------------------------------------------------------------------------
# parallel runner


def parallel_imap(func: Callable, items: Iterable, num_workers: int = 1, max_in_flight: Optional[int] = None,
                  ) -> Iterator:
    """Yield ``func(item)`` for each item, in completion order, with at most ``max_in_flight`` items submitted but
    not yet done (so an endless/huge item stream is consumed lazily). ``num_workers <= 1`` runs in this process."""
    if num_workers <= 1:
        for it in items:
            yield func(it)
        return
    max_in_flight = max_in_flight or 4 * num_workers
    ctx = multiprocessing.get_context("spawn")
    try:
        with ProcessPoolExecutor(max_workers=num_workers, mp_context=ctx) as ex:
            pending = set()
            for it in items:
                pending.add(ex.submit(func, it))
                while len(pending) >= max_in_flight:
                    done, pending = wait(pending, return_when=FIRST_COMPLETED)
                    for f in done:
                        yield f.result()
            while pending:
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                for f in done:
                    yield f.result()
    except BrokenProcessPool:
        raise ConversionError("a worker process died (out of memory? or, when called from your own script, the "
                              "script lacks an 'if __name__ == \"__main__\":' guard). Everything finished so far "
                              "is kept: re-run the same command (with fewer workers, -j) to continue.") from None


class _CaseJob:
    """Picklable callable for the process pool."""

    def __init__(self, opts: Options):
        self.opts = opts

    def __call__(self, spec: CaseSpec) -> dict:
        return process_case(spec, self.opts)


# ---------------------------------------------------------------------------------------------------------------
# dataset.json and report


def training_identifiers(out_dir: str, num_channels: int) -> tuple:
    """(complete, incomplete) training case identifiers as nnU-Net sees them in imagesTr/labelsTr."""
    img_dir = os.path.join(out_dir, "imagesTr")
    chans: Dict[str, set] = {}
    if os.path.isdir(img_dir):
        with os.scandir(img_dir) as it:
            for e in it:
                n = e.name
                if n.endswith(FILE_ENDING) and len(n) > len(FILE_ENDING) + 5:
                    stem = n[: -len(FILE_ENDING)]
                    ident, ch = stem[:-5], stem[-4:]
                    if stem[-5] == "_" and ch.isdigit():
                        chans.setdefault(ident, set()).add(int(ch))
    complete, incomplete = [], []
    want = set(range(num_channels))
    for ident, got in chans.items():
        ok = got == want and os.path.exists(os.path.join(out_dir, "labelsTr", ident + FILE_ENDING))
        (complete if ok else incomplete).append(ident)
    return sorted(complete), sorted(incomplete)


def check_existing_dataset_json(out_dir: str, channel_names: Sequence[str], labels: dict) -> None:
    path = os.path.join(out_dir, "dataset.json")
    if not os.path.isfile(path):
        return
    try:
        with open(path) as f:
            old = json.load(f)
    except Exception as e:
        raise ConversionError(f"{path} exists but cannot be read ({e}); remove it (it is rewritten at the "
                              "end).") from None
    want_ch = {str(i): n for i, n in enumerate(channel_names)}
    if old.get("channel_names") != want_ch or _norm_labels(old.get("labels")) != _norm_labels(labels):
        raise ConversionError(f"{out_dir} already holds a different dataset (dataset.json has channel_names "
                              f"{old.get('channel_names')} and labels {old.get('labels')}, this conversion makes "
                              f"{want_ch} and {labels}). Use another dataset ID (-d) or remove that folder.")


def _norm_labels(labels):
    if not isinstance(labels, dict):
        return labels
    return {k: (list(v) if isinstance(v, (list, tuple)) else v) for k, v in labels.items()}


def write_dataset_json(out_dir: str, channel_names: Sequence[str], labels: dict, num_training: int,
                       regions_class_order: Optional[Sequence[int]] = None, **extra) -> str:
    dj = {
        "channel_names": {str(i): n for i, n in enumerate(channel_names)},
        "labels": {k: (list(v) if isinstance(v, (list, tuple)) else int(v)) for k, v in labels.items()},
        "numTraining": int(num_training),
        "file_ending": FILE_ENDING,
    }
    if regions_class_order is not None:
        dj["regions_class_order"] = [int(i) for i in regions_class_order]
    dj.update(extra)
    path = os.path.join(out_dir, "dataset.json")
    atomic_write_json(path, dj)
    return path


@dataclass
class DatasetInfo:
    """What a converter produces (besides the cases)."""
    name: str                      # folder suffix, e.g. "BraTS2021"
    channel_names: List[str]
    labels: dict
    regions_class_order: Optional[List[int]] = None
    extra: dict = field(default_factory=dict)   # more dataset.json keys (description, reference, ...)
    label_hint: str = ""


def printable(text: str) -> str:
    """``text`` with the undecodable bytes of file names (lone surrogates) written as ``\\udcXX``: printing them
    would fail outside a UTF-8 locale with surrogateescape."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _log(msg: str, stream=None) -> None:
    print(printable(msg), file=stream or sys.stdout, flush=True)


def _new_report(out_dir: str, source: str, converter: str, link: Optional[str], dry_run: bool) -> dict:
    return {
        "dataset": os.path.basename(out_dir), "folder": out_dir, "source": source, "converter": converter,
        "mode": "dry-run" if dry_run else (f"link ({link})" if link else "copy"),
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "counts": {"converted": 0, "done_before": 0, "bad": 0, "training": 0, "test": 0},
        "bad": [], "converted": [], "done_before": [], "renamed": [], "warnings": [],
    }


class _Conversion:
    """One run of :func:`run_conversion`: the report it fills and the case identifiers seen so far."""

    def __init__(self, opts: Options, report: dict, dry_run: bool, progress_every: float):
        self.opts, self.report, self.dry_run, self.progress_every = opts, report, dry_run, progress_every
        self.counts = report["counts"]
        self.seen: set = set()
        self.t0 = time.time()

    def record(self, res: dict) -> None:
        """Count one case's result (``status``: converted, done_before or bad) in the report."""
        st = res["status"]
        self.counts[st] = self.counts.get(st, 0) + 1
        if st == "bad":
            self.report["bad"].append({k: res[k] for k in ("case", "split", "reason", "hint", "source") if k in res})
            _log(f"BAD case {res['case']}: {res['reason']} -> {res['hint']}", sys.stderr)
        else:
            self.report[st].append(res["case"])
            self.counts["training" if res["split"] == "Tr" else "test"] += 1

    def _safe_id(self, spec: CaseSpec) -> Optional[CaseSpec]:
        """``spec`` with a case identifier nnU-Net can use (:func:`safe_case_id`; a change is recorded under
        ``renamed`` in the report), or None (recorded as a bad case) when the source name has nothing usable."""
        try:
            new = safe_case_id(spec.case_id)
        except ConversionError as e:
            self.record({"case": spec.case_id, "split": spec.split, "status": "bad", "source": spec.source,
                         "reason": e.message, "hint": e.hint})
            return None
        if new == spec.case_id:
            return spec
        self.report["renamed"].append({"case": new, "from": spec.case_id, "source": spec.source})
        return dataclasses.replace(spec, case_id=new, original_id=spec.case_id)

    def _settled(self, spec: CaseSpec) -> bool:
        """Record a case that is not to be converted (a duplicate identifier, one finished by an earlier run, or
        any case of a dry run); False for a case to convert."""
        if spec.case_id in self.seen:
            self.record({"case": spec.case_id, "split": spec.split, "status": "bad", "source": spec.source,
                         "reason": spec.problem or f"duplicate case identifier {spec.case_id!r}"
                                                   f"{_made_from(spec)} (another source folder/file gives the "
                                                   f"same name); only the first one is used",
                         "hint": spec.hint or "rename or remove one of them"})
            return True
        self.seen.add(spec.case_id)
        if case_finished(spec, self.opts.out_dir):
            self.record({"case": spec.case_id, "split": spec.split, "status": "done_before"})
            return True
        if not self.dry_run:
            return False
        _describe(spec, self.opts)
        if spec.problem:
            self.record({"case": spec.case_id, "split": spec.split, "status": "bad", "reason": spec.problem,
                         "hint": spec.hint, "source": spec.source})
        else:
            self.record({"case": spec.case_id, "split": spec.split, "status": "converted"})
        return True

    def todo(self, specs: Iterable[CaseSpec]) -> Iterator[CaseSpec]:
        """The cases to convert, with a progress line every ``progress_every`` seconds."""
        last = time.time()
        for spec in specs:
            spec = self._safe_id(spec)
            if spec is None or self._settled(spec):
                continue
            yield spec
            if self.progress_every and time.time() - last > self.progress_every:
                last = time.time()
                c = self.counts
                _log(f"... {len(self.seen)} cases listed: {c['converted']} converted, {c['done_before']} done "
                     f"before, {c['bad']} bad ({time.time() - self.t0:.0f} s)")

    def finish(self, num_channels: int) -> dict:
        """The report, sorted, with numTraining (the complete training cases in the folder) and the times."""
        report, out_dir = self.report, self.opts.out_dir
        for k in ("converted", "done_before"):
            report[k].sort()
        report["bad"].sort(key=lambda r: r["case"])
        report["renamed"].sort(key=lambda r: r["case"])
        complete, incomplete = training_identifiers(out_dir, num_channels)
        if incomplete:
            report["warnings"].append(f"{len(incomplete)} incomplete training case(s) in {out_dir}/imagesTr not "
                                      f"from this source (e.g. {incomplete[:5]}): delete their files or nnU-Net "
                                      f"will fail")
        report["numTraining"] = len(complete)
        report["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
        report["seconds"] = round(time.time() - self.t0, 1)
        return report


def _made_from(spec: CaseSpec) -> str:
    return f" (made from {spec.original_id!r})" if spec.original_id else ""


def _nonempty(cases: Iterable[CaseSpec], source: str) -> Iterator[CaseSpec]:
    it = iter(cases)
    first = next(it, None)
    if first is None:
        raise ConversionError(f"no cases found in {source or 'the source folder'}; check the path and the expected "
                              f"layout (see docs/datasets.md).")
    return itertools.chain([first], it)


def _write_results(report: dict, info: DatasetInfo, converter: str) -> None:
    """The conversion report and dataset.json (numTraining: the complete training cases)."""
    out_dir = report["folder"]
    atomic_write_json(os.path.join(out_dir, REPORT_NAME), report)
    extra = dict(info.extra)
    extra.setdefault("name", info.name)
    extra["converted_by"] = f"bsf-nnunet convert {converter}".strip()
    write_dataset_json(out_dir, info.channel_names, info.labels, report["numTraining"], info.regions_class_order,
                       **extra)


def run_conversion(cases: Iterable[CaseSpec], info: DatasetInfo, dataset_id: int, raw_root: Optional[str] = None,
                   *, link: Optional[str] = None, num_workers: int = 1, dry_run: bool = False,
                   affine_tol: float = AFFINE_RTOL, source: str = "", converter: str = "",
                   progress_every: float = 30.0) -> dict:
    """Convert a stream of cases into ``$nnUNet_raw/DatasetXXX_<name>``; returns the report (a dict).

    The report's ``status`` counts: converted, done_before (finished by an earlier run), bad, and the number of
    test cases. Nothing is written with ``dry_run``.
    """
    if link is not None and link not in LINK_MODES:
        raise ConversionError(f"--link must be one of {LINK_MODES}, got {link!r}")
    root = resolve_raw_root(raw_root)
    out_dir = dataset_folder(root, dataset_id, info.name)
    check_existing_dataset_json(out_dir, info.channel_names, info.labels)
    opts = Options(out_dir=out_dir, channel_names=list(info.channel_names), link=link, affine_tol=affine_tol,
                   label_hint=info.label_hint)
    run = _Conversion(opts, _new_report(out_dir, source, converter, link, dry_run), dry_run, progress_every)
    specs = _nonempty(cases, source)
    if dry_run:
        for _ in run.todo(specs):
            pass
    else:
        for sub in ("imagesTr", "labelsTr", "imagesTs"):
            os.makedirs(os.path.join(out_dir, sub), exist_ok=True)
        _remove_stale_parts(out_dir)
        for res in parallel_imap(_CaseJob(opts), run.todo(specs), num_workers):
            run.record(res)
    report = run.finish(len(info.channel_names))
    if not dry_run:
        _write_results(report, info, converter)
    _print_summary(report, dry_run)
    return report


def _describe(spec: CaseSpec, opts: Options) -> None:
    if spec.problem:
        _log(f"would skip {spec.case_id}: {spec.problem}")
        return
    how = "link" if opts.link else "copy"
    what = f"{len(spec.images)} image(s) -> images{spec.split} ({how})"
    if spec.split == "Tr":
        lab = {"map": "label (remapped/written)", "binarize": "label (binarised)",
               "nonzero": "label (non-zero mask of the images)"}.get(spec.label_mode, "label")
        what += f" + {lab}"
    _log(f"would convert {spec.case_id}: {what}")


def _remove_stale_parts(out_dir: str) -> None:
    for sub in ("imagesTr", "labelsTr", "imagesTs"):
        remove_stale_temporaries(os.path.join(out_dir, sub))


def _print_summary(report: dict, dry_run: bool) -> None:
    c = report["counts"]
    verb = "would convert" if dry_run else "converted"
    _log(f"{report['dataset']}: {verb} {c['converted']} case(s), {c['done_before']} already done, {c['bad']} bad; "
         f"{c['training']} training / {c['test']} test case(s) ok.")
    if not dry_run:
        _log(f"numTraining = {report['numTraining']}; report: {os.path.join(report['folder'], REPORT_NAME)}")
    if report["bad"]:
        _log(f"{len(report['bad'])} bad case(s) (left out; fix them and re-run the same command to add them):")
        for b in report["bad"][:20]:
            _log(f"  {b['case']}: {b['reason']}")
        if len(report["bad"]) > 20:
            _log(f"  ... and {len(report['bad']) - 20} more (see the report)")
    if report["renamed"]:
        _log(f"{len(report['renamed'])} case(s) renamed to identifiers nnU-Net and the shell take as they are "
             f"(no spaces, accents or path separators; no leading '.' or '-'), listed under 'renamed' in the report:")
        for r in report["renamed"][:20]:
            _log(f"  {r['from']!r} -> {r['case']}")
        if len(report["renamed"]) > 20:
            _log(f"  ... and {len(report['renamed']) - 20} more")
    for w in report["warnings"]:
        _log(f"warning: {w}", sys.stderr)


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
