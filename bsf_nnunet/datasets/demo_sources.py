"""The templates the demo cases are made from (see :mod:`.demo_data`): real MRI with CSF/GM/WM maps read from public
wheels (nilearn's ICBM152, SPM's avg152 in spm-runtime, CAT12's IXI555 in deepmriprep; the held-out whole-head
sources of :mod:`.heldout_sources`) or a synthetic phantom, each cropped and resampled into a :class:`DemoSource`.
Files are read with nibabel and reoriented to RAS+ (``as_closest_canonical``); the packages are never imported."""
from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np
from scipy import ndimage
from scipy.special import expit

from ..errors import BSFError
from .cases import canonical_voxels
from .heldout_sources import HELDOUT_SOURCES, load_heldout_head

ICBM_FILES: dict[str, str] = {
    "t1": "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
    "gm": "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz",
    "wm": "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz",
}
INSTALL_HINT = ("pip install nilearn   (or: pip install 'bsf-nnunet[demo]'), "
                "or build the dataset with source='synthetic' (no extra package needed)")
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
        return canonical_voxels(nib.load(str(path)), dtype=np.float32)
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
    try:
        return canonical_voxels(img, dtype=np.float32)
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


# whole-head volumes without labels from the same wheel, for the demo's self-supervised stage only (issue #28): Colin27
# (one person scanned 27 times: a sharp head with bright scalp fat, unlike the blurred averages) and the MNI305
# average; SPM's canonical grid, so the same field of view as avg152 (down to the cerebellum: no neck); neither is one
# of the held-out sources' subjects or templates
UNLABELLED_SPM_FILES: dict[str, str] = {"spm_colin27": "canonical/single_subj_T1.nii",
                                        "spm_avg305": "canonical/avg305T1.nii"}


def load_unlabelled_source(name: str, spacing: float = 2.0, margin_mm: float = 6.0) -> DemoSource:
    """A whole-head T1 of :data:`UNLABELLED_SPM_FILES`, cropped to the head, with tissue maps of zeros (its label
    map is all background: the case is for pretraining, which never reads labels)."""
    if name not in UNLABELLED_SPM_FILES:
        raise DemoDataError(f"unknown unlabelled source {name!r}; known: {', '.join(UNLABELLED_SPM_FILES)}")
    ((t1, aff),) = _read_spm([UNLABELLED_SPM_FILES[name]])
    image = np.clip(t1, 0, None) / max(float(t1.max()), 1e-6)
    return _crop_resample(image, [np.zeros_like(image)] * 3, image > 0.05, aff, spacing, margin_mm)


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
