"""Challenge metrics (bsf-nnunet evaluate ...) against hand-computed small examples."""
import csv
import json
import os

import nibabel as nib
import numpy as np
import pytest
from cli_helpers import run_subcommand

from bsf_nnunet.cli import evaluate as cli_evaluate
from bsf_nnunet.evaluation.brats import detect_convention, region_masks
from bsf_nnunet.evaluation.common import CaseError
from bsf_nnunet.evaluation.metrics import HD95_PENALTY_MM, components, dice, hd95, lesion_metrics

SHAPE = (12, 12, 12)


def save(path, arr, zooms=(1.0, 1.0, 1.0)):
    os.makedirs(os.path.dirname(str(path)), exist_ok=True)
    nib.save(nib.Nifti1Image(np.asarray(arr, np.uint8), np.diag(list(zooms) + [1.0])), str(path))


def cli(*argv):
    return run_subcommand(cli_evaluate, *argv)


def cube(lo, size=3, shape=SHAPE):
    m = np.zeros(shape, bool)
    m[lo[0]:lo[0] + size, lo[1]:lo[1] + size, lo[2]:lo[2] + size] = True
    return m


def test_dice_and_hd95_by_hand():
    a, b = np.zeros(SHAPE, bool), np.zeros(SHAPE, bool)
    assert dice(a, b) == 1.0 and hd95(a, b) == 0.0               # both empty
    b[5, 5, 5] = True
    assert dice(a, b) == 0.0 and hd95(a, b) == HD95_PENALTY_MM == 373.13   # one empty
    assert dice(b, a) == 0.0 and hd95(b, a, (2, 2, 2)) == 373.13
    a[5, 5, 8] = True                                             # 3 voxels apart along an axis of 2 mm
    assert hd95(a, b, (1.0, 1.0, 2.0)) == pytest.approx(6.0)
    # 3x3x3 cubes shifted by one voxel: overlap 18 -> Dice 2*18/54; every surface voxel within 1 voxel
    c1, c2 = cube((1, 1, 1)), cube((2, 1, 1))
    assert dice(c1, c2) == pytest.approx(2 / 3)
    assert hd95(c1, c2) == pytest.approx(1.0)
    assert hd95(c1, c2, (0.5, 3.0, 3.0)) == pytest.approx(0.5)
    assert dice(c1, c1) == 1.0 and hd95(c1, c1) == 0.0


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_hd95_matches_monai():
    torch = pytest.importorskip("torch")
    monai_metrics = pytest.importorskip("monai.metrics")
    from scipy import ndimage
    rng = np.random.default_rng(0)
    for _ in range(4):
        a = ndimage.gaussian_filter(rng.random((16, 18, 14)), 2) > 0.5
        b = ndimage.gaussian_filter(rng.random((16, 18, 14)), 2) > 0.5
        if not (a.any() and b.any()):
            continue
        sp = (1.0, 1.5, 2.0)
        ref = monai_metrics.compute_hausdorff_distance(torch.tensor(a)[None, None].float(),
                                                       torch.tensor(b)[None, None].float(),
                                                       percentile=95, spacing=sp).item()
        assert hd95(a, b, sp) == pytest.approx(ref, abs=1e-4)


def test_lesion_metrics_by_hand():
    gt = np.zeros(SHAPE, bool)
    gt[1, 1, 1] = gt[2, 2, 2] = True          # touching diagonally: one lesion with 26-connectivity
    gt[6:8, 6:8, 6:8] = True                  # second lesion
    assert components(gt)[1] == 2
    pred = np.zeros(SHAPE, bool)
    pred[2, 2, 2] = True                      # hits lesion 1 -> TP; lesion 2 missed -> FN
    pred[10, 10, 10] = True                   # overlaps nothing -> FP
    m = lesion_metrics(pred, gt)
    assert (m["tp"], m["fp"], m["fn"]) == (1, 1, 1)
    assert m["lesion_f1"] == pytest.approx(0.5)
    assert m["lesion_count_diff"] == 0
    # one predicted blob covering two GT lesions: both detected, no FP
    gt2 = cube((1, 1, 1), 2) | cube((1, 5, 1), 2)
    pred2 = np.zeros(SHAPE, bool)
    pred2[1:3, 1:7, 1:3] = True
    m = lesion_metrics(pred2, gt2)
    assert (m["tp"], m["fp"], m["fn"], m["lesion_count_diff"]) == (2, 0, 0, 1) and m["lesion_f1"] == 1.0
    empty = np.zeros(SHAPE, bool)
    assert lesion_metrics(empty, empty)["lesion_f1"] == 1.0
    assert lesion_metrics(empty, gt)["lesion_f1"] == 0.0
    assert lesion_metrics(gt, empty)["lesion_f1"] == 0.0


def test_brats_conventions():
    brats = np.array([0, 1, 2, 4])
    nn = np.array([0, 1, 2, 3])
    assert detect_convention(brats, "x") == "brats" and detect_convention(nn, "x") == "nnunet"
    rb, rn = region_masks(brats, "brats"), region_masks(nn, "nnunet")
    for r in ("ET", "TC", "WT"):
        np.testing.assert_array_equal(rb[r], rn[r])
    np.testing.assert_array_equal(rb["TC"], [False, True, False, True])
    with pytest.raises(CaseError, match="both 3 and 4"):
        detect_convention(np.array([3, 4]), "f.nii.gz")
    with pytest.raises(CaseError, match="labels brats"):
        detect_convention(nn, "f.nii.gz", "brats")
    with pytest.raises(CaseError, match=r"\[5\]"):
        detect_convention(np.array([0, 5]), "f.nii.gz")


def brats_map(et, ncr, ed, et_label):
    a = np.zeros(SHAPE, np.uint8)
    a[ed] = 2
    a[ncr] = 1
    a[et] = et_label
    return a


def test_evaluate_brats_cli(tmp_path, capsys):
    pred, gt = tmp_path / "pred", tmp_path / "gt"
    ed, ncr, et = cube((2, 2, 2), 6), cube((3, 3, 3), 3), cube((4, 4, 4), 1)
    # case A: perfect, GT in BraTS labels, prediction in nnU-Net labels
    save(gt / "A.nii.gz", brats_map(et, ncr, ed, 4))
    save(pred / "A.nii.gz", brats_map(et, ncr, ed, 3))
    # case B: no ET in GT nor prediction; prediction's oedema shifted by one voxel
    save(gt / "B.nii.gz", brats_map(np.zeros(SHAPE, bool), ncr, ed, 4))
    save(pred / "B.nii.gz", brats_map(np.zeros(SHAPE, bool), ncr, cube((3, 2, 2), 6), 3))
    # case C: ET only in the prediction
    save(gt / "C.nii.gz", brats_map(np.zeros(SHAPE, bool), ncr, ed, 4))
    save(pred / "C.nii.gz", brats_map(et, ncr, ed, 3))
    # case D: missing prediction; case E: bad labels
    save(gt / "D.nii.gz", brats_map(et, ncr, ed, 4))
    save(gt / "E.nii.gz", brats_map(et, ncr, ed, 4))
    e = brats_map(et, ncr, ed, 3)
    e[0, 0, 0] = 4
    save(pred / "E.nii.gz", e)
    assert cli("evaluate", "brats", pred, gt, "-j", 1, "-o", tmp_path / "ev") == 1
    rows = {r["case"]: r for r in csv.DictReader(open(tmp_path / "ev" / "brats_metrics.csv"))}
    assert set(rows) == {"A", "B", "C"}
    assert all(float(rows["A"][f"Dice_{r}"]) == 1.0 and float(rows["A"][f"HD95_{r}"]) == 0.0
               for r in ("ET", "TC", "WT"))
    assert float(rows["B"]["Dice_ET"]) == 1.0 and float(rows["B"]["HD95_ET"]) == 0.0     # both empty
    # WT of B: 6-cube vs the same shifted by one voxel (NCR inside both): overlap 5*36
    assert float(rows["B"]["Dice_WT"]) == pytest.approx(2 * 180 / 432, abs=1e-5)
    assert float(rows["B"]["HD95_WT"]) == pytest.approx(1.0)
    assert float(rows["C"]["Dice_ET"]) == 0.0 and float(rows["C"]["HD95_ET"]) == pytest.approx(373.13)
    s = json.load(open(tmp_path / "ev" / "brats_summary.json"))
    assert s["n_cases"] == 3 and s["missing_predictions"] == ["D"]
    assert [f["case"] for f in s["failed"]] == ["E"] and "both 3 and 4" in s["failed"][0]["reason"]
    assert s["mean"]["Dice_ET"] == pytest.approx(2 / 3)
    assert s["mean"]["HD95_ET"] == pytest.approx(373.13 / 3)
    err = capsys.readouterr().err
    assert "D" in err and "FAILED E" in err


def test_evaluate_brats_gt_layout_spacing_and_parallel(tmp_path):
    """GT as a BraTS training folder (<case>/<case>_seg.nii.gz); spacing from the header."""
    pred, gt = tmp_path / "pred", tmp_path / "BraTS2021_Training"
    a = np.zeros(SHAPE, np.uint8)
    a[5, 5, 5] = 2
    b = np.zeros(SHAPE, np.uint8)
    b[5, 5, 8] = 2
    for case in ("BraTS2021_00000", "BraTS2021_00001"):
        save(gt / case / f"{case}_seg.nii.gz", a, zooms=(1.0, 1.0, 2.0))
        save(gt / case / f"{case}_flair.nii.gz", a, zooms=(1.0, 1.0, 2.0))
        save(pred / f"{case}.nii.gz", b, zooms=(1.0, 1.0, 2.0))
    assert cli("evaluate", "brats", pred, gt, "-j", 2, "--labels", "nnunet") == 0
    s = json.load(open(pred / "brats_summary.json"))
    assert s["n_cases"] == 2 and s["mean"]["HD95_WT"] == pytest.approx(6.0)


def test_evaluate_atlas_cli(tmp_path):
    pred, gt = tmp_path / "pred", tmp_path / "gt"
    g = np.zeros(SHAPE, np.uint8)
    g[1, 1, 1] = g[2, 2, 2] = 1
    g[6:8, 6:8, 6:8] = 1
    p = np.zeros(SHAPE, np.uint8)
    p[2, 2, 2] = 1
    p[10, 10, 10] = 1
    save(gt / "sub-r001s001_ses-1.nii.gz", g, zooms=(1, 1, 2))
    save(pred / "sub-r001s001_ses-1.nii.gz", p, zooms=(1, 1, 2))
    save(gt / "sub-r001s002_ses-1.nii.gz", np.zeros(SHAPE))               # empty GT, empty prediction
    save(pred / "sub-r001s002_ses-1.nii.gz", np.zeros(SHAPE))
    save(pred / "extra.nii.gz", np.zeros(SHAPE))
    save(pred / "wrong_shape.nii.gz", np.zeros((4, 4, 4)))
    save(gt / "wrong_shape.nii.gz", np.zeros(SHAPE))
    assert cli("evaluate", "atlas", pred, gt, "-j", 1) == 1
    rows = {r["case"]: r for r in csv.DictReader(open(pred / "atlas_metrics.csv"))}
    r = rows["sub-r001s001_ses-1"]
    assert float(r["Dice"]) == pytest.approx(2 * 1 / (2 + 10), abs=1e-5)
    assert float(r["lesion_F1"]) == pytest.approx(0.5)
    assert int(r["lesion_count_diff"]) == 0 and int(r["volume_diff_voxels"]) == 8
    assert float(r["volume_diff_mm3"]) == pytest.approx(16.0)
    r = rows["sub-r001s002_ses-1"]
    assert float(r["Dice"]) == 1.0 and float(r["lesion_F1"]) == 1.0 and int(r["volume_diff_voxels"]) == 0
    s = json.load(open(pred / "atlas_summary.json"))
    assert s["predictions_without_ground_truth"] == ["extra"]
    assert s["failed"][0]["case"] == "wrong_shape" and "shape" in s["failed"][0]["reason"]
    assert s["mean"]["lesion_F1"] == pytest.approx(0.75)


def test_evaluate_errors(tmp_path, capsys):
    (tmp_path / "pred").mkdir()
    assert cli("evaluate", "atlas", tmp_path / "pred", tmp_path / "nope") == 2
    assert "nope" in capsys.readouterr().err
    save(tmp_path / "gt" / "a.nii.gz", np.zeros(SHAPE))
    assert cli("evaluate", "brats", tmp_path / "pred", tmp_path / "gt") == 2
    assert "no NIfTI files" in capsys.readouterr().err
    save(tmp_path / "pred" / "b.nii.gz", np.zeros(SHAPE))
    assert cli("evaluate", "brats", tmp_path / "pred", tmp_path / "gt") == 2
    assert "matched by file name" in capsys.readouterr().err
