"""`bsf-nnunet demo` with the smallest settings: every step runs through the nnU-Net commands, the tables (in-source
test cases and, with the [demo] extra, the held-out source), the summary and the PNG are written, and a second run
reuses every finished step. The fine-tuning trainers skip the final validation, as the --fast profile's do (and
``--val`` still runs it)."""
import importlib.util
import json
import os


def test_demo_smallest_settings(nnunet_env, run, tmp_path, fake_heldout_wheels):
    env = {k: v for k, v in nnunet_env.items() if k not in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")}
    env["BSF_DATA_DIR"] = str(fake_heldout_wheels[0])      # stand-ins of the held-out wheels: no download
    work = tmp_path / "demo"
    cmd = ["bsf-nnunet", "demo", "--fast", "--workdir", str(work), "--normalization", "robust",
           "--trainers", "BSFPretrainTrainer_CIfast",
           "BSFTrainer_CIdemo", "BSFTrainer_CIdemo_scratch"]
    multi = all(importlib.util.find_spec(m) for m in ("nilearn", "spm_runtime", "deepmriprep"))
    if not multi:  # the [demo] extra brings the real sources; without it use the phantom
        cmd += ["--source", "synthetic"]
    out = run(cmd, env)
    for shown in ("$ nnUNetv2_plan_and_preprocess -d 990", "normalised with RobustZScoreNormalization",
                  "$ nnUNetv2_preprocess -d 990",
                  "$ nnUNetv2_train 990 3d_fullres all -tr BSFPretrainTrainer_CIfast", "-pretrained_weights",
                  "$ nnUNetv2_predict", "Dice on 2 in-source test cases", "Run time per step"):
        assert shown in out, shown
    summary = json.load(open(work / "demo_summary.json"))
    tables = [summary["dice"]] + [h["dice"] for h in summary["heldout"].values()]
    for rows in tables:
        assert set(rows) == {"pretrained", "scratch", "trivial (majority class)"}
        assert all(0.0 <= v <= 1.0 for row in rows.values() for v in row.values())
    if multi:  # each held-out source is reported on its own and never trained on
        assert sorted(summary["heldout"]) == ["fsaverage6", "icbm152", "mni152_fsl"]
        for source, held in summary["heldout"].items():
            assert f"held-out source {source} (" in out
            assert held["cases"] == [f"heldout_{source}_000.nii.gz"]
            assert held["whole_head"] == (source != "icbm152")
        train = os.listdir(work / "nnUNet_raw" / "Dataset990_BrainTissueDemo" / "imagesTr")
        assert not any(s in f for f in train for s in summary["heldout"])
        # unlabelled whole-head cases: pretrained on (with the 6 labelled training cases), in no fine-tuning fold
        assert sorted(f for f in train if f.startswith("unlabelled_")) == [
            "unlabelled_spm_avg305_000_0000.nii.gz", "unlabelled_spm_colin27_000_0000.nii.gz"]
        split = json.load(open(work / "nnUNet_preprocessed" / "Dataset990_BrainTissueDemo" / "splits_final.json"))[0]
        assert len(split["train"] + split["val"]) == 6 and not any("unlabelled" in c for v in split.values() for c in v)
        pre = (work / "nnUNet_results" / "Dataset990_BrainTissueDemo"
               / "BSFPretrainTrainer_CIfast__nnUNetPlans__3d_fullres")
        assert "Pretraining on 8 cases" in open(next((pre / "fold_all").glob("training_log_*.txt"))).read()
    else:
        assert summary["heldout"] == {}
    plans = json.load(open(work / "nnUNet_preprocessed" / "Dataset990_BrainTissueDemo" / "nnUNetPlans.json"))
    assert plans["configurations"]["3d_fullres"]["normalization_schemes"] == ["RobustZScoreNormalization"]
    assert os.path.getsize(work / "demo_slices.png") > 10000
    # the user's own nnU-Net folders were never used
    assert not any(os.listdir(nnunet_env[k]) for k in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"))
    # pretrained fine-tuning really started from the pretraining
    log_dir = work / "nnUNet_results" / "Dataset990_BrainTissueDemo" / "BSFTrainer_CIdemo__nnUNetPlans__3d_fullres"
    log = open(next((log_dir / "fold_0").glob("training_log_*.txt"))).read()
    assert "Initialised from" in log
    assert "skips the final validation" in log and not (log_dir / "fold_0" / "validation").exists()
    again = run(cmd, env)
    assert again.count("already done") >= 6 and "$ nnUNetv2_train" not in again


def test_fast_trainers_skip_the_final_validation_only_right_after_training(monkeypatch):
    """BSFTrainer_ToyFast (the --fast demo) skips nnU-Net's final validation after its training; the same trainer
    run with --val (no training in the process) validates, and so does every trainer that keeps the default."""
    import torch
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    from bsf_nnunet.training import BSFTrainer_Toy, BSFTrainer_ToyFast

    validated, logged = [], []
    monkeypatch.setattr(nnUNetTrainer, "perform_actual_validation",
                        lambda self, save_probabilities=False: validated.append(type(self).__name__))
    monkeypatch.setenv("BSF_CPU_ENGINE", "torch")

    def trainer(cls, trained: bool):
        t = object.__new__(cls)
        t.network = torch.nn.Linear(1, 1)
        t.print_to_log_file = lambda *a, **k: logged.append(" ".join(map(str, a)))
        if trained:
            t._bsf_trained_in_this_process = True
        return t

    trainer(BSFTrainer_ToyFast, trained=True).perform_actual_validation()
    assert validated == [] and "run nnUNetv2_train with --val" in logged[0]
    trainer(BSFTrainer_ToyFast, trained=False).perform_actual_validation()  # nnUNetv2_train ... --val
    trainer(BSFTrainer_Toy, trained=True).perform_actual_validation()
    assert validated == ["BSFTrainer_ToyFast", "BSFTrainer_Toy"] and len(logged) == 1
