"""Derive a Swin-UNETR configuration from an nnU-Net plans configuration.

nnU-Net plans patch sizes for its CNN (any multiple of its pooling factors). Swin-UNETR needs every patch axis to
be a multiple of 32 (patch embedding 2 then four 2x mergings) and at least 64 (a 32-voxel axis leaves a one-voxel
bottleneck that instance norm cannot normalise). We round each axis *up* (never below what nnU-Net planned), then
fit the batch size, and only when even batch 1 does not fit the memory budget we shrink the largest axis in steps
of 32, never below 64.
"""
from __future__ import annotations

import math
from copy import deepcopy
from typing import Optional, Sequence

from ..errors import ConfigurationError
from .presets import get_variant, variant_arch_kwargs

NETWORK_CLASS_NAME = "bsf_nnunet.network.swin_unetr.BSFSwinUNETR"
MIN_AXIS = 64
AXIS_MULTIPLE = 32
# fp32 weights + grads + two AdamW moments
BYTES_PER_PARAM_TRAINING = 16
CUDA_AMP_ACTIVATION_FACTOR = 0.55


def round_patch_axis(p: int) -> int:
    return max(MIN_AXIS, int(math.ceil(int(p) / AXIS_MULTIPLE)) * AXIS_MULTIPLE)


def nearest_valid_axes(p: int) -> tuple:
    """The valid axis sizes just below and above ``p`` (for error messages)."""
    lo = max(MIN_AXIS, (int(p) // AXIS_MULTIPLE) * AXIS_MULTIPLE)
    return lo, round_patch_axis(p) if round_patch_axis(p) != lo else lo + AXIS_MULTIPLE


def check_user_patch(patch: Sequence[int], allow_round: bool = True) -> tuple:
    """Validate a patch size given by a user: returns (patch, note). Rounds up (and says so) or refuses."""
    patch = [int(p) for p in patch]
    if len(patch) != 3:
        raise ConfigurationError(f"A 3D patch size needs 3 values (z y x), got {patch}.")
    rounded = [round_patch_axis(p) for p in patch]
    if rounded == patch:
        return patch, ""
    bad = {p: nearest_valid_axes(p) for p, r in zip(patch, rounded) if r != p}
    detail = "; ".join(f"{p} -> {lo} or {hi}" for p, (lo, hi) in bad.items())
    if not allow_round:
        raise ConfigurationError(
            f"Patch size {patch} is not valid for Swin-UNETR: every axis must be a multiple of 32 and at least 64. "
            f"Nearest valid sizes: {detail}."
        )
    return rounded, f"patch size {patch} rounded up to {rounded} (Swin-UNETR needs multiples of 32, >= 64)"


def estimate_training_memory_gb(variant: str, patch_size: Sequence[int], batch_size: int, device_type: str = "cpu",
                                use_checkpoint: bool = False) -> float:
    v = get_variant(variant)
    voxels = math.prod(int(p) for p in patch_size)
    act = v["memory_bytes_per_voxel"] * voxels * batch_size
    if device_type == "cuda":
        act *= CUDA_AMP_ACTIVATION_FACTOR
    if use_checkpoint:
        act *= 0.35
    params = v["params_m"] * 1e6 * BYTES_PER_PARAM_TRAINING
    return (act + params) / 1024 ** 3


def default_memory_budget_gb(device_type: str = "cpu") -> float:
    """Memory the training may use: ``BSF_MEMORY_GB`` if set, else 90% of the GPU or 70% of available RAM."""
    from ..settings import value

    budget = value("BSF_MEMORY_GB")
    if budget is not None:
        return budget
    if device_type == "cuda":
        import torch

        if torch.cuda.is_available():
            return 0.9 * torch.cuda.get_device_properties(0).total_memory / 1024 ** 3
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return 0.7 * int(line.split()[1]) / 1024 ** 2
    except OSError:
        pass
    return 16.0


def _planned_patch(conf: dict) -> list:
    """The plan's patch size as integers (any length; axes below 1 refused for a 3D one)."""
    raw_patch = conf.get("patch_size") or []
    if not isinstance(raw_patch, (list, tuple)):
        raw_patch = [raw_patch]
    try:
        planned = [int(round(float(p))) for p in raw_patch]
    except (TypeError, ValueError):
        raise ConfigurationError(
            f"patch_size {raw_patch!r} in the plans is not a list of numbers. Fix it in plans.json (e.g. [128, 128, "
            "128]) or rerun nnUNetv2_plan_and_preprocess.") from None
    if len(planned) == 3 and any(p < 1 for p in planned):
        raise ConfigurationError(
            f"patch_size {planned} in the plans has an axis below 1. Fix it in plans.json (every axis a multiple of "
            "32 and at least 64 for Swin-UNETR, e.g. [128, 128, 128]) or rerun nnUNetv2_plan_and_preprocess.")
    return planned


def _planned_batch(conf: dict) -> int:
    raw_batch = conf.get("batch_size", 2)
    try:
        if isinstance(raw_batch, bool) or float(raw_batch) < 1 or float(raw_batch) != int(float(raw_batch)):
            raise ValueError
    except (TypeError, ValueError):
        raise ConfigurationError(
            f"batch_size {raw_batch!r} in the plans is not a positive integer. Fix it in plans.json (e.g. 2); the "
            "trainer lowers it by itself if it does not fit the memory.") from None
    return int(float(raw_batch))


def _check_median(conf: dict) -> None:
    median = conf.get("median_image_size_in_voxels")
    if median is not None:
        try:
            [float(m) for m in median]
        except (TypeError, ValueError):
            raise ConfigurationError(
                f"median_image_size_in_voxels {median!r} in the plans is not a list of numbers. Rerun "
                "nnUNetv2_plan_and_preprocess to rewrite the plans.") from None


def _swin_patch(planned: list, patch_cap: Optional[int], median, notes: list) -> list:
    """The planned patch rounded up to Swin-UNETR's axis sizes and capped at ``patch_cap``; explained in ``notes``."""
    patch = [round_patch_axis(p) for p in planned]
    if patch != planned:
        notes.append(f"patch size {planned} (nnU-Net plan) rounded up to {patch} for Swin-UNETR (/32, >= 64)")
    if patch_cap is not None:
        cap = round_patch_axis(patch_cap)
        capped = [min(p, cap) for p in patch]
        if capped != patch:
            notes.append(f"patch size capped at {cap} per axis: {patch} -> {capped}")
            patch = capped
    if median is not None and any(float(m) < p for m, p in zip(median, patch)):
        notes.append(f"median image size {[round(float(m)) for m in median]} is smaller than the patch {patch} on "
                     "some axis: nnU-Net pads images to the patch size (training and inference)")
    return patch


def _fit_memory(variant: str, patch: list, batch: int, budget: float, device_type: str, notes: list) -> tuple:
    """``(patch, batch)`` within ``budget`` GiB: the batch lowered first, then the longest patch axis, 32 at a time;
    each patch step explained in ``notes``. Raises when even batch 1 with the smallest patch does not fit."""
    def fits(b, p):
        return estimate_training_memory_gb(variant, p, b, device_type) <= budget

    patch = list(patch)
    while batch > 1 and not fits(batch, patch):
        batch -= 1
    while not fits(batch, patch):
        i = max(range(3), key=lambda a: patch[a])
        if patch[i] - AXIS_MULTIPLE < MIN_AXIS:
            need = estimate_training_memory_gb(variant, patch, 1, device_type)
            raise ConfigurationError(
                f"Variant {variant!r} does not fit the memory budget of {budget:.1f} GiB even with batch size 1 and "
                f"patch {patch} (needs ~{need:.1f} GiB). Use a smaller variant (e.g. BSFTrainer_Tiny or "
                "BSFTrainer_Toy), a GPU with more memory, gradient checkpointing, or raise BSF_MEMORY_GB if the "
                "estimate is too pessimistic."
            )
        old = list(patch)
        patch[i] -= AXIS_MULTIPLE
        notes.append(f"memory: patch {old} -> {patch} to fit {budget:.1f} GiB")
    return patch, batch


def derive_swin_configuration(
    configuration: dict,
    variant: str = "small",
    merging: str = "legacy",
    memory_budget_gb: Optional[float] = None,
    device_type: str = "cpu",
    patch_cap: Optional[int] = None,
    max_batch_size: Optional[int] = None,
    extra_arch_kwargs: Optional[dict] = None,
) -> tuple:
    """Return ``(new_configuration, notes)`` for a Swin-UNETR of ``variant`` from an nnU-Net configuration dict.

    ``configuration`` is one entry of ``plans['configurations']`` (inheritance already resolved). The result keeps
    everything nnU-Net needs (spacing, normalisation, data identifier...) and replaces ``patch_size``,
    ``batch_size`` and ``architecture``; a ``bsf`` entry records what was derived and why.
    """
    if not isinstance(configuration, dict):
        raise ConfigurationError(
            f"A plans configuration must be a JSON object (dict), got {type(configuration).__name__}. The plans file "
            "is damaged: rerun nnUNetv2_plan_and_preprocess (or bsf-nnunet plan) to rewrite it.")
    conf = deepcopy(configuration)
    planned = _planned_patch(conf)
    planned_batch = _planned_batch(conf)
    _check_median(conf)
    if len(planned) != 3:
        raise ConfigurationError(
            f"BrainSegFounder trainers need a 3D configuration (e.g. 3d_fullres); this one has patch size {planned}. "
            "Use -c 3d_fullres (run nnUNetv2_plan_and_preprocess -c 3d_fullres if it is missing)."
        )
    get_variant(variant)  # validates the name
    notes = []
    patch = _swin_patch(planned, patch_cap, conf.get("median_image_size_in_voxels"), notes)
    budget = default_memory_budget_gb(device_type) if memory_budget_gb is None else float(memory_budget_gb)
    batch = max(1, planned_batch if max_batch_size is None else min(planned_batch, int(max_batch_size)))
    patch, batch = _fit_memory(variant, patch, batch, budget, device_type, notes)
    if batch != planned_batch:
        notes.append(f"batch size {planned_batch} -> {batch} to fit the memory budget of {budget:.1f} GiB")
    arch_kwargs = variant_arch_kwargs(variant)
    arch_kwargs.update({"merging": merging})
    if extra_arch_kwargs:
        arch_kwargs.update(extra_arch_kwargs)
    conf["patch_size"] = patch
    conf["batch_size"] = batch
    conf["architecture"] = {"network_class_name": NETWORK_CLASS_NAME, "arch_kwargs": arch_kwargs,
                            "_kw_requires_import": []}
    conf["bsf"] = {
        "variant": variant, "planned_patch_size": planned, "planned_batch_size": planned_batch,
        "memory_budget_gb": round(budget, 2),
        "estimated_memory_gb": round(estimate_training_memory_gb(variant, patch, batch, device_type), 2),
        "device_type": device_type, "notes": notes,
    }
    return conf, notes
