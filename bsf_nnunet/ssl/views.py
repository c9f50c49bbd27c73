"""Augmented views for BrainSegFounder's self-supervised tasks, made on the training device.

* ``random_rotation``: each batch item rotated by k * 90 degrees (k = 0..3 is the label) in one plane, by default
  the axial plane of nnU-Net's (z, y, x) arrays, i.e. dims (3, 4) of a (B, C, Z, Y, X) tensor.
* ``inpainting_mask``: random boxes (each side between ``min_block_fraction`` and ``max_block_fraction`` of its
  axis) replaced either by Gaussian noise with the mean and standard deviation of the box's original values, or by
  the same box of another sample of the batch. Per sample a target coverage is drawn uniformly in
  [0, max_fraction) and boxes are taken in order while the sum of their volumes stays within it (at least one box),
  so the masked fraction never exceeds ``max_fraction``. Where boxes overlap, the later box's fill wins.
* ``make_views``: two views per crop, each rotated then masked; the rotated un-masked crops are the reconstruction
  targets (as in MONAI's Swin-UNETR pretraining, which BrainSegFounder used).

Randomness: every random choice is drawn from a CPU ``torch.Generator`` (small tensors, then moved to the data's
device), so a seed gives identical views. The Gaussian noise itself is drawn on the data's device: from the given
generator on CPU, and on CUDA from a device generator seeded from it (reproducible on the same device type).

Nothing loops over voxels: rotation is one gather through a cached index table; the boxes are expanded into
flat voxel indices with two levels of ``repeat_interleave`` (boxes -> rows -> voxels) whose sizes are known on the
host, so no device synchronisation is needed; box statistics are segment sums (``index_add_``); overlaps are
resolved with ``scatter_reduce(amax)`` of the box index; the fill is one ``index_put_``. Work is proportional to
the masked volume plus a few passes over the batch.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import torch

MASK_MODES = ("noise", "paste", "mixed")
DEFAULT_PLANE = (3, 4)

_ROT_TABLES: dict = {}


def _check_generator(generator: Optional[torch.Generator]) -> Optional[torch.Generator]:
    if generator is not None and torch.device(generator.device).type != "cpu":
        raise ValueError("views take a CPU torch.Generator (random choices are drawn on the host and moved to the "
                         f"data's device); got a generator on {generator.device}")
    return generator


def _plane_dims(x: torch.Tensor, plane: Sequence[int]) -> Tuple[int, int]:
    if len(plane) != 2:
        raise ValueError(f"plane must be two dimensions, got {plane!r}")
    a, b = (int(p) % x.dim() for p in plane)
    if a == b or 0 in (a, b):
        raise ValueError(f"plane must be two distinct non-batch dimensions of a {x.dim()}-d tensor, got {plane!r}")
    if x.shape[a] != x.shape[b]:
        raise ValueError(
            f"rotation by 90 degrees in dims {(a, b)} needs equal sizes there (cubic crops), got shape "
            f"{tuple(x.shape)}")
    return a, b


def _rotation_table(n: int, device: torch.device) -> torch.Tensor:
    """(4, n*n) long: entry k holds, for each output position of an n x n plane, its source position under
    ``torch.rot90(., k, (0, 1))``."""
    key = (n, str(device))
    t = _ROT_TABLES.get(key)
    if t is None:
        ar = torch.arange(n * n).view(n, n)
        t = torch.stack([torch.rot90(ar, k, (0, 1)).reshape(-1) for k in range(4)]).to(device)
        _ROT_TABLES[key] = t
    return t


def _rotate(x: torch.Tensor, k: torch.Tensor, plane: Tuple[int, int], out: Optional[torch.Tensor] = None):
    """Rotate item i of x by k[i] * 90 degrees in ``plane`` (same as torch.rot90(x[i], k[i], plane - 1))."""
    n = x.shape[plane[0]]
    b = x.shape[0]
    xm = x.movedim(plane, (-2, -1))
    flat = xm.reshape(b, -1, n * n)
    idx = _rotation_table(n, x.device)[k.to(x.device)].unsqueeze(1).expand(b, flat.shape[1], n * n)
    default = plane == (x.dim() - 2, x.dim() - 1)
    if out is not None and default and out.is_contiguous():
        torch.gather(flat, 2, idx, out=out.view(b, -1, n * n))
        return out
    r = torch.gather(flat, 2, idx).view(xm.shape).movedim((-2, -1), plane)
    if out is not None:
        out.copy_(r)
        return out
    return r.contiguous()


def random_rotation(x: torch.Tensor, generator: Optional[torch.Generator] = None,
                    plane: Sequence[int] = DEFAULT_PLANE) -> Tuple[torch.Tensor, torch.Tensor]:
    """Rotate each item of ``x`` (B, C, ...) by a random multiple of 90 degrees in ``plane``.

    Returns (rotated, labels) with labels (B,) long on x's device; ``torch.rot90(rotated[i], -labels[i],
    plane - 1)`` gives back ``x[i]``."""
    generator = _check_generator(generator)
    dims = _plane_dims(x, plane)
    k = torch.randint(0, 4, (x.shape[0],), generator=generator)
    return _rotate(x, k, dims), k.to(x.device)


# ----------------------------------------------------------------------------------------------------- inpainting
def _validate_mask_args(spatial, max_fraction, max_block_fraction, min_block_fraction, mode):
    if mode not in MASK_MODES:
        raise ValueError(f"mode must be one of {MASK_MODES}, got {mode!r}")
    if not 0.0 <= max_fraction <= 1.0:
        raise ValueError(f"max_fraction must be in [0, 1], got {max_fraction}")
    if not 0.0 < min_block_fraction <= max_block_fraction <= 1.0:
        raise ValueError("need 0 < min_block_fraction <= max_block_fraction <= 1, got "
                         f"{min_block_fraction}, {max_block_fraction}")
    lo = [max(1, int(min_block_fraction * n)) for n in spatial]
    hi = [max(l, int(max_block_fraction * n)) for l, n in zip(lo, spatial)]
    if max_fraction > 0 and math.prod(hi) > max_fraction * math.prod(spatial):
        raise ValueError(f"a single box of up to {hi} voxels can exceed max_fraction={max_fraction} of "
                         f"{tuple(spatial)}; lower max_block_fraction")
    return lo, hi


def draw_blocks(batch: int, spatial: Sequence[int], generator: Optional[torch.Generator] = None,
                max_fraction: float = 0.3, max_block_fraction: float = 0.25, min_block_fraction: float = 0.05,
                mode: str = "mixed", group_size: Optional[int] = None) -> dict:
    """Draw the boxes of ``inpainting_mask`` on the host (CPU tensors; exposed for tests and benchmarks).

    Returns a dict with ``starts`` and ``sizes`` (A, 3) long, ``batch`` (A,) long (the sample of each box, boxes of
    a sample in painting order), ``paste`` (A,) bool and ``source`` (B,) long (the sample pasted from; itself where
    the group has one sample, in which case every box is filled with noise)."""
    generator = _check_generator(generator)
    spatial = [int(s) for s in spatial]
    if len(spatial) != 3:
        raise ValueError(f"inpainting works on 3D crops, got spatial shape {spatial}")
    lo, hi = _validate_mask_args(spatial, max_fraction, max_block_fraction, min_block_fraction, mode)
    group = batch if group_size is None else int(group_size)
    if group < 1 or batch % group:
        raise ValueError(f"group_size {group} must divide the batch size {batch}")
    vox = math.prod(spatial)
    mean_vol = math.prod((l + h) / 2 for l, h in zip(lo, hi))
    k_max = int(min(4096, math.ceil(2 * max_fraction * vox / mean_vol) + 8))
    lo_t, hi_t, n_t = (torch.tensor(v, dtype=torch.long) for v in (lo, hi, spatial))

    target = torch.rand(batch, generator=generator, dtype=torch.float64) * (max_fraction * vox)
    u = torch.rand(batch, k_max, 3, generator=generator, dtype=torch.float64)
    sizes = torch.minimum(lo_t + (u * (hi_t - lo_t + 1)).long(), hi_t)
    u = torch.rand(batch, k_max, 3, generator=generator, dtype=torch.float64)
    starts = torch.minimum((u * (n_t - sizes + 1)).long(), n_t - sizes)
    p_paste = {"noise": 0.0, "paste": 1.0, "mixed": 0.5}[mode]
    paste = torch.rand(batch, k_max, generator=generator) < p_paste
    shift = torch.randint(1, max(group, 2), (batch,), generator=generator)
    i = torch.arange(batch)
    source = (i // group) * group + (i % group + shift) % group if group > 1 else i.clone()
    if group == 1:
        paste[:] = False

    vol = sizes.prod(-1)
    count = (vol.cumsum(1) <= target.unsqueeze(1)).sum(1).clamp_min(1)
    if max_fraction == 0:
        count.zero_()
    active = torch.arange(k_max).unsqueeze(0) < count.unsqueeze(1)
    b_idx, k_idx = active.nonzero(as_tuple=True)  # row-major: sample by sample, boxes in order
    return {"starts": starts[b_idx, k_idx], "sizes": sizes[b_idx, k_idx], "batch": b_idx,
            "paste": paste[b_idx, k_idx], "source": source}


def _apply_blocks(x: torch.Tensor, blocks: dict, generator: Optional[torch.Generator]):
    """Fill the boxes of ``blocks`` in a copy of x (B, C, Z, Y, X). Returns (masked, mask (B, 1, Z, Y, X) bool).

    All boxes are expanded into one flat list of voxels (noise boxes first, then pasted ones; each box's voxels
    contiguous, in row-major order), built as boxes -> rows (runs along X) -> voxels with ``repeat_interleave``.
    The list lengths are computed on the host from the box sizes, so nothing waits for the device."""
    b, c, z, y, xx = x.shape
    dev = x.device
    vox = z * y * xx
    total = b * c * vox
    out_buf = torch.empty(total + 1, dtype=x.dtype, device=dev)  # last element: sink for overwritten voxels
    masked = out_buf[:-1].view_as(x)
    masked.copy_(x)
    a = int(blocks["batch"].numel())
    if a == 0:
        return masked, torch.zeros((b, 1, z, y, xx), dtype=torch.bool, device=dev)

    # host: per-box table, noise boxes first (stable, so painting order is kept within each part)
    paste = blocks["paste"]
    order = torch.argsort(paste.to(torch.uint8), stable=True)
    n_noise_boxes = int((~paste).sum())
    # painting rank of each box within its sample (a sample's boxes are consecutive in ``blocks``)
    first_of_sample = torch.searchsorted(blocks["batch"], blocks["batch"])
    rank = (torch.arange(a) - first_of_sample)[order]
    sizes, starts, bidx = blocks["sizes"][order], blocks["starts"][order], blocks["batch"][order]
    # owner map: the painting rank + 1 of the box that wins each voxel (0: none). uint8 on CPU; int32 on other
    # devices, where scatter_reduce runs on atomics
    small = dev.type == "cpu" and int(rank.max()) < 255
    key_dtype = torch.uint8 if small else torch.int32
    rows = sizes[:, 0] * sizes[:, 1]
    vol = rows * sizes[:, 2]
    n_rows, n_vox = int(rows.sum()), int(vol.sum())
    n_noise_vox = int(vol[:n_noise_boxes].sum())
    base = bidx * vox + starts[:, 0] * (y * xx) + starts[:, 1] * xx + starts[:, 2]
    src_delta = (blocks["source"][bidx] - bidx) * (c * vox)
    tab = torch.stack([rows, torch.cumsum(rows, 0) - rows, sizes[:, 1], sizes[:, 2], base, vol, src_delta,
                       rank + 1, bidx * ((c - 1) * vox)], 0).to(dev)
    rows_d, rows_first, sy_d, sx_d, base_d, vol_d, delta_d, key_d, chan_off_d = tab.unbind(0)

    # device: rows, then voxels; sp = spatial index of each listed voxel in (B, Z, Y, X)
    row_box = torch.repeat_interleave(torch.arange(a, device=dev), rows_d, output_size=n_rows)
    local = torch.arange(n_rows, device=dev) - rows_first.index_select(0, row_box)
    sy_r = sy_d.index_select(0, row_box)
    dz = torch.div(local, sy_r, rounding_mode="floor")
    row_len = sx_d.index_select(0, row_box)
    row_off = base_d.index_select(0, row_box) + dz * (y * xx) + (local - dz * sy_r) * xx \
        - (torch.cumsum(row_len, 0) - row_len)
    row_of = torch.repeat_interleave(row_len, output_size=n_vox)  # row of each voxel
    sp = torch.arange(n_vox, device=dev).add_(row_off.index_select(0, row_of))

    # overlaps: the box painted last wins (amax of the painting rank, per voxel)
    key = key_d.to(key_dtype).index_select(0, row_box).index_select(0, row_of)
    owner = torch.zeros(b * vox, dtype=key_dtype, device=dev)
    owner.scatter_reduce_(0, sp, key, "amax")
    winner = owner.index_select(0, sp) == key
    mask = owner.bool().view(b, 1, z, y, xx)
    del owner, key

    # index of the voxel's values in x.reshape(-1): (N,) for one channel, (C, N) otherwise
    if c > 1:
        lin = sp + chan_off_d.index_select(0, row_box).index_select(0, row_of)
        lin = lin.unsqueeze(0) + (torch.arange(c, device=dev) * vox).unsqueeze(1)
    else:
        lin = sp
    xflat = x.reshape(-1)

    def _write(idx, win, vals):
        out_buf.scatter_(0, torch.where(win, idx, total).reshape(-1), vals.reshape(-1))

    if n_noise_vox:
        lin_n = lin[..., :n_noise_vox]
        vol_n = vol_d[:n_noise_boxes]
        orig = xflat.index_select(0, lin_n.reshape(-1)).view(-1, n_noise_vox)  # (C, N)
        ends = torch.cumsum(vol_n, 0) - 1
        zero = torch.zeros(orig.shape[0], 1, dtype=torch.float64, device=dev)
        s1 = torch.diff(torch.cumsum(orig, 1, dtype=torch.float64).index_select(1, ends), dim=1, prepend=zero)
        s2 = torch.diff(torch.cumsum(orig.float().square(), 1, dtype=torch.float64).index_select(1, ends), dim=1,
                        prepend=zero)
        mean = s1 / vol_n
        std = (s2 / vol_n - mean * mean).clamp_min_(0).sqrt_()
        if dev.type == "cpu":
            gen = generator
        else:
            gen = torch.Generator(device=dev)
            gen.manual_seed(int(torch.randint(0, 2 ** 62, (1,), generator=generator)))
        noise = torch.randn(orig.shape, generator=gen, device=dev, dtype=torch.float32)
        vox_box = row_box.index_select(0, row_of[:n_noise_vox])
        vals = torch.addcmul(mean.float().index_select(1, vox_box), noise, std.float().index_select(1, vox_box))
        _write(lin_n, winner[:n_noise_vox], vals.to(x.dtype).view(lin_n.shape))
    if n_vox > n_noise_vox:
        lin_p = lin[..., n_noise_vox:]
        src = lin_p + delta_d.index_select(0, row_box).index_select(0, row_of[n_noise_vox:])
        _write(lin_p, winner[n_noise_vox:], xflat.index_select(0, src.reshape(-1)))
    return masked, mask


def inpainting_mask(x: torch.Tensor, generator: Optional[torch.Generator] = None, max_fraction: float = 0.3,
                    max_block_fraction: float = 0.25, mode: str = "mixed", min_block_fraction: float = 0.05,
                    group_size: Optional[int] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Replace random boxes of each sample of ``x`` (B, C, Z, Y, X) (see the module docstring).

    mode: ``"noise"`` (Gaussian noise with each box's mean/std), ``"paste"`` (the same box of another sample of the
    batch; with a single sample this falls back to noise) or ``"mixed"`` (each box either, with probability 1/2).
    ``group_size``: samples only paste from samples of their own group of ``group_size`` consecutive items
    (default: the whole batch). Returns (masked copy of x, mask (B, 1, Z, Y, X) bool)."""
    if x.dim() != 5:
        raise ValueError(f"inpainting_mask expects (B, C, Z, Y, X), got shape {tuple(x.shape)}")
    blocks = draw_blocks(x.shape[0], x.shape[2:], generator, max_fraction, max_block_fraction,
                         min_block_fraction, mode, group_size)
    return _apply_blocks(x, blocks, generator)


def make_views(crops: torch.Tensor, generator: Optional[torch.Generator] = None,
               plane: Sequence[int] = DEFAULT_PLANE, max_fraction: float = 0.3, max_block_fraction: float = 0.25,
               mode: str = "mixed", min_block_fraction: float = 0.05) -> dict:
    """Two views of each crop of ``crops`` (B, C, Z, Y, X): each randomly rotated, then inpainted.

    Returns a dict of tensors on crops' device: ``view1``, ``view2`` (masked inputs), ``target1``, ``target2`` (the
    rotated un-masked crops, i.e. reconstruction targets), ``rot1``, ``rot2`` (rotation labels, long),
    ``mask1``, ``mask2`` ((B, 1, Z, Y, X) bool), and the same stacked along the batch, view 1 first, without a
    copy: ``views`` (2B, C, Z, Y, X), ``targets``, ``rots`` (2B,), ``masks`` (2B, 1, Z, Y, X). Pasted boxes come
    from another crop of the same view."""
    generator = _check_generator(generator)
    if crops.dim() != 5:
        raise ValueError(f"make_views expects (B, C, Z, Y, X) crops, got shape {tuple(crops.shape)}")
    dims = _plane_dims(crops, plane)
    b = crops.shape[0]
    k = torch.randint(0, 4, (2, b), generator=generator)
    rotated = torch.empty((2 * b,) + tuple(crops.shape[1:]), dtype=crops.dtype, device=crops.device)
    _rotate(crops, k[0], dims, out=rotated[:b])
    _rotate(crops, k[1], dims, out=rotated[b:])
    blocks = draw_blocks(2 * b, crops.shape[2:], generator, max_fraction, max_block_fraction, min_block_fraction,
                         mode, group_size=b)
    masked, mask = _apply_blocks(rotated, blocks, generator)
    k = k.to(crops.device)
    return {"view1": masked[:b], "view2": masked[b:], "target1": rotated[:b], "target2": rotated[b:],
            "rot1": k[0], "rot2": k[1], "mask1": mask[:b], "mask2": mask[b:], "masks": mask,
            "views": masked, "targets": rotated, "rots": k.reshape(-1)}
