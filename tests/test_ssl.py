"""Self-supervised building blocks: SSL model (keys, official checkpoint layout, shapes), views (rotation,
inpainting), losses (hand computations, NT-Xent gathered over 2 gloo ranks)."""
import math
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from bsf_nnunet.network.swin_unetr import BSFSwinUNETR
from bsf_nnunet.planning.presets import variant_arch_kwargs
from bsf_nnunet.ssl import (BSFSSLModel, SSLLoss, draw_blocks, inpainting_mask, make_views, nt_xent,
                            random_rotation, reconstruction_loss, rotation_loss, strip_prefix)

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
def test_random_rotation_labels_match_rotation():
    x = torch.randn(6, 2, 8, 16, 16)
    seen = set()
    for seed in range(4):
        r, k = random_rotation(x, torch.Generator().manual_seed(seed))
        for i in range(6):
            assert torch.equal(torch.rot90(r[i], -int(k[i]), (2, 3)), x[i])
            assert torch.equal(r[i], torch.rot90(x[i], int(k[i]), (2, 3)))
        seen |= set(k.tolist())
    assert seen == {0, 1, 2, 3}
    r, k = random_rotation(x.transpose(2, 4), torch.Generator().manual_seed(0), plane=(2, 3))
    for i in range(6):
        assert torch.equal(torch.rot90(r[i], -int(k[i]), (1, 2)), x.transpose(2, 4)[i])
    with pytest.raises(ValueError, match="equal sizes"):
        random_rotation(torch.zeros(1, 1, 8, 8, 6))


def test_mask_coverage_and_block_sizes():
    x = torch.randn(2, 1, 64, 64, 64)
    for seed in range(25):
        g = torch.Generator().manual_seed(seed)
        blocks = draw_blocks(2, (64, 64, 64), torch.Generator().manual_seed(seed))
        assert blocks["sizes"].min() >= 1 and blocks["sizes"].max() <= 16  # 25% of 64
        assert ((blocks["starts"] >= 0) & (blocks["starts"] + blocks["sizes"] <= 64)).all()
        masked, mask = inpainting_mask(x, g)
        cov = mask.float().mean((1, 2, 3, 4))
        assert ((cov > 0) & (cov <= 0.3)).all(), cov
        if seed == 0:  # the mask is the union of the drawn boxes (painted with loops here)
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
            assert torch.equal(torch.rot90(a["target" + v][i], -int(a["rot" + v][i]), (2, 3)), crops[i])
        m = a["mask" + v].expand_as(crops)
        assert torch.equal(a["view" + v][~m], a["target" + v][~m])
        assert (a["view" + v][m] != a["target" + v][m]).float().mean() > 0.5
    for key, one, two in (("masks", "mask1", "mask2"), ("views", "view1", "view2"), ("targets", "target1", "target2"),
                          ("rots", "rot1", "rot2")):
        assert torch.equal(a[key], torch.cat([a[one], a[two]]))


def test_paste_mode_copies_from_another_sample():
    x = torch.stack([torch.full((1, 32, 32, 32), float(i)) for i in range(3)])  # sample i holds the value i
    masked, mask = inpainting_mask(x, torch.Generator().manual_seed(1), mode="paste")
    for i in range(3):
        vals = masked[i][mask[i]]
        assert vals.numel() > 0 and (vals != i).all()
        assert set(vals.unique().tolist()) <= {0.0, 1.0, 2.0}
    # a single sample has nothing to paste from: noise fill instead (constant input -> its constant)
    masked, mask = inpainting_mask(x[1:2] + 0.0, torch.Generator().manual_seed(1), mode="paste")
    assert mask.any() and torch.equal(masked, x[1:2])


def test_noise_mode_is_scaled_to_the_block():
    g = torch.Generator().manual_seed(0)
    x = 3.0 + 2.0 * torch.randn(2, 1, 64, 64, 64, generator=g)
    masked, mask = inpainting_mask(x, torch.Generator().manual_seed(2), mode="noise")
    vals = masked[mask]
    assert vals.numel() > 10000 and not torch.equal(vals, x[mask])
    assert abs(vals.mean().item() - 3.0) < 0.1 and abs(vals.std().item() - 2.0) < 0.1
    const = torch.full((2, 1, 32, 32, 32), 7.0)
    assert torch.equal(inpainting_mask(const, torch.Generator().manual_seed(2), mode="noise")[0], const)


def test_noise_fill_uses_each_box_statistics():
    """Each noise-filled voxel follows N(mean, std) of the original values of the box that painted it last."""
    n = 48
    c = torch.arange(n, dtype=torch.float32)
    ramp = 4 * c.view(n, 1, 1) + 2 * c.view(1, n, 1) + c.view(1, 1, n)
    x = (ramp + torch.randn(n, n, n, generator=torch.Generator().manual_seed(0))).view(1, 1, n, n, n)
    masked, mask = inpainting_mask(x, torch.Generator().manual_seed(4), mode="noise")
    blocks = draw_blocks(1, (n, n, n), torch.Generator().manual_seed(4), mode="noise")
    owner = torch.full((n, n, n), -1)
    stats = []
    for i, ((z, y, w), (sz, sy, sw)) in enumerate(zip(blocks["starts"].tolist(), blocks["sizes"].tolist())):
        region = (slice(z, z + sz), slice(y, y + sy), slice(w, w + sw))
        owner[region] = i
        box = x[0, 0][region]
        stats.append((box.mean(), box.std(unbiased=False)))
    assert torch.equal(mask[0, 0], owner >= 0)
    checked = 0
    for i, (m, sd) in enumerate(stats):
        sel = owner == i
        if sel.sum() >= 300:
            zs = (masked[0, 0][sel] - m) / sd
            assert abs(zs.mean().item()) < 0.3 and 0.8 < zs.std().item() < 1.2, (i, zs.mean(), zs.std())
            checked += 1
    assert checked >= 3


# ----------------------------------------------------------------------------------------------------- losses
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
        loss = nt_xent(a, b, 0.5)
        loss.backward()
        torch.save({"loss": loss.detach(), "g1": a.grad, "g2": b.grad}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_nt_xent_gathered_over_two_gloo_ranks(tmp_path):
    g = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(6, 16, generator=g), torch.randn(6, 16, generator=g)
    # fork: the workers need no fresh interpreter (spawn would re-import torch and MONAI, ~10 s each here)
    mp.start_processes(_ddp_worker, args=(2, _free_port(), z1, z2, str(tmp_path)), nprocs=2, join=True,
                       start_method="fork")
    a, b = z1.clone().requires_grad_(True), z2.clone().requires_grad_(True)
    ref = nt_xent(a, b, 0.5)
    ref.backward()
    for rank in range(2):
        r = torch.load(tmp_path / f"rank{rank}.pt")
        assert r["loss"].item() == pytest.approx(ref.item(), rel=1e-6)
        # DDP averages gradients over the 2 ranks: the averaged local gradient is the single-process slice
        sl = slice(rank * 3, rank * 3 + 3)
        assert torch.allclose(r["g1"] / 2, a.grad[sl], atol=1e-6)
        assert torch.allclose(r["g2"] / 2, b.grad[sl], atol=1e-6)
