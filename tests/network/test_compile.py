"""torch.compile of the segmentation network and the SSL model: one graph (fullgraph=True, so any graph break fails),
forward and backward, outputs and gradients equal to eager. nnU-Net compiles the network by default on CUDA, so a
graph break here would break every GPU user.

Tiny shapes on CPU (toy variant, 64x32x32, batch 1, float64). ``aot_eager`` runs TorchDynamo and AOTAutograd,
which trace the forward and the backward graph exactly as for inductor, without inductor's code generation (minutes
on a small CPU); the attention paths, merging modes and axis orders are spread over the cases so that each value
is traced. One test compiles the default configuration for real with inductor; it is opt-in (BSF_TEST_INDUCTOR=1)
because compiling the toy network's forward and backward took 30 minutes on the shared 2-core development machine.
"""
import os

import pytest
import torch
import torch._dynamo

from bsf_nnunet.network import BSFSwinUNETR
from bsf_nnunet.planning.presets import variant_arch_kwargs
from bsf_nnunet.ssl.model import BSFSSLModel

SHAPE = (1, 1, 64, 32, 32)  # smallest input both models train on: bottleneck 2x1x1 (InstanceNorm needs > 1 voxel)


def _loss(out):
    outs = out if isinstance(out, tuple) else (out,)
    return sum((o * torch.linspace(-1, 1, o.numel(), dtype=o.dtype).reshape(o.shape)).sum() for o in outs)


def _run(model, x):
    model.zero_grad(set_to_none=True)
    out = model(x)
    _loss(out).backward()
    outs = out if isinstance(out, tuple) else (out,)
    return [o.detach() for o in outs], [p.grad.clone() for p in model.parameters()]


def _close(a, b, tol, what):
    """Equal within ``tol`` relative to the tensor's largest value: compiled kernels may sum in another order."""
    scale = max(b.abs().max().item(), 1.0)
    torch.testing.assert_close(a, b, atol=tol * scale, rtol=tol, msg=lambda m: f"{what}: {m}")


def _assert_compiles_like_eager(model, backend, tol):
    """In float64: at these tiny shapes InstanceNorm normalises over 2 voxels, which turns fp32 rounding (compiled
    kernels sum in another order) into visible noise in gradients that are exactly 0 in theory."""
    model = model.double()
    torch.manual_seed(0)
    x = torch.randn(SHAPE, dtype=torch.float64)
    outs_e, grads_e = _run(model, x)
    torch._dynamo.reset()
    try:
        outs_c, grads_c = _run(torch.compile(model, backend=backend, fullgraph=True), x)
    finally:
        torch._dynamo.reset()
    for i, (a, b) in enumerate(zip(outs_c, outs_e, strict=True)):
        _close(a, b, tol, f"output {i}")
    names = [n for n, _ in model.named_parameters()]
    for name, a, b in zip(names, grads_c, grads_e, strict=True):
        _close(a, b, tol, f"gradient of {name}")


@pytest.mark.parametrize("attention, merging, axis_order", [("monai", "legacy", "zyx"), ("sdpa", "fixed", "xyz")])
def test_segmentation_network_compiles_forward_and_backward(attention, merging, axis_order):
    torch.manual_seed(0)
    net = BSFSwinUNETR(1, 2, merging=merging, attention=attention, axis_order=axis_order,
                       **variant_arch_kwargs("toy")).train()
    _assert_compiles_like_eager(net, "aot_eager", tol=1e-8)


def test_ssl_model_compiles_forward_and_backward():
    torch.manual_seed(0)
    model = BSFSSLModel(1, merging="legacy", attention="sdpa", axis_order="xyz", contrastive_dim=16,
                        **variant_arch_kwargs("toy")).train()
    _assert_compiles_like_eager(model, "aot_eager", tol=1e-8)


@pytest.mark.skipif(os.environ.get("BSF_TEST_INDUCTOR") != "1",
                    reason="inductor compile takes many minutes on a small CPU; set BSF_TEST_INDUCTOR=1 to run it")
def test_default_network_compiles_with_inductor():
    """What nnU-Net does on CUDA (there attention auto is SDPA; on CPU MONAI's path), here on CPU."""
    torch.manual_seed(0)
    net = BSFSwinUNETR(1, 2, **variant_arch_kwargs("toy")).train()
    _assert_compiles_like_eager(net, "inductor", tol=1e-6)


def test_input_size_check_still_explains_bad_sizes():
    """The compile-friendly replacement of MONAI's numpy size check raises the same error."""
    net = BSFSwinUNETR(1, 2, **variant_arch_kwargs("toy"))
    with pytest.raises(ValueError, match=r"spatial dimensions \[2\] .* divisible by 2\*\*5"):
        net(torch.zeros(1, 1, 48, 32, 32))
