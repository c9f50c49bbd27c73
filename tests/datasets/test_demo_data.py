"""Tests of the demo dataset builder (bsf_nnunet.datasets.demo_data) and the tri-planar PNG writer.

The ICBM source (real MRI shipped inside nilearn's wheel) is used when nilearn is installed; the synthetic
phantom is always tested. Nothing touches the network or data outside tmp_path / installed packages.
"""
import functools
import importlib.util
import json
import struct

import numpy as np
import pytest

from bsf_nnunet.datasets import demo_data as dd
from bsf_nnunet.datasets.demo_sources import _block_mean
from bsf_nnunet.datasets.figures import save_triplanar_png

HAVE_NILEARN = importlib.util.find_spec("nilearn") is not None
SOURCES = ["synthetic", pytest.param("icbm", marks=pytest.mark.skipif(
    not HAVE_NILEARN, reason="nilearn not installed (pip install nilearn)"))]


@pytest.fixture(scope="module")
def sources():
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = dd.get_source(name, spacing=2.0)
        return cache[name]
    return get


def _threshold_seg(image, label):
    """Classify brain voxels by intensity thresholds halfway between the CSF/GM/WM means of `label`."""
    m = [image[label == k].mean() for k in (1, 2, 3)]
    t1, t2 = (m[0] + m[1]) / 2, (m[1] + m[2]) / 2
    return np.where(image < t1, 1, np.where(image < t2, 2, 3))


def _dice(a, b):
    return 2.0 * np.logical_and(a, b).sum() / (a.sum() + b.sum())


def _assert_diag_affine(affine, spacing):
    np.testing.assert_allclose(affine[:3, :3], np.eye(3) * spacing, atol=1e-9)
    np.testing.assert_allclose(affine[3], [0, 0, 0, 1])


# ---------------------------------------------------------------------------------------------- sources
@pytest.mark.parametrize("name", SOURCES)
def test_source(sources, name):
    img, probs, aff = src = sources(name)
    assert img.dtype == probs.dtype == np.float32
    assert probs.shape == (3,) + img.shape and img.ndim == 3
    assert 60 <= min(img.shape) and max(img.shape) <= 110          # brain + margin at 2 mm
    _assert_diag_affine(aff, 2.0)
    np.testing.assert_allclose(src.spacing, [2, 2, 2])
    s = probs.sum(0)
    assert probs.min() >= 0 and s.max() <= 1 + 1e-5
    lab = dd.probs_to_label(probs)
    assert set(np.unique(lab)) == {0, 1, 2, 3}
    means = [img[lab == k].mean() for k in range(4)]
    assert means[0] < means[1] < means[2] < means[3]                # T1: bg < CSF < GM < WM
    # the brain is inside the field of view with a margin of background all around
    for ax in range(3):
        assert not lab.take(0, axis=ax).any()
        assert not lab.take(-1, axis=ax).any()


@pytest.mark.skipif(not HAVE_NILEARN, reason="nilearn not installed")
def test_icbm_world_position(sources):
    img, probs, aff = sources("icbm")
    lab = dd.probs_to_label(probs)
    com = aff[:3, :3] @ np.argwhere(lab > 0).mean(0) + aff[:3, 3]
    assert abs(com[0]) < 5                                           # symmetric template: midline at x~0
    assert -40 < com[1] < 10 and -20 < com[2] < 40                   # MNI space brain centre


def test_missing_nilearn_error(monkeypatch, tmp_path):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "nilearn" else real(n, *a))
    with pytest.raises(dd.DemoDataError) as e:
        dd.load_icbm_source()
    msg = str(e.value)
    assert dd.ICBM_FILES["t1"] in msg and "pip install nilearn" in msg and "[demo]" in msg
    with pytest.raises(dd.DemoDataError, match="pip install nilearn"):
        dd.build_demo_dataset(tmp_path, num_train=1, num_test=0)
    assert not any(tmp_path.iterdir())                              # failed before writing anything


def test_unknown_source():
    with pytest.raises(ValueError, match="synthetic"):
        dd.get_source("nope")


# ---------------------------------------------------------------------------------------------- cases
@pytest.mark.parametrize("name", SOURCES)
def test_make_case_basic(sources, name):
    src = sources(name)
    img, lab, aff = dd.make_case(src, np.random.default_rng(3))
    assert img.dtype == np.float32 and lab.dtype == np.uint8 and img.shape == lab.shape
    _assert_diag_affine(aff, 2.0)
    assert set(np.unique(lab)) == {0, 1, 2, 3}
    assert img.min() >= 0 and np.all(img[lab == 0][:10] >= 0)
    means = [img[lab == k].mean() for k in (1, 2, 3)]
    assert means[0] < means[1] < means[2]
    # cropped to the deformed brain + margin: background border, brain close to every face
    for ax in range(3):
        nz = np.flatnonzero(np.any(lab > 0, axis=tuple(a for a in range(3) if a != ax)))
        assert 1 <= nz[0] <= 4 and 1 <= lab.shape[ax] - 1 - nz[-1] <= 4
    # brain volume stays plausible under +-10 % scaling per axis
    ref = (dd.probs_to_label(src.tissue_probs) > 0).sum()
    assert 0.65 < (lab > 0).sum() / ref < 1.4


def test_make_case_other_spacing():
    src = dd.synthetic_source(spacing=3.0)
    img, lab, aff = dd.make_case(src, 0)
    _assert_diag_affine(aff, 3.0)
    assert set(np.unique(lab)) == {0, 1, 2, 3} and max(img.shape) < 75


@pytest.mark.parametrize("name", SOURCES)
def test_determinism(sources, name):
    src = sources(name)
    a = dd.make_case(src, np.random.default_rng(7))
    b = dd.make_case(src, 7)
    c = dd.make_case(src, 8)
    for x, y in zip(a, b, strict=True):
        assert x.dtype == y.dtype and x.shape == y.shape and x.tobytes() == y.tobytes()
    assert a[0].shape != c[0].shape or not np.array_equal(a[0], c[0])
    assert not np.array_equal(a[2], c[2])
    # intensity changes do not alter the geometry drawn from the same seed
    d = dd.make_case(src, 7, intensity=False)
    assert np.array_equal(d[1], a[1]) and np.array_equal(d[2], a[2]) and not np.array_equal(d[0], a[0])


@pytest.mark.parametrize("name", SOURCES)
def test_image_label_alignment(sources, name):
    """Image and label must get the same spatial transform.

    With intensity changes off, classifying the deformed image by thresholds between its class means
    reproduces the deformed label; a label deformed with another seed (same output grid) does not.
    """
    src = sources(name)
    src_lab = dd.probs_to_label(src.tissue_probs)
    matched_floor = 0.85 if name == "icbm" else 0.93
    for seed in (1, 2):
        img, lab, aff = dd.make_case(src, seed, intensity=False, crop=False)
        _, lab_other, aff_other = dd.make_case(src, seed + 100, intensity=False, crop=False)
        np.testing.assert_array_equal(aff, aff_other)              # crop=False: the source grid
        assert not np.array_equal(lab, src_lab)                    # it really was deformed
        brain = lab > 0
        seg = _threshold_seg(img, lab)
        matched = (seg[brain] == lab[brain]).mean()
        mismatched = (seg[brain] == lab_other[brain]).mean()
        assert matched > matched_floor, (seed, matched)
        assert mismatched < matched - 0.25, (seed, matched, mismatched)
        # the brain outline of the image coincides with the label's brain (and not the other one's)
        outline = img > 0.5 * img[lab == 1].mean()
        assert _dice(outline, brain) > 0.98 and _dice(outline, lab_other > 0) < 0.95


# ---------------------------------------------------------------------------------------------- writer
def _sitk_read(path):
    import SimpleITK as sitk

    im = sitk.ReadImage(str(path))
    return im, sitk.GetArrayFromImage(im)


def test_build_dataset_synthetic(tmp_path):
    raw = tmp_path / "raw"
    p = dd.build_demo_dataset(raw, dataset_id=991, name="Phantom", num_train=3, num_test=1,
                              source="synthetic", seed=5)
    assert p == raw / "Dataset991_Phantom"
    js = json.loads((p / "dataset.json").read_text())
    assert js["channel_names"] == {"0": "T1"} and js["numTraining"] == 3 and js["file_ending"] == ".nii.gz"
    assert js["labels"] == {"background": 0, "CSF": 1, "GM": 2, "WM": 3}
    ids = [f"case_{i:03d}" for i in range(3)]
    assert sorted(f.name for f in (p / "imagesTr").iterdir()) == [f"{c}_0000.nii.gz" for c in ids]
    assert sorted(f.name for f in (p / "labelsTr").iterdir()) == [f"{c}.nii.gz" for c in ids]
    assert [f.name for f in (p / "imagesTs").iterdir()] == ["test_000_0000.nii.gz"]
    assert [f.name for f in (p / "labelsTs").iterdir()] == ["test_000.nii.gz"]
    assert not list(p.rglob("*.part")) and not list(p.rglob(".*"))

    # geometry as nnU-Net (SimpleITK) sees it: 2 mm, RAS-stored -> LPS direction diag(-1, -1, 1)
    import nibabel as nib
    phantom = dd.synthetic_source(2.0)
    for c in ids:
        im, a = _sitk_read(p / "imagesTr" / f"{c}_0000.nii.gz")
        lb, seg = _sitk_read(p / "labelsTr" / f"{c}.nii.gz")
        assert im.GetSpacing() == pytest.approx((2, 2, 2)) and lb.GetSpacing() == pytest.approx((2, 2, 2))
        assert im.GetDirection() == pytest.approx((-1, 0, 0, 0, -1, 0, 0, 0, 1))
        assert lb.GetOrigin() == pytest.approx(im.GetOrigin()) and a.shape == seg.shape
        assert set(np.unique(seg)) == {0, 1, 2, 3}
        n = nib.load(str(p / "imagesTr" / f"{c}_0000.nii.gz"))
        assert nib.aff2axcodes(n.affine) == ("R", "A", "S")
        np.testing.assert_allclose(im.GetOrigin(), n.affine[:3, 3] * [-1, -1, 1], atol=1e-4)
        # same arrays as make_case with the documented per-case stream
        img, lab, aff = dd.make_case(phantom, np.random.default_rng([5, 0, ids.index(c)]))
        np.testing.assert_array_equal(seg, lab.transpose(2, 1, 0))
        np.testing.assert_array_equal(a, img.transpose(2, 1, 0))
        np.testing.assert_allclose(n.affine, aff, atol=1e-5)

    # re-running with the same arguments skips finished files
    mtimes = {f: f.stat().st_mtime_ns for f in p.rglob("*.nii.gz")}
    (p / "labelsTr" / "case_001.nii.gz").unlink()                   # an unfinished case is redone
    dd.build_demo_dataset(raw, dataset_id=991, name="Phantom", num_train=3, num_test=1,
                          source="synthetic", seed=5)
    for f, t in mtimes.items():
        if not f.name.startswith("case_001"):
            assert f.stat().st_mtime_ns == t, f
    assert (p / "labelsTr" / "case_001.nii.gz").is_file()

    # other arguments on the same folder: clear error, or rebuild with overwrite=True
    with pytest.raises(dd.DemoDataError, match="overwrite=True"):
        dd.build_demo_dataset(raw, dataset_id=991, name="Phantom", num_train=2, num_test=0, source="synthetic")
    dd.build_demo_dataset(raw, dataset_id=991, name="Phantom", num_train=2, num_test=0, source="synthetic",
                          overwrite=True)
    assert len(list((p / "imagesTr").iterdir())) == 2 and not (p / "imagesTs").exists()
    assert json.loads((p / "dataset.json").read_text())["numTraining"] == 2
    # a second dataset with the same id is refused (nnU-Net needs unique ids)
    with pytest.raises(dd.DemoDataError, match="991"):
        dd.build_demo_dataset(raw, dataset_id=991, name="Other", num_train=1, num_test=0, source="synthetic")


def test_build_is_byte_reproducible(tmp_path):
    kw = dict(dataset_id=992, num_train=2, num_test=0, source="synthetic", seed=1)
    p1 = dd.build_demo_dataset(tmp_path / "a", **kw)
    p2 = dd.build_demo_dataset(tmp_path / "b", **kw)
    for f in sorted(p1.rglob("*.nii.gz")):
        assert f.read_bytes() == (p2 / f.relative_to(p1)).read_bytes()


def test_raw_dir_from_env(tmp_path, monkeypatch):
    monkeypatch.delenv("nnUNet_raw", raising=False)
    from bsf_nnunet.errors import ConfigurationError

    with pytest.raises(ConfigurationError, match="nnUNet_raw is not set.*or pass raw_dir"):
        dd.build_demo_dataset(None, source="synthetic")
    monkeypatch.setenv("nnUNet_raw", str(tmp_path))
    p = dd.build_demo_dataset(None, dataset_id=993, num_train=1, num_test=0, source="synthetic")
    assert p.parent == tmp_path and (p / "dataset.json").is_file()


@pytest.mark.skipif(not HAVE_NILEARN, reason="nilearn not installed")
def test_build_dataset_icbm_nnunet_accepts(tmp_path):
    p = dd.build_demo_dataset(tmp_path, num_train=2, num_test=1)
    assert p.name == "Dataset990_BrainTissueDemo"
    assert "ICBM152" in json.loads((p / "dataset.json").read_text())["reference"]
    from nnunetv2.experiment_planning.verify_dataset_integrity import verify_dataset_integrity

    verify_dataset_integrity(str(p), num_processes=1)                # raises on any inconsistency
    im, a = _sitk_read(p / "imagesTr" / "case_000_0000.nii.gz")
    assert a.dtype == np.float32 and a.max() > 0.5


# ---------------------------------------------------------------------------------------------- figure
def _png_size(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_triplanar_png(tmp_path):
    img, lab, aff = dd.make_case(dd.synthetic_source(2.0), 0)
    img, lab = img.transpose(2, 1, 0), lab.transpose(2, 1, 0)       # -> (z, y, x) as SimpleITK reads
    pred = np.where(lab == 3, 2, lab).astype(np.uint8)
    out = save_triplanar_png(tmp_path / "figs" / "case.png", img, lab, {"model": pred}, spacing=(2.0, 2.0, 2.0),
                             title="demo")
    assert out == tmp_path / "figs" / "case.png" and out.stat().st_size > 20_000
    w, h = _png_size(out)
    assert w > 300 and h > 300
    assert [f.name for f in out.parent.iterdir()] == ["case.png"]   # no temporary left behind
    # LPS-stored input with the SimpleITK direction gives the same picture as the RAS-stored input
    out2 = save_triplanar_png(tmp_path / "flip.png", img[:, ::-1, ::-1], lab[:, ::-1, ::-1],
                              {"model": pred[:, ::-1, ::-1]}, spacing=2.0, title="demo",
                              direction=(1, 0, 0, 0, 1, 0, 0, 0, 1))
    assert out2.read_bytes() == out.read_bytes()
    with pytest.raises(ValueError, match="shape"):
        save_triplanar_png(tmp_path / "bad.png", img, lab[:-1], {}, spacing=2.0)


# ---------------------------------------------------------------------------------------------- multi-source
HAVE_SPM = importlib.util.find_spec("spm_runtime") is not None


@functools.lru_cache(maxsize=None)
def _phantom4():
    return dd.synthetic_source(4.0)


def test_flip_and_thick_slices():
    src = _phantom4()
    img, lab, aff = dd.make_case(src, 4, intensity=False)
    f_img, f_lab, f_aff = dd.make_case(src, 4, intensity=False, flip_prob=1.0)
    np.testing.assert_array_equal(f_lab, lab[::-1, ::-1, ::-1])       # every axis reversed...
    np.testing.assert_array_equal(f_img, img[::-1, ::-1, ::-1])
    corner = np.array(lab.shape) - 1                                   # ...and each voxel keeps its world position
    np.testing.assert_allclose(f_aff[:3, :3] @ np.zeros(3) + f_aff[:3, 3], aff[:3, :3] @ corner + aff[:3, 3])
    t_img, t_lab, t_aff = dd.make_case(src, 4, intensity=False, thick_prob=1.0, thick_range=(3.0, 3.0))
    np.testing.assert_array_equal(t_lab, lab)                         # image only
    np.testing.assert_array_equal(t_aff, aff)
    assert not np.array_equal(t_img, img) and np.all(t_img[lab == 0] >= 0)
    assert np.abs(np.diff(t_img, axis=0)).mean() < np.abs(np.diff(img, axis=0)).mean() or \
        np.abs(np.diff(t_img, axis=1)).mean() < np.abs(np.diff(img, axis=1)).mean() or \
        np.abs(np.diff(t_img, axis=2)).mean() < np.abs(np.diff(img, axis=2)).mean()


def _with_skull(src):
    """The phantom with a bright 'skull' shell outside the brain (image only, probabilities untouched)."""
    brain = src.tissue_probs.sum(0) > 0.01
    shell = ndimage_binary_dilation(brain, 3) & ~ndimage_binary_dilation(brain, 1)
    return dd.DemoSource(np.where(shell, 0.9, src.image).astype(np.float32), src.tissue_probs, src.affine)


def ndimage_binary_dilation(mask, n):
    from scipy import ndimage

    return ndimage.binary_dilation(mask, iterations=n)


def test_whole_head_case_keeps_skull_as_background():
    src = _with_skull(_phantom4())
    img, lab, _ = dd.make_case(src, 2)
    skull = (img > 0.7) & (lab == 0)
    assert skull.sum() > 300                                           # the shell is in the field of view
    for ax in range(3):                                                # and not cut at any face
        assert not (img.take(0, axis=ax) > 0.7).any() and not (img.take(-1, axis=ax) > 0.7).any()


def _fake_variant(name, skull, spacing):
    src = _phantom4()
    scale = {"spm_avg152": 1.0, "icbm152": 0.9, "cat12_ixi555": 0.8, "fsaverage6": 0.7, "mni152_fsl": 0.6}[name]
    src = dd.DemoSource(src.image * scale, src.tissue_probs, src.affine)
    return _with_skull(src) if skull else src


def test_multi_source_build_layout(tmp_path, monkeypatch):
    train_names = {s for s, _ in dd.TRAIN_VARIANTS}
    assert len(dd.HELD_OUT) >= 3 and not train_names & set(dd.HELD_OUT)
    assert sum(dd.is_whole_head(s) for s in dd.HELD_OUT) >= 2          # whole-head held-out sources
    assert any(sk and dd.SOURCES[s].whole_head for s, sk in dd.TRAIN_VARIANTS)
    assert any(not sk for s, sk in dd.TRAIN_VARIANTS if dd.SOURCES[s].whole_head)   # same head, skull-stripped
    assert all(dd.SOURCES[s].licence for s in dd.SOURCES)
    monkeypatch.setattr(dd, "_check_sources_installed", lambda key, held=(): None)
    monkeypatch.setattr(dd, "load_variant", _fake_variant)
    unlabelled_src = _with_skull(dd.DemoSource(_phantom4().image, 0 * _phantom4().tissue_probs, _phantom4().affine))
    monkeypatch.setattr(dd, "load_unlabelled_source", lambda name, spacing: unlabelled_src)
    p = dd.build_demo_dataset(tmp_path, num_train=3, num_test=1, source="multi", num_heldout=2, num_unlabelled=2,
                              case_kwargs={"elastic_mm": 0.0})
    held = [f"{dd.HELDOUT_PREFIX}{n}_{i:03d}" for n in dd.HELD_OUT for i in range(2)]
    assert sorted(f.name for f in (p / "labelsTs").iterdir()) == sorted([f"{c}.nii.gz" for c in held]
                                                                       + ["test_000.nii.gz"])
    assert [dd.heldout_source_of(c) for c in held] == [n for n in dd.HELD_OUT for _ in range(2)]
    assert dd.heldout_source_of(held[0] + "_0000.nii.gz") == dd.HELD_OUT[0]
    assert not any(n in f.name for n in dd.HELD_OUT for f in (p / "imagesTr").iterdir())
    assert [dd.case_source("multi", 0, i) for i in range(3)] == list(dd.TRAIN_VARIANTS)
    assert dd.case_source("multi", 2, 2, dd.heldout_cases(2)) == (dd.HELD_OUT[1], True)
    # held-out case 0 of each source is the untouched source; training cases come from the training variants
    for n in dd.HELD_OUT:
        _, ref = _sitk_read(p / "labelsTs" / f"{dd.HELDOUT_PREFIX}{n}_000.nii.gz")
        np.testing.assert_array_equal(ref, dd.probs_to_label(_fake_variant(n, False, 4).tissue_probs).T)
    _, case0 = _sitk_read(p / "imagesTr" / "case_000_0000.nii.gz")
    assert case0.max() > 0.85                                          # skull-on variant: bright shell present
    js = json.loads((p / "dataset.json").read_text())
    assert all(k in js["reference"] for k in list(dd.SOURCES) + list(dd.HELD_OUT))
    assert all(n in js["description"] for n in dd.HELD_OUT)
    record = json.loads((p / dd.BUILD_RECORD).read_text())
    assert record["num_heldout"] == 2 and record["held_out"] == list(dd.HELD_OUT) and record["num_unlabelled"] == 2
    # unlabelled whole-head cases for pretraining: in imagesTr, all-background labels, counted in numTraining
    unlabelled = [f"{dd.UNLABELLED_PREFIX}{n}_{k:03d}" for n in dd.UNLABELLED_SPM_FILES for k in range(2)]
    train = sorted(f.name[:-7] for f in (p / "labelsTr").iterdir())
    assert sorted(dd.unlabelled_case_ids(train)) == sorted(unlabelled) and len(train) == 3 + len(unlabelled)
    for c in unlabelled:
        image, label = (_sitk_read(p / d / f"{c}{e}")[1] for d, e in (("imagesTr", "_0000.nii.gz"),
                                                                        ("labelsTr", ".nii.gz")))
        assert label.max() == 0 and image.max() > 0.85                 # a head, every voxel background
    assert js["numTraining"] == 3 + len(unlabelled) and "pretraining only" in js["description"]


def test_missing_multi_source_package(monkeypatch, tmp_path):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "deepmriprep" else real(n, *a))
    if HAVE_NILEARN and HAVE_SPM:
        with pytest.raises(dd.DemoDataError, match=r"deepmriprep.*\[demo\]"):
            dd.build_demo_dataset(tmp_path, num_train=1, num_test=0, source="multi")
        assert not any(tmp_path.iterdir())
    with pytest.raises(dd.DemoDataError, match=r"pip install 'bsf-nnunet\[demo\]'"):
        dd.load_cat12_source()


def test_block_mean():
    a = np.arange(6 ** 3, dtype=np.float32).reshape(6, 6, 6)
    m = _block_mean(a, 3)
    assert m.shape == (2, 2, 2)
    assert m[1, 1, 1] == pytest.approx(a[2:5, 2:5, 2:5].mean())       # block centred on voxel 3


@pytest.mark.skipif(not HAVE_SPM, reason="spm-runtime-r2025b not installed (pip install 'bsf-nnunet[demo]')")
def test_unlabelled_whole_head_sources():
    """Colin27 and MNI305 from the SPM wheel: whole heads (skull and scalp fill much of the field of view), no tissue
    maps."""
    for name in dd.UNLABELLED_SPM_FILES:
        src = dd.load_unlabelled_source(name, 2.0)
        assert src.tissue_probs.shape == (3,) + src.image.shape and not src.tissue_probs.any()
        assert src.image.max() == pytest.approx(1.0, abs=0.05) and (src.image > 0.2).mean() > 0.3
    with pytest.raises(dd.DemoDataError, match="unknown unlabelled source"):
        dd.load_unlabelled_source("fsaverage6")


@pytest.mark.skipif(not HAVE_SPM, reason="spm-runtime-r2025b not installed (pip install 'bsf-nnunet[demo]')")
def test_spm_source_with_and_without_skull():
    head = dd.load_spm_source(2.0)
    brain_only = dd.load_spm_source(2.0, skull=False)
    for src in (head, brain_only):
        lab = dd.probs_to_label(src.tissue_probs)
        assert set(np.unique(lab)) == {0, 1, 2, 3}
        means = [src.image[lab == k].mean() for k in (1, 2, 3)]
        assert means[0] < means[1] < means[2]
    outside = dd.probs_to_label(head.tissue_probs) == 0
    assert (head.image[outside] > 0.2).sum() > 20000                  # skull and scalp, labelled background
    assert brain_only.image[dd.probs_to_label(brain_only.tissue_probs) == 0].max() < 0.8
    assert head.image.size > brain_only.image.size
