"""bsf-nnunet export: MONAI state dict, ONNX and Hub folder round trips from a trained-looking results folder."""
import json
import os

import pytest
import torch
from monai.networks.nets import SwinUNETR

from bsf_nnunet.cli.main import main
from bsf_nnunet.network import BSFSwinUNETR, LegacyPatchMerging
from bsf_nnunet.weights import description, load_checkpoint, transfer_weights
from bsf_nnunet.weights import export as export_mod
from bsf_nnunet.weights.import_model import import_model

TOY = dict(feature_size=12, depths=(1, 1, 1, 1), num_heads=(3, 6, 12, 24))
CHANNELS = ["T1", "FLAIR"]
LABELS = ["background", "csf", "gm", "wm"]
TRAINER = ["-tr", "BSFTrainer_imported", "-p", "BSFImportedPlans", "-c", "3d_fullres"]


@pytest.fixture
def results(nnunet_roots):
    return nnunet_roots["nnUNet_results"]


def _trained(results, tmp_path, dataset_id, merging, axis_order):
    """A results folder with a toy BSF model (MONAI weights of the given merging filed by import-model)."""
    torch.manual_seed(dataset_id)
    down = LegacyPatchMerging if merging == "legacy" else "merging"
    monai_net = SwinUNETR(in_channels=2, out_channels=len(LABELS), downsample=down, **TOY)
    ckpt = tmp_path / f"monai_{dataset_id}.pt"
    torch.save({"state_dict": monai_net.state_dict()}, ckpt)
    folder = import_model(str(ckpt), dataset_id, CHANNELS, labels=LABELS, patch=(64, 64, 64),
                          spacing=(1.5, 1.0, 1.0), merging=merging, axis_order=axis_order, results=str(results))
    return folder


def _export(dataset_id, to, out, *extra):
    return main(["export", "-d", str(dataset_id), *TRAINER, "-f", "all", "--to", to, "-o", str(out), *extra])


def _nnunet_network(folder, merging, axis_order):
    net = BSFSwinUNETR(2, len(LABELS), merging=merging, axis_order=axis_order, attention="monai", **TOY)
    net.load_state_dict(load_checkpoint(os.path.join(folder, "fold_all", "checkpoint_final.pth")).state_dict)
    return net.eval()


@pytest.mark.parametrize("merging,axis_order", [("legacy", "xyz"), ("fixed", "zyx")])
def test_monai_state_dict_round_trip(results, tmp_path, merging, axis_order):
    folder = _trained(results, tmp_path, 201 if merging == "legacy" else 202, merging, axis_order)
    out = tmp_path / "monai_out"
    assert _export(201 if merging == "legacy" else 202, "monai", out) == 0
    meta = json.loads((out / "bsf_model.json").read_text())
    assert meta["channel_names"] == CHANNELS and meta["merging"] == merging and meta["axis_order"] == axis_order
    assert meta["outputs"] == LABELS and meta["spacing"] == [1.5, 1.0, 1.0] and meta["patch_size"] == [64] * 3
    assert meta["normalization"] == ["ZScoreNormalization"] * 2 and set(meta["intensity_properties"]) == set(CHANNELS)
    assert meta["source"]["trainer"] == "BSFTrainer_imported" and meta["source"]["fold"] == "all"
    kwargs = dict(meta["monai"]["kwargs"])
    assert kwargs["downsample"] == description.MONAI_DOWNSAMPLE[merging] and kwargs["use_v2"] is False
    if merging == "legacy":  # MONAI >= 1.5 has no string option for it
        kwargs["downsample"] = LegacyPatchMerging
    sd = torch.load(out / "model.pt", weights_only=True)
    assert type(sd) is dict and all(torch.is_tensor(v) for v in sd.values())
    monai_net = SwinUNETR(**kwargs).eval()
    monai_net.load_state_dict(sd)
    from safetensors.torch import load_file

    assert all(torch.equal(sd[k], v) for k, v in load_file(out / "model.safetensors").items())

    x = torch.randn(1, 2, 32, 64, 96)  # nnU-Net's array order; non-cubic so that a wrong transpose shows
    with torch.no_grad():
        ref = _nnunet_network(folder, merging, axis_order)(x)
        if axis_order == "xyz":  # the MONAI network saw (x, y, z): reverse the spatial axes around it
            got = monai_net(x.permute(0, 1, 4, 3, 2)).permute(0, 1, 4, 3, 2)
        else:
            got = monai_net(x)
    assert meta["axes"]["monai_network_input"] == (["x", "y", "z"] if axis_order == "xyz" else ["z", "y", "x"])
    assert torch.allclose(got, ref, atol=1e-4), (got - ref).abs().max()


def test_onnx_matches_pytorch_and_mismatch_leaves_nothing(results, tmp_path, monkeypatch, capsys):
    _trained(results, tmp_path, 203, "legacy", "xyz")
    out = tmp_path / "onnx_out"
    assert _export(203, "onnx", out) == 0
    meta = json.loads((out / "bsf_model.json").read_text())
    assert meta["onnx"]["check"]["relative_diff"] <= 1e-3 and "max abs diff" in capsys.readouterr().out
    import onnxruntime as ort

    sess = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    assert sess.get_inputs()[0].shape[0] == "batch" and sess.get_inputs()[0].shape[1:] == [2, 64, 64, 64]

    real = export_mod.onnx_outputs
    monkeypatch.setattr(export_mod, "onnx_outputs", lambda path, x: real(path, x) + 1.0)
    bad = tmp_path / "onnx_bad"
    assert _export(203, "onnx", bad) == 2
    assert "disagree" in capsys.readouterr().err
    assert not any(f.endswith(".onnx") or f.startswith(".tmp_") for f in os.listdir(bad))
    assert not (bad / "bsf_model.json").exists()


def test_hub_folder_loads_back(results, tmp_path):
    folder = _trained(results, tmp_path, 204, "fixed", "zyx")
    val = os.path.join(folder, "fold_all", "validation")
    os.makedirs(val)
    with open(os.path.join(val, "summary.json"), "w") as f:
        json.dump({"foreground_mean": {"Dice": 0.75}, "metric_per_case": [{}, {}],
                   "mean": {"1": {"Dice": 0.5}, "2": {"Dice": 0.8}, "3": {"Dice": 0.95}}}, f)
    out = tmp_path / "hub"
    assert _export(204, "hub", out, "--license", "apache-2.0") == 0
    assert sorted(os.listdir(out)) == ["README.md", "bsf_model.json", "model.safetensors"]
    card = (out / "README.md").read_text()
    head = card.split("---")[1]
    assert card.startswith("---\n") and "license: apache-2.0" in head and "library_name:" in head
    assert all(f"- {t}" in head for t in ("medical-imaging", "brain-mri", "nnu-net", "swin-unetr"))
    assert "| gm | 0.8000 |" in card and "0.7500" in card and "2406.10395" in card and "import-model" in card

    ck = load_checkpoint(out / "model.safetensors")
    ref = load_checkpoint(os.path.join(folder, "fold_all", "checkpoint_final.pth")).state_dict
    assert ck.state_dict.keys() == ref.keys() and all(torch.equal(ck.state_dict[k], ref[k]) for k in ref)
    meta = ck.metadata
    assert meta["channel_names"] == CHANNELS and meta["axis_order"] == "zyx" and meta["merging"] == "fixed"
    assert meta["format"] == "bsf_nnunet" and meta["variant_guess"] == "toy"
    net = BSFSwinUNETR(1, 2, merging="fixed", **TOY)
    report = transfer_weights(net, ck, target_channels=["FLAIR"], verbose=False)  # fine-tuning from it
    assert report.encoder_loaded > 0 and report.channel_mapping[0][1] == 1


def test_bad_input(results, tmp_path, capsys):
    folder = _trained(results, tmp_path, 205, "legacy", "xyz")
    assert main(["export", "-d", "205", *TRAINER, "-f", "0", "--to", "monai", "-o", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "No fold 0" in err and "folds there: all" in err

    assert _export(205, "monai", tmp_path / "o", "--checkpoint", "checkpoint_best.pth") == 2
    assert "checkpoint_best.pth" in capsys.readouterr().err

    cnn = results / "Dataset205_Imported" / "nnUNetTrainer__nnUNetPlans__3d_fullres"
    os.makedirs(cnn / "fold_0")
    plans = json.loads(open(os.path.join(folder, "plans.json")).read())
    plans["configurations"]["3d_fullres"]["architecture"]["network_class_name"] = \
        "dynamic_network_architectures.architectures.unet.PlainConvUNet"
    (cnn / "plans.json").write_text(json.dumps(plans))
    (cnn / "dataset.json").write_text(open(os.path.join(folder, "dataset.json")).read())
    assert main(["export", "-d", "Dataset205_Imported", "-tr", "nnUNetTrainer", "-c", "3d_fullres", "-f", "0",
                 "--to", "monai", "-o", str(tmp_path / "o")]) == 2
    assert "not BrainSegFounder's" in capsys.readouterr().err

    out = tmp_path / "existing"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert _export(205, "monai", out) == 2
    assert "--overwrite" in capsys.readouterr().err and os.listdir(out) == ["keep.txt"]
    assert _export(205, "monai", out, "--overwrite") == 0
    assert "keep.txt" in capsys.readouterr().out and (out / "keep.txt").read_text() == "mine"


def test_safetensors_loader_errors(tmp_path):
    from safetensors.torch import save_file

    from bsf_nnunet.weights import CheckpointError

    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "none.safetensors")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"<html>not found</html>")
    with pytest.raises(CheckpointError, match="corrupt or incomplete"):
        load_checkpoint(bad)
    save_file({"w": torch.zeros(2)}, tmp_path / "raw.safetensors")  # no bsf_model.json beside it
    assert load_checkpoint(tmp_path / "raw.safetensors").metadata["format"] == "raw"
    (tmp_path / "bsf_model.json").write_text("{broken")
    with pytest.raises(CheckpointError, match="bsf_model.json"):
        load_checkpoint(tmp_path / "raw.safetensors")


def test_nnssl_folder_of_a_fine_tuned_fold_loads_back(results, tmp_path):
    """--to nnssl (issue #32): nnssl's folder layout, read back by the loader as an nnssl file with the fold's
    tensors, channels, merging and axis order; fine-tuning from it maps the channels by name."""
    folder = _trained(results, tmp_path, 206, "legacy", "xyz")
    out = tmp_path / "nnssl"
    assert _export(206, "nnssl", out) == 0
    assert sorted(os.listdir(out)) == ["adaptation_plan.json", "checkpoint_final.pth", "config.json"]
    raw = torch.load(out / "checkpoint_final.pth", weights_only=True)
    assert set(raw) == {"network_weights", "nnssl_adaptation_plan", "citations"}
    ck = load_checkpoint(out / "checkpoint_final.pth")
    ref = load_checkpoint(os.path.join(folder, "fold_all", "checkpoint_final.pth")).state_dict
    assert ck.state_dict.keys() == ref.keys() and all(torch.equal(ck.state_dict[k], ref[k]) for k in ref)
    meta = ck.metadata
    assert meta["format"] == "nnssl" and meta["channel_names"] == CHANNELS
    assert meta["merging"] == "legacy" and meta["axis_order"] == "xyz" and not meta.get("axis_order_assumed")
    net = BSFSwinUNETR(1, 2, merging="legacy", axis_order="xyz", **TOY)
    report = transfer_weights(net, ck, target_channels=["FLAIR"], verbose=False)
    assert report.encoder_loaded > 0 and report.channel_mapping[0][1] == 1
