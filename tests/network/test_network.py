import itertools

import pytest
import torch
import torch.nn.functional as F
from monai.networks.nets import SwinUNETR
from monai_reference import PreMonai15PatchMerging

from bsf_nnunet.network import BSFSwinUNETR, count_parameters
from bsf_nnunet.planning.presets import variant_arch_kwargs

TOY = dict(feature_size=12, depths=(1, 1, 1, 1), num_heads=(3, 6, 12, 24))


@pytest.mark.parametrize("variant,expected_m", [("tiny", 62.19), ("small", 64.08), ("big", 69.73), ("large", 277.1)])
def test_parameter_counts(variant, expected_m):
    net = BSFSwinUNETR(4, 3, **variant_arch_kwargs(variant))
    assert count_parameters(net) / 1e6 == pytest.approx(expected_m, abs=0.01 if variant != "large" else 0.1)


def test_state_dict_keys_equal_monai():
    ours = BSFSwinUNETR(4, 3, **TOY)
    ref = SwinUNETR(in_channels=4, out_channels=3, **TOY)
    assert list(ours.state_dict().keys()) == list(ref.state_dict().keys())
    for k, v in ref.state_dict().items():
        assert ours.state_dict()[k].shape == v.shape, k


def _pair(merging, attention, downsample):
    torch.manual_seed(0)
    ours = BSFSwinUNETR(2, 3, merging=merging, attention=attention, **TOY).eval()
    ref = SwinUNETR(in_channels=2, out_channels=3, downsample=downsample, **TOY).eval()
    ref.load_state_dict(ours.state_dict())
    return ours, ref


@pytest.mark.parametrize("attention", ["monai", "sdpa", "auto"])
@pytest.mark.parametrize("merging,downsample", [("fixed", "merging"), ("legacy", PreMonai15PatchMerging)])
def test_output_equals_monai(merging, downsample, attention):
    ours, ref = _pair(merging, attention, downsample)
    x = torch.randn(1, 2, 64, 64, 96, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a, b = ours(x), ref(x)
    assert a.shape == (1, 3, 64, 64, 96)
    assert torch.allclose(a, b, rtol=1e-4, atol=1e-4 * b.abs().max().item())


def test_legacy_and_fixed_merging_differ():
    """Loading weights into the other merging mode silently computes something else: the modes must differ."""
    legacy = BSFSwinUNETR(2, 3, merging="legacy", **TOY).eval()
    fixed = BSFSwinUNETR(2, 3, merging="fixed", **TOY).eval()
    fixed.load_state_dict(legacy.state_dict())
    x = torch.randn(1, 2, 64, 64, 64)
    with torch.no_grad():
        assert (legacy(x) - fixed(x)).abs().max() > 1e-3


def test_sdpa_gradients_match_monai_attention():
    torch.manual_seed(0)
    a = BSFSwinUNETR(1, 2, attention="sdpa", **TOY).double()
    b = BSFSwinUNETR(1, 2, attention="monai", **TOY).double()
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, 1, 64, 64, 64, dtype=torch.float64)
    a(x).square().mean().backward()
    b(x).square().mean().backward()
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.allclose(p.grad, q.grad, rtol=1e-6, atol=1e-9), n


def test_axis_order_xyz_transposes_input_and_output():
    torch.manual_seed(0)
    net = BSFSwinUNETR(1, 2, axis_order="zyx", **TOY).eval()
    x = torch.randn(1, 1, 64, 96, 128)
    with torch.no_grad():
        ref = net(x.permute(0, 1, 4, 3, 2)).permute(0, 1, 4, 3, 2)
        net.set_axis_order("xyz")
        out = net(x)
    assert out.shape == (1, 2, 64, 96, 128)
    assert torch.allclose(out, ref, atol=1e-5)


def test_bad_arguments_are_clear():
    with pytest.raises(ValueError, match="merging"):
        BSFSwinUNETR(1, 2, merging="v2", **TOY)
    with pytest.raises(ValueError, match="unknown architecture arguments"):
        BSFSwinUNETR(1, 2, n_stages=4, **TOY)
    with pytest.raises(ValueError, match="depths"):
        BSFSwinUNETR(1, 2, feature_size=12, depths=(1, 1), num_heads=(3, 6, 12, 24))


def test_fixed_offsets_cover_all_subgrids():
    from bsf_nnunet.network.swin_unetr import FIXED_OFFSETS, LEGACY_OFFSETS

    assert sorted(FIXED_OFFSETS) == sorted(itertools.product(range(2), repeat=3))
    assert len(set(LEGACY_OFFSETS)) == 6


def test_nnunet_convention_via_get_network_from_plans():
    """Plans can name the class: nnU-Net's generic builder constructs it from the dotted path."""
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

    net = get_network_from_plans("bsf_nnunet.network.swin_unetr.BSFSwinUNETR", dict(TOY, merging="legacy"), [],
                                 2, 3, allow_init=True, deep_supervision=False)
    assert isinstance(net, BSFSwinUNETR)
    out = net(torch.randn(1, 2, 64, 64, 64))
    assert out.shape == (1, 3, 64, 64, 64)
    assert not F.softmax(out, 1).isnan().any()


def test_wrong_number_of_input_channels_is_explained():
    import pytest
    import torch

    from bsf_nnunet.network.swin_unetr import BSFSwinUNETR

    net = BSFSwinUNETR(2, 3, feature_size=12, depths=(1, 1, 1, 1))
    with pytest.raises(ValueError,
                       match=r"expects input of shape \(batch, 2 channels.*has 1 channel files instead of 2"):
        net(torch.zeros(1, 1, 64, 64, 64))


def _saved_bytes(fn) -> int:
    """Bytes of the distinct storages autograd keeps for the backward pass of ``fn()``."""
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(storages.values())


def test_cpu_training_recomputes_attention_matrices_with_monai_maths(monkeypatch):
    """attention auto, training on CPU: chunks of 3 windows (straddling the 4 windows of the shift mask) recompute
    their attention matrices for the backward pass. Output and gradients equal MONAI's WindowAttention; autograd
    keeps the attention matrices no more; BSF_CPU_ATTN_RECOMPUTE=0 is MONAI's path exactly."""
    from monai.networks.nets.swin_unetr import WindowAttention

    from bsf_nnunet.network import swin_unetr

    torch.manual_seed(0)
    attn = WindowAttention(12, 3, (7, 7, 7), qkv_bias=True).double().train()
    with torch.no_grad():
        attn.relative_position_bias_table.normal_()
    attn.__class__ = swin_unetr.AutoWindowAttention
    monkeypatch.setattr(swin_unetr, "RECOMPUTE_CHUNK_BYTES", 3 * 3 * 343 * 343 * 4)
    x = torch.randn(8, 343, 12, dtype=torch.float64, requires_grad=True)  # 2 images x 4 windows
    mask = torch.where(torch.rand(4, 343, 343) < 0.3, -100.0, 0.0).double()

    def run(forward):
        x.grad = None
        attn.zero_grad()
        out = forward(attn, x, mask)
        out.square().sum().backward()
        return out.detach(), [x.grad.clone()] + [p.grad.clone() for p in attn.parameters()]

    out, grads = run(swin_unetr.AutoWindowAttention.forward)
    expected, expected_grads = run(WindowAttention.forward)
    assert torch.allclose(out, expected, rtol=1e-10, atol=1e-12)
    for g, e in zip(grads, expected_grads):
        assert torch.allclose(g, e, rtol=1e-8, atol=1e-12)
    kept = _saved_bytes(lambda: WindowAttention.forward(attn, x, mask))
    recomputed = _saved_bytes(lambda: attn(x, mask))
    # MONAI keeps the float64 softmax output of every window (22.6 MB here); the recomputation keeps the mask and
    # the gathered relative-position bias instead (6.6 MB here; with 2 images of 343 windows it is 1/6 of them)
    assert kept - recomputed >= 0.6 * 8 * 3 * 343 * 343 * 8, (kept, recomputed)
    monkeypatch.setenv("BSF_CPU_ATTN_RECOMPUTE", "0")
    assert _saved_bytes(lambda: attn(x, mask)) == kept and torch.equal(attn(x, mask), expected)
    monkeypatch.setenv("BSF_CPU_ATTN_RECOMPUTE", "maybe")
    with pytest.raises(ValueError, match="BSF_CPU_ATTN_RECOMPUTE='maybe': use 1"):
        attn(x, mask)


def test_recomputed_attention_under_block_checkpointing_and_eval():
    """MONAI's own use_checkpoint (a checkpoint around each Swin block) nests the recomputed attention; without
    gradients (inference) the network runs fused attention, as MONAI's use_flash_attention does."""
    torch.manual_seed(0)
    arch = dict(TOY, depths=(2, 2, 2, 2))
    ours = BSFSwinUNETR(1, 2, attention="auto", use_checkpoint=True, **arch).train()
    ref = BSFSwinUNETR(1, 2, attention="monai", **arch).train()
    ref.load_state_dict(ours.state_dict())
    x = torch.randn(1, 1, 64, 64, 64)
    ours(x).sum().backward()
    ref(x).sum().backward()
    for (n, p), q in zip(ours.named_parameters(), ref.parameters()):
        # fp32 summation order differs between recomputed and kept matrices: tolerance relative to the gradient's scale
        scale = float(q.grad.abs().max())
        assert torch.allclose(p.grad, q.grad, rtol=1e-4, atol=1e-5 * scale + 1e-6), n
    with torch.no_grad():
        assert torch.allclose(ours.eval()(x), ref.eval()(x), rtol=1e-4, atol=1e-5)
