"""Checks of the input of ``nnUNetv2_predict`` against a BSF model, per case, before anything is predicted.

* A case with fewer (or more) channel files than the model's ``channel_names`` is refused, naming the case and the
  missing ``_000X`` files (the messages of ``bsf-nnunet check --predict-input``). nnU-Net itself groups whatever
  ``<case>_XXXX`` files it finds and fails much later, inside the network, without naming the case.
* A case whose voxel spacing differs from the training data's median spacing (``original_median_spacing_after_transp``
  of the plans) by more than :data:`SPACING_FACTOR` on any axis, or whose orientation (nibabel axis codes, e.g.
  ``RAS``) is not a typical one of the training images (at least :data:`TYPICAL_SHARE` of them), is predicted with
  one warning naming the case, the file, what was found and expected, and what to do. nnU-Net reads the voxel array
  as stored, so a case whose axes are swapped or flipped relative to the training images is seen rotated or
  mirrored.

The training images' orientations are recorded by BSF trainers in the results folder's ``plans.json`` (the
configuration's ``bsf`` block, :data:`ORIENTATIONS_KEY`); for older models they are read from the headers of the raw
training images in ``$nnUNet_raw`` where that exists, and otherwise orientation is not checked. Only NIfTI headers are
read (nibabel, no voxels); other formats are not checked for geometry.
"""
from __future__ import annotations

import os
import sys
from collections import Counter
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from ..datasets.cases import NIFTI_ENDINGS
from ..datasets.check_layout import channel_file_errors, parse_channel_file
from ..errors import BSFError

SPACING_FACTOR = 2.0  # warn when a case's spacing is more than 2x coarser or finer than the training median
TYPICAL_SHARE = 0.25  # an orientation is typical when at least a quarter of the training images have it
MAX_HEADERS = 50  # training images whose headers are read to find their orientations
ORIENTATIONS_KEY = "training_orientations"  # {"RAS": 12, ...} in the plans' configuration "bsf" block
_AXIS_NAMES = "ijk"
_ANATOMICAL_AXIS = {c: i for i, pair in enumerate(("LR", "PA", "IS")) for c in pair}

Log = Callable[[str], None]


class PredictionInputError(BSFError, ValueError):
    """A case in the input of nnUNetv2_predict does not have the model's channel files."""


def _warn(message: str) -> None:
    print(f"WARNING (bsf-nnunet): {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------------------------
# channels


def _case_channels(files: Sequence[str], ending: str) -> Tuple[str, Dict[int, str]]:
    """(case, {channel: path}) of one case's file list as nnU-Net groups it; files not named <case>_XXXX<ending>
    count by position."""
    parsed = [parse_channel_file(os.path.basename(f), ending) for f in files]
    if files and all(p is not None for p in parsed):
        return parsed[0][0], {ch: f for (_, ch), f in zip(parsed, files, strict=True)}
    name = os.path.basename(files[0]) if files else "?"
    case = name[:-len(ending)] if name.endswith(ending) else name
    return case, dict(enumerate(files))


def channel_errors(list_of_lists: Sequence[Sequence[str]], dataset_json: dict) -> List[str]:
    """One message per missing or surplus channel file of the cases nnUNetv2_predict is about to predict."""
    ending = dataset_json["file_ending"]
    names = dataset_json["channel_names"]
    errors = []
    for files in list_of_lists:
        case, chans = _case_channels(files, ending)
        sub = os.path.basename(os.path.dirname(os.path.abspath(files[0]))) if files else "input"
        errors += channel_file_errors(sub, case, chans, names, ending)
    return errors


# ---------------------------------------------------------------------------------------------------------------
# geometry


def _reorients(plans: dict) -> bool:
    """True when the model's image reader reorients every image to RAS (the *WithReorient readers)."""
    return "Reorient" in str(plans.get("image_reader_writer", ""))


def expected_spacing(plans: dict) -> Optional[Tuple[float, ...]]:
    """The training images' median spacing in the axis order of the files (nibabel's i, j, k), or None."""
    median = plans.get("original_median_spacing_after_transp")
    back = plans.get("transpose_backward", [0, 1, 2])
    if not median or len(median) != 3:
        return None
    reader_order = [float(median[b]) for b in back]  # nnU-Net's readers give (k, j, i)
    return tuple(reader_order[::-1])


def _zooms_and_codes(img, reorient: bool) -> Tuple[Tuple[float, ...], str]:
    """Voxel sizes along the file's axes (along R, A, S for a reorienting reader) and the axis codes."""
    import nibabel as nib

    aff = np.asarray(img.affine, dtype=float)
    zooms = np.linalg.norm(aff[:3, :3], axis=0)
    codes = "".join(nib.orientations.aff2axcodes(aff))
    if reorient:
        ornt = nib.orientations.io_orientation(aff)
        canonical = np.empty(3)
        for i in range(3):
            canonical[int(ornt[i, 0])] = zooms[i]
        zooms = canonical
    return tuple(float(z) for z in zooms), codes


def orientation_counts(files: Sequence[str]) -> Dict[str, int]:
    """{axis codes: number of files} of the NIfTI files' headers (unreadable files are skipped)."""
    import nibabel as nib

    counts: Counter = Counter()
    for f in files:
        try:
            counts["".join(nib.orientations.aff2axcodes(nib.load(f).affine))] += 1
        except Exception:  # a bad file is reported by the data checks, not here
            continue
    return dict(counts)


def raw_training_orientations(dataset_name: str, dataset_json: Optional[dict] = None) -> Optional[Dict[str, int]]:
    """Orientations of the first channel of up to MAX_HEADERS raw training images of ``dataset_name`` in
    $nnUNet_raw; None without a raw dataset or NIfTI images."""
    from nnunetv2.utilities.utils import get_filenames_of_train_images_and_targets

    from ..paths import nnunet_folder

    raw = nnunet_folder("nnUNet_raw", required=False)
    folder = os.path.join(raw, dataset_name) if raw and dataset_name else None
    if folder is None or not os.path.isdir(folder):
        return None
    try:
        cases = get_filenames_of_train_images_and_targets(folder, dataset_json)
    except Exception:  # a broken raw dataset: orientation is then simply not checked
        return None
    files = [v["images"][0] for _, v in sorted(cases.items()) if v.get("images")]
    files = [f for f in files if f.lower().endswith(NIFTI_ENDINGS)][:MAX_HEADERS]
    return orientation_counts(files) or None


def training_orientations(plans: dict, configuration: dict, dataset_json: Optional[dict] = None
                          ) -> Optional[Dict[str, int]]:
    """The orientations recorded in the plans by the trainer, else those of the raw training images, else None."""
    recorded = (configuration.get("bsf") or {}).get(ORIENTATIONS_KEY)
    if isinstance(recorded, dict) and recorded:
        return {str(k): int(v) for k, v in recorded.items()}
    return raw_training_orientations(plans.get("dataset_name", ""), dataset_json)


def typical_orientations(counts: Dict[str, int]) -> List[str]:
    """The orientations of at least TYPICAL_SHARE of the training images, most common first."""
    total = sum(counts.values())
    return [c for c, n in sorted(counts.items(), key=lambda kv: -kv[1]) if total and n >= TYPICAL_SHARE * total]


def orientation_difference(found: str, expected: str) -> str:
    """How the axis codes ``found`` differ from ``expected``, e.g. 'voxel axes i and j swapped'."""
    swapped = [i for i in range(3) if _ANATOMICAL_AXIS[found[i]] != _ANATOMICAL_AXIS[expected[i]]]
    flipped = [i for i in range(3) if i not in swapped and found[i] != expected[i]]
    parts = []
    if swapped:
        parts.append(f"voxel axes {' and '.join(_AXIS_NAMES[i] for i in swapped)} swapped")
    if flipped:
        parts.append(f"voxel axis {' and '.join(_AXIS_NAMES[i] for i in flipped)} flipped")
    return ", ".join(parts)


def _mm(values) -> str:
    return " x ".join(f"{v:.3g}" for v in values) + " mm"


def spacing_warning(case: str, rel: str, found, expected) -> Optional[str]:
    """The warning for a case whose spacing is more than SPACING_FACTOR off the training median on an axis."""
    ratios = [f / e for f, e in zip(found, expected, strict=True) if e > 0]
    if len(ratios) != 3:
        return None
    off = {i: r for i, r in enumerate(ratios) if r > SPACING_FACTOR or r < 1 / SPACING_FACTOR}
    if not off:
        return None
    what = ", ".join(f"axis {_AXIS_NAMES[i]} is {r if r > 1 else 1 / r:.3g}x {'coarser' if r > 1 else 'finer'}"
                     for i, r in off.items())
    effect = ("detail missing from thick slices cannot be recovered, so expect a poorer segmentation of this case"
              if any(r > 1 for r in off.values()) else "fine detail is lost in the resampling")
    return (f"case {case}: {rel} has voxel spacing {_mm(found)} (axes i, j, k of the file), but the model was trained "
            f"on images with a median spacing of {_mm(expected)}: {what} (more than {SPACING_FACTOR:g}x off). It is "
            f"predicted (nnU-Net resamples it to the model's spacing), but {effect}. If the voxel size in the header "
            f"is wrong, fix the header (pixdim); otherwise use a scan closer to the training resolution.")


def orientation_warning(case: str, rel: str, found: str, typical: List[str]) -> Optional[str]:
    """The warning for a case whose orientation is none of the typical ones of the training images."""
    if not typical or found in typical:
        return None
    return (f"case {case}: {rel} has orientation {found} (nibabel axis codes), but the training images are "
            f"{' or '.join(typical)}: {orientation_difference(found, typical[0])}. nnU-Net reads the voxels as "
            f"stored, so the model sees this case rotated or mirrored and its segmentation may be wrong. Reorient "
            f"the image to {typical[0]} (e.g. nibabel.as_closest_canonical for RAS, fslreorient2std for LAS) "
            f"keeping its header consistent, or fix the header if it, not the voxels, is wrong.")


def case_geometry_warnings(case: str, path: str, rel: str, spacing, typical: List[str], reorient: bool = False
                           ) -> List[str]:
    """The spacing and orientation warnings of one case, from the header of its first channel file ``path``
    (``rel``: the name shown). ``spacing``: the training median in file axis order, or None; ``typical``: the
    typical training orientations ([] skips the orientation check)."""
    import nibabel as nib

    if not path.lower().endswith(NIFTI_ENDINGS):
        return []
    try:
        img = nib.load(path)
        if len(img.shape) != 3:
            return []  # 2D/4D files fail in nnU-Net's reader with their own error
        zooms, codes = _zooms_and_codes(img, reorient)
    except Exception:  # unreadable files fail in nnU-Net's reader, naming the file
        return []
    found = [spacing_warning(case, rel, zooms, spacing) if spacing else None,
             None if reorient else orientation_warning(case, rel, codes, typical)]
    return [w for w in found if w]


# ---------------------------------------------------------------------------------------------------------------
# the whole input


def check_prediction_cases(list_of_lists: Sequence[Sequence[str]], plans: dict, configuration: dict,
                           dataset_json: dict, warn: Log = _warn) -> None:
    """Refuse the input when a case lacks (or has surplus) channel files; warn once per case about far-off spacing
    or orientation. ``list_of_lists``: one list of files per case, as nnUNetPredictor groups them."""
    errors = channel_errors(list_of_lists, dataset_json)
    if errors:
        n = len(dataset_json["channel_names"])
        raise PredictionInputError(
            f"nnUNetv2_predict: the input does not match the model, which takes {n} channel file(s) per case "
            f"(dataset.json channel_names {dict(dataset_json['channel_names'])}); nothing was predicted:\n  - "
            + "\n  - ".join(errors),
            hint="add the missing files or move the incomplete cases out of the input folder, then run the same "
                 "command again (bsf-nnunet check -d <the model's results folder> --predict-input FOLDER lists every "
                 "problem of the input).")
    reorient = _reorients(plans)
    spacing = expected_spacing(plans)
    counts = None if reorient else training_orientations(plans, configuration, dataset_json)
    typical = typical_orientations(counts) if counts else []
    for files in list_of_lists:
        if not files:
            continue
        case, _ = _case_channels(files, dataset_json["file_ending"])
        rel = os.path.join(os.path.basename(os.path.dirname(os.path.abspath(files[0]))), os.path.basename(files[0]))
        for w in case_geometry_warnings(case, files[0], rel, spacing, typical, reorient):
            warn(w)


def record_training_orientations(trainer) -> None:
    """Store the raw training images' orientations in the trainer's plans (saved to the results folder's plans.json
    by nnU-Net's on_train_start), for the orientation check of nnUNetv2_predict. Never stops a training."""
    try:
        counts = raw_training_orientations(trainer.plans_manager.dataset_name, trainer.dataset_json)
    except Exception:  # a convenience record: a failure only turns the check off
        counts = None
    if not counts:
        return
    saved = trainer.plans_manager.plans["configurations"][trainer.configuration_name]
    for conf in {id(c): c for c in (saved, trainer.configuration_manager.configuration)}.values():
        conf.setdefault("bsf", {})[ORIENTATIONS_KEY] = counts
