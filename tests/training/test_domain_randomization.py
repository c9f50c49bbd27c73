"""Issue #28: intensity domain randomization (a trainer option) and a normalization that ignores the scalp."""
import os
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from bsf_nnunet.training.domain_randomization import DomainRandomization, with_domain_randomization


def _sample(seed=0, shape=(40, 48, 40)):
    """A head-like patch: background with a bright rim (scalp) and dark air, CSF 1, GM 2, WM 3, padding -1."""
    g = torch.Generator().manual_seed(seed)
    seg = torch.zeros((1,) + shape, dtype=torch.int16)
    seg[0, 8:32, 8:40, 8:32] = 1
    seg[0, 10:30, 10:38, 10:30] = 2
    seg[0, 14:26, 14:34, 14:26] = 3
    seg[0, :, :, :2] = -1
    means = {-1: 0.0, 0: 0.1, 1: 0.3, 2: 0.6, 3: 1.0}
    img = torch.zeros((1,) + shape)
    for label, m in means.items():
        img[0][seg[0] == label] = m
    img[0, 2:6] += 2.5 * (seg[0, 2:6] == 0)  # a bright scalp band in the background
    img += 0.02 * torch.randn(img.shape, generator=g)
    return img, seg


def _label_means(img, seg):
    return {int(v): float(img[0][seg[0] == v].mean()) for v in (0, 1, 2, 3)}


@pytest.mark.parametrize("mode", ["synthetic", "remap"])
def test_randomization_changes_intensities_per_label_and_never_the_labels(mode):
    t = DomainRandomization(p_synthetic=1.0 if mode == "synthetic" else 0.0, p_remap=1.0, p_head=0.0, p_bias=0.5)
    img, seg = _sample()
    orders = set()
    for seed in range(12):
        np.random.seed(seed)
        torch.manual_seed(seed)
        out = t(image=img.clone(), segmentation=seg.clone())
        assert torch.equal(out["segmentation"], seg)  # the label map is identical
        x = out["image"]
        assert x.shape == img.shape and torch.isfinite(x).all()
        brain = x[0][seg[0] > 0]                 # z-scored over the brain, as the robust normalisation leaves it
        assert abs(float(brain.mean())) < 1e-3 and abs(float(brain.std()) - 1) < 1e-3
        means = _label_means(x, seg)
        orders.add(tuple(sorted(means, key=means.get)))
        for v in (1, 2, 3):  # each tissue stays one population (its own intensity), not a mixture
            region = x[0][seg[0] == v]
            assert float(region.std()) < 0.6 * float(x.std()) + 0.5
    # the tissues' order of brightness is random: WM is not always the brightest (contrast inversions happen)
    assert len(orders) >= 4, orders


def test_remap_keeps_texture_within_a_label():
    t = DomainRandomization(p_synthetic=0.0, p_remap=1.0, p_head=0.0, p_bias=0.0)
    img, seg = _sample()
    np.random.seed(3)
    out = t(image=img.clone(), segmentation=seg.clone())["image"]
    wm = seg[0] == 3
    a, b = img[0][wm], out[0][wm]
    corr = float(torch.corrcoef(torch.stack([a, b]))[0, 1])
    assert abs(corr) > 0.99  # an affine map of the same voxels


def test_head_mode_changes_only_the_head_around_the_brain():
    """The 'head' mode moves the skull / scalp bands to random brightness (below the brain, or brighter than white
    matter) and leaves the brain and the air exactly as the plans' normalisation gave them."""
    t = DomainRandomization(p_synthetic=0.0, p_remap=0.0, p_head=1.0, p_paint=0.0)
    img, seg = _sample()
    scalp = (seg[0] == 0) & (img[0] > 1.0)
    keep = (seg[0] != 0) | (img[0] < 0.3)                      # brain, padding and air
    wm_mean, relations = float(img[0][seg[0] == 3].mean()), set()
    for seed in range(20):
        np.random.seed(seed)
        out = t(image=img.clone(), segmentation=seg.clone())
        x = out["image"][0]
        assert torch.equal(out["segmentation"], seg) and torch.equal(x[keep], img[0][keep])
        assert not torch.allclose(x[scalp], img[0][scalp])
        relations.add(float(x[scalp].mean()) > wm_mean)
    assert relations == {True, False}                          # the scalp is sometimes brighter than WM, sometimes not


def test_head_mode_paints_a_head_around_a_skull_stripped_brain():
    """A skull-stripped case (air right outside the brain) gets shells of skull and a scalp of random
    brightness all around the brain, and blobs of tissue further out (face, neck); the brain and the labels stay."""
    t = DomainRandomization(p_synthetic=0.0, p_remap=0.0, p_head=1.0, p_paint=1.0)
    img, seg = _sample()
    img[0][(seg[0] == 0)] = 0.1                                      # no scalp: air only
    brain = seg[0] > 0
    shell = (torch.nn.functional.max_pool3d(brain[None, None].float(), 3, stride=1, padding=1)[0, 0] > 0) & \
        (seg[0] == 0)
    wm_mean, brighter = float(img[0][seg[0] == 3].mean()), set()
    for seed in range(10):
        np.random.seed(seed)
        out = t(image=img.clone(), segmentation=seg.clone())
        x = out["image"][0]
        assert torch.equal(out["segmentation"], seg) and torch.equal(x[brain], img[0][brain])
        painted = x != img[0]
        assert bool(painted[shell].all())                                 # the first shell is closed
        brighter.add(float(x[painted].max()) > wm_mean)
    assert brighter == {True, False}


def test_same_seed_same_image():
    t = DomainRandomization()
    img, seg = _sample()
    outs = []
    for _ in range(2):
        np.random.seed(7)
        torch.manual_seed(7)
        outs.append(t(image=img.clone(), segmentation=seg.clone())["image"])
    assert torch.equal(outs[0], outs[1])  # the seeded batch stream (and --c) draws the same images


def test_background_is_split_into_intensity_regions():
    img, seg = _sample()
    regions, n, first_band = DomainRandomization(background_regions=3).regions(img[0], seg[0])
    assert n == 5 + 2 and first_band == 5  # labels -1, 0, 1, 2, 3 and two more background bands
    background = regions[seg[0] == 0]
    assert len(torch.unique(background)) == 2  # air and the bright band (the middle band is empty here)
    scalp = regions[2:6][seg[0, 2:6] == 0]  # the bright band: one region of its own
    assert len(torch.unique(scalp)) == 1 and int(scalp[0]) not in set(regions[20:][seg[0, 20:] == 0].tolist())


def _trainer(switch):
    from bsf_nnunet.training.finetune import BSFTrainer

    fake = SimpleNamespace(bsf_domain_randomization=switch, print_to_log_file=lambda *a, **k: None)
    return BSFTrainer.get_training_transforms.__get__(fake)


def test_trainer_switch_puts_it_right_after_the_spatial_transform(monkeypatch):
    from batchgeneratorsv2.transforms.spatial.spatial import SpatialTransform

    args = ((64, 64, 64), (-0.5, 0.5), None, (0, 1, 2), False)
    names = [type(t).__name__ for t in _trainer(True)(*args).transforms]
    assert names[names.index(SpatialTransform.__name__) + 1] == "DomainRandomization"
    assert "DomainRandomization" not in [type(t).__name__ for t in _trainer(False)(*args).transforms]
    monkeypatch.setenv("BSF_DOMAIN_RANDOMIZATION", "1")  # the switch for any BSF trainer
    assert "DomainRandomization" in [type(t).__name__ for t in _trainer(None)(*args).transforms]
    monkeypatch.setenv("BSF_DOMAIN_RANDOMIZATION", "0")
    assert "DomainRandomization" not in [type(t).__name__ for t in _trainer(None)(*args).transforms]
    transforms = _trainer(True)(*args)
    img, seg = _sample(shape=(70, 70, 70))
    out = transforms(image=img, segmentation=seg.clamp_min(0))  # nnU-Net's whole pipeline runs with it
    assert out["image"].shape == (1, 64, 64, 64)


def test_dr_trainers_are_registered():
    from bsf_nnunet.training import BSFTrainer_DR, BSFTrainer_DR_scratch, BSFTrainer_ToyFastDR, __all__

    assert BSFTrainer_DR.bsf_domain_randomization and not BSFTrainer_DR_scratch.bsf_use_pretraining
    assert BSFTrainer_ToyFastDR.bsf_domain_randomization
    assert {"BSFTrainer_DR", "BSFTrainer_DR_scratch", "BSFTrainer_ToyFastDR"} <= set(__all__)
    _ = with_domain_randomization  # the helper trainers use


# ---------------------------------------------------------------------------------------------- normalization
def _head(scalp):
    """A 3-D head: air 0, scalp/fat rim of intensity ``scalp``, brain with CSF 30, GM 60, WM 100 (+ noise)."""
    rng = np.random.default_rng(0)
    z, y, x = np.mgrid[:60, :60, :60] - 30
    r = np.sqrt(z ** 2 + y ** 2 + x ** 2)
    img = np.zeros((60, 60, 60), np.float32)
    img[r < 28] = scalp
    img[r < 24] = 30
    img[r < 21] = 60
    img[r < 14] = 100
    return img + rng.normal(0, 2, img.shape).astype(np.float32) * (r < 28), r


def test_robust_normalization_does_not_follow_the_scalp():
    from nnunetv2.preprocessing.normalization.default_normalization_schemes import ZScoreNormalization

    from bsf_nnunet.planning.normalization import RobustZScoreNormalization

    def wm_value(cls, scalp):
        img, r = _head(scalp)
        out = cls(use_mask_for_norm=False, intensityproperties={}).run(img.copy())
        return float(np.median(out[r < 10]))

    robust = [wm_value(RobustZScoreNormalization, s) for s in (40, 150, 400)]
    zscore = [wm_value(ZScoreNormalization, s) for s in (40, 150, 400)]
    assert max(robust) - min(robust) < 0.25 * (max(zscore) - min(zscore)), (robust, zscore)


def test_nnunet_finds_the_robust_scheme_by_name_in_a_new_process():
    """The install's start-up hook adds it to nnU-Net's normalization module, where nnU-Net's preprocessing (and
    so nnUNetv2_plan_and_preprocess and nnUNetv2_predict) looks plans' scheme names up."""
    code = ("import os, nnunetv2\n"
            "from nnunetv2.utilities.find_class_by_name import recursive_find_python_class\n"
            "c = recursive_find_python_class(os.path.join(nnunetv2.__path__[0], 'preprocessing', 'normalization'), "
            "'RobustZScoreNormalization', 'nnunetv2.preprocessing.normalization')\n"
            "print(c.__module__, c.__name__)\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                       env=dict(os.environ))
    assert p.returncode == 0 and "bsf_nnunet.planning.normalization RobustZScoreNormalization" in p.stdout, p


def test_plans_name_the_scheme_for_every_channel():
    from bsf_nnunet.errors import ConfigurationError
    from bsf_nnunet.planning.bsf_plans import make_bsf_plans

    conf = {"patch_size": [64, 64, 64], "batch_size": 2, "spacing": [2, 2, 2], "median_image_size_in_voxels":
            [80, 96, 80], "normalization_schemes": ["ZScoreNormalization"] * 2, "use_mask_for_norm": [False] * 2,
            "data_identifier": "x", "architecture": {"network_class_name": "x", "arch_kwargs": {},
                                                     "_kw_requires_import": []}}
    plans = {"plans_name": "nnUNetPlans", "configurations": {"3d_fullres": conf}}
    new, _ = make_bsf_plans(plans, "BSFPlans", "toy", [64, 64, 64], 2, normalization="robust")
    assert new["configurations"]["3d_fullres"]["normalization_schemes"] == ["RobustZScoreNormalization"] * 2
    with pytest.raises(ConfigurationError, match="use one of zscore, robust"):
        make_bsf_plans(plans, "BSFPlans", "toy", [64, 64, 64], 2, normalization="minmax")


# ------------------------------------------------------------------------- label-free, for pretraining crops
def test_label_free_randomization_remaps_intensities_and_keeps_the_anatomy():
    """Each randomized crop is z-scored, keeps its structures' boundaries (voxels of one tissue stay alike), and
    across draws the tissues change brightness order (inversions included); the same generator state gives the same
    crop, and a crop not drawn for randomization comes back untouched."""
    from bsf_nnunet.training.domain_randomization import LabelFreeRandomization

    img, seg = _sample()
    crop = img.numpy()
    t = LabelFreeRandomization(p=1.0)
    orders = set()
    for seed in range(12):
        out = t(crop, np.random.default_rng(seed))
        assert out.shape == crop.shape and out.dtype == np.float32
        assert abs(out.mean()) < 1e-3 and abs(out.std() - 1) < 1e-3
        means = {v: float(out[0][seg[0].numpy() == v].mean()) for v in (1, 2, 3)}
        spread = max(float(out[0][seg[0].numpy() == v].std()) for v in (1, 2, 3))
        assert spread < 0.5 * (max(means.values()) - min(means.values())) + 0.2  # tissues stay distinguishable
        orders.add(tuple(sorted(means, key=means.get)))
        np.testing.assert_array_equal(out, t(crop, np.random.default_rng(seed)))
    assert len(orders) >= 3 and any(o[-1] != 3 for o in orders)  # in some draws WM is not the brightest
    assert LabelFreeRandomization(p=0.0)(crop, np.random.default_rng(0)) is crop


def test_pretraining_randomizes_training_crops_only(monkeypatch):
    """BSF_DOMAIN_RANDOMIZATION (or bsf_domain_randomization) gives the pretraining trainer's training loader a
    LabelFreeRandomization; without it the crop stream is exactly the one without the option; it refuses to combine
    with the official intensities."""
    from bsf_nnunet.errors import ConfigurationError
    from bsf_nnunet.training import BSFPretrainTrainer, BSFPretrainTrainer_DR, BSFPretrainTrainer_ToyFastDR, __all__
    from bsf_nnunet.training.domain_randomization import LabelFreeRandomization
    from bsf_nnunet.training.ssl_data import SSLCropLoader

    assert {"BSFPretrainTrainer_DR", "BSFPretrainTrainer_ToyDR", "BSFPretrainTrainer_ToyFastDR"} <= set(__all__)
    plain = object.__new__(BSFPretrainTrainer)
    plain.print_to_log_file = lambda *a, **k: None
    monkeypatch.delenv("BSF_DOMAIN_RANDOMIZATION", raising=False)
    assert plain._ssl_randomization() is None
    monkeypatch.setenv("BSF_DOMAIN_RANDOMIZATION", "1")
    assert isinstance(plain._ssl_randomization(), LabelFreeRandomization)
    monkeypatch.delenv("BSF_DOMAIN_RANDOMIZATION")
    for cls in (BSFPretrainTrainer_DR, BSFPretrainTrainer_ToyFastDR):
        t = object.__new__(cls)
        t.print_to_log_file = lambda *a, **k: None
        assert isinstance(t._ssl_randomization(), LabelFreeRandomization)
        t.bsf_ssl_intensity = "official"
        with pytest.raises(ConfigurationError, match="official intensities"):
            t._ssl_randomization()

    img, seg = _sample(shape=(70, 70, 70))

    class Case:  # the one method of nnU-Net's dataset classes that the loader uses
        def load_case(self, ident):
            return img.numpy(), seg.numpy(), None, {}

    def stream(randomization, seed=3):
        loader = SSLCropLoader(Case(), ["a"], [64, 64, 64], crops_per_volume=4, seed=seed,
                               randomization=randomization)
        return [next(loader)["data"] for _ in range(3)]

    plain_crops, again = stream(None), stream(None)
    randomized = stream(LabelFreeRandomization())
    for a, b in zip(plain_crops, again):
        np.testing.assert_array_equal(a, b)
    changed = [not np.allclose(r, p) for rb, pb in zip(randomized, plain_crops) for r, p in zip(rb, pb)]
    assert 0 < sum(changed) < len(changed)  # about half of the crops (p = 0.5)
    for a, b in zip(randomized, stream(LabelFreeRandomization())):
        np.testing.assert_array_equal(a, b)  # seeded per epoch by the loader: --c draws the same crops
