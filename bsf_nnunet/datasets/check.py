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
"""
from __future__ import annotations

import json
import multiprocessing
import os
import re
import textwrap
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from .convert import ConversionError, diagnose_unreadable, printable, safe_case_id

REQUIRED_KEYS = ("channel_names", "labels", "numTraining", "file_ending")
NIFTI_ENDINGS = (".nii.gz", ".nii")
ANISOTROPY_LIMIT = 3.0
SMALL_AXIS = 64
AFFINE_RTOL = 1e-3  # affine tolerance as a fraction of the smallest voxel size
MAX_EXAMPLES = 5
_CHANNEL_RE = re.compile(r"^(?P<case>.+)_(?P<ch>\d{4})$")


@dataclass
class CheckReport:
    """Result of :func:`check_raw_dataset`."""

    folder: str
    errors: List[str] = field(default_factory=list)
    warnings: List[str] = field(default_factory=list)
    num_training: int = 0
    num_test: int = 0
    values_checked: bool = True
    prediction_input: bool = False
    preprocessed: Optional[str] = None  # the configuration of a check of preprocessed data
    fix: Optional[str] = None  # one paragraph for all errors (preprocessed data: how to remake it)

    @property
    def ok(self) -> bool:
        return not self.errors

    def format(self, width: int = 110) -> str:
        def para(prefix: str, text: str) -> str:
            return textwrap.fill(" ".join(text.split()), width=width, initial_indent=prefix,
                                 subsequent_indent=" " * len(prefix), break_long_words=False,
                                 break_on_hyphens=False)

        counts = (f"{self.num_test} case(s) to predict" if self.prediction_input else
                  f"{self.num_training} preprocessed case(s) of {self.preprocessed}" if self.preprocessed else
                  f"{self.num_training} training case(s), {self.num_test} test case(s)")
        lines = [f"Checked {self.folder}: {counts}"
                 + ("" if self.values_checked else " (voxel values not read: --no-values)")]
        if self.errors:
            lines.append(f"\nERRORS ({len(self.errors)}):")
            lines += [para("- ", e) for e in self.errors]
        if self.errors and self.fix:
            lines.append("\n" + para("FIX: ", self.fix))
        if self.warnings:
            lines.append(f"\nWARNINGS ({len(self.warnings)}):")
            lines += [para("- ", w) for w in self.warnings]
        next_step = ("nnUNetv2_predict" if self.prediction_input else "nnUNetv2_train" if self.preprocessed else
                     "nnUNetv2_plan_and_preprocess")
        if self.ok:
            lines.append(f"\nOK: no errors ({len(self.warnings)} warning(s)). The dataset is ready for "
                         f"{next_step}.")
        else:
            lines.append(f"\nFAILED: {len(self.errors)} error(s), {len(self.warnings)} warning(s). Fix the errors "
                         f"before {next_step}.")
        return printable("\n".join(lines))


# ---------------------------------------------------------------------------------------------------------------
# dataset.json


@dataclass
class _Meta:
    """What the case checks need from dataset.json (best guesses where dataset.json is broken)."""

    file_ending: Optional[str] = None
    num_channels: Optional[int] = None
    channel_names: Dict[str, str] = field(default_factory=dict)
    allowed_labels: Optional[List[int]] = None  # None: labels unusable, label values not checked
    num_training: Optional[int] = None


def _is_int(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def _read_dataset_json(folder: str, report: CheckReport) -> Optional[dict]:
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


def _check_dataset_json(data: dict, report: CheckReport) -> _Meta:
    meta = _Meta()
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


# ---------------------------------------------------------------------------------------------------------------
# file layout


def _guess_ending(names: Sequence[str]) -> Optional[str]:
    for ending in NIFTI_ENDINGS:
        if any(n.endswith(ending) for n in names):
            return ending
    return None


def _list(folder: str) -> List[str]:
    """Visible files of ``folder``, broken symbolic links included (they are reported when read)."""
    return sorted(n for n in os.listdir(folder) if not n.startswith(".")
                  and (os.path.isfile(os.path.join(folder, n)) or os.path.islink(os.path.join(folder, n))))


def _scan_images(folder: str, sub: str, ending: str, report: CheckReport
                 ) -> Dict[str, Dict[int, str]]:
    """case -> {channel index: path} for the files in ``folder/sub``; reports badly named files."""
    cases: Dict[str, Dict[int, str]] = {}
    other: List[str] = []
    for name in _list(os.path.join(folder, sub)):
        if not name.endswith(ending):
            other.append(name)
            continue
        m = _CHANNEL_RE.match(name[:-len(ending)])
        if not m:
            report.errors.append(f"{sub}/{name}: the file name does not end in a 4-digit channel number. nnU-Net "
                                 f"expects {sub}/<case>_XXXX{ending} (e.g. {name[:-len(ending)]}_0000{ending} for "
                                 f"channel 0); rename it.")
            continue
        cases.setdefault(m.group("case"), {})[int(m.group("ch"))] = os.path.join(folder, sub, name)
    _report_odd_names(folder, sub, ending, sorted(cases), report)
    if other:
        report.warnings.append(f"{sub}: {len(other)} file(s) do not end in file_ending {ending!r} and are ignored by "
                               f"nnU-Net (e.g. {', '.join(other[:MAX_EXAMPLES])}). Convert or remove them if they "
                               f"are meant to be part of the dataset.")
    return cases


def _is_safe_id(case: str) -> bool:
    try:
        return safe_case_id(case) == case
    except ConversionError:
        return False


def _report_odd_names(folder: str, sub: str, ending: str, cases: List[str], report: CheckReport) -> None:
    """Hidden files that nnU-Net reads as cases (an error), and case identifiers that trip shells and other tools
    (a warning)."""
    hidden = sorted(n for n in os.listdir(os.path.join(folder, sub)) if n.startswith(".") and n.endswith(ending))
    for name in hidden:
        report.errors.append(f"{sub}/{name}: a hidden file that nnU-Net still reads as a case "
                             f"({_case_of(name, ending)!r}) and fails on or trains with ('._' files are macOS "
                             f"metadata left by copying from a Mac). Delete it, or rename it if it is a real case.")
    odd = [c for c in cases if not _is_safe_id(c)]
    if odd:
        report.warnings.append(f"{sub}: {len(odd)} case identifier(s) with spaces, non-ASCII characters, path "
                               f"separators or a leading '-' ({_examples([repr(c) for c in odd])}). nnU-Net reads "
                               f"them, but shell commands, other tools and other file systems may not. Rename the "
                               f"case's files (every channel, and the label), e.g. {odd[0]!r} -> "
                               f"{_suggest_id(odd[0])!r}; bsf-nnunet convert names cases this way.")


def _case_of(name: str, ending: str) -> str:
    m = _CHANNEL_RE.match(name[:-len(ending)])
    return m.group("case") if m else name[:-len(ending)]


def _suggest_id(case: str) -> str:
    try:
        return safe_case_id(case)
    except ConversionError:
        return "case001"


def _channel_layout_errors(sub: str, case: str, chans: Dict[int, str], n: Optional[int], ending: str,
                           meta: _Meta) -> List[str]:
    errs = []
    present = sorted(chans)
    expected = n if n is not None else max(present) + 1
    missing = [c for c in range(expected) if c not in chans]
    for c in missing:
        cname = meta.channel_names.get(str(c))
        what = f"channel {c}" + (f", {cname!r} in dataset.json channel_names" if cname else "")
        errs.append(f"case {case}: channel file {sub}/{case}_{c:04d}{ending} is missing ({what}); the case has "
                    f"{', '.join(f'{case}_{p:04d}{ending}' for p in present)}. Add the missing file (every case "
                    f"needs one file per channel), or remove the case's other files to leave the case out.")
    if n is not None:
        extra = [c for c in present if c >= n]
        for c in extra:
            errs.append(f"case {case}: {sub}/{case}_{c:04d}{ending} is channel {c}, but dataset.json channel_names "
                        f"declares only {n} channel(s) (0..{n - 1}). Add the channel to channel_names or remove "
                        f"the file.")
    return errs


def parse_channel_file(name: str, ending: str) -> Optional[Tuple[str, int]]:
    """(case, channel) of a file name ``<case>_XXXX<ending>``; None for other names."""
    m = _CHANNEL_RE.match(name[:-len(ending)]) if name.endswith(ending) else None
    return (m.group("case"), int(m.group("ch"))) if m else None


def channel_file_errors(sub: str, case: str, chans: Dict[int, str], channel_names: dict, ending: str) -> List[str]:
    """The missing and surplus channel files of one case (``chans``: channel -> path; ``sub``: the folder name
    shown) against dataset.json's ``channel_names``: the messages of this check, for nnUNetv2_predict's input."""
    meta = _Meta(file_ending=ending, num_channels=len(channel_names) or None,
                 channel_names={str(k): str(v) for k, v in channel_names.items()})
    return _channel_layout_errors(sub, case, chans, meta.num_channels, ending, meta)


# ---------------------------------------------------------------------------------------------------------------
# per-case voxel checks (run in worker processes when num_workers > 1)


@dataclass
class _CaseTask:
    case: str
    sub: str  # imagesTr or imagesTs
    images: List[Tuple[str, str]]  # (absolute path, path relative to the dataset folder)
    label: Optional[Tuple[str, str]]
    allowed_labels: Optional[List[int]]
    check_values: bool


@dataclass
class _CaseResult:
    case: str
    sub: str
    errors: List[str] = field(default_factory=list)
    spacing: Optional[Tuple[float, ...]] = None
    shape: Optional[Tuple[int, ...]] = None
    flat_reported: bool = False  # the 2D error is given once per case, not once per file


def _why(e: Exception, path: str, rel: str) -> str:
    text = " ".join(str(e).replace(path, rel).split())
    return f"{type(e).__name__}: {text[:200]}" if text else type(e).__name__


def _load(path: str, rel: str, case: str, errors: List[str]):
    import nibabel as nib

    if os.path.islink(path) and not os.path.exists(path):
        errors.append(f"case {case}: {rel} is a symbolic link to {os.readlink(path)}, which does not exist (source "
                      f"moved or deleted, or a relative link broken by moving the dataset). Restore the source or "
                      f"rerun the converter (without --link it copies the files).")
        return None
    try:
        return nib.load(path)
    except Exception as e:  # any reader failure is a bad file
        errors.append(_unreadable(e, path, rel, case, "cannot read"))
        return None


def _voxels(img, rel: str, case: str, errors: List[str]) -> Optional[np.ndarray]:
    try:
        return np.asanyarray(img.dataobj)
    except Exception as e:  # truncated gzip, short file, ...
        errors.append(_unreadable(e, img.get_filename() or rel, rel, case, "cannot read the voxels of"))
        return None


def _unreadable(e: Exception, path: str, rel: str, case: str, verb: str) -> str:
    """The error for a file nibabel cannot read: what is wrong with it (an HTML page, cut short, ...) and the fix."""
    wrong, todo = diagnose_unreadable(path, e)
    return (f"case {case}: {verb} {rel}: the file {wrong.replace(path, rel)}. Fix: {todo}, or rerun the converter; "
            f"or remove the case's files to leave it out.")


def _nonfinite(arr: np.ndarray) -> int:
    if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.complexfloating)):
        return 0
    return int(arr.size - np.count_nonzero(np.isfinite(arr)))


def count_nonfinite_voxels(path: str, chunk_bytes: int = 64 * 2 ** 20) -> Tuple[int, int]:
    """(NaN/Inf voxels, all voxels) of a NIfTI file, read with nibabel in slabs of about ``chunk_bytes`` (memory
    stays bounded for big images). Files stored as integers are not read: they cannot hold NaN/Inf. Raises if the
    file cannot be read."""
    import nibabel as nib

    img = nib.load(path, keep_file_open=True)  # one open (gzip) stream for all slabs, read front to back
    shape = tuple(int(s) for s in img.shape)
    size = int(np.prod(shape))
    slope, inter = getattr(img.dataobj, "slope", 1.0), getattr(img.dataobj, "inter", 0.0)
    if not np.issubdtype(img.get_data_dtype(), np.inexact) and np.isfinite([slope, inter]).all():
        return 0, size
    if not shape:
        return _nonfinite(np.asanyarray(img.dataobj)), size
    per_slab = max(1, size // shape[-1]) * 8  # voxels are float64 once scaled
    step = max(1, chunk_bytes // per_slab)
    bad = 0
    for start in range(0, shape[-1], step):
        bad += _nonfinite(np.asanyarray(img.dataobj[..., start:start + step]))
    return bad, size


def nonfinite_finding(case: str, rel: str, bad: int, size: int) -> str:
    """The finding of a NaN/Inf error (no full stop): which case, which file, how many voxels."""
    return f"case {case}: {rel} has {bad} NaN/Inf voxel(s) (of {size})"


def _nonfinite_error(case: str, rel: str, bad: int, size: int) -> str:
    effect = ("training would see wrong labels" if rel.startswith("labelsTr") else
              "prediction would see wrong intensities" if rel.startswith("imagesTs") else
              "training would see wrong intensities")
    return (f"{nonfinite_finding(case, rel, bad, size)}. SimpleITK, which nnU-Net uses to read "
            f"NIfTI, would silently read them as 0, so {effect} without any error. Fix: "
            f"replace them and re-save (e.g. img = nibabel.load(f); nibabel.save(nibabel.Nifti1Image("
            f"np.nan_to_num(img.get_fdata(), nan=0, posinf=0, neginf=0), img.affine, img.header), f)), or rerun "
            f"the converter (bsf-nnunet convert refuses such files), or leave the case out.")


def _fmt_shape(shape) -> str:
    return "x".join(str(int(s)) for s in shape)


def _geometry(img, rel: str, case: str, sub: str, res: _CaseResult) -> bool:
    """Dimensionality checks of one file; False when the file cannot be compared further."""
    errors = res.errors
    shape = tuple(int(s) for s in img.shape)
    if len(shape) > 3:
        if any(s > 1 for s in shape[3:]):
            errors.append(f"case {case}: {rel} is a 4D file (shape {_fmt_shape(shape)}) with {int(np.prod(shape[3:]))}"
                          f" volumes inside. nnU-Net wants one 3D file per channel: split it into {case}_0000, "
                          f"{case}_0001, ... (one per volume, each listed in dataset.json channel_names)"
                          + (" - a label must be a single 3D volume" if sub == "labelsTr" else "") + ".")
        else:
            errors.append(f"case {case}: {rel} has shape {_fmt_shape(shape)}, i.e. extra singleton axes after the "
                          f"third. nnU-Net reads such files as 4D; drop the extra axes (np.squeeze) and save it as a "
                          f"3D file.")
        return False
    spatial = shape + (1,) * (3 - len(shape))
    if sum(s > 1 for s in spatial) < 3:
        if res.flat_reported:
            return False
        res.flat_reported = True
        errors.append(f"case {case}: {rel} is 2D (shape {_fmt_shape(shape)}), but BrainSegFounder's Swin-UNETR is a "
                      f"3D network and needs 3D volumes. For 2D data use nnU-Net's 2d configuration with a stock "
                      f"trainer instead (nnUNetv2_plan_and_preprocess -d ID -c 2d; nnUNetv2_train ID 2d FOLD), not "
                      f"a BSFTrainer.")
        return False
    aff = np.asarray(img.affine, dtype=float)
    zooms = np.linalg.norm(aff[:3, :3], axis=0)
    if not np.all(np.isfinite(aff)) or not np.all(zooms > 0):
        errors.append(f"case {case}: {rel} has an invalid affine (voxel sizes {np.round(zooms, 4).tolist()}, "
                      f"non-finite or zero). Fix the header (set the voxel spacing and orientation), e.g. by "
                      f"re-saving it with the affine of a correct file of the same scan.")
        return False
    return True


def _compare(img, ref, rel: str, ref_rel: str, case: str, errors: List[str]) -> None:
    if tuple(img.shape) != tuple(ref.shape):
        errors.append(f"case {case}: shape mismatch: {rel} is {_fmt_shape(img.shape)} but {ref_rel} is "
                      f"{_fmt_shape(ref.shape)}. All channels and the label of a case must be on the same voxel "
                      f"grid; resample/crop them onto one grid (e.g. the first channel's) or leave the case out.")
        return
    a = np.asarray(img.affine, dtype=float)
    b = np.asarray(ref.affine, dtype=float)
    vox = float(np.linalg.norm(b[:3, :3], axis=0).min())
    tol = max(AFFINE_RTOL * vox, 1e-6)
    if not np.allclose(a, b, rtol=0, atol=tol):
        d = float(np.abs(a - b).max())
        sa = np.round(np.linalg.norm(a[:3, :3], axis=0), 4).tolist()
        sb = np.round(np.linalg.norm(b[:3, :3], axis=0), 4).tolist()
        spacing = (f"voxel spacing {sa} vs {sb}" if not np.allclose(sa, sb, rtol=0, atol=tol)
                   else f"same spacing {sb}, different origin/orientation")
        errors.append(f"case {case}: affine mismatch: {rel} and {ref_rel} have different affines (largest "
                      f"difference {d:.4g}, tolerance {tol:.3g} = {AFFINE_RTOL:g} x voxel size; {spacing}). The "
                      f"files are not on the same grid: register/resample them onto one grid. If the difference "
                      f"is only header rounding, re-save {rel} with the affine and header of {ref_rel}.")


def _check_case(task: _CaseTask) -> _CaseResult:
    res = _CaseResult(task.case, task.sub)
    try:
        _check_case_inner(task, res)
    except Exception as e:  # the checker must never crash on a bad case
        res.errors.append(f"case {task.case}: the check failed unexpectedly ({type(e).__name__}: {e}). Inspect the "
                          f"case's files ({', '.join(r for _, r in task.images)}) by hand.")
    return res


def _check_case_inner(task: _CaseTask, res: _CaseResult) -> None:
    errors = res.errors
    ref = None  # (img, rel) of the first good image
    for path, rel in task.images:
        img = _load(path, rel, task.case, errors)
        if img is None or not _geometry(img, rel, task.case, task.sub, res):
            continue
        if ref is None:
            ref = (img, rel)
            aff = np.asarray(img.affine, dtype=float)
            res.spacing = tuple(float(z) for z in np.linalg.norm(aff[:3, :3], axis=0))
            res.shape = tuple(int(s) for s in img.shape[:3])
        else:
            _compare(img, ref[0], rel, ref[1], task.case, errors)
        if task.check_values:
            arr = _voxels(img, rel, task.case, errors)
            if arr is not None:
                bad = _nonfinite(arr)
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
    bad = _nonfinite(arr)
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


def _run_cases(tasks: list, num_workers: int, report: CheckReport, check=None) -> list:
    """``check(task)`` (default: :func:`_check_case`) for every task, in ``num_workers`` processes."""
    check = check or _check_case
    if num_workers <= 1 or len(tasks) <= 1:
        return [check(t) for t in tasks]
    results: Dict[int, _CaseResult] = {}
    try:
        with ProcessPoolExecutor(max_workers=min(num_workers, len(tasks)),
                                 mp_context=multiprocessing.get_context("spawn")) as ex:
            futures = {i: ex.submit(check, t) for i, t in enumerate(tasks)}
            for i, f in futures.items():
                results[i] = f.result()
    except Exception as e:  # BrokenProcessPool (a worker died), pickling, spawn failures
        left = [t for i, t in enumerate(tasks) if i not in results]
        why = "a worker process died (out of memory?)" if isinstance(e, BrokenProcessPool) else \
            f"the worker processes failed ({type(e).__name__}: {e})"
        report.warnings.append(f"{why} while checking; the "
                               f"{len(left)} case(s) left were checked in this process instead. Use -np 1 (or "
                               f"fewer workers) for big images.")
        for i, t in enumerate(tasks):
            if i not in results:
                results[i] = check(t)
    return [results[i] for i in range(len(tasks))]


# ---------------------------------------------------------------------------------------------------------------
# entry point


def _examples(items: List[str]) -> str:
    more = f" and {len(items) - MAX_EXAMPLES} more" if len(items) > MAX_EXAMPLES else ""
    return ", ".join(items[:MAX_EXAMPLES]) + more


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
    data = _read_dataset_json(folder, report)
    meta = _check_dataset_json(data, report) if data is not None else _Meta()
    has = _subfolders(folder, report)
    try:
        names = [n for sub, present in has.items() if present for n in _list(os.path.join(folder, sub))]
    except OSError as e:
        report.errors.append(f"cannot list the dataset folder ({e}); check the permissions.")
        return
    ending = _file_ending(meta, names, has, data is not None, report)
    if ending is None:
        return
    train = _scan_images(folder, "imagesTr", ending, report) if has["imagesTr"] else {}
    label_files = _scan_labels(folder, ending, report) if has["labelsTr"] else {}
    report.num_training = len(train)
    tasks = _training_tasks(folder, train, label_files, has, names, ending, meta, check_values, report)
    if has["imagesTs"]:
        tasks += _test_tasks(folder, ending, meta, check_values, report)
    _report_geometry(_run_cases(tasks, num_workers, report), report)


def _subfolders(folder: str, report: CheckReport) -> Dict[str, bool]:
    """Which of imagesTr, labelsTr and imagesTs exist; the first two missing are errors."""
    has = {sub: os.path.isdir(os.path.join(folder, sub)) for sub in ("imagesTr", "labelsTr", "imagesTs")}
    for sub in ("imagesTr", "labelsTr"):
        if not has[sub]:
            report.errors.append(f"{sub}: the folder {os.path.join(folder, sub)} is missing. An nnU-Net raw dataset "
                                 f"keeps the training images in imagesTr/<case>_XXXX<file_ending> and their labels "
                                 f"in labelsTr/<case><file_ending>; create it and put the files there.")
    return has


def _file_ending(meta: _Meta, names: List[str], has: Dict[str, bool], have_json: bool,
                 report: CheckReport) -> Optional[str]:
    """dataset.json's file_ending, else the one the files have (a warning); None (an error) when none is usable."""
    if meta.file_ending is not None:
        return meta.file_ending
    ending = _guess_ending(names)
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
    for name in _list(os.path.join(folder, "labelsTr")):
        if name.endswith(ending):
            label_files[name[:-len(ending)]] = os.path.join(folder, "labelsTr", name)
        else:
            other.append(name)
    if other:
        report.warnings.append(f"labelsTr: {len(other)} file(s) do not end in file_ending {ending!r} and are "
                               f"ignored by nnU-Net (e.g. {', '.join(other[:MAX_EXAMPLES])}).")
    return label_files


def _training_tasks(folder: str, train: Dict[str, Dict[int, str]], label_files: Dict[str, str],
                    has: Dict[str, bool], names: List[str], ending: str, meta: _Meta, check_values: bool,
                    report: CheckReport) -> List[_CaseTask]:
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
        report.errors.extend(_channel_layout_errors("imagesTr", case, chans, meta.num_channels, ending, meta))
        lab = label_files.get(case)
        if lab is None and has["labelsTr"]:
            report.errors.append(f"case {case}: the label file labelsTr/{case}{ending} is missing (the case has "
                                 f"images in imagesTr). Every training case needs a label; add it, or move the "
                                 f"case's images to imagesTs (unlabelled/test cases).")
        if ending.lower() in NIFTI_ENDINGS:
            tasks.append(_CaseTask(case, "imagesTr",
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


def _test_tasks(folder: str, ending: str, meta: _Meta, check_values: bool, report: CheckReport) -> List[_CaseTask]:
    """Reports the channel layout errors of the imagesTs cases; returns their per-case checks (NIfTI only)."""
    test = _scan_images(folder, "imagesTs", ending, report)
    report.num_test = len(test)
    tasks = []
    for case in sorted(test):
        chans = test[case]
        report.errors.extend(_channel_layout_errors("imagesTs", case, chans, meta.num_channels, ending, meta))
        if ending.lower() in NIFTI_ENDINGS:
            tasks.append(_CaseTask(case, "imagesTs",
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
            small.append(f"{r.case} ({_fmt_shape(r.shape)})")
    if aniso:
        report.warnings.append(f"anisotropic spacing (max/min > {ANISOTROPY_LIMIT:g}) in {len(aniso)} case(s): "
                               f"{_examples(aniso)}. This works: nnU-Net resamples (and may plan a lower-resolution "
                               f"or anisotropic setup); just be aware that thick slices limit what the model sees.")
    if small:
        report.warnings.append(f"image smaller than {SMALL_AXIS} voxels on an axis in {len(small)} case(s): "
                               f"{_examples(small)}. This works: such images are padded by nnU-Net to the patch "
                               f"(Swin-UNETR patches are at least {SMALL_AXIS} per axis).")


# ---------------------------------------------------------------------------------------------------------------
# prediction input (nnUNetv2_predict -i FOLDER)


def check_prediction_input(input_folder: str, dataset_folder: str, output_folder: Optional[str] = None,
                           check_values: bool = True, num_workers: int = 1) -> CheckReport:
    """Check the input folder of ``nnUNetv2_predict -i`` against the dataset.json of the model (``dataset_folder``:
    the raw dataset or the trained model's results folder, both hold dataset.json): every case has one file per
    channel of channel_names, shapes and affines agree between a case's channels, no NaN/Inf voxels; and, given
    ``output_folder``, that it can be written. Never raises for bad input and never writes into ``input_folder``."""
    input_folder = os.path.abspath(os.fspath(input_folder))
    report = CheckReport(folder=input_folder, values_checked=check_values, prediction_input=True)
    try:
        data = _read_dataset_json(os.path.abspath(os.fspath(dataset_folder)), report)
        meta = _check_dataset_json(data, report) if data is not None else _Meta()
        if not os.path.isdir(input_folder):
            report.errors.append(f"{input_folder} is not a folder. nnUNetv2_predict -i takes a folder of "
                                 f"<case>_XXXX<file_ending> files, one per channel.")
            return report
        ending = meta.file_ending or _guess_ending(_list(input_folder)) or ".nii.gz"
        parent, sub = os.path.split(input_folder)
        cases = _scan_images(parent, sub, ending, report)
        report.num_test = len(cases)
        if not cases:
            report.errors.append(f"{sub}: no cases found (files <case>_XXXX{ending}). Put one file per channel per "
                                 f"case there, named like imagesTs of an nnU-Net raw dataset.")
        tasks = []
        for case in sorted(cases):
            chans = cases[case]
            report.errors.extend(_channel_layout_errors(sub, case, chans, meta.num_channels, ending, meta))
            if ending.lower() in NIFTI_ENDINGS:
                tasks.append(_CaseTask(case, sub, [(chans[c], f"{sub}/{os.path.basename(chans[c])}")
                                                   for c in sorted(chans)], None, None, check_values))
        for r in _run_cases(tasks, max(1, int(num_workers)), report):
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


# ---------------------------------------------------------------------------------------------------------------
# preprocessed data (nnU-Net 2.8: <case>.b2nd, <case>_seg.b2nd and <case>.pkl, or <case>.npz and <case>.pkl, per
# configuration in $nnUNet_preprocessed/DatasetXXX_Name/<data_identifier>)

_NON_PLANS_JSON = ("dataset.json", "dataset_fingerprint.json", "splits_final.json")


@dataclass
class PreprocessedFolder:
    """A configuration's folder of preprocessed cases and the command that remakes it."""

    folder: str
    dataset: str  # DatasetXXX_Name
    plans: Optional[str] = None
    configuration: Optional[str] = None

    def fix(self) -> str:
        m = re.match(r"Dataset(\d{3})_", self.dataset)
        d = str(int(m.group(1))) if m else self.dataset
        c = self.configuration or "CONFIGURATION"
        custom = self.plans not in (None, "nnUNetPlans")
        return (f"re-run preprocessing: nnUNetv2_preprocess -d {d} -c {c}"
                f"{f' -plans_name {self.plans}' if custom else ''} (it rewrites every case in {self.folder}; train "
                f"nothing on it meanwhile), then continue training with --c. If the raw case itself is broken, fix "
                f"it first (bsf-nnunet check -d {d}), or remove it from $nnUNet_raw and delete splits_final.json. "
                f"bsf-nnunet check -d {d} --preprocessed -c {c}{f' -p {self.plans}' if custom else ''} lists every "
                f"bad case.")


def _data_identifier(configurations: dict, name: str) -> Optional[str]:
    conf, seen = configurations.get(name), set()
    while isinstance(conf, dict) and "data_identifier" not in conf and conf.get("inherits_from") not in seen:
        seen.add(conf.get("inherits_from"))
        conf = configurations.get(conf.get("inherits_from"))
    return conf.get("data_identifier") if isinstance(conf, dict) else None


def describe_preprocessed_folder(folder: str) -> PreprocessedFolder:
    """The dataset, plans and configuration whose preprocessed cases live in ``folder`` (looked up in the plans
    files next to it; unknown parts stay None)."""
    folder = os.path.abspath(folder)
    base = os.path.dirname(folder)
    info = PreprocessedFolder(folder, os.path.basename(base))
    try:
        names = sorted(n for n in os.listdir(base)
                       if n.endswith(".json") and n not in _NON_PLANS_JSON and not n.startswith("."))
    except OSError:
        return info
    for name in names:
        try:
            with open(os.path.join(base, name)) as f:
                configurations = json.load(f).get("configurations") or {}
        except (OSError, ValueError, AttributeError):
            continue
        for conf in configurations:
            if _data_identifier(configurations, conf) == os.path.basename(folder):
                info.plans, info.configuration = name[:-len(".json")], conf
                return info
    return info


def _read_b2nd(path: str) -> np.ndarray:
    import blosc2

    return blosc2.open(urlpath=path, mode="r")[:]


def _read_npz(path: str) -> dict:
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


def _read_pickle(path: str):
    import pickle

    with open(path, "rb") as f:
        return pickle.load(f)  # nnU-Net's own properties file, which nnU-Net unpickles anyway


def _read_part(folder: str, name: str, reader, problems: List[str]):
    path = os.path.join(folder, name)
    if not os.path.exists(path):
        problems.append(f"{name} is missing")
        return None
    try:
        return reader(path)
    except Exception as e:  # blosc2, zipfile, pickle and OS errors come in many types
        problems.append(f"{name} cannot be read ({_why(e, path, name)}): truncated or corrupt")
        return None


def preprocessed_case_problems(folder: str, case: str, kind: str) -> List[str]:
    """Read every file of one preprocessed case completely (``kind``: ``b2nd`` or ``npz``, the dataset format);
    one phrase per problem, each naming the file."""
    problems: List[str] = []
    if kind == "b2nd":
        data = _read_part(folder, case + ".b2nd", _read_b2nd, problems)
        seg = _read_part(folder, case + "_seg.b2nd", _read_b2nd, problems)
    else:
        arrays = _read_part(folder, case + ".npz", _read_npz, problems)
        data, seg = (arrays or {}).get("data"), (arrays or {}).get("seg")
        if arrays is not None and (data is None or seg is None):
            problems.append(f"{case}.npz lacks its {'data' if data is None else 'seg'} array")
        for suffix, ref in ((".npy", data), ("_seg.npy", seg)):  # unpacked copies, read instead of the .npz
            if os.path.exists(os.path.join(folder, case + suffix)):
                arr = _read_part(folder, case + suffix, np.load, problems)
                if arr is not None and ref is not None and arr.shape != ref.shape:
                    problems.append(f"{case}{suffix} has shape {arr.shape}, its .npz {ref.shape}")
    props = _read_part(folder, case + ".pkl", _read_pickle, problems)
    if props is not None and not (isinstance(props, dict) and "class_locations" in props):
        problems.append(f"{case}.pkl is not nnU-Net's properties of a training case (no class_locations)")
    for name, arr in (("data", data), ("seg", seg)):
        if arr is not None and arr.ndim != 4:
            problems.append(f"its {name} has shape {arr.shape}, not (channels, z, y, x)")
    if data is not None and seg is not None and data.ndim == seg.ndim == 4 and data.shape[1:] != seg.shape[1:]:
        problems.append(f"data {data.shape} and seg {seg.shape} differ in size")
    if data is not None and _nonfinite(data):
        problems.append(f"its data has {_nonfinite(data)} NaN/Inf value(s)")
    return problems


def preprocessed_case_error(folder: str, case: str, kind: str, error: BaseException) -> str:
    """The message for a preprocessed case that could not be loaded: the case, its bad files and the fix."""
    problems = preprocessed_case_problems(folder, case, kind)
    why = f"{type(error).__name__}: {' '.join(str(error).split())[:300]}"
    found = ("; ".join(problems) if problems else
             f"{why}, yet its files read completely now (a passing I/O error? if it repeats, suspect the file system)")
    return (f"Cannot load the preprocessed case {case} of {folder}: {found}. "
            f"Fix: {describe_preprocessed_folder(folder).fix()}")


@dataclass
class _PreprocessedTask:
    folder: str
    case: str
    kind: str


def _check_preprocessed_case(task: _PreprocessedTask) -> _CaseResult:
    res = _CaseResult(task.case, os.path.basename(task.folder))
    try:
        problems = preprocessed_case_problems(task.folder, task.case, task.kind)
    except Exception as e:
        problems = [f"the check failed unexpectedly ({type(e).__name__}: {e})"]
    if problems:
        res.errors.append(f"case {task.case}: " + "; ".join(problems) + ".")
    return res


def _preprocessed_cases(folder: str, kind: str) -> List[str]:
    suffixes = ("_seg.b2nd", ".b2nd", ".pkl") if kind == "b2nd" else ("_seg.npy", ".npy", ".npz", ".pkl")
    cases = set()
    for name in os.listdir(folder):
        for suffix in suffixes:
            if name.endswith(suffix) and not name.startswith("."):
                cases.add(name[:-len(suffix)])
                break
    return sorted(cases)


def _split_cases(dataset_folder: str, report: CheckReport) -> List[str]:
    path = os.path.join(dataset_folder, "splits_final.json")
    if not os.path.isfile(path):
        return []
    try:
        with open(path) as f:
            return sorted({k for split in json.load(f) for part in ("train", "val") for k in split.get(part, [])})
    except (OSError, ValueError, AttributeError, TypeError) as e:
        report.errors.append(f"splits_final.json: cannot read {path} ({e}). Delete it (nnU-Net then makes a new "
                             f"5-fold split) or fix it.")
        return []


def _configuration_folder(dataset_folder: str, configuration: str, plans: str, report: CheckReport
                          ) -> Optional[str]:
    d = os.path.basename(dataset_folder)
    plans_file = os.path.join(dataset_folder, plans + ".json")
    try:
        with open(plans_file) as f:
            configurations = json.load(f).get("configurations") or {}
    except (OSError, ValueError, AttributeError) as e:
        report.errors.append(f"cannot read the plans {plans_file} ({e}). Plan and preprocess first "
                             f"(nnUNetv2_plan_and_preprocess -d {d} -c {configuration}), or name the plans with -p.")
        return None
    ident = _data_identifier(configurations, configuration)
    if ident is None:
        report.errors.append(f"the plans {plans_file} have no configuration {configuration!r} (they have "
                             f"{', '.join(sorted(configurations))}). Pass one of those with -c.")
        return None
    folder = os.path.join(dataset_folder, ident)
    if not os.path.isdir(folder):
        report.errors.append(f"configuration {configuration} of {d} is not preprocessed: {folder} does not exist. "
                             f"Run nnUNetv2_preprocess -d {d} -c {configuration}.")
        return None
    return folder


def check_preprocessed_dataset(dataset_folder: str, configuration: str = "3d_fullres", plans: str = "nnUNetPlans",
                               num_workers: int = 1) -> CheckReport:
    """Read every preprocessed case of ``configuration`` completely (data, seg, properties) and report each case
    that is missing a file or has a truncated or corrupt one, with the command that remakes them. ``dataset_folder``
    is ``$nnUNet_preprocessed/DatasetXXX_Name``. Cases listed in splits_final.json count as expected. Never raises
    for bad data and never writes."""
    dataset_folder = os.path.abspath(os.fspath(dataset_folder))
    report = CheckReport(folder=dataset_folder, preprocessed=configuration)
    try:
        folder = _configuration_folder(dataset_folder, configuration, plans, report)
        if folder is None:
            return report
        report.folder = folder
        names = os.listdir(folder)
        kind = "b2nd" if any(n.endswith(".b2nd") for n in names) else "npz"
        cases = sorted(set(_preprocessed_cases(folder, kind)) | set(_split_cases(dataset_folder, report)))
        report.num_training = len(cases)
        if not cases:
            report.errors.append(f"{folder} holds no preprocessed cases. Run nnUNetv2_preprocess -d "
                                 f"{os.path.basename(dataset_folder)} -c {configuration}.")
        tasks = [_PreprocessedTask(folder, c, kind) for c in cases]
        for r in _run_cases(tasks, max(1, int(num_workers)), report, _check_preprocessed_case):
            report.errors.extend(r.errors)
        if report.errors:
            report.fix = describe_preprocessed_folder(folder).fix()
            report.fix = report.fix[0].upper() + report.fix[1:]
    except Exception as e:
        report.errors.append(f"the check itself failed unexpectedly ({type(e).__name__}: {e}). Please report this as "
                             f"a bsf-nnunet bug.")
    return report
