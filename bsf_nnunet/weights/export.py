"""Export a trained BrainSegFounder model out of nnU-Net: a MONAI state dict, an ONNX file or a Hub-ready folder.

    bsf-nnunet export -d 4 -tr BSFTrainer -c 3d_fullres -f 0 --to monai -o exported/

The results folder is found as nnUNetv2_predict finds it (dataset, trainer, plans, configuration, fold). The network
is rebuilt from that folder's plans.json by the one restore the trainers use (:mod:`bsf_nnunet.weights.restore`),
with the merging and axis order that the checkpoint records, and the weights are read with the project's one
checkpoint reader (weights only, no code unpickled). The ONNX file comes from the one exporter, which the CPU engine
uses too (:func:`bsf_nnunet.network.cpu_engine.export_onnx_file`). Every file is written to a temporary name in OUT
and renamed. ``bsf_model.json`` beside the weights says what the model expects: channels, spacing, normalisation,
patch, labels, MONAI constructor arguments, merging, axis order and where it came from
(:mod:`bsf_nnunet.weights.description`).
"""
from __future__ import annotations

import copy
import json
import os
import re
from dataclasses import dataclass
from typing import List, Optional

import numpy as np
import torch

from ..errors import BSFError
from ..io import atomic_path, atomic_torch_save, atomic_write_json, atomic_write_text
from ..network.cpu_engine import ONNX_OPSET, export_onnx_file
from ..paths import nnunet_folder
from ..planning.swin_config import NETWORK_CLASS_NAME
from .description import channel_names, model_description
from .loader import SAFETENSORS_METADATA_FILE, load_checkpoint
from .model_card import CITATION, model_card
from .restore import restore_network, trained_architecture

TARGETS = ("monai", "onnx", "hub", "nnssl")
METADATA_FILE = SAFETENSORS_METADATA_FILE  # bsf_model.json: the loader reads it beside a .safetensors file
ONNX_RELATIVE_TOLERANCE = 1e-3  # max |onnxruntime - torch| / max |torch|


class ExportError(BSFError, ValueError):
    """Bad export input (folder, fold, checkpoint, output folder) or a failed check; the message says what to do."""


@dataclass
class ExportSource:
    """A trained BSF model read from its nnU-Net results folder, with everything the exports describe."""

    fold_folder: str
    checkpoint: str
    dataset_name: str
    trainer: str
    plans_name: str
    configuration_name: str
    fold: str
    plans: dict
    dataset_json: dict
    configuration: dict  # inheritance resolved
    arch_kwargs: dict  # as trained (merging, axis order from the checkpoint)
    variant: Optional[str]
    epoch: Optional[int]
    network: Optional[torch.nn.Module]  # fp32, eval mode, MONAI's attention (what ONNX traces); None: pretraining
    state_dict: dict  # the checkpoint's tensors (a pretraining checkpoint's SSL model too)


# ---------------------------------------------------------------------------------------------------- reading
def results_fold_folder(dataset: str, trainer: str, plans: str, configuration: str, fold: str) -> str:
    """``$nnUNet_results/DatasetXXX_Name/TRAINER__PLANS__CONF/fold_F`` (as nnUNetv2_predict), checked to exist."""
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name
    from nnunetv2.utilities.file_path_utilities import get_output_folder

    results = nnunet_folder("nnUNet_results")  # the folder nnUNetv2_train wrote to
    if fold != "all" and not str(fold).isdigit():
        raise ExportError(f"fold must be a number or 'all' (as for nnUNetv2_predict -f), got {fold!r}.")
    try:
        name = maybe_convert_to_dataset_name(dataset)
    except (RuntimeError, ValueError) as e:
        raise ExportError(f"Dataset {dataset!r}: {str(e).splitlines()[0]}") from None
    folder = get_output_folder(name, trainer, plans, configuration)
    if not os.path.isdir(folder):
        there = os.path.join(results, name)
        found = sorted(os.listdir(there)) if os.path.isdir(there) else []
        raise ExportError(f"No results folder {folder}: train it with nnUNetv2_train {dataset} {configuration} "
                          f"FOLD -tr {trainer} -p {plans}" + (f" (results of {name}: {', '.join(found)})" if found
                                                              else f" ({there} does not exist)") + ".")
    fold_folder = get_output_folder(name, trainer, plans, configuration, fold)
    if not os.path.isdir(fold_folder):
        folds = sorted(f[5:] for f in os.listdir(folder) if f.startswith("fold_"))
        raise ExportError(f"No fold {fold} in {folder} (folds there: {', '.join(folds) or 'none'}): train it with "
                          f"nnUNetv2_train {dataset} {configuration} {fold} -tr {trainer} -p {plans}, or pick another "
                          "with -f.")
    return fold_folder


def _read_json(path: str, what: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise ExportError(f"{path} is missing: {what}. Is this a complete nnU-Net results folder?") from None
    except (OSError, ValueError) as e:
        raise ExportError(f"{path} cannot be read ({e}); nnU-Net rewrites it when training starts.") from None


def _bsf_configuration(plans: dict, configuration: str, folder: str, trainer: str) -> dict:
    """The resolved configuration; refuses plans whose network is not BrainSegFounder's Swin-UNETR."""
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    if configuration not in plans.get("configurations", {}):
        raise ExportError(f"{folder}/plans.json has no configuration {configuration!r} "
                          f"(it has {', '.join(plans.get('configurations', {}))}).")
    conf = PlansManager(plans).get_configuration(configuration).configuration
    net = (conf.get("architecture") or {}).get("network_class_name")
    if net != NETWORK_CLASS_NAME:
        raise ExportError(f"{folder} was trained by {trainer} with the network {net!r}, not BrainSegFounder's "
                          "Swin-UNETR: bsf-nnunet export takes the results of the BSF trainers (-tr BSFTrainer...). "
                          "For nnU-Net's own networks use nnUNetv2_export_model_to_zip.")
    return copy.deepcopy(conf)


def _expected_channels(plans: dict, conf: dict, dataset_json: dict) -> tuple:
    """(input channels, outputs) of the network these plans and dataset.json describe, by nnU-Net's own rules."""
    from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
    from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager, PlansManager

    pm, cm = PlansManager(plans), ConfigurationManager(conf)
    return determine_num_input_channels(pm, cm, dataset_json), pm.get_label_manager(dataset_json).num_segmentation_heads


def _restore(path: str, ckpt, plans: dict, conf: dict, dataset_json: dict, folder: str) -> tuple:
    """(arch_kwargs, network) of the checkpoint at ``path`` in the results folder ``folder``."""
    fix = "export the checkpoint that this results folder trained (its plans.json describes another network)."
    arch = trained_architecture(conf["architecture"]["arch_kwargs"], ckpt.metadata, path, fix)
    network = restore_network(arch, ckpt.state_dict, path, fix)
    expected = _expected_channels(plans, conf, dataset_json)
    found = (network.swinViT.patch_embed.proj.in_channels, network.out.conv.conv.out_channels)
    if found != expected:
        raise ExportError(f"{path} has {found[0]} input channels and {found[1]} outputs, but {folder}/plans.json "
                          f"and dataset.json describe {expected[0]} and {expected[1]}: {fix}")
    return arch, network


def load_export_source(dataset: str, trainer: str, plans: str, configuration: str, fold: str,
                       checkpoint: str = "checkpoint_final.pth", pretraining_ok: bool = False) -> ExportSource:
    """Read a trained BSF model (results folder, plans, dataset.json, checkpoint) into an :class:`ExportSource`.
    ``pretraining_ok`` (``--to nnssl``): a self-supervised pretraining checkpoint is read too (``network`` None)."""
    fold = str(fold)
    fold_folder = results_fold_folder(dataset, trainer, plans, configuration, fold)
    folder = os.path.dirname(fold_folder)
    plans_dict = _read_json(os.path.join(folder, "plans.json"), "nnU-Net saves the plans there")
    dataset_json = _read_json(os.path.join(folder, "dataset.json"), "nnU-Net saves the dataset.json there")
    conf = _bsf_configuration(plans_dict, configuration, folder, trainer)
    path = os.path.join(fold_folder, checkpoint)
    if not os.path.isfile(path):
        found = sorted(f for f in os.listdir(fold_folder) if f.endswith(".pth"))
        raise ExportError(f"No checkpoint {path} (checkpoints there: {', '.join(found) or 'none'}). Finish the "
                          f"training (nnUNetv2_train {dataset} {configuration} {fold} -tr {trainer} -p {plans} --c) "
                          "or choose one with --checkpoint, e.g. checkpoint_best.pth.")
    ckpt = load_checkpoint(path)
    pretraining = "out.conv.conv.weight" not in ckpt.state_dict or ckpt.metadata.get("format") == "bsf_pretrain"
    if pretraining and not pretraining_ok:
        raise ExportError(f"{path} is a self-supervised pretraining checkpoint (no segmentation head): export it "
                          "--to nnssl (for fine-tuning elsewhere), or fine-tune it (nnUNetv2_train ... -tr "
                          "BSFTrainer...) and export the fine-tuned model.")
    if pretraining:
        fix = "export the checkpoint that this results folder trained."
        arch, network = trained_architecture(conf["architecture"]["arch_kwargs"], ckpt.metadata, path, fix), None
    else:
        arch, network = _restore(path, ckpt, plans_dict, conf, dataset_json, folder)
    epoch = ckpt.metadata.get("epoch")
    variant = (conf.get("bsf") or {}).get("variant") or ckpt.metadata.get("variant_guess")
    return ExportSource(
        fold_folder=fold_folder, checkpoint=path, dataset_name=plans_dict.get("dataset_name", ""), trainer=trainer,
        plans_name=plans, configuration_name=configuration, fold=fold, plans=plans_dict, dataset_json=dataset_json,
        configuration=conf, arch_kwargs=arch, variant=variant, epoch=None if epoch is None else int(epoch),
        network=network, state_dict=dict(ckpt.state_dict))


# ---------------------------------------------------------------------------------------------------- writing
def prepare_output_folder(out: str, overwrite: bool) -> None:
    if os.path.isfile(out):
        raise ExportError(f"-o {out} is a file; give a folder.")
    if os.path.isdir(out) and os.listdir(out) and not overwrite:
        present = sorted(os.listdir(out))
        raise ExportError(f"{out} exists and holds files ({', '.join(present[:5])}"
                          f"{', ...' if len(present) > 5 else ''}): pass --overwrite to replace the exported "
                          "files, or choose another -o.")
    os.makedirs(out, exist_ok=True)


def _state_dict(src: ExportSource) -> dict:
    return {k: v.detach().float().contiguous() if v.is_floating_point() else v.detach().contiguous()
            for k, v in src.network.state_dict().items()}


def _save_safetensors(sd: dict, path: str) -> None:
    from safetensors.torch import save_file

    with atomic_path(path, keep_extension=False) as tmp:
        save_file(sd, tmp, metadata={"format": "pt"})


def export_monai(src: ExportSource, out: str) -> List[str]:
    """``model.pt`` (a plain dict of tensors), ``model.safetensors`` and ``bsf_model.json``."""
    sd = _state_dict(src)
    atomic_torch_save(dict(sd), os.path.join(out, "model.pt"))
    _save_safetensors(sd, os.path.join(out, "model.safetensors"))
    desc = model_description(src)
    desc["files"] = {"model.pt": "MONAI SwinUNETR state dict (torch.load(weights_only=True))",
                     "model.safetensors": "the same tensors"}
    atomic_write_json(os.path.join(out, METADATA_FILE), desc)
    return ["model.pt", "model.safetensors", METADATA_FILE]


# ---------------------------------------------------------------------------------------------------- ONNX
def onnx_outputs(path: str, x: np.ndarray) -> np.ndarray:
    """The ONNX model's output for ``x``, computed by onnxruntime on the CPU."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise ExportError("--to onnx needs onnxruntime (and onnx): pip install 'bsf-nnunet[export]'.") from None
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})[0]


def export_onnx(src: ExportSource, out: str) -> List[str]:
    """``model.onnx`` (fp32, the plans' patch, dynamic batch), kept only if onnxruntime agrees with PyTorch on a
    random input within ``ONNX_RELATIVE_TOLERANCE`` of the output's largest magnitude; then ``bsf_model.json``."""
    nin = src.network.swinViT.patch_embed.proj.in_channels
    x = torch.randn((1, nin, *src.configuration["patch_size"]), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = src.network(x).numpy()
    path, check = os.path.join(out, "model.onnx"), {}
    with atomic_path(path, keep_extension=False) as tmp:  # removed, and model.onnx untouched, if the check fails
        export_onnx_file(src.network, tuple(x.shape), tmp, dynamic_batch=True)
        diff = float(np.abs(onnx_outputs(tmp, x.numpy()) - ref).max())
        scale = float(np.abs(ref).max()) or 1.0
        check.update(max_abs_diff=diff, relative_diff=diff / scale, tolerance=ONNX_RELATIVE_TOLERANCE)
        if not diff <= ONNX_RELATIVE_TOLERANCE * scale:  # NaN fails too
            raise ExportError(f"onnxruntime and PyTorch disagree on {path}: max abs diff {diff:.3g} for outputs up "
                              f"to {scale:.3g} (relative {diff / scale:.3g} > {ONNX_RELATIVE_TOLERANCE}). No ONNX "
                              "file was written; export --to monai instead or report the torch/onnxruntime versions.")
    desc = model_description(src)
    desc["onnx"] = {"file": "model.onnx", "opset": ONNX_OPSET, "input": "input", "output": "logits",
                    "input_shape": ["batch", nin, *desc["patch_size"]], "axes": desc["axes"]["nnunet_array"],
                    "dtype": "float32", "check": check}
    atomic_write_json(os.path.join(out, METADATA_FILE), desc)
    print(f"ONNX check (onnxruntime vs PyTorch, random input {list(x.shape)}): max abs diff {check['max_abs_diff']:.3g}"
          f" (relative {check['relative_diff']:.3g}, tolerance {ONNX_RELATIVE_TOLERANCE})")
    return ["model.onnx", METADATA_FILE]


# ---------------------------------------------------------------------------------------------------- Hub
def validation_metrics(src: ExportSource) -> Optional[dict]:
    """Mean Dice per output and over the foreground from the fold's ``validation/summary.json`` (None if absent)."""
    path = os.path.join(src.fold_folder, "validation", "summary.json")
    if not os.path.isfile(path):
        return None
    summary = _read_json(path, "nnU-Net writes it after training")
    keys = {(str(tuple(v)) if isinstance(v, (list, tuple)) else str(int(v))): name
            for name, v in src.dataset_json["labels"].items()}
    per = {keys.get(k, k): m.get("Dice") for k, m in (summary.get("mean") or {}).items()}
    return {"foreground_mean_dice": (summary.get("foreground_mean") or {}).get("Dice"), "mean_dice": per,
            "cases": len(summary.get("metric_per_case") or [])}


def export_hub(src: ExportSource, out: str, license_id: str = "other") -> List[str]:
    """A folder for ``huggingface_hub.upload_folder``: ``model.safetensors`` (the BSF network's state dict, which
    ``load_checkpoint`` reads back with the metadata beside it), ``bsf_model.json`` and a model card README.md."""
    check_license(license_id)
    _save_safetensors(_state_dict(src), os.path.join(out, "model.safetensors"))
    desc = model_description(src)
    desc["files"] = {"model.safetensors": "state dict of bsf_nnunet.network.BSFSwinUNETR = MONAI SwinUNETR keys",
                     "README.md": "model card"}
    metrics = validation_metrics(src)
    desc["validation"] = metrics
    atomic_write_json(os.path.join(out, METADATA_FILE), desc)
    text = model_card(desc, metrics, license_id)
    atomic_write_text(os.path.join(out, "README.md"), text)
    return ["model.safetensors", METADATA_FILE, "README.md"]


# ---------------------------------------------------------------------------------------------------- nnssl
def nnssl_metadata(src: ExportSource) -> dict:
    """What the nnssl adaptation plan of ``src`` is built from (the keys of a pretraining ``bsf_metadata``)."""
    conf = src.configuration
    return {"arch_kwargs": {k: v for k, v in src.arch_kwargs.items() if k not in ("attention", "use_checkpoint")},
            "patch_size": [int(p) for p in conf["patch_size"]], "spacing": [float(s) for s in conf["spacing"]],
            "channel_names": channel_names(src.dataset_json),
            "normalization": list(conf.get("normalization_schemes", [])), "variant": src.variant,
            "dataset": src.dataset_name, "plans": src.plans_name, "configuration": src.configuration_name,
            "fold": src.fold, "trainer": src.trainer}


def export_nnssl(src: ExportSource, out: str) -> List[str]:
    """The folder nnssl's fine-tuning reads (``checkpoint_final.pth`` with the adaptation plan inside,
    ``adaptation_plan.json``, ``config.json``): the checkpoint's whole state dict (encoder ``swinViT.*``, and the
    SSL heads or the segmentation decoder), its plan from the results folder's plans and dataset.json."""
    from .nnssl import plan_for_bsf_metadata, write_nnssl_folder

    plan = plan_for_bsf_metadata(nnssl_metadata(src))
    tensors = {k: v.detach().float() if v.is_floating_point() else v.detach() for k, v in src.state_dict.items()}
    return [os.path.basename(p) for p in write_nnssl_folder(out, tensors, plan, citations=[CITATION])]


def check_license(license_id: str) -> None:
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9.+\-]*", license_id or ""):
        raise ExportError(f"--license {license_id!r} is not a licence identifier (e.g. apache-2.0, cc-by-nc-4.0, "
                          "other).")


def export_model(src: ExportSource, to: str, out: str, overwrite: bool = False, license_id: str = "other") -> dict:
    """Write the export ``to`` (monai, onnx, hub, nnssl) of ``src`` into ``out``; returns ``{"files", "other_files"}``
    (``other_files``: what was already in ``out`` and is left as it was)."""
    if to not in TARGETS:
        raise ExportError(f"--to must be one of {', '.join(TARGETS)}, got {to!r}.")
    if to == "hub":
        check_license(license_id)
    prepare_output_folder(out, overwrite)
    before = set(os.listdir(out))
    if src.network is None and to != "nnssl":
        raise ExportError(f"{src.checkpoint} is a pretraining checkpoint: it exports --to nnssl only.")
    if to == "nnssl":
        files = export_nnssl(src, out)
    elif to == "monai":
        files = export_monai(src, out)
    elif to == "onnx":
        files = export_onnx(src, out)
    else:
        files = export_hub(src, out, license_id)
    return {"files": [os.path.join(out, f) for f in files], "other_files": sorted(before - set(files))}
