"""Reading the NIfTI files of one case and comparing their geometry, shared by the dataset checkers
(:mod:`.check_raw`, :mod:`.check_predict`), the converters (:mod:`.convert`) and the training guards.

* :func:`load_nifti` / :func:`read_voxels` read a file (nibabel, one file at a time: SimpleITK, which nnU-Net uses,
  silently reads NaN/Inf voxels as 0), :func:`canonical_voxels` reads an image turned to RAS+ (the demo's and the
  held-out sources' templates), and :func:`diagnose_unreadable` says why a file could not be read;
* :func:`count_nonfinite` / :func:`count_nonfinite_voxels` count NaN/Inf voxels;
* :func:`affine_mismatch` compares two affines with THE affine tolerance of the package, :func:`affine_tolerance`:
  :data:`AFFINE_RTOL` times the smallest voxel size of the reference file. A tolerance relative to the voxel size is
  a fraction of a voxel whatever the resolution (0.001 mm for 1 mm voxels, 0.0005 mm for 0.5 mm ones), where a
  fixed millimetre tolerance would be loose for fine grids and strict for coarse ones.
"""
from __future__ import annotations

import errno
import gzip
import os
import zlib
from typing import Optional, Tuple

import numpy as np

NIFTI_ENDINGS = (".nii.gz", ".nii")
AFFINE_RTOL = 1e-3  # affine tolerance as a fraction of the smallest voxel size
MIN_AFFINE_TOL = 1e-6  # floor of the tolerance (mm), for degenerate voxel sizes


def voxel_sizes(affine) -> np.ndarray:
    """The voxel size along each array axis (the lengths of the affine's first three columns)."""
    return np.linalg.norm(np.asarray(affine, dtype=float)[:3, :3], axis=0)


def affine_tolerance(ref_affine, rtol: float = AFFINE_RTOL) -> float:
    """The largest difference allowed between an affine and ``ref_affine``: ``rtol`` times the smallest voxel size
    of ``ref_affine`` (at least :data:`MIN_AFFINE_TOL`)."""
    vox = float(voxel_sizes(ref_affine).min())
    return max(rtol * vox if np.isfinite(vox) else 0.0, MIN_AFFINE_TOL)


def affine_mismatch(affine, ref_affine, rtol: float = AFFINE_RTOL) -> Optional[Tuple[float, float]]:
    """None when ``affine`` equals ``ref_affine`` within :func:`affine_tolerance`; else (largest difference,
    tolerance). Non-finite entries never match."""
    a = np.asarray(affine, dtype=float)
    b = np.asarray(ref_affine, dtype=float)
    tol = affine_tolerance(b, rtol)
    if np.allclose(a, b, rtol=0, atol=tol):
        return None
    return float(np.abs(a - b).max()), tol


def fmt_shape(shape) -> str:
    return "x".join(str(int(s)) for s in shape)


def load_nifti(path: str):
    """The nibabel image of ``path`` (header only; raises what nibabel raises, see :func:`diagnose_unreadable`)."""
    import nibabel as nib

    return nib.load(path)


def read_voxels(img) -> np.ndarray:
    """All voxels of a nibabel image (raises for a truncated or damaged file)."""
    return np.asanyarray(img.dataobj)


def canonical_voxels(img, dtype=None) -> Tuple[np.ndarray, np.ndarray]:
    """(voxels, float64 affine) of a nibabel image turned to the closest RAS+ orientation (``as_closest_canonical``)."""
    import nibabel as nib

    img = nib.as_closest_canonical(img)
    return np.asarray(img.dataobj, dtype=dtype), np.asarray(img.affine, dtype=np.float64)


def error_text(e: BaseException, path: str, rel: str) -> str:
    """``TypeName: message`` of an exception, with ``path`` shown as ``rel``, at most 200 characters."""
    text = " ".join(str(e).replace(path, rel).split())
    return f"{type(e).__name__}: {text[:200]}" if text else type(e).__name__


# ---------------------------------------------------------------------------------------------------------------
# NaN/Inf voxels


def count_nonfinite(arr: np.ndarray) -> int:
    """NaN/Inf entries of an array (0 for arrays that cannot hold them)."""
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
        return count_nonfinite(np.asanyarray(img.dataobj)), size
    per_slab = max(1, size // shape[-1]) * 8  # voxels are float64 once scaled
    step = max(1, chunk_bytes // per_slab)
    bad = 0
    for start in range(0, shape[-1], step):
        bad += count_nonfinite(np.asanyarray(img.dataobj[..., start:start + step]))
    return bad, size


def nonfinite_finding(case: str, rel: str, bad: int, size: int) -> str:
    """The finding of a NaN/Inf error (no full stop): which case, which file, how many voxels."""
    return f"case {case}: {rel} has {bad} NaN/Inf voxel(s) (of {size})"


# ---------------------------------------------------------------------------------------------------------------
# unreadable files

_GZIP_MAGIC = b"\x1f\x8b"
_NIFTI_MAGIC = (b"n+1\0", b"ni1\0", b"n+2\0", b"ni2\0")


def diagnose_unreadable(path: str, error: BaseException) -> Tuple[str, str]:
    """Why the NIfTI file ``path`` could not be read (``error``: the reader's exception), as ``(what is wrong, what
    to do)``; ``what is wrong`` continues a sentence that starts with the file's name. Tells apart a broken link, an
    empty file, a text/HTML page saved under a NIfTI name (a failed download), an uncompressed file named .gz and
    gzip data that is cut short or damaged (the whole file is decompressed to find out)."""
    if os.path.islink(path) and not os.path.exists(path):
        if _link_loop(path):
            return "is a symbolic link that leads back to itself (a link loop)", "replace the link with the file"
        return (f"is a symbolic link to {os.readlink(path)}, which does not exist",
                "restore the file it points to, or copy the file itself instead of linking it")
    try:
        with open(path, "rb") as f:
            head = f.read(512)
    except OSError as e:
        return f"cannot be opened ({e.strerror or e})", "check that the file exists and that you may read it"
    again = "copy or download the file again"
    if not head:
        return "is empty (0 bytes)", again
    if not head.startswith(_GZIP_MAGIC):
        if path.lower().endswith(".gz"):
            return _not_gzip(head)
        return f"is not a readable NIfTI file ({type(error).__name__}: {error})", again
    try:
        with gzip.open(path, "rb") as f:
            while f.read(1 << 24):
                pass
    except EOFError:
        return "is truncated: its gzip data ends early (an interrupted download or copy)", again
    except (OSError, zlib.error) as e:  # gzip.BadGzipFile is an OSError
        return f"is corrupt: damaged gzip data ({e})", again
    return f"is not a readable NIfTI file ({type(error).__name__}: {error})", again


def _link_loop(path: str) -> bool:
    try:
        os.stat(path)
    except OSError as e:
        return e.errno == errno.ELOOP
    return False


def _not_gzip(head: bytes) -> Tuple[str, str]:
    """``diagnose_unreadable`` for a file named .gz that does not start like gzip data."""
    printable = sum(32 <= b < 127 or b in b"\t\r\n" for b in head)
    if b"\0" not in head and printable >= 0.9 * len(head):
        text = " ".join(head[:60].decode("utf-8", "replace").split())
        kind = "an HTML page" if head.lstrip()[:1] == b"<" else "text"
        return (f"is not a NIfTI file but {kind} starting with {text!r} (a failed download saves the server's error "
                f"or login page under the file's name)",
                "download the file again (check the link and that you are logged in)")
    if head[344:348] in _NIFTI_MAGIC:
        return ("is an uncompressed NIfTI file although its name ends in .gz",
                "compress it (gzip -c FILE > NEW.nii.gz) or rename it to .nii")
    return (f"is corrupt: not gzip data although its name ends in .gz (it starts with bytes {head[:8].hex(' ')})",
            "copy or download the file again")
