"""``bsf-nnunet info``: variants, versions and whether nnU-Net can find the trainers."""
from __future__ import annotations

import os


def register(sub) -> None:
    p = sub.add_parser("info", help="show variants, versions and trainer discovery")
    p.set_defaults(func=run)


def run(args) -> int:
    from importlib.metadata import version

    import monai
    import nnunetv2  # noqa: F401
    import torch

    from .. import __version__
    from ..planning.presets import get_variant, variant_names, variant_trainers

    print(f"bsf-nnunet {__version__}, nnunetv2 {version('nnunetv2')}, monai {monai.__version__}, torch "
          f"{torch.__version__} (cuda available: {torch.cuda.is_available()})")
    print("variants (trainer: feature size, depths, heads, parameters at 4->3 channels):")
    trainers = variant_trainers()
    for n in variant_names():
        v = get_variant(n)
        print(f"  {trainers[n][0]:18s} {n:6s} fs {v['feature_size']:3d} depths {v['depths']} heads "
              f"{v['num_heads']} {v['params_m']} M")
    ext = os.environ.get("nnUNet_extTrainer", "")
    print(f"nnUNet_extTrainer = {ext or '(unset)'}")
    try:
        from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

        cls = recursive_find_trainer_class_by_name("BSFTrainer")
        print(f"trainer discovery: OK ({cls.__module__}.{cls.__name__})")
        return 0
    except Exception as e:  # report, don't crash
        print(f"trainer discovery: FAILED ({e}). Reinstall bsf-nnunet (pip install -e .) or set nnUNet_extTrainer "
              f"to the trainers/ folder of the checkout.")
        return 1
