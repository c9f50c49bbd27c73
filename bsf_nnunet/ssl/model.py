"""BrainSegFounder's self-supervised model: the Swin-UNETR encoder plus rotation, contrastive and reconstruction heads.

``BSFSSLModel`` is laid out like the SSL head of MONAI's Swin-UNETR pretraining recipe (which BrainSegFounder
pretrained with), so its ``state_dict`` keys are those of the official SSL checkpoints once the ``module.`` prefix of
``DistributedDataParallel`` is stripped:

* ``swinViT.*``: MONAI's ``SwinTransformer``, built exactly as inside ``SwinUNETR`` (so the keys and shapes equal
  ``BSFSwinUNETR(...).swinViT``'s and the encoder moves between the two without renaming);
* ``rotation_head`` (Linear dim -> 4) on bottleneck token 0, ``contrastive_head`` (Linear dim -> contrastive_dim) on
  bottleneck token 1, dim = 16 * feature_size, tokens = the last stage's (B, C, h, w, d) map flattened over its three
  spatial axes and transposed to (B, h*w*d, C);
* ``conv``: the "vae" reconstruction decoder, five blocks of [Conv3d 3x3x3, InstanceNorm3d (no affine), LeakyReLU,
  trilinear x2 Upsample] taking dim -> dim/2 -> dim/4 -> dim/8 -> dim/16 -> dim/16 channels, then a 1x1x1 Conv3d to
  the input channels; parameters at ``conv.{0,4,8,12,16,20}.{weight,bias}`` (see ``OFFICIAL_HEAD_KEYS``).

The identity "pre" modules of the reference hold no parameters and are left out.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import torch
from monai.networks.nets.swin_unetr import SwinTransformer
from torch import nn

from ..network.swin_unetr import (
    ATTENTION_MODES,
    AXIS_ORDERS,
    MERGING_CLASSES,
    MERGING_MODES,
    AutoWindowAttention,
    SDPAWindowAttention,
    _as_int_tuple,
    _swap_attention,
    _swap_small_input_convs,
)

# Parameter keys of the official SSL checkpoints outside ``swinViT.*`` (after stripping ``module.``).
OFFICIAL_HEAD_KEYS = (
    "rotation_head.weight", "rotation_head.bias",
    "contrastive_head.weight", "contrastive_head.bias",
    "conv.0.weight", "conv.0.bias",
    "conv.4.weight", "conv.4.bias",
    "conv.8.weight", "conv.8.bias",
    "conv.12.weight", "conv.12.bias",
    "conv.16.weight", "conv.16.bias",
    "conv.20.weight", "conv.20.bias",
)

# Arguments of BSFSwinUNETR that only concern its segmentation decoder (accepted so that a configuration's
# arch kwargs can be passed unchanged, ignored here).
_DECODER_ONLY_KWARGS = ("norm_name",)


def _reconstruction_decoder(dim: int, out_channels: int) -> nn.Sequential:
    chans = [dim, dim // 2, dim // 4, dim // 8, dim // 16, dim // 16]
    layers = []
    for cin, cout in zip(chans[:-1], chans[1:]):
        layers += [
            nn.Conv3d(cin, cout, kernel_size=3, stride=1, padding=1),
            nn.InstanceNorm3d(cout),
            nn.LeakyReLU(),
            nn.Upsample(scale_factor=2, mode="trilinear", align_corners=False),
        ]
    layers.append(nn.Conv3d(chans[-1], out_channels, kernel_size=1, stride=1))
    return nn.Sequential(*layers)


class BSFSSLModel(nn.Module):
    """Swin-UNETR encoder + SSL heads. ``forward(x)`` -> (rotation logits (B, 4), contrastive embedding
    (B, contrastive_dim), reconstruction (B, C, D, H, W)). Spatial sizes must be multiples of 32."""

    def __init__(
        self,
        input_channels: int,
        feature_size: int = 48,
        depths: Sequence[int] = (2, 2, 2, 2),
        num_heads: Sequence[int] = (3, 6, 12, 24),
        merging: str = "legacy",
        attention: str = "auto",
        axis_order: str = "zyx",
        use_checkpoint: bool = False,
        dropout_path_rate: float = 0.0,
        contrastive_dim: int = 512,
        window_size: int = 7,
        patch_size: int = 2,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        normalize: bool = True,
        **unused,
    ) -> None:
        """Check the arguments and build the network.

        Kept as one block on purpose: the order in which the submodules are created fixes the state-dict key
        order and, under a fixed seed, the initial weights, which tests and published checkpoints depend on.
        """
        super().__init__()
        unknown = sorted(k for k in unused if k not in _DECODER_ONLY_KWARGS)
        if unknown:
            raise ValueError(
                f"BSFSSLModel got unknown architecture arguments {unknown}; valid ones are feature_size, depths, "
                "num_heads, merging, attention, axis_order, use_checkpoint, dropout_path_rate, contrastive_dim, "
                "window_size, patch_size, drop_rate, attn_drop_rate, normalize (norm_name is accepted and ignored)"
            )
        if merging not in MERGING_MODES:
            raise ValueError(f"merging must be one of {MERGING_MODES}, got {merging!r}")
        if attention not in ATTENTION_MODES:
            raise ValueError(f"attention must be one of {ATTENTION_MODES}, got {attention!r}")
        if axis_order not in AXIS_ORDERS:
            raise ValueError(f"axis_order must be one of {AXIS_ORDERS}, got {axis_order!r}")
        if int(feature_size) % 12:
            raise ValueError(f"feature_size must be a multiple of 12, got {feature_size}")
        if int(patch_size) != 2:
            raise ValueError("BSFSSLModel's reconstruction decoder upsamples x32: patch_size must be 2")
        depths = _as_int_tuple(depths, "depths")
        num_heads = _as_int_tuple(num_heads, "num_heads")
        self.input_channels = int(input_channels)
        self.feature_size = int(feature_size)
        self.merging = merging
        self.attention = attention
        self.axis_order = axis_order
        self.normalize = bool(normalize)
        # Same construction as monai.networks.nets.SwinUNETR.__init__ (and hence BSFSwinUNETR).
        self.swinViT = SwinTransformer(
            in_chans=self.input_channels,
            embed_dim=self.feature_size,
            window_size=(int(window_size),) * 3,
            patch_size=(int(patch_size),) * 3,
            depths=depths,
            num_heads=num_heads,
            mlp_ratio=4.0,
            qkv_bias=True,
            drop_rate=float(drop_rate),
            attn_drop_rate=float(attn_drop_rate),
            drop_path_rate=float(dropout_path_rate),
            norm_layer=nn.LayerNorm,
            patch_norm=False,
            use_checkpoint=bool(use_checkpoint),
            spatial_dims=3,
            downsample=MERGING_CLASSES[merging],
            use_v2=False,
        )
        dim = 16 * self.feature_size
        self.bottleneck_dim = dim
        self.rotation_head = nn.Linear(dim, 4)
        self.contrastive_head = nn.Linear(dim, int(contrastive_dim))
        self.conv = _reconstruction_decoder(dim, self.input_channels)
        if attention != "monai":
            _swap_attention(self.swinViT, SDPAWindowAttention if attention == "sdpa" else AutoWindowAttention)
        _swap_small_input_convs(self)  # CPU bf16: fp32 for convolutions of inputs smaller than the kernel

    def set_axis_order(self, axis_order: str) -> None:
        if axis_order not in AXIS_ORDERS:
            raise ValueError(f"axis_order must be one of {AXIS_ORDERS}, got {axis_order!r}")
        self.axis_order = axis_order

    def forward(self, x: torch.Tensor):
        if x.dim() != 5 or x.shape[1] != self.input_channels:
            raise ValueError(f"BSFSSLModel expects (B, {self.input_channels}, D, H, W) input, got {tuple(x.shape)}")
        if any(s % 32 for s in x.shape[2:]):
            raise ValueError(f"BSFSSLModel needs spatial sizes that are multiples of 32, got {tuple(x.shape[2:])}")
        if self.axis_order == "xyz":
            x = x.permute(0, 1, 4, 3, 2)
        x_out = self.swinViT(x.contiguous(), self.normalize)[4]  # (B, C, h, w, d)
        tokens = x_out.flatten(2).transpose(1, 2)  # (B, h*w*d, C), as the official SSL head
        if tokens.shape[1] < 2:
            raise ValueError("BSFSSLModel needs at least two bottleneck tokens (spatial size >= 64 on some axis)")
        rot = self.rotation_head(tokens[:, 0])
        con = self.contrastive_head(tokens[:, 1])
        rec = self.conv(x_out)
        if self.axis_order == "xyz":
            rec = rec.permute(0, 1, 4, 3, 2)
        return rot, con, rec

    def encoder_state_dict(self) -> dict:
        """The encoder's tensors under their ``swinViT.*`` keys (as in BSFSwinUNETR / MONAI SwinUNETR)."""
        return {k: v for k, v in self.state_dict().items() if k.startswith("swinViT.")}


def strip_prefix(state_dict: Mapping[str, torch.Tensor], prefix: str = "module.") -> dict:
    """Remove ``prefix`` (DistributedDataParallel's ``module.``) from the keys that carry it."""
    n = len(prefix)
    return {(k[n:] if k.startswith(prefix) else k): v for k, v in state_dict.items()}
