"""CPU bf16 autocast: the switch the trainers use, and that a bf16 forward computes the fp32 function to bf16
accuracy (fp32 itself equals MONAI's within 1e-4: tests/network/test_network.py)."""
import pytest
import torch

from bsf_nnunet.devices import cpu_signature
from bsf_nnunet.errors import ConfigurationError
from bsf_nnunet.network import BSFSwinUNETR
from bsf_nnunet.training.precision import CPU_BF16_ENV, bf16_supported, cpu_bf16_enabled, cpu_has_native_bf16


@pytest.mark.parametrize("value,expected", [("1", True), ("true", True), ("on", True), ("0", False),
                                            ("false", False), ("off", False)])
def test_env_switch_decides(monkeypatch, value, expected):
    monkeypatch.setenv(CPU_BF16_ENV, value)
    assert cpu_bf16_enabled() is expected
    assert bf16_supported(torch.device("cpu")) is expected


def test_default_follows_the_cpu_and_bad_values_are_refused(monkeypatch):
    monkeypatch.delenv(CPU_BF16_ENV, raising=False)
    assert cpu_bf16_enabled() is cpu_has_native_bf16()
    monkeypatch.setenv(CPU_BF16_ENV, "sometimes")
    with pytest.raises(ConfigurationError, match=CPU_BF16_ENV):
        cpu_bf16_enabled()


def test_native_bf16_detection_and_cpu_signature_read_cpu_flags(monkeypatch, tmp_path):
    import builtins

    real_open = builtins.open
    signatures = set()
    for flags, expected in (("fpu sse avx512f avx512_bf16 avx512_vnni", True), ("fpu sse amx_bf16 amx_tile", True),
                            ("fpu sse avx2 avx512f avx512bw", False)):
        f = tmp_path / "cpuinfo"
        f.write_text(f"processor\t: 0\nflags\t\t: {flags}\n")
        monkeypatch.setattr(builtins, "open",
                            lambda p, *a, f=f, **k: real_open(f if p == "/proc/cpuinfo" else p, *a, **k))
        assert cpu_has_native_bf16() is expected
        assert cpu_signature() == cpu_signature() and cpu_signature().startswith("cpu-")
        signatures.add(cpu_signature())
    monkeypatch.setattr(builtins, "open", real_open)
    assert len(signatures) == 3  # OpenVINO's cache folders keep the three CPUs' compiled models apart


def test_bf16_autocast_forward_and_gradients_track_fp32():
    torch.manual_seed(0)
    net = BSFSwinUNETR(2, 3, feature_size=12, depths=(1, 1, 1, 1), num_heads=(3, 6, 12, 24)).train()
    x = torch.randn(1, 2, 64, 64, 64)
    ref = net(x)
    ref.square().mean().backward()
    g_ref = {k: p.grad.clone() for k, p in net.named_parameters()}
    net.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = net(x)
    assert out.dtype == torch.bfloat16
    out.float().square().mean().backward()
    rel = ((out.float() - ref).norm() / ref.norm()).item()
    assert rel < 0.03, rel  # bf16 keeps 8 bits of mantissa: ~0.4% per op
    cos = torch.nn.functional.cosine_similarity
    names = [k for k, p in net.named_parameters() if g_ref[k].norm() > 0]
    whole = cos(torch.cat([dict(net.named_parameters())[k].grad.flatten() for k in names]),
                torch.cat([g_ref[k].flatten() for k in names]), dim=0)
    assert whole > 0.99, whole
    # per tensor: nearly all point the same way (the exceptions are the bottleneck convs followed by InstanceNorm
    # over 2^3 voxels, whose fp32 gradients are themselves rounding noise)
    per = sorted((cos(dict(net.named_parameters())[k].grad.flatten(), g_ref[k].flatten(), dim=0).item(), k)
                 for k in names)
    assert sum(c > 0.9 for c, _ in per) >= 0.95 * len(per), per[:5]


@pytest.mark.parametrize("shape", [(2, 2, 2), (2, 4, 4), (3, 3, 3)])
def test_small_input_convolutions_get_correct_bf16_weight_gradients(shape):
    """Some CPUs' bf16 kernels return NaN/garbage weight gradients for 3^3 convolutions of 2^3 inputs (Swin-UNETR's
    bottleneck with 64^3 patches): the networks run those in fp32 under CPU autocast."""
    from bsf_nnunet.network.swin_unetr import CPUBF16SafeConv3d

    torch.manual_seed(0)
    conv = CPUBF16SafeConv3d(96, 48, 3, padding=1)
    x, g = torch.randn(2, 96, *shape), torch.randn(2, 48, *shape)
    conv(x).backward(g)
    ref = conv.weight.grad.clone()
    conv.weight.grad = None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = conv(x)
    y.backward(g.to(y.dtype))
    assert torch.isfinite(conv.weight.grad).all()
    assert ((conv.weight.grad - ref).norm() / ref.norm()) < 0.02


def test_networks_use_the_guarded_convolution():
    from bsf_nnunet.network.swin_unetr import CPUBF16SafeConv3d
    from bsf_nnunet.ssl.model import BSFSSLModel

    toy = dict(feature_size=12, depths=(1, 1, 1, 1), num_heads=(3, 6, 12, 24))
    for net in (BSFSwinUNETR(1, 2, **toy), BSFSSLModel(1, **toy)):
        convs = [m for m in net.modules() if isinstance(m, torch.nn.Conv3d)]
        assert convs and all(isinstance(m, CPUBF16SafeConv3d) for m in convs)
