"""Reliability guards of the BSF trainers (issue #18): one run per fold (a lock that dies with its owner), no
NaN/Inf voxels in the raw images (which SimpleITK reads as 0), and a truncated preprocessed case named with its fix
(in the trainers' data loading and in ``bsf-nnunet check --preprocessed``)."""
import json
import multiprocessing as mp
import os
import socket
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
import torch

from bsf_nnunet.cli.main import main as cli_main
from bsf_nnunet.datasets.check import count_nonfinite_voxels, preprocessed_case_problems
from bsf_nnunet.training import guards
from bsf_nnunet.training.data import BSFDatasetBlosc2, BSFDatasetNumpy, PreprocessedCaseError
from bsf_nnunet.training.guards import FoldBusyError, RawDataError, check_raw_images, hold_fold_lock, release_fold_lock

pytestmark = pytest.mark.fault_matrix  # issue #18's fault matrix: python -m pytest -n 2 -m fault_matrix

FINITE_STAMP_NAME, FOLD_LOCK_NAME = guards.FINITE_STAMP_NAME, guards.FOLD_LOCK_NAME


def _nifti(path, arr):
    os.makedirs(os.path.dirname(str(path)), exist_ok=True)
    nib.save(nib.Nifti1Image(arr, np.eye(4)), str(path))


def _raw_dataset(root, nan_case=None, cases=("a", "b", "c")):
    """A raw dataset of 8^3 float images and uint8 labels; ``nan_case`` gets NaN and Inf voxels in its image."""
    folder = root / "Dataset990_Guard"
    for i, case in enumerate(cases):
        img = np.random.default_rng(i).normal(size=(8, 8, 8)).astype(np.float32)
        if case == nan_case:
            img[1, 2, 3], img[7, 7, 7] = np.nan, np.inf
        _nifti(folder / "imagesTr" / f"{case}_0000.nii.gz", img)
        _nifti(folder / "labelsTr" / f"{case}.nii.gz", (img > 0).astype(np.uint8))
    (folder / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "T1"}, "labels": {"background": 0, "x": 1}, "numTraining": len(cases),
        "file_ending": ".nii.gz"}))
    return folder


# ---------------------------------------------------------------------------------------------------------------
# row 2: one run per fold


HOLDER = """
import sys, time
from bsf_nnunet.training.guards import hold_fold_lock
hold_fold_lock(sys.argv[1], "BSFTrainer_Holder", print)
print("held", flush=True)
time.sleep(600)
"""


@pytest.fixture
def holder():
    """start(folder): a child process that holds the fold lock of ``folder`` until it is killed."""
    procs = []

    def start(folder):
        p = subprocess.Popen([sys.executable, "-c", HOLDER, str(folder)], stdout=subprocess.PIPE, text=True)
        procs.append(p)
        assert p.stdout.readline().strip() == "held"
        return p

    yield start
    for p in procs:
        p.kill()
        p.wait()


def test_fold_lock_refuses_a_second_run_and_is_free_once_the_owner_is_dead(tmp_path, holder):
    fold = tmp_path / "fold_0"
    owner = holder(fold)
    with pytest.raises(FoldBusyError) as e:
        hold_fold_lock(str(fold), "BSFTrainer_Toy", print)
    msg = str(e.value)
    for part in (f"host {socket.gethostname()}", f"pid {owner.pid}", "BSFTrainer_Holder", "--c", "--val",
                 "nothing to delete"):
        assert part in msg, part

    owner.kill()  # SIGKILL: no clean-up, the kernel drops the lock with the process
    owner.wait()
    path = hold_fold_lock(str(fold), "BSFTrainer_Toy", print)
    try:
        assert path == str(fold / FOLD_LOCK_NAME)
        assert hold_fold_lock(str(fold), "BSFTrainer_Toy", print) == path  # again in the same process: no-op
    finally:
        release_fold_lock(path)
    # read only now: closing any descriptor of the file would drop this process's lock
    assert json.loads(open(path).read())["pid"] == os.getpid()


class _Rank1:
    local_rank = 1  # a DDP rank other than 0: rank 0 holds the lock and checks the data for the whole run


def test_before_training_does_nothing_on_other_ranks():
    guards.before_training(_Rank1())  # would fail on the missing attributes if it did anything


# ---------------------------------------------------------------------------------------------------------------
# row 10: NaN/Inf voxels in the raw images


def test_chunked_nonfinite_count(tmp_path):
    arr = np.zeros((6, 5, 40), np.float32)
    arr[0, 0, 0], arr[5, 4, 39], arr[2, 2, 17] = np.nan, np.inf, -np.inf
    _nifti(tmp_path / "f.nii.gz", arr)
    assert count_nonfinite_voxels(str(tmp_path / "f.nii.gz"), chunk_bytes=6 * 5 * 8 * 3) == (3, arr.size)
    _nifti(tmp_path / "i.nii.gz", np.ones((4, 4, 4), np.int16))
    assert count_nonfinite_voxels(str(tmp_path / "i.nii.gz")) == (0, 64)


def test_raw_check_refuses_nan_images_and_names_them(tmp_path):
    raw = _raw_dataset(tmp_path / "raw", nan_case="b")
    stamps = tmp_path / "pre"
    stamps.mkdir()
    with pytest.raises(RawDataError) as e:
        check_raw_images(str(raw), str(stamps), print, "re-run nnUNetv2_plan_and_preprocess -d 990")
    msg = str(e.value)
    assert "case b: imagesTr/b_0000.nii.gz has 2 NaN/Inf voxel(s)" in msg
    assert "case a" not in msg and "case c" not in msg
    for part in ("SimpleITK", "nnUNetv2_plan_and_preprocess -d 990", f"bsf-nnunet check -d {raw}",
                 "BSF_SKIP_RAW_CHECK=1"):
        assert part in msg, part
    assert not (stamps / FINITE_STAMP_NAME).exists()


def test_raw_check_stamp_skip_variable_and_missing_raw(tmp_path, monkeypatch):
    raw = _raw_dataset(tmp_path / "raw")
    stamps = tmp_path / "pre"
    stamps.mkdir()
    calls, logged = [], []
    real = guards.count_nonfinite_voxels
    monkeypatch.setattr(guards, "count_nonfinite_voxels", lambda p: calls.append(p) or real(p))

    check_raw_images(str(raw), str(stamps), logged.append, "")
    assert len(calls) == 6  # 3 images + 3 labels
    assert json.loads((stamps / FINITE_STAMP_NAME).read_text())["files"]
    check_raw_images(str(raw), str(stamps), logged.append, "")  # later runs and folds: the stamp matches
    assert len(calls) == 6

    arr = np.zeros((8, 8, 8), np.float32)
    arr[0, 0, 0] = np.nan
    _nifti(raw / "imagesTr" / "c_0000.nii.gz", arr)  # a changed file invalidates the stamp
    with pytest.raises(RawDataError, match="case c: imagesTr/c_0000.nii.gz"):
        check_raw_images(str(raw), str(stamps), logged.append, "")

    monkeypatch.setenv("BSF_SKIP_RAW_CHECK", "1")
    calls.clear()
    check_raw_images(str(raw), str(stamps), logged.append, "")
    assert not calls and "skipped (BSF_SKIP_RAW_CHECK is set)" in logged[-1]
    monkeypatch.delenv("BSF_SKIP_RAW_CHECK")

    check_raw_images(str(tmp_path / "raw" / "Dataset991_Gone"), str(stamps), logged.append, "")
    assert not calls and "no raw dataset at" in logged[-1]


def test_raw_check_follows_dataset_json_file_lists(tmp_path):
    raw = _raw_dataset(tmp_path / "raw", cases=("a",))
    elsewhere = tmp_path / "elsewhere"
    arr = np.ones((8, 8, 8), np.float32)
    arr[3, 3, 3] = np.nan
    _nifti(elsewhere / "z_t1.nii.gz", arr)
    dj = json.loads((raw / "dataset.json").read_text())
    dj["dataset"] = {"z": {"images": [str(elsewhere / "z_t1.nii.gz")], "label": "labelsTr/a.nii.gz"}}
    (raw / "dataset.json").write_text(json.dumps(dj))
    with pytest.raises(RawDataError, match="case z: .*z_t1.nii.gz has 1 NaN/Inf"):
        check_raw_images(str(raw), str(tmp_path), print, "")


# ---------------------------------------------------------------------------------------------------------------
# the trainers: guards at the start of training, the explaining dataset class


@pytest.fixture
def toy(nnunet_env, prepared, monkeypatch):
    """The prepared toy dataset with this process's nnU-Net paths pointing at it; trainer(cls) builds one."""
    _, full, raw = prepared("toy1")
    for k in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        monkeypatch.setenv(k, nnunet_env[k])
    pre = os.path.join(nnunet_env["nnUNet_preprocessed"], full)

    def trainer(cls_name="BSFTrainer_Toy", fold=0):
        from nnunetv2.run.run_training import get_trainer_from_args

        return get_trainer_from_args("994", "3d_fullres", fold, cls_name, device=torch.device("cpu"))

    return dict(raw=raw, pre=pre, data=os.path.join(pre, "nnUNetPlans_3d_fullres"), trainer=trainer)


def test_trainer_start_refuses_busy_fold_then_nan_raw_image(toy, holder):
    trainer = toy["trainer"]()
    owner = holder(trainer.output_folder)
    with pytest.raises(FoldBusyError, match=f"pid {owner.pid}"):
        trainer.on_train_start()
    owner.kill()
    owner.wait()

    arr = np.asanyarray(nib.load(os.path.join(toy["raw"], "imagesTr", "case_003_0000.nii.gz")).dataobj).copy()
    arr[10, 10, 10] = np.nan
    _nifti(os.path.join(toy["raw"], "imagesTr", "case_003_0000.nii.gz"), arr)
    try:
        with pytest.raises(RawDataError, match="case case_003: imagesTr/case_003_0000.nii.gz has 1 NaN/Inf"):
            trainer.on_train_start()
        assert not trainer.was_initialized  # refused before building anything
        assert "nnUNetv2_plan_and_preprocess -d 994 -c 3d_fullres" in open(trainer.log_file).read()
    finally:
        release_fold_lock(getattr(trainer, "bsf_fold_lock", None))


@pytest.mark.parametrize("cls_name", ["BSFTrainer_Toy", "BSFPretrainTrainer_Toy"])
def test_trainers_guard_their_start_and_load_cases_through_the_explaining_class(toy, monkeypatch, cls_name):
    trainer = toy["trainer"](cls_name)

    class Called(Exception):
        pass

    def guard(t):
        assert t is trainer
        raise Called

    monkeypatch.setattr(guards, "before_training", guard)
    with pytest.raises(Called):
        trainer.on_train_start()
    trainer.initialize()  # what --val and -pretrained_weights do: no lock taken
    assert not os.path.exists(os.path.join(trainer.output_folder, FOLD_LOCK_NAME))
    assert trainer.dataset_class is BSFDatasetBlosc2


# ---------------------------------------------------------------------------------------------------------------
# row 4: a truncated or corrupt preprocessed case


def _truncate(path, keep=0.5):
    with open(path, "r+b") as f:
        f.truncate(int(os.path.getsize(path) * keep))


def _load_in_worker(q, dataset, case):
    try:
        dataset.load_case(case)
        q.put("loaded")
    except PreprocessedCaseError as e:
        q.put(str(e))


def test_truncated_preprocessed_case_is_named_by_loader_and_check(toy, capsys):
    data = toy["data"]
    _truncate(os.path.join(data, "case_001.b2nd"))
    os.remove(os.path.join(data, "case_004.pkl"))

    ds = BSFDatasetBlosc2(data, ["case_000", "case_001"])
    assert ds.load_case("case_000")[0].shape[0] == 1
    with pytest.raises(PreprocessedCaseError) as e:
        ds.load_case("case_001")
    msg = str(e.value)
    for part in ("case_001", "case_001.b2nd cannot be read", "truncated or corrupt", "nnUNetv2_preprocess -d 994 -c "
                 "3d_fullres", "--c", "bsf-nnunet check -d 994 --preprocessed -c 3d_fullres"):
        assert part in msg, part
    assert "case_001_seg.b2nd" not in msg and "case_001.pkl" not in msg  # only the bad file is blamed

    # the class pickles to a spawned augmentation worker, where the error is just as clear
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_load_in_worker, args=(q, ds, "case_001"))
    p.start()
    p.join(120)
    assert "case_001.b2nd cannot be read" in q.get(timeout=5)

    assert cli_main(["check", "-d", "994", "--preprocessed", "-c", "3d_fullres"]) == 1
    out = capsys.readouterr().out
    assert "case case_001: case_001.b2nd cannot be read" in out
    assert "case case_004: case_004.pkl is missing" in out
    assert "ERRORS (2)" in out and "nnUNetv2_preprocess -d 994 -c 3d_fullres" in out
    assert cli_main(["check", "-d", "994", "--preprocessed", "-c", "2d_nope"]) == 1
    assert "no configuration '2d_nope'" in capsys.readouterr().out


def test_numpy_layout_case_problems(tmp_path):
    from nnunetv2.training.dataloading.nnunet_dataset import nnUNetDatasetNumpy

    data = np.ones((1, 4, 4, 4), np.float32)
    nnUNetDatasetNumpy.save_case(data, np.zeros((1, 4, 4, 4), np.int8), {"class_locations": {}}, str(tmp_path / "x"))
    assert preprocessed_case_problems(str(tmp_path), "x", "npz") == []
    _truncate(tmp_path / "x.npz")
    assert preprocessed_case_problems(str(tmp_path), "x", "npz")[0].startswith("x.npz cannot be read")
    with pytest.raises(PreprocessedCaseError, match="x.npz cannot be read"):
        BSFDatasetNumpy(str(tmp_path), ["x"]).load_case("x")
