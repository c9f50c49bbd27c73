"""BraTS 2021 (RSNA-ASNR-MICCAI) <-> nnU-Net v2 raw format.

Input (training or validation download)::

    SRC/BraTS2021_00000/BraTS2021_00000_{flair,t1,t1ce,t2,seg}.nii.gz     (seg only in the training data)

Output ``$nnUNet_raw/DatasetXXX_BraTS2021``:

* channels in the order of the published BrainSegFounder weights: 0 FLAIR, 1 T1ce, 2 T1, 3 T2;
* labels: BraTS 0/1/2/4 -> 0/1/2/3, i.e. 1 = necrotic/non-enhancing tumour core (NCR), 2 = peritumoural
  oedema (ED), 3 = enhancing tumour (ET). (nnU-Net's own Dataset137 script swaps 1 and 2; we keep the BraTS
  meaning of 1 and 2);
* region-based training: whole tumour [1, 2, 3], tumour core [1, 3], enhancing tumour [3], with
  ``regions_class_order`` [2, 1, 3] (nnU-Net paints WT as 2, then TC as 1, then ET as 3, which gives back
  ED = WT - TC, NCR = TC - ET, ET);
* cases with a ``seg`` go to imagesTr/labelsTr, cases without (validation data) to imagesTs.

:func:`convert_predictions_back` maps predictions 0/1/2/3 back to BraTS 0/1/2/4 for submission.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Iterator, Optional

import numpy as np

from .convert import CaseProblem, CaseSpec, ConversionError, DatasetInfo, nifti_stem, require_dir, walk_dirs
from .convert_cases import label_image_like, save_nifti_atomic
from .convert_report import _log
from .convert_run import run_conversion
from .parallel import parallel_imap

CHANNELS = ["FLAIR", "T1ce", "T1", "T2"]
MODALITY_SUFFIX = {"FLAIR": "flair", "T1ce": "t1ce", "T1": "t1", "T2": "t2"}
BRATS_TO_NNUNET = {0: 0, 1: 1, 2: 2, 4: 3}
NNUNET_TO_BRATS = {0: 0, 1: 1, 2: 2, 3: 4}
LABELS = {"background": 0, "whole_tumor": [1, 2, 3], "tumor_core": [1, 3], "enhancing_tumor": [3]}
REGIONS_CLASS_ORDER = [2, 1, 3]
LABEL_HINT = ("BraTS 2021 segmentations hold 0, 1 (NCR), 2 (ED) and 4 (ET) only; a 3 usually means the file was "
              "already converted (0/1/2/3) or comes from another BraTS edition. Put the original BraTS 2021 "
              "seg file back, or leave the case out.")

DATASET_INFO = DatasetInfo(
    name="BraTS2021", channel_names=CHANNELS, labels=LABELS, regions_class_order=REGIONS_CLASS_ORDER,
    label_hint=LABEL_HINT,
    extra={"description": "BraTS 2021 (RSNA-ASNR-MICCAI) glioma segmentation. Labels: 1 NCR, 2 ED, 3 ET "
                          "(BraTS 4); channels in BrainSegFounder order FLAIR, T1ce, T1, T2.",
           "reference": "https://www.synapse.org/#!Synapse:syn25829067/wiki/610863",
           "licence": "see the BraTS 2021 data use agreement"})


def _modality_files(dirpath: str, files) -> dict:
    """{'flair': path, ..., 'seg': path} from the file names ``<anything>_<mod>.nii[.gz]`` of one case folder."""
    found = {}
    for n in files:
        stem = nifti_stem(n)
        if stem is None or "_" not in stem:
            continue
        mod = stem.rsplit("_", 1)[1].lower()
        if mod in ("flair", "t1", "t1ce", "t2", "seg"):
            found.setdefault(mod, []).append(os.path.join(dirpath, n))
    return found


def iter_cases(src: str, split: str = "auto") -> Iterator[CaseSpec]:
    """Case folders anywhere under ``src`` (a folder holding ``*_flair``/``*_t1``/... NIfTI files), lazily."""
    if split not in ("auto", "train", "test"):
        raise ConversionError(f"split must be auto, train or test, not {split!r}")
    src = require_dir(src, "BraTS source folder")
    for dirpath, dirs, files in walk_dirs(src):
        found = _modality_files(dirpath, files)
        if not found:
            continue
        dirs[:] = []       # a case folder: do not descend
        case = os.path.basename(dirpath)
        problem, hint = None, ""
        images = []
        for ch in CHANNELS:
            paths = found.get(MODALITY_SUFFIX[ch], [])
            if len(paths) > 1:
                problem = problem or f"several {ch} files: {[os.path.basename(p) for p in paths]}"
                hint = hint or "keep one file per modality in the case folder"
            images.append(paths[0] if paths else None)
        missing = [ch for ch, p in zip(CHANNELS, images, strict=True) if p is None]
        if missing and not problem:
            problem = (f"missing channel(s) {', '.join(missing)} (no {case}_"
                       f"{MODALITY_SUFFIX[missing[0]]}.nii.gz in {dirpath})")
            hint = "download the case again or leave it out"
        segs = found.get("seg", [])
        label = segs[0] if segs else None
        if split == "test" or (split == "auto" and label is None):
            spl, label = "Ts", None
        else:
            spl = "Tr"
            if label is None and not problem:
                problem, hint = f"no segmentation ({case}_seg.nii.gz) in {dirpath}", \
                    "add it, or convert with --split auto/test to put the case into imagesTs"
        yield CaseSpec(case_id=case, images=images, label=label, split=spl, label_mode="map",
                       label_map=BRATS_TO_NNUNET, problem=problem, hint=hint, source=dirpath)


def convert_brats2021(src: str, dataset_id: int, raw_root: Optional[str] = None, *, split: str = "auto",
                      name: Optional[str] = None, **kw) -> dict:
    info = DATASET_INFO
    if name:
        info = dataclasses.replace(info, name=name)
    return run_conversion(iter_cases(src, split), info, dataset_id, raw_root, source=os.path.abspath(src),
                          converter="brats2021", **kw)


# ---------------------------------------------------------------------------------------------------------------
# predictions back to BraTS labels


def _back_one(job) -> dict:
    import nibabel as nib
    src, dst = job
    name = os.path.basename(src)
    try:
        img = nib.load(src)
        arr = np.asanyarray(img.dataobj)
        if np.issubdtype(arr.dtype, np.floating) and not np.all(np.isfinite(arr)):
            raise CaseProblem(f"{src} has NaN/Inf voxels", "this is not an nnU-Net prediction")
        vals = set(int(v) for v in np.unique(arr))
        bad = sorted(vals - set(NNUNET_TO_BRATS))
        if bad:
            hint = ("it looks like it is in BraTS labels (0/1/2/4) already" if bad == [4]
                    else "expected an nnU-Net prediction of the BraTS2021 dataset (0/1/2/3)")
            raise CaseProblem(f"{src} has label value(s) {bad}", hint)
        lut = np.array([NNUNET_TO_BRATS[i] for i in range(4)], np.uint8)
        out = lut[arr.astype(np.int64)]
        save_nifti_atomic(label_image_like(out, img), dst)
        return {"file": name, "status": "ok"}
    except CaseProblem as e:
        return {"file": name, "status": "bad", "reason": e.reason, "hint": e.hint}
    except Exception as e:
        return {"file": name, "status": "bad", "reason": f"cannot convert {src}: {e}",
                "hint": "check that the file is a readable NIfTI file"}


def convert_predictions_back(pred_dir: str, out_dir: str, num_workers: int = 1) -> dict:
    """nnU-Net predictions (0/1/2/3, our BraTS2021 dataset) -> BraTS labels (0/1/2/4), same file names and
    geometry, written atomically into ``out_dir``."""
    pred_dir = require_dir(pred_dir, "prediction folder")
    if os.path.abspath(out_dir) == pred_dir:
        raise ConversionError("the output folder must differ from the prediction folder (the predictions would "
                              "be overwritten); give another OUT.")
    names = sorted(n for n in os.listdir(pred_dir) if nifti_stem(n) is not None)
    if not names:
        raise ConversionError(f"no NIfTI files (.nii.gz/.nii) in {pred_dir}; is it the folder that "
                              f"nnUNetv2_predict -o wrote?")
    os.makedirs(out_dir, exist_ok=True)
    jobs = [(os.path.join(pred_dir, n), os.path.join(out_dir, n)) for n in names]
    results = sorted(parallel_imap(_back_one, jobs, num_workers), key=lambda r: r["file"])
    bad = [r for r in results if r["status"] != "ok"]
    for r in bad:
        _log(f"BAD {r['file']}: {r['reason']} -> {r['hint']}")
    _log(f"wrote {len(results) - len(bad)} BraTS-label file(s) (0/1/2/4) to {out_dir}; {len(bad)} bad.")
    return {"written": len(results) - len(bad), "bad": bad}
