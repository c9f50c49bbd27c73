"""Copy a checkpoint's tensors into a model: architecture checks, input channels mapped by name, the transfer
report (what loaded, what was skipped and why). Reading checkpoints is :mod:`bsf_nnunet.weights.loader`'s job."""
from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple

import torch

from .architecture import _trainer_hint, describe_architecture, guess_variant
from .channels import adapt_channel_tensor, adapt_input_weight, mapping_table, resolve_channel_mapping
from .loader import (
    INPUT_CHANNEL_KEYS,
    MERGING_MODES,
    OUTPUT_CHANNEL_KEYS,
    SEGMENTATION_ROOTS,
    SSL_HEAD_ROOTS,
    Checkpoint,
    NonFiniteWeightsError,
    WeightsMismatchError,
    checkpoint_from_object,
    load_checkpoint,
)


# ---------------------------------------------------------------------------------------------------- transfer
def _group_label(name: str) -> str:
    if name.endswith("relative_position_index"):
        return "*.relative_position_index"
    return name.split(".")[0] + ".*"


def _grouped(items) -> List[str]:
    groups: dict = {}
    for name, reason in items:
        groups.setdefault(reason, {}).setdefault(_group_label(name), 0)
        groups[reason][_group_label(name)] += 1
    lines = []
    for reason, labels in groups.items():
        n = sum(labels.values())
        lines.append(f"{n} tensor{'s' if n != 1 else ''} ({', '.join(labels)}): {reason}")
    return lines


@dataclass
class TransferReport:
    """What :func:`transfer_weights` did with every tensor: lists of ``(name, reason)``."""

    loaded: List[Tuple[str, str]] = field(default_factory=list)
    adapted: List[Tuple[str, str]] = field(default_factory=list)
    skipped: List[Tuple[str, str]] = field(default_factory=list)
    missing: List[Tuple[str, str]] = field(default_factory=list)
    warnings: List[str] = field(default_factory=list)
    channel_mapping: List[Tuple[int, Optional[int], str]] = field(default_factory=list)
    channel_table: List[str] = field(default_factory=list)
    source: Optional[str] = None
    source_format: Optional[str] = None
    source_variant: Optional[str] = None

    def names(self, which: str) -> List[str]:
        return [n for n, _ in getattr(self, which)]

    @property
    def encoder_loaded(self) -> int:
        return sum(1 for n, _ in self.loaded + self.adapted if n.startswith("swinViT."))

    def summary(self) -> str:
        lines = [f"Pretrained weights {self.source or '<in-memory>'} (format {self.source_format}, "
                 f"variant {self.source_variant or 'unknown'}): {len(self.loaded)} tensors loaded, "
                 f"{len(self.adapted)} adapted, {len(self.skipped)} skipped, {len(self.missing)} missing "
                 f"(randomly initialised); encoder (swinViT) tensors loaded: {self.encoder_loaded}"]
        if self.channel_table:
            lines.append("  input channels:")
            lines += [f"    {t}" for t in self.channel_table]
        for name, reason in self.adapted:
            lines.append(f"  adapted {name}: {reason}")
        lines += [f"  skipped {g}" for g in _grouped(self.skipped)]
        lines += [f"  missing {g}" for g in _grouped(self.missing)]
        lines += [f"  warning: {w}" for w in self.warnings]
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.summary()


def _absent_reason(name: str) -> str:
    root = name.split(".")[0]
    if root in SSL_HEAD_ROOTS:
        return "self-supervised pretraining head, not part of the target model"
    if root in SEGMENTATION_ROOTS:
        return "segmentation decoder/head, not part of the target model"
    return "not in the target model"


def model_merging(model: torch.nn.Module) -> Optional[str]:
    """``"legacy"`` / ``"fixed"`` for our networks (attribute ``merging`` or the merging modules), else None."""
    m = getattr(model, "merging", None)
    if m in MERGING_MODES:
        return m
    from ..network.swin_unetr import FixedPatchMerging, LegacyPatchMerging

    for mod in model.modules():
        if isinstance(mod, LegacyPatchMerging):
            return "legacy"
        if isinstance(mod, FixedPatchMerging):
            return "fixed"
    return None


def _as_checkpoint(checkpoint) -> Checkpoint:
    if isinstance(checkpoint, Checkpoint):
        return checkpoint
    if isinstance(checkpoint, (str, os.PathLike)):
        return load_checkpoint(checkpoint)
    return checkpoint_from_object(checkpoint)


def _raise_architecture(where: str, src: Mapping, tgt: Mapping, differences: List[str]):
    ck_var, ck_desc = guess_variant(src)
    _, m_desc = guess_variant(tgt)
    shown = "; ".join(differences[:4]) + (f"; ... ({len(differences)} differences)" if len(differences) > 4 else "")
    raise WeightsMismatchError(
        f"Checkpoint {where} does not fit the model's architecture.\n  checkpoint: {ck_desc}\n  model:      "
        f"{m_desc}\n  differences: {shown}\n{_trainer_hint(ck_var, describe_architecture(src))}. "
        "(strict_encoder=False loads only the tensors that fit; not recommended.)")


def check_finite(state_dict: Mapping, where: str) -> None:
    """Refuse weights that hold NaN or Inf (a diverged training or a damaged file) before they reach a model."""
    bad = [k for k, v in state_dict.items()
           if torch.is_tensor(v) and v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        shown = ", ".join(bad[:5]) + (f", ... ({len(bad) - 5} more)" if len(bad) > 5 else "")
        raise NonFiniteWeightsError(
            f"Checkpoint {where} holds NaN/Inf values in {len(bad)} tensor(s): {shown}. Weights like these come from "
            "a training that diverged or from a damaged file, and would make every output NaN; nothing was loaded. "
            "Use an earlier checkpoint of that run (checkpoint_best.pth, or the previous stage's "
            "checkpoint_final.pth) or download the file again.")


def _merging_warning(model: torch.nn.Module, meta: Mapping, where: str, checkpoint_merging: Optional[str],
                     allow_merging_mismatch: bool) -> Optional[str]:
    """The warning for a checkpoint trained with another patch-merging flavour than ``model`` (None when they
    agree or either is unknown); raises :class:`WeightsMismatchError` instead unless ``allow_merging_mismatch``."""
    ck_merging = checkpoint_merging or meta.get("merging")
    if checkpoint_merging is not None and checkpoint_merging not in MERGING_MODES:
        raise ValueError(f"checkpoint_merging must be one of {MERGING_MODES}, got {checkpoint_merging!r}")
    m_merging = model_merging(model)
    if ck_merging not in MERGING_MODES or not m_merging or ck_merging == m_merging:
        return None
    assumed = " (assumed: official BrainSegFounder/MONAI files were trained with MONAI < 1.5)" \
        if meta.get("merging_assumed") and checkpoint_merging is None else ""
    text = (f"Patch-merging mismatch: checkpoint {where} was trained with merging={ck_merging!r}{assumed}, the "
            f"model uses merging={m_merging!r}. 'legacy' is the 3D patch merging of MONAI < 1.5 (0.9-1.4), which "
            "BrainSegFounder's published weights were trained with (it repeats two of the eight 2x2x2 "
            "sub-grids); 'fixed' is MONAI >= 1.5's (all eight sub-grids). Weights trained with one compute a "
            "different function with the other.")
    if not allow_merging_mismatch:
        raise WeightsMismatchError(
            text + f" Build the model with merging={ck_merging!r} (trainer attribute bsf_merging; 'legacy' is "
            "the default), or pass allow_merging_mismatch=True to fine-tune across flavours anyway (if the "
            "checkpoint's flavour is known to differ from its metadata, pass checkpoint_merging=...).")
    return text + " Loaded anyway (allow_merging_mismatch=True)."


def _check_architecture(where: str, src: Mapping, tgt: Mapping) -> None:
    """Raise :class:`WeightsMismatchError` when the Swin encoders' sizes differ (both read off the tensors)."""
    ck_arch, m_arch = describe_architecture(src), describe_architecture(tgt)
    if ck_arch and m_arch:
        keys = ("feature_size", "depths", "num_heads", "window_size")
        diff = [f"{k} {ck_arch[k]} in the checkpoint, {m_arch[k]} in the model" for k in keys
                if ck_arch[k] != m_arch[k]]
        if diff:
            _raise_architecture(where, src, tgt, diff)


@dataclass
class _ChannelPlan:
    """How the checkpoint's input channels map onto the model's (``mapping`` None: no input tensor to map)."""

    mapping: Optional[list] = None
    identity: bool = True
    n_src: Optional[int] = None
    n_tgt: Optional[int] = None


def _plan_channels(src: Mapping, tgt: Mapping, src_names, tgt_names, report: TransferReport) -> _ChannelPlan:
    """Match the input channels by name (see :func:`resolve_channel_mapping`); records the table in ``report``."""
    pe = src.get(INPUT_CHANNEL_KEYS[0])
    pe = pe if pe is not None else src.get(INPUT_CHANNEL_KEYS[1])
    tpe = tgt.get(INPUT_CHANNEL_KEYS[0])
    if pe is None or tpe is None or pe.dim() <= 1 or tpe.dim() <= 1:
        return _ChannelPlan()
    n_src, n_tgt = int(pe.shape[1]), int(tpe.shape[1])
    mapping, warns = resolve_channel_mapping(src_names, tgt_names, n_src, n_tgt)
    report.warnings += warns
    report.channel_mapping = mapping
    report.channel_table = mapping_table(mapping, src_names, tgt_names)
    identity = n_src == n_tgt and all(s == t for t, s, _ in mapping)
    return _ChannelPlan(mapping, identity, n_src, n_tgt)


# what happens to one checkpoint tensor: (report list: loaded/adapted/skipped, reason, tensor to load or None,
# architecture difference or None)
_Placement = Tuple[str, str, Optional[torch.Tensor], Optional[str]]
_SAME = "same name and shape"


def _place_channel_tensor(k: str, v: torch.Tensor, t: torch.Tensor, plan: _ChannelPlan) -> Optional[_Placement]:
    """Input-channel tensors (and the SSL head's per-channel outputs) mapped by channel name; None for others."""
    if plan.mapping is None:
        return None
    if k in INPUT_CHANNEL_KEYS and v.dim() == t.dim() > 2 and v.shape[0] == t.shape[0] \
            and v.shape[2:] == t.shape[2:] and v.shape[1] == plan.n_src and t.shape[1] == plan.n_tgt:
        if plan.identity and v.shape == t.shape:
            return "loaded", _SAME, v, None
        how = "reordered" if v.shape[1] == t.shape[1] else f"{v.shape[1]} -> {t.shape[1]}"
        return ("adapted", f"input channels {how}, matched by name (see the channel table)",
                adapt_input_weight(v, plan.mapping), None)
    if k in OUTPUT_CHANNEL_KEYS and v.shape[0] == plan.n_src and t.shape[0] == plan.n_tgt \
            and v.shape[1:] == t.shape[1:]:
        if plan.identity:
            return "loaded", _SAME, v, None
        how = "reordered" if plan.n_src == plan.n_tgt else f"{plan.n_src} -> {plan.n_tgt}"
        return ("adapted", f"reconstruction outputs (one per input channel) {how}, matched by name (see the "
                "channel table)", adapt_channel_tensor(v, plan.mapping, dim=0), None)
    return None


# which checkpoint tensors a transfer may load: every one ("all"), the Swin encoder ("encoder"), or what the official
# scripts' strict=False loading loads ("official": the Swin layers 1-4; docs/fidelity_review.md item 1)
TRANSFER_SCOPES = {"all": (), "encoder": ("swinViT.",), "official": tuple(f"swinViT.layers{i}." for i in range(1, 5))}
_SCOPE_REASONS = {"encoder": "encoder_only: only the Swin encoder (swinViT.*) is transferred",
                  "official": "official hand-over: only the Swin layers 1-4 load, as in the official scripts (patch "
                              "embedding, heads and decoder stay as initialised)"}


def _outside_scope(k: str, scope: str) -> bool:
    prefixes = TRANSFER_SCOPES[scope]
    return bool(prefixes) and not k.startswith(prefixes)


def _place_tensor(k: str, v: torch.Tensor, tgt: Mapping, plan: _ChannelPlan, scope: str) -> _Placement:
    """Where checkpoint tensor ``k`` goes (see :data:`_Placement`)."""
    if k.endswith("relative_position_index"):
        return "skipped", "derived buffer (relative positions in a window), recomputed by the model", None, None
    if _outside_scope(k, scope):
        return "skipped", _SCOPE_REASONS[scope], None, None
    if k not in tgt:
        if k.startswith(("swinViT.layers", "swinViT.patch_embed")):
            return ("skipped", "encoder tensor absent from the model (architecture differs)", None,
                    f"{k} is in the checkpoint but not in the model")
        return "skipped", _absent_reason(k), None, None
    t = tgt[k]
    placed = _place_channel_tensor(k, v, t, plan)
    if placed is not None:
        return placed
    if v.shape == t.shape:
        return "loaded", _SAME, v, None
    if k.startswith("out."):
        return ("skipped", f"output head for {v.shape[0]} outputs, the model has {t.shape[0]}: left randomly "
                "initialised", None, None)
    return ("skipped", "shape differs from the model's (architecture differs)", None,
            f"{k}: checkpoint {tuple(v.shape)}, model {tuple(t.shape)}")


def _place_checkpoint(src: Mapping, tgt: Mapping, plan: _ChannelPlan, scope: str,
                      report: TransferReport) -> Tuple[dict, List[str]]:
    """Files every checkpoint tensor in ``report``; returns ``(tensors to load, architecture differences)``."""
    to_load, differences = {}, []
    for k, v in src.items():
        where_to, reason, tensor, difference = _place_tensor(k, v, tgt, plan, scope)
        getattr(report, where_to).append((k, reason))
        if tensor is not None:
            to_load[k] = tensor
        if difference is not None:
            differences.append(difference)
    return to_load, differences


def _record_missing(src: Mapping, tgt: Mapping, scope: str, report: TransferReport) -> List[str]:
    """Files the model tensors absent from the checkpoint in ``report``; returns the architecture differences
    (encoder tensors missing from a checkpoint that has a Swin encoder)."""
    differences = []
    has_swin = any(k.startswith("swinViT.") for k in src)
    for k in tgt:
        if k in src or k.endswith("relative_position_index"):
            continue
        if _outside_scope(k, scope):
            report.missing.append((k, f"not transferred ({scope}): randomly initialised"))
            continue
        if k.startswith("swinViT.") and has_swin:
            differences.append(f"{k} is in the model but not in the checkpoint")
        report.missing.append((k, "not in the checkpoint: randomly initialised"))
    return differences


def _require_encoder(report: TransferReport, src: Mapping, meta: Mapping, where: str) -> None:
    """Raise :class:`WeightsMismatchError` when no encoder tensor would load."""
    if report.encoder_loaded:
        return
    ck_desc = guess_variant(src)[1]
    first = ", ".join(list(src)[:8])
    net = f", network {meta['network_class']}" if meta.get("network_class") else ""
    trainer = f", trainer {meta['trainer_name']}" if meta.get("trainer_name") else ""
    raise WeightsMismatchError(
        f"The encoder would load nothing from {where} (format {meta.get('format')}{net}{trainer}): no swinViT.* "
        f"tensor of the checkpoint fits the model ({ck_desc}). First checkpoint keys: {first}. Is this a "
        "BrainSegFounder / Swin-UNETR checkpoint?")


def transfer_weights(model: torch.nn.Module, checkpoint, *, source_channels: Optional[Sequence[str]] = None,
                     target_channels: Optional[Sequence[str]] = None, encoder_only: bool = False,
                     strict_encoder: bool = True, verbose: bool = True, allow_merging_mismatch: bool = False,
                     checkpoint_merging: Optional[str] = None, scope: str = "all") -> TransferReport:
    """Copy the tensors of ``checkpoint`` (a :class:`Checkpoint`, a path or a loaded dict) into ``model``.

    Same name and shape: loaded. Input-channel tensors: mapped by channel name (``source_channels`` overrides
    the names recorded in the checkpoint; ``target_channels`` are the model's). ``out.*`` with another class
    count, heads absent from the model and ``relative_position_index`` buffers: skipped. Model tensors absent from
    the checkpoint: missing (left as initialised). Raises :class:`WeightsMismatchError` for another architecture
    (unless ``strict_encoder=False``), another patch-merging flavour (unless ``allow_merging_mismatch``;
    ``checkpoint_merging`` states the checkpoint's flavour when its metadata is absent or only assumed) and when
    no encoder tensor would load; :class:`~bsf_nnunet.weights.channels.ChannelMappingError` when the input
    channels cannot be matched; :class:`NonFiniteWeightsError` (before anything is copied) when the checkpoint holds
    NaN/Inf. ``scope`` (a key of :data:`TRANSFER_SCOPES`; ``encoder_only=True`` means ``"encoder"``) limits what
    loads: ``"official"`` loads the Swin layers 1-4 only, as the official BrainSegFounder scripts do. Returns the
    :class:`TransferReport` (printed when ``verbose``)."""
    scope = "encoder" if encoder_only else scope
    if scope not in TRANSFER_SCOPES:
        raise ValueError(f"scope must be one of {', '.join(TRANSFER_SCOPES)}, got {scope!r}")
    ckpt = _as_checkpoint(checkpoint)
    meta, src = ckpt.metadata, ckpt.state_dict
    where = ckpt.path or "<in-memory checkpoint>"
    check_finite(src, where)
    tgt = model.state_dict()
    report = TransferReport(source=ckpt.path, source_format=meta.get("format"),
                            source_variant=meta.get("variant_guess") or meta.get("variant"))
    warning = _merging_warning(model, meta, where, checkpoint_merging, allow_merging_mismatch)
    if warning is not None:
        report.warnings.append(warning)
    if strict_encoder:  # before the channels: a variant mismatch is the more useful message
        _check_architecture(where, src, tgt)
    src_names = list(source_channels) if source_channels is not None else meta.get("channel_names")
    tgt_names = list(target_channels) if target_channels is not None else None
    # the official scope never loads the input filters: no channel names needed
    plan = _ChannelPlan() if scope == "official" else _plan_channels(src, tgt, src_names, tgt_names, report)
    to_load, differences = _place_checkpoint(src, tgt, plan, scope, report)
    differences += _record_missing(src, tgt, scope, report)
    if differences and strict_encoder:
        _raise_architecture(where, src, tgt, differences)
    _require_encoder(report, src, meta, where)
    model.load_state_dict(to_load, strict=False)
    if verbose:
        print(report.summary())
    return report
