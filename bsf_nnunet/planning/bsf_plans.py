"""``bsf-nnunet plan``: a named nnU-Net plans file with a BrainSegFounder-like 3d_fullres configuration.

Runs nnU-Net's own fingerprinting, planning (with a fixed target spacing and plans name) and preprocessing
through its Python API, then rewrites the 3d_fullres configuration for Swin-UNETR (patch size, batch size,
architecture). Train on it with ``nnUNetv2_train ID 3d_fullres FOLD -tr BSFTrainer -p BSFPlans``.
"""
from __future__ import annotations

import json
import math
import os
from typing import Optional, Sequence

from ..errors import ConfigurationError
from ..io import atomic_write_json
from ..paths import nnunet_folder
from .presets import bsf_plans_defaults
from .swin_config import check_user_patch, derive_swin_configuration


def make_bsf_plans(plans: dict, plans_name: str, variant: str, patch_size: Sequence[int], batch_size: int,
                   merging: str = "legacy", normalization: Optional[str] = None) -> tuple:
    """Return (new plans, notes): ``plans`` with only a Swin-UNETR 3d_fullres configuration, renamed; with
    ``normalization`` (a key of ``normalization.SCHEMES``) every channel is normalised with that scheme."""
    if "3d_fullres" not in plans.get("configurations", {}):
        raise ConfigurationError(
            f"The plans {plans.get('plans_name')!r} have no 3d_fullres configuration "
            f"(found: {sorted(plans.get('configurations', {}))}). BrainSegFounder is a 3D model: plan with "
            "`nnUNetv2_plan_and_preprocess -d ID -c 3d_fullres` or `bsf-nnunet plan -d ID`."
        )
    patch, note = check_user_patch(patch_size)
    notes = [note] if note else []
    conf = dict(plans["configurations"]["3d_fullres"])
    conf["patch_size"] = patch
    conf["batch_size"] = int(batch_size)
    conf, derived_notes = derive_swin_configuration(conf, variant=variant, merging=merging,
                                                    memory_budget_gb=math.inf)
    notes += derived_notes
    conf["data_identifier"] = f"{plans_name}_3d_fullres"
    if normalization is not None:
        conf = with_normalization(conf, normalization)
    new = dict(plans)
    new["plans_name"] = plans_name
    new["configurations"] = {"3d_fullres": conf}
    return new, notes


def with_normalization(conf: dict, normalization: str) -> dict:
    """A copy of ``conf`` (one configuration of a plans file) whose every channel is normalised with scheme
    ``normalization`` (a key of ``normalization.SCHEMES``: zscore, robust)."""
    from .normalization import SCHEMES

    if normalization not in SCHEMES:
        raise ConfigurationError(f"--normalization {normalization!r}: use one of {', '.join(SCHEMES)}.")
    return {**conf, "normalization_schemes": [SCHEMES[normalization]] * len(conf["normalization_schemes"])}


def set_plans_normalization(plans_file: str, normalization: str) -> None:
    """Rewrite ``plans_file`` so that every configuration normalises every channel with ``normalization``
    (before preprocessing: nnUNetv2_preprocess, nnUNetv2_train and nnUNetv2_predict then all apply it)."""
    with open(plans_file) as f:
        plans = json.load(f)
    plans["configurations"] = {name: (with_normalization(conf, normalization) if "normalization_schemes" in conf
                                      else conf) for name, conf in plans["configurations"].items()}
    atomic_write_json(plans_file, plans)


def plan_dataset(dataset_id: int, variant: Optional[str] = None, patch_size: Optional[Sequence[int]] = None,
                 spacing: Optional[Sequence[float]] = None, plans_name: Optional[str] = None,
                 batch_size: Optional[int] = None, num_processes: int = 4, preprocess: bool = True,
                 verbose: bool = True, normalization: Optional[str] = None) -> str:
    """Fingerprint (if needed), plan and preprocess ``dataset_id``; return the path of the written plans file."""
    from nnunetv2.experiment_planning.experiment_planners.default_experiment_planner import ExperimentPlanner
    from nnunetv2.experiment_planning.plan_and_preprocess_api import (
        extract_fingerprint_dataset,
        plan_experiment_dataset,
        preprocess_dataset,
    )
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name

    nnunet_folder("nnUNet_raw")
    preprocessed = nnunet_folder("nnUNet_preprocessed")
    defaults = bsf_plans_defaults()
    variant = variant or defaults["variant"]
    patch_size = list(patch_size or defaults["patch_size"])
    spacing = [float(s) for s in (spacing or defaults["spacing"])]
    plans_name = plans_name or defaults["plans_name"]
    batch_size = int(batch_size or defaults["batch_size"])
    if len(spacing) != 3 or min(spacing) <= 0:
        raise ConfigurationError(f"--spacing needs 3 positive values (z y x in mm), got {spacing}.")
    check_user_patch(patch_size)  # fail early on nonsense
    try:
        dataset_name = maybe_convert_to_dataset_name(int(dataset_id))
    except RuntimeError as e:
        raise ConfigurationError(f"Dataset {dataset_id}: {e}") from None
    fp = os.path.join(preprocessed, dataset_name, "dataset_fingerprint.json")
    if not os.path.isfile(fp):
        extract_fingerprint_dataset(int(dataset_id), num_processes=num_processes, check_dataset_integrity=True)
    _, plans_id = plan_experiment_dataset(int(dataset_id), ExperimentPlanner, overwrite_target_spacing=spacing,
                                          overwrite_plans_name=plans_name)
    plans_file = os.path.join(preprocessed, dataset_name, plans_id + ".json")
    with open(plans_file) as f:
        plans = json.load(f)
    new, notes = make_bsf_plans(plans, plans_name, variant, patch_size, batch_size, normalization=normalization)
    atomic_write_json(plans_file, new, indent=4)
    if verbose:
        c = new["configurations"]["3d_fullres"]
        print(f"Wrote {plans_file}: 3d_fullres spacing {c['spacing']}, patch {c['patch_size']}, batch "
              f"{c['batch_size']}, variant {variant}, normalization {', '.join(c['normalization_schemes'])}")
        for n in notes:
            print(f"  note: {n}")
    if preprocess:
        preprocess_dataset(int(dataset_id), plans_identifier=plans_name, configurations=("3d_fullres",),
                           num_processes=(num_processes,), verbose=False)
    return plans_file
