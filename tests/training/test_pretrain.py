"""Self-supervised pretraining through nnUNetv2_train: stage 1, stage 2 (fold split respected), resume, chaining."""
import glob
import json
import os

import numpy as np
import torch

RES = "BSFPretrainTrainer_CI__nnUNetPlans__3d_fullres"
RES_FAST = "BSFPretrainTrainer_CIfast__nnUNetPlans__3d_fullres"  # stage 2: 1 epoch of 3 steps


def _prepare(env, prepared):
    dataset_id, full, _ = prepared("ssl2")  # Dataset993_SSL: 5 cases, T1 + FLAIR, 64 x 72 x 64
    assert dataset_id == "993"
    return os.path.join(env["nnUNet_results"], full)


def _ssl_loss_on_fixed_batch(state_dict, pre_folder):
    """SSL loss of a toy model with the given weights on a fixed batch of crops from the preprocessed data."""
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class

    from bsf_nnunet.planning.presets import variant_arch_kwargs
    from bsf_nnunet.ssl.losses import SSLLoss
    from bsf_nnunet.ssl.model import BSFSSLModel
    from bsf_nnunet.ssl.views import make_views
    from bsf_nnunet.training.ssl_data import SSLCropLoader

    folder = os.path.join(pre_folder, "nnUNetPlans_3d_fullres")
    ds_cls = infer_dataset_class(folder)
    ids = ds_cls.get_identifiers(folder)
    loader = SSLCropLoader(ds_cls(folder, ids), ids, [64, 64, 64], volumes_per_batch=4, crops_per_volume=1, seed=7)
    crops = torch.from_numpy(next(loader)["data"])
    torch.manual_seed(12345)  # BSFPretrainTrainer's initialisation (bsf_seed)
    model = BSFSSLModel(2, axis_order="xyz", **variant_arch_kwargs("toy"))   # stage 1's default order
    if state_dict is not None:
        model.load_state_dict(state_dict)
    model.eval()
    g = torch.Generator().manual_seed(3)
    v = make_views(crops, g)
    with torch.no_grad():
        rot, con, rec = model(torch.cat([v["view1"], v["view2"]]))
        total, _ = SSLLoss()(rot, torch.cat([v["rot1"], v["rot2"]]), con[:4], con[4:], rec,
                             torch.cat([v["target1"], v["target2"]]))
    return float(total)


def _check_nnssl_export(ck, s1, env, run, tmp_path):
    """Issue #32: a pretraining checkpoint carries nnssl's adaptation plan (read as ours all the same), and export
    --to nnssl writes nnssl's folder, which the loader reads back as an nnssl file with the same tensors."""
    from bsf_nnunet.planning.swin_config import NETWORK_CLASS_NAME
    from bsf_nnunet.weights import load_checkpoint

    plan = ck["nnssl_adaptation_plan"]
    assert plan["architecture_plans"]["arch_class_name"] == NETWORK_CLASS_NAME
    assert plan["pretrain_num_input_channels"] == 2 and plan["key_to_encoder"] == "swinViT"
    assert load_checkpoint(s1).metadata["format"] == "bsf_pretrain"
    out = tmp_path / "nnssl"
    run(["bsf-nnunet", "export", "-d", "993", "-tr", "BSFPretrainTrainer_CI", "-c", "3d_fullres", "-f", "all",
         "--to", "nnssl", "-o", str(out)], env)
    assert sorted(os.listdir(out)) == ["adaptation_plan.json", "checkpoint_final.pth", "config.json"]
    back = load_checkpoint(out / "checkpoint_final.pth")
    meta = back.metadata
    assert meta["format"] == "nnssl" and meta["channel_names"] == ["T1", "FLAIR"] and meta["axis_order"] == "xyz"
    assert meta["patch_size"] == [64, 64, 64] and json.load(open(out / "adaptation_plan.json"))["bsf"]["source"][
        "trainer"] == "BSFPretrainTrainer_CI"
    sd = ck["network_weights"]
    assert back.state_dict.keys() == sd.keys() and all(torch.equal(back.state_dict[k], sd[k]) for k in sd)


def test_stage1_resume_stage2_and_chaining(nnunet_env, prepared, run, tmp_path, resumed_like_straight):
    env = nnunet_env
    res = _prepare(env, prepared)
    pre = os.path.join(env["nnUNet_preprocessed"], "Dataset993_SSL")

    # stage 1: all cases
    out = run(["nnUNetv2_train", "993", "3d_fullres", "all", "-tr", "BSFPretrainTrainer_CI", "-device", "cpu"], env)
    s1 = os.path.join(res, RES, "fold_all", "checkpoint_final.pth")
    ck = torch.load(s1, map_location="cpu", weights_only=True)  # no arbitrary pickles needed
    meta = ck["bsf_metadata"]
    assert meta["stage"] == 1 and meta["parent"] is None
    assert meta["channel_names"] == ["T1", "FLAIR"] and meta["merging"] == "legacy"
    assert meta["arch_kwargs"]["feature_size"] == 12 and meta["patch_size"] == [64, 64, 64]
    # a stage 1 without weights computes in the official (x, y, z) order, and says so (issue #31)
    assert meta["axis_order"] == "xyz" and len(meta["spacing"]) == 3 and meta["normalization"]
    assert "stage 1 computes in the order of the official (x, y, z) crops" in out
    assert os.path.isfile(os.path.join(res, RES, "fold_all", "progress.png"))
    assert all(k in ck["logging"] for k in ("ssl_rot", "ssl_con", "ssl_rec", "val_losses"))
    for k in ("ssl_rot_acc", "ssl_con_top1", "val_ssl_rot_acc", "val_ssl_con_top1"):  # per epoch, train and val
        assert len(ck["logging"][k]) == 2 and all(0.0 <= a <= 1.0 for a in ck["logging"][k]), k
    assert meta["recipe"]["initial_lr"] == 3e-4 and not meta["recipe"]["contrastive_gather"]  # stage 1
    # checkpoint_best.pth: the epoch with the lowest validation reconstruction loss (the official model_bestValRMSE)
    best = torch.load(os.path.join(res, RES, "fold_all", "checkpoint_best.pth"), weights_only=True)
    assert best["current_epoch"] == int(np.argmin(ck["logging"]["val_ssl_rec"])) + 1
    _check_nnssl_export(ck, s1, env, run, tmp_path)

    # training lowered the SSL loss on a fixed batch (same crops and views) compared with the initial weights
    assert _ssl_loss_on_fixed_batch(ck["network_weights"], pre) < _ssl_loss_on_fixed_batch(None, pre)

    # resume: 1 epoch, stop (as a time-limited cluster job would), --c to 2 epochs == 2 epochs straight
    # (same initial weights, data stream, views and optimiser state)
    os.rename(os.path.join(res, RES, "fold_all"), os.path.join(res, RES, "fold_all_straight"))
    out = run(["nnUNetv2_train", "993", "3d_fullres", "all", "-tr", "BSFPretrainTrainer_CI", "-device", "cpu"],
              dict(env, BSF_STOP_AFTER_EPOCH="0"))
    assert "BSF_STOP_AFTER_EPOCH=0 reached" in out
    assert not os.path.isfile(os.path.join(res, RES, "fold_all", "checkpoint_final.pth"))
    assert os.path.isfile(os.path.join(res, RES, "fold_all", "checkpoint_latest.pth"))
    at_stop = torch.load(os.path.join(res, RES, "fold_all", "checkpoint_latest.pth"), weights_only=True)
    run(["nnUNetv2_train", "993", "3d_fullres", "all", "-tr", "BSFPretrainTrainer_CI", "-device", "cpu", "--c"], env)
    resumed = torch.load(os.path.join(res, RES, "fold_all", "checkpoint_final.pth"), weights_only=True)
    assert resumed["current_epoch"] == ck["current_epoch"] == 2 and at_stop["current_epoch"] == 1
    resumed_like_straight(ck, resumed, at_stop)

    # stage 2 on fold 0 from stage 1: only fold 0's training cases are pretrained on
    out = run(["nnUNetv2_train", "993", "3d_fullres", "0", "-tr", "BSFPretrainTrainer_CIfast", "-device", "cpu",
               "-pretrained_weights", s1], env)
    assert "Initialised from" in out
    s2 = torch.load(os.path.join(res, RES_FAST, "fold_0", "checkpoint_final.pth"), weights_only=True)
    assert s2["bsf_metadata"]["stage"] == 2 and s2["bsf_metadata"]["parent"] == os.path.abspath(s1)
    split = json.load(open(os.path.join(pre, "splits_final.json")))[0]
    log = open(glob.glob(os.path.join(res, RES_FAST, "fold_0", "training_log_*.txt"))[0]).read()
    assert f"Pretraining on {len(split['train'])} cases, validating on {len(split['val'])} cases" in log

    # fine-tuning chains from BSFPretrainTrainer_CIfast fold 0 by itself
    out = run(["nnUNetv2_train", "993", "3d_fullres", "0", "-tr", "BSFTrainer_CI_chain", "-device", "cpu"], env)
    assert "stage chaining from BSFPretrainTrainer_CIfast fold 0" in out
    tlog = open(glob.glob(os.path.join(res, "BSFTrainer_CI_chain__nnUNetPlans__3d_fullres", "fold_0",
                                       "training_log_*.txt"))[0]).read()
    # from the checkpoint with the lowest validation reconstruction loss, as the official scripts (#31.3)
    assert f"Initialised from {os.path.join(res, RES_FAST, 'fold_0', 'checkpoint_best.pth')}" in tlog
    assert "New best validation reconstruction loss" in log



def test_ddp_two_gloo_ranks_stay_identical(nnunet_env, prepared, run, tmp_path):
    """torchrun, 2 CPU processes, gloo: each rank reads a disjoint shard, the logged (all-reduced) losses agree and
    the weights are identical on both ranks after the steps; rank 0 alone writes the checkpoint."""
    env = nnunet_env
    res = _prepare(env, prepared)
    dump = tmp_path / "ddp"
    dump.mkdir()
    env = dict(env, CI_DDP_DUMP=str(dump), nnUNet_n_proc_DA="0", OMP_NUM_THREADS="1")
    out = run(["torchrun", "--standalone", "--nproc_per_node", "2", "-m", "bsf_nnunet.pretrain", "993", "3d_fullres",
               "all", "-tr", "BSFPretrainTrainer_CIddp", "--backend", "gloo"], env)
    r0 = json.load(open(dump / "rank0.json"))
    r1 = json.load(open(dump / "rank1.json"))
    assert r0["world"] == r1["world"] == 2
    assert r0["digest"] == r1["digest"], out[-3000:]
    assert r0["train_losses"] == r1["train_losses"] and len(r0["train_losses"]) == 1
    assert r0["shard"] and r1["shard"] and not set(r0["shard"]) & set(r1["shard"])
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class

    folder = os.path.join(env["nnUNet_preprocessed"], "Dataset993_SSL", "nnUNetPlans_3d_fullres")
    assert sorted(r0["shard"] + r1["shard"]) == sorted(infer_dataset_class(folder).get_identifiers(folder))
    ck = torch.load(os.path.join(res, "BSFPretrainTrainer_CIddp__nnUNetPlans__3d_fullres", "fold_all",
                                 "checkpoint_final.pth"), map_location="cpu", weights_only=True)
    assert ck["current_epoch"] == 1
