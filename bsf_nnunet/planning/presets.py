"""Read the preset JSON files shipped in ``plans/`` (installed as the package ``bsf_nnunet_plans``)."""
from __future__ import annotations

import copy
import json
from functools import lru_cache
from importlib import resources

ARCH_KEYS = ("feature_size", "depths", "num_heads")


@lru_cache(maxsize=None)
def _load(name: str) -> dict:
    try:
        text = resources.files("bsf_nnunet_plans").joinpath(name).read_text()
    except (ModuleNotFoundError, FileNotFoundError) as e:
        raise RuntimeError(
            f"bsf-nnunet's preset file {name} is missing ({e}). The installation is incomplete: reinstall with "
            "`pip install -e .` (or `pip install .`) from the bsf-nnunet checkout."
        ) from None
    return json.loads(text)


def load_preset(name: str) -> dict:
    """A deep copy of one preset file (e.g. ``variants.json``), without ``_doc`` entries."""
    return {k: v for k, v in copy.deepcopy(_load(name)).items() if not k.startswith("_")}


def variant_names() -> list:
    return sorted(load_preset("variants.json"))


def get_variant(name: str) -> dict:
    """The full preset of a variant (arch kwargs plus bookkeeping such as ``memory_bytes_per_voxel``)."""
    variants = load_preset("variants.json")
    key = str(name).lower()
    if key not in variants:
        raise ValueError(
            f"Unknown BrainSegFounder variant {name!r}. Known variants: {', '.join(sorted(variants))} "
            "(defined in plans/variants.json)."
        )
    out = variants[key]
    out["name"] = key
    return out


def variant_trainers() -> dict:
    """The variant registry: variant name -> (fine-tuning trainer, pretraining trainer), from ``variants.json``."""
    return {name: (v["trainer"], v["pretrain_trainer"]) for name, v in load_preset("variants.json").items()}


def variant_of_trainer(trainer_name: str):
    """The variant whose registry entry names ``trainer_name`` (fine-tuning or pretraining), else None."""
    for name, pair in variant_trainers().items():
        if trainer_name in pair:
            return name
    return None


def variant_arch_kwargs(name: str) -> dict:
    v = get_variant(name)
    return {k: v[k] for k in ARCH_KEYS}


def bsf_plans_defaults() -> dict:
    return load_preset("bsf_plans.json")
