"""Faults at the unit level: a full disk (or quota) during each kind of write, continuing a training (--c) from a
truncated or corrupt checkpoint, and weights holding NaN/Inf. Tiny objects, no nnUNetv2_train run."""
import errno
import json
import os

import nibabel as nib
import numpy as np
import pytest
import torch

from bsf_nnunet import io as bio
from bsf_nnunet.io import DiskFullError

pytestmark = pytest.mark.fault_matrix  # issue #18's fault matrix: python -m pytest -n 2 -m fault_matrix

FAULTS_DS = "Dataset998_Faults"


def _temporaries(folder):
    return [os.path.join(d, n) for d, dirs, files in os.walk(folder) for n in dirs + files if n.startswith(".tmp_")]


def _torch_save_fills_disk(monkeypatch, err=errno.ENOSPC):
    """torch.save writes half of the file, then fails as on a full disk (or an exceeded quota)."""
    real_save = torch.save

    def half_then_full(obj, f, *args, **kwargs):
        real_save(obj, f, *args, **kwargs)
        with open(f, "r+b") as fh:
            fh.truncate(os.path.getsize(f) // 2)
        raise OSError(err, os.strerror(err))

    monkeypatch.setattr(torch, "save", half_then_full)


def _fsync_fills_disk(monkeypatch):
    """Every fsync fails with ENOSPC (where NFS and delayed allocation report a full disk)."""
    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)


def _assert_disk_full_message(e, folder, quota=False):
    msg = str(e)
    assert isinstance(e, OSError) and e.errno in bio.DISK_FULL_ERRNOS
    assert ("quota is exceeded" if quota else "disk is full") in msg
    assert str(folder) in msg and "Free space" in msg and "move nnUNet_results" in msg, msg


# --------------------------------------------------------------------------------------------------- io
def test_atomic_writers_extensions_failures_and_stale_temporaries(tmp_path):
    target = tmp_path / "sub" / "case.nii.gz"
    with bio.atomic_path(target) as tmp:
        assert os.path.basename(tmp).startswith(".tmp_case.nii.gz.") and tmp.endswith(".nii.gz")
        open(tmp, "wb").write(b"new")
    assert target.read_bytes() == b"new"
    with pytest.raises(InterruptedError), bio.atomic_path(target, keep_extension=False) as tmp:
        assert not tmp.endswith(".nii.gz")
        open(tmp, "wb").write(b"half")
        raise InterruptedError("the writer fails")
    assert target.read_bytes() == b"new" and not _temporaries(tmp_path)

    bio.atomic_write_json(tmp_path / "a.json", {"x": 1})
    assert (tmp_path / "a.json").read_text() == '{\n  "x": 1\n}\n'
    folder = tmp_path / "model"
    with bio.atomic_folder(folder) as tmp:
        bio.atomic_write_text(os.path.join(tmp, "old.txt"), "old")
    with pytest.raises(KeyError), bio.atomic_folder(folder) as tmp:
        bio.atomic_write_text(os.path.join(tmp, "new.txt"), "new")
        raise KeyError("boom")
    assert os.listdir(folder) == ["old.txt"] and not _temporaries(tmp_path)
    # a cache filled by parallel processes: a writer that finishes second leaves the first one's folder in place
    with bio.atomic_folder(folder, replace=False) as tmp:
        bio.atomic_write_text(os.path.join(tmp, "late.txt"), "late")
    assert os.listdir(folder) == ["old.txt"] and not _temporaries(tmp_path)
    with bio.atomic_folder(tmp_path / "first", replace=False) as tmp:
        bio.atomic_write_text(os.path.join(tmp, "first.txt"), "first")
    assert os.listdir(tmp_path / "first") == ["first.txt"] and not _temporaries(tmp_path)

    (tmp_path / ".tmp_checkpoint_latest.pth.0123abcd").write_bytes(b"half")
    (tmp_path / ".tmp_model.0123abcd").mkdir()
    bio.remove_stale_temporaries(tmp_path, "checkpoint_")
    assert [os.path.basename(p) for p in _temporaries(tmp_path)] == [".tmp_model.0123abcd"]
    bio.remove_stale_temporaries(tmp_path)
    assert not _temporaries(tmp_path) and (tmp_path / "a.json").is_file()


# --------------------------------------------------------------------------------------------------- disk full
@pytest.mark.parametrize("err", [errno.ENOSPC, errno.EDQUOT])
def test_checkpoint_write_on_full_disk_keeps_the_previous_one(tmp_path, monkeypatch, err):
    path = tmp_path / "fold_0" / "checkpoint_latest.pth"
    bio.atomic_torch_save({"w": torch.ones(1000)}, path)
    _torch_save_fills_disk(monkeypatch, err)
    with pytest.raises(DiskFullError) as e:
        bio.atomic_torch_save({"w": torch.zeros(1000)}, path)
    _assert_disk_full_message(e.value, path.parent, quota=err == errno.EDQUOT)
    assert torch.equal(torch.load(path, weights_only=True)["w"], torch.ones(1000))
    assert not _temporaries(tmp_path)


def test_writers_in_c_that_fail_without_errno(tmp_path, monkeypatch):
    """torch.save (and SimpleITK) report a full disk as a RuntimeError: a probe write tells it from other errors."""
    path = tmp_path / "checkpoint_best.pth"

    def c_writer_fails(obj, f, *args, **kwargs):
        open(f, "wb").write(b"PK half a zip")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")

    monkeypatch.setattr(torch, "save", c_writer_fails)
    with pytest.raises(RuntimeError, match="unexpected pos") as e:
        bio.atomic_torch_save({}, path)
    assert not isinstance(e.value, DiskFullError)  # the disk has room: the error is not disguised
    _fsync_fills_disk(monkeypatch)
    with pytest.raises(DiskFullError):
        bio.atomic_torch_save({}, path)
    assert not path.exists() and not _temporaries(tmp_path)


def test_lowdata_splits_on_full_disk(tmp_path, monkeypatch, capsys):
    from bsf_nnunet.cli.main import main

    pre = tmp_path / "pre"
    monkeypatch.setenv("nnUNet_preprocessed", str(pre))
    data = pre / FAULTS_DS / "nnUNetPlans_3d_fullres"
    data.mkdir(parents=True)
    for i in range(10):
        for suffix in (".b2nd", "_seg.b2nd", ".pkl"):
            (data / f"case_{i:03d}{suffix}").write_bytes(b"")
    assert main(["lowdata", "splits", "-d", FAULTS_DS, "--fractions", "1.0", "--repeats", "1"]) == 0
    files = {n: (pre / FAULTS_DS / n).read_bytes() for n in ("splits_final.json", "lowdata.json")}
    capsys.readouterr()
    _fsync_fills_disk(monkeypatch)
    assert main(["lowdata", "splits", "-d", FAULTS_DS, "--fractions", "0.5", "1.0", "--repeats", "1",
                 "--overwrite"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("bsf-nnunet lowdata splits: error: The disk is full") and str(pre / FAULTS_DS) in err, err
    assert {n: (pre / FAULTS_DS / n).read_bytes() for n in files} == files
    assert not _temporaries(pre)


def _nifti(path, value=1.0):
    nib.save(nib.Nifti1Image(np.full((4, 4, 4), value, np.float32), np.eye(4)), str(path))
    return str(path)


def test_converter_stops_on_full_disk_and_keeps_what_was_finished(tmp_path, monkeypatch):
    from bsf_nnunet.datasets.convert import CaseSpec, DatasetInfo
    from bsf_nnunet.datasets.convert_run import run_conversion

    src = tmp_path / "src"
    src.mkdir()
    info = DatasetInfo(name="Faults", channel_names=["T1"], labels={"background": 0, "lesion": 1})

    def case(name):
        return CaseSpec(name, [_nifti(src / f"{name}_t1.nii.gz")], label=_nifti(src / f"{name}_seg.nii.gz"),
                        label_mode="binarize")

    raw = tmp_path / "raw"
    run_conversion([case("a")], info, 998, str(raw))
    out = raw / FAULTS_DS
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    _fsync_fills_disk(monkeypatch)
    with pytest.raises(DiskFullError) as e:
        run_conversion([case("a"), case("b")], info, 998, str(raw))
    _assert_disk_full_message(e.value, out / "imagesTr")
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before  # case b left no file
    assert json.loads((out / "dataset.json").read_text())["numTraining"] == 1


def _toy_finetuned(path, nan=False):
    from bsf_nnunet.network import BSFSwinUNETR

    torch.manual_seed(0)
    sd = BSFSwinUNETR(4, 3, feature_size=12, depths=(1, 1, 1, 1), num_heads=(3, 6, 12, 24)).state_dict()
    if nan:
        for k in ("swinViT.patch_embed.proj.weight", "encoder1.layer.conv1.conv.weight", "out.conv.conv.bias"):
            sd[k][0] = float("nan") if k.startswith("swin") else float("inf")
    torch.save({"state_dict": sd}, path)
    return str(path)


def _import_model(ckpt, results, **kwargs):
    from bsf_nnunet.weights.import_model import import_model

    return import_model(ckpt, 137, ["FLAIR", "T1ce", "T1", "T2"], regions="brats", results=str(results), **kwargs)


def test_import_model_on_full_disk_leaves_no_half_made_model(tmp_path, monkeypatch):
    ckpt, results = _toy_finetuned(tmp_path / "model.pt"), tmp_path / "results"
    real_save = torch.save
    _torch_save_fills_disk(monkeypatch)
    with pytest.raises(DiskFullError) as e:
        _import_model(ckpt, results)
    folder = results / "Dataset137_Imported" / "BSFTrainer_imported__BSFImportedPlans__3d_fullres"
    _assert_disk_full_message(e.value, folder.parent)
    assert not folder.exists() and not _temporaries(results)

    monkeypatch.setattr(torch, "save", real_save)
    _import_model(ckpt, results)
    before = {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    assert len(before) == 4  # plans, dataset, IMPORTED_FROM, fold_all/checkpoint_final
    _torch_save_fills_disk(monkeypatch)
    with pytest.raises(DiskFullError):
        _import_model(ckpt, results, overwrite=True, tta=True)
    assert {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()} == before
    assert not _temporaries(results)


# --------------------------------------------------------------------------------------------------- trainers
@pytest.fixture
def make_trainer(tmp_path, monkeypatch):
    """make_trainer(cls, resume) -> an initialised toy trainer as nnUNetv2_train builds it (resume: --c)."""
    from bsf_nnunet.weights.import_model import _plans

    monkeypatch.setenv("nnUNet_results", str(tmp_path / "results"))
    monkeypatch.setenv("nnUNet_preprocessed", str(tmp_path / "preprocessed"))

    def make(cls, resume):
        plans = dict(_plans(FAULTS_DS, 1, [64, 64, 64], [1.0, 1.0, 1.0], {}), continue_training=resume)
        dataset_json = {"channel_names": {"0": "T1"}, "labels": {"background": 0, "blob": 1}, "numTraining": 2,
                        "file_ending": ".nii.gz"}
        trainer = cls(plans, "3d_fullres", 0, dataset_json, device=torch.device("cpu"))
        os.makedirs(trainer.preprocessed_dataset_folder, exist_ok=True)
        open(os.path.join(trainer.preprocessed_dataset_folder, "case_000.b2nd"), "wb").close()
        trainer.initialize()
        return trainer

    return make


def _truncate(path):
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


def test_trainer_checkpoint_on_full_disk_stops_with_the_message(make_trainer, monkeypatch):
    from bsf_nnunet.training import BSFTrainer_Toy

    trainer = make_trainer(BSFTrainer_Toy, resume=False)
    latest = os.path.join(trainer.output_folder, "checkpoint_latest.pth")
    trainer.save_checkpoint(latest)
    good = open(latest, "rb").read()
    trainer.current_epoch = 3
    _torch_save_fills_disk(monkeypatch)
    with pytest.raises(SystemExit) as e:
        trainer.save_checkpoint(latest)
    assert str(e.value.code).startswith("BSFTrainer_Toy stopped: The disk is full") and trainer.output_folder in \
        str(e.value.code)
    assert open(latest, "rb").read() == good and not _temporaries(trainer.output_folder)
    log = open(trainer.log_file).read()
    assert "The disk is full" in log


def test_continue_skips_corrupt_checkpoints_and_keeps_them(make_trainer, capsys):
    from bsf_nnunet.training import BSFTrainer_Toy

    first = make_trainer(BSFTrainer_Toy, resume=False)
    folder = first.output_folder
    first.current_epoch = 4
    first.save_checkpoint(os.path.join(folder, "checkpoint_best.pth"))
    first.current_epoch = 6
    first.save_checkpoint(os.path.join(folder, "checkpoint_latest.pth"))
    _truncate(os.path.join(folder, "checkpoint_latest.pth"))

    trainer = make_trainer(BSFTrainer_Toy, resume=True)  # nnUNetv2_train ... --c picks checkpoint_latest.pth
    trainer.load_checkpoint(os.path.join(folder, "checkpoint_latest.pth"))
    assert trainer.current_epoch == 5  # from checkpoint_best.pth
    out = capsys.readouterr().out
    assert "checkpoint_latest.pth in " + folder + " is truncated or corrupt" in out
    assert "renamed to checkpoint_latest.pth.corrupt" in out and "Continuing from checkpoint_best.pth (epoch 5)" in out
    assert sorted(f for f in os.listdir(folder) if f.startswith("checkpoint")) == \
        ["checkpoint_best.pth", "checkpoint_latest.pth.corrupt"]

    _truncate(os.path.join(folder, "checkpoint_best.pth"))
    trainer = make_trainer(BSFTrainer_Toy, resume=True)  # only checkpoint_best.pth left, and it is corrupt
    trainer.load_checkpoint(os.path.join(folder, "checkpoint_best.pth"))
    assert trainer.current_epoch == 0
    assert "this training starts from scratch (epoch 0)" in capsys.readouterr().out
    assert sorted(f for f in os.listdir(folder) if f.startswith("checkpoint")) == \
        ["checkpoint_best.pth.corrupt", "checkpoint_latest.pth.corrupt"]


def test_validation_never_falls_back(make_trainer):
    from bsf_nnunet.training import BSFTrainer_Toy
    from bsf_nnunet.weights.loader import CorruptCheckpointError

    trainer = make_trainer(BSFTrainer_Toy, resume=False)  # --val (and --val_best)
    folder = trainer.output_folder
    for name in ("checkpoint_best.pth", "checkpoint_final.pth"):
        trainer.save_checkpoint(os.path.join(folder, name))
    _truncate(os.path.join(folder, "checkpoint_final.pth"))
    for resume in (False, True):  # --val, and --c with a finished (final) training
        with pytest.raises(CorruptCheckpointError, match="checkpoint_final.pth is truncated or corrupt") as e:
            make_trainer(BSFTrainer_Toy, resume=resume).load_checkpoint(os.path.join(folder, "checkpoint_final.pth"))
        assert "move it away" in str(e.value)
    assert os.path.isfile(os.path.join(folder, "checkpoint_final.pth"))  # nothing renamed


def test_pretraining_continues_past_a_corrupt_checkpoint(make_trainer, capsys):
    from bsf_nnunet.training import BSFPretrainTrainer_Toy

    first = make_trainer(BSFPretrainTrainer_Toy, resume=False)
    first.current_epoch = 2
    first.save_checkpoint(os.path.join(first.output_folder, "checkpoint_best.pth"))
    open(os.path.join(first.output_folder, "checkpoint_latest.pth"), "wb").write(b"PK\x03\x04 cut short")
    trainer = make_trainer(BSFPretrainTrainer_Toy, resume=True)
    trainer.load_checkpoint(os.path.join(first.output_folder, "checkpoint_latest.pth"))
    assert trainer.current_epoch == 3
    assert "checkpoint_latest.pth in " in capsys.readouterr().out
    assert os.path.isfile(os.path.join(first.output_folder, "checkpoint_latest.pth.corrupt"))


def test_pretraining_checkpoint_restores_python_random_state(make_trainer):
    """The Python RNG state a pretraining checkpoint stores is restored by --c (it was saved, never restored)."""
    import random

    from bsf_nnunet.training import BSFPretrainTrainer_Toy

    first = make_trainer(BSFPretrainTrainer_Toy, resume=False)
    random.seed(7)
    first.save_checkpoint(os.path.join(first.output_folder, "checkpoint_latest.pth"))
    expected = [random.random() for _ in range(5)]
    random.seed(8)  # another process state
    trainer = make_trainer(BSFPretrainTrainer_Toy, resume=True)
    trainer.load_checkpoint(os.path.join(first.output_folder, "checkpoint_latest.pth"))
    assert [random.random() for _ in range(5)] == expected


# --------------------------------------------------------------------------------------------------- NaN/Inf
def test_transfer_weights_refuses_non_finite_weights(tmp_path):
    from bsf_nnunet.network import BSFSwinUNETR
    from bsf_nnunet.weights import load_checkpoint, transfer_weights
    from bsf_nnunet.weights.loader import NonFiniteWeightsError

    path = _toy_finetuned(tmp_path / "nan.pt", nan=True)
    model = BSFSwinUNETR(4, 3, feature_size=12, depths=(1, 1, 1, 1), num_heads=(3, 6, 12, 24))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(NonFiniteWeightsError) as e:
        transfer_weights(model, load_checkpoint(path), source_channels=["FLAIR", "T1ce", "T1", "T2"],
                         target_channels=["FLAIR", "T1ce", "T1", "T2"])
    msg = str(e.value)
    assert f"Checkpoint {path} holds NaN/Inf values in 3 tensor(s)" in msg
    assert "swinViT.patch_embed.proj.weight" in msg and "out.conv.conv.bias" in msg and "nothing was loaded" in msg
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_import_model_refuses_non_finite_weights_and_writes_nothing(tmp_path, monkeypatch, capsys):
    from bsf_nnunet.cli.main import main

    ckpt = _toy_finetuned(tmp_path / "nan.pt", nan=True)
    monkeypatch.setenv("nnUNet_results", str(tmp_path / "results"))
    assert main(["import-model", ckpt, "-d", "137", "--channels", "FLAIR,T1ce,T1,T2", "--regions", "brats"]) == 2
    assert f"bsf-nnunet import-model: error: Checkpoint {ckpt} holds NaN/Inf values in 3 tensor(s)" in \
        capsys.readouterr().err
    assert not (tmp_path / "results").exists()
