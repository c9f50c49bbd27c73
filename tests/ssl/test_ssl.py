"""Self-supervised building blocks: SSL model (keys, official checkpoint layout, shapes), views (rotation,
inpainting), losses (hand computations, NT-Xent gathered over 2 gloo ranks)."""
import math
import os
import socket

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from bsf_nnunet.network.swin_unetr import BSFSwinUNETR
from bsf_nnunet.planning.presets import variant_arch_kwargs
from bsf_nnunet.ssl import (
    BSFSSLModel,
    SSLLoss,
    draw_blocks,
    inpainting_mask,
    make_views,
    nt_xent,
    random_rotation,
    reconstruction_loss,
    rotation_loss,
    strip_prefix,
)

TOY = dict(feature_size=12, depths=(1, 1, 1, 1), num_heads=(3, 6, 12, 24))

# Head parameters of the official SSL checkpoints (MONAI research-contributions SwinUNETR/Pretrain ssl_head.py,
# upsample="vae"), with their shapes for dim = 768 (feature size 48) and C input channels.
OFFICIAL_FS48_HEAD = {
    "rotation_head.weight": (4, 768), "rotation_head.bias": (4,),
    "contrastive_head.weight": (512, 768), "contrastive_head.bias": (512,),
    "conv.0.weight": (384, 768, 3, 3, 3), "conv.0.bias": (384,),
    "conv.4.weight": (192, 384, 3, 3, 3), "conv.4.bias": (192,),
    "conv.8.weight": (96, 192, 3, 3, 3), "conv.8.bias": (96,),
    "conv.12.weight": (48, 96, 3, 3, 3), "conv.12.bias": (48,),
    "conv.16.weight": (48, 48, 3, 3, 3), "conv.16.bias": (48,),
    "conv.20.weight": ("C", 48, 1, 1, 1), "conv.20.bias": ("C",),
}


@pytest.fixture(scope="module")
def toy_model():
    torch.manual_seed(0)
    return BSFSSLModel(2, **TOY).eval()


# ----------------------------------------------------------------------------------------------------- model
@pytest.mark.parametrize("merging", ["legacy", "fixed"])
def test_encoder_keys_and_shapes_equal_bsfswinunetr(merging):
    ssl = BSFSSLModel(2, merging=merging, **TOY)
    seg = BSFSwinUNETR(2, 3, merging=merging, **TOY)
    enc = ssl.encoder_state_dict()
    ref = {k: v for k, v in seg.state_dict().items() if k.startswith("swinViT.")}
    assert list(enc) == list(ref)
    assert all(enc[k].shape == ref[k].shape for k in ref)
    assert type(ssl.swinViT.layers1[0].downsample) is type(seg.swinViT.layers1[0].downsample)
    # the encoder moves into the segmentation network without renaming
    missing, unexpected = seg.load_state_dict(enc, strict=False)
    assert not unexpected and not any(k.startswith("swinViT.") for k in missing)


def test_fs48_head_keys_match_official_layout():
    m = BSFSSLModel(4, **variant_arch_kwargs("small"))
    heads = {k: tuple(v.shape) for k, v in m.state_dict().items() if not k.startswith("swinViT.")}
    expected = {k: tuple(4 if s == "C" else s for s in shape) for k, shape in OFFICIAL_FS48_HEAD.items()}
    assert heads == expected
    assert list(heads) == list(OFFICIAL_FS48_HEAD)


def test_official_style_state_dict_loads_strict(toy_model):
    sd = {"module." + k: v.clone() + 0.5 for k, v in toy_model.state_dict().items()
          if v.is_floating_point()}
    sd.update({"module." + k: v for k, v in toy_model.state_dict().items() if not v.is_floating_point()})
    fresh = BSFSSLModel(2, **TOY)
    fresh.load_state_dict(strip_prefix(sd), strict=True)
    for k, v in fresh.state_dict().items():
        assert torch.equal(v, sd["module." + k])


def test_forward_shapes_and_axis_order(toy_model):
    x = torch.randn(2, 2, 64, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        rot, con, rec = toy_model(x)
        assert rot.shape == (2, 4) and con.shape == (2, 512) and rec.shape == (2, 2, 64, 64, 64)
        toy_model.set_axis_order("xyz")
        try:
            rot_x, con_x, rec_x = toy_model(x[:1, :, :, :, :32].contiguous())
        finally:
            toy_model.set_axis_order("zyx")
        rot_r, con_r, rec_r = toy_model(x[:1, :, :, :, :32].permute(0, 1, 4, 3, 2).contiguous())
    assert torch.allclose(rot_x, rot_r, atol=1e-5) and torch.allclose(con_x, con_r, atol=1e-5)
    assert torch.allclose(rec_x, rec_r.permute(0, 1, 4, 3, 2), atol=1e-5)
    with pytest.raises(ValueError, match="multiples of 32"):
        toy_model(torch.zeros(1, 2, 64, 64, 48))
    with pytest.raises(ValueError, match="unknown architecture"):
        BSFSSLModel(2, feature_sise=12)


# ----------------------------------------------------------------------------------------------------- views
def _as_monai(t):
    """(C, z, y, x) nnU-Net crop -> (C, x, y, z) MONAI crop."""
    return t.permute(0, 3, 2, 1)


def test_random_rotation_is_the_official_plane():
    """Label k means what it means in the official rot_rand: rot90(k, (2, 3)) of the (C, x, y, z) crop, i.e. the
    (y, z) plane; in nnU-Net's (z, y, x) arrays that is dims (y, z) of each item."""
    x = torch.randn(6, 2, 16, 16, 8)  # (B, C, z, y, x): z and y equal, x differs
    seen = set()
    for seed in range(4):
        r, k = random_rotation(x, torch.Generator().manual_seed(seed))
        for i in range(6):
            assert torch.equal(_as_monai(r[i]), torch.rot90(_as_monai(x[i]), int(k[i]), (2, 3)))
            assert torch.equal(torch.rot90(r[i], -int(k[i]), (2, 1)), x[i])
        seen |= set(k.tolist())
    assert seen == {0, 1, 2, 3}
    r, k = random_rotation(x.transpose(2, 4), torch.Generator().manual_seed(0), plane=(3, 4))
    for i in range(6):
        assert torch.equal(torch.rot90(r[i], -int(k[i]), (2, 3)), x.transpose(2, 4)[i])
    with pytest.raises(ValueError, match="equal sizes"):
        random_rotation(torch.zeros(1, 1, 6, 8, 8))


def _official_drop(shape, rng, max_drop=0.3, max_block=0.25, tolr=0.05):
    """The official patch_rand_drop's boxes, written from its description: a target of uniform(0, max_drop) of
    the voxels, boxes (start in [0, n - tol), side in [tol, max) cut at the edge) until their summed volume
    reaches it. Returns the union mask."""
    mask = np.zeros(shape, bool)
    target, total = rng.uniform(0, max_drop) * np.prod(shape), 0
    tol = [int(tolr * n) for n in shape]
    hi = [int(max_block * n) for n in shape]
    while total < target:
        start = [int(rng.integers(0, n - t)) for n, t in zip(shape, tol)]
        end = [min(int(rng.integers(t, h)) + s0, n) for s0, t, h, n in zip(start, tol, hi, shape)]
        mask[tuple(slice(s0, e) for s0, e in zip(start, end))] = True
        total += np.prod([e - s0 for s0, e in zip(start, end)])
    return mask


def test_mask_amount_matches_the_official_two_rounds():
    """Coverage statistics of inpainting_mask equal the official aug_rand's (noise round, then a paste round
    unless the crop draws itself), 4 crops of 48^3: mean about 0.22, maxima above max_fraction."""
    rng, shape, ref = np.random.default_rng(0), (48, 48, 48), []
    for _ in range(100):
        for i in range(4):
            m = _official_drop(shape, rng)
            if int(rng.integers(0, 4)) != i:
                m |= _official_drop(shape, rng)
            ref.append(m.mean())
    ours = []
    for seed in range(100):
        _, mask = inpainting_mask(torch.zeros(4, 1, *shape), torch.Generator().manual_seed(seed))
        ours += mask.float().mean((1, 2, 3, 4)).tolist()
    assert abs(np.mean(ours) - np.mean(ref)) < 0.025, (np.mean(ours), np.mean(ref))
    assert 0.19 < np.mean(ours) < 0.26 and max(ours) > 0.3
    assert abs(np.std(ours) - np.std(ref)) < 0.02


def test_mask_boxes_and_union():
    x = torch.randn(2, 1, 64, 64, 64)
    for seed in range(10):
        blocks = draw_blocks(2, (64, 64, 64), torch.Generator().manual_seed(seed))
        assert blocks["sizes"].min() >= 3 and blocks["sizes"].max() <= 15  # [5%, 25%) of 64
        assert ((blocks["starts"] >= 0) & (blocks["starts"] <= 60) & (blocks["starts"] + blocks["sizes"] <= 64)).all()
        # a crop's boxes: consecutive, noise round first
        for b in range(2):
            paste = blocks["paste"][blocks["batch"] == b]
            assert torch.equal(paste, paste.sort().values)
        masked, mask = inpainting_mask(x, torch.Generator().manual_seed(seed))
        ref = torch.zeros_like(mask)
        for b, (z, y, w), (sz, sy, sw) in zip(blocks["batch"].tolist(), blocks["starts"].tolist(),
                                              blocks["sizes"].tolist()):
            ref[b, 0, z:z + sz, y:y + sy, w:w + sw] = True
        assert torch.equal(mask, ref)
        keep = ~mask.expand_as(x)
        assert torch.equal(masked[keep], x[keep])
    with pytest.raises(ValueError, match="mode"):
        inpainting_mask(x, mode="blur")


def test_views_reproducible_and_consistent():
    crops = torch.randn(2, 2, 32, 32, 32, generator=torch.Generator().manual_seed(3))
    a = make_views(crops, torch.Generator().manual_seed(7))
    b = make_views(crops, torch.Generator().manual_seed(7))
    c = make_views(crops, torch.Generator().manual_seed(8))
    assert set(a) >= {"view1", "view2", "target1", "target2", "rot1", "rot2", "masks"}
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["view1"], c["view1"])
    for v in ("1", "2"):
        for i in range(2):  # targets are the rotated crops, views equal them outside the mask
            assert torch.equal(torch.rot90(a["target" + v][i], -int(a["rot" + v][i]), (2, 1)), crops[i])
        m = a["mask" + v].expand_as(crops)
        assert torch.equal(a["view" + v][~m], a["target" + v][~m])
    for key, one, two in (("masks", "mask1", "mask2"), ("views", "view1", "view2"), ("targets", "target1", "target2"),
                          ("rots", "rot1", "rot2")):
        assert torch.equal(a[key], torch.cat([a[one], a[two]]))


def test_paste_round_reads_each_source_as_it_is_then():
    """As the official loop: crop i pastes from crop s after crop s was augmented if s < i, from the clean crop if
    s > i. Reference: the drawn boxes painted with loops, noise boxes marked NaN."""
    x = torch.stack([torch.full((1, 32, 32, 32), float(i)) for i in range(4)])  # crop i holds the value i
    masked, mask = inpainting_mask(x, torch.Generator().manual_seed(1))
    blocks = draw_blocks(4, (32, 32, 32), torch.Generator().manual_seed(1))
    assert (blocks["source"] != torch.arange(4)).any()
    ref = x.clone()
    for i in range(4):
        for b, (z, y, w), (sz, sy, sw), paste in zip(blocks["batch"].tolist(), blocks["starts"].tolist(),
                                                     blocks["sizes"].tolist(), blocks["paste"].tolist()):
            if b == i:
                box = (slice(None), slice(z, z + sz), slice(y, y + sy), slice(w, w + sw))
                ref[i][box] = ref[int(blocks["source"][i])][box] if paste else float("nan")
    known = ~torch.isnan(ref)
    assert torch.equal(masked[known], ref[known])
    assert known.sum() < ref.numel() and (masked[~known] >= 0).all() and (masked[~known] <= 3).all()


def test_paste_mode_copies_from_another_sample():
    x = torch.stack([torch.full((1, 32, 32, 32), float(i)) for i in range(3)])
    blocks = draw_blocks(3, (32, 32, 32), torch.Generator().manual_seed(1), mode="paste")
    assert (blocks["source"] != torch.arange(3)).all() and blocks["paste"].all()
    masked, mask = inpainting_mask(x, torch.Generator().manual_seed(1), mode="paste")
    assert mask.any() and set(masked.unique().tolist()) <= {0.0, 1.0, 2.0}
    # a single sample has nothing to paste from: noise fill instead (constant input -> its constant)
    masked, mask = inpainting_mask(x[1:2] + 0.0, torch.Generator().manual_seed(1), mode="paste")
    assert mask.any() and torch.equal(masked, x[1:2])


def test_noise_spans_each_crops_intensity_range():
    """Official noise is N(0, 1) min-max scaled to [0, 1], the range of its [0, 1]-scaled images; on z-scored
    images it is mapped onto the crop's own range per channel: every noise value lies in that range, and a box that
    no later box overlaps reaches both ends of it."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 2, 48, 48, 48, generator=g) * torch.tensor([1.0, 5.0]).view(1, 2, 1, 1, 1)
    masked, mask = inpainting_mask(x, torch.Generator().manual_seed(4), mode="noise")
    blocks = draw_blocks(2, (48, 48, 48), torch.Generator().manual_seed(4), mode="noise")
    lo, hi = x.amin((2, 3, 4)), x.amax((2, 3, 4))
    for b in range(2):
        for ch in range(2):
            vals = masked[b, ch][mask[b, 0]]
            assert vals.numel() > 1000 and (vals >= lo[b, ch] - 1e-5).all() and (vals <= hi[b, ch] + 1e-5).all()
    owner = torch.full((2, 48, 48, 48), -1)
    for i, (b, (z, y, w), (sz, sy, sw)) in enumerate(zip(blocks["batch"].tolist(), blocks["starts"].tolist(),
                                                         blocks["sizes"].tolist())):
        owner[b, z:z + sz, y:y + sy, w:w + sw] = i
    whole = 0
    for i, (b, (z, y, w), (sz, sy, sw)) in enumerate(zip(blocks["batch"].tolist(), blocks["starts"].tolist(),
                                                         blocks["sizes"].tolist())):
        if (owner[b, z:z + sz, y:y + sy, w:w + sw] == i).all():
            box = masked[b, :, z:z + sz, y:y + sy, w:w + sw]
            unit = (box - lo[b].view(2, 1, 1, 1)) / (hi[b] - lo[b]).view(2, 1, 1, 1)
            assert unit.min().item() == pytest.approx(0.0, abs=1e-5) and unit.max().item() == pytest.approx(1, 1e-5)
            whole += 1
    assert whole >= 2
    const = torch.full((2, 1, 32, 32, 32), 7.0)
    assert torch.equal(inpainting_mask(const, torch.Generator().manual_seed(2), mode="noise")[0], const)


def _head(shape, rng):
    """A z-scored head-like volume (z, y, x): an ellipsoid brain with a bright rim, a dark ventricle above its
    centre and a dense 'cerebellum' at the back and bottom; jittered per seed. Up/down and front/back differ."""
    zz, yy, xx = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    c = rng.uniform(-0.08, 0.08, 3)
    zz, yy, xx = zz - c[0], yy - c[1], xx - c[2]
    r = np.sqrt((zz / 0.8) ** 2 + (yy / 0.9) ** 2 + (xx / 0.85) ** 2)
    img = np.where(r < 1, 1.0, 0.0) + np.where((r > 0.85) & (r < 1), 0.8, 0.0)
    img -= 0.9 * (np.sqrt(((zz - 0.25) / 0.2) ** 2 + (yy / 0.3) ** 2 + (xx / 0.25) ** 2) < 1)
    img += 1.2 * (np.sqrt(((zz + 0.55) / 0.2) ** 2 + ((yy + 0.5) / 0.3) ** 2 + (xx / 0.5) ** 2) < 1)
    img += rng.normal(0, 0.2, shape)
    return torch.from_numpy((img - img.mean()) / img.std()).float()[None]


def test_rotation_is_learnable_on_head_like_crops():
    """60 steps of a toy SSL model (4^3 windows: cheap attention) on head-like volumes classify the rotation of
    views of unseen heads well above chance (0.25): the rotation task carries signal, and ssl_metrics shows it."""
    from bsf_nnunet.ssl.losses import ssl_metrics

    torch.manual_seed(0)
    model = BSFSSLModel(1, **TOY, window_size=4)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    loss_fn = SSLLoss()
    heads = [_head((32, 32, 64), np.random.default_rng(s)) for s in range(10)]
    g = torch.Generator().manual_seed(0)
    for _ in range(60):
        crops = torch.stack([heads[int(i)] for i in torch.randint(0, 8, (4,), generator=g)])
        v = make_views(crops, g)
        rot, con, rec = model(v["views"])
        total, _ = loss_fn(rot, v["rots"], con[:4], con[4:], rec, v["targets"])
        opt.zero_grad()
        total.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        v = make_views(torch.stack(heads[8:] * 4), torch.Generator().manual_seed(99))
        rot, con, _ = model(v["views"])
    assert ssl_metrics(rot, v["rots"], con[:8], con[8:])["rot_acc"] >= 0.5


# ----------------------------------------------------------------------------------------------------- losses
def test_ssl_metrics_count_right_answers():
    from bsf_nnunet.ssl.losses import ssl_metrics

    logits = torch.tensor([[5.0, 0, 0, 0], [0, 5.0, 0, 0], [0, 0, 5.0, 0], [5.0, 0, 0, 0]])
    z1 = torch.eye(3)
    z2 = torch.tensor([[1.0, 0.1, 0.0], [0.0, 1.0, 0.1], [0.1, 0.0, -1.0]])  # crop 2's views disagree
    m = ssl_metrics(logits, torch.tensor([0, 1, 2, 3]), z1, z2)
    assert m["rot_acc"] == 0.75
    assert m["con_top1"] == pytest.approx(4 / 6)  # both views of crops 0 and 1 find their partner, crop 2's don't


def _nt_xent_by_hand(z1, z2, tau):
    z = [list(map(float, v)) for v in list(z1) + list(z2)]
    n2 = len(z)

    def cos(a, b):
        return sum(p * q for p, q in zip(a, b)) / math.sqrt(sum(p * p for p in a) * sum(q * q for q in b))

    total = 0.0
    for i in range(n2):
        j = (i + n2 // 2) % n2
        denom = sum(math.exp(cos(z[i], z[k]) / tau) for k in range(n2) if k != i)
        total += -math.log(math.exp(cos(z[i], z[j]) / tau) / denom)
    return total / n2


def test_losses_against_hand_computations():
    z1 = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    z2 = torch.tensor([[1.0, 1.0], [1.0, -1.0]])
    assert nt_xent(z1, z2, 0.5).item() == pytest.approx(_nt_xent_by_hand(z1, z2, 0.5), rel=1e-6)
    assert nt_xent(z1, z2, 0.1).item() == pytest.approx(_nt_xent_by_hand(z1, z2, 0.1), rel=1e-6)
    logits = torch.tensor([[2.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 3.0]])
    labels = torch.tensor([0, 3])
    ce = (-math.log(math.exp(2) / (math.exp(2) + 3)) - math.log(math.exp(3) / (math.exp(3) + math.e + 2))) / 2
    assert rotation_loss(logits, labels).item() == pytest.approx(ce, rel=1e-6)
    pred, target = torch.tensor([1.0, -2.0, 0.5, 4.0]), torch.tensor([0.0, 0.0, 1.0, 4.0])
    assert reconstruction_loss(pred, target).item() == pytest.approx((1 + 2 + 0.5 + 0) / 4)
    total, parts = SSLLoss(w_rot=2.0, w_con=0.5, w_rec=3.0)(logits, labels, z1, z2, pred, target)
    assert parts["rot"].item() == pytest.approx(ce, rel=1e-6)
    assert total.item() == pytest.approx(2 * ce + 0.5 * _nt_xent_by_hand(z1, z2, 0.5) + 3 * 0.875, rel=1e-6)
    # a single pair has no negatives: zero loss
    assert nt_xent(z1[:1], z2[:1]).item() == pytest.approx(0.0, abs=1e-6)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank, world, port, z1, z2, out_dir):
    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        n = z1.shape[0] // world
        a = z1[rank * n:(rank + 1) * n].clone().requires_grad_(True)
        b = z2[rank * n:(rank + 1) * n].clone().requires_grad_(True)
        local = nt_xent(a.detach(), b.detach(), 0.5)  # the default: this rank's batch only, as the paper
        loss = nt_xent(a, b, 0.5, gather=True)
        loss.backward()
        torch.save({"loss": loss.detach(), "local": local, "g1": a.grad, "g2": b.grad},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_nt_xent_gathered_over_two_gloo_ranks(tmp_path):
    g = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(6, 16, generator=g), torch.randn(6, 16, generator=g)
    # fork: the workers need no fresh interpreter (spawn would re-import torch and MONAI, ~10 s each here)
    mp.start_processes(_ddp_worker, args=(2, _free_port(), z1, z2, str(tmp_path)), nprocs=2, join=True,
                       start_method="fork")
    a, b = z1.clone().requires_grad_(True), z2.clone().requires_grad_(True)
    ref = nt_xent(a, b, 0.5, gather=False)
    ref.backward()
    for rank in range(2):
        r = torch.load(tmp_path / f"rank{rank}.pt")
        assert r["loss"].item() == pytest.approx(ref.item(), rel=1e-6)
        # DDP averages gradients over the 2 ranks: the averaged local gradient is the single-process slice
        sl = slice(rank * 3, rank * 3 + 3)
        assert r["local"].item() == pytest.approx(nt_xent(z1[sl], z2[sl], 0.5).item(), rel=1e-6)
        assert abs(r["local"].item() - ref.item()) > 1e-3
        assert torch.allclose(r["g1"] / 2, a.grad[sl], atol=1e-6)
        assert torch.allclose(r["g2"] / 2, b.grad[sl], atol=1e-6)


def test_rotation_plane_follows_the_plans_transpose():
    """Issue #31.8: nnU-Net's plans may transpose the image axes before preprocessing (transpose_forward, e.g. the
    thick-slice axis first). The rotation must stay the official anatomical (y, z) plane: rotating the transposed
    array in official_plane(tf) equals transposing the array rotated in the untransposed layout."""
    from itertools import permutations

    from bsf_nnunet.ssl.views import DEFAULT_PLANE, _rotate, official_plane

    assert official_plane((0, 1, 2)) == DEFAULT_PLANE
    x = torch.arange(4 * 4 * 4 * 2, dtype=torch.float32).reshape(2, 1, 4, 4, 4)    # (B, C, z, y, x)
    k = torch.tensor([1, 3])
    reference = _rotate(x, k, DEFAULT_PLANE)
    for tf in permutations(range(3)):
        order = (0, 1, *(2 + a for a in tf))                                    # nnU-Net's transpose of the data
        got = _rotate(x.permute(order), k, official_plane(tf))
        assert torch.equal(got, reference.permute(order)), tf
    with pytest.raises(ValueError, match="permutation"):
        official_plane((0, 0, 1))
