"""Issue #18 row 8: prediction inputs that do not match the model. Far-off spacing or orientation: predicted, with
one warning per case; fewer channel files than the model takes: refused by name before anything is predicted."""
import os
import sys
import types

import nibabel as nib
import numpy as np
import pytest

from bsf_nnunet.training.predict_checks import (
    ORIENTATIONS_KEY,
    PredictionInputError,
    case_geometry_warnings,
    check_prediction_cases,
    record_training_orientations,
    training_orientations,
    typical_orientations,
)

pytestmark = pytest.mark.fault_matrix  # issue #18's fault matrix: python -m pytest -n 2 -m fault_matrix

SWAP_IJ = np.array([[0, 1, 0, 0], [1, 0, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]], dtype=float)  # header axes i, j swapped


def _nii(path, affine=None, shape=(8, 8, 8)):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    data = np.random.default_rng(0).random(shape).astype(np.float32) + 1
    nib.save(nib.Nifti1Image(data, np.eye(4) if affine is None else affine), str(path))
    return str(path)


def _plans(spacing=(1.0, 1.0, 1.0), reader="SimpleITKIO"):
    return {"dataset_name": "Dataset999_None", "original_median_spacing_after_transp": list(spacing),
            "transpose_forward": [0, 1, 2], "transpose_backward": [0, 1, 2], "image_reader_writer": reader}


def test_far_off_spacing_is_named_with_both_spacings(tmp_path):
    thick = _nii(tmp_path / "in" / "p1_0000.nii.gz", np.diag([1.0, 1.0, 5.0, 1.0]))
    w = case_geometry_warnings("p1", thick, "in/p1_0000.nii.gz", (1.0, 1.0, 1.0), ["RAS"])
    assert len(w) == 1
    assert w[0].startswith("case p1: in/p1_0000.nii.gz has voxel spacing 1 x 1 x 5 mm")
    assert "median spacing of 1 x 1 x 1 mm: axis k is 5x coarser" in w[0] and "fix the header (pixdim)" in w[0]
    fine = _nii(tmp_path / "in" / "p2_0000.nii.gz", np.diag([0.3, 1.0, 1.5, 1.0]))
    w = case_geometry_warnings("p2", fine, "in/p2_0000.nii.gz", (1.0, 1.0, 1.0), ["RAS"])
    assert len(w) == 1 and "axis i is 3.33x finer" in w[0] and "axis k" not in w[0]  # 1.5x: within the 2x


def test_swapped_or_flipped_axes_are_named(tmp_path):
    swapped = _nii(tmp_path / "p1_0000.nii.gz", SWAP_IJ)
    w = case_geometry_warnings("p1", swapped, "p1_0000.nii.gz", None, ["RAS"])
    assert len(w) == 1 and "has orientation ARS" in w[0] and "training images are RAS: voxel axes i and j swapped" \
        in w[0] and "Reorient the image to RAS" in w[0]
    flipped = _nii(tmp_path / "p2_0000.nii.gz", np.diag([-1.0, 1.0, 1.0, 1.0]))
    assert "LAS" in case_geometry_warnings("p2", flipped, "p2_0000.nii.gz", None, ["RAS"])[0]
    assert "voxel axis i flipped" in case_geometry_warnings("p2", flipped, "p2_0000.nii.gz", None, ["RAS"])[0]
    assert case_geometry_warnings("p2", flipped, "p2_0000.nii.gz", None, ["RAS", "LAS"]) == []
    # a reader that reorients to RAS (SimpleITKIOWithReorient) sees no difference: no warning
    assert case_geometry_warnings("p1", swapped, "p1_0000.nii.gz", None, ["RAS"], reorient=True) == []


def test_training_orientations_recorded_or_read_from_raw(tmp_path, monkeypatch):
    assert typical_orientations({"RAS": 9, "LAS": 1}) == ["RAS"]  # one odd training image is not typical
    assert typical_orientations({"RAS": 5, "LAS": 3}) == ["RAS", "LAS"]
    conf = {"bsf": {ORIENTATIONS_KEY: {"LPS": 4}}}
    assert training_orientations(_plans(), conf) == {"LPS": 4}
    raw = tmp_path / "raw"
    for i in range(3):
        _nii(raw / "Dataset999_None" / "imagesTr" / f"t{i}_0000.nii.gz", SWAP_IJ if i == 0 else None)
    monkeypatch.setenv("nnUNet_raw", str(raw))  # read through nnunetv2.paths at call time
    dj = {"file_ending": ".nii.gz", "channel_names": {"0": "T1"}}
    assert training_orientations(_plans(), {"bsf": {}}, dj) == {"RAS": 2, "ARS": 1}
    assert training_orientations(dict(_plans(), dataset_name="Dataset998_Gone"), {}, dj) is None
    conf = {"bsf": {}}
    pm = types.SimpleNamespace(dataset_name="Dataset999_None", plans={"configurations": {"3d_fullres": conf}})
    trainer = types.SimpleNamespace(plans_manager=pm, configuration_name="3d_fullres", dataset_json=dj,
                                    configuration_manager=types.SimpleNamespace(configuration=conf))
    record_training_orientations(trainer)  # by BSFTrainer.on_train_start, before nnU-Net saves plans.json
    assert conf["bsf"][ORIENTATIONS_KEY] == {"RAS": 2, "ARS": 1}


def _fake_predictor(dataset_json, plans, arch="bsf_nnunet.network.swin_unetr.BSFSwinUNETR"):
    conf = {"architecture": {"network_class_name": arch}, "bsf": {ORIENTATIONS_KEY: {"RAS": 3}}}
    return types.SimpleNamespace(
        dataset_json=dataset_json, plans_manager=types.SimpleNamespace(plans=plans),
        device=types.SimpleNamespace(type="cpu"),
        configuration_manager=types.SimpleNamespace(network_arch_class_name=arch, configuration=conf))


def test_nnunet_predictor_refuses_a_case_with_fewer_channels(tmp_path, capsys):
    """Through nnU-Net's own grouping of the -i folder (nnUNetPredictor._manage_input_and_output_lists, wrapped by
    the hooks that importing bsf_nnunet.training installs): a case lacking _0001 is refused by name; another
    network's predictor is not touched."""
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    import bsf_nnunet.training  # noqa: F401 - installs the check

    inp = tmp_path / "to_predict"
    for name in ("ok_0000", "ok_0001", "short_0000", "tail_0001"):
        _nii(inp / f"{name}.nii.gz")
    dj = {"file_ending": ".nii.gz", "channel_names": {"0": "T1", "1": "FLAIR"}, "labels": {"background": 0}}
    manage = nnUNetPredictor._manage_input_and_output_lists
    with pytest.raises(PredictionInputError) as e:
        manage(_fake_predictor(dj, _plans()), str(inp), str(tmp_path / "out"))
    msg = str(e.value)
    assert "takes 2 channel file(s) per case" in msg and "nothing was predicted" in msg
    assert "case short: channel file to_predict/short_0001.nii.gz is missing (channel 1, 'FLAIR'" in msg
    assert "case tail: channel file to_predict/tail_0000.nii.gz is missing (channel 0, 'T1'" in msg
    assert "case ok" not in msg and "--predict-input" in msg
    lists, _, _ = manage(_fake_predictor(dj, _plans(), arch="SomeOtherNet"), str(inp), str(tmp_path / "out"))
    assert len(lists) == 3  # not a BSF network: nnU-Net's behaviour unchanged


def test_check_warns_once_per_far_off_case(tmp_path):
    dj = {"file_ending": ".nii.gz", "channel_names": {"0": "T1"}}
    cases = [[_nii(tmp_path / "i" / "good_0000.nii.gz")],
             [_nii(tmp_path / "i" / "both_0000.nii.gz", SWAP_IJ @ np.diag([1.0, 1.0, 6.0, 1.0]))]]
    warned = []
    check_prediction_cases(cases, _plans(), {"bsf": {ORIENTATIONS_KEY: {"RAS": 5}}}, dj, warn=warned.append)
    assert len(warned) == 2 and all(w.startswith("case both: i/both_0000.nii.gz has") for w in warned)


def test_nnunetv2_predict_warns_about_far_off_cases_and_refuses_incomplete_ones(nnunet_env, run, tmp_path,
                                                                                 monkeypatch, capsys):
    """An imported toy model (1 mm, 2 channels; RAS training images in $nnUNet_raw): the stock nnUNetv2_predict
    predicts a 5 mm case and a case with swapped axes, warning once about each; nnU-Net's predictor on the same
    model refuses the input once a case lacks a channel file."""
    import torch
    from monai.networks.nets import SwinUNETR
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    from bsf_nnunet.cli.main import main

    env = nnunet_env
    torch.manual_seed(0)
    net = SwinUNETR(in_channels=2, out_channels=2, feature_size=12, depths=(1, 1, 1, 1), num_heads=(3, 6, 12, 24))
    torch.save({"state_dict": net.state_dict()}, tmp_path / "model.pt")
    monkeypatch.setenv("nnUNet_results", env["nnUNet_results"])
    assert main(["import-model", str(tmp_path / "model.pt"), "-d", "137", "--channels", "T1,FLAIR",
                 "--labels", "background,brain", "--patch", "64", "64", "64"]) == 0
    capsys.readouterr()
    _nii(os.path.join(env["nnUNet_raw"], "Dataset137_Imported", "imagesTr", "t0_0000.nii.gz"))
    inp = tmp_path / "in"
    for c in range(2):
        _nii(inp / f"thick_{c:04d}.nii.gz", np.diag([1.0, 1.0, 5.0, 1.0]), shape=(24, 24, 6))
        _nii(inp / f"swapped_{c:04d}.nii.gz", SWAP_IJ, shape=(24, 24, 24))
    out = run(["nnUNetv2_predict", "-i", str(inp), "-o", str(tmp_path / "pred"), "-d", "137", "-c", "3d_fullres",
               "-tr", "BSFTrainer_imported", "-p", "BSFImportedPlans", "-f", "all", "-device", "cpu",
               "--disable_tta", "-npp", "0", "-nps", "0"], env)
    assert "case thick: in/thick_0000.nii.gz has voxel spacing 1 x 1 x 5 mm" in out and "axis k is 5x coarser" in out
    assert "case swapped: in/swapped_0000.nii.gz has orientation ARS" in out and "voxel axes i and j swapped" in out
    assert out.count("WARNING (bsf-nnunet)") == 2
    assert (tmp_path / "pred" / "thick.nii.gz").exists() and (tmp_path / "pred" / "swapped.nii.gz").exists()

    os.remove(inp / "thick_0001.nii.gz")
    predictor = nnUNetPredictor(device=torch.device("cpu"), use_mirroring=False)
    predictor.initialize_from_trained_model_folder(
        os.path.join(env["nnUNet_results"], "Dataset137_Imported", "BSFTrainer_imported__BSFImportedPlans__3d_fullres"),
        ("all",))
    with pytest.raises(PredictionInputError, match=r"case thick: channel file in/thick_0001.nii.gz is missing "
                                                   r"\(channel 1, 'FLAIR'"):
        predictor.predict_from_files(str(inp), str(tmp_path / "pred2"), num_processes_preprocessing=1,
                                     num_processes_segmentation_export=1)
    assert not (tmp_path / "pred2" / "swapped.nii.gz").exists()  # refused before anything was predicted


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))
