"""``bsf_model.json``: what an exported model is and expects (channels, spacing, normalisation, patch, labels and
outputs, MONAI constructor arguments, patch merging, axis order, provenance), computed from an
:class:`~bsf_nnunet.weights.export.ExportSource`; nothing is written here."""
from __future__ import annotations

import os
from typing import TYPE_CHECKING, List

import numpy as np

from ..network import count_parameters

if TYPE_CHECKING:
    from .export import ExportSource

DESCRIPTION_VERSION = 1
MERGING_CAVEAT = (
    "MONAI 1.5 changed 3D patch merging. 'legacy' is the PatchMerging of MONAI 0.9-1.4, which BrainSegFounder's "
    "published weights were trained with: it concatenates the 2x2x2 sub-grids (0,0,0) (1,0,0) (0,1,0) (0,0,1) "
    "(1,0,1) (0,1,0) (0,0,1) (1,1,1), two of them twice and (1,1,0), (0,1,1) never. 'fixed' is the PatchMerging "
    "of MONAI >= 1.5, SwinUNETR(downsample=\"merging\") (the default), which uses all eight. MONAI >= 1.5 has no "
    "constructor argument that reproduces 'legacy': pass downsample=bsf_nnunet.network.LegacyPatchMerging (a "
    "PatchMergingV2 subclass with the old concatenation; same parameters), or use MONAI <= 1.4 with "
    "downsample=\"merging\". downsample=\"mergingv2\" (PatchMergingV2) is neither: it orders the sub-grids "
    "differently and computes another function with these weights.")
MONAI_DOWNSAMPLE = {"fixed": "merging", "legacy": "bsf_nnunet.network.LegacyPatchMerging"}



def axis_names(src: ExportSource) -> dict:
    """Which image axis each array axis is: nnU-Net's (the reader's (z, y, x) after ``transpose_forward``) and
    the one the Swin-UNETR inside saw (reversed for ``axis_order="xyz"``)."""
    tf = src.plans.get("transpose_forward", [0, 1, 2])
    nnunet = [("z", "y", "x")[i] for i in tf]
    inner = nnunet[::-1] if src.arch_kwargs["axis_order"] == "xyz" else nnunet
    return {"nnunet": nnunet, "monai": inner}


def channel_names(dataset_json: dict) -> List[str]:
    """The input channels in order (dataset.json ``channel_names``, keyed by channel number)."""
    cn = dataset_json["channel_names"]
    return [str(cn[k]) for k in sorted(cn, key=int)]


def is_region_based(dataset_json: dict) -> bool:
    """nnU-Net's rule (LabelManager): some label is a list of several values."""
    return any(isinstance(v, (list, tuple)) and len(v) > 1 for v in dataset_json["labels"].values())


def output_names(dataset_json: dict) -> List[str]:
    """Name of each output channel: the labels by value (softmax), or the regions in dataset.json order (sigmoid)."""
    labels = {k: v for k, v in dataset_json["labels"].items() if k != "ignore"}
    if is_region_based(dataset_json):
        return [k for k, v in labels.items() if set(np.atleast_1d(v).tolist()) != {0}]
    return [k for k, _ in sorted(labels.items(), key=lambda kv: int(kv[1]))]


def monai_kwargs(src: ExportSource) -> dict:
    """Arguments of ``monai.networks.nets.SwinUNETR`` that rebuild the network (``downsample``: see the caveat)."""
    a, net = src.arch_kwargs, src.network
    return {"in_channels": net.swinViT.patch_embed.proj.in_channels, "out_channels": net.out.conv.conv.out_channels,
            "feature_size": int(a["feature_size"]),
            "depths": [int(d) for d in a["depths"]], "num_heads": [int(h) for h in a["num_heads"]],
            "window_size": int(a.get("window_size", 7)), "patch_size": int(a.get("patch_size", 2)),
            "norm_name": a.get("norm_name", "instance"), "normalize": bool(a.get("normalize", True)),
            "spatial_dims": 3, "use_v2": False, "downsample": MONAI_DOWNSAMPLE[a["merging"]]}


def _preprocessing(src: ExportSource, channels: List[str]) -> dict:
    conf, props = src.configuration, src.plans.get("foreground_intensity_properties_per_channel", {})
    return {"normalization": list(conf.get("normalization_schemes", [])),
            "use_mask_for_norm": [bool(b) for b in conf.get("use_mask_for_norm", [])],
            "intensity_properties": {c: props.get(str(i)) for i, c in enumerate(channels)},
            "spacing": [float(s) for s in conf["spacing"]],
            "transpose_forward": src.plans.get("transpose_forward"),
            "transpose_backward": src.plans.get("transpose_backward")}


def model_description(src: ExportSource) -> dict:
    """Everything ``bsf_model.json`` holds. Its top-level keys follow the loader's metadata (``format``,
    ``channel_names``, ``merging``, ``axis_order``, ``arch_kwargs``, ...), so ``load_checkpoint`` takes them as is."""
    channels = channel_names(src.dataset_json)
    outputs = output_names(src.dataset_json)
    axes, merging, axis = axis_names(src), src.arch_kwargs["merging"], src.arch_kwargs["axis_order"]
    regions = is_region_based(src.dataset_json)
    return {
        "bsf_model_version": DESCRIPTION_VERSION, "format": "bsf_nnunet", "variant": src.variant,
        "num_parameters": count_parameters(src.network), "channel_names": channels,
        "patch_size": [int(p) for p in src.configuration["patch_size"]], **_preprocessing(src, channels),
        "labels": src.dataset_json["labels"], "region_based": regions,
        "regions_class_order": src.dataset_json.get("regions_class_order"),
        "outputs": outputs, "output_activation": "sigmoid" if regions else "softmax",
        "arch_kwargs": {k: v for k, v in src.arch_kwargs.items() if k not in ("attention", "use_checkpoint")},
        "merging": merging, "axis_order": axis,
        "axes": {"nnunet_array": axes["nnunet"], "monai_network_input": axes["monai"]},
        "monai": {"class": "monai.networks.nets.SwinUNETR",
                  "kwargs": monai_kwargs(src), "merging_caveat": MERGING_CAVEAT,
                  "axis_note": _axis_note(axis, axes)},
        "source": {"dataset": src.dataset_name, "trainer": src.trainer, "plans": src.plans_name,
                   "configuration": src.configuration_name, "fold": src.fold, "epoch": src.epoch,
                   "checkpoint": os.path.basename(src.checkpoint), "numTraining": src.dataset_json.get("numTraining")},
    }


def _axis_note(axis: str, axes: dict) -> str:
    nn_axes, inner = ", ".join(axes["nnunet"]), ", ".join(axes["monai"])
    text = (f"nnU-Net feeds its network ({nn_axes}) arrays (its readers return (z, y, x); plans transpose_forward "
            f"then applies). The MONAI state dict expects ({inner}) arrays (batch and channel first); the ONNX file "
            f"is the nnU-Net network and takes ({nn_axes}).")
    if axis == "xyz":
        return text + (" axis_order 'xyz': the network was trained on arrays in MONAI's order (LoadImage/nibabel "
                       "give (x, y, z)); nnU-Net's network transposes its input and output around it.")
    return text + (" axis_order 'zyx': the network was trained on nnU-Net's arrays; in a MONAI pipeline "
                   "(LoadImage/nibabel give (x, y, z)) reverse the spatial axes, x.permute(0, 1, 4, 3, 2), "
                   "before the network and its output back after it.")
