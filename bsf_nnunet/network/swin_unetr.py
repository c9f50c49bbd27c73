"""BrainSegFounder's Swin-UNETR behind nnU-Net's network convention.

``BSFSwinUNETR(input_channels, num_classes, deep_supervision=False, **arch_kwargs)`` is a subclass of MONAI's
``SwinUNETR``: its ``state_dict`` keys are exactly MONAI's (``swinViT.*``, ``encoder1..10``, ``decoder1..5``,
``out.*``), so official checkpoints load without renaming. What we add:

* ``merging``: the 3D patch-merging flavour. ``"legacy"`` reproduces MONAI before 1.5 (0.9-1.4), which is what
  BrainSegFounder's published weights were trained with; it concatenates the 8 sub-grids in an order that repeats
  two of them ((0,1,0) and (0,0,1) twice) and never uses (1,1,0) and (0,1,1). ``"fixed"`` is MONAI >= 1.5's
  ``"merging"``: all 8 sub-grids. Weights trained with one flavour compute something else in the other.
* ``attention``: ``"sdpa"`` runs window attention through ``torch.nn.functional.scaled_dot_product_attention``
  with the relative-position bias and shift mask as an additive bias, in training and inference;
  ``"monai"`` keeps MONAI's explicit softmax(QK^T)V; ``"auto"`` (default) uses SDPA on CUDA tensors and without
  gradients (inference, as MONAI's ``use_flash_attention``), and MONAI's path for CPU training, where SDPA measured
  slower for the fs48 variants (bench/train_step.py). When ``"auto"`` trains on CPU, MONAI's maths runs in chunks
  of windows whose attention matrices are recomputed in the backward pass instead of kept (the largest saved
  activations of a step; ``BSF_CPU_ATTN_RECOMPUTE=0`` keeps them). All compute the same function (tests check
  1e-4).
* ``axis_order``: nnU-Net feeds (z, y, x) arrays; weights trained in MONAI pipelines saw (x, y, z). With
  ``axis_order="xyz"`` the network transposes its input to (x, y, z) and the logits back, so imported MONAI
  weights see the orientation they were trained with. ``"zyx"`` (default) does nothing.
* ``use_checkpoint``: gradient checkpointing of every Swin block (MONAI's mechanism).
* ``cpu_engine``: an attribute (not an argument), None by default; :func:`.cpu_engine.configure_cpu_engine` attaches
  ONNX Runtime, which then runs eval-mode, no-grad fp32 CPU forwards (nnUNetv2_predict).

This module knows nothing about trainers or nnU-Net.
"""
from __future__ import annotations

import contextlib
import itertools
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from monai.networks.nets import swin_unetr as monai_swin_unetr
from monai.networks.nets.swin_unetr import PatchMergingV2, SwinUNETR, WindowAttention
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..settings import value

MERGING_MODES = ("legacy", "fixed")
ATTENTION_MODES = ("auto", "sdpa", "monai")
AXIS_ORDERS = ("zyx", "xyz")
RECOMPUTE_ENV = "BSF_CPU_ATTN_RECOMPUTE"
RECOMPUTE_CHUNK_BYTES = 64 * 2 ** 20  # fp32 attention matrices of one chunk of windows

# Sub-grid offsets (d, h, w) concatenated along channels, in order.
LEGACY_OFFSETS = ((0, 0, 0), (1, 0, 0), (0, 1, 0), (0, 0, 1), (1, 0, 1), (0, 1, 0), (0, 0, 1), (1, 1, 1))
FIXED_OFFSETS = ((0, 0, 0), (1, 0, 0), (0, 1, 0), (0, 0, 1), (1, 1, 0), (1, 0, 1), (0, 1, 1), (1, 1, 1))


class _OffsetPatchMerging(PatchMergingV2):
    """3D patch merging that concatenates the sub-grids listed in ``offsets`` (same parameters as MONAI's)."""

    offsets: tuple = FIXED_OFFSETS

    def forward(self, x):
        if x.dim() != 5:
            return super().forward(x)
        _, d, h, w, _ = x.shape
        if d % 2 or h % 2 or w % 2:
            x = F.pad(x, (0, 0, 0, w % 2, 0, h % 2, 0, d % 2))
        x = torch.cat([x[:, i::2, j::2, k::2, :] for i, j, k in self.offsets], -1)
        return self.reduction(self.norm(x))


class LegacyPatchMerging(_OffsetPatchMerging):
    """MONAI < 1.5 patch merging (BrainSegFounder's published weights)."""

    offsets = LEGACY_OFFSETS


class FixedPatchMerging(_OffsetPatchMerging):
    """MONAI >= 1.5 patch merging (all eight 2x2x2 sub-grids)."""

    offsets = FIXED_OFFSETS


assert sorted(FIXED_OFFSETS) == sorted(itertools.product(range(2), repeat=3))

MERGING_CLASSES = {"legacy": LegacyPatchMerging, "fixed": FixedPatchMerging}


def _heads_and_bias(self: WindowAttention, x):
    """q, k, v (each batch x windows, heads, n, head dim) and the relative-position bias (heads, n, n, contiguous:
    the fused CPU kernel does not take a strided one) of MONAI's WindowAttention."""
    b, n, c = x.shape
    qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
    bias = self.relative_position_bias_table[self.relative_position_index[:n, :n].reshape(-1)]
    return (*qkv.unbind(0), bias.reshape(n, n, -1).permute(2, 0, 1).contiguous())


def _sdpa_window_attention_forward(self: WindowAttention, x, mask):
    """WindowAttention.forward through fused scaled-dot-product attention (same maths as MONAI's)."""
    b, n, c = x.shape
    q, k, v, bias = _heads_and_bias(self, x)
    if mask is not None:
        nw = mask.shape[0]
        bias = bias.unsqueeze(0) + mask.unsqueeze(1)  # nw, heads, n, n
        if b != nw:  # several images: broadcast over them (5-D) rather than copy the bias per image
            q = q.reshape(b // nw, nw, self.num_heads, n, -1)
            k = k.reshape(b // nw, nw, self.num_heads, n, -1)
            v = v.reshape(b // nw, nw, self.num_heads, n, -1)
    else:
        bias = bias.unsqueeze(0)
    # one image (nnU-Net's predictor) stays 4-D with a 4-D bias: the fused CPU kernel takes only those (5-D inputs
    # or a 3-D bias fell back to the explicit computation, 2-3x slower)
    bias = bias.to(q.dtype)
    p = self.attn_drop.p if self.training else 0.0
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=p, scale=self.scale)
    out = out.reshape(b, self.num_heads, n, -1).transpose(1, 2).reshape(b, n, c)
    return self.proj_drop(self.proj(out))


def shift_window_region_ids(dims: Sequence[int], window_size: Sequence[int], shift_size: Sequence[int]) -> np.ndarray:
    """(windows, tokens per window) float32: the region number of every token of MONAI's shifted-window attention
    (``compute_mask``: the padded volume ``dims`` cut into 3 slabs per axis by the window and the shift); two tokens
    of a window may attend to each other where their numbers are equal. Windows in MONAI's ``window_partition``
    order."""
    ids = np.zeros(tuple(dims), dtype=np.float32)
    slabs = [(slice(-w), slice(-w, -s), slice(-s, None)) for w, s in zip(window_size, shift_size)]
    for number, (d, h, w) in enumerate(itertools.product(*slabs)):
        ids[d, h, w] = number
    (nd, wd), (nh, wh), (nw, ww) = ((n // w, w) for n, w in zip(dims, window_size))
    return ids.reshape(nd, wd, nh, wh, nw, ww).transpose(0, 2, 4, 1, 3, 5).reshape(nd * nh * nw, wd * wh * ww)


@contextlib.contextmanager
def shift_masks_computed_in_graph(anchor: torch.Tensor):
    """While a forward is traced for export: MONAI's ``compute_mask`` replaced by one that computes the same mask
    (0 or -100) from the small constant region numbers of :func:`shift_window_region_ids` plus ``anchor``, a zero
    computed from the input. MONAI's own builds the mask with a Python loop of scatters over a volume; traced, it is a
    constant subgraph that OpenVINO folds element by element when it compiles (25 of the 29 s for Small at 128^3)
    and the ONNX exporter folds into a 0.5 GB constant. Tied to the input, the mask is computed when the model runs
    (measured: same inference time)."""

    def compute_mask(dims, window_size, shift_size, device):
        ids = torch.from_numpy(shift_window_region_ids(dims, window_size, shift_size)).to(device) + anchor
        return torch.where(ids.unsqueeze(1) != ids.unsqueeze(2), -100.0, 0.0)

    original = monai_swin_unetr.compute_mask
    monai_swin_unetr.compute_mask = compute_mask
    try:
        yield
    finally:
        monai_swin_unetr.compute_mask = original


def cpu_attention_recompute_wanted() -> bool:
    """``BSF_CPU_ATTN_RECOMPUTE``: unset or ``1`` recomputes attention matrices in CPU training; ``0`` keeps them."""
    return value(RECOMPUTE_ENV)


def _attention_of_windows(q, k, v, bias, mask, first: int):
    """softmax(q k^T + bias [+ mask]) v for the chunk of windows that starts at row ``first`` of MONAI's
    (batch x windows) axis, ``q`` already scaled (MONAI's order of operations). ``mask`` holds every window's."""
    attn = q @ k.transpose(-2, -1)
    attn = attn + bias.unsqueeze(0)
    if mask is not None:  # the axis is batch-major: row r has window r % nw
        rows = torch.arange(first, first + q.shape[0], device=mask.device) % mask.shape[0]
        attn = attn + mask[rows].unsqueeze(1)
    return torch.softmax(attn, dim=-1).to(v.dtype) @ v


def _recomputed_window_attention_forward(self: WindowAttention, x, mask):
    """WindowAttention.forward whose attention matrices are never kept for the backward pass: chunks of windows
    under ``torch.utils.checkpoint`` save only their q, k, v and recompute softmax(qk^T + bias) when the gradient
    needs it. Same maths as MONAI's; no attention dropout (the caller checks)."""
    b, n, c = x.shape
    q, k, v, bias = _heads_and_bias(self, x)
    q = q * self.scale
    per_chunk = max(1, RECOMPUTE_CHUNK_BYTES // (self.num_heads * n * n * 4))
    outs = []
    for start in range(0, b, per_chunk):
        end = min(b, start + per_chunk)
        outs.append(checkpoint(_attention_of_windows, q[start:end], k[start:end], v[start:end], bias, mask, start,
                               use_reentrant=False))
    out = torch.cat(outs).transpose(1, 2).reshape(b, n, c)
    return self.proj_drop(self.proj(out))


class SDPAWindowAttention(WindowAttention):
    """MONAI's WindowAttention (same parameters and buffers) computed with ``scaled_dot_product_attention``."""

    forward = _sdpa_window_attention_forward


class AutoWindowAttention(WindowAttention):
    """Fused attention on CUDA tensors and without gradients (as MONAI's ``use_flash_attention``); CPU training runs
    MONAI's explicit attention (measured faster there for fs48), with the attention matrices recomputed for the
    backward pass instead of kept (BSF_CPU_ATTN_RECOMPUTE). Traced or exported for the CPU engines, it is MONAI's
    explicit attention too: the fused path's bias (relative-position bias plus shift mask, one per window and head)
    would be a constant that ONNX Runtime and OpenVINO fold into 0.8 GB for a Small model at 96^3, where the
    explicit graph adds the two small constants to the scores."""

    def forward(self, x, mask):
        exporting = torch.jit.is_tracing() or torch.compiler.is_exporting()
        if (x.is_cuda or not torch.is_grad_enabled()) and not exporting:
            return _sdpa_window_attention_forward(self, x, mask)
        if self.training and not self.attn_drop.p and not torch.compiler.is_compiling() \
                and cpu_attention_recompute_wanted():
            return _recomputed_window_attention_forward(self, x, mask)
        return WindowAttention.forward(self, x, mask)


def _swap_attention(module: nn.Module, cls=SDPAWindowAttention) -> int:
    n = 0
    for m in module.modules():
        if isinstance(m, WindowAttention):
            m.__class__ = cls
            n += 1
    return n


class CPUBF16SafeConv3d(nn.Conv3d):
    """nn.Conv3d that leaves CPU bf16 autocast for inputs smaller than its kernel on some spatial axis.

    With torch 2.14 on a Zen 4 CPU (AVX512-BF16), the bf16 weight gradient of a 3x3x3 convolution of a 2x2x2 input
    is wrong (NaN, inf or garbage; every channel count from 24 to 768 tried), while 3^3 and larger inputs, 1x1x1
    kernels and transposed convolutions are fine. Swin-UNETR meets exactly that shape at its bottleneck with 64^3
    patches. Such convolutions are tiny, so computing them in fp32 costs nothing. Outside CPU autocast this is
    nn.Conv3d unchanged (same parameters, same numerics)."""

    def forward(self, x):
        if (x.device.type == "cpu" and torch.is_autocast_enabled("cpu")
                and any(s < k for s, k in zip(x.shape[2:], self.kernel_size) if k > 1)):
            with torch.autocast("cpu", enabled=False):
                return super().forward(x.float())
        return super().forward(x)


def _swap_small_input_convs(module: nn.Module) -> int:
    n = 0
    for m in module.modules():
        if type(m) is nn.Conv3d:
            m.__class__ = CPUBF16SafeConv3d
            n += 1
    return n


def _as_int_tuple(v, name: str, length: int = 4) -> tuple:
    try:
        t = tuple(int(i) for i in v)
    except TypeError:
        raise ValueError(f"{name} must be a sequence of {length} integers, got {v!r}") from None
    if len(t) != length or min(t) < 1:
        raise ValueError(f"{name} must be {length} positive integers, got {v!r}")
    return t


class BSFSwinUNETR(SwinUNETR):
    """Swin-UNETR with nnU-Net's constructor convention. See the module docstring for the extra options."""

    def __init__(
        self,
        input_channels: int,
        num_classes: int,
        deep_supervision: bool = False,
        feature_size: int = 48,
        depths: Sequence[int] = (2, 2, 2, 2),
        num_heads: Sequence[int] = (3, 6, 12, 24),
        window_size: int = 7,
        patch_size: int = 2,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        dropout_path_rate: float = 0.0,
        use_checkpoint: bool = False,
        merging: str = "legacy",
        attention: str = "auto",
        axis_order: str = "zyx",
        norm_name: str = "instance",
        normalize: bool = True,
        **unused,
    ) -> None:
        """Check the arguments and build the network.

        Kept as one block on purpose: the order in which the submodules are created fixes the state-dict key
        order and, under a fixed seed, the initial weights, which tests and published checkpoints depend on.
        """
        if unused:
            raise ValueError(
                f"BSFSwinUNETR got unknown architecture arguments {sorted(unused)}; valid ones are feature_size, "
                "depths, num_heads, window_size, patch_size, drop_rate, attn_drop_rate, dropout_path_rate, "
                "use_checkpoint, merging, attention, axis_order, norm_name, normalize"
            )
        if merging not in MERGING_MODES:
            raise ValueError(f"merging must be one of {MERGING_MODES} (legacy = MONAI < 1.5, BrainSegFounder's "
                             f"published weights; fixed = MONAI >= 1.5), got {merging!r}")
        if attention not in ATTENTION_MODES:
            raise ValueError(f"attention must be one of {ATTENTION_MODES}, got {attention!r}")
        if axis_order not in AXIS_ORDERS:
            raise ValueError(f"axis_order must be one of {AXIS_ORDERS}, got {axis_order!r}")
        if int(feature_size) % 12:
            raise ValueError(f"feature_size must be a multiple of 12, got {feature_size}")
        depths = _as_int_tuple(depths, "depths")
        num_heads = _as_int_tuple(num_heads, "num_heads")
        super().__init__(
            in_channels=int(input_channels),
            out_channels=int(num_classes),
            patch_size=int(patch_size),
            depths=depths,
            num_heads=num_heads,
            window_size=int(window_size),
            feature_size=int(feature_size),
            norm_name=norm_name,
            drop_rate=float(drop_rate),
            attn_drop_rate=float(attn_drop_rate),
            dropout_path_rate=float(dropout_path_rate),
            normalize=bool(normalize),
            use_checkpoint=bool(use_checkpoint),
            spatial_dims=3,
            downsample=MERGING_CLASSES[merging],
        )
        self.merging = merging
        self.attention = attention
        self.axis_order = axis_order
        # nnU-Net asks for deep supervision through the trainer; Swin-UNETR has a single output.
        self.deep_supervision = False
        self.cpu_engine = None  # see cpu_engine.configure_cpu_engine
        if attention != "monai":
            _swap_attention(self, SDPAWindowAttention if attention == "sdpa" else AutoWindowAttention)
        _swap_small_input_convs(self)

    def set_axis_order(self, axis_order: str) -> None:
        if axis_order not in AXIS_ORDERS:
            raise ValueError(f"axis_order must be one of {AXIS_ORDERS}, got {axis_order!r}")
        self.axis_order = axis_order

    def _check_input_size(self, spatial_shape):
        """MONAI's check (sizes divisible by patch_size**5) in plain Python: MONAI's numpy version breaks the
        torch.compile graph (tests/network/test_compile.py)."""
        div = self.patch_size ** 5
        wrong = [i + 2 for i, s in enumerate(spatial_shape) if s % div]
        if wrong:
            raise ValueError(f"spatial dimensions {wrong} of input image (spatial shape: {tuple(spatial_shape)}) "
                             f"must be divisible by {self.patch_size}**5 = {div}.")

    def forward(self, x_in):
        expected = self.swinViT.patch_embed.proj.in_channels
        if x_in.ndim != 5 or x_in.shape[1] != expected:
            raise ValueError(
                f"BrainSegFounder's Swin-UNETR expects input of shape (batch, {expected} channels, z, y, x), got "
                f"{tuple(x_in.shape)}. With nnUNetv2_predict this means that a case in the input folder has "
                f"{x_in.shape[1] if x_in.ndim == 5 else 'a different number of'} channel files instead of {expected}: "
                f"every case needs CASE_0000 ... CASE_{expected - 1:04d} with the file ending of dataset.json, in the "
                "order of the model's dataset.json channel_names (bsf-nnunet check --predict-input FOLDER -d ID "
                "lists the incomplete cases).")
        if self._engine_applies(x_in):
            out = self.cpu_engine.run(self, x_in)
            if out is not None:
                return out
        return self.torch_forward(x_in)

    def torch_forward(self, x_in):
        """The PyTorch forward (what the CPU engine exports)."""
        if self.axis_order == "xyz":
            x_in = x_in.permute(0, 1, 4, 3, 2)
        out = super().forward(x_in)
        if self.axis_order == "xyz":
            out = out.permute(0, 1, 4, 3, 2)
        return out

    def _engine_applies(self, x) -> bool:
        """Inference on CPU with an engine attached (cpu_engine.configure_cpu_engine), outside tracing/compiling."""
        return (self.cpu_engine is not None and not self.training and not torch.is_grad_enabled()
                and not torch.is_autocast_enabled("cpu") and not torch.jit.is_tracing()
                and not torch.compiler.is_compiling() and self.cpu_engine.accepts(x))


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
