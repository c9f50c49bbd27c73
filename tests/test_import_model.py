"""A published-style fine-tuned MONAI checkpoint runs inside nnUNetv2_predict and agrees with MONAI's pipeline."""
import os

import nibabel as nib
import numpy as np
import torch
from monai.inferers import sliding_window_inference
from monai.networks.nets import SwinUNETR
from monai.transforms import NormalizeIntensity

from test_network import PreMonai15PatchMerging

TOY = dict(feature_size=12, depths=(1, 1, 1, 1), num_heads=(3, 6, 12, 24))
CHANNELS = ["FLAIR", "T1ce", "T1", "T2"]


def _brats_labels(probs_tc_wt_et):
    tc, wt, et = (probs_tc_wt_et > 0.5)
    lab = np.zeros(tc.shape, np.uint8)
    lab[wt] = 2
    lab[tc] = 1
    lab[et] = 3
    return lab


def _regions(lab):
    return {"WT": lab > 0, "TC": (lab == 1) | (lab == 3), "ET": lab == 3}


def test_imported_model_matches_monai_pipeline(nnunet_env, run, tmp_path):
    env = nnunet_env
    torch.manual_seed(0)
    model = SwinUNETR(in_channels=4, out_channels=3, downsample=PreMonai15PatchMerging, **TOY).eval()
    with torch.no_grad():  # make the random model's outputs less balanced around 0.5
        model.out.conv.conv.bias.copy_(torch.tensor([-0.2, 0.1, -0.4]))
    ckpt = tmp_path / "model.pt"
    torch.save({"state_dict": model.state_dict(), "epoch": 3, "best_acc": 0.5}, ckpt)

    # a 4-channel case, written the way BraTS files are (one NIfTI per channel)
    rng = np.random.default_rng(0)
    shape = (128, 128, 128)
    zz, yy, xx = np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij")
    imgs = tmp_path / "imagesTs"
    imgs.mkdir()
    vols = []
    for c in range(4):
        v = (200 + 100 * c + 300 * np.exp(-((zz - 0.2 * c) ** 2 + 2 * yy ** 2 + xx ** 2) * 3)
             + rng.normal(0, 20, shape)).astype(np.float32)
        v = np.abs(v) + 1.0  # non-zero everywhere (nnU-Net would crop zero borders; MONAI would not)
        vols.append(v)
        nib.save(nib.Nifti1Image(v, np.eye(4)), imgs / f"case_0000_{c:04d}.nii.gz")

    run(["bsf-nnunet", "import-model", str(ckpt), "-d", "137", "--channels", ",".join(CHANNELS), "--regions",
         "brats"], env)
    pred = tmp_path / "pred"
    run(["nnUNetv2_predict", "-i", str(imgs), "-o", str(pred), "-d", "137", "-c", "3d_fullres", "-tr",
         "BSFTrainer_imported", "-p", "BSFImportedPlans", "-f", "all", "-device", "cpu", "--disable_tta",
         "-npp", "1", "-nps", "1"], env)
    ours = np.asarray(nib.load(pred / "case_0000.nii.gz").dataobj)  # (x, y, z) like the inputs

    # MONAI's own pipeline: nibabel arrays, z-score on non-zero voxels per channel, 128^3 sliding window
    x = np.stack([np.asarray(nib.load(imgs / f"case_0000_{c:04d}.nii.gz").dataobj) for c in range(4)])
    x = NormalizeIntensity(nonzero=True, channel_wise=True)(torch.from_numpy(x))
    with torch.no_grad():
        logits = sliding_window_inference(torch.as_tensor(x)[None].float(), (128, 128, 128), 1, model, overlap=0.5)
    ref = _brats_labels(torch.sigmoid(logits)[0].numpy())
    assert ours.shape == ref.shape
    for name, (a, b) in {k: (_regions(ours)[k], _regions(ref)[k]) for k in ("WT", "TC", "ET")}.items():
        assert b.sum() > 1000, f"reference region {name} is (nearly) empty: test is not informative"
        d = 2 * (a & b).sum() / (a.sum() + b.sum())
        assert d >= 0.99, (name, d)
