"""A published-style fine-tuned MONAI checkpoint runs inside nnUNetv2_predict and agrees with MONAI's pipeline."""
import json

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.inferers import sliding_window_inference
from monai.networks.nets import SwinUNETR
from monai.transforms import NormalizeIntensity
from monai_reference import PreMonai15PatchMerging

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

    out = run(["bsf-nnunet", "import-model", str(ckpt), "-d", "137", "--channels", ",".join(CHANNELS),
               "--regions", "brats"], env)
    pred = tmp_path / "pred"
    # the printed command as is (the original's -step_size 0.4; no mirroring without --disable_tta: the default)
    cmd = next(line.split() for line in out.splitlines() if line.strip().startswith("nnUNetv2_predict"))
    cmd = [str(imgs) if a == "INPUT" else str(pred) if a == "OUTPUT" else a for a in cmd]
    run(cmd + ["-device", "cpu", "-npp", "1", "-nps", "1"], env)
    ours = np.asarray(nib.load(pred / "case_0000.nii.gz").dataobj)  # (x, y, z) like the inputs

    # MONAI's own pipeline: nibabel arrays, z-score on non-zero voxels per channel, 128^3 sliding window
    x = np.stack([np.asarray(nib.load(imgs / f"case_0000_{c:04d}.nii.gz").dataobj) for c in range(4)])
    x = NormalizeIntensity(nonzero=True, channel_wise=True)(torch.from_numpy(x))
    with torch.no_grad():
        logits = sliding_window_inference(torch.as_tensor(x)[None].float(), (128, 128, 128), 1, model, overlap=0.6)
    ref = _brats_labels(torch.sigmoid(logits)[0].numpy())
    assert ours.shape == ref.shape
    for name, (a, b) in {k: (_regions(ours)[k], _regions(ref)[k]) for k in ("WT", "TC", "ET")}.items():
        assert b.sum() > 1000, f"reference region {name} is (nearly) empty: test is not informative"
        d = 2 * (a & b).sum() / (a.sum() + b.sum())
        assert d >= 0.99, (name, d)


def _toy_checkpoint(path, out_channels=3):
    torch.manual_seed(0)
    model = SwinUNETR(in_channels=4, out_channels=out_channels, downsample=PreMonai15PatchMerging, **TOY)
    torch.save({"state_dict": model.state_dict(), "epoch": 3}, path)
    return path


def _import(tmp_path, monkeypatch, capsys, *extra, out_channels=3):
    from bsf_nnunet.cli.main import main

    monkeypatch.setenv("nnUNet_results", str(tmp_path / "results"))
    ckpt = _toy_checkpoint(tmp_path / "model.pt", out_channels)
    rc = main(["import-model", str(ckpt), "-d", "137", "--channels", ",".join(CHANNELS), "--regions", "brats",
               *extra])
    printed = capsys.readouterr()
    folder = tmp_path / "results" / "Dataset137_Imported" / "BSFTrainer_imported__BSFImportedPlans__3d_fullres"
    return rc, printed, folder


def test_import_defaults_to_the_original_inference(tmp_path, monkeypatch, capsys):
    """No mirroring TTA (the official test script has none), overlap 0.6 -> -step_size 0.4 in the printed command,
    constant blending, and the settings (with the differences that remain) recorded in the checkpoint and in
    IMPORTED_FROM.json."""
    rc, printed, folder = _import(tmp_path, monkeypatch, capsys)
    assert rc == 0, printed.err
    ck = torch.load(folder / "fold_all" / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert ck["inference_allowed_mirroring_axes"] is None
    for inf in (ck["bsf_metadata"]["inference"], json.loads((folder / "IMPORTED_FROM.json").read_text())["inference"]):
        assert inf["original"]["sliding_window_overlap"] == 0.6
        assert inf["original"]["mirroring"] is False and inf["original"]["blending"] == "constant"
        assert inf["step_size"] == pytest.approx(0.4) and inf["predict_args"] == ["-step_size", "0.4"]
        assert inf["mirroring"] is False and inf["inference_allowed_mirroring_axes"] is None
        assert inf["blending"] == "constant"  # the original's weights (plans bsf.inference_blending)
    cmd = next(line.split() for line in printed.out.splitlines() if line.strip().startswith("nnUNetv2_predict"))
    assert cmd[cmd.index("-step_size") + 1] == "0.4"
    assert cmd[cmd.index("-tr") + 1] == "BSFTrainer_imported" and cmd[cmd.index("-d") + 1] == "137"
    assert "--disable_tta" not in cmd  # not needed: the checkpoint allows no mirroring


def test_import_tta_option_allows_mirroring(tmp_path, monkeypatch, capsys):
    rc, printed, folder = _import(tmp_path, monkeypatch, capsys, "--tta")
    assert rc == 0, printed.err
    ck = torch.load(folder / "fold_all" / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert tuple(ck["inference_allowed_mirroring_axes"]) == (0, 1, 2)
    inf = ck["bsf_metadata"]["inference"]
    assert inf["mirroring"] is True and inf["inference_allowed_mirroring_axes"] == [0, 1, 2]
    assert "-step_size 0.4" in printed.out


def test_import_refuses_single_output_models(tmp_path, monkeypatch, capsys):
    """A one-output (sigmoid) model would become a background-only softmax model: refused with the alternative."""
    from bsf_nnunet.cli.main import main

    monkeypatch.setenv("nnUNet_results", str(tmp_path / "results"))
    ckpt = _toy_checkpoint(tmp_path / "model.pt", out_channels=1)
    rc = main(["import-model", str(ckpt), "-d", "220", "--channels", "FLAIR,T1ce,T1,T2"])
    err = capsys.readouterr().err
    assert rc == 2 and "single output channel" in err and "-pretrained_weights" in err
    assert not (tmp_path / "results").exists() or not any((tmp_path / "results").rglob("checkpoint_final.pth"))


def test_constant_blending_is_monai_sliding_window(nnunet_env, run, tmp_path):
    """Issue #31.7: with import-model's default --blending constant, nnUNetv2_predict's probabilities are MONAI's
    sliding_window_inference(overlap 0.6, mode constant) where both place the windows alike (114 voxels, patch 64:
    windows at 0, 25, 50 in both); --blending gaussian (nnU-Net's weights) differs measurably on the same case."""
    torch.manual_seed(0)
    model = SwinUNETR(in_channels=4, out_channels=3, downsample=PreMonai15PatchMerging, **TOY).eval()
    ckpt = tmp_path / "model.pt"
    torch.save({"state_dict": model.state_dict()}, ckpt)
    rng = np.random.default_rng(1)
    imgs = tmp_path / "imagesTs"
    imgs.mkdir()
    x = (np.abs(rng.normal(300, 80, (4, 114, 64, 64))) + 1).astype(np.float32)  # (c, x, y, z), non-zero everywhere
    for c in range(4):
        nib.save(nib.Nifti1Image(x[c], np.eye(4)), imgs / f"case_0000_{c:04d}.nii.gz")
    xn = NormalizeIntensity(nonzero=True, channel_wise=True)(torch.from_numpy(x))
    with torch.no_grad():
        logits = sliding_window_inference(xn[None].float(), (64, 64, 64), 1, model, overlap=0.6, mode="constant")
    ref = torch.sigmoid(logits)[0].numpy()[[1, 0, 2]]  # TC, WT, ET -> nnU-Net's region order WT, TC, ET
    got = {}
    for dataset, blending in ((137, "constant"), (138, "gaussian")):
        out = run(["bsf-nnunet", "import-model", str(ckpt), "-d", str(dataset), "--channels", ",".join(CHANNELS),
                   "--regions", "brats", "--patch", "64", "64", "64", "--blending", blending], nnunet_env)
        cmd = next(line.split() for line in out.splitlines() if line.strip().startswith("nnUNetv2_predict"))
        pred = tmp_path / f"pred_{blending}"
        cmd = [str(imgs) if a == "INPUT" else str(pred) if a == "OUTPUT" else a for a in cmd]
        log = run(cmd + ["-device", "cpu", "-npp", "1", "-nps", "1", "--save_probabilities"], nnunet_env)
        assert ("blended with constant weights" in log) == (blending == "constant")
        got[blending] = np.load(pred / "case_0000.npz")["probabilities"].transpose(0, 3, 2, 1)  # (c, x, y, z)
    assert got["constant"].shape == ref.shape
    off = {k: float(np.abs(v - ref).max()) for k, v in got.items()}
    assert off["constant"] < 1e-3, off  # nnU-Net sums the windows' logits in float16 (measured 2.3e-4)
    assert off["gaussian"] > 10 * off["constant"], off  # measured 0.25: the switch makes them equal
