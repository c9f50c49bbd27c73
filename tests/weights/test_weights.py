"""bsf_nnunet.weights: checkpoint formats, safety, variant/merging checks, channel mapping and weight transfer.

All checkpoints are fabricated here (toy networks: feature size 12, depths 1-1-1-1); nothing is downloaded."""
from __future__ import annotations

import os
import zipfile

import numpy as np
import pytest
import torch
from torch import nn

from bsf_nnunet.network.swin_unetr import BSFSwinUNETR
from bsf_nnunet.planning.presets import load_preset
from bsf_nnunet.weights import (
    ChannelMappingError,
    CheckpointError,
    WeightsMismatchError,
    guess_variant,
    load_checkpoint,
    map_channels,
    normalise_channel_name,
    normalise_state_dict,
    parse_channel_list,
    transfer_weights,
)

TOY = dict(feature_size=12, depths=(1, 1, 1, 1))
PE = "swinViT.patch_embed.proj.weight"
ENC1 = ("encoder1.layer.conv1.conv.weight", "encoder1.layer.conv3.conv.weight")
BRATS = ["FLAIR", "T1ce", "T1", "T2"]  # the official BraTS files' channel order


class Unpicklable:  # an arbitrary custom object: weights_only loading must refuse it
    def __init__(self):
        self.payload = [1, 2, 3]


def toy(cin=4, ncls=3, seed=0, **kw):
    torch.manual_seed(seed)
    return BSFSwinUNETR(cin, ncls, **{**TOY, **kw}).eval()


def x_in(cin=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, cin, 64, 32, 32, generator=g)


def run(model, x):
    with torch.no_grad():
        return model(x)


def swin_only(sd):
    return {k: v for k, v in sd.items() if k.startswith("swinViT.")}


def ssl_heads(fs=12):
    torch.manual_seed(5)
    return {"rotation_head.weight": torch.randn(4, 16 * fs), "rotation_head.bias": torch.randn(4),
            "contrastive_head.weight": torch.randn(512, 16 * fs), "contrastive_head.bias": torch.randn(512),
            "conv.0.weight": torch.randn(16 * fs, 8 * fs, 1, 1, 1), "conv.0.bias": torch.randn(8 * fs)}


def official_ssl(model, legacy_keys=False):
    """BrainSegFounder/MONAI SSL file: {'state_dict': {'module.swinViT.*', heads}, 'optimizer', 'epoch', ...}."""
    sd = {}
    for k, v in swin_only(model.state_dict()).items():
        k = k[len("swinViT."):] if legacy_keys else k
        sd["module." + k] = v.clone()
    sd.update({"module." + k: v for k, v in ssl_heads().items()})
    if legacy_keys:
        sd["module.norm.weight"] = torch.ones(16 * 12)
    opt = torch.optim.AdamW([nn.Parameter(torch.zeros(2))]).state_dict()
    return {"state_dict": sd, "optimizer": opt, "epoch": 10, "global_step": 1000}


def nnunet_ckpt(model, channel_names=("T1", "FLAIR"), arch_extra=None):
    """What nnUNetTrainer.save_checkpoint writes for a BSF trainer (numpy scalars in logging, torch.device)."""
    arch = {**TOY, "num_heads": [3, 6, 12, 24], "merging": "legacy", "axis_order": "zyx", **(arch_extra or {})}
    plans = {"plans_name": "nnUNetPlans", "configurations": {"3d_fullres": {
        "patch_size": [64, 64, 64], "spacing": [1.0, 1.0, 1.0], "normalization_schemes": ["ZScoreNormalization"],
        "architecture": {"network_class_name": "bsf_nnunet.network.swin_unetr.BSFSwinUNETR", "arch_kwargs": arch,
                         "_kw_requires_import": []},
        "bsf": {"variant": "toy"}}}}
    opt = torch.optim.AdamW(model.parameters()).state_dict()
    return {
        "network_weights": model.state_dict(), "optimizer_state": opt, "grad_scaler_state": None,
        "logging": {"mean_fg_dice": [np.float64(0.5)], "ema_fg_dice": [np.float64(0.5)],
                    "dice_per_class_or_region": [[np.float64(0.4), np.float64(np.nan)]],
                    "train_losses": [np.float32(-0.3)], "val_losses": [np.float32(-0.2)], "lrs": [1e-3],
                    "epoch_start_timestamps": [1.0], "epoch_end_timestamps": [2.0]},
        "_best_ema": np.float64(0.5), "current_epoch": 3,
        "init_args": {"plans": plans, "configuration": "3d_fullres", "fold": 0,
                      "dataset_json": {"channel_names": {str(i): c for i, c in enumerate(channel_names)},
                                       "labels": {"background": 0, "a": 1}},
                      "device": torch.device("cpu")},
        "trainer_name": "BSFTrainer_Toy", "inference_allowed_mirroring_axes": (0, 1, 2),
    }


def bsf_pretrain(model, channel_names=("T1", "FLAIR"), merging="legacy", key="network_weights"):
    sd = {**swin_only(model.state_dict()), **ssl_heads()}
    return {key: sd, "optimizer_state": {}, "current_epoch": 5, "bsf_metadata": {
        "format": "bsf_pretrain", "stage": 1, "parent": None, "variant": "toy",
        "arch_kwargs": {**TOY, "depths": [1, 1, 1, 1], "num_heads": [3, 6, 12, 24], "merging": merging},
        "merging": merging, "axis_order": "zyx", "channel_names": list(channel_names), "patch_size": [64, 64, 64],
        "spacing": [1.0, 1.0, 1.0], "normalization": ["ZScoreNormalization"] * len(channel_names)}}


def save(obj, tmp_path, name="ckpt.pth"):
    p = tmp_path / name
    torch.save(obj, p)
    return str(p)


# ------------------------------------------------------------------------------------------------ channel names
@pytest.mark.parametrize("name,canon", [
    ("T1ce", "t1ce"), ("T1c", "t1ce"), ("T1Gd", "t1ce"), ("t1-gd", "t1ce"), ("T1post", "t1ce"), ("T1+C", "t1ce"),
    ("ce-T1", "t1ce"), ("FLAIR", "flair"), ("T2-FLAIR", "flair"), ("t2flair", "flair"), ("T2_FLAIR", "flair"),
    ("T1", "t1"), ("T1w", "t1"), ("MPRAGE", "t1"), ("T2", "t2"), ("t2w", "t2"), ("PD", "pd"), ("PDw", "pd"),
    ("DWI", "dwi"), ("ADC", "adc"), ("T2*", "t2star"), (" My Seq_2 ", "myseq2")])
def test_normalise_channel_name(name, canon):
    assert normalise_channel_name(name) == canon


def test_parse_channel_list():
    assert parse_channel_list("FLAIR,T1ce,T1,T2") == ["FLAIR", "T1ce", "T1", "T2"]
    assert parse_channel_list(" T1 , FLAIR ") == ["T1", "FLAIR"]
    with pytest.raises(ValueError, match="--pretrained-channels"):
        parse_channel_list("T1,,T2")


def test_map_channels():
    m = map_channels(["FLAIR", "T1ce", "T1", "T2"], ["t1w", "T1Gd", "flair", "CT"])
    assert m == [(0, 2, "alias"), (1, 1, "alias"), (2, 0, "same"), (3, None, "mean")]
    with pytest.raises(ChannelMappingError) as e:
        map_channels(["T1", "FLAIR"], ["CT", "PET"])
    msg = str(e.value)
    assert "[CT, PET]" in msg and "[T1, FLAIR]" in msg and "--pretrained-channels" in msg


# ------------------------------------------------------------------------------------------------ formats
def test_official_ssl_format_and_transfer(tmp_path, capsys):
    src = toy(seed=1)
    path = save(official_ssl(src), tmp_path)
    ck = load_checkpoint(path)
    md = ck.metadata
    assert md["format"] == "monai_ssl" and md["axis_order"] == "xyz" and md["merging"] == "legacy"
    assert md["channel_names"] is None and md["variant_guess"] == "toy" and md["epoch"] == 10
    assert md["prefixes_stripped"] == ["module."] and not md["legacy_encoder_keys"]
    assert all(not k.startswith("module.") for k in ck.state_dict)

    model = toy(seed=2)
    x = x_in()
    before = run(model, x)
    rep = transfer_weights(model, ck, source_channels=BRATS, target_channels=["FLAIR", "T1ce", "T1", "T2"])
    assert "loaded" in capsys.readouterr().out  # verbose prints the summary
    for k, v in swin_only(src.state_dict()).items():
        assert torch.equal(model.state_dict()[k], v), k
    skipped = dict(rep.skipped)
    assert "rotation_head.weight" in skipped and "conv.0.weight" in skipped
    assert "pretraining head" in skipped["contrastive_head.weight"]
    missing = rep.names("missing")
    assert "decoder1.conv_block.conv1.conv.weight" in missing and "out.conv.conv.weight" in missing
    assert not any(m.startswith("swinViT.") for m in missing)
    assert not rep.warnings
    assert rep.encoder_loaded == len([k for k in src.state_dict()
                                      if k.startswith("swinViT.") and "relative_position_index" not in k])
    assert not torch.allclose(before, run(model, x))


def test_legacy_ssl_encoder_keys(tmp_path):
    src = toy(seed=1)
    obj = official_ssl(src, legacy_keys=True)
    assert "module.patch_embed.proj.weight" in obj["state_dict"]
    ck = load_checkpoint(save(obj, tmp_path))
    assert ck.metadata["legacy_encoder_keys"] and ck.metadata["format"] == "monai_ssl"
    assert PE in ck.state_dict and "swinViT.layers4.0.blocks.0.attn.qkv.weight" in ck.state_dict
    assert "rotation_head.weight" in ck.state_dict  # heads keep their names
    model = toy(seed=2)
    rep = transfer_weights(model, ck, source_channels=BRATS, verbose=False)
    assert torch.equal(model.state_dict()[PE], src.state_dict()[PE])
    assert "swinViT.norm.weight" in dict(rep.skipped)


def test_official_finetuned_reproduces_outputs(tmp_path):
    src = toy(seed=3, axis_order="xyz")
    obj = {"state_dict": src.state_dict(), "epoch": 300, "best_acc": np.float64(0.91)}  # MONAI's tutorial code
    ck = load_checkpoint(save(obj, tmp_path))
    assert ck.metadata["format"] == "monai_finetuned" and ck.metadata["axis_order"] == "xyz"
    assert ck.metadata["best_acc"] == pytest.approx(0.91) and ck.metadata["out_channels"] == 3
    model = toy(seed=4, axis_order="xyz")
    x = x_in()
    rep = transfer_weights(model, ck, source_channels=BRATS, verbose=False)
    assert not rep.missing and not rep.adapted
    assert {n for n, _ in rep.skipped} == {k for k in src.state_dict() if k.endswith("relative_position_index")}
    assert torch.equal(run(model, x), run(src, x))


def test_nnunet_checkpoint_needs_numpy_allowlist_only(tmp_path):
    src = toy(cin=2, ncls=2, seed=6)
    path = save(nnunet_ckpt(src), tmp_path)
    # plain weights-only loading refuses nnU-Net's numpy scalars ...
    with pytest.raises(Exception, match="numpy"):
        torch.load(path, weights_only=True)
    # ... our loader allows exactly those (no full unpickling)
    ck = load_checkpoint(path)
    md = ck.metadata
    assert md["format"] == "bsf_nnunet" and md["channel_names"] == ["T1", "FLAIR"]
    assert md["merging"] == "legacy" and md["axis_order"] == "zyx" and md["trainer_name"] == "BSFTrainer_Toy"
    assert md["variant"] == "toy" and md["variant_guess"] == "toy" and md["epoch"] == 3
    model = toy(cin=2, ncls=2, seed=7)
    rep = transfer_weights(model, ck, target_channels=["T1", "FLAIR"], verbose=False)
    assert not rep.missing and not rep.adapted and not rep.warnings
    x = x_in(2)
    assert torch.equal(run(model, x), run(src, x))


def test_numpy1_pickles_load(tmp_path):
    """Files written with numpy 1.x name numpy.core.multiarray.scalar (numpy 2: numpy._core...)."""
    path = save(nnunet_ckpt(toy(cin=2, ncls=2)), tmp_path, "np2.pth")
    old = str(tmp_path / "np1.pth")
    with zipfile.ZipFile(path) as zin, zipfile.ZipFile(old, "w", zipfile.ZIP_STORED) as zout:
        for item in zin.infolist():
            data = zin.read(item.filename)
            if item.filename.endswith("data.pkl"):
                assert b"numpy._core.multiarray" in data
                data = data.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
            zout.writestr(item, data)
    assert load_checkpoint(old).metadata["format"] == "bsf_nnunet"


@pytest.mark.parametrize("key", ["network_weights", "state_dict"])
def test_bsf_pretrain_format_and_channel_adaptation(tmp_path, key):
    src = toy(cin=2, seed=8)
    path = save(bsf_pretrain(src, ("T1", "FLAIR"), key=key), tmp_path)
    assert torch.load(path, weights_only=True)["bsf_metadata"]["stage"] == 1  # plain weights-only works
    ck = load_checkpoint(path)
    md = ck.metadata
    assert md["format"] == "bsf_pretrain" and md["channel_names"] == ["T1", "FLAIR"] and md["stage"] == 1
    assert md["axis_order"] == "zyx" and md["merging"] == "legacy" and md["variant_guess"] == "toy"

    model = toy(cin=3, seed=9)
    rep = transfer_weights(model, ck, target_channels=["T2-FLAIR", "t1w", "T2"], verbose=False)
    w_src, w = src.state_dict()[PE], model.state_dict()[PE]
    assert torch.equal(w[:, 0], w_src[:, 1])  # FLAIR <- FLAIR
    assert torch.equal(w[:, 1], w_src[:, 0])  # T1 <- T1
    assert torch.allclose(w[:, 2], w_src.mean(1))  # T2: no match -> mean
    assert rep.names("adapted") == [PE]  # encoder1 is not in an SSL checkpoint
    assert "encoder1.layer.conv1.conv.weight" in rep.names("missing")
    text = rep.summary()
    assert "model channel 2 'T2' <- mean of all checkpoint channels" in text
    assert "model channel 0 'T2-FLAIR' <- checkpoint channel 1 'FLAIR' (alias)" in text


def test_channel_reorder_in_full_model(tmp_path):
    """Same channel count, other order: input filters are permuted by name, encoder1's too."""
    src = toy(seed=10)
    obj = nnunet_ckpt(src, channel_names=("FLAIR", "T1ce", "T1", "T2"))
    ck = load_checkpoint(save(obj, tmp_path))
    model = toy(seed=11)
    rep = transfer_weights(model, ck, target_channels=["T1", "T2", "FLAIR", "T1Gd"], verbose=False)
    assert set(rep.names("adapted")) == {PE, *ENC1}
    perm = [2, 3, 0, 1]
    for k in (PE, *ENC1):
        assert torch.equal(model.state_dict()[k], src.state_dict()[k][:, perm]), k
    x = x_in()
    # the model's input (T1, T2, FLAIR, T1Gd) is the checkpoint's (FLAIR, T1ce, T1, T2) reordered
    assert torch.allclose(run(model, x), run(src, x[:, perm]), atol=1e-5)


def test_bare_state_dicts_classified_by_keys(tmp_path):
    """A bare dict gets the checks of the same tensors inside {'state_dict': ...}: format, merging, axis order."""
    src = toy(seed=12)
    official = official_ssl(src)["state_dict"]
    for obj, fmt in ((official, "monai_ssl"), (src.state_dict(), "monai_finetuned")):
        bare = load_checkpoint(save(obj, tmp_path, "bare.pth")).metadata
        boxed = load_checkpoint(save({"state_dict": obj}, tmp_path, "boxed.pth")).metadata
        for md in (bare, boxed):
            assert md["format"] == fmt and md["axis_order"] == "xyz" and md["merging"] == "legacy", md
            assert md["merging_assumed"] and md["axis_order_assumed"] and md["channel_names"] is None
    # the merging check runs for bare dicts too
    with pytest.raises(WeightsMismatchError, match="Patch-merging mismatch"):
        transfer_weights(toy(merging="fixed"), load_checkpoint(save(official, tmp_path, "bare.pth")),
                         source_channels=BRATS, verbose=False)
    # no Swin encoder at all: raw
    assert load_checkpoint(save({"w": torch.zeros(2)}, tmp_path, "raw.pth")).metadata["format"] == "raw"
    # a bare dict of our own zyx network needs its conventions stated: the file alone cannot tell
    model = toy(seed=13)
    transfer_weights(model, load_checkpoint(save(src.state_dict(), tmp_path)), source_channels=BRATS,
                     verbose=False)
    x = x_in()
    assert torch.equal(run(model, x), run(src, x))


def test_unnamed_checkpoint_channels_refused(tmp_path):
    """Files without channel names are not mapped by position: the error lists the dataset's channels and the
    official orders; naming the channels (BSF_PRETRAINED_CHANNELS) maps them by name."""
    src = toy(seed=14)
    ck = load_checkpoint(save(official_ssl(src), tmp_path))
    nnunet_order = ["T1", "T1ce", "T2", "FLAIR"]  # nnU-Net's own BraTS conversion
    with pytest.raises(ChannelMappingError) as e:
        transfer_weights(toy(seed=15), ck, target_channels=nnunet_order, verbose=False)
    msg = str(e.value)
    assert "[T1, T1ce, T2, FLAIR]" in msg and "BSF_PRETRAINED_CHANNELS" in msg and "--pretrained-channels" in msg
    assert "T1,FLAIR" in msg and "FLAIR,T1ce,T1,T2" in msg and "ATLAS" in msg
    model = toy(seed=15)
    rep = transfer_weights(model, ck, source_channels=BRATS, target_channels=nnunet_order, verbose=False)
    assert rep.channel_mapping == [(0, 2, "same"), (1, 1, "same"), (2, 3, "same"), (3, 0, "same")]
    assert torch.equal(model.state_dict()[PE][:, 3], src.state_dict()[PE][:, 0])  # FLAIR filters on FLAIR
    # a single pretrained channel needs no names (every mapping copies its one filter)
    one = load_checkpoint(save(official_ssl(toy(cin=1, seed=16)), tmp_path, "one.pth"))
    rep = transfer_weights(toy(cin=2, seed=17), one, target_channels=["T1", "FLAIR"], verbose=False)
    assert rep.channel_mapping == [(0, 0, "single"), (1, 0, "single")]


@pytest.mark.parametrize("prefix", ["module.", "_orig_mod.", "module._orig_mod.", "_orig_mod.module."])
def test_prefixes_stripped(tmp_path, prefix):
    sd = toy(seed=14).state_dict()
    ck = load_checkpoint(save({"state_dict": {prefix + k: v for k, v in sd.items()}}, tmp_path))
    assert set(ck.state_dict) == set(sd)
    assert ck.metadata["format"] == "monai_finetuned"
    assert sorted(ck.metadata["prefixes_stripped"]) == sorted({p + "." for p in prefix.strip(".").split(".")})


def test_inner_orig_mod_and_non_tensors():
    sd = {"swinViT._orig_mod.patch_embed.proj.weight": torch.zeros(12, 4, 2, 2, 2), "_metadata": "x",
          "step": 3}
    out, info = normalise_state_dict(sd)
    assert list(out) == [PE] and info["prefixes_stripped"] == ["_orig_mod."]


# ------------------------------------------------------------------------------------------------ safety
def test_unsafe_pickle_refused_then_allowed(tmp_path):
    path = save({"state_dict": toy().state_dict(), "extra": Unpicklable()}, tmp_path)
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(path)
    msg = str(e.value)
    assert path in msg and "--allow-unsafe-pickle" in msg and "BSF_ALLOW_UNSAFE_PICKLE=1" in msg
    assert "Unpicklable" in msg
    assert e.value.__cause__ is None and e.value.__suppress_context__
    ck = load_checkpoint(path, allow_unsafe_pickle=True)
    assert ck.metadata["format"] == "monai_finetuned"


def _corrupt_files(tmp_path):
    good = save({"state_dict": toy().state_dict()}, tmp_path, "good.pth")
    data = open(good, "rb").read()
    files = {"half.pth": data[: len(data) // 2], "tail_cut.pth": data[:-200], "random.pth": os.urandom(4096),
             "html.pth": b"<html>403 Forbidden</html>", "empty.pth": b""}
    legacy = str(tmp_path / "legacy.pth")
    torch.save({"a": torch.randn(1000)}, legacy, _use_new_zipfile_serialization=False)
    files["legacy_half.pth"] = open(legacy, "rb").read()[:3000]
    for name, b in files.items():
        (tmp_path / name).write_bytes(b)
    return [str(tmp_path / n) for n in files]


def test_corrupt_files(tmp_path):
    for path in _corrupt_files(tmp_path):
        with pytest.raises(CheckpointError) as e:
            load_checkpoint(path)
        msg = str(e.value)
        assert path in msg and "corrupt or incomplete" in msg and "previous checkpoint" in msg, msg
        assert "Re-download" in msg and e.value.__cause__ is None


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.pth")
    folder = tmp_path / "fold_0"
    folder.mkdir()
    torch.save({}, folder / "checkpoint_final.pth")
    with pytest.raises(CheckpointError, match="directory.*checkpoint_final.pth"):
        load_checkpoint(folder)


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="no state dict"):
        load_checkpoint(save({"epoch": 3, "notes": "hello"}, tmp_path))


# ------------------------------------------------------------------------------------------------ variants
def _synthetic_encoder(feature_size, depths, num_heads, cin=4):
    sd = {PE: torch.zeros(feature_size, cin, 2, 2, 2)}
    for i, (d, h) in enumerate(zip(depths, num_heads), start=1):
        for b in range(d):
            sd[f"swinViT.layers{i}.0.blocks.{b}.attn.relative_position_bias_table"] = torch.zeros(13 ** 3, h)
    return sd


def test_guess_variant_presets():
    for name, v in load_preset("variants.json").items():
        got, desc = guess_variant(_synthetic_encoder(v["feature_size"], v["depths"], v["num_heads"]))
        assert got == name and f"'{name}'" in desc
    got, desc = guess_variant(_synthetic_encoder(24, (2, 2, 2, 2), (3, 6, 12, 24)))
    assert got is None and "no preset" in desc and "feature size 24" in desc
    # a real network of the paper's Small variant
    assert guess_variant(BSFSwinUNETR(4, 3, feature_size=48, depths=(2, 2, 6, 2)).state_dict())[0] == "small"


def test_variant_mismatch_names_variant_and_trainer(tmp_path):
    small = BSFSwinUNETR(4, 3, feature_size=48, depths=(2, 2, 6, 2))
    ck = load_checkpoint(save(official_ssl(small), tmp_path))
    tiny = BSFSwinUNETR(4, 3, feature_size=48, depths=(2, 2, 2, 2))
    with pytest.raises(WeightsMismatchError) as e:
        transfer_weights(tiny, ck, verbose=False)
    msg = str(e.value)
    assert "variant 'small'" in msg and "variant 'tiny'" in msg and "-tr BSFTrainer " in msg
    assert "depths" in msg


def test_feature_size_mismatch(tmp_path):
    ck = load_checkpoint(save(toy().state_dict(), tmp_path))
    with pytest.raises(WeightsMismatchError, match="(?s)variant 'toy'.*BSFTrainer_Toy"):
        transfer_weights(BSFSwinUNETR(4, 3, feature_size=24, depths=(1, 1, 1, 1)), ck, verbose=False)


def test_encoder_would_load_nothing(tmp_path):
    cnn = {"encoder.stages.0.0.convs.0.conv.weight": torch.zeros(32, 4, 3, 3, 3),
           "decoder.seg_layers.0.weight": torch.zeros(3, 32, 1, 1, 1)}
    path = save({"network_weights": cnn, "init_args": {}, "trainer_name": "nnUNetTrainer"}, tmp_path)
    with pytest.raises(WeightsMismatchError) as e:
        transfer_weights(toy(), load_checkpoint(path), verbose=False)
    msg = str(e.value)
    assert "would load nothing" in msg and "encoder.stages.0.0.convs.0.conv.weight" in msg and "nnUNetTrainer" in msg


# ------------------------------------------------------------------------------------------------ merging
def test_merging_mismatch(tmp_path):
    ck = load_checkpoint(save(bsf_pretrain(toy(cin=2, merging="fixed"), merging="fixed"), tmp_path))
    model = toy(cin=2)
    with pytest.raises(WeightsMismatchError) as e:
        transfer_weights(model, ck, target_channels=["T1", "FLAIR"], verbose=False)
    msg = str(e.value)
    assert "merging='fixed'" in msg and "merging='legacy'" in msg and "MONAI < 1.5" in msg
    assert "allow_merging_mismatch=True" in msg
    rep = transfer_weights(model, ck, target_channels=["T1", "FLAIR"], verbose=False, allow_merging_mismatch=True)
    assert any("mismatch" in w for w in rep.warnings)


def test_official_files_assumed_legacy(tmp_path):
    ck = load_checkpoint(save(official_ssl(toy()), tmp_path))
    fixed = toy(merging="fixed")
    with pytest.raises(WeightsMismatchError, match="assumed"):
        transfer_weights(fixed, ck, source_channels=BRATS, verbose=False)
    rep = transfer_weights(fixed, ck, source_channels=BRATS, verbose=False, checkpoint_merging="fixed")
    assert rep.encoder_loaded > 0


# ------------------------------------------------------------------------------------------------ transfer details
def test_output_head_and_encoder_only(tmp_path):
    src = toy(ncls=3, seed=15)
    ck = load_checkpoint(save({"state_dict": src.state_dict()}, tmp_path))
    model = toy(ncls=5, seed=16)
    rep = transfer_weights(model, ck, source_channels=BRATS, verbose=False)
    assert "3 outputs" in dict(rep.skipped)["out.conv.conv.weight"]
    assert torch.equal(model.state_dict()["decoder1.conv_block.conv1.conv.weight"],
                       src.state_dict()["decoder1.conv_block.conv1.conv.weight"])
    model2 = toy(ncls=3, seed=16)
    dec = model2.state_dict()["decoder1.conv_block.conv1.conv.weight"].clone()
    rep = transfer_weights(model2, ck, source_channels=BRATS, verbose=False, encoder_only=True)
    assert torch.equal(model2.state_dict()["decoder1.conv_block.conv1.conv.weight"], dec)
    assert all(n.startswith("swinViT.") for n in rep.names("loaded"))
    assert "encoder_only" in dict(rep.skipped)["decoder1.conv_block.conv1.conv.weight"]


def test_channel_errors_through_transfer(tmp_path):
    ck = load_checkpoint(save(bsf_pretrain(toy(cin=2)), tmp_path))
    with pytest.raises(ChannelMappingError, match="--pretrained-channels"):
        transfer_weights(toy(cin=2), ck, target_channels=["CT", "PET"], verbose=False)
    # explicit source names override the metadata
    rep = transfer_weights(toy(cin=2), ck, source_channels=["CT", "PET"], target_channels=["PET", "CT"],
                           verbose=False)
    assert rep.channel_mapping == [(0, 1, "same"), (1, 0, "same")]
    # unknown names and different counts: ask for names
    ssl = load_checkpoint(save(official_ssl(toy(cin=4)), tmp_path, "ssl.pth"))
    with pytest.raises(ChannelMappingError, match="have no names"):
        transfer_weights(toy(cin=2), ssl, target_channels=["T1", "FLAIR"], verbose=False)
    rep = transfer_weights(toy(cin=2), ssl, source_channels=parse_channel_list("FLAIR,T1ce,T1,T2"),
                           target_channels=["T1", "FLAIR"], verbose=False)
    assert rep.channel_mapping == [(0, 2, "same"), (1, 0, "same")]


class _SSLStandIn(nn.Module):
    """The key layout of bsf_nnunet.ssl.model.BSFSSLModel: swinViT.* plus SSL heads."""

    def __init__(self):
        super().__init__()
        self.swinViT = toy(seed=20).swinViT
        self.rotation_head = nn.Linear(192, 4)
        self.contrastive_head = nn.Linear(192, 512)


def test_transfer_into_ssl_model(tmp_path):
    src = toy(seed=21)
    ck = load_checkpoint(save({"state_dict": src.state_dict()}, tmp_path))
    target = _SSLStandIn()
    rep = transfer_weights(target, ck, source_channels=BRATS, verbose=False)
    assert "segmentation decoder" in dict(rep.skipped)["decoder1.conv_block.conv1.conv.weight"]
    assert set(rep.names("missing")) == {"rotation_head.weight", "rotation_head.bias", "contrastive_head.weight",
                                         "contrastive_head.bias"}
    assert torch.equal(target.state_dict()[PE], src.state_dict()[PE])
    text = rep.summary()
    assert "missing 4 tensors (rotation_head.*, contrastive_head.*)" in text


def test_imported_model_checkpoint(tmp_path):
    """bsf-nnunet's import writes an nnU-Net checkpoint whose bsf_metadata (format 'imported') wins."""
    src = toy(seed=22, axis_order="xyz")
    obj = nnunet_ckpt(src, channel_names=("FLAIR", "T1ce", "T1", "T2"), arch_extra={"axis_order": "xyz"})
    for k in ("logging", "_best_ema", "optimizer_state", "grad_scaler_state"):
        obj.pop(k)
    obj["bsf_metadata"] = {"format": "imported", "source": "/x/model.pt", "variant": "toy",
                           "channel_names": ["FLAIR", "T1ce", "T1", "T2"], "merging": "legacy", "axis_order": "xyz"}
    ck = load_checkpoint(save(obj, tmp_path))
    md = ck.metadata
    assert md["format"] == "bsf_nnunet" and md["declared_format"] == "imported" and md["axis_order"] == "xyz"
    assert md["trainer_name"] == "BSFTrainer_Toy" and md["source"] == "/x/model.pt"


SSL_TOY = dict(feature_size=12, depths=(1, 1, 1, 1), num_heads=(3, 6, 12, 24))


@pytest.mark.parametrize("official", [False, True])
@pytest.mark.parametrize("src_names,tgt_names", [
    (["T1", "FLAIR"], ["FLAIR", "T1ce", "T1", "T2"]),  # UK Biobank stage 1 -> BraTS stage 2
    (["T1", "FLAIR"], ["T1"]),  # -> ATLAS
    (BRATS, ["T1", "T1ce", "T2", "FLAIR"]),  # BraTS -> nnU-Net's BraTS order
])
def test_ssl_checkpoint_across_channel_counts(tmp_path, src_names, tgt_names, official):
    """Stage 1 -> stage 2 with another channel set: the input filters and the reconstruction head's outputs (one
    per input channel) are matched by name; every tensor of the SSL model is loaded or adapted."""
    from bsf_nnunet.ssl import BSFSSLModel

    torch.manual_seed(30)
    src = BSFSSLModel(len(src_names), **SSL_TOY)
    sd = src.state_dict()
    if official:
        obj, given = {"state_dict": {"module." + k: v for k, v in sd.items()}}, src_names
    else:
        obj, given = {"network_weights": sd, "bsf_metadata": {"format": "bsf_pretrain", "stage": 1,
                                                               "channel_names": src_names, "axis_order": "zyx"}}, None
    ck = load_checkpoint(save(obj, tmp_path))
    torch.manual_seed(31)
    tgt = BSFSSLModel(len(tgt_names), **SSL_TOY)
    rep = transfer_weights(tgt, ck, source_channels=given, target_channels=tgt_names, verbose=False)
    assert not rep.missing and not rep.warnings
    new = tgt.state_dict()
    canon = [normalise_channel_name(n) for n in src_names]
    for t, name in enumerate(tgt_names):
        s = canon.index(normalise_channel_name(name)) if normalise_channel_name(name) in canon else None
        for key, dim in ((PE, 1), ("conv.20.weight", 0), ("conv.20.bias", 0)):
            want = sd[key].mean(dim) if s is None else sd[key].select(dim, s)
            assert torch.allclose(new[key].select(dim, t), want), (key, name)
    if src_names != tgt_names:
        assert {"conv.20.weight", "conv.20.bias", PE} <= set(rep.names("adapted"))


def test_official_handover_scope_loads_the_swin_layers_only(tmp_path):
    """scope="official" (bsf_handover = "official", issue #31.1): exactly the Swin layers 1-4 load, as the official
    scripts' strict=False loading; the patch embedding, decoder and output head stay as initialised, and no channel
    names are needed even when the channel counts differ (2 -> 4)."""
    src = toy(cin=2, seed=5)
    ck = load_checkpoint(save(official_ssl(src), tmp_path))
    model = toy(cin=4, seed=6)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rep = transfer_weights(model, ck, verbose=False, scope="official")
    after = model.state_dict()
    layers = [k for k in after if k.startswith(tuple(f"swinViT.layers{i}." for i in range(1, 5)))
              and "relative_position_index" not in k]
    assert layers and {n for n, _ in rep.loaded} == set(layers)
    assert all(torch.equal(after[k], src.state_dict()[k]) for k in layers)
    assert torch.equal(after[PE], before[PE]) and torch.equal(after[ENC1[0]], before[ENC1[0]])
    assert "official hand-over" in dict(rep.skipped)[PE] and not rep.adapted and not rep.channel_mapping
    by_name = toy(cin=4, seed=6)
    rep2 = transfer_weights(by_name, ck, source_channels=["T1", "FLAIR"], target_channels=BRATS, verbose=False)
    assert PE in {n for n, _ in rep2.adapted}                             # the default maps the input filters
    with pytest.raises(ValueError, match="scope must be one of"):
        transfer_weights(toy(), ck, verbose=False, scope="some")


def test_one_restore_takes_merging_and_axis_from_the_checkpoint_and_refuses_other_sizes():
    """weights/restore.py: the trainers (--c, --val), export and import-model rebuild a trained network through it."""
    from bsf_nnunet.errors import ConfigurationError
    from bsf_nnunet.weights.restore import arch_conflicts, restore_network, trained_architecture

    planned = dict(TOY, num_heads=[3, 6, 12, 24], merging="fixed", axis_order="zyx")
    saved = dict(TOY, num_heads=(3, 6, 12, 24), merging="legacy", axis_order="xyz")
    arch = trained_architecture(planned, saved, "ckpt.pth", "fix it")
    assert arch["merging"] == "legacy" and arch["axis_order"] == "xyz"  # tuples and lists compare alike
    assert trained_architecture({k: v for k, v in planned.items() if k not in ("merging", "axis_order")}, {},
                                "c", "f")["merging"] == "legacy"  # a checkpoint without a record: MONAI 0.9's
    assert arch_conflicts(saved, planned, ("merging",)) == ["merging=legacy (planned fixed)"]
    with pytest.raises(ConfigurationError, match=r"ckpt.pth was trained with feature_size=24 \(planned 12\): fix it"):
        trained_architecture(planned, dict(saved, feature_size=24), "ckpt.pth", "fix it")

    source = BSFSwinUNETR(2, 3, merging="legacy", axis_order="xyz", **TOY)
    sd = dict(source.state_dict(), **{"rotation_head.weight": torch.zeros(4, 8)})
    net = restore_network(arch, sd, "ckpt.pth", "fix it", drop_unknown=True)
    assert net.axis_order == "xyz" and not net.training
    assert all(torch.equal(v, source.state_dict()[k]) for k, v in net.state_dict().items())
    with pytest.raises(ConfigurationError, match="ckpt.pth does not fit the network .* fix it"):
        restore_network(arch, sd, "ckpt.pth", "fix it")  # strict: the SSL head is not the network's
