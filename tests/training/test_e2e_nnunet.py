"""End-to-end: the stock nnU-Net commands with BSF trainers, on a tiny synthetic dataset, in subprocesses."""
import json
import os
import sys
from glob import glob

import numpy as np
import SimpleITK as sitk

from bsf_nnunet.datasets.synthetic import build_synthetic_dataset
from bsf_nnunet.devices import cpu_bf16_enabled


def dice(a, b):
    a, b = a > 0, b > 0
    return 2 * (a & b).sum() / max(1, a.sum() + b.sum())


def normalised_like_the_plans(img, desc):
    """The normalisation ``bsf_model.json`` records, written out as a MONAI user would (z-score over all voxels)."""
    assert desc["normalization"] == ["ZScoreNormalization"] and desc["use_mask_for_norm"] == [False], desc
    return (img - img.mean()) / max(float(img.std()), 1e-8)


def sliding_window_labels(img, desc, predictor, reverse_axes):
    """Label map of one (z, y, x) image from MONAI's sliding window (Gaussian, overlap 0.5) around ``predictor``;
    ``reverse_axes``: the network takes (x, y, z) arrays."""
    import torch
    from monai.inferers import sliding_window_inference

    x = torch.from_numpy(normalised_like_the_plans(img, desc)[None, None].astype(np.float32))
    roi = desc["patch_size"][::-1] if reverse_axes else desc["patch_size"]
    with torch.no_grad():
        x = x.permute(0, 1, 4, 3, 2) if reverse_axes else x
        logits = sliding_window_inference(x, roi, 1, predictor, overlap=0.5, mode="gaussian")
        logits = logits.permute(0, 1, 4, 3, 2) if reverse_axes else logits
    return logits[0].argmax(0).numpy()


def exported_predictors(out):
    """The fold exported --to monai, onnx and hub, each as a callable on a batch of patches, as a user loads it:
    MONAI's own SwinUNETR with model.pt or model.safetensors, onnxruntime with model.onnx."""
    import onnxruntime as ort
    import torch
    from monai.networks.nets import SwinUNETR
    from safetensors.torch import load_file

    desc = json.load(open(os.path.join(out["monai"], "bsf_model.json")))
    kwargs = dict(desc["monai"]["kwargs"])
    if desc["merging"] == "legacy":
        from bsf_nnunet.network import LegacyPatchMerging

        kwargs["downsample"] = LegacyPatchMerging
    nets = {}
    for to, state in (("monai", torch.load(os.path.join(out["monai"], "model.pt"), weights_only=True)),
                      ("hub", load_file(os.path.join(out["hub"], "model.safetensors")))):
        nets[to] = SwinUNETR(**kwargs).eval()
        nets[to].load_state_dict(state)
    session = ort.InferenceSession(os.path.join(out["onnx"], "model.onnx"), providers=["CPUExecutionProvider"])
    nets["onnx"] = lambda x: torch.from_numpy(session.run(None, {"input": x.numpy()})[0])
    return desc, nets


def check_exports_predict_as_nnunet(env, run, tmp_path, images_ts, pred):
    """Issue #32: the trained fold exported three ways gives nnUNetv2_predict's label map (Dice >= 0.99 per class)
    on the test cases, with MONAI's sliding window and the preprocessing that bsf_model.json records."""
    out = {to: str(tmp_path / f"export_{to}") for to in ("monai", "onnx", "hub")}
    for to, folder in out.items():
        run(["bsf-nnunet", "export", "-d", "991", "-tr", "BSFTrainer_CI", "-c", "3d_fullres", "-f", "0", "--to", to,
             "-o", folder], env)
    desc, predictors = exported_predictors(out)
    reverse = desc["axes"]["monai_network_input"] != desc["axes"]["nnunet_array"]
    for case in ("case_006", "case_007"):
        img = sitk.ReadImage(os.path.join(images_ts, f"{case}_0000.nii.gz"))
        assert np.allclose(img.GetSpacing()[::-1], desc["spacing"])  # no resampling to write out
        arr = sitk.GetArrayFromImage(img).astype(np.float32)
        ref = sitk.GetArrayFromImage(sitk.ReadImage(str(pred / f"{case}.nii.gz")))
        for to, predictor in predictors.items():
            got = sliding_window_labels(arr, desc, predictor, reverse and to != "onnx")  # ONNX: nnU-Net's axes
            for c in (0, 1):
                d = 2 * ((got == c) & (ref == c)).sum() / max(1, (got == c).sum() + (ref == c).sum())
                assert d >= 0.99, (case, to, c, d)


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

    # --val reruns the validation of a finished fold (--c after an interruption: tests/training/test_reliability.py)
    run(["nnUNetv2_train", "991", "3d_fullres", "0", "-tr", "BSFTrainer_CI", "-device", "cpu", "--val", "--npz"], env)

    pred = tmp_path / "pred"
    pred_tta = tmp_path / "pred_tta"
    images_ts = os.path.join(folder, "imagesTs")
    # without TTA in fp32 (the exports below are compared with it); with TTA at the default precision: bf16 where
    # the CPU has native bf16
    default_precision = "bf16" if cpu_bf16_enabled() else "fp32"
    for out_dir, tta, precision in ((pred, ["--disable_tta"], "fp32"), (pred_tta, [], default_precision)):
        out = run(["nnUNetv2_predict", "-i", images_ts, "-o", str(out_dir), "-d", "991", "-c", "3d_fullres", "-tr",
                   "BSFTrainer_CI", "-f", "0", "-device", "cpu", "--save_probabilities", "-npp", "1", "-nps", "1"]
                  + tta, dict(env, BSF_CPU_BF16="0") if precision == "fp32" else env)
        assert f"BSF CPU engine: OpenVINO ({precision}," in out, out[-3000:]
    # one exported model for the fold's final weights at the patch size: written by the final validation, reused since;
    # beside it OpenVINO's compiled-model cache
    cached = sorted(os.listdir(env["BSF_CACHE_DIR"]))
    assert len(cached) == 2 and cached[0] == "openvino" and cached[1].endswith(".openvino"), cached
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

    check_exports_predict_as_nnunet(env, run, tmp_path, images_ts, pred)

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
