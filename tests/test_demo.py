"""`bsf-nnunet demo` with the smallest settings: every step runs through the nnU-Net commands, the tables (in-source
test cases and, with the [demo] extra, the held-out source), the summary and the PNG are written, and a second run
reuses every finished step."""
import importlib.util
import json
import os


def test_demo_smallest_settings(nnunet_env, run, tmp_path):
    env = {k: v for k, v in nnunet_env.items() if k not in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")}
    work = tmp_path / "demo"
    cmd = ["bsf-nnunet", "demo", "--fast", "--workdir", str(work), "--trainers", "BSFPretrainTrainer_CIfast",
           "BSFTrainer_CIfast", "BSFTrainer_CIfast_scratch"]
    multi = all(importlib.util.find_spec(m) for m in ("nilearn", "spm_runtime", "deepmriprep"))
    if not multi:  # the [demo] extra brings the real sources; without it use the phantom
        cmd += ["--source", "synthetic"]
    out = run(cmd, env)
    for shown in ("$ nnUNetv2_plan_and_preprocess -d 990",
                  "$ nnUNetv2_train 990 3d_fullres all -tr BSFPretrainTrainer_CIfast", "-pretrained_weights",
                  "$ nnUNetv2_predict", "Dice on 2 in-source test cases", "Run time per step"):
        assert shown in out, shown
    summary = json.load(open(work / "demo_summary.json"))
    tables = [summary["dice"]] + ([summary["heldout"]["dice"]] if multi else [])
    for rows in tables:
        assert set(rows) == {"pretrained", "scratch", "trivial (majority class)"}
        assert all(0.0 <= v <= 1.0 for row in rows.values() for v in row.values())
    if multi:  # the held-out source is reported on its own and never trained on
        assert "held-out source icbm152" in out
        assert summary["heldout"]["cases"] == ["heldout_icbm152_000.nii.gz"]
        train = os.listdir(work / "nnUNet_raw" / "Dataset990_BrainTissueDemo" / "imagesTr")
        assert not any("icbm" in f for f in train)
    else:
        assert summary["heldout"] is None
    assert os.path.getsize(work / "demo_slices.png") > 10000
    # the user's own nnU-Net folders were never used
    assert not any(os.listdir(nnunet_env[k]) for k in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"))
    # pretrained fine-tuning really started from the pretraining
    log_dir = work / "nnUNet_results" / "Dataset990_BrainTissueDemo" / "BSFTrainer_CIfast__nnUNetPlans__3d_fullres"
    log = open(next((log_dir / "fold_0").glob("training_log_*.txt"))).read()
    assert "Initialised from" in log
    again = run(cmd, env)
    assert again.count("already done") >= 6 and "$ nnUNetv2_train" not in again
