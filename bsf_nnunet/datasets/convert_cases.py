"""Verify one case and write its files (:func:`process_case`): all channels present, 3D, the same shape and
affine across channels and label, finite values, label values in the allowed set; then the files are copied, linked
or written atomically. A bad case is a :class:`~.convert.CaseProblem` and leaves no file behind."""
from __future__ import annotations

import gzip
import os
import shutil
from typing import Optional

import numpy as np

from ..io import DiskFullError, atomic_path, atomic_write_bytes
from .cases import affine_mismatch, count_nonfinite, diagnose_unreadable, load_nifti, read_voxels
from .convert import CaseProblem, CaseSpec, Options, output_files

# ---------------------------------------------------------------------------------------------------------------
# writing files


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


# ---------------------------------------------------------------------------------------------------------------
# one case


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


class CaseJob:
    """Picklable callable for the process pool."""

    def __init__(self, opts: Options):
        self.opts = opts

    def __call__(self, spec: CaseSpec) -> dict:
        return process_case(spec, self.opts)
