"""A tiny, trivially learnable synthetic dataset in nnU-Net raw format (for tests and smoke checks).

Each case is a noisy volume with one or two bright blobs; label 1 marks the blobs (and, with ``regions=True``, a
second label 2 marks a bright core inside each blob, for region-based training). Deterministic given the seed.
"""
from __future__ import annotations

import os
from typing import Sequence

import numpy as np
import SimpleITK as sitk

from ..io import atomic_path, atomic_write_json


def _write_atomic(img: sitk.Image, path: str) -> None:
    with atomic_path(path) as tmp:  # the temporary ends in .nii.gz: SimpleITK picks the format by it
        sitk.WriteImage(img, tmp)


def make_case(rng: np.random.Generator, shape: Sequence[int], num_channels: int = 1, with_core: bool = False):
    """Return (channels list of float32 arrays (z, y, x), int16 label array)."""
    shape = tuple(int(s) for s in shape)
    zz, yy, xx = np.meshgrid(*[np.arange(s, dtype=np.float32) for s in shape], indexing="ij")
    label = np.zeros(shape, np.int16)
    for _ in range(int(rng.integers(1, 3))):
        r = float(rng.uniform(0.15, 0.25) * min(shape))
        c = [float(rng.uniform(r + 1, s - r - 1)) for s in shape]
        d = np.sqrt((zz - c[0]) ** 2 + (yy - c[1]) ** 2 + (xx - c[2]) ** 2)
        label[d <= r] = 1
        if with_core:
            label[d <= 0.5 * r] = 2
    channels = []
    for ch in range(num_channels):
        img = rng.normal(0.0, 0.3, shape).astype(np.float32) + 1.0
        img[label > 0] += 2.0 + ch
        if with_core:
            img[label == 2] += 1.5
        channels.append(img)
    return channels, label


def build_synthetic_dataset(raw_dir: str, dataset_id: int = 999, name: str = "Synthetic", num_train: int = 6,
                            num_test: int = 2, shape: Sequence[int] = (40, 56, 48), num_channels: int = 1,
                            spacing: Sequence[float] = (1.0, 1.0, 1.0), regions: bool = False, seed: int = 0,
                            channel_names: Sequence[str] = None) -> str:
    """Write ``Dataset{id:03d}_{name}`` under ``raw_dir`` (imagesTr, labelsTr, imagesTs, labelsTs, dataset.json)."""
    folder = os.path.join(raw_dir, f"Dataset{int(dataset_id):03d}_{name}")
    for sub in ("imagesTr", "labelsTr", "imagesTs", "labelsTs"):
        os.makedirs(os.path.join(folder, sub), exist_ok=True)
    rng = np.random.default_rng(seed)
    sp_xyz = tuple(float(s) for s in reversed(list(spacing)))
    for i in range(num_train + num_test):
        split = "Tr" if i < num_train else "Ts"
        case = f"case_{i:03d}"
        channels, label = make_case(rng, shape, num_channels, with_core=regions)
        for c, arr in enumerate(channels):
            im = sitk.GetImageFromArray(arr)
            im.SetSpacing(sp_xyz)
            _write_atomic(im, os.path.join(folder, f"images{split}", f"{case}_{c:04d}.nii.gz"))
        lab = sitk.GetImageFromArray(label.astype(np.uint8))
        lab.SetSpacing(sp_xyz)
        _write_atomic(lab, os.path.join(folder, f"labels{split}", f"{case}.nii.gz"))
    names = list(channel_names) if channel_names else [f"T{c + 1}" if c else "T1" for c in range(num_channels)]
    if regions:
        labels = {"background": 0, "blob": [1, 2], "core": [2]}
        extra = {"regions_class_order": [1, 2]}
    else:
        labels = {"background": 0, "blob": 1}
        extra = {}
    ds = {"channel_names": {str(i): n for i, n in enumerate(names)}, "labels": labels, "numTraining": num_train,
          "file_ending": ".nii.gz", **extra}
    atomic_write_json(os.path.join(folder, "dataset.json"), ds)
    return folder
