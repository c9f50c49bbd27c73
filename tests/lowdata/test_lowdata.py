"""Low-data study (bsf-nnunet lowdata splits/run/report) on fabricated nnU-Net folders; no training."""
import csv
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
from cli_helpers import run_subcommand
from scipy import stats

from bsf_nnunet.cli import lowdata as cli_lowdata
from bsf_nnunet.lowdata import report as ld_report
from bsf_nnunet.lowdata import runner as ld_runner
from bsf_nnunet.lowdata import stage2 as ld_stage2
from bsf_nnunet.lowdata.common import load_layout
from bsf_nnunet.lowdata.runner import run_lowdata
from bsf_nnunet.lowdata.splits import create_splits, make_layout

DS = "Dataset042_Toy"
FRACTIONS = [0.05, 0.1, 0.2, 0.4, 0.6, 0.8, 1.0]


def cli(*argv):
    return run_subcommand(cli_lowdata, *argv)


@pytest.fixture
def env(nnunet_roots):
    return nnunet_roots


@pytest.fixture(autouse=True)
def _fresh_trainer_lookup():
    """pretrain_trainer_of caches per process; some tests stand in a fake trainer class."""
    ld_stage2.pretrain_trainer_of.cache_clear()
    yield
    ld_stage2.pretrain_trainer_of.cache_clear()


def make_preprocessed(env, n, name=DS, ending=".b2nd"):
    data = env["nnUNet_preprocessed"] / name / "nnUNetPlans_3d_fullres"
    data.mkdir(parents=True)
    for i in range(n):
        (data / f"case_{i:03d}{ending}").write_bytes(b"")
        (data / f"case_{i:03d}_seg{ending}").write_bytes(b"")
        (data / f"case_{i:03d}.pkl").write_bytes(b"")
    return sorted(f"case_{i:03d}" for i in range(n))


def splits_path(env, name=DS):
    return env["nnUNet_preprocessed"] / name / "splits_final.json"


def layout_path(env, name=DS):
    return env["nnUNet_preprocessed"] / name / "lowdata.json"


def quiet(*_):
    pass


# ------------------------------------------------------------------------------------------------- environment
def test_nnunet_paths_read_environment_lazily(env, monkeypatch, tmp_path):
    from nnunetv2 import paths

    assert paths.nnUNet_preprocessed.get() == str(env["nnUNet_preprocessed"])
    monkeypatch.setenv("nnUNet_preprocessed", str(tmp_path / "elsewhere"))
    assert str(paths.nnUNet_preprocessed) == str(tmp_path / "elsewhere")


def test_lowdata_does_not_import_training():
    code = ("import sys, bsf_nnunet.cli.lowdata, bsf_nnunet.lowdata.splits, bsf_nnunet.lowdata.runner, "
            "bsf_nnunet.lowdata.report; bad = [m for m in sys.modules if m.startswith('bsf_nnunet.training')]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


# ------------------------------------------------------------------------------------------------- splits
def test_split_invariants(env):
    cases = make_preprocessed(env, 30)
    layout = create_splits(42, FRACTIONS, repeats=5, test_fraction=0.2, seed=0, out=quiet)
    splits = json.loads(splits_path(env).read_text())
    from nnunetv2.utilities.crossval_split import generate_crossval_split

    # nnU-Net's default five folds first, exactly as nnUNetTrainer.do_split would create them
    default = generate_crossval_split(cases, seed=12345, n_splits=5)
    assert [{"train": list(map(str, s["train"])), "val": list(map(str, s["val"]))} for s in default] == splits[:5]
    assert layout["first_fold"] == 5 and len(splits) == 5 + len(FRACTIONS) * 5

    test = set(layout["test"])
    assert len(test) == 6  # round(0.2 * 30)
    pool = set(cases) - test
    by = {}
    for fd in layout["folds"]:
        s = splits[fd["fold"]]
        assert set(s["val"]) == test                      # the fixed test set is every fold's "val"
        assert not set(s["train"]) & test                 # disjoint from it
        assert set(s["train"]) <= pool and len(s["train"]) == len(set(s["train"]))
        assert sorted(s["train"]) == fd["train"]
        assert len(s["train"]) == max(1, math.floor(fd["fraction"] * 24 + 0.5)) == fd["n_train"] >= 1
        by[(fd["fraction"], fd["repeat"])] = set(s["train"])
    for r in range(5):  # nested within a repeat
        for small, big in zip(FRACTIONS, FRACTIONS[1:], strict=False):
            assert by[(small, r)] <= by[(big, r)]
        assert by[(1.0, r)] == pool
    assert len({frozenset(by[(0.2, r)]) for r in range(5)}) > 1  # repeats are different draws
    assert layout["pretrain_fold"] == [f["fold"] for f in layout["folds"] if f["fraction"] == 1.0][0]
    # fold numbers are consecutive, fraction-major
    assert [f["fold"] for f in layout["folds"]] == list(range(5, 5 + 35))
    saved = json.loads(layout_path(env).read_text())
    assert saved["test"] == layout["test"] and saved["settings"]["seed"] == 0


def test_splits_deterministic_and_seeded():
    cases = [f"c{i:02d}" for i in range(40)]
    a = make_layout(cases, FRACTIONS, 3, 0.25, seed=7)
    b = make_layout(list(reversed(cases)), FRACTIONS, 3, 0.25, seed=7)
    assert a == b
    c = make_layout(cases, FRACTIONS, 3, 0.25, seed=8)
    assert c["test"] != a["test"]
    # more repeats / fractions leave the earlier draws unchanged
    d = make_layout(cases, FRACTIONS + [0.3], 5, 0.25, seed=7)
    def key(lay):
        return {(f["fraction"], f["repeat"]): f["train"] for f in lay["folds"]}

    assert all(key(d)[k] == v for k, v in key(a).items())


def test_official_protocol_redraws_the_test_set_per_repeat(env):
    """--redraw-test-per-repeat (issue #31.6): repeat r has its own test set (the 'val' of its folds in
    splits_final.json), 20 % of all cases, disjoint from its training cases; subsets stay nested within a repeat;
    no shared stage-2 fold (every case is a test case of some repeat), and lowdata run refuses --stage2 shared."""
    cases = make_preprocessed(env, 20)
    layout = create_splits(DS, [0.25, 1.0], repeats=3, out=quiet, redraw_test=True)
    splits = json.loads(splits_path(env).read_text())
    assert layout["test"] is None and layout["pretrain_fold"] is None
    assert layout["settings"]["redraw_test_per_repeat"]
    tests = {}
    for fd in layout["folds"]:
        s = splits[fd["fold"]]
        assert sorted(s["val"]) == fd["test"] and len(fd["test"]) == 4 == fd["n_val"]
        assert not set(s["train"]) & set(fd["test"]) and set(s["train"]) | set(fd["test"]) <= set(cases)
        tests.setdefault(fd["repeat"], set()).add(tuple(fd["test"]))
    assert all(len(t) == 1 for t in tests.values())                  # one test set per repeat, for every fraction
    assert len({next(iter(t)) for t in tests.values()}) == 3           # a new one for every repeat
    by = {(f["fraction"], f["repeat"]): set(f["train"]) for f in layout["folds"]}
    assert all(by[(0.25, r)] < by[(1.0, r)] and len(by[(1.0, r)]) == 16 for r in range(3))
    load_layout(DS)                                                    # the consistency check accepts it
    with pytest.raises(ValueError, match="--stage2 shared.*redraw-test-per-repeat"):
        run_lowdata(DS, ["BSFTrainer_Toy"], stage2="shared", pretrained_weights="x.pth", dry_run=True, out=quiet)
    fixed = make_layout(cases, [0.25, 1.0], 3, 0.2, seed=0)
    assert fixed["test"] is not None and all("test" not in f for f in fixed["folds"])


def test_tiny_dataset_at_least_one_case_and_pretrain_fold():
    lay = make_layout(["a", "b", "c"], [0.05, 0.5], repeats=2, test_fraction=0.2, seed=0)
    assert len(lay["test"]) == 1
    ft = [f for f in lay["folds"] if f["role"] == "finetune"]
    assert [f["n_train"] for f in ft] == [1, 1, 1, 1]
    pre = [f for f in lay["folds"] if f["role"] == "pretrain"]
    assert len(pre) == 1 and pre[0]["fold"] == lay["pretrain_fold"] == 9  # 5 + 4
    assert sorted(pre[0]["train"] + lay["test"]) == ["a", "b", "c"]
    with pytest.raises(ValueError, match="at least 2 cases"):
        make_layout(["a"], [0.5], 1, 0.2, 0)
    for bad in ([0.0], [1.5], [0.1, 0.1]):
        with pytest.raises(ValueError, match="--fractions"):
            make_layout(["a", "b"], bad, 1, 0.2, 0)
    with pytest.raises(ValueError, match="--test-fraction"):
        make_layout(["a", "b"], [0.5], 1, 1.0, 0)


def test_existing_folds_kept_byte_for_byte(env):
    cases = make_preprocessed(env, 12)
    # a hand-made split file in an unusual format, 3 folds
    custom = [{"train": cases[:8], "val": cases[8:]}, {"train": cases[4:], "val": cases[:4]},
              {"val": cases[:2], "train": cases[2:]}]
    text = "[ " + " ,\n  ".join(json.dumps(f) for f in custom) + "\n]\n"
    splits_path(env).write_text(text)
    layout = create_splits(DS, [0.5, 1.0], repeats=2, out=quiet)
    new = splits_path(env).read_text()
    kept = text[:text.rindex("}") + 1]
    assert new.startswith(kept)
    assert json.loads(new)[:3] == custom and layout["first_fold"] == 3
    assert [f["fold"] for f in layout["folds"]] == [3, 4, 5, 6]


def test_nnunet_written_split_file_stays_nnunet_formatted(env):
    from batchgenerators.utilities.file_and_folder_operations import save_json
    from nnunetv2.utilities.crossval_split import generate_crossval_split

    cases = make_preprocessed(env, 15)
    base = generate_crossval_split(cases, seed=12345, n_splits=5)
    save_json(base, str(splits_path(env)))  # what nnU-Net writes
    original = splits_path(env).read_bytes()
    create_splits(42, [0.2, 1.0], repeats=2, out=quiet)
    new = splits_path(env).read_bytes()
    assert new.startswith(original[:-2])  # everything up to the closing "\n]"
    full = json.loads(new)
    save_json(full, str(env["nnUNet_preprocessed"] / "expected.json"))
    assert new == (env["nnUNet_preprocessed"] / "expected.json").read_bytes()


def test_rerun_is_noop_and_different_layout_refused(env):
    make_preprocessed(env, 20)
    assert cli("lowdata", "splits", "-d", "42", "--repeats", "3", "--fractions", "0.1", "0.5", "1.0") == 0
    sp, lp = splits_path(env), layout_path(env)
    before = (sp.read_bytes(), sp.stat().st_mtime_ns, sp.stat().st_ino, lp.read_bytes(), lp.stat().st_ino)
    assert cli("lowdata", "splits", "-d", "42", "--repeats", "3", "--fractions", "1.0", "0.5", "0.1") == 0
    assert (sp.read_bytes(), sp.stat().st_mtime_ns, sp.stat().st_ino, lp.read_bytes(), lp.stat().st_ino) == before

    with pytest.raises(ValueError, match="different low-data layout.*--overwrite"):
        create_splits(42, [0.1, 0.5, 1.0], repeats=2, out=quiet)
    with pytest.raises(ValueError, match="different low-data layout"):
        create_splits(42, [0.1, 0.5, 1.0], repeats=3, seed=1, out=quiet)
    assert sp.read_bytes() == before[0] and lp.read_bytes() == before[3]

    cv = json.loads(sp.read_text())[:5]
    lay = create_splits(42, [0.1, 0.5, 1.0], repeats=2, overwrite=True, out=quiet)
    after = json.loads(sp.read_text())
    assert after[:5] == cv and len(after) == 5 + 6 and lay["settings"]["repeats"] == 2


def test_cases_changed_or_split_edited_refused(env, capsys):
    make_preprocessed(env, 20)
    create_splits(42, [0.5, 1.0], repeats=2, out=quiet)
    # a split file edited by hand
    s = json.loads(splits_path(env).read_text())
    s[6]["train"] = s[6]["train"][:-1]
    splits_path(env).write_text(json.dumps(s))
    with pytest.raises(ValueError, match="edited"):
        create_splits(42, [0.5, 1.0], repeats=2, out=quiet)
    # the runner refuses to train from an inconsistent file
    assert cli("lowdata", "run", "-d", "42", "--dry-run") == 2
    err = capsys.readouterr().err
    assert "differs from the low-data layout" in err and "--overwrite" in err and "\n" not in err.strip()
    # an added case changes the layout
    create_splits(42, [0.5, 1.0], repeats=2, overwrite=True, out=quiet)
    (env["nnUNet_preprocessed"] / DS / "nnUNetPlans_3d_fullres" / "case_999.b2nd").write_bytes(b"")
    with pytest.raises(ValueError, match="cases differ"):
        create_splits(42, [0.5, 1.0], repeats=2, out=quiet)


def test_case_ids_from_raw_labels(env):
    raw = env["nnUNet_raw"] / "Dataset007_Raw"
    (raw / "labelsTr").mkdir(parents=True)
    (raw / "dataset.json").write_text(json.dumps({"file_ending": ".nii.gz", "labels": {"background": 0, "x": 1}}))
    for c in ("b", "a", "c", "d", "e"):
        (raw / "labelsTr" / f"{c}.nii.gz").write_bytes(b"")
    lay = create_splits(7, [1.0], repeats=1, out=quiet)
    assert sorted(lay["test"] + lay["folds"][0]["train"]) == ["a", "b", "c", "d", "e"]
    assert lay["case_source"].endswith("labelsTr")
    assert (env["nnUNet_preprocessed"] / "Dataset007_Raw" / "splits_final.json").is_file()


def test_case_ids_as_nnunet_reads_them(env):
    """The data folder from the plans (inherits_from resolved by nnU-Net's PlansManager), the cases as nnU-Net's
    dataset class lists them; a folder nnU-Net cannot read is named with the fix."""
    pre = env["nnUNet_preprocessed"] / DS
    make_preprocessed(env, 6)
    (pre / "nnUNetPlans_3d_fullres").rename(pre / "Mine")
    (pre / "nnUNetPlans.json").write_text(json.dumps({"configurations": {
        "base": {"data_identifier": "Mine", "architecture": {}}, "3d_fullres": {"inherits_from": "base"}}}))
    lay = create_splits(42, [1.0], repeats=1, out=quiet)
    assert lay["case_source"].endswith("Mine") and lay["n_cases"] == 6
    (pre / "Mine" / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match=r"Mine holds files nnU-Net cannot read.*b2nd, txt.*Move the other files"):
        create_splits(42, [1.0], repeats=1, out=quiet)


def test_bad_input_messages(env, capsys):
    assert cli("lowdata", "splits", "-d", "99") == 2
    err = capsys.readouterr().err
    assert "99" in err and "nnUNet_raw=" in err
    (env["nnUNet_preprocessed"] / "Dataset005_Empty").mkdir()
    assert cli("lowdata", "splits", "-d", "5") == 2
    assert "nnUNetv2_plan_and_preprocess" in capsys.readouterr().err
    make_preprocessed(env, 4)
    assert cli("lowdata", "run", "-d", "42", "--dry-run") == 2
    assert "lowdata splits" in capsys.readouterr().err  # no layout yet: says what to run


# ------------------------------------------------------------------------------------------------- run
def _touch(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x")


def _fold(env, trainer, fold, plans="nnUNetPlans", conf="3d_fullres"):
    return env["nnUNet_results"] / DS / f"{trainer}__{plans}__{conf}" / f"fold_{fold}"


def test_run_dry_run_skip_and_continue_logic(env, capsys):
    make_preprocessed(env, 20)
    create_splits(42, [0.5, 1.0], repeats=2, out=quiet)  # low-data folds 5-8
    _touch(_fold(env, "BSFTrainer", 5) / "checkpoint_final.pth")
    _touch(_fold(env, "BSFTrainer", 5) / "validation" / "summary.json")
    _touch(_fold(env, "BSFTrainer_scratch", 5) / "checkpoint_latest.pth")
    _touch(_fold(env, "BSFTrainer", 6) / "checkpoint_best.pth")
    _touch(_fold(env, "BSFTrainer_scratch", 6) / "checkpoint_final.pth")  # validation missing

    calls = []
    jobs = ld_runner.run_lowdata("42", ["BSFTrainer", "BSFTrainer_scratch"], dry_run=True, device="cpu",
                                 pretrained_weights="/w/stage2.pth", runner=lambda *a: calls.append(a), out=quiet,
                                 stage2="shared")
    assert not calls  # dry run runs nothing
    got = {(j.fold, j.trainer): (j.status, j.command_line) for j in jobs}
    base = "nnUNetv2_train 42 3d_fullres {} -tr {} -p nnUNetPlans -device cpu"
    assert got[(5, "BSFTrainer")][0] == "done"
    assert got[(5, "BSFTrainer_scratch")][1] == base.format(5, "BSFTrainer_scratch") + " --c"
    assert got[(6, "BSFTrainer")][1] == base.format(6, "BSFTrainer") + " --c"  # no -pretrained_weights with --c
    assert got[(6, "BSFTrainer_scratch")][1] == base.format(6, "BSFTrainer_scratch") + " --val"
    assert got[(7, "BSFTrainer")][1] == base.format(7, "BSFTrainer") + " -pretrained_weights /w/stage2.pth"
    assert got[(7, "BSFTrainer_scratch")][1] == base.format(7, "BSFTrainer_scratch")  # baselines never get weights
    assert [j.fold for j in jobs] == [5, 5, 6, 6, 7, 7, 8, 8]

    assert cli("lowdata", "run", "-d", "42", "--dry-run", "--folds", "5", "7", "--device", "cpu",
               "-c", "3d_fullres", "-p", "nnUNetPlans", "--stage2", "shared") == 0
    text = capsys.readouterr().out
    assert "fold 5 (50%, repeat 0) BSFTrainer: done, skipped" in text
    assert base.format(5, "BSFTrainer_scratch") + " --c" in text
    assert base.format(7, "BSFTrainer") in text and base.format(7, "BSFTrainer_scratch") in text
    assert "fold 6" not in text and "fold 8" not in text
    assert "4 trainings: 1 already done, would run 3" in text

    assert cli("lowdata", "run", "-d", "42", "--dry-run", "--folds", "2") == 2  # a CV fold is not a low-data fold
    assert "5-8" in capsys.readouterr().err


def test_run_with_injected_runner_restartable(env):
    make_preprocessed(env, 10)
    create_splits(42, [1.0], repeats=2, out=quiet)  # folds 5, 6
    seen = []

    def fake_train(cmd, log, environ):
        seen.append(list(cmd))
        assert environ["nnUNet_results"] == str(env["nnUNet_results"])
        fold, tr = cmd[3], cmd[cmd.index("-tr") + 1]
        _touch(_fold(env, tr, fold) / "checkpoint_final.pth")
        _touch(_fold(env, tr, fold) / "validation" / "summary.json")
        return 0

    ld_runner.run_lowdata(42, ["T", "T_scratch"], runner=fake_train, out=quiet, pretrain_trainer="P")
    assert [(c[3], c[5]) for c in seen] == [("5", "P"), ("5", "T"), ("5", "T_scratch"),
                                            ("6", "P"), ("6", "T"), ("6", "T_scratch")]
    seen.clear()
    jobs = ld_runner.run_lowdata(42, ["T", "T_scratch"], runner=fake_train, out=quiet, pretrain_trainer="P")
    assert not seen and all(j.status == "done" for j in jobs)


def test_run_validates_after_a_trainer_that_skips_the_final_validation(env):
    """Issue #27: the sequential runner follows a training that ended without validation/summary.json (e.g.
    BSFTrainer_ToyFast) with --val, so the fold is done and the report finds its test-set Dice."""
    make_preprocessed(env, 10)
    create_splits(42, [1.0], repeats=1, out=quiet)  # fold 5
    seen = []

    def fast_train(cmd, log, environ):
        seen.append(" ".join(cmd[5:]))
        folder = _fold(env, cmd[cmd.index("-tr") + 1], cmd[3])
        _touch(folder / "checkpoint_final.pth")
        if "--val" in cmd:
            _touch(folder / "validation" / "summary.json")
        return 0

    jobs = ld_runner.run_lowdata(42, ["T_scratch"], runner=fast_train, out=quiet)
    assert seen == ["T_scratch -p nnUNetPlans -device cuda", "T_scratch -p nnUNetPlans -device cuda --val"]
    assert ld_runner.job_status(jobs[0].output_folder, jobs[0].kind) == "done"


def test_run_failure_names_fold_and_log(env, monkeypatch, capsys):
    make_preprocessed(env, 10)
    create_splits(42, [1.0], repeats=1, out=quiet)
    with pytest.raises(ld_runner.TrainingFailed, match=r"fold 5 .*T_scratch.*exit code 3.*Log: .*fold_5\.log"):
        ld_runner.run_lowdata(42, ["T_scratch"], runner=lambda *a: 3, out=quiet)
    monkeypatch.setattr(ld_runner, "subprocess_runner", lambda *a: 1)
    assert cli("lowdata", "run", "-d", "42", "--trainers", "T", "--pretrain-trainer", "P") == 1
    assert "Stage-2 pretraining of fold 5 (100%, repeat 0) with P failed" in capsys.readouterr().err
    assert cli("lowdata", "run", "-d", "42", "--trainers", "T", "--stage2", "shared") == 1
    assert "Training of fold 5" in capsys.readouterr().err


def test_run_skips_fold_locked_by_another_process(env):
    make_preprocessed(env, 10)
    create_splits(42, [1.0], repeats=1, out=quiet)
    job = ld_runner.plan_jobs(42, ["T"], pretrain_trainer="P")[0]
    assert (job.trainer, job.kind) == ("P", "pretrain")
    lock = ld_runner.FoldLock(job.lock)
    assert lock.acquire()
    try:
        calls, lines = [], []
        ld_runner.run_lowdata(42, ["T"], runner=lambda *a: calls.append(a) or 0, out=lines.append,
                              pretrain_trainer="P")
        assert not calls  # the pretraining is busy elsewhere, so its fine-tuning must wait too
        assert "its stage-2 pretraining is not finished" in "\n".join(lines)
        assert "2 busy in another process" in lines[-1]
    finally:
        lock.release()


# ------------------------------------------------------------------------------------------------- stage 2
class _ChainsFromBSFPretrain:  # stands in for BSFTrainer in the planning tests (importing it takes seconds)
    bsf_pretrain_trainer = "BSFPretrainTrainer"


def _commands(text):
    return [line.strip() for line in text.splitlines() if line.strip().startswith("nnUNetv2_train")]


def test_default_stage2_is_per_fold_pretraining_before_each_finetune(env, capsys, monkeypatch):
    """Without --stage2 every low-data fold is pretrained on its own cases, then fine-tuned from that checkpoint."""
    monkeypatch.setattr(ld_stage2, "_trainer_class", lambda name: _ChainsFromBSFPretrain)
    make_preprocessed(env, 20)
    create_splits(42, [0.5, 1.0], repeats=2, out=quiet)  # low-data folds 5-8
    assert cli("lowdata", "run", "-d", "42", "--dry-run", "--device", "cpu", "--pretrained-weights", "/w/s1.pth") == 0
    text = capsys.readouterr().out
    base = "nnUNetv2_train 42 3d_fullres {} -tr {} -p nnUNetPlans -device cpu"
    expected = []
    for f in (5, 6, 7, 8):
        stage2 = _fold(env, "BSFPretrainTrainer", f) / "checkpoint_best.pth"   # the best reconstruction (#31.3)
        expected += [base.format(f, "BSFPretrainTrainer") + " -pretrained_weights /w/s1.pth",
                     base.format(f, "BSFTrainer") + f" -pretrained_weights {stage2}",
                     base.format(f, "BSFTrainer_scratch")]
    assert _commands(text) == expected  # in this order: pretrain, fine-tune pretrained, scratch
    assert "fold 5 (50%, repeat 0) BSFPretrainTrainer (stage-2 pretraining): would pretrain" in text
    assert "12 trainings (4 of them stage-2 pretrainings): 0 already done, would run 12" in text
    assert not (env["nnUNet_results"] / DS / "lowdata_run.json").exists()  # a dry run records nothing


def test_shared_stage2_is_the_previous_plan(env, capsys):
    make_preprocessed(env, 20)
    create_splits(42, [0.5], repeats=2, out=quiet)  # low-data folds 5, 6 and the pretraining fold 7 (not trained)
    assert cli("lowdata", "run", "-d", "42", "--dry-run", "--device", "cpu", "--stage2", "shared",
               "--pretrained-weights", "/w/stage2.pth") == 0
    base = "nnUNetv2_train 42 3d_fullres {} -tr {} -p nnUNetPlans -device cpu"
    assert _commands(capsys.readouterr().out) == [
        base.format(5, "BSFTrainer") + " -pretrained_weights /w/stage2.pth", base.format(5, "BSFTrainer_scratch"),
        base.format(6, "BSFTrainer") + " -pretrained_weights /w/stage2.pth", base.format(6, "BSFTrainer_scratch")]


def test_per_fold_resume_and_finished_pretraining_skipped(env):
    make_preprocessed(env, 10)
    create_splits(42, [1.0], repeats=2, out=quiet)  # folds 5, 6
    _touch(_fold(env, "P", 5) / "checkpoint_final.pth")  # finished; a pretraining has no validation/summary.json
    _touch(_fold(env, "P", 6) / "checkpoint_latest.pth")
    jobs = {(j.fold, j.trainer): j for j in ld_runner.plan_jobs(42, ["T"], device="cpu", pretrain_trainer="P",
                                                                 pretrained_weights="/w/s1.pth")}
    assert jobs[(5, "P")].status == "done"
    assert jobs[(6, "P")].cmd[-1] == "--c" and "-pretrained_weights" not in jobs[(6, "P")].cmd
    assert jobs[(6, "T")].needs == str(_fold(env, "P", 6) / "checkpoint_final.pth")


def test_stage2_mode_recorded_and_mixing_refused(env):
    make_preprocessed(env, 10)
    create_splits(42, [1.0], repeats=2, out=quiet)
    trainers = ["T", "T_scratch"]
    ld_runner.run_lowdata(42, trainers, folds=[5], runner=lambda *a: 0, out=quiet, pretrain_trainer="P")
    record = json.loads((env["nnUNet_results"] / DS / "lowdata_run.json").read_text())
    assert record["stage2"] == {"T__nnUNetPlans__3d_fullres": {"mode": "per-fold", "pretrain_trainer": "P",
                                                               "pretrained_weights": None}}
    _touch(_fold(env, "T", 5) / "checkpoint_latest.pth")  # T has started with per-fold
    with pytest.raises(ValueError, match="--stage2 per-fold.*mix incomparable folds.*Run with --stage2 per-fold"):
        ld_runner.run_lowdata(42, trainers, stage2="shared", dry_run=True, out=quiet)
    (env["nnUNet_results"] / DS / "lowdata_run.json").unlink()  # trainings from before the mode was recorded
    with pytest.raises(ValueError, match="does not say which stage 2.*Pass --stage2 explicitly"):
        ld_runner.run_lowdata(42, trainers, dry_run=True, out=quiet, pretrain_trainer="P")
    ld_runner.run_lowdata(42, trainers, stage2="shared", runner=lambda *a: 0, out=quiet)
    record = json.loads((env["nnUNet_results"] / DS / "lowdata_run.json").read_text())
    assert record["stage2"]["T__nnUNetPlans__3d_fullres"]["mode"] == "shared"


def test_stage2_option_errors(env, capsys, monkeypatch):
    make_preprocessed(env, 10)
    create_splits(42, [1.0], repeats=1, out=quiet)
    assert cli("lowdata", "run", "-d", "42", "--dry-run", "--stage2", "none") == 2
    assert "--stage2 none fine-tunes straight from --pretrained-weights" in capsys.readouterr().err
    assert cli("lowdata", "run", "-d", "42", "--dry-run", "--stage2", "shared", "--pretrain-trainer", "P") == 2
    assert "--pretrain-trainer only applies to --stage2 per-fold" in capsys.readouterr().err
    monkeypatch.setattr(ld_stage2, "_trainer_class", lambda name: object)  # e.g. nnUNetTrainer: no stage chaining
    assert cli("lowdata", "run", "-d", "42", "--dry-run", "--trainers", "nnUNetTrainer_X") == 2
    err = capsys.readouterr().err
    assert "nnUNetTrainer_X names no stage-2 pretraining trainer" in err and "--pretrain-trainer NAME" in err
    assert cli("lowdata", "run", "-d", "42", "--stage2", "none", "--pretrained-weights", "/missing/s1.pth") == 2
    assert "the stage-1 checkpoint, given to the fine-tunings" in capsys.readouterr().err


def test_pretrain_trainer_is_the_trainers_chaining_trainer():
    assert ld_stage2.pretrain_trainer_of("BSFTrainer") == "BSFPretrainTrainer"
    assert ld_stage2.pretrain_trainer_of("BSFTrainer_Toy") == "BSFPretrainTrainer_Toy"


def test_default_runner_tees_output_to_log(tmp_path):
    log = tmp_path / "logs" / "x.log"
    rc = ld_runner.subprocess_runner([sys.executable, "-c", "print('hello from training')"], str(log), dict(os.environ))
    assert rc == 0 and "hello from training" in log.read_text()


# ------------------------------------------------------------------------------------------------- report
def _summary(path, per_label, cases):
    """A summary.json as nnU-Net writes it (only the fields the report reads, plus IoU)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fg = float(np.mean(list(per_label.values())))
    s = {"foreground_mean": {"Dice": fg, "IoU": 0.0},
         "mean": {k: {"Dice": v, "IoU": 0.0} for k, v in per_label.items()},
         "metric_per_case": [{"metrics": {}, "reference_file": f"/gt/{c}.nii.gz", "prediction_file": f"/p/{c}.nii.gz"}
                             for c in cases]}
    path.write_text(json.dumps(s, sort_keys=True, indent=4))
    return fg


def test_report_values_missing_folds_and_plot(env, capsys):
    make_preprocessed(env, 20)  # test set: 4 cases
    (env["nnUNet_preprocessed"] / DS / "dataset.json").write_text(json.dumps(
        {"labels": {"background": 0, "whole tumour": [1, 2], "core": [2]}, "regions_class_order": [1, 2]}))
    lay = create_splits(42, [0.5, 1.0], repeats=3, out=quiet)
    folds = {(f["fraction"], f["repeat"]): f["fold"] for f in lay["folds"]}
    vals = {  # (trainer, fraction, repeat) -> (whole tumour, core)
        ("BSFTrainer", 0.5, 0): (0.80, 0.60), ("BSFTrainer", 0.5, 1): (0.70, 0.50),
        ("BSFTrainer", 0.5, 2): (0.90, 0.70),
        ("BSFTrainer_scratch", 0.5, 0): (0.60, 0.40), ("BSFTrainer_scratch", 0.5, 1): (0.65, 0.45),
        ("BSFTrainer_scratch", 0.5, 2): (0.70, 0.40),
        ("BSFTrainer", 1.0, 0): (0.90, 0.80), ("BSFTrainer", 1.0, 1): (0.92, 0.78),
        ("BSFTrainer_scratch", 1.0, 0): (0.88, 0.76),  # 1.0 repeats 1, 2 of scratch missing, 2 of BSFTrainer too
    }
    fg = {}
    for (tr, fr, r), (wt, tc) in vals.items():
        fg[(tr, fr, r)] = _summary(_fold(env, tr, folds[(fr, r)]) / "validation" / "summary.json",
                                   {"(1, 2)": wt, "(2,)": tc}, lay["test"])
    _touch(_fold(env, "BSFTrainer_scratch", folds[(1.0, 1)]) / "checkpoint_latest.pth")
    _touch(_fold(env, "BSFTrainer_scratch", folds[(1.0, 2)]) / "checkpoint_final.pth")

    res = ld_report.build_report(42)  # trainers and the pair found automatically
    assert res["pretrained"] == "BSFTrainer" and res["baseline"] == "BSFTrainer_scratch"
    out_dir = env["nnUNet_results"] / DS / "lowdata_report"

    # CSV: one row per present trainer/fold, Dice per region named from dataset.json, mean = foreground_mean
    rows = list(csv.DictReader(open(out_dir / "lowdata_results.csv")))
    assert len(rows) == len(vals)
    r0 = next(r for r in rows if r["trainer"] == "BSFTrainer" and r["fold"] == str(folds[(0.5, 1)]))
    assert float(r0["Dice_whole tumour"]) == 0.70 and float(r0["Dice_core"]) == 0.50
    assert float(r0["mean_Dice"]) == pytest.approx(0.60) and r0["fraction"] == "0.5" and r0["repeat"] == "1"
    assert r0["n_train"] == "8" and r0["n_val"] == "4" and r0["n_evaluated"] == "4"
    assert list(rows[0])[7:] == ["Dice_whole tumour", "Dice_core", "mean_Dice"]  # dataset.json order

    # mean +- sd over repeats, by hand
    pre = [0.70, 0.60, 0.80]
    base = [0.50, 0.55, 0.55]
    m, sd, n = res["summary"][("BSFTrainer", 0.5)]["mean"]
    assert (m, n) == (pytest.approx(0.70), 3) and sd == pytest.approx(0.10)
    d = [a - b for a, b in zip(pre, base, strict=True)]  # 0.20, 0.05, 0.25
    c = res["comparison"][0.5]
    assert c["n"] == 3 and c["mean"] == pytest.approx(np.mean(d)) and c["sd"] == pytest.approx(np.std(d, ddof=1))
    assert c["p"] == pytest.approx(stats.ttest_rel(pre, base).pvalue)
    c1 = res["comparison"][1.0]
    assert c1["n"] == 1 and c1["p"] is None and c1["mean"] == pytest.approx(0.85 - 0.82)

    md = (out_dir / "lowdata_report.md").read_text()
    assert "| 50% | 8 | 0.7000 ± 0.1000 | 0.5333 ± 0.0289 | 0.1667 ± 0.1041 | 3 | " \
           f"{stats.ttest_rel(pre, base).pvalue:.3g} |" in md
    assert "paired t-test" in md
    missing = {(m["trainer"], m["fold"]): m["reason"] for m in res["missing"]}
    assert missing == {("BSFTrainer", folds[(1.0, 2)]): "not trained",
                       ("BSFTrainer_scratch", folds[(1.0, 1)]): "training not finished",
                       ("BSFTrainer_scratch", folds[(1.0, 2)]): "trained, validation missing (run nnUNetv2_train "
                                                                "... --val)"}
    assert f"- BSFTrainer_scratch fold {folds[(1.0, 1)]} (100%, repeat 1): training not finished" in md
    printed = capsys.readouterr().out
    assert "missing: 3 of 12" in printed  # also printed

    png = (out_dir / "lowdata_dice.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 2000
    assert not [f for f in os.listdir(out_dir) if f.startswith(".tmp_")]
    assert res["warnings"] == [] and "## Warnings" not in md

    # Wilcoxon instead, explicit trainers and output folder through the CLI
    other = env["nnUNet_results"] / "rep"
    assert cli("lowdata", "report", "-d", "42", "--trainers", "BSFTrainer_scratch", "BSFTrainer", "--out", other,
               "--test", "wilcoxon", "--xscale", "linear") == 0
    md2 = (other / "lowdata_report.md").read_text()
    assert "Wilcoxon signed-rank" in md2 and f"{stats.wilcoxon(d).pvalue:.3g}" in md2


def test_report_without_pair_and_bad_summary(env, capsys):
    make_preprocessed(env, 10)
    lay = create_splits(42, [1.0], repeats=1, out=quiet)
    f = lay["folds"][0]["fold"]
    _summary(_fold(env, "nnUNetTrainer", f) / "validation" / "summary.json", {"1": 0.5}, ["c0"])
    res = ld_report.build_report(42, trainers=["nnUNetTrainer"], out=quiet)
    assert res["comparison"] == {}
    assert any("1 cases evaluated, the test set has 2" in w for w in res["warnings"])
    assert any("outside the test set (c0.nii.gz)" in w for w in res["warnings"])
    assert "No paired comparison" in (env["nnUNet_results"] / DS / "lowdata_report" / "lowdata_report.md").read_text()
    (_fold(env, "nnUNetTrainer", f) / "validation" / "summary.json").write_text("{}")
    assert cli("lowdata", "report", "-d", "42", "--trainers", "nnUNetTrainer") == 2
    assert "summary.json" in capsys.readouterr().err


def test_report_names_stage2_mode(env):
    make_preprocessed(env, 10)
    lay = create_splits(42, [1.0], repeats=1, out=quiet)
    f = lay["folds"][0]["fold"]
    for tr in ("T", "T_scratch"):
        _summary(_fold(env, tr, f) / "validation" / "summary.json", {"1": 0.5}, lay["test"])
    printed = []
    res = ld_report.build_report(42, trainers=["T", "T_scratch"], out=printed.append)
    assert res["stage2"] == ["stage 2 of T: not recorded (not trained with `bsf-nnunet lowdata run`, or before it "
                             "recorded stage 2)"]
    ld_stage2.record_modes(DS, {"T__nnUNetPlans__3d_fullres": ld_stage2.entry("per-fold", "P", None)})
    ld_report.build_report(42, trainers=["T", "T_scratch"], out=printed.append)
    md = (env["nnUNet_results"] / DS / "lowdata_report" / "lowdata_report.md").read_text()
    line = "stage 2 of T: per-fold (each fraction's own training cases, as the original study)"
    assert f"- {line}; stage-2 trainer P" in md and any(p.startswith(line) for p in printed)
    assert "T_scratch:" not in md  # baselines have no stage 2
    ld_stage2.record_modes(DS, {"T__nnUNetPlans__3d_fullres": ld_stage2.entry("shared", None, "/w/s2.pth")})
    assert ld_report.build_report(42, trainers=["T", "T_scratch"], out=quiet)["stage2"] == [
        "stage 2 of T: shared (one pretraining on all non-test cases, so small fractions saw images of cases they do "
        "not train on); fine-tuned from /w/s2.pth"]


def test_lowdata_end_to_end_with_toy_trainers(nnunet_env, prepared, run, tmp_path):
    """splits -> run as local jobs, two at a time (real nnUNetv2_train: the fold's own stage 2 and the scratch
    baseline together, then the fine-tuning from that stage 2) -> status at each step -> report. The trainers skip
    nnU-Net's final validation after training, as the fast demo trainers (BSFTrainer_ToyFast) do: the study runs
    --val for the test-set summary it reports (issue #27)."""
    import glob
    import io
    from pathlib import Path

    env = nnunet_env
    dataset_id, full, _ = prepared("toy1")  # 6 training cases
    run(["bsf-nnunet", "lowdata", "splits", "-d", dataset_id, "--fractions", "0.5", "--repeats", "1",
         "--test-fraction", "0.34", "--seed", "0"], env)  # fold 5: 2 of the 4 non-test cases; fold 6: for shared
    trainers = ["BSFTrainer_CIdemo", "BSFTrainer_CIdemo_scratch"]
    pre = "BSFPretrainTrainer_CIfast"
    status = ["bsf-nnunet", "lowdata", "status", "-d", dataset_id, "--trainers", *trainers, "--pretrain-trainer", pre]
    rows = json.loads(run(status + ["--json"], env))
    assert [(r["trainer"], r["status"]) for r in rows] == [(pre, "not started"), (trainers[0], "not started"),
                                                          (trainers[1], "not started")]
    out = run(["bsf-nnunet", "lowdata", "run", "-d", dataset_id, "--trainers", *trainers, "--device", "cpu",
               "--pretrain-trainer", pre, "--executor", "local", "--max-parallel", "2"], env)
    events = [line.split("] ", 1)[1] for line in out.splitlines() if ": started (local job" in line
              or ": finished (" in line]
    events = [e.split(": ")[0] + (" +" if "started" in e else " -") for e in events]
    assert events[:2] == [f"fold 5 (50%, repeat 0) {pre} (stage-2 pretraining) +",
                          f"fold 5 (50%, repeat 0) {trainers[1]} +"]  # two at a time
    assert events.index(f"fold 5 (50%, repeat 0) {trainers[0]} +") > \
        events.index(f"fold 5 (50%, repeat 0) {pre} (stage-2 pretraining) -")  # after its stage 2
    assert "3 trainings: 0 already done, ran 3" in out
    rows = json.loads(run(status + ["--json"], env))
    assert [r["status"] for r in rows] == ["done"] * 3 and all(r["job"].startswith("local ") for r in rows)
    results = os.path.join(env["nnUNet_results"], full)
    stage2 = os.path.join(results, f"{pre}__nnUNetPlans__3d_fullres", "fold_5", "checkpoint_best.pth")
    assert os.path.isfile(stage2.replace("best", "final"))
    assert not os.path.isdir(os.path.join(results, f"{pre}__nnUNetPlans__3d_fullres", "fold_6"))
    log_files = glob.glob(os.path.join(results, f"{trainers[0]}__nnUNetPlans__3d_fullres", "fold_5",
                                       "training_log_*.txt"))
    assert len(log_files) == 2  # the training, then its --val
    log = "".join(Path(f).read_text() for f in log_files)
    assert f"Initialised from {stage2}" in log  # the fine-tuning starts from the fold's own stage 2
    assert "skips the final validation after training" in log  # ... and the study validated it with --val:
    for tr in trainers:
        fold = os.path.join(results, f"{tr}__nnUNetPlans__3d_fullres", "fold_5")
        assert os.path.isfile(os.path.join(fold, "validation", "summary.json"))
    # a second run has nothing left to do
    out = run(["bsf-nnunet", "lowdata", "run", "-d", dataset_id, "--trainers", *trainers, "--device", "cpu",
               "--dry-run", "--pretrain-trainer", pre], env)
    assert "3 trainings (1 of them stage-2 pretrainings): 3 already done, would run 0" in out
    report_dir = tmp_path / "report"
    run(["bsf-nnunet", "lowdata", "report", "-d", dataset_id, "--trainers", *trainers, "--pretrained", trainers[0],
         "--baseline", trainers[1], "--out", str(report_dir)], env)
    assert sorted(os.listdir(report_dir)) == ["lowdata_dice.png", "lowdata_report.md", "lowdata_results.csv"]
    rows = list(csv.DictReader(io.StringIO((report_dir / "lowdata_results.csv").read_text())))
    assert {(r["trainer"], float(r["fraction"])) for r in rows} == {(t, 0.5) for t in trainers}
    md = (report_dir / "lowdata_report.md").read_text()
    assert f"stage 2 of {trainers[0]}: per-fold (each fraction's own training cases, as the original study)" in md


def test_device_auto_and_a_missing_cuda_is_one_clear_line(env, capsys, monkeypatch):
    """Issue #32: --device auto (the default) picks CUDA where PyTorch sees it, else the CPU (logged); --device cuda
    on a machine without CUDA is one line naming the fix, before anything runs."""
    from bsf_nnunet import devices

    lines = []
    monkeypatch.setattr(devices, "_cuda_available", lambda: False)
    assert devices.resolve_device("auto", out=lines.append) == "cpu" and "sees no CUDA GPU" in lines[-1]
    assert devices.resolve_device("auto", "slurm", out=lines.append) == "cuda"  # the jobs' nodes, not this one
    assert devices.resolve_device("cpu") == "cpu"
    monkeypatch.setattr(devices, "_cuda_available", lambda: True)
    assert devices.resolve_device("auto", out=lines.append) == "cuda"
    monkeypatch.setattr(devices, "_cuda_available", lambda: False)
    make_preprocessed(env, 10)
    create_splits(42, [1.0], repeats=1, out=quiet)
    assert cli("lowdata", "run", "-d", "42", "--trainers", "T_scratch", "--device", "cuda") == 2
    err = capsys.readouterr().err
    assert "--device cuda, but PyTorch sees no CUDA GPU on this machine" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err
    assert cli("lowdata", "run", "-d", "42", "--trainers", "T_scratch", "--dry-run") == 0
    out = capsys.readouterr().out
    assert "device: cpu (--device auto" in out and "-device cpu" in out
