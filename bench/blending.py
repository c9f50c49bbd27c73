"""How much window blending changes a BSF model's label maps: nnU-Net's Gaussian against the official constant weights.

    bsf-nnunet demo --fast --workdir demo   # the --fast demo with its defaults (nnUNet_* folders under demo/)
    python bench/blending.py --fold 0 --images demo/nnUNet_raw/Dataset990_BrainTissueDemo/imagesTs \
        --model demo/nnUNet_results/Dataset990_BrainTissueDemo/BSFTrainer_ToyFast__nnUNetPlans__3d_fullres \
        --out bench/results/blending_demo.json

Predicts every case in ``--images`` with nnU-Net's predictor three ways, no mirroring:
``gaussian_0.5`` (nnUNetv2_predict's defaults), ``gaussian_0.4`` (import-model's printed command with
``--blending gaussian``) and ``constant_0.4`` (the official inference: MONAI overlap 0.6, constant weights; what
import-model writes by default), and prints the Dice per label of the first two against the third, per case. The
numbers are deterministic for a model and a case (no timing): one run is the measurement.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

import numpy as np

SETTINGS = {"gaussian_0.5": (True, 0.5), "gaussian_0.4": (True, 0.4), "constant_0.4": (False, 0.4)}
REFERENCE = "constant_0.4"


def predict(model: str, fold: str, images: str, out: str, use_gaussian: bool, step: float) -> None:
    import torch
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    predictor = nnUNetPredictor(tile_step_size=step, use_gaussian=use_gaussian, use_mirroring=False,
                                device=torch.device("cpu"), verbose=False, allow_tqdm=False)
    predictor.initialize_from_trained_model_folder(model, (fold if fold == "all" else int(fold),))
    predictor.use_gaussian = use_gaussian  # over the plans' bsf.inference_blending, which the hook would apply
    predictor.predict_from_files(images, out, save_probabilities=False, overwrite=True, num_processes_preprocessing=1,
                                 num_processes_segmentation_export=1)


def dice_per_label(a: np.ndarray, b: np.ndarray) -> dict:
    labels = sorted(set(np.unique(a).tolist()) | set(np.unique(b).tolist()) - {0})
    return {int(c): float(2 * ((a == c) & (b == c)).sum() / max(1, (a == c).sum() + (b == c).sum())) for c in labels}


def compare(folders: dict) -> dict:
    import SimpleITK as sitk

    read = lambda path: sitk.GetArrayFromImage(sitk.ReadImage(path))  # noqa: E731
    cases = sorted(f for f in os.listdir(folders[REFERENCE]) if f.endswith(".nii.gz"))
    result = {}
    for case in cases:
        ref = read(os.path.join(folders[REFERENCE], case))
        result[case[: -len(".nii.gz")]] = {name: dice_per_label(read(os.path.join(folder, case)), ref)
                                           for name, folder in folders.items() if name != REFERENCE}
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="results folder (Trainer__Plans__configuration)")
    p.add_argument("--fold", default="0")
    p.add_argument("--images", required=True, help="folder of cases in nnU-Net raw format")
    p.add_argument("--out", default=None, help="write the result as JSON here")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        folders = {name: os.path.join(tmp, name) for name in SETTINGS}
        for name, (gaussian, step) in SETTINGS.items():
            predict(args.model, args.fold, args.images, folders[name], gaussian, step)
        result = {"model": args.model, "fold": args.fold, "reference": REFERENCE, "mirroring": False,
                  "dice_against_reference": compare(folders)}
    for case, per in result["dice_against_reference"].items():
        for name, d in per.items():
            print(f"{case:32s} {name:13s} vs {REFERENCE}: " + " ".join(f"{c}:{v:.4f}" for c, v in d.items()))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
