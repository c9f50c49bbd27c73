"""`bsf-nnunet demo` with the smallest settings: every step runs through the nnU-Net commands, the table, the
summary and the PNG are written, and a second run reuses every finished step."""
import importlib.util
import json
import os


def test_demo_smallest_settings(nnunet_env, run, tmp_path):
    env = {k: v for k, v in nnunet_env.items() if k not in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")}
    work = tmp_path / "demo"
    cmd = ["bsf-nnunet", "demo", "--fast", "--workdir", str(work), "--trainers", "BSFPretrainTrainer_CIfast",
           "BSFTrainer_CIfast", "BSFTrainer_CIfast_scratch"]
    if importlib.util.find_spec("nilearn") is None:  # the [demo] extra brings it; without it use the phantom
        cmd += ["--source", "synthetic"]
    out = run(cmd, env)
    for shown in ("$ nnUNetv2_plan_and_preprocess -d 990",
                  "$ nnUNetv2_train 990 3d_fullres all -tr BSFPretrainTrainer_CIfast", "-pretrained_weights",
                  "$ nnUNetv2_predict", "Dice on 2 held-out cases", "Run time per step"):
        assert shown in out, shown
    summary = json.load(open(work / "demo_summary.json"))
    assert set(summary["dice"]) == {"pretrained", "scratch", "trivial (majority class)"}
    assert all(0.0 <= v <= 1.0 for row in summary["dice"].values() for v in row.values())
    assert os.path.getsize(work / "demo_slices.png") > 10000
    # the user's own nnU-Net folders were never used
    assert not any(os.listdir(nnunet_env[k]) for k in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"))
    # pretrained fine-tuning really started from the pretraining
    log_dir = work / "nnUNet_results" / "Dataset990_BrainTissueDemo" / "BSFTrainer_CIfast__nnUNetPlans__3d_fullres"
    log = open(next((log_dir / "fold_0").glob("training_log_*.txt"))).read()
    assert "Initialised from" in log
    again = run(cmd, env)
    assert again.count("already done") >= 6 and "$ nnUNetv2_train" not in again
