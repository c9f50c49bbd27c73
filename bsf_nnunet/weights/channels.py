"""Input-channel names: normalisation, aliases and the mapping of pretrained input filters onto a new channel set.

A pretrained network's first convolutions (``swinViT.patch_embed.proj.weight`` [fs, Cin, 2, 2, 2] and
``encoder1``'s convolutions) have one filter slice per input channel. When the new dataset's channels differ, the
slices are matched by *name*: ``"T1Gd"``, ``"t1c"`` and ``"ce-T1"`` all mean contrast-enhanced T1. A target channel
that matches a source channel copies its slice; one that matches none gets the mean slice over all source channels.
"""
from __future__ import annotations

import re
from typing import List, Optional, Sequence, Tuple

from ..errors import BSFError

PRETRAINED_CHANNELS_OPTION = "--pretrained-channels"
PRETRAINED_CHANNELS_ENV = "BSF_PRETRAINED_CHANNELS"


class ChannelMappingError(BSFError, ValueError):
    """The input channels of a checkpoint cannot be mapped onto the model's; the message says what to pass."""


# canonical name -> spellings, compared after normalisation (lower case, separators removed, "*" -> "star",
# "+" -> "plus")
_ALIASES = {
    "t1ce": ["t1ce", "t1c", "t1gd", "t1post", "t1plusc", "t1pluscontrast", "cet1", "t1contrast", "t1wce",
             "t1cew", "t1wpost", "t1postcontrast", "t1gad", "t1gado", "ct1", "t1enhanced"],
    "flair": ["flair", "t2flair", "t2wflair", "flairt2", "t2f", "darkfluid"],
    "t1": ["t1", "t1w", "t1n", "t1native", "t1pre", "t1precontrast", "t1weighted", "mprage", "t1mprage",
           "spgr", "t1spgr", "bravo"],
    "t2": ["t2", "t2w", "t2weighted", "t2tse", "t2fse"],
    "t2star": ["t2star", "t2starw"],
    "pd": ["pd", "pdw", "pdweighted", "protondensity"],
    "dwi": ["dwi", "dw", "diffusion", "trace", "b1000"],
    "adc": ["adc"],
    "swi": ["swi"],
    "ct": ["ct"],
}
ALIASES = {alias: canon for canon, names in _ALIASES.items() for alias in names}


def _squash(name) -> str:
    s = str(name).strip().lower().replace("*", "star").replace("+", "plus")
    return re.sub(r"[^0-9a-z]", "", s)


def normalise_channel_name(name) -> str:
    """Canonical form of a channel name: case-insensitive, separators (``-``, ``_``, spaces, dots) ignored and
    aliases resolved (``"T1Gd"`` -> ``"t1ce"``, ``"T2-FLAIR"`` -> ``"flair"``, ``"T1w"`` -> ``"t1"``). Unknown
    names come back squashed (``"My Seq_2"`` -> ``"myseq2"``)."""
    s = _squash(name)
    return ALIASES.get(s, s)


def parse_channel_list(text) -> List[str]:
    """``"FLAIR,T1ce,T1,T2"`` -> ``["FLAIR", "T1ce", "T1", "T2"]`` (a list/tuple is returned as a list of str)."""
    if isinstance(text, (list, tuple)):
        items = [str(t).strip() for t in text]
    else:
        items = [t.strip() for t in str(text).split(",")]
    if not items or any(not t for t in items):
        raise ValueError(f"Could not read a channel list from {text!r}: give the names in order, separated by "
                         f"commas, e.g. {PRETRAINED_CHANNELS_OPTION} FLAIR,T1ce,T1,T2")
    return items


def _fmt(names) -> str:
    return "[" + ", ".join(str(n) for n in names) + "]"


def map_channels(source_names: Sequence[str], target_names: Sequence[str]) -> List[Tuple[int, Optional[int], str]]:
    """For each target channel ``(target_index, source_index or None, how)``.

    ``how`` is ``"same"`` (same name up to case/separators), ``"alias"`` (same modality under another name) or
    ``"mean"`` (no source channel matches: the mean of the pretrained filters over all source channels).
    Raises :class:`ChannelMappingError` when no target channel matches any source channel."""
    source_names = [str(s) for s in source_names]
    target_names = [str(t) for t in target_names]
    by_squash, by_canon = {}, {}
    for i, s in enumerate(source_names):
        by_squash.setdefault(_squash(s), i)
        by_canon.setdefault(normalise_channel_name(s), i)
    out = []
    for t_idx, t in enumerate(target_names):
        if _squash(t) in by_squash:
            out.append((t_idx, by_squash[_squash(t)], "same"))
        elif normalise_channel_name(t) in by_canon:
            out.append((t_idx, by_canon[normalise_channel_name(t)], "alias"))
        else:
            out.append((t_idx, None, "mean"))
    if source_names and target_names and all(s is None for _, s, _ in out):
        raise ChannelMappingError(
            f"None of the model's input channels {_fmt(target_names)} matches a channel the checkpoint was trained "
            f"on {_fmt(source_names)} (names are compared case-insensitively, ignoring separators, with aliases such "
            "as T1Gd/T1c/T1post = T1ce, T2-FLAIR = FLAIR, T1w/MPRAGE = T1, T2w = T2). If the checkpoint's channels "
            f"are really others, name them in order, e.g. {PRETRAINED_CHANNELS_OPTION} "
            f"{','.join(target_names)} (environment variable {PRETRAINED_CHANNELS_ENV}; Python: "
            "transfer_weights(..., source_channels=[...])); otherwise this checkpoint does not fit the dataset.")
    return out


def resolve_channel_mapping(source_names: Optional[Sequence[str]], target_names: Optional[Sequence[str]],
                            n_source: int, n_target: int):
    """The mapping for ``n_source`` pretrained channels onto ``n_target`` model channels, and warnings.

    Names on both sides: :func:`map_channels`. One source channel: its filter for every target channel. A checkpoint
    without names: :class:`ChannelMappingError` asking for them (position mapping would silently mix modalities).
    A model without names: position by position when the counts are equal (with a warning), else the error."""
    if source_names is not None and len(source_names) != n_source:
        raise ChannelMappingError(
            f"{len(source_names)} checkpoint channel names were given {_fmt(source_names)} but the checkpoint's "
            f"input layer has {n_source} channels; pass exactly {n_source} names in the order the checkpoint was "
            f"trained with ({PRETRAINED_CHANNELS_OPTION} / {PRETRAINED_CHANNELS_ENV}).")
    if target_names is not None and len(target_names) != n_target:
        raise ChannelMappingError(
            f"{len(target_names)} model channel names were given {_fmt(target_names)} but the model has "
            f"{n_target} input channels.")
    if source_names is not None and target_names is not None:
        return map_channels(source_names, target_names), []
    if n_source == 1:
        # one pretrained filter: every mapping (by name, alias or mean) copies that filter, names change nothing
        return [(i, 0, "single") for i in range(n_target)], []
    if source_names is None:
        raise ChannelMappingError(unnamed_checkpoint_message(n_source, target_names))
    if n_source == n_target:
        return [(i, i, "position") for i in range(n_target)], [
            f"the model's input channel names are unknown: the {n_target} input channels were mapped by position "
            f"(checkpoint channel i {_fmt(source_names)} -> model channel i)."]
    raise ChannelMappingError(
        f"The checkpoint was trained on {n_source} input channels {_fmt(source_names)} and the model has "
        f"{n_target} whose names are unknown: pass the model's channel names (Python: "
        "transfer_weights(..., target_channels=[...])) so that filters can be matched by name.")


# what the published BrainSegFounder files were trained on, in order (they record no channel names themselves)
OFFICIAL_CHANNEL_ORDERS = {
    "UK Biobank stage 1 (model_weights_UKB-pretrain.pt)": "T1,FLAIR",
    "BraTS (model_weights_BRATS-pretrain.pt / -finetune.pt)": "FLAIR,T1ce,T1,T2",
    "ATLAS (model_weights_ATLAS-pretrain.pt / -finetune.pt)": "T1",
}


def unnamed_checkpoint_message(n_source: int, target_names: Optional[Sequence[str]]) -> str:
    """Why a checkpoint without channel names is refused, and which names to pass."""
    known = f"this dataset's channels are {_fmt(target_names)}" if target_names is not None else \
        "the model's channel names are unknown"
    orders = "; ".join(f"{k}: {v}" for k, v in OFFICIAL_CHANNEL_ORDERS.items())
    return (
        f"The checkpoint's {n_source} input channels have no names (official BrainSegFounder/MONAI files and bare "
        f"state dicts record none), and {known}. Mapping by position would silently put one modality's filters on "
        "another (nnU-Net's own BraTS conversion orders T1, T1ce, T2, FLAIR; the official BraTS files use FLAIR, "
        f"T1ce, T1, T2). Name the checkpoint's channels once, in the order it was trained with: `bsf-nnunet "
        f"weights describe FILE --channels NAMES` writes FILE.bsf.json beside it, which every command then reads "
        f"(or, for one run: environment variable {PRETRAINED_CHANNELS_ENV}=NAMES for nnUNetv2_train, "
        f"{PRETRAINED_CHANNELS_OPTION} NAMES for bsf-nnunet commands, transfer_weights(..., source_channels=[...]) "
        f"in Python). Official orders: {orders}.")


def adapt_channel_tensor(tensor, mapping, dim: int = 1):
    """Build a tensor with one slice per target channel along ``dim`` from a pretrained one with one slice per
    source channel, following ``mapping`` (matched: that slice; unmatched: the mean over source channels)."""
    import torch

    mean = tensor.mean(dim=dim)
    slices = [mean if s is None else tensor.select(dim, s) for _, s, _ in mapping]
    return torch.stack(slices, dim=dim).contiguous()


def adapt_input_weight(weight, mapping):
    """Build a [out, n_target, ...] tensor from a pretrained [out, n_source, ...] one following ``mapping``."""
    return adapt_channel_tensor(weight, mapping, dim=1)


def mapping_table(mapping, source_names, target_names) -> List[str]:
    """Human-readable lines, one per target channel."""
    lines = []
    for t, s, how in mapping:
        tn = f"{t} {target_names[t]!r}" if target_names is not None else f"{t}"
        if s is None:
            src = "mean of all checkpoint channels (no match)"
        elif how == "single":
            src = "the checkpoint's only channel"
        else:
            sn = f"{s} {source_names[s]!r}" if source_names is not None else f"{s}"
            src = f"checkpoint channel {sn} ({how})"
        lines.append(f"model channel {tn} <- {src}")
    return lines
