"""Dataset converters (bsf-nnunet convert ...) on tiny synthetic trees in the real layouts."""
import json
import os

import nibabel as nib
import numpy as np
import pytest
from cli_helpers import run_subcommand

from bsf_nnunet.cli import convert as cli_convert

SHAPE = (10, 11, 12)
AFF = np.array([[1.0, 0, 0, -5], [0, 1.2, 0, 3], [0, 0, 2.0, 7], [0, 0, 0, 1]])
MODS = ["flair", "t1", "t1ce", "t2"]
# value offsets per modality, to check the channel order FLAIR, T1ce, T1, T2
OFFSET = {"flair": 100, "t1ce": 200, "t1": 300, "t2": 400}


def save(path, arr, affine=AFF):
    os.makedirs(os.path.dirname(str(path)), exist_ok=True)
    nib.save(nib.Nifti1Image(arr, affine), str(path))


def load(path):
    img = nib.load(str(path))
    return np.asanyarray(img.dataobj), img.affine


def cli(*argv):
    return run_subcommand(cli_convert, *argv)


@pytest.fixture
def raw(tmp_path, monkeypatch):
    r = tmp_path / "raw"
    monkeypatch.setenv("nnUNet_raw", str(r))
    return r


def brats_seg(shape=SHAPE, values=(1, 2, 4)):
    s = np.zeros(shape, np.uint8)
    s[2:4, 2:8, 2:8] = values[1]      # ED
    s[4:6, 3:7, 3:7] = values[0]      # NCR
    s[6:8, 4:6, 4:6] = values[2]      # ET
    return s


def make_brats_case(src, case, seg=True, skip=(), shapes=None, nan_in=None, seg_values=(1, 2, 4)):
    d = src / case
    rng = np.random.default_rng(abs(hash(case)) % 2 ** 32)
    for mod in MODS:
        if mod in skip:
            continue
        shape = (shapes or {}).get(mod, SHAPE)
        a = (rng.random(shape) + OFFSET[mod]).astype(np.float32)
        if nan_in == mod:
            a[1, 1, 1] = np.nan
        save(d / f"{case}_{mod}.nii.gz", a)
    if seg:
        save(d / f"{case}_seg.nii.gz", brats_seg(values=seg_values))


def report_of(folder):
    with open(folder / "conversion_report.json") as f:
        return json.load(f)


def dataset_json(folder):
    with open(folder / "dataset.json") as f:
        return json.load(f)


def test_brats2021_good_and_bad_cases(tmp_path, raw, capsys):
    src = tmp_path / "BraTS2021_Training"
    make_brats_case(src, "BraTS2021_00000")
    make_brats_case(src, "BraTS2021_00001")
    make_brats_case(src, "BraTS2021_00002", skip=("t2",))
    make_brats_case(src, "BraTS2021_00003", shapes={"t1": (10, 11, 11)})
    make_brats_case(src, "BraTS2021_00004", nan_in="flair")
    make_brats_case(src, "BraTS2021_00005", seg_values=(1, 2, 3))
    assert cli("convert", "brats2021", src, "-d", 137, "-j", 1) == 1
    out = raw / "Dataset137_BraTS2021"
    dj = dataset_json(out)
    assert dj["channel_names"] == {"0": "FLAIR", "1": "T1ce", "2": "T1", "3": "T2"}
    assert dj["labels"] == {"background": 0, "whole_tumor": [1, 2, 3], "tumor_core": [1, 3],
                            "enhancing_tumor": [3]}
    assert dj["regions_class_order"] == [2, 1, 3]
    assert dj["numTraining"] == 2 and dj["file_ending"] == ".nii.gz"
    assert sorted(os.listdir(out / "labelsTr")) == ["BraTS2021_00000.nii.gz", "BraTS2021_00001.nii.gz"]
    assert len(os.listdir(out / "imagesTr")) == 8
    # channel order and label remap, geometry kept
    for i, mod in enumerate(["flair", "t1ce", "t1", "t2"]):
        a, aff = load(out / "imagesTr" / f"BraTS2021_00000_{i:04d}.nii.gz")
        assert OFFSET[mod] <= a.min() < OFFSET[mod] + 1 and np.allclose(aff, AFF)
    lab, aff = load(out / "labelsTr" / "BraTS2021_00000.nii.gz")
    assert np.allclose(aff, AFF) and lab.dtype == np.uint8
    np.testing.assert_array_equal(lab, np.where(brats_seg() == 4, 3, brats_seg()))
    rep = report_of(out)
    assert rep["counts"]["converted"] == 2 and rep["counts"]["bad"] == 4
    bad = {b["case"]: b for b in rep["bad"]}
    assert set(bad) == {"BraTS2021_00002", "BraTS2021_00003", "BraTS2021_00004", "BraTS2021_00005"}
    assert "T2" in bad["BraTS2021_00002"]["reason"] and "missing" in bad["BraTS2021_00002"]["reason"]
    assert "shape" in bad["BraTS2021_00003"]["reason"]
    assert "NaN" in bad["BraTS2021_00004"]["reason"] and "flair" in bad["BraTS2021_00004"]["reason"]
    assert "[3]" in bad["BraTS2021_00005"]["reason"] and "0, 1 (NCR)" in bad["BraTS2021_00005"]["hint"]
    assert all(b["hint"] for b in rep["bad"])
    printed = capsys.readouterr()
    assert "BraTS2021_00004" in printed.err and "numTraining = 2" in printed.out


def test_brats2021_regions_match_nnunet(tmp_path, raw):
    """nnU-Net's LabelManager accepts the dataset.json and turns the region outputs back into NCR/ED/ET."""
    from nnunetv2.utilities.label_handling.label_handling import LabelManager
    src = tmp_path / "src"
    make_brats_case(src, "BraTS2021_00000")
    assert cli("convert", "brats2021", src, "-d", 1, "-j", 1) == 0
    out = raw / "Dataset001_BraTS2021"
    dj = dataset_json(out)
    lm = LabelManager(dj["labels"], regions_class_order=dj["regions_class_order"])
    assert lm.has_regions and lm.all_labels == [0, 1, 2, 3]
    lab, _ = load(out / "labelsTr" / "BraTS2021_00000.nii.gz")
    probs = np.stack([np.isin(lab, r).astype(np.float32) for r in lm.all_regions])
    np.testing.assert_array_equal(lm.convert_probabilities_to_segmentation(probs), lab)


def test_brats2021_resume_and_partial_case(tmp_path, raw):
    src = tmp_path / "src"
    for c in ("BraTS2021_00000", "BraTS2021_00001"):
        make_brats_case(src, c)
    assert cli("convert", "brats2021", src, "-d", 5, "-j", 1) == 0
    out = raw / "Dataset005_BraTS2021"
    os.remove(out / "imagesTr" / "BraTS2021_00000_0002.nii.gz")     # an interrupted case
    (out / "labelsTr" / ".tmp_x.nii.gz.0123abcd").write_bytes(b"half")  # a temp file of a killed run
    keep = out / "imagesTr" / "BraTS2021_00001_0000.nii.gz"
    st = os.stat(keep)
    assert cli("convert", "brats2021", src, "-d", 5, "-j", 1) == 0
    rep = report_of(out)
    assert rep["converted"] == ["BraTS2021_00000"] and rep["done_before"] == ["BraTS2021_00001"]
    assert os.stat(keep).st_mtime_ns == st.st_mtime_ns                 # finished case untouched
    assert (out / "imagesTr" / "BraTS2021_00000_0002.nii.gz").exists()
    assert not any(n.startswith(".tmp_") for d in ("imagesTr", "labelsTr") for n in os.listdir(out / d))
    assert dataset_json(out)["numTraining"] == 2


def test_brats2021_dry_run_writes_nothing(tmp_path, raw, capsys):
    src = tmp_path / "src"
    make_brats_case(src, "BraTS2021_00000")
    make_brats_case(src, "BraTS2021_00001", skip=("flair",))
    assert cli("convert", "brats2021", src, "-d", 5, "--dry-run") == 1
    assert not raw.exists()
    out = capsys.readouterr().out
    assert "would convert BraTS2021_00000" in out and "would skip BraTS2021_00001" in out


def test_brats2021_link_and_validation_layout(tmp_path, raw):
    src = tmp_path / "train"
    make_brats_case(src, "BraTS2021_00000")
    assert cli("convert", "brats2021", src, "-d", 7, "--link", "-j", 1) == 0
    out = raw / "Dataset007_BraTS2021"
    img = out / "imagesTr" / "BraTS2021_00000_0000.nii.gz"
    assert os.path.samefile(img, src / "BraTS2021_00000" / "BraTS2021_00000_flair.nii.gz")
    lab = out / "labelsTr" / "BraTS2021_00000.nii.gz"
    assert not os.path.samefile(lab, src / "BraTS2021_00000" / "BraTS2021_00000_seg.nii.gz")  # remapped: written
    assert 3 in load(lab)[0] and 4 not in load(lab)[0]
    # validation data (no seg) into imagesTs of the same dataset, with symlinks
    val = tmp_path / "val"
    make_brats_case(val, "BraTS2021_01000", seg=False)
    assert cli("convert", "brats2021", val, "-d", 7, "--link", "symlink", "-j", 1) == 0
    ts = out / "imagesTs" / "BraTS2021_01000_0003.nii.gz"
    assert ts.is_symlink() and OFFSET["t2"] <= load(ts)[0].min()
    assert dataset_json(out)["numTraining"] == 1
    assert report_of(out)["counts"]["test"] == 1


def test_brats2021_back(tmp_path):
    pred = tmp_path / "pred"
    a = np.zeros(SHAPE, np.uint8)
    a[1, 1, 1], a[2, 2, 2], a[3, 3, 3] = 1, 2, 3
    save(pred / "BraTS2021_01000.nii.gz", a)
    save(pred / "BraTS2021_01001.nii.gz", np.where(a == 3, 4, a).astype(np.uint8))   # already BraTS labels
    assert cli("convert", "brats2021-back", pred, tmp_path / "sub", "-j", 1) == 1
    b, aff = load(tmp_path / "sub" / "BraTS2021_01000.nii.gz")
    assert np.allclose(aff, AFF)
    np.testing.assert_array_equal(b, np.where(a == 3, 4, a))
    assert not (tmp_path / "sub" / "BraTS2021_01001.nii.gz").exists()


def test_clear_errors(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("nnUNet_raw", raising=False)
    src = tmp_path / "src"
    make_brats_case(src, "BraTS2021_00000")
    assert cli("convert", "brats2021", src, "-d", 5) == 2
    assert "nnUNet_raw" in capsys.readouterr().err
    (tmp_path / "raw" / "Dataset005_Other").mkdir(parents=True)
    assert cli("convert", "brats2021", src, "-d", 5, "-o", tmp_path / "raw") == 2
    assert "Dataset005_Other" in capsys.readouterr().err
    assert cli("convert", "brats2021", tmp_path / "nope", "-d", 6, "-o", tmp_path / "raw") == 2
    assert "nope" in capsys.readouterr().err
    assert cli("convert", "brats2021", tmp_path / "raw", "-d", 6, "-o", tmp_path / "raw") == 2
    assert "no cases found" in capsys.readouterr().err


def atlas_files(root, sub, mask=None, t1_shape=SHAPE, mask_shape=SHAPE):
    d = root / f"sub-{sub}" / "ses-1" / "anat"
    pre = f"sub-{sub}_ses-1_space-MNI152NLin2009aSym"
    save(d / f"{pre}_T1w.nii.gz", np.random.default_rng(0).random(t1_shape).astype(np.float32))
    if mask is not None:
        m = np.zeros(mask_shape, np.float32)
        m[2:5, 2:5, 2:5] = mask
        save(d / f"{pre}_label-L_desc-T1lesion_mask.nii.gz", m)


def test_atlas2(tmp_path, raw):
    src = tmp_path / "ATLAS_2"
    atlas_files(src / "Training" / "R001", "r001s001", mask=255.0)           # binarised
    atlas_files(src / "Training" / "R001", "r001s002", mask=1.0)
    atlas_files(src / "Training" / "R002", "r002s001", mask=1.0, mask_shape=(10, 11, 13))
    atlas_files(src / "Testing" / "R003", "r003s001")                        # no mask -> imagesTs
    assert cli("convert", "atlas2", src, "-d", 220, "-j", 1) == 1
    out = raw / "Dataset220_ATLAS2"
    dj = dataset_json(out)
    assert dj["channel_names"] == {"0": "T1"} and dj["labels"] == {"background": 0, "lesion": 1}
    assert dj["numTraining"] == 2
    lab, aff = load(out / "labelsTr" / "sub-r001s001_ses-1.nii.gz")
    assert set(np.unique(lab)) == {0, 1} and lab.sum() == 27 and np.allclose(aff, AFF)
    assert (out / "imagesTs" / "sub-r003s001_ses-1_0000.nii.gz").exists()
    rep = report_of(out)
    assert [b["case"] for b in rep["bad"]] == ["sub-r002s001_ses-1"] and "shape" in rep["bad"][0]["reason"]


def ukb_subject(root, eid, t1=True, flair=True, flair_dir=True):
    rng = np.random.default_rng(int(eid))
    t1a = np.zeros(SHAPE, np.float32)
    t1a[2:8, 2:8, 2:8] = rng.random((6, 6, 6)) + 1
    fl = np.zeros(SHAPE, np.float32)
    fl[3:9, 3:9, 3:9] = rng.random((6, 6, 6)) + 1
    if t1:
        save(root / f"{eid}_20252_2_0" / "T1" / "T1_brain_to_MNI.nii.gz", t1a)
    if flair:
        save(root / f"{eid}_20253_2_0" / "T2_FLAIR" / "T2_FLAIR_brain_to_MNI.nii.gz", fl)
    elif flair_dir:
        (root / f"{eid}_20253_2_0" / "T2_FLAIR").mkdir(parents=True)
    return (t1a != 0) | (fl != 0)


def test_ukb(tmp_path, raw):
    src = tmp_path / "ukb"
    mask = ukb_subject(src, "1000001")
    ukb_subject(src, "1000002", flair=False, flair_dir=False)
    ukb_subject(src, "1000003", flair=False)
    ukb_subject(src, "1000004")
    assert cli("convert", "ukb", src, "-d", 300, "-j", 1) == 1
    out = raw / "Dataset300_UKB"
    dj = dataset_json(out)
    assert dj["channel_names"] == {"0": "T1", "1": "FLAIR"} and dj["labels"] == {"background": 0, "brain": 1}
    assert dj["numTraining"] == 2
    lab, aff = load(out / "labelsTr" / "1000001_2_0.nii.gz")
    np.testing.assert_array_equal(lab, mask.astype(np.uint8))
    assert np.allclose(aff, AFF)
    assert load(out / "imagesTr" / "1000001_2_0_0001.nii.gz")[0][3:9, 3:9, 3:9].min() >= 1   # FLAIR second
    bad = {b["case"]: b["reason"] for b in report_of(out)["bad"]}
    assert set(bad) == {"1000002_2_0", "1000003_2_0"}
    assert "FLAIR" in bad["1000002_2_0"] and "T2_FLAIR_brain_to_MNI" in bad["1000003_2_0"]
    # zipped downloads only: a clear error
    z = tmp_path / "zips"
    z.mkdir()
    (z / "1000001_20252_2_0.zip").write_bytes(b"PK")
    assert cli("convert", "ukb", z, "-d", 301, "-j", 1) == 2


def test_unlabeled_folders_pattern_and_parallel(tmp_path, raw):
    rng = np.random.default_rng(1)

    def img():
        a = np.zeros(SHAPE, np.float32)
        a[2:7, 2:7, 2:7] = rng.random((5, 5, 5)) + 1
        return a

    # one subfolder per subject, names containing the channel names
    src = tmp_path / "coll"
    for s in ("s01", "s02", "s03"):
        save(src / s / f"{s}_T1w.nii.gz", img())
        save(src / s / f"{s}_t2_flair.nii.gz", img())
    save(src / "s04" / "s04_T1w.nii.gz", img())                        # FLAIR missing
    save(src / "s05" / "t1_run1.nii.gz", img())                         # ambiguous T1
    save(src / "s05" / "t1_run2.nii.gz", img())
    save(src / "s05" / "flair.nii.gz", img())
    save(src / "s06" / "T1.nii.gz", img())                              # NaN voxels
    bad = img()
    bad[0, 0, 0] = np.inf
    save(src / "s06" / "FLAIR.nii.gz", bad)
    assert cli("convert", "unlabeled", src, "-d", 400, "--channels", "T1", "FLAIR", "-j", 2) == 1
    out = raw / "Dataset400_Unlabeled"
    assert dataset_json(out)["numTraining"] == 3
    bad = {b["case"]: b["reason"] for b in report_of(out)["bad"]}
    assert set(bad) == {"s04", "s05", "s06"}
    assert "FLAIR" in bad["s04"] and "several files" in bad["s05"] and "NaN" in bad["s06"]
    lab = load(out / "labelsTr" / "s01.nii.gz")[0]
    assert lab.sum() == 125 and set(np.unique(lab)) == {0, 1}
    # flat folder with a filename pattern
    flat = tmp_path / "flat"
    for s in ("a1", "a2"):
        save(flat / f"{s}_T1.nii.gz", img())
        save(flat / f"{s}_FLAIR.nii.gz", img())
    save(flat / "a3_T1.nii.gz", img())
    assert cli("convert", "unlabeled", flat, "-d", 401, "--channels", "T1", "FLAIR", "--name", "Flat",
               "--pattern", "{subject}_{channel}.nii.gz", "-j", 1) == 1
    out = raw / "Dataset401_Flat"
    assert sorted(os.listdir(out / "labelsTr")) == ["a1.nii.gz", "a2.nii.gz"]
    assert [b["case"] for b in report_of(out)["bad"]] == ["a3"]
    assert cli("convert", "unlabeled", flat, "-d", 402, "--channels", "T1", "--pattern", "{subject}.nii.gz") == 2


def test_nnunet_verify_dataset_integrity(tmp_path, raw):
    """nnU-Net's own dataset check passes on a converted dataset."""
    from nnunetv2.experiment_planning.verify_dataset_integrity import verify_dataset_integrity
    src = tmp_path / "src"
    make_brats_case(src, "BraTS2021_00000")
    make_brats_case(src, "BraTS2021_00001")
    assert cli("convert", "brats2021", src, "-d", 9, "-j", 1) == 0
    verify_dataset_integrity(str(raw / "Dataset009_BraTS2021"), num_processes=1)


def test_walk_dirs_ends_on_symlink_cycles_and_follows_linked_folders(tmp_path):
    from bsf_nnunet.datasets.convert import walk_dirs

    other = tmp_path / "other_disk" / "sub-02"
    other.mkdir(parents=True)
    (other / "t1.nii.gz").write_bytes(b"x")
    root = tmp_path / "data"
    (root / "sub-01").mkdir(parents=True)
    (root / "sub-01" / "t1.nii.gz").write_bytes(b"x")
    os.symlink(other, root / "sub-02")  # a subject folder on another disk: followed
    os.symlink(root, root / "sub-01" / "loop")  # a cycle: visited once
    os.symlink(tmp_path / "missing", root / "dangling")
    walked = list(walk_dirs(str(root)))
    files = sorted(os.path.relpath(os.path.join(d, f), root) for d, _, fs in walked for f in fs)
    assert files == ["dangling", "sub-01/t1.nii.gz", "sub-02/t1.nii.gz"]
    assert len(walked) == 3
