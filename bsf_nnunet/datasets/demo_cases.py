"""Random demo cases (see :mod:`.demo_data`): :func:`make_case` applies one random spatial transform (rotation,
scaling, translation, a smooth elastic field, optional flips) to a :class:`~.demo_sources.DemoSource`'s T1 and tissue
maps alike, labels the argmax of the warped maps (:func:`probs_to_label`) and changes the image's intensities."""
from __future__ import annotations

import numpy as np
from scipy import ndimage

from .demo_sources import HEAD_LEVEL, DemoSource, _bbox


def probs_to_label(tissue_probs: np.ndarray, brain_threshold: float = 0.5) -> np.ndarray:
    """uint8 label: 0 where sum(probs) < threshold, else 1 + argmax over (CSF, GM, WM)."""
    brain = tissue_probs.sum(0) >= brain_threshold
    return np.where(brain, np.argmax(tissue_probs, axis=0) + 1, 0).astype(np.uint8)


def _bspline_matrix(n_out: int, step_out: float, ctrl_spacing: float) -> tuple[np.ndarray, int]:
    """Cubic B-spline weights (n_out x n_ctrl) for points 0, step_out, ... on a lattice of ctrl_spacing.

    The basis is non-negative and sums to one, so the field never exceeds its control values.
    """
    u = np.arange(n_out) * step_out / ctrl_spacing                       # lattice coordinates
    ks = np.arange(-2, int(np.ceil(u[-1] if n_out else 0)) + 3)           # control points covering u
    t = np.abs(u[:, None] - ks[None, :])
    w = np.where(t < 1, (4 - 6 * t ** 2 + 3 * t ** 3) / 6,
                 np.where(t < 2, (2 - t) ** 3 / 6, 0.0))
    return w, len(ks)


def _smooth_field(rng: np.random.Generator, shape, spacing: float, ctrl_mm: float, std: float,
                  n_components: int) -> np.ndarray:
    """Random smooth field(s): Gaussian control values (clipped to +-3 std), cubic B-spline upsampling."""
    mats = [_bspline_matrix(n, spacing, ctrl_mm) for n in shape]
    ctrl = rng.standard_normal((n_components,) + tuple(m[1] for m in mats)) * std
    ctrl = np.clip(ctrl, -3 * std, 3 * std)
    # separable tensor-product evaluation: c[k, a, b, c] -> f[k, i, j, l]
    f = np.einsum("kabc,ia->kibc", ctrl, mats[0][0], optimize=True)
    f = np.einsum("kibc,jb->kijc", f, mats[1][0], optimize=True)
    f = np.einsum("kijc,lc->kijl", f, mats[2][0], optimize=True)
    return f.astype(np.float32)


def _rotation(angles_rad: np.ndarray) -> np.ndarray:
    a, b, c = angles_rad
    rx = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    ry = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]])
    rz = np.array([[np.cos(c), -np.sin(c), 0], [np.sin(c), np.cos(c), 0], [0, 0, 1]])
    return rz @ ry @ rx


def make_case(source: DemoSource, rng: np.random.Generator | int | None = None, *,
              rotation_deg: float = 10.0, scaling: float = 0.10, translation_mm: float = 10.0,
              elastic_mm: float = 3.0, elastic_grid_mm: float = 30.0,
              intensity: bool = True, gamma_range: tuple[float, float] = (0.7, 1.5),
              bias_strength: float = 0.12, bias_grid_mm: float = 60.0,
              noise_range: tuple[float, float] = (0.01, 0.04), thick_prob: float = 0.0,
              thick_range: tuple[float, float] = (2.0, 4.0), flip_prob: float = 0.0,
              crop: bool = True, margin_mm: float = 4.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One random case ``(image float32 (X,Y,Z), label uint8 (X,Y,Z), affine 4x4 RAS)``.

    Spatial: rotation U(+-rotation_deg) about each axis, per-axis scale U(1 +- scaling), translation
    U(+-translation_mm), plus an elastic field (control values N(0, elastic_mm) on a elastic_grid_mm
    lattice, cubic B-spline, so |displacement| <= 3*elastic_mm). The same mapping samples the image and
    the tissue maps; label = argmax of the warped maps. Intensity (image only, if ``intensity``):
    gamma in gamma_range, bias field exp(N(0, bias_strength) on a bias_grid_mm lattice), Gaussian noise
    with std U(noise_range) inside the head; the background stays exactly 0. With probability ``thick_prob``
    one random axis gets thick slices (box average over U(thick_range) voxels, then every k-th slice
    linearly interpolated back: the look of a thick-slice acquisition resampled to the grid); with probability
    ``flip_prob`` each array axis is reversed (the affine too, so world positions are kept: nnU-Net sees
    another voxel order). A whole-head source (image bright outside the brain) keeps its skull and scalp in the
    field of view; they are labelled background.

    ``crop=True``: the output grid is fitted to the deformed brain (+ ``margin_mm``), so shapes differ
    between cases. ``crop=False``: the output grid is the source grid (same shape/affine for every
    seed; parts of the brain may leave the field of view).
    Spatial random numbers are drawn before intensity ones, so ``intensity=False`` with the same seed
    gives the same geometry (and label) as ``intensity=True``.
    """
    rng = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
    image_src, probs_src, src_aff = source
    spacing = float(np.linalg.norm(src_aff[:3, :3], axis=0).mean())

    # --- spatial transform (forward: template -> subject, y = c + t + F (x - c)) ---
    angles = np.deg2rad(rng.uniform(-rotation_deg, rotation_deg, 3))
    scales = rng.uniform(1 - scaling, 1 + scaling, 3)
    trans = rng.uniform(-translation_mm, translation_mm, 3)
    F = _rotation(angles) @ np.diag(scales)
    brain_src = probs_src.sum(0) > 0
    lo, hi = _bbox(brain_src) if brain_src.any() else (np.zeros(3, int), np.array(brain_src.shape) - 1)
    head_src = brain_src | (image_src > HEAD_LEVEL * float(image_src.max(initial=0)))
    if head_src.any():
        lo, hi = _bbox(head_src)
    c = src_aff[:3, :3] @ ((lo + hi) / 2) + src_aff[:3, 3]               # brain centre (world)
    if crop:
        pad = 3 * elastic_mm + margin_mm + 2 * spacing
        shape, origin = _fitted_grid(src_aff, lo, hi, c, trans, F, pad, spacing)
    else:
        shape, origin = image_src.shape, src_aff[:3, 3].copy()
    disp = (_smooth_field(rng, shape, spacing, elastic_grid_mm, elastic_mm, 3)
            if elastic_mm > 0 else np.zeros((3,) + tuple(shape), np.float32))
    coords = _source_coords(src_aff, F, c, trans, origin, spacing, shape, disp)
    image = np.clip(_warp(image_src, coords), 0, None).astype(np.float32)
    label = probs_to_label(np.stack([_warp(p, coords) for p in probs_src]))
    flips = rng.random(3) < flip_prob if flip_prob > 0 else np.zeros(3, bool)
    keep = (label > 0) | (image > HEAD_LEVEL * float(image_src.max(initial=0)))

    # --- intensity (image only) ---
    if intensity:
        image = _change_intensity(rng, image, spacing, gamma_range, noise_range, bias_strength, bias_grid_mm)
    if thick_prob > 0 and rng.random() < thick_prob:
        image = _thick_slices(image, int(rng.integers(3)), float(rng.uniform(*thick_range)))
    if crop and keep.any():
        image, label, origin = _crop_to_mask(image, label, keep, origin, spacing, margin_mm)
    affine = np.diag([spacing, spacing, spacing, 1.0])
    affine[:3, 3] = origin
    image, label, affine = _flip(image, label, affine, flips)
    return np.ascontiguousarray(image), np.ascontiguousarray(label), affine


def _thick_slices(image: np.ndarray, axis: int, factor: float) -> np.ndarray:
    """Box average over ``factor`` voxels along ``axis``, keep every round(factor)-th slice, interpolate back."""
    k = max(2, int(round(factor)))
    blurred = ndimage.uniform_filter1d(image, size=k, axis=axis, mode="nearest")
    n = image.shape[axis]
    pos = np.arange(n) / k                                  # kept slices 0, k, 2k, ... -> positions 0, 1, 2, ...
    low = np.take(blurred, np.arange(0, n, k), axis=axis)
    lo_idx = np.minimum(np.floor(pos).astype(int), low.shape[axis] - 1)
    hi_idx = np.minimum(lo_idx + 1, low.shape[axis] - 1)
    w = (pos - lo_idx).astype(np.float32).reshape([-1 if a == axis else 1 for a in range(image.ndim)])
    out = np.take(low, lo_idx, axis=axis) * (1 - w) + np.take(low, hi_idx, axis=axis) * w
    return np.where(image > 0, out, 0).astype(np.float32)


def _flip(image: np.ndarray, label: np.ndarray, affine: np.ndarray, flips: np.ndarray) -> tuple:
    """Reverse the flagged array axes; the affine follows so every voxel keeps its world position."""
    affine = affine.copy()
    for ax in np.flatnonzero(flips):
        affine[:3, 3] += affine[:3, ax] * (image.shape[ax] - 1)
        affine[:3, ax] *= -1
        image, label = np.flip(image, ax), np.flip(label, ax)
    return image, label, affine


def _fitted_grid(src_aff: np.ndarray, lo: np.ndarray, hi: np.ndarray, c: np.ndarray, trans: np.ndarray,
                 F: np.ndarray, pad: float, spacing: float) -> tuple[tuple[int, ...], np.ndarray]:
    """Shape and origin (world) of an output grid around the transformed source box lo..hi, plus pad mm."""
    corners = np.array([[a, b, d] for a in (lo[0], hi[0]) for b in (lo[1], hi[1]) for d in (lo[2], hi[2])])
    wc = corners @ src_aff[:3, :3].T + src_aff[:3, 3]
    yc = c + trans + (wc - c) @ F.T
    y_lo, y_hi = yc.min(0) - pad, yc.max(0) + pad
    shape = tuple(int(v) for v in np.ceil((y_hi - y_lo) / spacing).astype(int) + 1)
    return shape, y_lo


def _source_coords(src_aff: np.ndarray, F: np.ndarray, c: np.ndarray, trans: np.ndarray, origin: np.ndarray,
                   spacing: float, shape, disp: np.ndarray) -> np.ndarray:
    """(3, *shape) source voxel indices sampled by each output voxel (inverse transform plus elastic field)."""
    F_inv = np.linalg.inv(F)
    src_inv = np.linalg.inv(src_aff)
    M = src_inv[:3, :3] @ F_inv                                          # world offset -> source index
    b = src_inv[:3, :3] @ (c - F_inv @ (c + trans)) + src_inv[:3, 3]
    grid = [origin[a] + spacing * np.arange(shape[a], dtype=np.float64) for a in range(3)]
    coords = np.empty((3,) + tuple(shape), np.float64)
    for r in range(3):
        coords[r] = (M[r, 0] * grid[0][:, None, None] + M[r, 1] * grid[1][None, :, None]
                     + M[r, 2] * grid[2][None, None, :] + b[r])
        # elastic displacement is defined in subject world mm; map it into source index units
        coords[r] += (src_inv[r, 0] * disp[0] + src_inv[r, 1] * disp[1] + src_inv[r, 2] * disp[2])
    return coords


def _warp(a: np.ndarray, coords: np.ndarray) -> np.ndarray:
    return ndimage.map_coordinates(a, coords, order=1, mode="constant", cval=0.0, prefilter=False)


def _change_intensity(rng: np.random.Generator, image: np.ndarray, spacing: float, gamma_range, noise_range,
                      bias_strength: float, bias_grid_mm: float) -> np.ndarray:
    """Gamma, smooth bias field and Gaussian noise inside the brain (random numbers drawn in this order)."""
    gamma = float(np.exp(rng.uniform(np.log(gamma_range[0]), np.log(gamma_range[1]))))
    noise_std = float(rng.uniform(*noise_range))
    bias = (_smooth_field(rng, image.shape, spacing, bias_grid_mm, bias_strength, 1)[0]
            if bias_strength > 0 else 0.0)
    fg = image > 0
    img = np.power(image, gamma, dtype=np.float32) * np.exp(bias, dtype=np.float32)
    noise = rng.standard_normal(img.shape, dtype=np.float32) * np.float32(noise_std)
    return np.where(fg, np.clip(img + noise, 0, None), 0).astype(np.float32)


def _crop_to_mask(image: np.ndarray, label: np.ndarray, mask: np.ndarray, origin: np.ndarray, spacing: float,
                  margin_mm: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Image and label cut to the bounding box of ``mask`` plus margin_mm, and the new origin."""
    llo, lhi = _bbox(mask)
    m = int(np.ceil(margin_mm / spacing))
    llo = np.maximum(llo - m, 0)
    lhi = np.minimum(lhi + m, np.array(label.shape) - 1)
    sl = tuple(slice(int(a), int(b2) + 1) for a, b2 in zip(llo, lhi, strict=True))
    return image[sl], label[sl], origin + spacing * llo
