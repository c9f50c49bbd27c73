"""Intensity domain randomization for nnU-Net's training pipeline (SynthSeg's idea: Billot et al. 2023, Medical Image
Analysis, "SynthSeg: Segmentation of brain MRI scans of any contrast and resolution without retraining").

A model trained on one site's images learns "this intensity is white matter". Another scanner, or a head whose scalp
and fat are much brighter than the brain (which moves every tissue after nnU-Net's z-score), breaks that. Showing
the network images whose tissue intensities are random makes it rely on shape and context instead.

:class:`DomainRandomization` works on one training sample after nnU-Net's spatial transform (on the patch, so it is
cheap) and never changes the label map. Per sample, with probability ``p_synthetic`` every image channel is
replaced by one *generated from the label map*: each label gets a random mean and spread, and the background is
split into ``background_regions`` regions by the real image's intensity (air, scalp/fat, skull differ), each with
its own random intensity, so that the head around the brain may be brighter or darker than the brain. Otherwise,
with probability ``p_remap``, the real image is remapped per label and background region (each region's voxels
moved to a random mean and scaled around it: the contrast changes, the texture stays). Either is followed by a
smooth multiplicative bias field (``p_bias``), and the sample is z-scored over the patch again, as nnU-Net's
normalisation would have left it. nnU-Net's own transforms that follow add noise, blur, low resolution (thick
slices) and gamma.

Switch it on with a trainer whose ``bsf_domain_randomization = True`` (``BSFTrainer_DR``, ``BSFTrainer_DR_scratch``)
or, for any BSF trainer, with ``BSF_DOMAIN_RANDOMIZATION=1``. Randomness comes from numpy's and torch's global
generators, which the BSF data loader seeds per batch: a continued run (--c) draws the same images.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from batchgeneratorsv2.transforms.base.basic_transform import BasicTransform

DOMAIN_RANDOMIZATION_ENV = "BSF_DOMAIN_RANDOMIZATION"


class DomainRandomization(BasicTransform):
    """See the module docstring. Intensities are drawn in a 0..1 range, then z-scored over the patch."""

    def __init__(self, p_synthetic: float = 0.4, p_remap: float = 0.4, p_bias: float = 0.5,
                 background_regions: int = 3, max_spread: float = 0.12, bias_strength: float = 0.4,
                 bias_grid: int = 4):
        super().__init__()
        self.p_synthetic, self.p_remap, self.p_bias = p_synthetic, p_remap, p_bias
        self.background_regions, self.max_spread = int(background_regions), max_spread
        self.bias_strength, self.bias_grid = bias_strength, int(bias_grid)

    def get_parameters(self, **data_dict) -> dict:
        u = np.random.uniform()
        mode = "synthetic" if u < self.p_synthetic else "remap" if u < self.p_synthetic + self.p_remap else None
        return {"mode": mode, "bias": mode is not None and np.random.uniform() < self.p_bias}

    def apply(self, data_dict, **params):
        if params["mode"] is None or data_dict.get("segmentation") is None:
            return data_dict
        image, seg = data_dict["image"], data_dict["segmentation"][0]
        regions, n_regions = self.regions(image[0], seg)
        out = torch.empty_like(image)
        for c in range(image.shape[0]):
            if params["mode"] == "synthetic":
                x = self.synthetic(regions, n_regions)
            else:
                x = self.remapped(image[c], regions, n_regions)
            if params["bias"]:
                x = x * self.bias_field(x.shape, x.device)
            out[c] = _zscore(x)
        data_dict["image"] = out
        return data_dict

    def regions(self, reference: torch.Tensor, seg: torch.Tensor):
        """(region index per voxel, number of regions): one region per label value present (the padding -1
        included), and the background (0) split into equal-width intensity bands of ``reference`` between its 1st
        and 99th percentiles (air, dark skull / muscle, bright scalp and fat)."""
        seg = seg.long()
        values, regions = torch.unique(seg, return_inverse=True)
        n = len(values)
        if self.background_regions > 1 and bool((values == 0).any()):
            background = seg == 0
            inside = reference[background]
            sample = inside[:: max(1, inside.numel() // 20000)].float()
            lo, hi = torch.quantile(sample, torch.tensor([0.01, 0.99]))  # equal-width bands between these
            edges = lo + (hi - lo) * torch.linspace(0, 1, self.background_regions + 1)[1:-1]
            band = torch.bucketize(inside.float(), edges)  # 0 .. background_regions - 1
            regions = regions.clone()
            regions[background] = torch.where(band == 0, regions[background], n + band - 1)
            n += self.background_regions - 1
        return regions, n

    def synthetic(self, regions: torch.Tensor, n: int) -> torch.Tensor:
        """An image generated from the regions: per region N(mean, spread), means and spreads random."""
        means = torch.from_numpy(np.random.uniform(0, 1, n)).float()
        spreads = torch.from_numpy(np.random.uniform(0, self.max_spread, n)).float()
        return means[regions] + spreads[regions] * torch.randn(regions.shape)

    def remapped(self, image: torch.Tensor, regions: torch.Tensor, n: int) -> torch.Tensor:
        """The real image with each region's mean moved to a random value and its spread scaled around it."""
        lo, hi = image.min(), image.max()
        x = (image - lo) / max(float(hi - lo), 1e-6)
        counts = torch.bincount(regions.flatten(), minlength=n).clamp_min(1).float()
        region_mean = torch.bincount(regions.flatten(), weights=x.flatten().float(), minlength=n) / counts
        targets = torch.from_numpy(np.random.uniform(0, 1, n)).float()
        scales = torch.from_numpy(np.random.uniform(0.5, 1.5, n)).float()
        return targets[regions] + scales[regions] * (x - region_mean[regions])

    def bias_field(self, shape, device) -> torch.Tensor:
        """A smooth multiplicative field: a coarse random grid, upsampled, exponentiated."""
        coarse = torch.from_numpy(np.random.normal(0, self.bias_strength / 2, (1, 1) + (self.bias_grid,) * len(shape)))
        mode = "trilinear" if len(shape) == 3 else "bilinear"
        field = F.interpolate(coarse.float(), size=tuple(shape), mode=mode, align_corners=True)[0, 0]
        return torch.exp(field).to(device)


def _zscore(x: torch.Tensor) -> torch.Tensor:
    return (x - x.mean()) / x.std().clamp_min(1e-6)


def with_domain_randomization(compose, transform: DomainRandomization = None):
    """nnU-Net's training transforms (a ComposeTransforms) with ``transform`` inserted right after the spatial
    transform (and the 2D-to-3D conversion that may follow it)."""
    from batchgeneratorsv2.transforms.spatial.spatial import SpatialTransform
    from batchgeneratorsv2.transforms.utils.pseudo2d import Convert2DTo3DTransform

    steps = compose.transforms
    at = next(i for i, t in enumerate(steps) if isinstance(t, SpatialTransform)) + 1
    if at < len(steps) and isinstance(steps[at], Convert2DTo3DTransform):
        at += 1
    steps.insert(at, transform or DomainRandomization())
    return compose
