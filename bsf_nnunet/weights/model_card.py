"""The model card (README.md) of a Hub export: YAML metadata, description, training data, metrics, intended use
and limitations, how to use, citation; rendered from ``bsf_model.json``'s description (no files written here)."""
from __future__ import annotations

from typing import List, Optional

CITATION = """@article{cox2024brainsegfounder,
  title   = {BrainSegFounder: Towards 3D Foundation Models for Neuroimage Segmentation},
  author  = {Cox, Joseph and Liu, Peng and Stolte, Skylar E. and Yang, Yunchao and Liu, Kang and See, Kyle B. and
             Ju, Huiwen and Fang, Ruogu},
  journal = {Medical Image Analysis},
  year    = {2024},
  note    = {arXiv:2406.10395}
}"""


def _yaml_header(license_id: str) -> List[str]:
    lines = ["---", f"license: {license_id}"]
    if license_id == "other":
        lines += ["license_name: unspecified", "license_link: LICENSE"]
    lines += ["library_name: bsf-nnunet", "pipeline_tag: image-segmentation", "tags:"]
    lines += [f"- {t}" for t in ("medical-imaging", "brain-mri", "nnu-net", "swin-unetr", "3d-segmentation",
                                 "brainsegfounder")]
    return lines + ["---", ""]


def _dice(v) -> str:
    return "n/a" if v is None else f"{v:.4f}"


def _metrics_lines(metrics: Optional[dict]) -> List[str]:
    if metrics is None:
        return ["No validation/summary.json in the fold folder (nnUNetv2_train writes it at the end of training, "
                "or run it with --val): no metrics reported.", ""]
    lines = [f"nnU-Net's validation of this fold ({metrics['cases']} held-out cases, `validation/summary.json`):",
             "", "| output | mean Dice |", "|---|---|"]
    lines += [f"| {name} | {_dice(d)} |" for name, d in metrics["mean_dice"].items()]
    return lines + [f"| **foreground mean** | {_dice(metrics['foreground_mean_dice'])} |", ""]


def _axes(names) -> str:
    return "(" + ", ".join(map(str, names)) + ")"


def _normalisation_text(desc: dict) -> str:
    schemes, masks = desc["normalization"], desc["use_mask_for_norm"]
    per = [f"{s} ({'non-zero' if m else 'all'} voxels)" if s == "ZScoreNormalization" else s
           for s, m in zip(schemes, masks, strict=True)]
    if len(set(per)) == 1:
        return f"{per[0]}, every channel"
    return "; ".join(f"{c}: {p}" for c, p in zip(desc["channel_names"], per, strict=True))


def _card_description(desc: dict) -> List[str]:
    s, kw = desc["source"], desc["monai"]["kwargs"]
    fold = ("all training cases" if s["fold"] == "all" else
            "nnU-Net's 5-fold cross-validation: about 80% of the training cases, the rest validated it")
    return [
        "## Model description", "",
        f"A MONAI Swin-UNETR (variant `{desc['variant']}`: feature size {kw['feature_size']}, depths "
        f"{'-'.join(map(str, kw['depths']))}, heads {'-'.join(map(str, kw['num_heads']))}; "
        f"{desc['num_parameters'] / 1e6:.2f} M parameters) in the BrainSegFounder recipe (Cox et al. 2024), trained "
        "with nnU-Net v2 through bsf-nnunet.", "",
        f"- input channels, in order: {', '.join(desc['channel_names'])}",
        f"- outputs ({desc['output_activation']}): {', '.join(desc['outputs'])}",
        f"- patch {_axes(desc['patch_size'])}, spacing {_axes(desc['spacing'])} mm, axes "
        f"{_axes(desc['axes']['nnunet_array'])}",
        f"- normalisation: {_normalisation_text(desc)}",
        f"- patch merging `{desc['merging']}`, axis order `{desc['axis_order']}` (below)", "",
        "`bsf_model.json` holds all of it, with the intensity statistics and the label map.", "",
        "## Training data", "",
        f"nnU-Net dataset `{s['dataset']}` ({s['numTraining']} training cases in its dataset.json), fold "
        f"`{s['fold']}` ({fold}); trainer `{s['trainer']}`, plans `{s['plans']}`, configuration "
        f"`{s['configuration']}`, checkpoint `{s['checkpoint']}` (epoch {s['epoch']}).", ""]


def _card_use(desc: dict) -> List[str]:
    from ..planning.presets import variant_trainers

    trainer = variant_trainers().get(desc["variant"], ("BSFTrainer...",))[0]
    if desc["region_based"]:
        nnunet = ["`bsf-nnunet import-model` takes softmax models and the published BraTS output order, not this "
                  "region-based model: use it in MONAI (below) or from its nnU-Net results folder.", ""]
    else:
        zscore = _normalisation_text(desc) == "ZScoreNormalization (non-zero voxels), every channel"
        nnunet = ["In nnU-Net, with bsf-nnunet: `import-model` writes a results folder and prints the "
                  "`nnUNetv2_predict` command.", "", "```bash",
                  f"bsf-nnunet import-model model.safetensors -d ID --channels {','.join(desc['channel_names'])} "
                  f"--labels {','.join(desc['outputs'])} --merging {desc['merging']} --axis-order "
                  f"{desc['axis_order']} --patch {' '.join(map(str, desc['patch_size']))} --spacing "
                  f"{' '.join(map(str, desc['spacing']))}", "```", ""]
        if not zscore:
            nnunet += [f"import-model normalises every channel with a z-score over its non-zero voxels; this model "
                       f"was trained with {_normalisation_text(desc)}, so its predictions there may differ.", ""]
    return ["## How to use", ""] + nnunet + [
        f"As initialisation for fine-tuning (channels are matched by name): `nnUNetv2_train D 3d_fullres 0 -tr "
        f"{trainer} -pretrained_weights model.safetensors`.", "",
        "In MONAI:", "", "```python", "import json", "", "from monai.networks.nets import SwinUNETR",
        "from safetensors.torch import load_file", "", 'meta = json.load(open("bsf_model.json"))',
        'kwargs = dict(meta["monai"]["kwargs"])', 'if meta["merging"] == "legacy":  # no MONAI >= 1.5 option for it',
        "    from bsf_nnunet.network import LegacyPatchMerging", "", '    kwargs["downsample"] = LegacyPatchMerging',
        "net = SwinUNETR(**kwargs).eval()", 'net.load_state_dict(load_file("model.safetensors"))',
        f"# input: (batch, {len(desc['channel_names'])}, {', '.join(desc['axes']['monai_network_input'])}), "
        "normalised as in bsf_model.json", "```", ""]


def model_card(desc: dict, metrics: Optional[dict], license_id: str) -> str:
    """The Hub folder's README.md: YAML metadata, description, data, metrics, use, limitations, citation."""
    s = desc["source"]
    lic = (["**Licence not set** (`license: other`): the exporter was not given `--license`. Choose it before "
            "publishing; weights fine-tuned from BrainSegFounder's published files or trained on restricted data "
            "(e.g. UK Biobank) inherit their terms.", ""] if license_id == "other" else [])
    lines = _yaml_header(license_id) + [
        f"# BrainSegFounder Swin-UNETR: {s['dataset']} ({s['trainer']}, fold {s['fold']})", ""] + lic
    lines += _card_description(desc) + ["## Metrics", ""] + _metrics_lines(metrics) + [
        "## Intended use and limitations", "",
        "Research use: segmentation of brain MRI that resembles the training data (the same channels in the same "
        "order, preprocessed the same way: resampled to the spacing above and normalised as listed). Not a medical "
        "device; not validated for clinical decisions. Accuracy on other scanners, protocols, populations or "
        "pathologies is unknown. The network computes logits for one patch: whole images need nnU-Net's "
        "preprocessing and sliding window (or an equivalent).", "",
        "**Patch merging.** " + desc["monai"]["merging_caveat"], "",
        "**Axis order.** " + desc["monai"]["axis_note"], ""]
    lines += _card_use(desc) + ["## Citation", "", "```bibtex", CITATION, "```", ""]
    return "\n".join(lines)
