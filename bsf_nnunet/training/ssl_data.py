"""Random crops of nnU-Net preprocessed cases for self-supervised pretraining.

Reads any nnU-Net preprocessed dataset (blosc2 or numpy, via nnU-Net's dataset classes). Each batch holds
``volumes_per_batch`` cases x ``crops_per_volume`` crops. Crop centres are drawn inside the brain with probability
``foreground_probability`` (rejection sampling on the voxel under the centre: nnU-Net marks everything outside the
non-zero mask with seg = -1, and skull-stripped background is 0 in the image), so crops are rarely empty
background. Volumes smaller than the crop are padded with their minimum value.

Determinism: the sample stream of epoch ``e`` depends only on (seed, rank, e), so a run resumed at epoch ``e``
draws exactly the crops an uninterrupted run would have drawn. Under DDP each rank reads a disjoint shard of the
case list in every epoch (a seeded permutation, then ``[rank::world_size]``).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np


class SSLCropLoader:
    def __init__(self, dataset, identifiers: Sequence[str], crop_size: Sequence[int], volumes_per_batch: int = 1,
                 crops_per_volume: int = 2, foreground_probability: float = 0.9, seed: int = 12345, rank: int = 0,
                 world_size: int = 1, max_tries: int = 20, fixed: bool = False):
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

    def _crop(self, data, seg) -> np.ndarray:
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
        if block.shape[1:] != tuple(self.crop_size):
            out[:] = block.min(axis=(1, 2, 3), keepdims=True) if block.size else 0
        out[(slice(None), *dst)] = block
        return out

    def __next__(self) -> dict:
        crops, keys = [], []
        for _ in range(self.volumes_per_batch):
            ident = self._next_case()
            data, seg, _, _ = self.dataset.load_case(ident)
            for _ in range(self.crops_per_volume):
                crops.append(self._crop(data, seg))
                keys.append(ident)
        return {"data": np.stack(crops), "keys": keys}
