"""Turn a published (MONAI) fine-tuned Swin-UNETR checkpoint into an nnU-Net results folder.

    bsf-nnunet import-model model.pt --channels FLAIR,T1ce,T1,T2 --regions brats -d 137
    nnUNetv2_predict -i imgs -o pred -d 137 -c 3d_fullres -tr BSFTrainer_imported -p BSFImportedPlans -f all \
        -step_size 0.4

The plans reproduce the original inference: no resampling (the images' own spacing, given by --spacing),
z-score on the non-zero voxels of each channel, a 128^3 sliding window (--patch), sigmoid outputs for regions.
The network sees (x, y, z) arrays as in MONAI (``axis_order="xyz"``) and MONAI 0.9's patch merging (legacy).
BraTS outputs (TC, WT, ET) are reordered to (WT, TC, ET) so that nnU-Net paints WT, then TC, then ET.

Sliding window: the official BraTS test script (lab-smile/BrainSegFounder downstream/BraTS/finetuning/test.py) runs
MONAI's ``sliding_window_inference`` with overlap 0.6, its default constant blending and no test-time mirroring.
The checkpoint therefore allows no mirroring axes (``tta=True`` writes nnU-Net's (0, 1, 2): 8x the windows), and the
overlap becomes nnU-Net's ``-step_size 0.4``, which nnUNetv2_predict takes from its command line, not from the model:
:func:`predict_command` prints it. The windows are blended with constant weights as in the original
(``blending="constant"``, the default; the plans' ``bsf.inference_blending``, which ``nnunet_hooks`` applies in
nnUNetPredictor) or with nnU-Net's Gaussian (``blending="gaussian"``). What remains different: nnU-Net spreads its
windows evenly over the image, MONAI steps by ``int(0.4 * patch)`` and aligns the last window with the border.
"""
from __future__ import annotations

import os
from typing import Optional, Sequence

from ..io import atomic_folder, atomic_torch_save, atomic_write_json
from ..paths import nnunet_folder
from ..planning.presets import get_variant
from ..planning.swin_config import NETWORK_CLASS_NAME, check_user_patch
from .restore import restore_network

IMPORTED_TRAINER = "BSFTrainer_imported"
IMPORTED_PLANS = "BSFImportedPlans"

# MONAI BraTS models: output channels TC, WT, ET; BraTS labels 1 NCR, 2 ED, 4 ET (nnU-Net: 1, 2, 3)
BRATS_OUTPUT_ORDER = ("TC", "WT", "ET")
BRATS_REGIONS = {"whole_tumor": ("WT", [1, 2, 3], 2), "tumor_core": ("TC", [1, 3], 1),
                 "enhancing_tumor": ("ET", [3], 3)}

# The original's inference (downstream/BraTS/finetuning/test.py: MONAI sliding_window_inference, overlap 0.6, default
# mode "constant", no mirroring). nnU-Net's step size is the window stride as a fraction of the patch: 1 - overlap.
ORIGINAL_OVERLAP = 0.6
ORIGINAL_BLENDING = "constant"
BLENDINGS = ("constant", "gaussian")  # plans bsf.inference_blending: the original's weights, or nnU-Net's
STEP_SIZE = round(1.0 - ORIGINAL_OVERLAP, 6)
TTA_MIRROR_AXES = (0, 1, 2)


def inference_settings(tta: bool = False, blending: str = ORIGINAL_BLENDING) -> dict:
    """What the imported model's inference does, next to the original's (written into the checkpoint's
    ``bsf_metadata`` and IMPORTED_FROM.json)."""
    differences = ["nnU-Net places its windows evenly over the image, MONAI by a stride of int(0.4 * patch) with the "
                   "last one at the border"]
    if blending != ORIGINAL_BLENDING:
        differences.append("nnU-Net's Gaussian blending of overlapping windows (the original: constant weights)")
    if tta:
        differences.append("mirroring test-time augmentation (8x the windows), which the original does not use")
    return {
        "original": {"script": "lab-smile/BrainSegFounder downstream/BraTS/finetuning/test.py",
                     "sliding_window_overlap": ORIGINAL_OVERLAP, "blending": ORIGINAL_BLENDING, "mirroring": False},
        "step_size": STEP_SIZE,
        "predict_args": ["-step_size", str(STEP_SIZE)],
        "mirroring": bool(tta),
        "inference_allowed_mirroring_axes": list(TTA_MIRROR_AXES) if tta else None,
        "blending": blending,
        "differences": differences,
    }


def predict_command(dataset_id: int, inp: str = "INPUT", out: str = "OUTPUT") -> str:
    """The nnUNetv2_predict command for an imported model, with the original's window overlap."""
    return (f"nnUNetv2_predict -i {inp} -o {out} -d {dataset_id} -c 3d_fullres -tr {IMPORTED_TRAINER} "
            f"-p {IMPORTED_PLANS} -f all -step_size {STEP_SIZE}")


def _plans(dataset_name: str, num_channels: int, patch, spacing, arch_kwargs: dict, batch_size: int = 1,
           blending: str = ORIGINAL_BLENDING) -> dict:
    res_seg = {"is_seg": True, "order": 1, "order_z": 0, "force_separate_z": None}
    res_data = {"is_seg": False, "order": 3, "order_z": 0, "force_separate_z": None}
    conf = {
        "data_identifier": f"{IMPORTED_PLANS}_3d_fullres",
        "preprocessor_name": "DefaultPreprocessor",
        "batch_size": batch_size,
        "patch_size": list(patch),
        "median_image_size_in_voxels": list(patch),
        "spacing": list(spacing),
        "normalization_schemes": ["ZScoreNormalization"] * num_channels,
        "use_mask_for_norm": [True] * num_channels,
        "resampling_fn_data": "resample_data_or_seg_to_shape",
        "resampling_fn_seg": "resample_data_or_seg_to_shape",
        "resampling_fn_data_kwargs": res_data,
        "resampling_fn_seg_kwargs": res_seg,
        "resampling_fn_probabilities": "resample_data_or_seg_to_shape",
        "resampling_fn_probabilities_kwargs": dict(res_data, order=1),
        "architecture": {"network_class_name": NETWORK_CLASS_NAME, "arch_kwargs": arch_kwargs,
                         "_kw_requires_import": []},
        "batch_dice": False,
        "bsf": {"imported": True, "inference_blending": blending},
    }
    return {
        "dataset_name": dataset_name,
        "plans_name": IMPORTED_PLANS,
        "original_median_spacing_after_transp": list(spacing),
        "original_median_shape_after_transp": list(patch),
        "image_reader_writer": "SimpleITKIO",
        "transpose_forward": [0, 1, 2],
        "transpose_backward": [0, 1, 2],
        "configurations": {"3d_fullres": conf},
        "experiment_planner_used": "ExperimentPlanner",
        "label_manager": "LabelManager",
        "foreground_intensity_properties_per_channel": {
            str(i): {"max": 1e4, "mean": 0.0, "median": 0.0, "min": -1e4, "percentile_00_5": -1e4,
                     "percentile_99_5": 1e4, "std": 1.0} for i in range(num_channels)},
    }


def _settings(checkpoint: str, entry, channels: Optional[Sequence[str]], regions: Optional[str],
              merging: Optional[str], axis_order: Optional[str]):
    """(channels, regions, merging, axis order) of an import: the explicit values, else those of the published-
    weights table for its files (``entry``), else the conventions of MONAI-trained files (legacy merging, xyz).
    Channels and regions given for a published file must agree with the table."""
    from .channels import normalise_channel_name

    channels = [c.strip() for c in channels or () if c.strip()]
    if entry is None:
        if not channels:
            raise ValueError(f"{checkpoint}: give the checkpoint's input channels in order with --channels, e.g. "
                             "FLAIR,T1ce,T1,T2 (only the published files, bsf-nnunet weights list, need none).")
        return channels, regions, merging or "legacy", axis_order or "xyz"
    if channels and [normalise_channel_name(c) for c in channels] != \
            [normalise_channel_name(c) for c in entry.channels]:
        raise ValueError(f"--channels {','.join(channels)} contradicts {entry.spec}, whose inputs are "
                         f"{','.join(entry.channels)} in this order (published-weights table): drop --channels.")
    if regions and regions != entry.regions:
        raise ValueError(f"--regions {regions} contradicts {entry.spec}, whose outputs are "
                         f"{', '.join(entry.outputs or ())} (published-weights table): drop --regions.")
    return channels or list(entry.channels), entry.regions, merging or entry.merging, axis_order or entry.axis_order


def _write_model_folder(out: str, plans: dict, dataset_json: dict, checkpoint: dict, imported_from: dict) -> None:
    """Assemble the results folder in a temporary folder beside it, then rename it into place: a failure (a full
    disk) leaves no half-made folder that nnUNetv2_predict would take for a model, and an existing folder
    (``overwrite``) is replaced as a whole, only once the new one is complete."""
    with atomic_folder(out) as tmp:
        atomic_write_json(os.path.join(tmp, "plans.json"), plans, indent=4)
        atomic_write_json(os.path.join(tmp, "dataset.json"), dataset_json, indent=4)
        atomic_write_json(os.path.join(tmp, "IMPORTED_FROM.json"), imported_from)
        atomic_torch_save(checkpoint, os.path.join(tmp, "fold_all", "checkpoint_final.pth"))


def _check_importable(sd: dict, checkpoint: str, channels: Sequence[str]) -> str:
    """The variant of a fine-tuned Swin-UNETR state dict whose inputs are ``channels``; raises otherwise."""
    from .architecture import guess_variant
    from .transfer import check_finite

    check_finite(sd, checkpoint)
    if "out.conv.conv.weight" not in sd:
        raise ValueError(f"{checkpoint} has no segmentation output (out.conv.conv.weight): it looks like a "
                         "self-supervised checkpoint. Fine-tune it with -pretrained_weights instead of importing it.")
    variant, desc = guess_variant(sd)
    if variant is None:
        raise ValueError(f"{checkpoint}: the encoder matches no known variant ({desc}).")
    cin = sd["swinViT.patch_embed.proj.weight"].shape[1]
    if cin != len(channels):
        raise ValueError(f"{checkpoint} expects {cin} input channels but --channels names {len(channels)} "
                         f"({', '.join(channels)}).")
    return variant


def _outputs(sd: dict, checkpoint: str, regions: Optional[str], labels: Optional[Sequence[str]]) -> tuple:
    """``(state dict, dataset.json labels, extra dataset.json keys)``: BraTS region outputs reordered to nnU-Net's
    painting order (WT, TC, ET), or the softmax classes named by ``labels``."""
    sd = dict(sd)
    nout = sd["out.conv.conv.weight"].shape[0]
    if regions == "brats":
        if nout != 3:
            raise ValueError(f"--regions brats needs a model with 3 outputs (TC, WT, ET); {checkpoint} has {nout}.")
        order = [BRATS_OUTPUT_ORDER.index(BRATS_REGIONS[k][0]) for k in BRATS_REGIONS]  # -> WT, TC, ET
        for k in ("out.conv.conv.weight", "out.conv.conv.bias"):
            sd[k] = sd[k][order].clone()
        label_dict = {"background": 0, **{k: v[1] for k, v in BRATS_REGIONS.items()}}
        return sd, label_dict, {"regions_class_order": [v[2] for v in BRATS_REGIONS.values()]}
    if regions:
        raise ValueError(f"Unknown --regions {regions!r}; supported: brats (or give --labels for softmax models).")
    if nout == 1:
        raise ValueError(f"{checkpoint} has a single output channel (a sigmoid model, e.g. the ATLAS lesion model): "
                         "import-model takes softmax models (--labels, background first) and --regions brats. Use "
                         "it as initialisation instead: nnUNetv2_train ... -pretrained_weights FILE.")
    names = list(labels) if labels else ["background"] + [f"label_{i}" for i in range(1, nout)]
    if len(names) != nout:
        raise ValueError(f"--labels names {len(names)} classes but the model has {nout} outputs.")
    return sd, {n: i for i, n in enumerate(names)}, {}


def _network(sd: dict, variant: str, merging: str, axis_order: str, checkpoint: str) -> tuple:
    """``(BSFSwinUNETR holding the tensors of sd, its arch_kwargs)``."""
    v = get_variant(variant)
    arch = {"feature_size": v["feature_size"], "depths": v["depths"], "num_heads": v["num_heads"],
            "merging": merging, "axis_order": axis_order}
    net = restore_network(arch, sd, checkpoint, "pass a fine-tuned Swin-UNETR checkpoint (the published "
                          "*-finetune files).", drop_unknown=True)
    return net, arch


def _model_folder(results: Optional[str], dataset_name: str, overwrite: bool) -> str:
    """The imported model's results folder (refused when it holds a model, unless ``overwrite``)."""
    from nnunetv2.utilities.file_path_utilities import convert_trainer_plans_config_to_identifier

    # get_output_folder reads $nnUNet_results; --results may name another folder
    out = os.path.join(results, dataset_name,
                       convert_trainer_plans_config_to_identifier(IMPORTED_TRAINER, IMPORTED_PLANS, "3d_fullres"))
    final = os.path.join(out, "fold_all", "checkpoint_final.pth")
    if os.path.exists(final) and not overwrite:
        raise ValueError(f"{final} exists; pass --overwrite to replace it.")
    return out


def import_model(checkpoint: str, dataset_id: int, channels: Optional[Sequence[str]] = None,
                 regions: Optional[str] = None, labels: Optional[Sequence[str]] = None,
                 dataset_name: Optional[str] = None, patch: Sequence[int] = (128, 128, 128),
                 spacing: Sequence[float] = (1.0, 1.0, 1.0), merging: Optional[str] = None,
                 axis_order: Optional[str] = None, results: Optional[str] = None,
                 allow_unsafe_pickle: bool = False, overwrite: bool = False, tta: bool = False,
                 blending: str = ORIGINAL_BLENDING) -> str:
    """Write ``<results>/<dataset>/BSFTrainer_imported__BSFImportedPlans__3d_fullres``; return its path.

    ``checkpoint``: a path, or a published / Hugging Face name (``bsf:NAME``, ``hf://OWNER/REPO/FILE``; downloaded
    once), whose channels, regions, merging and axis order then come from the published-weights table.
    ``tta=False`` (the original's inference): no mirroring axes in the checkpoint, so nnUNetv2_predict never
    mirrors; ``tta=True``: nnU-Net's mirroring test-time augmentation on all three axes. ``blending``: how
    nnUNetv2_predict weights overlapping windows, ``"constant"`` (the original's) or ``"gaussian"`` (nnU-Net's)."""
    if blending not in BLENDINGS:
        raise ValueError(f"blending must be one of {', '.join(BLENDINGS)}, got {blending!r}.")
    from .hub import resolve_checkpoint

    if results is None:
        results = nnunet_folder("nnUNet_results", instead="pass --results FOLDER")
    patch, note = check_user_patch(patch, allow_round=False)
    resolved = resolve_checkpoint(checkpoint, allow_unsafe_pickle=allow_unsafe_pickle)
    channels, regions, merging, axis_order = _settings(checkpoint, resolved.entry, channels, regions, merging,
                                                       axis_order)
    sd = resolved.load(allow_unsafe_pickle=allow_unsafe_pickle).state_dict
    variant = _check_importable(sd, checkpoint, channels)
    sd, label_dict, extra = _outputs(sd, checkpoint, regions, labels)
    net, arch = _network(sd, variant, merging, axis_order, checkpoint)

    dataset_name = dataset_name or f"Dataset{int(dataset_id):03d}_Imported"
    out = _model_folder(results, dataset_name, overwrite)
    plans = _plans(dataset_name, len(channels), patch, [float(s) for s in spacing], arch, blending=blending)
    dataset_json = {"channel_names": {str(i): c for i, c in enumerate(channels)}, "labels": label_dict,
                    "numTraining": 0, "file_ending": ".nii.gz", **extra}
    inference = inference_settings(tta, blending)
    _write_model_folder(out, plans, dataset_json, {
        "network_weights": net.state_dict(),
        "trainer_name": IMPORTED_TRAINER,
        "init_args": {"plans": plans, "configuration": "3d_fullres", "fold": "all", "dataset_json": dataset_json},
        "inference_allowed_mirroring_axes": TTA_MIRROR_AXES if tta else None,
        "current_epoch": 0,
        "bsf_metadata": {"format": "imported", "source": resolved.source, "variant": variant,
                         "channel_names": channels, "merging": merging, "axis_order": axis_order,
                         "inference": inference},
    }, {
        "checkpoint": resolved.source, "published": resolved.entry.spec if resolved.entry else None,
        "variant": variant, "regions": regions, "channels": channels, "merging": merging, "axis_order": axis_order,
        "patch": patch, "spacing": list(spacing), "inference": inference, "predict": predict_command(dataset_id)})
    return out
