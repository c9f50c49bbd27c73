"""-pretrained_weights with BSF trainers through nnUNetv2_train: official SSL checkpoint, channel mapping, axis
order recorded for nnUNetv2_predict, and the scratch baseline refusing weights."""
import glob
import json
import os

import torch

from bsf_nnunet.network import BSFSwinUNETR

TOY = dict(feature_size=12, depths=(1, 1, 1, 1), num_heads=(3, 6, 12, 24))


def test_official_ssl_weights_channel_mapping_axis_order_and_scratch(nnunet_env, prepared, run, tmp_path):
    env = nnunet_env
    dataset_id, full, folder = prepared("toy1")  # Dataset994_Toy: 1 channel (T1), test case case_006
    # an "official" BrainSegFounder SSL checkpoint (toy-sized): MONAI keys with module. prefix, 2 channels
    torch.manual_seed(0)
    src = BSFSwinUNETR(2, 3, **TOY)
    sd = {f"module.{k}": v for k, v in src.state_dict().items() if k.startswith("swinViT.")}
    sd["module.rotation_head.weight"] = torch.zeros(4, 192)
    sd["module.rotation_head.bias"] = torch.zeros(4)
    ckpt = tmp_path / "ssl_official.pt"
    torch.save({"state_dict": sd, "epoch": 10, "global_step": 1000, "optimizer": {}}, ckpt)

    # its channels named once, in the sidecar beside it (BSF_PRETRAINED_CHANNELS, for one run: test_fidelity.py)
    run(["bsf-nnunet", "weights", "describe", str(ckpt), "--channels", "FLAIR,T1"], env)
    run(["nnUNetv2_train", dataset_id, "3d_fullres", "0", "-tr", "BSFTrainer_CIfast", "-device", "cpu",
         "-pretrained_weights", str(ckpt)], env)
    res = os.path.join(env["nnUNet_results"], full, "BSFTrainer_CIfast__nnUNetPlans__3d_fullres")
    log = open(glob.glob(os.path.join(res, "fold_0", "training_log_*.txt"))[0]).read()
    assert "Initialised from" in log and "-pretrained_weights" in log
    assert f"from its sidecar {ckpt}.bsf.json" in log
    # the dataset's only channel (T1) took the checkpoint's T1 filters, not FLAIR's
    plans = json.load(open(os.path.join(res, "plans.json")))
    assert plans["configurations"]["3d_fullres"]["architecture"]["arch_kwargs"]["axis_order"] == "xyz"
    # prediction rebuilds the network with the recorded axis order
    run(["nnUNetv2_predict", "-i", os.path.join(folder, "imagesTs"), "-o", str(tmp_path / "pred"), "-d", dataset_id,
         "-c", "3d_fullres", "-tr", "BSFTrainer_CIfast", "-f", "0", "-device", "cpu", "--disable_tta",
         "-npp", "1", "-nps", "1"], env)
    assert os.path.isfile(tmp_path / "pred" / "case_006.nii.gz")

    # the scratch baseline never loads weights: a clear refusal before any training
    import subprocess

    p = subprocess.run(["nnUNetv2_train", dataset_id, "3d_fullres", "0", "-tr", "BSFTrainer_Toy_scratch", "-device",
                        "cpu", "-pretrained_weights", str(ckpt)], env=env, capture_output=True, text=True)
    assert p.returncode != 0
    assert "trains from scratch by definition" in p.stdout + p.stderr


def test_channel_mapping_copies_matched_filters():
    """Unit check of the mapping the trainer relies on: target T1 gets source T1's patch-embedding filters."""
    from bsf_nnunet.weights import checkpoint_from_object, transfer_weights

    torch.manual_seed(0)
    src = BSFSwinUNETR(2, 3, **TOY)
    dst = BSFSwinUNETR(1, 2, **TOY)
    ck = checkpoint_from_object({"state_dict": {f"module.{k}": v for k, v in src.state_dict().items()}})
    transfer_weights(dst, ck, source_channels=["FLAIR", "T1"], target_channels=["t1w"], verbose=False)
    w_src = src.state_dict()["swinViT.patch_embed.proj.weight"]
    assert torch.equal(dst.state_dict()["swinViT.patch_embed.proj.weight"][:, 0], w_src[:, 1])
