"""Fault tests through the real nnUNetv2_train: SIGKILL during a checkpoint write, resume equivalence after it,
a NaN loss that stops training with the last good checkpoint intact, and out-of-memory
messages."""
import os
import signal
import subprocess
import time

import pytest
import torch


def _load(path):
    # nnU-Net's own checkpoints hold plain python objects next to the tensors
    return torch.load(path, map_location="cpu", weights_only=False)


def _run_until_marker_then(signum, cmd, env, marker, timeout=600):
    """Start ``cmd``, wait until ``marker`` exists, send ``signum``, return (returncode, output)."""
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    t0 = time.time()
    while not os.path.exists(marker):
        if p.poll() is not None:
            raise AssertionError(f"{' '.join(cmd)} ended (rc {p.returncode}) before {marker} appeared:\n"
                                 f"{p.stdout.read()[-5000:]}")
        if time.time() - t0 > timeout:
            p.kill()
            raise AssertionError(f"{marker} did not appear within {timeout} s")
        time.sleep(0.2)
    os.kill(p.pid, signum)
    out, _ = p.communicate(timeout=300)
    return p.returncode, out


@pytest.fixture
def toy_dataset(nnunet_env, prepared):
    dataset_id, full, _ = prepared("toy1")
    assert dataset_id == "994"
    # augmentation in the training process: deterministic given the per-epoch seeds, and nothing orphaned by a kill
    # fp32 whatever the CPU: bf16 rounding would amplify the kernels' rounding noise in the resume comparison
    return dict(nnunet_env, nnUNet_n_proc_DA="0", BSF_CPU_BF16="0"), os.path.join(nnunet_env["nnUNet_results"], full)


def test_bsftrainer_kill_during_checkpoint_write_resumes_to_identical_weights(toy_dataset, run, tmp_path,
                                                                             resumed_like_straight):
    env, res = toy_dataset
    cmd = ["nnUNetv2_train", "994", "3d_fullres", "0", "-tr", "BSFTrainer_CIkill", "-device", "cpu"]
    fold = os.path.join(res, "BSFTrainer_CIkill__nnUNetPlans__3d_fullres", "fold_0")

    # reference: 3 epochs straight
    run(cmd, env)
    straight = _load(os.path.join(fold, "checkpoint_final.pth"))
    os.rename(fold, fold + "_straight")

    # saves: 1 = latest after epoch 0, 2 = best after epoch 0, 3 = latest after epoch 1 -> killed half-written
    marker = str(tmp_path / "in_save")
    rc, out = _run_until_marker_then(signal.SIGKILL, cmd, dict(env, CI_HANG_IN_SAVE="3", CI_HANG_MARKER=marker),
                                     marker)
    assert rc == -signal.SIGKILL
    half_written = open(marker).read()
    assert os.path.basename(half_written).startswith(".tmp_checkpoint_latest.pth")
    with pytest.raises(Exception):  # noqa: B017 (torch raises different types for files cut at different points)
        _load(half_written)  # the interrupted write is garbage ...
    latest = _load(os.path.join(fold, "checkpoint_latest.pth"))  # ... but the previous checkpoint is intact
    assert latest["current_epoch"] == 1
    assert not os.path.exists(os.path.join(fold, "checkpoint_final.pth"))

    run(cmd + ["--c"], env)
    resumed = _load(os.path.join(fold, "checkpoint_final.pth"))
    assert resumed["current_epoch"] == straight["current_epoch"] == 3
    # same epochs, same data stream (per-epoch seeds), same optimiser state -> the same weights (up to CPU rounding)
    resumed_like_straight(straight, resumed, latest)
    assert os.path.isfile(os.path.join(fold, "validation", "summary.json"))
    assert not [f for f in os.listdir(fold) if f.startswith(".tmp_")], os.listdir(fold)


def test_nan_loss_stops_with_last_checkpoint_intact(toy_dataset, run, tmp_path):
    """(Stop signals: tests/training/test_preemption.py.)"""
    env, res = toy_dataset
    # a NaN loss in epoch 1: clear message, non-zero exit, epoch 0's checkpoint intact and finite
    cmd = ["nnUNetv2_train", "994", "3d_fullres", "0", "-tr", "BSFTrainer_CInan", "-device", "cpu"]
    fold = os.path.join(res, "BSFTrainer_CInan__nnUNetPlans__3d_fullres", "fold_0")
    p = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=900)
    assert p.returncode != 0
    assert "The training loss became nan in epoch 1" in p.stdout
    assert "the last checkpoint (checkpoint_latest.pth / checkpoint_best.pth) is intact" in p.stdout
    ck = _load(os.path.join(fold, "checkpoint_latest.pth"))
    assert ck["current_epoch"] == 1
    assert all(torch.isfinite(v).all() for v in ck["network_weights"].values())
    assert not os.path.exists(os.path.join(fold, "checkpoint_final.pth"))


def test_pretrainer_kill_during_checkpoint_write_resumes(nnunet_env, prepared, run, tmp_path):
    dataset_id, full, _ = prepared("ssl2")
    env = dict(nnunet_env, nnUNet_n_proc_DA="0")
    cmd = ["nnUNetv2_train", dataset_id, "3d_fullres", "all", "-tr", "BSFPretrainTrainer_CIkill", "-device", "cpu"]
    fold = os.path.join(env["nnUNet_results"], full, "BSFPretrainTrainer_CIkill__nnUNetPlans__3d_fullres",
                        "fold_all")
    marker = str(tmp_path / "in_save")
    rc, _ = _run_until_marker_then(signal.SIGKILL, cmd, dict(env, CI_HANG_IN_SAVE="3", CI_HANG_MARKER=marker),
                                   marker)
    assert rc == -signal.SIGKILL
    assert os.path.basename(open(marker).read()).startswith(".tmp_checkpoint_")
    # the pretraining checkpoints load with weights_only=True; the last complete one is intact
    done = torch.load(os.path.join(fold, "checkpoint_latest.pth"), map_location="cpu", weights_only=True)
    assert done["current_epoch"] == 1
    run(cmd + ["--c"], env)
    final = torch.load(os.path.join(fold, "checkpoint_final.pth"), map_location="cpu", weights_only=True)
    assert final["current_epoch"] == 3
    # the half-written temporary file of the killed run was cleaned up
    assert not [f for f in os.listdir(fold) if f.startswith(".tmp_")], os.listdir(fold)


def test_out_of_memory_message_names_settings():
    from bsf_nnunet.training.base import out_of_memory_message

    msg = out_of_memory_message("BSFTrainer", "small", (128, 128, 128), 2, "cuda")
    for part in ("GPU memory", "variant small", "patch [128, 128, 128]", "batch size 2", "BSF_MEMORY_GB",
                 "use_checkpoint", "--patch 96 96 96", "--c"):
        assert part in msg
