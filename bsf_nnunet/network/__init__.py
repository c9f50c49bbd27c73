"""Swin-UNETR network (MONAI building blocks) with merging modes, fused attention and axis order."""
from .swin_unetr import (  # noqa: F401
    ATTENTION_MODES,
    AXIS_ORDERS,
    MERGING_MODES,
    BSFSwinUNETR,
    FixedPatchMerging,
    LegacyPatchMerging,
    count_parameters,
)
