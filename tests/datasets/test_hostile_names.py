"""Hostile or odd file names in the converters and `bsf-nnunet check` (issue #18 row 6): case ids with spaces,
unicode, leading dashes, ``..`` or path separators, symlinked folders and link loops, non-NIfTI files under a
.nii.gz name (an HTML error page), gzip files cut short. Tiny 6^3 volumes, converters called in-process."""
import argparse
import gzip
import io
import json
import os
import sys

import nibabel as nib
import numpy as np
import pytest

from bsf_nnunet.cli import convert as cli_convert
from bsf_nnunet.cli.main import run_command
from bsf_nnunet.datasets.cases import diagnose_unreadable
from bsf_nnunet.datasets.check_raw import check_raw_dataset
from bsf_nnunet.datasets.convert_report import _log

pytestmark = pytest.mark.fault_matrix  # issue #18's fault matrix: python -m pytest -n 2 -m fault_matrix

SHAPE = (6, 6, 6)
HTML = b"<!DOCTYPE html>\n<html><head><title>403 Forbidden</title></head></html>\n"


def save(path, arr=None):
    os.makedirs(os.path.dirname(str(path)), exist_ok=True)
    if arr is None:
        arr = np.zeros(SHAPE, np.float32)
        arr[1:5, 1:5, 1:5] = 1
    nib.save(nib.Nifti1Image(arr, np.eye(4)), str(path))


def cli(*argv):
    p = argparse.ArgumentParser()
    cli_convert.register(p.add_subparsers(dest="command"))
    return run_command(p.parse_args([str(a) for a in argv]))


def all_files(root):
    return {os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs}


def truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_case_ids_are_made_safe_recorded_and_stay_inside_the_output(tmp_path, capsys):
    src, out = tmp_path / "src", tmp_path / "raw"
    names = ["good", "case one", "cäse", "-rf", "a\\b", "---"]
    for n in names:
        for mod in ("flair", "t1", "t1ce", "t2"):
            save(src / n / f"x_{mod}.nii.gz")
        save(src / n / "x_seg.nii.gz", np.ones(SHAPE, np.uint8))
    elsewhere = tmp_path / "other_disk" / "real"  # a subject folder linked in from elsewhere
    for mod in ("flair", "t1", "t1ce", "t2", "seg"):
        save(elsewhere / f"x_{mod}.nii.gz", np.ones(SHAPE, np.uint8) if mod == "seg" else None)
    os.symlink(elsewhere, src / "linked")
    before = all_files(tmp_path)
    assert cli("convert", "brats2021", src, "-d", 7, "-o", out, "-j", 1) == 1  # 1: some case bad
    dset = out / "Dataset007_BraTS2021"
    assert all(f.startswith(str(dset) + os.sep) for f in all_files(tmp_path) - before)
    report = json.loads((dset / "conversion_report.json").read_text())
    assert sorted(report["converted"]) == ["a_b", "case", "case_one", "good", "linked", "rf"]
    assert {r["from"]: r["case"] for r in report["renamed"]} == {"case one": "case_one", "cäse": "case",
                                                                 "-rf": "rf", "a\\b": "a_b"}
    assert [(b["case"], "cannot make a case identifier from '---'" in b["reason"]) for b in report["bad"]] == \
        [("---", True)]
    assert sorted(os.listdir(dset / "labelsTr")) == [f"{c}.nii.gz" for c in report["converted"]]
    assert json.loads((dset / "dataset.json").read_text())["numTraining"] == 6
    assert "'case one' -> case_one" in capsys.readouterr().out


def test_pattern_subjects_dotdot_and_dash(tmp_path):
    src, out = tmp_path / "flat", tmp_path / "raw"
    for subject in ("..", "-x", "ok", ".hidden"):
        save(src / f"{subject}_T1.nii.gz")
    before = all_files(tmp_path)
    assert cli("convert", "unlabeled", src, "-d", 8, "-o", out, "--channels", "T1", "--pattern",
               "{subject}_{channel}.nii.gz", "-j", 1) == 1
    dset = out / "Dataset008_Unlabeled"
    assert all(f.startswith(str(dset) + os.sep) for f in all_files(tmp_path) - before)
    assert sorted(os.listdir(dset / "imagesTr")) == ["hidden_0000.nii.gz", "ok_0000.nii.gz", "x_0000.nii.gz"]
    report = json.loads((dset / "conversion_report.json").read_text())
    assert [b["case"] for b in report["bad"]] == [".."]


def test_html_page_truncated_gzip_and_link_loop_reported_by_name_rest_converted(tmp_path, capsys):
    src, out = tmp_path / "coll", tmp_path / "raw"
    for s in ("good", "html", "trunc", "loop", "plain"):
        save(src / s / "T1.nii.gz")
    (src / "html" / "T1.nii.gz").write_bytes(HTML)
    truncate(src / "trunc" / "T1.nii.gz")
    os.remove(src / "loop" / "T1.nii.gz")
    os.symlink(src / "loop" / "T1.nii.gz", src / "loop" / "T1.nii.gz")
    plain = src / "plain" / "T1.nii.gz"  # an uncompressed NIfTI file under a .nii.gz name
    plain.write_bytes(gzip.decompress(plain.read_bytes()))
    assert cli("convert", "unlabeled", src, "-d", 9, "-o", out, "--channels", "T1", "-j", 1) == 1
    report = json.loads((out / "Dataset009_Unlabeled" / "conversion_report.json").read_text())
    assert report["converted"] == ["good"] and report["counts"]["bad"] == 4
    bad = {b["case"]: (b["reason"], b["hint"]) for b in report["bad"]}
    assert str(src / "html" / "T1.nii.gz") in bad["html"][0] and "HTML page" in bad["html"][0]
    assert "403 Forbidden" in bad["html"][0] and "download the file again" in bad["html"][1]
    assert "truncated" in bad["trunc"][0] and str(src / "trunc" / "T1.nii.gz") in bad["trunc"][0]
    assert "link loop" in bad["loop"][0]
    assert "uncompressed NIfTI" in bad["plain"][0]
    assert "converted 1 case(s), 0 already done, 4 bad" in capsys.readouterr().out


def test_check_reports_hidden_cases_odd_ids_and_bad_files_by_name(tmp_path):
    ds = tmp_path / "Dataset010_X"
    cases = ["c1", "c2", "c3", "case one"]
    for c in cases:
        save(ds / "imagesTr" / f"{c}_0000.nii.gz")
        save(ds / "labelsTr" / f"{c}.nii.gz", np.ones(SHAPE, np.uint8))
    (ds / "imagesTr" / "c2_0000.nii.gz").write_bytes(HTML)
    truncate(ds / "imagesTr" / "c3_0000.nii.gz")
    save(ds / "imagesTr" / "._c1_0000.nii.gz")  # macOS metadata file: nnU-Net lists it as case '._c1'
    (ds / "dataset.json").write_text(json.dumps({"channel_names": {"0": "T1"}, "labels": {"background": 0, "a": 1},
                                                 "numTraining": 4, "file_ending": ".nii.gz"}))
    report = check_raw_dataset(str(ds))
    text = report.format()
    assert not report.ok
    assert any("imagesTr/._c1_0000.nii.gz" in e and "'._c1'" in e and "Delete it" in e for e in report.errors)
    assert any("case c2" in e and "imagesTr/c2_0000.nii.gz" in e and "HTML page" in e for e in report.errors)
    assert any("case c3" in e and "imagesTr/c3_0000.nii.gz" in e and "truncated" in e for e in report.errors)
    assert any("'case one'" in w and "'case_one'" in w for w in report.warnings)
    assert "Traceback" not in text


def test_diagnosis_of_unreadable_files_and_undecodable_names(tmp_path, monkeypatch):
    empty = tmp_path / "e.nii.gz"
    empty.write_bytes(b"")
    assert diagnose_unreadable(str(empty), OSError("x"))[0] == "is empty (0 bytes)"
    junk = tmp_path / "j.nii.gz"
    junk.write_bytes(b"\x00\x01binary" * 10)
    assert diagnose_unreadable(str(junk), OSError("x"))[0].startswith("is corrupt: not gzip data")
    gone = tmp_path / "gone.nii.gz"
    os.symlink(tmp_path / "nowhere.nii.gz", gone)
    assert "which does not exist" in diagnose_unreadable(str(gone), OSError("x"))[0]
    # a file name that is not valid UTF-8 prints escaped, even on a stream that refuses surrogates
    stream = io.TextIOWrapper(io.BytesIO(), encoding="utf-8", errors="strict")
    monkeypatch.setattr(sys, "stdout", stream)
    _log(os.fsdecode(b"case \xff"))
    stream.flush()
    assert stream.buffer.getvalue() == b"case \\udcff\n"
