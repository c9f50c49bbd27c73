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
smooth multiplicative bias field (``p_bias``), and the sample is z-scored again over its brain voxels, as the
robust normalisation would have left it. Otherwise, with probability ``p_head``, only the head around the brain
changes: the brighter background bands move to a random brightness, and a skull-stripped case gets a painted skull,
scalp and face/neck tissue (``p_paint``); the brain keeps the values the plans' normalisation gave it. nnU-Net's own
transforms that follow add noise, blur, low resolution (thick slices) and gamma.

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
    """See the module docstring. Synthetic and remapped intensities are drawn in a 0..1 range, then z-scored over the
    brain; the head mode works in the normalised values."""

    def __init__(self, p_synthetic: float = 0.15, p_remap: float = 0.25, p_head: float = 0.4, p_bias: float = 0.5,
                 background_regions: int = 3, max_spread: float = 0.12, bias_strength: float = 0.4,
                 bias_grid: int = 4, head_range: tuple[float, float] = (-3.0, 4.0), p_paint: float = 0.7):
        super().__init__()
        self.p_synthetic, self.p_remap, self.p_head, self.p_bias = p_synthetic, p_remap, p_head, p_bias
        self.head_range, self.p_paint = head_range, p_paint
        self.background_regions, self.max_spread = int(background_regions), max_spread
        self.bias_strength, self.bias_grid = bias_strength, int(bias_grid)

    def get_parameters(self, **data_dict) -> dict:
        u = np.random.uniform()
        edges = np.cumsum([self.p_synthetic, self.p_remap, self.p_head])
        mode = ("synthetic", "remap", "head", None)[int(np.searchsorted(edges, u, side="right"))]
        return {"mode": mode, "bias": mode is not None and np.random.uniform() < self.p_bias,
                "paint": mode == "head" and np.random.uniform() < self.p_paint}

    def apply(self, data_dict, **params):
        if params["mode"] is None or data_dict.get("segmentation") is None:
            return data_dict
        image, seg = data_dict["image"], data_dict["segmentation"][0]
        regions, n_regions, first_band = self.regions(image[0], seg)
        brain = seg > 0
        out = torch.empty_like(image)
        for c in range(image.shape[0]):
            if params["mode"] == "head":
                x = self.head_remapped(image[c], regions, first_band, brain)
                out[c] = self.painted_head(x, (seg == 0) & (regions < first_band), brain) if params["paint"] else x
                continue
            if params["mode"] == "synthetic":
                x = self.synthetic(regions, n_regions)
            else:
                x = self.remapped(image[c], regions, n_regions)
            if params["bias"]:
                x = x * self.bias_field(x.shape, x.device)
            out[c] = _zscore(x, brain)
        data_dict["image"] = out
        return data_dict

    def regions(self, reference: torch.Tensor, seg: torch.Tensor):
        """(region index per voxel, number of regions, index of the first brighter background band): one region per
        label value present (the padding -1 included), and the background (0) split into equal-width intensity bands
        of ``reference`` between its 1st and 99th percentiles (air, dark skull / muscle, bright scalp and fat), unless
        that range is narrower than the tissues' standard deviation (noisy air only); the darkest band keeps
        the background's own index, the others are numbered from the third value on."""
        seg = seg.long()
        values, regions = torch.unique(seg, return_inverse=True)
        n = first_band = len(values)
        if self.background_regions > 1 and bool((values == 0).any()):
            background = seg == 0
            inside = reference[background]
            sample = inside[:: max(1, inside.numel() // 20000)].float()
            lo, hi = torch.quantile(sample, torch.tensor([0.01, 0.99]))  # equal-width bands between these
            tissue = reference[seg > 0] if bool((seg > 0).any()) else reference.flatten()
            if float(hi - lo) < float(tissue.float().std()):           # only noisy air: one background region
                return regions, n, first_band
            edges = lo + (hi - lo) * torch.linspace(0, 1, self.background_regions + 1)[1:-1]
            band = torch.bucketize(inside.float(), edges)  # 0 .. background_regions - 1
            regions = regions.clone()
            regions[background] = torch.where(band == 0, regions[background], n + band - 1)
            n += self.background_regions - 1
        return regions, n, first_band

    def synthetic(self, regions: torch.Tensor, n: int) -> torch.Tensor:
        """An image generated from the regions: per region N(mean, spread), means and spreads random."""
        means = torch.from_numpy(np.random.uniform(0, 1, n)).float()
        spreads = torch.from_numpy(np.random.uniform(0, self.max_spread, n)).float()
        return means[regions] + spreads[regions] * torch.randn(regions.shape)

    def remapped(self, image: torch.Tensor, regions: torch.Tensor, n: int) -> torch.Tensor:
        """The real image with each region's mean moved to a random value and its spread scaled around it."""
        lo, hi = image.min(), image.max()
        x = (image - lo) / max(float(hi - lo), 1e-6)
        return _moved_per_region(x, regions, n, torch.from_numpy(np.random.uniform(0, 1, n)).float())

    def head_remapped(self, image: torch.Tensor, regions: torch.Tensor, first_band: int,
                      brain: torch.Tensor) -> torch.Tensor:
        """The real (already normalised) image with only the brighter background bands (skull, muscle, scalp, fat:
        regions ``first_band`` and up) moved to random means of ``head_range`` brain standard deviations around
        the brain's mean, keeping their texture; the brain and the darkest band (air) stay as they are, so the
        tissues keep the values the plans' normalisation gives them."""
        n = int(regions.max()) + 1
        if n <= first_band:
            return image
        centre, spread = _centre_and_spread(image, brain)
        targets = centre + spread * torch.from_numpy(np.random.uniform(*self.head_range, n)).float()
        moved = _moved_per_region(image, regions, n, targets)
        return torch.where(regions >= first_band, moved, image).to(image.dtype)

    def painted_head(self, image: torch.Tensor, air: torch.Tensor, brain: torch.Tensor) -> torch.Tensor:
        """Paint, where there is air around the brain (a skull-stripped case), two shells of random thickness: a
        dark skull (darker than CSF, which the labels count as brain) and a scalp whose brightness is drawn from
        ``head_range`` (often brighter than white matter); labels stay background. A whole-head case has its own
        skull there and is left as it is."""
        if not bool(brain.any()) or not bool(air.any()):
            return image
        centre, spread = _centre_and_spread(image, brain)
        levels = (np.random.uniform(-4.5, -2.5), np.random.uniform(*self.head_range))
        inner, out = brain[None, None].float(), image.clone()
        for level, (lo, hi) in zip(levels, ((1, 3), (2, 5))):
            t = int(np.random.randint(lo, hi + 1))
            outer = F.max_pool3d(inner, 2 * t + 1, stride=1, padding=t)
            shell = (outer[0, 0] > 0) & (inner[0, 0] == 0) & air
            noise = 0.15 * spread * torch.randn(int(shell.sum()))
            out[shell] = (centre + level * spread + noise).to(out.dtype)
            inner = outer
        return self.clutter(out, air & (inner[0, 0] == 0), centre, spread)

    def clutter(self, image: torch.Tensor, outside: torch.Tensor, centre: float, spread: float) -> torch.Tensor:
        """Fill random smooth blobs of the air outside the painted head with tissue of random brightness (brain-like
        included), as the face, neck and muscles of a whole-head scan: the network learns that only what lies
        inside the skull is brain."""
        if not bool(outside.any()):
            return image
        field = self.bias_field(image.shape, image.device).log()            # smooth, zero-mean
        blobs = (field > np.random.uniform(0.0, 0.3)) & outside
        levels = centre + spread * torch.from_numpy(np.random.uniform(*self.head_range, 2)).float()
        which = self.bias_field(image.shape, image.device).log() > 0       # two kinds of tissue
        texture = 0.2 * spread * torch.randn(image.shape)
        filled = torch.where(which, levels[0], levels[1]) + texture
        return torch.where(blobs, filled.to(image.dtype), image)

    def bias_field(self, shape, device) -> torch.Tensor:
        """A smooth multiplicative field drawn from numpy's global generator."""
        coarse = np.random.normal(0, self.bias_strength / 2, (self.bias_grid,) * len(shape))
        return torch.exp(_upsampled(coarse, shape)).to(device)


def _upsampled(coarse: np.ndarray, shape) -> torch.Tensor:
    """The coarse random grid ``coarse`` interpolated linearly to ``shape`` (a bias field's logarithm)."""
    mode = "trilinear" if len(shape) == 3 else "bilinear"
    return F.interpolate(torch.from_numpy(coarse)[None, None].float(), size=tuple(shape), mode=mode,
                         align_corners=True)[0, 0]


def randomization_wanted(switch) -> bool:
    """A trainer's ``bsf_domain_randomization``, or where that is None, the ``BSF_DOMAIN_RANDOMIZATION`` switch."""
    from .. import settings

    return bool(settings.value(DOMAIN_RANDOMIZATION_ENV)) if switch is None else bool(switch)


def _centre_and_spread(image: torch.Tensor, brain: torch.Tensor) -> tuple[float, float]:
    """Mean and standard deviation of the brain voxels (of the whole image when the patch has none)."""
    inside = image[brain] if bool(brain.any()) else image.flatten()
    return float(inside.mean()), max(float(inside.std()), 1e-6)


def _moved_per_region(x: torch.Tensor, regions: torch.Tensor, n: int, targets: torch.Tensor) -> torch.Tensor:
    """``x`` with each region's mean moved to ``targets[region]`` and its spread around it scaled by a random
    0.5-1.5 per region (drawn after ``targets``, from numpy's generator): the contrast changes, the texture stays."""
    counts = torch.bincount(regions.flatten(), minlength=n).clamp_min(1).float()
    region_mean = torch.bincount(regions.flatten(), weights=x.flatten().float(), minlength=n) / counts
    scales = torch.from_numpy(np.random.uniform(0.5, 1.5, n)).float()
    return targets[regions] + scales[regions] * (x - region_mean[regions])


def _zscore(x: torch.Tensor, brain: torch.Tensor | None = None) -> torch.Tensor:
    """z-score with the statistics of the brain voxels (labels > 0) where the patch has some, as the robust
    normalisation (the centre of the head) would give; else of the whole patch."""
    ref = x[brain] if brain is not None and int(brain.sum()) > 100 else x
    return (x - ref.mean()) / ref.std().clamp_min(1e-6)


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


class LabelFreeRandomization:
    """Intensity randomization without labels, for the crops of self-supervised pretraining (``BSFPretrainTrainer``
    with ``bsf_domain_randomization``, or ``BSF_DOMAIN_RANDOMIZATION=1``): pretraining sees unlabelled volumes, so
    there is no label map to draw per-tissue intensities from. Instead, with probability ``p``, each channel of a
    crop goes through a random intensity curve: piecewise linear between the crop's quantiles at ``levels`` evenly
    spaced ranks, each mapped to a random level in 0..1 (in any order, so tissues may swap brightness as between T1
    and T2, and scalp and fat may end up darker or brighter than the brain), then, with probability ``p_bias``, a
    smooth multiplicative bias field, then a z-score over the crop. Draws come from the ``rng`` given to each call
    (the SSL loader's, seeded per epoch: --c repeats them)."""

    def __init__(self, p: float = 0.5, levels: int = 6, p_bias: float = 0.5, bias_strength: float = 0.4,
                 bias_grid: int = 4):
        if levels < 2:
            raise ValueError(f"LabelFreeRandomization: levels must be >= 2, got {levels}")
        self.p, self.levels, self.p_bias = p, int(levels), p_bias
        self.bias_strength, self.bias_grid = bias_strength, int(bias_grid)

    def __call__(self, crop: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """``crop`` (channels, *spatial), randomized (a new array) or returned as it is."""
        if rng.random() >= self.p:
            return crop
        out = np.empty_like(crop, dtype=np.float32)
        for c in range(crop.shape[0]):
            x = self.curve(crop[c], rng)
            if rng.random() < self.p_bias:
                x = x * self.bias_field(x.shape, rng)
            out[c] = (x - x.mean()) / max(float(x.std()), 1e-6)
        return out

    def curve(self, x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """``x`` through a random piecewise-linear curve whose knots are its own quantiles."""
        sample = x.ravel()[:: max(1, x.size // 20000)]
        knots = np.quantile(sample, np.linspace(0, 1, self.levels)).astype(np.float64)
        knots = knots + np.arange(self.levels) * 1e-6  # strictly increasing where quantiles tie (constant air)
        return np.interp(x, knots, rng.uniform(0, 1, self.levels)).astype(np.float32)

    def bias_field(self, shape, rng: np.random.Generator) -> np.ndarray:
        """A smooth multiplicative field drawn from ``rng``."""
        return np.exp(_upsampled(rng.normal(0, self.bias_strength / 2, (self.bias_grid,) * len(shape)), shape).numpy())
