"""References written in the tests, shared by test folders (tests/ is on sys.path through its conftest.py)."""
import torch
from monai.networks.nets.swin_unetr import PatchMergingV2


class PreMonai15PatchMerging(PatchMergingV2):
    """Independent re-statement of MONAI 0.9-1.4's 3D PatchMerging.forward (the computation BrainSegFounder's
    published weights were trained with): eight strided slices, two of them repeated."""

    def forward(self, x):
        x0 = x[:, 0::2, 0::2, 0::2, :]
        x1 = x[:, 1::2, 0::2, 0::2, :]
        x2 = x[:, 0::2, 1::2, 0::2, :]
        x3 = x[:, 0::2, 0::2, 1::2, :]
        x4 = x[:, 1::2, 0::2, 1::2, :]
        x5 = x[:, 0::2, 1::2, 0::2, :]
        x6 = x[:, 0::2, 0::2, 1::2, :]
        x7 = x[:, 1::2, 1::2, 1::2, :]
        x = torch.cat([x0, x1, x2, x3, x4, x5, x6, x7], -1)
        return self.reduction(self.norm(x))
