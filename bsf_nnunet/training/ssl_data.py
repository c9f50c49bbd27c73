"""Random crops of nnU-Net preprocessed cases for self-supervised pretraining.

Reads any nnU-Net preprocessed dataset (blosc2 or numpy, via nnU-Net's dataset classes). Each batch holds
``volumes_per_batch`` cases x ``crops_per_volume`` crops. Crop centres are drawn inside the brain with probability
``foreground_probability`` (rejection sampling on the voxel under the centre: nnU-Net marks everything outside the
non-zero mask with seg = -1, and skull-stripped background is 0 in the image), so crops are rarely empty
background. Volumes smaller than the crop are padded with their minimum value.

Determinism: the sample stream of epoch ``e`` depends only on (seed, rank, e), so a run resumed at epoch ``e``
draws exactly the crops an uninterrupted run would have drawn. Under DDP each rank reads a disjoint shard of the
case list in every epoch (a seeded permutation, then ``[rank::world_size]``).

Intensities: by default the crops are nnU-Net's preprocessed (z-scored) values. With ``intensity`` (an
:class:`OfficialIntensity`, ``BSFPretrainTrainer.bsf_ssl_intensity = "official"``) each crop is mapped to the official
BrainSegFounder scale instead: MONAI's ``ScaleIntensityRanged(a_min=-1000, a_max=1000, b_min=0, b_max=1, clip=True)``
applied to raw intensities (lab-smile/BrainSegFounder ``pretrain/main_T1T2.py:275-278``,
``pretrain/utils/data_utils.py:131-133,152-154``, ``downstream/BraTS/ssl/utils/data_utils.py:173-175,194-196``).
nnU-Net keeps no raw intensities, so they are estimated (see :class:`OfficialIntensity`; docs/fidelity.md).
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

SSL_INTENSITY_MODES = ("nnunet", "official")
# a_min, a_max, b_min, b_max of the official ScaleIntensityRanged (argparse defaults, never overridden; clip=True)
OFFICIAL_INTENSITY_RANGE = (-1000.0, 1000.0, 0.0, 1.0)


def scale_intensity_range(x: np.ndarray, a_min: float, a_max: float, b_min: float, b_max: float) -> np.ndarray:
    """MONAI's ``ScaleIntensityRange`` with ``clip=True``: ``(x - a_min) / (a_max - a_min) * (b_max - b_min) + b_min``,
    clipped to ``[b_min, b_max]``."""
    y = (np.asarray(x, np.float32) - np.float32(a_min)) / np.float32(a_max - a_min)
    y = y * np.float32(b_max - b_min) + np.float32(b_min)
    return np.clip(y, min(b_min, b_max), max(b_min, b_max)).astype(np.float32, copy=False)


class OfficialIntensity:
    """nnU-Net's preprocessed case -> the official [0, 1] intensities of BrainSegFounder's SSL stages.

    The official code scales *raw* intensities: ``clip((raw + 1000) / 2000, 0, 1)``, so background (raw 0) is 0.5
    and the brain lies in [0.5, 1] (saturating at raw 1000). nnU-Net's preprocessed arrays keep no raw values, so
    they are estimated per case and channel:

    * foreground = nnU-Net's non-zero mask (``seg >= 0``: nnU-Net marks voxels outside it with -1; raw there is 0 in
      every channel); with no ``seg``, every voxel;
    * the case's preprocessed foreground values are standardised (their own mean ``m`` and sd ``s``: 0 and 1 after
      nnU-Net's z-score inside the mask) and given the dataset's raw foreground mean and sd from the plans
      (``foreground_intensity_properties_per_channel``): ``raw = (v - m) / s * raw_std + raw_mean``; background
      ``raw = 0``;
    * then the official ``ScaleIntensityRange``; voxels padded outside a volume smaller than the crop get 0 (MONAI's
      ``SpatialPadd`` pads the scaled image with the constant 0).

    What is lost: each case's own raw mean and sd (every case gets the dataset's), so cases whose scanner scale
    differs from the dataset's are not saturated or compressed as the official code would treat them."""

    pad_value = 0.0

    def __init__(self, raw_mean: Sequence[float], raw_std: Sequence[float],
                 value_range: Sequence[float] = OFFICIAL_INTENSITY_RANGE):
        self.raw_mean = np.asarray(raw_mean, np.float64).reshape(-1)
        self.raw_std = np.asarray(raw_std, np.float64).reshape(-1)
        if self.raw_mean.shape != self.raw_std.shape or not np.all(np.isfinite(self.raw_mean)) or \
                not np.all(self.raw_std > 0):
            raise ValueError(f"raw_mean / raw_std must be finite per channel with raw_std > 0, got "
                             f"{self.raw_mean.tolist()} / {self.raw_std.tolist()}")
        self.value_range = tuple(float(v) for v in value_range)
        self._stats: dict = {}

    @classmethod
    def from_plans(cls, plans: dict, num_channels: int, value_range: Sequence[float] = OFFICIAL_INTENSITY_RANGE):
        """The dataset's raw foreground mean and sd per channel from nnU-Net's fingerprint, as copied into the plans
        (``foreground_intensity_properties_per_channel``)."""
        props = plans.get("foreground_intensity_properties_per_channel") or {}
        missing = [c for c in range(num_channels) if str(c) not in props]
        if missing:
            raise ValueError(f"the plans have no foreground_intensity_properties_per_channel for channel(s) {missing}: "
                             "the official SSL intensity scale needs the dataset's raw intensity statistics")
        return cls([props[str(c)]["mean"] for c in range(num_channels)],
                   [props[str(c)]["std"] for c in range(num_channels)], value_range)

    def describe(self) -> str:
        a_min, a_max, b_min, b_max = self.value_range
        return (f"official: raw estimated per channel from the dataset's foreground mean/sd "
                f"({', '.join(f'{m:.4g}/{s:.4g}' for m, s in zip(self.raw_mean, self.raw_std))}), background 0, "
                f"then ScaleIntensityRange({a_min:g}..{a_max:g} -> {b_min:g}..{b_max:g}, clip)")

    @staticmethod
    def foreground(data, seg) -> np.ndarray:
        if seg is None:
            return np.ones(data.shape[1:], bool)
        return np.asarray(seg[0]) >= 0

    def case_stats(self, data, seg, key=None) -> tuple:
        """(m, s) per channel: mean and sd of the case's preprocessed foreground values (cached under ``key``)."""
        if key is not None and key in self._stats:
            return self._stats[key]
        if data.shape[0] != self.raw_mean.size:
            raise ValueError(f"{data.shape[0]} channels, but raw statistics for {self.raw_mean.size}")
        fg = self.foreground(data, seg)
        m, s = np.zeros(data.shape[0]), np.ones(data.shape[0])
        if fg.any():
            for c in range(data.shape[0]):
                v = np.asarray(data[c], np.float64)[fg]
                m[c], sd = v.mean(), v.std()
                s[c] = sd if sd > 1e-8 else 1.0
        if key is not None:
            self._stats[key] = (m, s)
        return m, s

    def apply(self, block: np.ndarray, fg: np.ndarray, stats: tuple) -> np.ndarray:
        """Official intensities of a (C, ...) block of preprocessed values; ``fg`` its (...) foreground mask."""
        m, s = stats
        shape = (-1,) + (1,) * (block.ndim - 1)
        raw = (np.asarray(block, np.float64) - m.reshape(shape)) / s.reshape(shape)
        raw = raw * self.raw_std.reshape(shape) + self.raw_mean.reshape(shape)
        raw = np.where(fg[None], raw, 0.0)
        return scale_intensity_range(raw, *self.value_range)


class SSLCropLoader:
    def __init__(self, dataset, identifiers: Sequence[str], crop_size: Sequence[int], volumes_per_batch: int = 1,
                 crops_per_volume: int = 2, foreground_probability: float = 0.9, seed: int = 12345, rank: int = 0,
                 world_size: int = 1, max_tries: int = 20, fixed: bool = False,
                 intensity: Optional[OfficialIntensity] = None, randomization=None):
        if not identifiers:
            raise ValueError("No cases to pretrain on: the split for this fold is empty. Check splits_final.json or "
                             "use fold 'all'.")
        self.dataset = dataset
        self.identifiers = sorted(identifiers)
        self.crop_size = [int(c) for c in crop_size]
        self.volumes_per_batch = int(volumes_per_batch)
        self.crops_per_volume = int(crops_per_volume)
        self.fg_p = float(foreground_probability)
        self.seed = int(seed)
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.max_tries = int(max_tries)
        self.fixed = fixed  # validation: the same stream every epoch
        self.intensity = intensity  # None: nnU-Net's preprocessed values
        self.randomization = randomization  # None, or a callable (crop, rng) -> crop: LabelFreeRandomization
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        e = 0 if self.fixed else self.epoch
        self.rng = np.random.default_rng([self.seed, self.rank, e])
        perm_rng = np.random.default_rng([self.seed, e])  # same permutation on every rank
        order = [self.identifiers[i] for i in perm_rng.permutation(len(self.identifiers))]
        shard = order[self.rank::self.world_size]
        self.shard = shard if shard else order  # fewer cases than ranks: every rank sees all
        self.pos = 0

    def __iter__(self):
        return self

    def _next_case(self) -> str:
        if self.pos >= len(self.shard):
            self.pos = 0
        ident = self.shard[self.pos]
        self.pos += 1
        return ident

    def _centre(self, data, seg, shape) -> list:
        for _ in range(self.max_tries):
            c = [int(self.rng.integers(0, s)) for s in shape]
            if self.rng.random() >= self.fg_p:
                return c
            if seg is not None and seg[(0, *c)] < 0:
                continue
            if any(data[(ch, *c)] != 0 for ch in range(data.shape[0])):
                return c
        return [s // 2 for s in shape]

    def _crop(self, data, seg, stats=None) -> np.ndarray:
        shape = data.shape[1:]
        c = self._centre(data, seg, shape)
        out = np.empty((data.shape[0], *self.crop_size), np.float32)
        src, dst = [], []
        for cc, s, cs in zip(c, shape, self.crop_size):
            lo = cc - cs // 2
            lo = min(max(lo, min(0, s - cs)), max(0, s - cs))  # keep inside when possible
            a, b = max(lo, 0), min(lo + cs, s)
            src.append(slice(a, b))
            dst.append(slice(a - lo, a - lo + (b - a)))
        block = np.asarray(data[(slice(None), *src)], dtype=np.float32)
        if self.intensity is not None:
            fg = self.intensity.foreground(block, None if seg is None else seg[(slice(None), *src)])
            block = self.intensity.apply(block, fg, stats)
            if block.shape[1:] != tuple(self.crop_size):
                out[:] = self.intensity.pad_value
        elif block.shape[1:] != tuple(self.crop_size):
            out[:] = block.min(axis=(1, 2, 3), keepdims=True) if block.size else 0
        out[(slice(None), *dst)] = block
        return out if self.randomization is None else self.randomization(out, self.rng)

    def __next__(self) -> dict:
        crops, keys = [], []
        for _ in range(self.volumes_per_batch):
            ident = self._next_case()
            data, seg, _, _ = self.dataset.load_case(ident)
            stats = None if self.intensity is None else self.intensity.case_stats(data, seg, ident)
            for _ in range(self.crops_per_volume):
                crops.append(self._crop(data, seg, stats))
                keys.append(ident)
        return {"data": np.stack(crops), "keys": keys}
