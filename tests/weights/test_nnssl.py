"""nnssl checkpoints (issue #32, points 1b and 2): read by load_checkpoint / transfer_weights, written by
write_nnssl_folder. Every file is built here from toy networks; nothing is downloaded."""
import json
import os

import pytest
import torch

from bsf_nnunet.network import BSFSwinUNETR
from bsf_nnunet.weights import ChannelMappingError, CheckpointError, load_checkpoint, transfer_weights
from bsf_nnunet.weights.nnssl import (
    CHECKPOINT_FILE,
    CONFIG_FILE,
    PLAN_FILE,
    NnsslArchitectureError,
    adaptation_plan,
    is_nnssl_checkpoint,
    write_nnssl_folder,
)

TOY = dict(feature_size=12, depths=(1, 1, 1, 1), num_heads=(3, 6, 12, 24))
CHANNELS = ["T1", "T2"]

# Field names of nnssl's serialised dataclasses, from MIC-DKFZ/nnssl commit 7044864404315536e92e670ef2f0ca24f11e6175:
# AdaptationPlan and ArchitecturePlans.serialize() in src/nnssl/adaptation_planning/adaptation_plan.py, Plan and
# ConfigurationPlan in src/nnssl/experiment_planning/experiment_planners/plan.py. The checkpoint keys are those of
# AbstractBaseTrainer.save_checkpoint (src/nnssl/training/nnsslTrainer/AbstractTrainer.py) that nnssl's fine-tuning
# reads (TaWald/nnUNet, branch nnssl_finetuning_inclusion, nnunetv2/experiment_planning/like_nnssl.py).
NNSSL_ADAPTATION_PLAN = {"architecture_plans", "pretrain_plan", "pretrain_num_input_channels",
                         "recommended_downstream_patchsize", "key_to_encoder", "key_to_stem", "keys_to_in_proj",
                         "key_to_lpe"}
NNSSL_ARCHITECTURE_PLANS = {"arch_class_name", "arch_kwargs", "arch_kwargs_requiring_import"}
NNSSL_PLAN = {"dataset_name", "plans_name", "original_median_spacing_after_transp", "image_reader_writer",
              "transpose_forward", "transpose_backward", "configurations", "experiment_planner_used"}
NNSSL_CONFIGURATION = {"data_identifier", "preprocessor_name", "spacing_style", "normalization_schemes",
                       "use_mask_for_norm", "resampling_fn_data", "resampling_fn_data_kwargs", "resampling_fn_mask",
                       "resampling_fn_mask_kwargs", "spacing", "patch_size"}


def _net(cin=2, ncls=3, seed=0, **kw):
    torch.manual_seed(seed)
    return BSFSwinUNETR(cin, ncls, **{**TOY, **kw}).eval()


def _arch_kwargs():
    return {**TOY, "merging": "legacy", "axis_order": "zyx"}


def _plan(**kw):
    return adaptation_plan(_arch_kwargs(), (64, 64, 64), (1.0, 1.0, 1.0), CHANNELS, **kw)


def _nnssl_trainer_checkpoint(state_dict, plan, trainer="SwinPretrainTrainer"):
    """A checkpoint laid out as nnssl's AbstractBaseTrainer.save_checkpoint writes it."""
    return {"network_weights": state_dict, "optimizer_state": {"state": {}, "param_groups": []},
            "grad_scaler_state": None, "logging": {"train_losses": [0.5]}, "_best_ema": None, "current_epoch": 7,
            "init_args": {"configuration_name": "onemmiso", "fold": 0}, "trainer_name": trainer,
            "nnssl_adaptation_plan": plan}


def test_nnssl_swin_checkpoint_reads_and_transfers(tmp_path):
    """(a) nnssl layout, weights under a wrapper prefix ('encoder.'): BSF names, nnssl metadata, encoder loads
    bitwise."""
    src = _net(seed=1)
    plan = _plan()
    plan["key_to_encoder"], plan["key_to_stem"] = "encoder.swinViT", "encoder.swinViT.patch_embed"
    ck = _nnssl_trainer_checkpoint({f"encoder.{k}": v for k, v in src.state_dict().items()}, plan)
    assert is_nnssl_checkpoint(ck)
    path = tmp_path / "checkpoint_final.pth"
    torch.save(ck, path)

    loaded = load_checkpoint(path)
    meta = loaded.metadata
    assert meta["format"] == "nnssl"  # not bsf_nnunet, although it has network_weights and init_args
    assert set(loaded.state_dict) == set(src.state_dict())
    assert meta["channel_names"] == CHANNELS and meta["num_input_channels"] == 2
    assert meta["patch_size"] == [64, 64, 64] and meta["spacing"] == [1.0, 1.0, 1.0]
    assert meta["merging"] == "legacy" and meta["axis_order"] == "zyx" and meta["trainer_name"] == ck["trainer_name"]
    assert meta["arch_kwargs"]["feature_size"] == 12 and meta["configuration"] == "onemmiso"

    tgt = _net(seed=2)
    report = transfer_weights(tgt, path, verbose=False)
    assert report.source_format == "nnssl"
    assert report.encoder_loaded == sum(1 for k in tgt.state_dict() if k.startswith("swinViT.")
                                        and not k.endswith("relative_position_index"))
    assert "swinViT.patch_embed.proj.weight" in report.names("loaded")
    for k, v in src.state_dict().items():
        if k.startswith("swinViT."):
            assert torch.equal(tgt.state_dict()[k], v), k


def test_nnssl_checkpoint_without_channel_names_or_merging(tmp_path):
    """A plan without our extras (as nnssl would write it): channel names unknown, merging/axis order assumed."""
    src = _net(seed=3)
    plan = _plan()
    del plan["bsf"]
    plan["architecture_plans"]["arch_kwargs"] = dict(TOY)
    plan["architecture_plans"]["arch_class_name"] = "monai.networks.nets.SwinUNETR"
    path = tmp_path / "ck.pth"
    torch.save(_nnssl_trainer_checkpoint(src.state_dict(), plan), path)
    meta = load_checkpoint(path).metadata
    assert meta["channel_names"] is None and meta["merging_assumed"] and meta["axis_order_assumed"]
    tgt = _net(seed=4)
    with pytest.raises(ChannelMappingError, match="have no names"):
        transfer_weights(tgt, path, verbose=False)  # two unnamed channels: the loader asks for their names
    transfer_weights(tgt, path, source_channels=CHANNELS, target_channels=CHANNELS, verbose=False)
    assert torch.equal(tgt.state_dict()["swinViT.layers1.0.blocks.0.attn.qkv.weight"],
                       src.state_dict()["swinViT.layers1.0.blocks.0.attn.qkv.weight"])


def _resenc_plan():
    plan = _plan()
    plan.pop("bsf")
    plan["architecture_plans"] = {"arch_class_name": "ResEncL", "arch_kwargs": None,
                                  "arch_kwargs_requiring_import": None}
    plan.update(key_to_encoder="encoder.stages", key_to_stem="encoder.stem",
                keys_to_in_proj=["encoder.stem.convs.0.conv", "encoder.stem.convs.0.all_modules.0"])
    return plan


def _primus_plan():
    plan = _resenc_plan()
    plan["architecture_plans"]["arch_class_name"] = "PrimusM"
    plan.update(key_to_encoder="eva", key_to_stem="down_projection", keys_to_in_proj=["down_projection.proj"],
                key_to_lpe="eva.pos_embed")
    return plan


@pytest.mark.parametrize("plan_fn, name, trainer, weights", [
    (_resenc_plan, "ResEncL", "SwinUNETRTrainer", {"encoder.stem.convs.0.conv.weight": torch.zeros(32, 1, 3, 3, 3)}),
    (_primus_plan, "PrimusM", "BaseEvaMAETrainer", {"eva.pos_embed": torch.zeros(1, 512, 864),
                                                    "down_projection.proj.weight": torch.zeros(864, 1, 8, 8, 8)}),
])
def test_other_nnssl_architectures_are_refused(tmp_path, plan_fn, name, trainer, weights):
    """(b) ResEnc-L / Primus: a clear refusal naming the file, the architecture and what to do."""
    path = tmp_path / f"{name}_checkpoint_final.pth"
    torch.save(_nnssl_trainer_checkpoint(weights, plan_fn(), trainer), path)
    with pytest.raises(NnsslArchitectureError) as e:
        load_checkpoint(path)
    msg = str(e.value)
    assert isinstance(e.value, CheckpointError)
    assert str(path) in msg and repr(name) in msg and "not a Swin-UNETR" in msg
    assert "nnUNetv2_train_pretrained" in msg and "Swin-UNETR checkpoint" in msg
    assert ("ResEnc-L CNN" in msg) == (trainer == "SwinUNETRTrainer")
    with pytest.raises(NnsslArchitectureError):
        transfer_weights(_net(), path, verbose=False)


def test_swin_plan_without_swin_tensors_is_refused(tmp_path):
    path = tmp_path / "mismatch.pth"
    torch.save(_nnssl_trainer_checkpoint({"encoder.stem.conv.weight": torch.zeros(4, 2, 3, 3, 3)}, _plan()), path)
    with pytest.raises(CheckpointError, match="no tensor holds a Swin encoder"):
        load_checkpoint(path)


def test_write_nnssl_folder_round_trip(tmp_path):
    """(c) The written folder: weights_only-loadable checkpoint, same tensors and metadata through load_checkpoint."""
    net = _net(seed=5)
    sd = net.state_dict()
    plan = _plan(extras={"variant": "toy"})
    paths = write_nnssl_folder(str(tmp_path / "out"), sd, plan, citations=["BrainSegFounder (Cox et al.)"])
    assert [os.path.basename(p) for p in paths] == [CHECKPOINT_FILE, PLAN_FILE, CONFIG_FILE]
    assert sorted(os.listdir(tmp_path / "out")) == sorted([CHECKPOINT_FILE, PLAN_FILE, CONFIG_FILE])

    raw = torch.load(paths[0], map_location="cpu", weights_only=True)
    assert set(raw) == {"network_weights", "nnssl_adaptation_plan", "citations"}
    with open(paths[1]) as f:
        assert json.load(f) == raw["nnssl_adaptation_plan"] == json.loads(json.dumps(plan))
    with open(paths[2]) as f:
        config = json.load(f)
    assert config["architecture"] == plan["architecture_plans"]["arch_class_name"]
    assert config["checkpoint"] == CHECKPOINT_FILE and config["channel_names"] == CHANNELS

    loaded = load_checkpoint(paths[0])
    assert set(loaded.state_dict) == set(sd)
    assert all(torch.equal(loaded.state_dict[k], v) for k, v in sd.items())
    meta = loaded.metadata
    assert meta["format"] == "nnssl" and meta["variant"] == "toy"
    assert meta["channel_names"] == CHANNELS and meta["patch_size"] == [64, 64, 64]
    assert meta["spacing"] == [1.0, 1.0, 1.0] and meta["merging"] == "legacy" and meta["axis_order"] == "zyx"
    assert "merging_assumed" not in meta
    assert meta["arch_kwargs"] == json.loads(json.dumps(_arch_kwargs()))
    assert meta["network_class"] == "bsf_nnunet.network.swin_unetr.BSFSwinUNETR"

    tgt = _net(seed=6)
    report = transfer_weights(tgt, paths[0], verbose=False)
    assert not report.missing and not report.adapted
    assert all(torch.equal(tgt.state_dict()[k], v) for k, v in sd.items())


def test_written_plan_has_nnssl_field_names():
    """(d) The plan uses exactly nnssl's field names (plus our extras under 'bsf') and is plain JSON."""
    plan = _plan()
    assert set(plan) - {"bsf"} == NNSSL_ADAPTATION_PLAN
    assert set(plan["architecture_plans"]) == NNSSL_ARCHITECTURE_PLANS
    assert set(plan["pretrain_plan"]) == NNSSL_PLAN
    (name, conf), = plan["pretrain_plan"]["configurations"].items()
    assert name == "onemmiso" and set(conf) == NNSSL_CONFIGURATION
    assert plan["key_to_encoder"] == "swinViT" and plan["key_to_stem"] == "swinViT.patch_embed"
    assert plan["keys_to_in_proj"] == ["swinViT.patch_embed.proj"] and plan["key_to_lpe"] is None
    assert plan["pretrain_num_input_channels"] == len(CHANNELS)
    assert plan["bsf"]["channel_names"] == CHANNELS
    assert json.loads(json.dumps(plan)) == plan
    median = adaptation_plan(_arch_kwargs(), (64, 64, 64), (1.0, 0.9, 0.9), CHANNELS)
    assert list(median["pretrain_plan"]["configurations"]) == ["median"]


def test_write_refuses_a_plan_without_nnssl_fields(tmp_path):
    with pytest.raises(ValueError, match="key_to_encoder"):
        write_nnssl_folder(str(tmp_path / "x"), _net().state_dict(), {"architecture_plans": {}})
    assert not (tmp_path / "x").exists()
