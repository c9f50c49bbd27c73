"""bsf-nnunet check: a fuzz table of broken raw datasets (tiny NIfTI files built in tmp_path). Every entry must give
an error (or a warning) that names the case/file and says what is wrong; the checker must never raise, never write
into the dataset folder, and stay fast."""
import json
import os
import signal

import nibabel as nib
import numpy as np
import pytest

from bsf_nnunet.cli.main import main as cli_main
from bsf_nnunet.datasets.check_raw import check_raw_dataset

SHAPE = (8, 8, 8)
CHANNELS = {"0": "T1", "1": "FLAIR"}
LABELS = {"background": 0, "lesion": 1, "edema": 2}
CASES = ("case0", "case1")


# ---------------------------------------------------------------------------------------------------------------
# dataset builder


def aff(spacing=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0)):
    a = np.diag(list(spacing) + [1.0])
    a[:3, 3] = origin
    return a


def save(path, arr, affine=None):
    os.makedirs(os.path.dirname(str(path)), exist_ok=True)
    nib.save(nib.Nifti1Image(arr, aff() if affine is None else affine), str(path))


def image(shape=SHAPE, seed=0):
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def label(shape=SHAPE):
    lab = np.zeros(shape, np.uint8)
    lab[(slice(2, 4),) * len(shape)] = 1
    lab[(slice(4, 6),) * len(shape)] = 2
    return lab


def write_json(folder, **overrides):
    dj = {"channel_names": CHANNELS, "labels": LABELS, "numTraining": len(CASES), "file_ending": ".nii.gz",
          "name": "Check"}
    dj.update(overrides)
    dj = {k: v for k, v in dj.items() if v is not None}
    (folder / "dataset.json").write_text(json.dumps(dj))


def make_dataset(tmp_path, spacing=(1.0, 1.0, 1.0), shape=SHAPE, test_case=True):
    folder = tmp_path / "Dataset901_Check"
    for i, case in enumerate(CASES):
        for c in range(len(CHANNELS)):
            save(folder / "imagesTr" / f"{case}_{c:04d}.nii.gz", image(shape, seed=10 * i + c), aff(spacing))
        save(folder / "labelsTr" / f"{case}.nii.gz", label(shape), aff(spacing))
    if test_case:
        for c in range(len(CHANNELS)):
            save(folder / "imagesTs" / f"test0_{c:04d}.nii.gz", image(shape, seed=99 + c), aff(spacing))
    write_json(folder)
    return folder


def snapshot(folder):
    out = {}
    for root, dirs, files in os.walk(folder):
        for n in dirs + files:
            p = os.path.join(root, n)
            st = os.lstat(p)
            out[os.path.relpath(p, folder)] = (st.st_size, st.st_mtime_ns)
    st = os.stat(folder)
    out["."] = (st.st_mtime_ns,)
    return out


@pytest.fixture(autouse=True)
def no_hang():
    """Fail instead of hanging (no pytest-timeout here)."""
    def boom(signum, frame):
        raise TimeoutError("check_raw_dataset took too long")
    old = signal.signal(signal.SIGALRM, boom)
    signal.alarm(60)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


# ---------------------------------------------------------------------------------------------------------------
# mutations: each breaks a valid dataset in one way


def img_path(folder, case, c):
    return folder / "imagesTr" / f"{case}_{c:04d}.nii.gz"


def lab_path(folder, case):
    return folder / "labelsTr" / f"{case}.nii.gz"


def m_valid(f):
    pass


def m_2d(f):
    for c in range(2):
        save(img_path(f, "case0", c), image((8, 8, 1)))
    save(lab_path(f, "case0"), label((8, 8, 1)))


def m_2d_no_third_axis(f):
    for c in range(2):
        save(img_path(f, "case1", c), image((8, 8)))
    save(lab_path(f, "case1"), label((8, 8)))


def m_4d(f):
    save(img_path(f, "case0", 0), image(SHAPE + (2,)))


def m_nan(f):
    a = image()
    a[1, 2, 3] = np.nan
    a[0, 0, 0] = np.nan
    save(img_path(f, "case0", 1), a)


def m_inf(f):
    a = image()
    a[4, 4, 4] = np.inf
    a[5, 5, 5] = -np.inf
    save(img_path(f, "case1", 0), a)


def m_nan_label(f):
    lab = label().astype(np.float32)
    lab[0, 0, 0] = np.nan
    save(lab_path(f, "case1"), lab)


def m_corrupt_gzip(f):
    img_path(f, "case1", 0).write_bytes(np.random.default_rng(1).bytes(3000))


def m_truncated_gzip(f):
    p = img_path(f, "case0", 1)
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])


def m_corrupt_label(f):
    lab_path(f, "case0").write_bytes(b"\x1f\x8b\x08\x00garbage")


def m_empty_file(f):
    img_path(f, "case1", 1).write_bytes(b"")


def m_json_invalid(f):
    (f / "dataset.json").write_text('{"channel_names": {"0": "T1", "1": "FLAIR"},\n "labels": {"background": 0,}\n}')


def m_json_empty(f):
    (f / "dataset.json").write_text("")


def m_json_list(f):
    (f / "dataset.json").write_text("[1, 2]")


def m_json_missing(f):
    (f / "dataset.json").unlink()


def m_json_no_labels(f):
    write_json(f, labels=None)


def m_json_no_file_ending(f):
    write_json(f, file_ending=None, numTraining=None)


def m_json_no_background(f):
    write_json(f, labels={"lesion": 1, "edema": 2})


def m_json_background_not_zero(f):
    write_json(f, labels={"background": 1, "lesion": 2})


def m_json_channel_keys(f):
    write_json(f, channel_names={"1": "T1", "2": "FLAIR"})


def m_json_label_string(f):
    write_json(f, labels={"background": 0, "lesion": "abc", "edema": 2})


def m_json_label_float(f):
    write_json(f, labels={"background": 0, "lesion": 1.5, "edema": 2})


def m_json_label_gap(f):
    write_json(f, labels={"background": 0, "lesion": 1, "edema": 3})


def m_json_regions_no_order(f):
    write_json(f, labels={"background": 0, "whole": [1, 2], "core": 2})


def m_json_num_training(f):
    write_json(f, numTraining=5)


def m_json_num_training_str(f):
    write_json(f, numTraining="two")


def m_json_wrong_ending(f):
    write_json(f, file_ending=".nii")


def m_missing_channel(f):
    img_path(f, "case1", 1).unlink()


def m_extra_channel(f):
    save(img_path(f, "case0", 2), image())


def m_missing_label(f):
    lab_path(f, "case1").unlink()


def m_orphan_label(f):
    save(lab_path(f, "case7"), label())


def m_bad_name(f):
    save(f / "imagesTr" / "stray.nii.gz", image())


def m_missing_labels_folder(f):
    for p in (f / "labelsTr").iterdir():
        p.unlink()
    (f / "labelsTr").rmdir()


def m_shape_channels(f):
    save(img_path(f, "case0", 1), image((8, 8, 9)))


def m_shape_label(f):
    save(lab_path(f, "case1"), label((8, 9, 8)))


def m_affine_origin(f):
    save(lab_path(f, "case0"), label(), aff(origin=(0.5, 0.0, 0.0)))


def m_affine_spacing(f):
    save(img_path(f, "case1", 1), image(), aff(spacing=(1.0, 1.0, 1.5)))


def m_affine_rounding(f):  # a difference far below the voxel size is header rounding, not an error
    save(lab_path(f, "case0"), label(), aff(origin=(1e-5, 0.0, 0.0)))


def m_label_values(f):
    lab = label()
    lab[0, 0, 0] = 5
    lab[0, 0, 1] = 7
    save(lab_path(f, "case1"), lab)


def m_label_float(f):
    lab = label().astype(np.float32)
    lab[0, 0, 0] = 0.5
    save(lab_path(f, "case0"), lab)


def m_label_float_ok(f):  # integer values stored as float are fine
    save(lab_path(f, "case0"), label().astype(np.float32))


def m_json_regions_ok(f):  # region-based labels with regions_class_order, and an ignore label
    write_json(f, labels={"background": 0, "whole": [1, 2], "core": 2, "ignore": 3}, regions_class_order=[1, 2])


def m_test_missing_channel(f):
    (f / "imagesTs" / "test0_0001.nii.gz").unlink()


def m_test_nan(f):
    a = image()
    a[0, 1, 2] = np.nan
    save(f / "imagesTs" / "test0_0000.nii.gz", a)


def m_broken_symlink(f):
    p = img_path(f, "case1", 1)
    p.unlink()
    os.symlink(str(f.parent / "gone" / "source.nii.gz"), str(p))


def m_json_modality(f):
    write_json(f, channel_names=None, modality=CHANNELS)


def m_other_file(f):
    (f / "imagesTr" / "notes.txt").write_text("hello")


def m_invalid_affine(f):  # a NaN in the sform (written through the header; nibabel would refuse the affine)
    hdr = nib.Nifti1Image(image(), aff()).header
    hdr["srow_y"] = [0.0, np.nan, 0.0, 0.0]
    hdr["qform_code"] = 0
    nib.save(nib.Nifti1Image(image(), None, hdr), str(img_path(f, "case0", 0)))


# (id, mutation, "error" or "warning", phrases that one message of that kind must all contain)
TABLE = [
    ("2d", m_2d, "error", ["case0", "imagesTr/case0_0000.nii.gz", "is 2D", "2d configuration", "stock trainer"]),
    ("2d_no_third_axis", m_2d_no_third_axis, "error", ["case1", "is 2D", "Swin-UNETR"]),
    ("4d", m_4d, "error", ["case0", "case0_0000.nii.gz", "4D", "one 3D file per channel"]),
    ("nan", m_nan, "error", ["case0", "imagesTr/case0_0001.nii.gz", "2 NaN/Inf", "SimpleITK", "nan_to_num"]),
    ("inf", m_inf, "error", ["case1", "imagesTr/case1_0000.nii.gz", "2 NaN/Inf", "as 0"]),
    ("nan_label", m_nan_label, "error", ["case1", "labelsTr/case1.nii.gz", "1 NaN/Inf"]),
    ("corrupt_gzip", m_corrupt_gzip, "error", ["case1", "imagesTr/case1_0000.nii.gz", "cannot read", "corrupt"]),
    ("truncated_gzip", m_truncated_gzip, "error", ["case0", "imagesTr/case0_0001.nii.gz", "cannot read", "truncated"]),
    ("corrupt_label", m_corrupt_label, "error", ["case0", "labelsTr/case0.nii.gz", "cannot read"]),
    ("empty_file", m_empty_file, "error", ["case1", "case1_0001.nii.gz", "cannot read"]),
    ("json_invalid", m_json_invalid, "error", ["dataset.json", "not valid JSON", "line 2", "column"]),
    ("json_empty", m_json_empty, "error", ["dataset.json", "not valid JSON"]),
    ("json_list", m_json_list, "error", ["dataset.json", "not an object"]),
    ("json_missing", m_json_missing, "error", ["dataset.json", "does not exist"]),
    ("json_no_labels", m_json_no_labels, "error", ["dataset.json", "'labels'", "missing"]),
    ("json_no_file_ending", m_json_no_file_ending, "error", ["dataset.json", "'numTraining', 'file_ending'"]),
    ("json_no_background", m_json_no_background, "error", ["dataset.json", "background 0", "add it"]),
    ("json_background_not_zero", m_json_background_not_zero, "error", ["dataset.json", "must be 0"]),
    ("json_channel_keys", m_json_channel_keys, "error", ["dataset.json", "channel_names keys", "['1', '2']"]),
    ("json_label_string", m_json_label_string, "error", ["dataset.json", "'lesion': 'abc'", "not integers"]),
    ("json_label_float", m_json_label_float, "error", ["dataset.json", "'lesion': 1.5", "not integers"]),
    ("json_label_gap", m_json_label_gap, "error", ["dataset.json", "consecutive", "[0, 1, 3]"]),
    ("json_regions_no_order", m_json_regions_no_order, "error", ["dataset.json", "regions_class_order"]),
    ("json_num_training", m_json_num_training, "warning", ["dataset.json", "numTraining is 5", "Set numTraining to 2"]),
    ("json_num_training_str", m_json_num_training_str, "error", ["dataset.json", "numTraining", "'two'"]),
    ("json_wrong_ending", m_json_wrong_ending, "error", ["imagesTr", "no training cases found", "file_ending"]),
    ("missing_channel", m_missing_channel, "error", ["case1", "imagesTr/case1_0001.nii.gz", "is missing", "FLAIR"]),
    ("extra_channel", m_extra_channel, "error", ["case0", "case0_0002.nii.gz", "channel_names"]),
    ("missing_label", m_missing_label, "error", ["case1", "labelsTr/case1.nii.gz", "is missing"]),
    ("orphan_label", m_orphan_label, "error", ["case7", "labelsTr/case7.nii.gz", "no images"]),
    ("bad_name", m_bad_name, "error", ["imagesTr/stray.nii.gz", "4-digit channel number", "stray_0000.nii.gz"]),
    ("missing_labels_folder", m_missing_labels_folder, "error", ["labelsTr", "is missing"]),
    ("shape_channels", m_shape_channels, "error", ["case0", "imagesTr/case0_0001.nii.gz", "shape mismatch", "8x8x9",
                                                   "imagesTr/case0_0000.nii.gz", "8x8x8"]),
    ("shape_label", m_shape_label, "error", ["case1", "labelsTr/case1.nii.gz", "shape mismatch", "8x9x8", "8x8x8"]),
    ("affine_origin", m_affine_origin, "error", ["case0", "labelsTr/case0.nii.gz", "imagesTr/case0_0000.nii.gz",
                                                 "affine mismatch", "0.5"]),
    ("affine_spacing", m_affine_spacing, "error", ["case1", "imagesTr/case1_0001.nii.gz", "imagesTr/case1_0000.nii.gz",
                                                   "affine mismatch", "spacing"]),
    ("label_values", m_label_values, "error", ["case1", "labelsTr/case1.nii.gz", "5, 7", "does not declare"]),
    ("label_float", m_label_float, "error", ["case0", "labelsTr/case0.nii.gz", "non-integer", "0.5"]),
    ("test_missing_channel", m_test_missing_channel, "error", ["test0", "imagesTs/test0_0001.nii.gz", "is missing"]),
    ("test_nan", m_test_nan, "error", ["test0", "imagesTs/test0_0000.nii.gz", "1 NaN/Inf"]),
    ("broken_symlink", m_broken_symlink, "error", ["case1", "imagesTr/case1_0001.nii.gz", "symbolic link",
                                                   "does not exist"]),
    ("json_modality", m_json_modality, "error", ["dataset.json", "'modality'", "channel_names"]),
    ("other_file", m_other_file, "warning", ["imagesTr", "notes.txt", "ignored"]),
    ("invalid_affine", m_invalid_affine, "error", ["case0", "imagesTr/case0_0000.nii.gz", "invalid affine"]),
    ("small", m_valid, "warning", ["case0", "case1", "smaller than 64", "padded by nnU-Net"]),
]
WARNING_ONLY = {"json_num_training", "other_file", "small"}


def _run(folder, **kw):
    before = snapshot(folder)
    report = check_raw_dataset(str(folder), **kw)  # must not raise
    assert snapshot(folder) == before, "the checker changed the dataset folder"
    text = report.format()
    assert isinstance(text, str) and text
    return report


@pytest.mark.parametrize("name,mutate,kind,phrases", TABLE, ids=[t[0] for t in TABLE])
def test_fuzz_table(tmp_path, name, mutate, kind, phrases):
    folder = make_dataset(tmp_path)
    mutate(folder)
    report = _run(folder)
    msgs = report.errors if kind == "error" else report.warnings
    assert any(all(p in m for p in phrases) for m in msgs), (
        f"no {kind} with {phrases}:\n" + report.format())
    for m in report.errors + report.warnings:
        assert "\n" not in m and "Traceback" not in m, m
    if kind == "error":
        assert not report.ok
    if name in WARNING_ONLY:
        assert report.ok, report.format()


@pytest.mark.parametrize("mutate", [m_valid, m_label_float_ok, m_affine_rounding, m_json_regions_ok],
                         ids=["valid", "float_label_integer_values", "affine_rounding", "regions"])
def test_valid_datasets_pass(tmp_path, mutate):
    folder = make_dataset(tmp_path)
    mutate(folder)
    report = _run(folder)
    assert report.ok, report.format()
    assert report.num_training == 2 and report.num_test == 1
    assert "OK: no errors" in report.format()


def test_anisotropic_is_warning_only(tmp_path):
    folder = make_dataset(tmp_path, spacing=(1.0, 1.0, 4.0), shape=(70, 10, 10), test_case=False)
    report = _run(folder)
    assert report.ok, report.format()
    w = [m for m in report.warnings if "anisotropic" in m]
    assert w and "case0" in w[0] and "case1" in w[0] and "resamples" in w[0]


def test_big_enough_isotropic_has_no_warnings(tmp_path):
    folder = make_dataset(tmp_path, shape=(64, 64, 64), test_case=False)
    report = _run(folder)
    assert report.ok and not report.warnings, report.format()


def test_no_values_skips_voxel_checks(tmp_path):
    folder = make_dataset(tmp_path)
    m_nan(folder)
    m_label_values(folder)
    report = _run(folder, check_values=False)
    assert report.ok, report.format()
    assert "voxel values not read" in report.format()
    m_shape_label(folder)  # geometry is still checked from the headers
    assert not _run(folder, check_values=False).ok


def test_two_d_reported_once_per_case(tmp_path):
    folder = make_dataset(tmp_path)
    m_2d(folder)
    report = _run(folder)
    assert sum("is 2D" in m and "case0" in m for m in report.errors) == 1, report.format()


def test_many_problems_at_once_and_workers(tmp_path):
    folder = make_dataset(tmp_path)
    for m in (m_nan, m_corrupt_gzip, m_label_float, m_missing_label):
        m(folder)
    serial = _run(folder)
    assert len(serial.errors) == 4, serial.format()
    parallel = _run(folder, num_workers=2)
    assert parallel.errors == serial.errors and parallel.warnings == serial.warnings


def test_not_a_folder(tmp_path):
    report = check_raw_dataset(str(tmp_path / "nope"))
    assert not report.ok and "is not a folder" in report.errors[0]


def test_cli(tmp_path, monkeypatch, capsys):
    folder = make_dataset(tmp_path)
    assert cli_main(["check", "-d", str(folder)]) == 0
    assert "OK: no errors" in capsys.readouterr().out

    monkeypatch.setenv("nnUNet_raw", str(tmp_path))
    assert cli_main(["check", "-d", "901", "--no-values", "-np", "1"]) == 0
    assert cli_main(["check", "-d", "Dataset901_Check"]) == 0
    capsys.readouterr()

    m_nan(folder)
    assert cli_main(["check", "-d", str(folder)]) == 1
    out = capsys.readouterr().out
    assert "ERRORS (1)" in out and "case0_0001.nii.gz" in out
    assert cli_main(["check", "-d", "901", "--no-values"]) == 0

    assert cli_main(["check", "-d", "902"]) == 2
    assert "no dataset with ID 902" in capsys.readouterr().err
    monkeypatch.delenv("nnUNet_raw")
    assert cli_main(["check", "-d", "901"]) == 2
    assert "nnUNet_raw is not set" in capsys.readouterr().err
    assert cli_main(["check", "-d", str(tmp_path / "missing_folder")]) == 2


def test_prediction_input_check(tmp_path):
    """--predict-input: the folder given to nnUNetv2_predict -i, checked against the model's dataset.json."""
    folder = make_dataset(tmp_path)
    inp = tmp_path / "to_predict"
    for c in range(2):
        save(inp / f"p0_{c:04d}.nii.gz", image(seed=c))
    save(inp / "p1_0000.nii.gz", image(seed=5))  # FLAIR missing
    bad = image(seed=6)
    bad[1, 1, 1] = np.inf
    save(inp / "p2_0000.nii.gz", bad)
    save(inp / "p2_0001.nii.gz", image(seed=7))
    before = snapshot(inp)
    assert cli_main(["check", "-d", str(folder), "--predict-input", str(inp)]) == 1
    from bsf_nnunet.datasets.check_predict import check_prediction_input

    rep = check_prediction_input(str(inp), str(folder))
    text = " ".join(rep.errors)
    assert "case p1: channel file to_predict/p1_0001.nii.gz is missing" in text and "'FLAIR'" in text
    assert "p2_0000.nii.gz" in text and "Inf" in text
    assert not any("p0" in e for e in rep.errors)
    assert snapshot(inp) == before
    os.remove(inp / "p1_0000.nii.gz")
    os.remove(inp / "p2_0000.nii.gz")
    os.remove(inp / "p2_0001.nii.gz")
    assert cli_main(["check", "-d", str(folder), "--predict-input", str(inp), "-o", str(tmp_path / "out")]) == 0
    blocker = tmp_path / "afile"
    blocker.write_text("x")
    rep = check_prediction_input(str(inp), str(folder), str(blocker / "out"))
    assert any("exists and is a file" in e for e in rep.errors)
