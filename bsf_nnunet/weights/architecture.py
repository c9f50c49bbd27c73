"""Which Swin-UNETR a state dict holds (feature size, depths, heads: read from its tensor shapes), which preset
variant that is, and which trainer to use with it."""
from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Optional, Tuple


def describe_architecture(state_dict: Mapping) -> Optional[dict]:
    """Feature size, depths, heads, window size and channel counts read off a (normalised) state dict."""
    w = state_dict.get("swinViT.patch_embed.proj.weight")
    if w is None or w.dim() < 3:
        return None
    depths, heads, window = [], [], None
    for i in range(1, 5):
        pat = re.compile(rf"swinViT\.layers{i}\.0\.blocks\.(\d+)\.")
        blocks = {int(m.group(1)) for k in state_dict for m in [pat.match(k)] if m}
        depths.append(max(blocks) + 1 if blocks else 0)
        t = state_dict.get(f"swinViT.layers{i}.0.blocks.0.attn.relative_position_bias_table")
        heads.append(int(t.shape[1]) if t is not None and t.dim() == 2 else None)
        if t is not None and window is None:
            side = round(t.shape[0] ** (1 / 3))
            window = (side + 1) // 2 if side ** 3 == t.shape[0] else None
    out = state_dict.get("out.conv.conv.weight")
    return {"feature_size": int(w.shape[0]), "depths": tuple(depths), "num_heads": tuple(heads),
            "window_size": window, "in_channels": int(w.shape[1]),
            "out_channels": int(out.shape[0]) if out is not None else None}


def _fmt_arch(a: dict) -> str:
    heads = "-".join("?" if h is None else str(h) for h in a["num_heads"])
    return (f"feature size {a['feature_size']}, depths {'-'.join(map(str, a['depths']))}, heads {heads}, "
            f"{a['in_channels']} input channel(s)")


def guess_variant(state_dict: Mapping) -> Tuple[Optional[str], str]:
    """``(variant name or None, description)`` from the Swin encoder tensors of a (normalised) state dict."""
    from ..planning.presets import load_preset

    a = describe_architecture(state_dict)
    if a is None:
        return None, "no Swin encoder tensors (swinViT.patch_embed.proj.weight is absent)"
    variants = load_preset("variants.json")
    for name in sorted(variants):
        v = variants[name]
        if (a["feature_size"] == v["feature_size"] and a["depths"] == tuple(v["depths"])
                and a["num_heads"] == tuple(v["num_heads"])):
            return name, f"variant {name!r} ({_fmt_arch(a)})"
    return None, f"no preset variant ({_fmt_arch(a)}; presets: {', '.join(sorted(variants))})"


def _trainer_hint(variant: Optional[str], arch: Optional[dict]) -> str:
    from ..planning.presets import variant_trainers

    trainers = variant_trainers()
    if variant in trainers:
        ft, pt = trainers[variant]
        return (f"Use the trainer of variant {variant!r}: -tr {ft} for fine-tuning (-tr {pt} for continued "
                "pretraining)")
    if arch:
        return (f"No trainer preset builds this architecture; build the network with feature_size="
                f"{arch['feature_size']}, depths={arch['depths']}, num_heads={arch['num_heads']}")
    return "Use a checkpoint of a BrainSegFounder Swin-UNETR"
