"""``bsf-nnunet info``: versions, variants and whether ``nnUNetv2_train`` finds the trainers.

Discovery is checked in a new Python process that looks the trainer up exactly as ``nnUNetv2_train`` does (it
imports nnU-Net's training entry point, then calls nnU-Net's own lookup), so ``info`` reports what a training would
meet and nothing else. Checking in this process instead was wrong: nnU-Net's lookup iterates ``sys.modules`` while
reading each module's ``__file__``, and a lazily loaded module (``importlib.util.LazyLoader``) that this process had
imported runs its imports during that loop ("dictionary changed size during iteration", issue #27), which
``nnUNetv2_train`` never meets. Versions come from the installed metadata, so nothing heavy is imported here.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time

from ..versions import installed_version

DISCOVERY_TIMEOUT_S = 300
# what nnUNetv2_train does before it looks the trainer up (nnunetv2.run.run_training's imports), then the lookup
DISCOVERY_SCRIPT = (
    "import nnunetv2.run.run_training\n"
    "import torch\n"
    "from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name as find\n"
    "c = find('BSFTrainer')\n"
    "print('BSF_FOUND', c.__module__ + '.' + c.__name__, 'cuda', torch.cuda.is_available(), flush=True)\n"
)


def register(sub) -> None:
    p = sub.add_parser("info", help="show versions, variants and whether nnUNetv2_train finds the trainers")
    p.set_defaults(func=run)


def check_discovery(env=None) -> tuple:
    """(found, what): ``found`` is True when a new process finds BSFTrainer as nnUNetv2_train would; ``what`` is
    the class and whether CUDA is available there, or the end of that process's output."""
    try:
        p = subprocess.run([sys.executable, "-c", DISCOVERY_SCRIPT], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           text=True, errors="replace", env=env, timeout=DISCOVERY_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return False, f"the lookup did not finish within {DISCOVERY_TIMEOUT_S} s"
    found = [line.split() for line in p.stdout.splitlines() if line.startswith("BSF_FOUND ")]
    if p.returncode == 0 and found:
        _, cls, _, cuda = found[-1]
        return True, f"{cls} (cuda available: {cuda})"
    tail = [line for line in p.stdout.strip().splitlines() if line.strip()][-3:]
    return False, " / ".join(tail) or f"exit code {p.returncode}, no output"


def run(args) -> int:
    from .. import __version__
    from ..planning.presets import get_variant, variant_names, variant_trainers

    print(f"bsf-nnunet {__version__}, nnunetv2 {installed_version('nnunetv2')}, monai {installed_version('monai')}, "
          f"torch {installed_version('torch')}, Python {sys.version.split()[0]}")
    print("variants (trainer: feature size, depths, heads, parameters at 4->3 channels):")
    trainers = variant_trainers()
    for n in variant_names():
        v = get_variant(n)
        print(f"  {trainers[n][0]:18s} {n:6s} fs {v['feature_size']:3d} depths {v['depths']} heads "
              f"{v['num_heads']} {v['params_m']} M")
    from ..settings import table

    print("settings (environment variables: current value, default, what it does):")
    print(table())
    print(f"nnUNet_extTrainer = {os.environ.get('nnUNet_extTrainer', '') or '(unset)'}")
    t0 = time.perf_counter()
    ok, what = check_discovery()
    took = f"{time.perf_counter() - t0:.1f} s"
    if ok:
        print(f"trainer discovery: OK, nnUNetv2_train -tr BSFTrainer finds {what} ({took} in a new process)")
        return 0
    print(f"trainer discovery: FAILED in a new process, as nnUNetv2_train would ({what}; {took}). Reinstall "
          "bsf-nnunet (pip install -e .) or set nnUNet_extTrainer to the trainers/ folder of the checkout.")
    return 1
