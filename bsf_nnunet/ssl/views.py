"""Augmented views for BrainSegFounder's self-supervised tasks, made on the training device.

* ``random_rotation``: each batch item rotated by k * 90 degrees (k = 0..3 is the label) in one plane: by default
  the official one, the (y, z) plane of MONAI's (x, y, z) crops (``rot_rand`` rotates dims (2, 3) of a (C, x, y, z)
  crop), which is dims (3, 2) of nnU-Net's (B, C, z, y, x) arrays. A rotation head trained by the official code
  therefore keeps the meaning of its labels here.
* ``inpainting_mask``: the official ``aug_rand`` / ``patch_rand_drop``, two rounds per crop. Round 1 paints noise
  boxes; round 2 draws a random crop of the batch and, unless it drew itself, pastes boxes of that crop (as it is at
  that moment: crops before this one already augmented, crops after it still clean). Each round draws a target of
  ``uniform(0, max_fraction)`` of the voxels and adds boxes until the counted box volumes (overlaps counted twice)
  reach it, so a crop's masked fraction can exceed ``max_fraction`` (up to about 2x). A box starts anywhere in
  ``[0, n - min_side)`` along each axis, has a side drawn from ``[min_side, max_side)`` (5% and 25% of the axis)
  and is cut at the crop's edge. Noise: the official code fills a box with N(0, 1) noise min-max scaled to [0, 1],
  the range of its [0, 1]-scaled images; nnU-Net's images are z-scored, so the scaled noise is mapped onto the
  crop's own intensity range, per channel (docs/fidelity.md); ``noise_range=(0, 1)`` keeps the official [0, 1]
  (``BSFPretrainTrainer.bsf_ssl_intensity = "official"``, whose crops are on the official [0, 1] scale). Where boxes
  overlap, the later box wins.
* ``make_views``: two views per crop, each rotated then masked; the rotated un-masked crops are the reconstruction
  targets (as in MONAI's Swin-UNETR pretraining, which BrainSegFounder used).

Randomness: every random choice is drawn from a CPU ``torch.Generator`` (small tensors, then moved to the data's
device), so a seed gives identical views. The noise itself is drawn on the data's device: from the given generator
on CPU, and on CUDA from a device generator seeded from it (reproducible on the same device type).

Rotation is one gather through a cached index table. Boxes are painted one by one as slices (a few tensor operations
each, no host synchronisation; measured faster on CPU than expanding all boxes into flat voxel indices, whose
index tensors outweigh the boxes themselves at the official amount of about 100 boxes per crop and round); the paste
round is one ``torch.where`` per crop, in batch order.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import torch

MASK_MODES = ("official", "noise", "paste")
# The official rotation is rot90(k, (2, 3)) of a (C, x, y, z) crop: the (y, z) plane, y first. In nnU-Net's
# (B, C, z, y, x) arrays the same plane, in the same sense, is dims (3, 2).
DEFAULT_PLANE = (3, 2)


def official_plane(transpose_forward: Sequence[int] = (0, 1, 2)) -> Tuple[int, int]:
    """The official rotation plane in nnU-Net's preprocessed (B, C, ...) arrays. nnU-Net's plans may transpose the
    image axes (``transpose_forward``: array axis i holds the reader's (z, y, x) axis ``transpose_forward[i]``, e.g.
    the thick-slice axis first for anisotropic data); the official plane is the image's (y, z), y first."""
    tf = [int(a) for a in transpose_forward]
    if sorted(tf) != [0, 1, 2]:
        raise ValueError(f"transpose_forward must be a permutation of 0, 1, 2, got {transpose_forward!r}")
    return 2 + tf.index(1), 2 + tf.index(0)

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
def _side_limits(spatial, max_block_fraction, min_block_fraction):
    """Per axis ``(min_side, max_side)``: sides are drawn from ``[min_side, max_side)`` as ``randint`` does."""
    lo = [max(1, int(min_block_fraction * n)) for n in spatial]
    hi = [max(low + 1, int(max_block_fraction * n)) for low, n in zip(lo, spatial)]
    return lo, hi


def _validate_mask_args(max_fraction, max_block_fraction, min_block_fraction, mode):
    if mode not in MASK_MODES:
        raise ValueError(f"mode must be one of {MASK_MODES}, got {mode!r}")
    if not 0.0 <= max_fraction <= 1.0:
        raise ValueError(f"max_fraction must be in [0, 1], got {max_fraction}")
    if not 0.0 < min_block_fraction <= max_block_fraction <= 1.0:
        raise ValueError("need 0 < min_block_fraction <= max_block_fraction <= 1, got "
                         f"{min_block_fraction}, {max_block_fraction}")


def _draw_rounds(rows: int, spatial, lo, hi, max_fraction: float, generator) -> Tuple[torch.Tensor, ...]:
    """Boxes of ``rows`` independent rounds: each draws a target of uniform(0, max_fraction) of the voxels, then
    boxes until the summed (clipped) box volumes reach it. Returns (row, starts (A, 3), sizes (A, 3)), row-major."""
    vox = math.prod(spatial)
    lo_t, hi_t, n_t = (torch.tensor(v, dtype=torch.long) for v in (lo, hi, spatial))
    target = torch.rand(rows, generator=generator, dtype=torch.float64) * (max_fraction * vox)
    mean_vol = math.prod((a + b - 1) / 2 for a, b in zip(lo, hi))
    chunk = int(min(4096, math.ceil(1.5 * max_fraction * vox / mean_vol) + 8))
    starts, sizes = [], []
    done = torch.zeros(rows, dtype=torch.float64)
    while bool((done < target).any()):
        u = torch.rand(rows, chunk, 3, generator=generator, dtype=torch.float64)
        start = (u * (n_t - lo_t)).long()
        u = torch.rand(rows, chunk, 3, generator=generator, dtype=torch.float64)
        size = torch.minimum(lo_t + (u * (hi_t - lo_t)).long(), n_t - start)
        starts.append(start)
        sizes.append(size)
        done = done + size.prod(-1).sum(1).double()
    if not starts:
        empty = torch.zeros((0, 3), dtype=torch.long)
        return torch.zeros(0, dtype=torch.long), empty, empty
    start, size = torch.cat(starts, 1), torch.cat(sizes, 1)
    before = size.prod(-1).cumsum(1) - size.prod(-1)  # volume counted before each box
    active = before.double() < target.unsqueeze(1)
    row, k = active.nonzero(as_tuple=True)
    return row, start[row, k], size[row, k]


def draw_blocks(batch: int, spatial: Sequence[int], generator: Optional[torch.Generator] = None,
                max_fraction: float = 0.3, max_block_fraction: float = 0.25, min_block_fraction: float = 0.05,
                mode: str = "official", group_size: Optional[int] = None) -> dict:
    """Draw the boxes of ``inpainting_mask`` on the host (CPU tensors; exposed for tests and benchmarks).

    ``mode``: ``"official"`` (a noise round, then a paste round from a random crop of the group, skipped when the
    crop drew itself), ``"noise"`` (the noise round only) or ``"paste"`` (the paste round only, always from another
    crop; a group of one falls back to noise). Returns ``starts``, ``sizes`` (A, 3) long, ``batch`` (A,) long (the
    crop of each box; a crop's boxes are consecutive, noise boxes first, in painting order), ``paste`` (A,) bool and
    ``source`` (B,) long (the crop pasted from; the crop itself where it has no paste round)."""
    generator = _check_generator(generator)
    spatial = [int(s) for s in spatial]
    if len(spatial) != 3:
        raise ValueError(f"inpainting works on 3D crops, got spatial shape {spatial}")
    _validate_mask_args(max_fraction, max_block_fraction, min_block_fraction, mode)
    lo, hi = _side_limits(spatial, max_block_fraction, min_block_fraction)
    group = batch if group_size is None else int(group_size)
    if group < 1 or batch % group:
        raise ValueError(f"group_size {group} must divide the batch size {batch}")
    i = torch.arange(batch)
    if mode == "paste":
        shift = torch.randint(1, max(group, 2), (batch,), generator=generator)
        source = (i // group) * group + (i % group + shift) % group if group > 1 else i.clone()
    else:
        source = (i // group) * group + torch.randint(0, group, (batch,), generator=generator)
    noise_round = torch.ones(batch, dtype=torch.bool) if mode != "paste" else source == i
    paste_round = source != i if mode != "noise" else torch.zeros(batch, dtype=torch.bool)
    if mode == "noise":
        source = i.clone()
    # rounds in painting order: crop 0 noise, crop 0 paste, crop 1 noise, ...
    rounds = torch.stack([noise_round, paste_round], 1).reshape(-1)
    owner = torch.arange(2 * batch)[rounds]
    row, starts, sizes = _draw_rounds(int(owner.numel()), spatial, lo, hi, max_fraction, generator)
    round_id = owner[row]
    return {"starts": starts, "sizes": sizes, "batch": round_id // 2, "paste": round_id % 2 == 1,
            "source": source}


def _regions(blocks: dict):
    """(crop, (slice z, slice y, slice x)) of each box, in painting order."""
    for crop, (z, y, x), (sz, sy, sx) in zip(blocks["batch"].tolist(), blocks["starts"].tolist(),
                                             blocks["sizes"].tolist()):
        yield crop, (slice(z, z + sz), slice(y, y + sy), slice(x, x + sx))


def _paint_noise(masked: torch.Tensor, x: torch.Tensor, blocks: dict, generator,
                 noise_range: Optional[Sequence[float]] = None) -> torch.Tensor:
    """Noise boxes into ``masked`` (in place, later boxes win): N(0, 1) min-max scaled per box (over its channels
    and voxels), then mapped onto each crop's intensity range per channel, or onto ``noise_range`` (lo, hi) for
    every crop and channel. Returns the (B, Z, Y, X) bool mask."""
    b, c = x.shape[:2]
    dev = x.device
    painted = torch.zeros((b,) + tuple(x.shape[2:]), dtype=torch.bool, device=dev)
    if dev.type == "cpu":
        gen = generator
    else:
        gen = torch.Generator(device=dev)
        gen.manual_seed(int(torch.randint(0, 2 ** 62, (1,), generator=generator)))
    if noise_range is not None:
        lo = torch.full((b, c, 1, 1, 1), float(noise_range[0]), device=dev)
        span = torch.full((b, c, 1, 1, 1), float(noise_range[1]) - float(noise_range[0]), device=dev)
    else:
        flat = x.reshape(b, c, -1)
        lo = flat.amin(2).view(b, c, 1, 1, 1)
        span = flat.amax(2).view(b, c, 1, 1, 1) - lo  # each crop's intensity range, per channel
    for crop, region in _regions(blocks):
        noise = torch.randn((c,) + tuple(r.stop - r.start for r in region), generator=gen, device=dev)
        low, high = noise.aminmax()
        scale = span[crop] / (high - low).clamp_min(1e-12)
        masked[(crop, slice(None)) + region] = (noise - low).mul_(scale).add_(lo[crop]).to(x.dtype)
        painted[(crop,) + region] = True
    return painted


def _paint_paste(masked: torch.Tensor, x: torch.Tensor, blocks: dict) -> torch.Tensor:
    """Paste round, crop by crop in batch order: the union of a crop's paste boxes is copied from its source as it
    is at that moment (an earlier crop: already augmented; a later one: still ``x``). Returns the bool mask."""
    b = x.shape[0]
    painted = torch.zeros((b, 1) + tuple(x.shape[2:]), dtype=torch.bool, device=x.device)
    for crop, region in _regions(blocks):
        painted[(crop, 0) + region] = True
    has_boxes = set(blocks["batch"].tolist())
    for i, s in enumerate(blocks["source"].tolist()):
        if s != i and i in has_boxes:
            src = masked[s] if s < i else x[s]
            torch.where(painted[i], src, masked[i], out=masked[i])
    return painted[:, 0]


def _apply_blocks(x: torch.Tensor, blocks: dict, generator: Optional[torch.Generator],
                  noise_range: Optional[Sequence[float]] = None):
    """Fill the boxes of ``blocks`` in a copy of x (B, C, Z, Y, X): noise boxes, then pasted ones. Returns (masked,
    mask (B, 1, Z, Y, X) bool)."""
    masked = x.clone()
    paste = blocks["paste"]
    noise_blocks = {k: blocks[k][~paste] for k in ("starts", "sizes", "batch")}
    paste_blocks = {k: blocks[k][paste] for k in ("starts", "sizes", "batch")}
    paste_blocks["source"] = blocks["source"]
    mask = _paint_noise(masked, x, noise_blocks, generator, noise_range)
    mask |= _paint_paste(masked, x, paste_blocks)
    return masked, mask.unsqueeze(1)


def inpainting_mask(x: torch.Tensor, generator: Optional[torch.Generator] = None, max_fraction: float = 0.3,
                    max_block_fraction: float = 0.25, mode: str = "official", min_block_fraction: float = 0.05,
                    group_size: Optional[int] = None,
                    noise_range: Optional[Sequence[float]] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Replace random boxes of each sample of ``x`` (B, C, Z, Y, X) (see the module docstring and
    :func:`draw_blocks` for ``mode``). ``group_size``: samples only paste from samples of their own group of
    ``group_size`` consecutive items (default: the whole batch). ``noise_range``: (lo, hi) of the noise boxes (default:
    each crop's own range per channel). Returns (masked copy of x, mask (B, 1, Z, Y, X) bool)."""
    if x.dim() != 5:
        raise ValueError(f"inpainting_mask expects (B, C, Z, Y, X), got shape {tuple(x.shape)}")
    blocks = draw_blocks(x.shape[0], x.shape[2:], generator, max_fraction, max_block_fraction,
                         min_block_fraction, mode, group_size)
    return _apply_blocks(x, blocks, generator, noise_range)


def make_views(crops: torch.Tensor, generator: Optional[torch.Generator] = None,
               plane: Sequence[int] = DEFAULT_PLANE, max_fraction: float = 0.3, max_block_fraction: float = 0.25,
               mode: str = "official", min_block_fraction: float = 0.05,
               noise_range: Optional[Sequence[float]] = None) -> dict:
    """Two views of each crop of ``crops`` (B, C, Z, Y, X): each randomly rotated, then inpainted.

    Returns a dict of tensors on crops' device: ``view1``, ``view2`` (masked inputs), ``target1``, ``target2`` (the
    rotated un-masked crops, i.e. reconstruction targets), ``rot1``, ``rot2`` (rotation labels, long),
    ``mask1``, ``mask2`` ((B, 1, Z, Y, X) bool), and the same stacked along the batch, view 1 first, without a
    copy: ``views`` (2B, C, Z, Y, X), ``targets``, ``rots`` (2B,), ``masks`` (2B, 1, Z, Y, X). Pasted boxes come
    from another crop of the same view (as the official code augments each view's batch on its own). ``noise_range``:
    as in :func:`inpainting_mask`."""
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
    masked, mask = _apply_blocks(rotated, blocks, generator, noise_range)
    k = k.to(crops.device)
    return {"view1": masked[:b], "view2": masked[b:], "target1": rotated[:b], "target2": rotated[b:],
            "rot1": k[0], "rot2": k[1], "mask1": mask[:b], "mask2": mask[b:], "masks": mask,
            "views": masked, "targets": rotated, "rots": k.reshape(-1)}
