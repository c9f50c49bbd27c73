"""End-to-end: the stock nnU-Net commands with BSF trainers, on a tiny synthetic dataset, in subprocesses."""
import json
import os
import sys
from glob import glob

import numpy as np
import SimpleITK as sitk

from bsf_nnunet.datasets.synthetic import build_synthetic_dataset


def dice(a, b):
    a, b = a > 0, b > 0
    return 2 * (a & b).sum() / max(1, a.sum() + b.sum())


def test_plan_train_predict_find_best_ensemble(nnunet_env, run, tmp_path):
    env = {k: v for k, v in nnunet_env.items() if k != "BSF_CPU_ENGINE"}  # the default CPU engine: OpenVINO
    # 40 x 56 x 48 voxels: smaller than Swin-UNETR's minimum of 64 on every axis -> padded by nnU-Net
    folder = build_synthetic_dataset(env["nnUNet_raw"], 991, "Blobs", num_train=6, num_test=2, shape=(40, 56, 48))
    run(["nnUNetv2_plan_and_preprocess", "-d", "991", "-c", "3d_fullres", "-np", "1", "-npfp", "1"], env)
    out = run(["nnUNetv2_train", "991", "3d_fullres", "0", "-tr", "BSFTrainer_CI", "-device", "cpu", "--npz"], env)
    assert "BrainSegFounder BSFTrainer_CI: variant toy" in out
    assert "BSF CPU engine: OpenVINO" in out  # the final validation (the per-epoch one runs PyTorch)
    if sys.platform.startswith("linux"):  # glibc: freed blocks are kept for the next step (bsf_nnunet.allocator)
        assert "CPU allocator: glibc reuses freed memory" in out
    res = os.path.join(env["nnUNet_results"], "Dataset991_Blobs", "BSFTrainer_CI__nnUNetPlans__3d_fullres")
    assert os.path.isfile(os.path.join(res, "fold_0", "checkpoint_final.pth"))
    plans = json.load(open(os.path.join(res, "plans.json")))
    conf = plans["configurations"]["3d_fullres"]
    assert conf["patch_size"] == [64, 64, 64]
    assert conf["architecture"]["network_class_name"] == "bsf_nnunet.network.swin_unetr.BSFSwinUNETR"
    assert conf["bsf"]["planned_patch_size"] == [40, 56, 48]

    # --val reruns the validation of a finished fold (--c after an interruption: tests/test_reliability.py)
    run(["nnUNetv2_train", "991", "3d_fullres", "0", "-tr", "BSFTrainer_CI", "-device", "cpu", "--val", "--npz"], env)

    pred = tmp_path / "pred"
    pred_tta = tmp_path / "pred_tta"
    images_ts = os.path.join(folder, "imagesTs")
    for out_dir, tta in ((pred, ["--disable_tta"]), (pred_tta, [])):
        out = run(["nnUNetv2_predict", "-i", images_ts, "-o", str(out_dir), "-d", "991", "-c", "3d_fullres", "-tr",
                   "BSFTrainer_CI", "-f", "0", "-device", "cpu", "--save_probabilities", "-npp", "1", "-nps", "1"]
                  + tta, env)
        assert "BSF CPU engine: OpenVINO" in out, out[-3000:]
    # one ONNX file for the fold's final weights at the patch size: written by the final validation, reused since;
    # beside it OpenVINO's compiled-model cache
    cached = sorted(os.listdir(env["BSF_CACHE_DIR"]))
    assert len(cached) == 2 and cached[0] == "openvino" and cached[1].endswith(".onnx"), cached
    for case in ("case_006", "case_007"):
        img = sitk.ReadImage(os.path.join(images_ts, f"{case}_0000.nii.gz"))
        ref = sitk.GetArrayFromImage(sitk.ReadImage(os.path.join(folder, "labelsTs", f"{case}.nii.gz")))
        for p in (pred, pred_tta):
            seg = sitk.ReadImage(str(p / f"{case}.nii.gz"))
            assert seg.GetSize() == img.GetSize()
            assert np.allclose(seg.GetSpacing(), img.GetSpacing())
            assert np.allclose(seg.GetOrigin(), img.GetOrigin())
            assert np.allclose(seg.GetDirection(), img.GetDirection())
            arr = sitk.GetArrayFromImage(seg)
            assert set(np.unique(arr)) <= {0, 1}
            chance = ref.mean()  # Dice of a random mask with the right foreground fraction
            assert dice(arr, ref) > max(0.5, 3 * chance), (case, dice(arr, ref), chance)

    # a stock nnU-Net model to ensemble against
    run(["nnUNetv2_train", "991", "3d_fullres", "0", "-tr", "nnUNetTrainer_CI", "-device", "cpu", "--npz"], env)
    out = run(["nnUNetv2_find_best_configuration", "991", "-c", "3d_fullres", "-tr", "BSFTrainer_CI",
               "nnUNetTrainer_CI", "-f", "0", "-np", "1"], env)
    assert "ensemble" in out.lower()
    inference = json.load(open(os.path.join(env["nnUNet_results"], "Dataset991_Blobs", "inference_information.json")))
    keys = list(inference["all_results"])
    assert any(k.startswith("BSFTrainer_CI") for k in keys), keys
    assert any(k.startswith("nnUNetTrainer_CI") for k in keys), keys
    assert any(k.startswith("ensemble___") and "BSFTrainer_CI" in k for k in keys), keys
    ens_dirs = glob(os.path.join(env["nnUNet_results"], "Dataset991_Blobs", "ensembles", "*"))
    assert ens_dirs, "find_best_configuration did not ensemble the BSF and nnU-Net models"

    # nnUNetv2_ensemble of the two BSF predictions (with and without TTA, probabilities saved)
    ens = tmp_path / "ens"
    run(["nnUNetv2_ensemble", "-i", str(pred), str(pred_tta), "-o", str(ens), "-np", "1"], env)
    assert sorted(os.listdir(ens)) >= ["case_006.nii.gz", "case_007.nii.gz"]


def test_region_based_training_and_validation(nnunet_env, run):
    env = nnunet_env
    build_synthetic_dataset(env["nnUNet_raw"], 992, "Regions", num_train=5, num_test=0, shape=(64, 64, 64),
                            num_channels=2, regions=True, channel_names=["T1", "FLAIR"])
    run(["nnUNetv2_plan_and_preprocess", "-d", "992", "-c", "3d_fullres", "-np", "1", "-npfp", "1"], env)
    run(["nnUNetv2_train", "992", "3d_fullres", "1", "-tr", "BSFTrainer_CIfast", "-device", "cpu"], env)
    res = os.path.join(env["nnUNet_results"], "Dataset992_Regions", "BSFTrainer_CIfast__nnUNetPlans__3d_fullres")
    summary = json.load(open(os.path.join(res, "fold_1", "validation", "summary.json")))
    # one entry per region (blob = (1, 2), core = (2,)) and labels restored with regions_class_order
    assert len(summary["mean"]) == 2
    seg = sitk.GetArrayFromImage(sitk.ReadImage(glob(os.path.join(res, "fold_1", "validation", "*.nii.gz"))[0]))
    assert set(np.unique(seg)) <= {0, 1, 2}
