"""nnssl checkpoints (MIC-DKFZ/nnssl, self-supervised pretraining for nnU-Net), read and written.

What nnssl writes (``AbstractBaseTrainer.save_checkpoint``, src/nnssl/training/nnsslTrainer/AbstractTrainer.py) is
a dict with ``network_weights`` (the state dict), ``optimizer_state``, ``grad_scaler_state``, ``logging``,
``_best_ema``, ``current_epoch``, ``init_args``, ``trainer_name`` and ``nnssl_adaptation_plan``: the serialised
``AdaptationPlan`` (src/nnssl/adaptation_planning/adaptation_plan.py), see :data:`ADAPTATION_PLAN_FIELDS`.
nnssl's fine-tuning (the ``nnssl_finetuning_inclusion`` branch of TaWald/nnUNet: ``like_nnssl.py``,
``pretrainedTrainer.py``) reads only ``network_weights``, ``nnssl_adaptation_plan`` and, if present,
``citations``; its Hugging Face repositories hold ``adaptation_plan.json``, ``checkpoint_final.pth`` and
``config.json`` (downloaded "for download tracking", its content is not read).

nnssl itself has no Swin-UNETR network: its architectures are ResEncL, NoSkipResEncL, PrimusS/B/M/L,
ResidualEncoderUNet and PlainConvUNet, and its ``SwinUNETRTrainer`` pretrains a ResEnc-L CNN with Swin-UNETR's
pretext tasks. Those files are refused with :class:`NnsslArchitectureError`. Files whose plan names a Swin-UNETR
(``bsf_nnunet.network.swin_unetr.BSFSwinUNETR``, MONAI's ``SwinUNETR``), as :func:`write_nnssl_folder` writes
them, are read with their keys mapped onto ``swinViT.*``, ``encoder1.*``, ...
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from typing import List, Optional, Sequence, Tuple

import torch

from ..io import atomic_torch_save, atomic_write_json
from .loader import INPUT_CHANNEL_KEYS, CheckpointError

PLAN_KEY = "nnssl_adaptation_plan"
WEIGHTS_KEY = "network_weights"
CHECKPOINT_FILE = "checkpoint_final.pth"
PLAN_FILE = "adaptation_plan.json"
CONFIG_FILE = "config.json"
BSF_EXTRAS_KEY = "bsf"  # our additions to the adaptation plan; nnssl and its fine-tuning ignore unknown keys
BSF_CLASS_NAME = "bsf_nnunet.network.swin_unetr.BSFSwinUNETR"
# field names of nnssl's dataclasses (nnssl commit 70448644): AdaptationPlan, ArchitecturePlans, Plan, ConfigurationPlan
ADAPTATION_PLAN_FIELDS = ("architecture_plans", "pretrain_plan", "pretrain_num_input_channels",
                          "recommended_downstream_patchsize", "key_to_encoder", "key_to_stem", "keys_to_in_proj",
                          "key_to_lpe")
ARCHITECTURE_PLANS_FIELDS = ("arch_class_name", "arch_kwargs", "arch_kwargs_requiring_import")
PLAN_FIELDS = ("dataset_name", "plans_name", "original_median_spacing_after_transp", "image_reader_writer",
               "transpose_forward", "transpose_backward", "configurations", "experiment_planner_used")
CONFIGURATION_FIELDS = ("data_identifier", "preprocessor_name", "spacing_style", "normalization_schemes",
                        "use_mask_for_norm", "resampling_fn_data", "resampling_fn_data_kwargs", "resampling_fn_mask",
                        "resampling_fn_mask_kwargs", "spacing", "patch_size")
NNSSL_ARCHITECTURES = ("ResEncL", "NoSkipResEncL", "PrimusS", "PrimusB", "PrimusM", "PrimusL",
                       "ResidualEncoderUNet", "PlainConvUNet")


class NnsslArchitectureError(CheckpointError):
    """An nnssl checkpoint of an architecture other than Swin-UNETR (ResEnc-L, Primus, ...)."""


def is_nnssl_checkpoint(obj) -> bool:
    """True for a loaded dict in nnssl's format: ``network_weights`` plus an adaptation plan with its architecture.
    Our own pretraining checkpoints carry a plan too (for nnssl's fine-tuning) but are read as ``bsf_pretrain``:
    their ``bsf_metadata`` says more than the plan."""
    if not isinstance(obj, Mapping) or WEIGHTS_KEY not in obj or "bsf_metadata" in obj:
        return False
    plan = obj.get(PLAN_KEY)
    return isinstance(plan, Mapping) and isinstance(plan.get("architecture_plans"), Mapping)


def is_swin_unetr(class_name) -> bool:
    """Whether an architecture class name (dotted or not) names a Swin-UNETR."""
    return isinstance(class_name, str) and "swinunetr" in class_name.rsplit(".", 1)[-1].lower()


def _refuse(obj: Mapping, name, where: str) -> NnsslArchitectureError:
    trainer = obj.get("trainer_name")
    by = f" (pretrained by {trainer})" if isinstance(trainer, str) else ""
    swin_note = (" nnssl's Swin-UNETR pretraining trains a ResEnc-L CNN with Swin-UNETR's pretext tasks, not a "
                 "Swin transformer.") if isinstance(trainer, str) and "swin" in trainer.lower() else ""
    return NnsslArchitectureError(
        f"Checkpoint {where} is an nnssl pretraining checkpoint of architecture {name!r}{by}, not a Swin-UNETR: "
        f"bsf-nnunet fine-tunes Swin-UNETR networks only and cannot use these weights.{swin_note} Fine-tune it with "
        "nnssl's own adaptation for that architecture (nnUNetv2_preprocess_like_nnssl and nnUNetv2_train_pretrained "
        "of the nnssl fine-tuning branch of nnU-Net, see github.com/MIC-DKFZ/nnssl), or pass a Swin-UNETR checkpoint "
        "(a BrainSegFounder / MONAI file, or an nnssl-format file whose adaptation plan names a Swin-UNETR).")


def _key_prefix(state_dict: Mapping, plan: Mapping) -> str:
    """What stands before ``swinViT.`` in the file's keys: from ``key_to_encoder`` when it ends in ``swinViT``,
    else from the first key that holds ``swinViT.``; '' when the keys are BSF names already."""
    enc = str(plan.get("key_to_encoder") or "").rstrip(".")
    if enc == "swinViT" or enc.endswith(".swinViT"):
        return enc[: -len("swinViT")]
    first = next((k for k in state_dict if str(k).startswith("swinViT.") or ".swinViT." in str(k)), None)
    return first[: first.index("swinViT.")] if first else ""


def _bsf_keys(state_dict: Mapping, plan: Mapping, where: str) -> dict:
    """Tensors of ``state_dict`` under MONAI Swin-UNETR names (the prefix before ``swinViT.`` removed)."""
    prefix = _key_prefix(state_dict, plan)
    out = {}
    for k, v in state_dict.items():
        if torch.is_tensor(v):
            out[k[len(prefix):] if prefix and k.startswith(prefix) else k] = v
    if not any(k.startswith("swinViT.") or k.startswith("patch_embed.") for k in out):
        first = ", ".join(list(out)[:6])
        raise CheckpointError(
            f"Checkpoint {where}: its nnssl adaptation plan names a Swin-UNETR, but no tensor holds a Swin encoder "
            f"(key_to_encoder {plan.get('key_to_encoder')!r}; first keys: {first}). The file's plan does not match "
            "its weights; re-export it, or pass a Swin-UNETR checkpoint.")
    return out


def _pretrain_configuration(plan: Mapping) -> Tuple[Optional[str], dict]:
    configs = (plan.get("pretrain_plan") or {}).get("configurations") or {}
    name = next(iter(configs), None)
    return name, dict(configs[name]) if name is not None and isinstance(configs[name], Mapping) else {}


def read_nnssl(obj: Mapping, where: str) -> Tuple[dict, dict]:
    """``(state dict under BSF / MONAI Swin-UNETR names, metadata)`` of an nnssl checkpoint (see
    :func:`is_nnssl_checkpoint`). Raises :class:`NnsslArchitectureError` when its plan names another architecture.

    nnssl's plan records the number of input channels, not their names: ``channel_names`` is None unless the plan
    has our extras (``plan['bsf']``). ``merging`` / ``axis_order`` come from the architecture kwargs or the extras;
    when neither records them they are BSFSwinUNETR's defaults, marked ``*_assumed``."""
    plan = obj[PLAN_KEY]
    arch = plan["architecture_plans"]
    name = arch.get("arch_class_name")
    if not is_swin_unetr(name):
        raise _refuse(obj, name, where)
    state_dict = _bsf_keys(obj[WEIGHTS_KEY], plan, where)
    extras = plan.get(BSF_EXTRAS_KEY) if isinstance(plan.get(BSF_EXTRAS_KEY), Mapping) else {}
    arch_kwargs = dict(arch.get("arch_kwargs") or {})
    conf_name, conf = _pretrain_configuration(plan)
    meta = {
        "format": "nnssl", "network_class": name, "arch_kwargs": arch_kwargs,
        "trainer_name": obj.get("trainer_name"), "epoch": obj.get("current_epoch"), "configuration": conf_name,
        "channel_names": list(extras["channel_names"]) if extras.get("channel_names") else None,
        "num_input_channels": plan.get("pretrain_num_input_channels"),
        "patch_size": conf.get("patch_size"), "spacing": conf.get("spacing"),
        "normalization": conf.get("normalization_schemes"),
        "recommended_downstream_patchsize": plan.get("recommended_downstream_patchsize"),
    }
    for key, default in (("merging", "legacy"), ("axis_order", "zyx")):
        value = extras.get(key) or arch_kwargs.get(key)
        meta[key] = value or default
        if not value:
            meta[f"{key}_assumed"] = True
    if extras.get("variant"):
        meta["variant"] = extras["variant"]
    return state_dict, meta


def _plain(value):
    """JSON-friendly copy: tuples become lists, numpy scalars / arrays Python numbers / lists."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if hasattr(value, "tolist") and not torch.is_tensor(value):
        return value.tolist()
    if value is None or isinstance(value, (str, bool, int, float)):
        return value
    raise TypeError(f"cannot store {type(value).__name__} {value!r} in an nnssl adaptation plan")


def _configuration(name: str, patch_size, spacing, n_channels: int, normalization) -> dict:
    """nnssl's ConfigurationPlan fields, filled as nnssl's default planner does (resampling as it plans it)."""
    resampling = {"order_z": 0, "force_separate_z": None}
    return {
        "data_identifier": f"nnsslPlans_{name}", "preprocessor_name": "DefaultPreprocessor",
        "spacing_style": name if name in ("median", "onemmiso", "noresample") else "median",
        "normalization_schemes": list(normalization or ["ZScoreNormalization"] * n_channels),
        "use_mask_for_norm": [False] * n_channels,
        "resampling_fn_data": "resample_data_or_seg_to_shape",
        "resampling_fn_data_kwargs": {"is_seg": False, "order": 3, **resampling},
        "resampling_fn_mask": "resample_data_or_seg_to_shape",
        "resampling_fn_mask_kwargs": {"is_seg": True, "order": 1, **resampling},
        "spacing": list(spacing), "patch_size": list(patch_size),
    }


def adaptation_plan(arch_kwargs: Mapping, patch_size: Sequence[int], spacing: Sequence[float],
                    channel_names: Sequence[str], *, configuration: Optional[str] = None,
                    dataset_name: str = "BrainSegFounder", normalization: Optional[Sequence[str]] = None,
                    recommended_downstream_patchsize: Optional[Sequence[int]] = None,
                    extras: Optional[Mapping] = None) -> dict:
    """nnssl's serialised ``AdaptationPlan`` for a :class:`~bsf_nnunet.network.BSFSwinUNETR` pretrained with
    ``patch_size`` at ``spacing`` on ``channel_names`` (as JSON-ready dict).

    Keys follow nnssl's module paths (no trailing dot): encoder ``swinViT``, stem ``swinViT.patch_embed``, input
    projection ``swinViT.patch_embed.proj`` (nnssl's fine-tuning treats ``keys_to_in_proj`` as alternative names of
    one stem convolution, so ``encoder1``'s input convolutions are listed under ``bsf.input_channel_keys`` only);
    Swin-UNETR has no learned positional embedding (``key_to_lpe`` None). ``configuration`` defaults to nnssl's
    ``onemmiso`` for 1 mm isotropic spacing, else ``median``. Channel names, merging, axis order and ``extras`` go
    under ``plan['bsf']``, which nnssl does not read. nnssl's own ``AdaptationPlan.from_dict`` expects a
    ``DynamicArchitecturePlans`` in ``arch_kwargs``; it is not needed to fine-tune."""
    spacing = [float(s) for s in spacing]
    name = configuration or ("onemmiso" if all(s == 1.0 for s in spacing) else "median")
    kwargs = _plain(dict(arch_kwargs))
    n = len(channel_names)
    bsf = {"channel_names": [str(c) for c in channel_names], "merging": kwargs.get("merging", "legacy"),
           "axis_order": kwargs.get("axis_order", "zyx"), "input_channel_keys": [k[: -len(".weight")]
                                                                                 for k in INPUT_CHANNEL_KEYS]}
    bsf.update(_plain(dict(extras or {})))
    return {
        "architecture_plans": {"arch_class_name": BSF_CLASS_NAME, "arch_kwargs": kwargs,
                               "arch_kwargs_requiring_import": []},
        "pretrain_plan": {
            "dataset_name": dataset_name, "plans_name": "nnsslPlans", "original_median_spacing_after_transp": spacing,
            "image_reader_writer": "SimpleITKIO", "transpose_forward": [0, 1, 2], "transpose_backward": [0, 1, 2],
            "configurations": {name: _configuration(name, patch_size, spacing, n, normalization)},
            "experiment_planner_used": "bsf_nnunet",
        },
        "pretrain_num_input_channels": n,
        "recommended_downstream_patchsize": list(recommended_downstream_patchsize or patch_size),
        "key_to_encoder": "swinViT", "key_to_stem": "swinViT.patch_embed",
        "keys_to_in_proj": ["swinViT.patch_embed.proj"], "key_to_lpe": None,
        BSF_EXTRAS_KEY: bsf,
    }


def plan_for_bsf_metadata(meta: Mapping) -> dict:
    """The adaptation plan of a BSF checkpoint from its metadata (``bsf_metadata`` of a pretraining checkpoint, or
    what ``export`` reads from a results folder): architecture, patch, spacing, channels, normalisation, source."""
    source = {k: meta.get(k) for k in ("dataset", "plans", "configuration", "fold", "trainer", "stage")
              if meta.get(k) is not None}
    return adaptation_plan(meta["arch_kwargs"], meta["patch_size"], meta["spacing"], meta["channel_names"],
                           dataset_name=str(meta.get("dataset") or "BrainSegFounder"),
                           normalization=meta.get("normalization"),
                           extras={"variant": meta.get("variant"), "source": source})


def missing_plan_fields(plan: Mapping) -> List[str]:
    """nnssl field names absent from ``plan`` (``architecture_plans.arch_class_name`` style paths)."""
    missing = [f for f in ADAPTATION_PLAN_FIELDS if f not in plan]
    arch = plan.get("architecture_plans") or {}
    missing += [f"architecture_plans.{f}" for f in ARCHITECTURE_PLANS_FIELDS if f not in arch]
    pre = plan.get("pretrain_plan") or {}
    missing += [f"pretrain_plan.{f}" for f in PLAN_FIELDS if f not in pre]
    return missing


def _config_json(plan: Mapping) -> dict:
    """A short description of the model (nnssl's fine-tuning only downloads ``config.json``, it reads nothing)."""
    arch = plan["architecture_plans"]
    conf_name, conf = _pretrain_configuration(plan)
    return {"framework": "nnssl", "written_by": "bsf_nnunet", "architecture": arch["arch_class_name"],
            "arch_kwargs": arch.get("arch_kwargs"), "pretrain_num_input_channels": plan["pretrain_num_input_channels"],
            "channel_names": (plan.get(BSF_EXTRAS_KEY) or {}).get("channel_names"), "configuration": conf_name,
            "patch_size": conf.get("patch_size"), "spacing": conf.get("spacing"),
            "checkpoint": CHECKPOINT_FILE, "adaptation_plan": PLAN_FILE}


def write_nnssl_folder(out: str, state_dict: Mapping, plan: Mapping, *,
                       citations: Optional[Sequence[str]] = None) -> List[str]:
    """Write the folder nnssl's fine-tuning downloads from Hugging Face into ``out``: ``checkpoint_final.pth``
    (``{'network_weights', 'nnssl_adaptation_plan'[, 'citations']}``, loadable with ``torch.load(weights_only=True)``),
    ``adaptation_plan.json`` (the same plan) and ``config.json`` (see :func:`_config_json`). Each file is written
    atomically; other files in ``out`` stay. Returns the paths written."""
    missing = missing_plan_fields(plan)
    if missing:
        raise ValueError(f"not an nnssl adaptation plan (missing {', '.join(missing)}); build it with "
                         "adaptation_plan()")
    plan = _plain(plan)
    weights = {str(k): v.detach().cpu().contiguous() for k, v in state_dict.items() if torch.is_tensor(v)}
    if not weights:
        raise ValueError("the state dict holds no tensors")
    checkpoint = {WEIGHTS_KEY: weights, PLAN_KEY: plan}
    if citations:
        checkpoint["citations"] = [str(c) for c in citations]
    os.makedirs(out, exist_ok=True)
    paths = [os.path.join(out, f) for f in (CHECKPOINT_FILE, PLAN_FILE, CONFIG_FILE)]
    atomic_torch_save(checkpoint, paths[0])
    atomic_write_json(paths[1], plan)
    atomic_write_json(paths[2], _config_json(plan))
    return paths
