import math

import pytest

from bsf_nnunet.planning.bsf_plans import make_bsf_plans
from bsf_nnunet.planning.presets import get_variant, variant_names
from bsf_nnunet.planning.swin_config import (
    NETWORK_CLASS_NAME,
    ConfigurationError,
    check_user_patch,
    derive_swin_configuration,
    round_patch_axis,
)


def conf(patch, batch=2, median=None):
    c = {"patch_size": list(patch), "batch_size": batch, "spacing": [1.0, 1.0, 1.0], "data_identifier": "x"}
    if median is not None:
        c["median_image_size_in_voxels"] = list(median)
    return c


@pytest.mark.parametrize("p,expected", [(1, 64), (32, 64), (64, 64), (65, 96), (96, 96), (112, 128), (160, 160)])
def test_round_patch_axis(p, expected):
    assert round_patch_axis(p) == expected


@pytest.mark.parametrize("patch", [(128, 160, 112), (40, 56, 48), (20, 320, 256), (80, 192, 160), (33, 65, 97)])
def test_derived_patch_is_valid_and_never_smaller(patch):
    new, _ = derive_swin_configuration(conf(patch), "small", memory_budget_gb=math.inf)
    assert all(p % 32 == 0 and p >= 64 for p in new["patch_size"])
    assert all(n >= p for n, p in zip(new["patch_size"], patch))
    assert new["architecture"]["network_class_name"] == NETWORK_CLASS_NAME
    assert new["architecture"]["arch_kwargs"]["depths"] == [2, 2, 6, 2]
    assert new["architecture"]["arch_kwargs"]["merging"] == "legacy"
    assert new["data_identifier"] == "x" and new["spacing"] == [1.0, 1.0, 1.0]
    assert new["bsf"]["planned_patch_size"] == list(patch)


def test_anisotropic_small_image_is_padded_and_reported():
    new, notes = derive_swin_configuration(conf((16, 160, 160), median=(12, 150, 170)), "toy", memory_budget_gb=100)
    assert new["patch_size"] == [64, 160, 160]
    assert any("pads" in n for n in notes)


def test_memory_lowers_batch_then_patch():
    c = conf((128, 128, 128), batch=2)
    one = derive_swin_configuration(c, "small", memory_budget_gb=1e9)[0]
    assert one["batch_size"] == 2 and one["patch_size"] == [128, 128, 128]
    from bsf_nnunet.planning.swin_config import estimate_training_memory_gb

    b1 = estimate_training_memory_gb("small", [128] * 3, 1)
    lowered, notes = derive_swin_configuration(c, "small", memory_budget_gb=b1 + 0.01)
    assert lowered["batch_size"] == 1 and lowered["patch_size"] == [128, 128, 128]
    shrunk, notes = derive_swin_configuration(c, "small", memory_budget_gb=b1 * 0.8)
    assert shrunk["batch_size"] == 1 and min(shrunk["patch_size"]) >= 64
    assert math.prod(shrunk["patch_size"]) < 128 ** 3
    assert any("memory" in n for n in notes)
    with pytest.raises(ConfigurationError, match="does not fit the memory budget"):
        derive_swin_configuration(c, "large", memory_budget_gb=1.0)


def test_patch_cap_for_toy():
    new, _ = derive_swin_configuration(conf((128, 160, 112)), "toy", patch_cap=64, memory_budget_gb=math.inf)
    assert new["patch_size"] == [64, 64, 64]


def test_unknown_variant_and_2d_config_are_clear():
    with pytest.raises(ValueError, match="Unknown BrainSegFounder variant 'huge'.*small"):
        derive_swin_configuration(conf((64, 64, 64)), "huge")
    with pytest.raises(ConfigurationError, match="3D configuration"):
        derive_swin_configuration(conf((512, 512)), "small")


def test_user_patch_rounding_and_refusal():
    assert check_user_patch([128, 128, 128]) == ([128, 128, 128], "")
    rounded, note = check_user_patch([100, 128, 50])
    assert rounded == [128, 128, 64] and "rounded" in note
    with pytest.raises(ConfigurationError, match="100 -> 96 or 128"):
        check_user_patch([100, 128, 128], allow_round=False)


def test_variants_preset():
    assert variant_names() == ["big", "large", "small", "tiny", "toy"]
    assert get_variant("SMALL")["depths"] == [2, 2, 6, 2]


def test_make_bsf_plans_requires_3d_fullres():
    plans = {"plans_name": "nnUNetPlans", "configurations": {"2d": conf((256, 256))}}
    with pytest.raises(ConfigurationError, match="no 3d_fullres"):
        make_bsf_plans(plans, "BSFPlans", "small", [96, 96, 96], 2)
    plans["configurations"]["3d_fullres"] = conf((80, 96, 80))
    new, _ = make_bsf_plans(plans, "BSFPlans", "small", [96, 96, 96], 2)
    assert list(new["configurations"]) == ["3d_fullres"]
    c = new["configurations"]["3d_fullres"]
    assert c["patch_size"] == [96, 96, 96] and c["data_identifier"] == "BSFPlans_3d_fullres"
    assert new["plans_name"] == "BSFPlans"


# table-driven fuzz of plans configurations: every broken entry gives a ConfigurationError that says what to do,
# never a TypeError/KeyError from deep inside, and valid-but-odd ones work
BROKEN_CONFIGS = {
    "no_patch": ({"batch_size": 2}, "3D configuration"),
    "patch_2d": (conf((256, 256)), "3D configuration"),
    "patch_4d": (conf((64, 64, 64, 64)), "3D configuration"),
    "patch_strings": (dict(conf((64, 64, 64)), patch_size=["a", "b", "c"]), "patch_size"),
    "patch_zero": (conf((0, 64, 64)), "patch_size"),
    "patch_negative": (conf((-64, 64, 64)), "patch_size"),
    "patch_none": (dict(conf((64, 64, 64)), patch_size=None), "3D configuration"),
    "batch_zero": (conf((64, 64, 64), batch=0), "batch_size"),
    "batch_string": (conf((64, 64, 64), batch="two"), "batch_size"),
    "median_garbage": (conf((64, 64, 64), median=["x", 1, 2]), "median_image_size_in_voxels"),
    "not_a_dict": ([64, 64, 64], "configuration"),
}


@pytest.mark.parametrize("name", sorted(BROKEN_CONFIGS))
def test_broken_configurations_are_refused_clearly(name):
    c, phrase = BROKEN_CONFIGS[name]
    with pytest.raises(ConfigurationError, match=phrase):
        derive_swin_configuration(c, "toy", memory_budget_gb=math.inf)


@pytest.mark.parametrize("variant,phrase", [("", "Unknown BrainSegFounder variant"), (None, "variant"),
                                            ("smal", "Unknown BrainSegFounder variant 'smal'")])
def test_broken_variant_names(variant, phrase):
    with pytest.raises(ValueError, match=phrase):
        derive_swin_configuration(conf((64, 64, 64)), variant, memory_budget_gb=math.inf)


def test_float_patch_and_huge_batch_still_work():
    new, notes = derive_swin_configuration(dict(conf((100.0, 64, 64), batch=1000)), "toy", memory_budget_gb=8)
    assert new["patch_size"] == [128, 64, 64] and 1 <= new["batch_size"] < 1000
    assert any("batch size" in n for n in notes)


def test_variant_registry_is_the_one_source():
    """plans/variants.json names each variant's trainers; classes, __all__, info and the loader's hint derive."""
    import bsf_nnunet.training as training
    from bsf_nnunet.planning.presets import variant_names, variant_of_trainer, variant_trainers
    from bsf_nnunet.weights.architecture import _trainer_hint

    registry = variant_trainers()
    assert sorted(registry) == variant_names()
    for variant, (ft, pt) in registry.items():
        assert getattr(training, ft).bsf_variant == variant
        assert getattr(training, pt).bsf_variant == variant
        assert getattr(training, ft).bsf_pretrain_trainer == pt  # stage chaining within the variant
        assert {ft, pt} <= set(training.__all__)
        assert variant_of_trainer(ft) == variant_of_trainer(pt) == variant
        assert f"-tr {ft}" in _trainer_hint(variant, None) and f"-tr {pt}" in _trainer_hint(variant, None)
    assert training.BSFTrainer_ToyFast.bsf_pretrain_trainer == "BSFPretrainTrainer_ToyFast"  # explicit wins

    class BSFTrainer_NewTiny(training.BSFTrainer):  # a new trainer = one subclass line
        bsf_variant = "tiny"

    assert BSFTrainer_NewTiny.bsf_pretrain_trainer == "BSFPretrainTrainer_Tiny"
