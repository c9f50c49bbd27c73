"""The paper's path end to end with official-format files made here: a 2-channel (T1, FLAIR) SSL checkpoint as
UK Biobank stage 1 -> stage 2 on a 4-channel BraTS-like dataset in nnU-Net's channel order -> fine-tuning chained
from it -> stopped and continued with --c -> --val -> nnUNetv2_predict. Checked at every step: the channel mapping
(by name), the stage-2 recipe, and the (x, y, z) axis order of the official weights."""
import glob
import json
import os

import torch

from bsf_nnunet.planning.presets import variant_arch_kwargs
from bsf_nnunet.ssl import BSFSSLModel

PRE = "BSFPretrainTrainer_CI__nnUNetPlans__3d_fullres"
FT = "BSFTrainer_CIpaper__nnUNetPlans__3d_fullres"
PE = "swinViT.patch_embed.proj.weight"


def _official_stage1(path):
    """An official-format stage-1 file (toy-sized): {'state_dict': {'module.swinViT.*', heads}}, T1 and FLAIR."""
    torch.manual_seed(7)
    model = BSFSSLModel(2, **variant_arch_kwargs("toy"))
    sd = model.state_dict()
    torch.save({"state_dict": {"module." + k: v for k, v in sd.items()}, "epoch": 100, "global_step": 5000}, path)
    return sd


def _log(folder):
    return "\n".join(open(f).read() for f in sorted(glob.glob(os.path.join(folder, "training_log_*.txt"))))


def _axis(plans_or_ckpt):
    plans = plans_or_ckpt["init_args"]["plans"] if "init_args" in plans_or_ckpt else plans_or_ckpt
    return plans["configurations"]["3d_fullres"]["architecture"]["arch_kwargs"]["axis_order"]


def test_paper_path_stage1_to_predict(nnunet_env, prepared, run, tmp_path, monkeypatch):
    env = nnunet_env
    dataset_id, full, raw = prepared("brats4")
    res = os.path.join(env["nnUNet_results"], full)
    stage1 = tmp_path / "model_weights_UKB-pretrain.pt"
    sd1 = _official_stage1(stage1)
    train = ["nnUNetv2_train", dataset_id, "3d_fullres", "0", "-device", "cpu"]
    # (without BSF_PRETRAINED_CHANNELS the official file is refused:
    # test_weights.test_unnamed_checkpoint_channels_refused)

    # stage 2, stopped after its first epoch and continued: the stage-2 recipe and the axis order survive --c.
    # BSF_PRETRAINED_CHANNELS stays exported for the whole chain: it names only files that record no channels
    env = dict(env, BSF_PRETRAINED_CHANNELS="T1,FLAIR")
    run(train + ["-tr", "BSFPretrainTrainer_CI", "-pretrained_weights", str(stage1)],
        dict(env, BSF_STOP_AFTER_EPOCH="0"))
    run(train + ["-tr", "BSFPretrainTrainer_CI", "--c"], env)
    s2 = torch.load(os.path.join(res, PRE, "fold_0", "checkpoint_final.pth"), weights_only=True)
    meta = s2["bsf_metadata"]
    assert meta["stage"] == 2 and meta["parent"] == str(stage1) and meta["axis_order"] == "xyz"
    assert meta["channel_names"] == ["T1", "T1ce", "T2", "FLAIR"] and meta["arch_kwargs"]["axis_order"] == "xyz"
    assert meta["recipe"]["initial_lr"] == 6e-6 and meta["recipe"]["warmup_steps"] == 6  # 500, capped at half
    assert max(s2["logging"]["lrs"]) <= 6e-6
    log = _log(os.path.join(res, PRE, "fold_0"))
    assert log.count("Stage-2 recipe (official BrainSegFounder stage 2): lr 6e-06 (stage 1: 0.0003)") == 2
    assert "model channel 3 'FLAIR' <- checkpoint channel 1 'FLAIR' (same)" in log
    assert "model channel 1 'T1ce' <- mean of all checkpoint channels" in log
    assert "adapted conv.20.weight" in log and "rotation accuracy" in log
    # after 12 steps at lr <= 6e-6 the filters are still the stage-1 ones, each on its own modality
    w, w1 = s2["network_weights"][PE], sd1[PE]
    assert torch.allclose(w[:, 0], w1[:, 0], atol=2e-3) and torch.allclose(w[:, 3], w1[:, 1], atol=2e-3)
    assert not torch.allclose(w[:, 0], w1[:, 1], atol=2e-3)
    rec_w = s2["network_weights"]["conv.20.weight"]
    assert torch.allclose(rec_w[3], sd1["conv.20.weight"][1], atol=2e-3)

    # fine-tuning chains from stage 2 (xyz), is stopped after epoch 0, continued with --c, validated with --val
    run(train + ["-tr", "BSFTrainer_CIpaper"], dict(env, BSF_STOP_AFTER_EPOCH="0"))
    folder = os.path.join(res, FT, "fold_0")
    assert _axis(torch.load(os.path.join(folder, "checkpoint_latest.pth"), weights_only=False)) == "xyz"
    run(train + ["-tr", "BSFTrainer_CIpaper", "--c"], env)
    run(train + ["-tr", "BSFTrainer_CIpaper", "--val"], env)
    log = _log(folder)
    assert "stage chaining from BSFPretrainTrainer_CI fold 0" in log
    assert "BSF_PRETRAINED_CHANNELS=T1,FLAIR not used: the checkpoint records its channels (T1, T1ce, T2, FLAIR)" in log
    seen = [line.split("CI axis order at ")[1].strip() for line in log.splitlines() if "CI axis order at " in line]
    assert len(seen) == 5 and all(s.endswith(": xyz") for s in seen), seen  # epochs 0, 1, 2, validation x2
    assert "checkpoint_latest.pth was trained on xyz arrays" in log
    assert "checkpoint_final.pth was trained on xyz arrays" in log
    assert _axis(json.load(open(os.path.join(res, FT, "plans.json")))) == "xyz"

    # prediction rebuilds the network from the results' plans.json: xyz
    run(["nnUNetv2_predict", "-i", os.path.join(raw, "imagesTs"), "-o", str(tmp_path / "pred"), "-d", dataset_id,
         "-c", "3d_fullres", "-tr", "BSFTrainer_CIpaper", "-f", "0", "-device", "cpu", "--disable_tta",
         "-npp", "1", "-nps", "1"], env)
    assert os.path.isfile(tmp_path / "pred" / "case_005.nii.gz")
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    monkeypatch.setenv("nnUNet_extTrainer", env["nnUNet_extTrainer"] + os.pathsep +
                       os.environ.get("nnUNet_extTrainer", ""))
    predictor = nnUNetPredictor(device=torch.device("cpu"))
    predictor.initialize_from_trained_model_folder(os.path.join(res, FT), (0,), "checkpoint_final.pth")
    assert getattr(predictor.network, "_orig_mod", predictor.network).axis_order == "xyz"


def test_official_schedule_lengths():
    """BSFPretrainTrainer_official (issue #31.2): stage 1 100 000 steps at a constant lr 4e-4 without warm-up;
    entering stage 2 switches to 50 000 steps, lr 6e-6, 500 warm-up steps then cosine decay."""
    from bsf_nnunet.training import BSFPretrainTrainer, BSFPretrainTrainer_official
    from bsf_nnunet.training.lr import warmup_cosine_lr

    r = BSFPretrainTrainer_official.bsf_recipe
    assert r["num_epochs"] * r["num_iterations_per_epoch"] == 100_000 and r["initial_lr"] == 4e-4
    t = object.__new__(BSFPretrainTrainer_official)
    t.__dict__.update(initial_lr=r["initial_lr"], num_epochs=r["num_epochs"], weight_decay=r["weight_decay"],
                      num_iterations_per_epoch=r["num_iterations_per_epoch"], logged=[],
                      network=torch.nn.Linear(2, 2))
    t.print_to_log_file = lambda *a, **k: t.logged.append(" ".join(map(str, a)))
    _, sched = BSFPretrainTrainer.configure_optimizers(t)
    lrs = [warmup_cosine_lr(s, sched.initial_lr, sched.max_steps, sched.warmup_steps, decay=sched.decay)
           for s in (0, 1, 50_000, 99_999)]
    assert sched.warmup_steps == 0 and lrs == [4e-4] * 4                     # constant, no warm-up
    BSFPretrainTrainer._enter_stage2(t, "stage1.pth")
    s2 = t.lr_scheduler
    assert t.num_epochs * t.num_iterations_per_epoch == 50_000 == s2.max_steps and s2.warmup_steps == 500
    assert warmup_cosine_lr(499, 6e-6, 50_000, 500) < 6e-6 and s2.decay
    assert warmup_cosine_lr(49_999, 6e-6, 50_000, 500, decay=s2.decay) < 1e-9  # decayed to ~0
    assert "50000 steps" in t.logged[-1]


def test_official_handover_trainers():
    """BSFTrainer_official / BSFPretrainTrainer_official load what the official scripts load (issue #31.1); the
    default trainers carry every tensor across by name."""
    import pytest

    from bsf_nnunet.errors import ConfigurationError
    from bsf_nnunet.training import BSFPretrainTrainer_official, BSFTrainer, BSFTrainer_official

    scope = {cls: object.__new__(cls)._handover_scope()
             for cls in (BSFTrainer, BSFTrainer_official, BSFPretrainTrainer_official)}
    assert scope == {BSFTrainer: "all", BSFTrainer_official: "official", BSFPretrainTrainer_official: "official"}
    assert BSFTrainer_official.bsf_pretrain_trainer == "BSFPretrainTrainer_official"
    odd = object.__new__(BSFTrainer)
    odd.bsf_handover = "partial"
    with pytest.raises(ConfigurationError, match="bsf_handover must be"):
        odd._handover_scope()


def _official_scale(raw):
    """MONAI's ScaleIntensityRange(a_min=-1000, a_max=1000, b_min=0, b_max=1, clip=True), written out: the official
    SSL intensities (pretrain/utils/data_utils.py:131-133, defaults pretrain/main_T1T2.py:275-278)."""
    import numpy as np

    return np.clip((raw.astype(np.float64) - (-1000.0)) / (1000.0 - (-1000.0)) * (1.0 - 0.0) + 0.0, 0.0, 1.0)


SHAPE = (40, 28, 36)  # (z, y, x); y and x smaller than the (32, 32, 64) crop: padded
CROP = (32, 32, 64)  # the toy network needs 64 on one axis; the rotation plane (y, z) is square


def _raw_and_zscored_case():
    """A two-channel raw case (some values above 1000: clipped), its nnU-Net z-scored copy and the plans' foreground
    intensity properties that describe it."""
    import numpy as np

    rng = np.random.default_rng(0)
    fg = np.zeros(SHAPE, bool)
    fg[4:36, 3:25, 5:31] = True
    raw = np.where(fg[None], rng.uniform(50, 1600, (2,) + SHAPE), 0.0)
    mean, std = raw[:, fg].mean(1), raw[:, fg].std(1)
    z = np.where(fg[None], (raw - mean[:, None, None, None]) / std[:, None, None, None], 0.0).astype(np.float32)
    seg = np.where(fg, 0, -1).astype(np.int8)[None]  # nnU-Net: -1 outside the non-zero mask
    plans = {"foreground_intensity_properties_per_channel": {
        str(c): {"mean": float(mean[c]), "std": float(std[c])} for c in range(2)}}
    return raw, z, seg, plans


def _loader_crops(z, seg, intensity=None):
    import numpy as np

    from bsf_nnunet.training.ssl_data import SSLCropLoader

    class Case:
        def load_case(self, ident):
            return z, seg, None, {}

    kw = dict(crop_size=list(CROP), volumes_per_batch=1, crops_per_volume=4, foreground_probability=0.0, seed=3)
    return np.asarray(next(SSLCropLoader(Case(), ["a"], intensity=intensity, **kw))["data"])


def _reference_crops(raw, z):
    """The loader's crop positions (seed 3) cut from the raw case by hand: scaled by the official formula and padded
    with 0, and from the z-scored case padded with its crop minimum (nnU-Net's values)."""
    import numpy as np

    ref_raw, ref_z = [], []
    rs = np.random.default_rng([3, 0, 0])
    for _ in range(4):
        c = [int(rs.integers(0, s)) for s in SHAPE]
        rs.random()
        lo = [min(max(cc - n // 2, min(0, s - n)), max(0, s - n)) for cc, s, n in zip(c, SHAPE, CROP)]
        src = tuple(slice(max(a, 0), min(a + n, s)) for a, s, n in zip(lo, SHAPE, CROP))
        dst = tuple(slice(max(a, 0) - a, max(a, 0) - a + (sl.stop - sl.start)) for a, sl in zip(lo, src))
        r, q = np.zeros((2,) + CROP), np.zeros((2,) + CROP, np.float32)
        r[(slice(None),) + dst] = _official_scale(raw[(slice(None),) + src])
        q[:] = z[(slice(None),) + src].min(axis=(1, 2, 3), keepdims=True)
        q[(slice(None),) + dst] = z[(slice(None),) + src]
        ref_raw.append(r)
        ref_z.append(q)
    return np.stack(ref_raw), np.stack(ref_z)


def test_official_ssl_intensity_matches_the_official_scaling():
    """bsf_ssl_intensity = "official" (issue #31.5): crops from nnU-Net's z-scored case equal the official
    ScaleIntensityRange of the raw crop (exactly when the case has the dataset's raw foreground mean/sd, which the
    estimate assumes), padding 0 (SpatialPadd). Off ("nnunet"): the preprocessed values, as before."""
    import numpy as np

    from bsf_nnunet.training.ssl_data import OfficialIntensity

    raw, z, seg, plans = _raw_and_zscored_case()
    on = _loader_crops(z, seg, OfficialIntensity.from_plans(plans, 2))
    ref_raw, ref_z = _reference_crops(raw, z)
    np.testing.assert_allclose(on, ref_raw, atol=1e-5)
    assert on.min() == 0.0 and on.max() == 1.0 and (on == 0.5).any()  # padding 0, clipped, background 0.5
    np.testing.assert_array_equal(_loader_crops(z, seg), ref_z)  # off: nnU-Net's values, unchanged


def test_official_inpainting_noise_is_min_max_scaled():
    """The official noise is N(0, 1) min-max scaled to [0, 1] (pretrain/utils/ops.py:39-41), whatever the crop;
    ours (the default) follows the crop's range."""
    from bsf_nnunet.ssl.views import make_views
    from bsf_nnunet.training.ssl_data import OfficialIntensity

    raw, z, seg, plans = _raw_and_zscored_case()
    crops = torch.from_numpy(_loader_crops(z, seg, OfficialIntensity.from_plans(plans, 2)))
    v = make_views(crops, torch.Generator().manual_seed(1), mode="noise", noise_range=(0.0, 1.0))
    for i in range(v["views"].shape[0]):
        painted = v["views"][i][v["masks"][i].expand_as(v["views"][i])]
        assert painted.min() == 0.0 and painted.max() == 1.0  # the last box is whole: its min and max survive
    shifted = crops * 0.5 + 0.5  # a crop range of [0.5, 1]: the default maps the noise there, the official not
    v_off = make_views(shifted, torch.Generator().manual_seed(1), mode="noise")
    v_on = make_views(shifted, torch.Generator().manual_seed(1), mode="noise", noise_range=(0.0, 1.0))
    m = v_off["masks"].expand_as(v_off["views"])
    assert v_off["views"][m].min() >= 0.5 and v_on["views"][m].min() == 0.0
    assert torch.equal(v_off["views"][~m], v_on["views"][~m]) and torch.equal(v_off["masks"], v_on["masks"])
    assert torch.equal(v_off["views"], make_views(shifted, torch.Generator().manual_seed(1), mode="noise",
                                                  noise_range=None)["views"])


def test_official_intensity_gives_the_official_losses():
    """The toy network sees the same inputs and targets as the hand-made reference: the same three losses."""
    from bsf_nnunet.ssl.losses import SSLLoss
    from bsf_nnunet.ssl.views import make_views
    from bsf_nnunet.training.ssl_data import OfficialIntensity

    raw, z, seg, plans = _raw_and_zscored_case()
    crops = torch.from_numpy(_loader_crops(z, seg, OfficialIntensity.from_plans(plans, 2)))
    torch.manual_seed(0)
    model = BSFSSLModel(2, **variant_arch_kwargs("toy"))
    losses = []
    for x in (crops, torch.from_numpy(_reference_crops(raw, z)[0]).float()):
        w = make_views(x, torch.Generator().manual_seed(2), noise_range=(0.0, 1.0))
        with torch.no_grad():
            rot, con, rec = model(w["views"])
        losses.append(SSLLoss()(rot, w["rots"], con[:4], con[4:], rec, w["targets"])[1])
    for k in ("rot", "con", "rec"):
        assert torch.allclose(losses[0][k], losses[1][k], atol=1e-4), k


def test_official_intensity_switch():
    """A class attribute, "official" in BSFPretrainTrainer_official; refused when misspelt or without the plans'
    intensity properties."""
    import pytest

    from bsf_nnunet.errors import ConfigurationError
    from bsf_nnunet.training import BSFPretrainTrainer, BSFPretrainTrainer_official
    from bsf_nnunet.training.ssl_data import OfficialIntensity

    assert BSFPretrainTrainer.bsf_ssl_intensity == "nnunet"
    assert BSFPretrainTrainer_official.bsf_ssl_intensity == "official"
    t = object.__new__(BSFPretrainTrainer_official)

    class PM:
        pass

    t.plans_manager, t.num_input_channels = PM(), 2
    t.plans_manager.plans = _raw_and_zscored_case()[3]
    assert isinstance(t._ssl_intensity(), OfficialIntensity) and t._noise_range() == (0.0, 1.0)
    d = object.__new__(BSFPretrainTrainer)
    assert d._ssl_intensity() is None and d._noise_range() is None
    t.bsf_ssl_intensity = "minmax"
    with pytest.raises(ConfigurationError, match="bsf_ssl_intensity must be one of"):
        t._ssl_intensity()
    t.bsf_ssl_intensity, t.plans_manager.plans = "official", {}
    with pytest.raises(ConfigurationError, match="foreground_intensity_properties_per_channel"):
        t._ssl_intensity()
