"""Read BrainSegFounder / Swin-UNETR checkpoints of any supported format and copy their tensors into a model.

Formats (``Checkpoint.metadata['format']``):

* ``bsf_pretrain``: our pretraining checkpoints, ``{'network_weights' | 'state_dict', 'bsf_metadata': {...}}``.
* ``bsf_nnunet``: nnU-Net checkpoints (``network_weights``, ``init_args`` with plans and dataset.json, ...).
* ``monai_ssl``: official BrainSegFounder / MONAI Swin SSL, ``{'state_dict': {'module.swinViT.*', heads}}``; older
  files without the ``swinViT.`` level (``module.patch_embed.*``, ``module.layers1.0.*``) are mapped onto it.
* ``monai_finetuned``: official fine-tuned Swin-UNETR, ``{'state_dict': {'swinViT.*', 'encoder1.*', ...}}``.
* ``nnssl``: MIC-DKFZ nnssl pretraining checkpoints (``network_weights`` + ``nnssl_adaptation_plan``) of a
  Swin-UNETR; other nnssl architectures are refused (``bsf_nnunet/weights/nnssl.py``).
* ``raw``: tensors without a Swin encoder.

Files without our or nnU-Net's metadata are classified by their tensor names (:func:`classify_by_keys`), whatever
their container: a bare dict of ``module.swinViT.*`` tensors is an official SSL file like one inside
``{'state_dict': ...}``.

``module.`` (DDP) and ``_orig_mod.`` (torch.compile) prefixes are removed. Files are read with
``torch.load(weights_only=True)`` (plus numpy scalars/arrays, which nnU-Net's logging stores); anything that needs
full unpickling is refused unless the caller passes ``allow_unsafe_pickle=True``.
"""
from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple

import torch

from ..errors import BSFError
from .channels import adapt_channel_tensor, adapt_input_weight, mapping_table, resolve_channel_mapping

UNSAFE_PICKLE_OPTION = "--allow-unsafe-pickle"
UNSAFE_PICKLE_ENV = "BSF_ALLOW_UNSAFE_PICKLE"
# a .safetensors file holds tensors only; its metadata (channels, merging, axis order) is this JSON beside it
SAFETENSORS_METADATA_FILE = "bsf_model.json"
FORMATS = ("bsf_pretrain", "bsf_nnunet", "monai_ssl", "monai_finetuned", "nnssl", "raw")
MERGING_MODES = ("legacy", "fixed")
STATE_DICT_KEYS = ("network_weights", "state_dict", "model_state_dict", "model", "net")
# tensors whose dimension 1 is the network's input channels
INPUT_CHANNEL_KEYS = ("swinViT.patch_embed.proj.weight", "encoder1.layer.conv1.conv.weight",
                      "encoder1.layer.conv3.conv.weight")
# tensors whose dimension 0 is the network's input channels (the SSL reconstruction head's last convolution)
OUTPUT_CHANNEL_KEYS = ("conv.20.weight", "conv.20.bias")
SSL_HEAD_ROOTS = ("rotation_head", "rotation_pre", "contrastive_head", "contrastive_pre", "conv")
SEGMENTATION_ROOTS = ("encoder1", "encoder2", "encoder3", "encoder4", "encoder10", "decoder1", "decoder2",
                      "decoder3", "decoder4", "decoder5", "out")
# top-level modules of MONAI's SwinTransformer (plus the research code's final norm) in legacy SSL files
SWIN_ROOTS = ("patch_embed", "pos_drop", "layers1", "layers2", "layers3", "layers4", "layers1c", "layers2c",
              "layers3c", "layers4c", "norm")
class CheckpointError(BSFError, RuntimeError):
    """A checkpoint file that cannot be read (missing, corrupt, or needing full unpickling); says what to do."""


class CorruptCheckpointError(CheckpointError):
    """A checkpoint file that is truncated or corrupt (``detail``: what the reader said)."""

    def __init__(self, message: str, detail: str = ""):
        super().__init__(message)
        self.detail = detail


class NonFiniteWeightsError(CheckpointError, ValueError):
    """A checkpoint whose tensors hold NaN or Inf values."""


class WeightsMismatchError(BSFError, RuntimeError):
    """A checkpoint whose encoder does not fit the model (variant, merging flavour, or nothing in common)."""


@dataclass
class Checkpoint:
    state_dict: dict
    metadata: dict = field(default_factory=dict)
    path: Optional[str] = None


# ---------------------------------------------------------------------------------------------------- reading
def _numpy_safe_globals() -> list:
    """numpy scalars, dtypes and plain arrays (nnU-Net logs np.float32/np.float64), also under numpy 1.x names."""
    try:
        import numpy as np
    except ImportError:  # pragma: no cover
        return []
    core = getattr(np, "_core", None) or np.core
    scalar, recon = core.multiarray.scalar, core.multiarray._reconstruct
    out = [np.dtype, np.ndarray, scalar, recon]
    for obj, attr in ((scalar, "scalar"), (recon, "_reconstruct")):
        for mod in ("numpy.core.multiarray", "numpy._core.multiarray"):
            if f"{obj.__module__}.{attr}" != f"{mod}.{attr}":
                out.append((obj, f"{mod}.{attr}"))
    dtypes = getattr(np, "dtypes", None)
    if dtypes is not None:
        for name in ("Float16DType", "Float32DType", "Float64DType", "Int8DType", "Int16DType", "Int32DType",
                     "Int64DType", "UInt8DType", "UInt16DType", "UInt32DType", "UInt64DType", "BoolDType"):
            if hasattr(dtypes, name):
                out.append(getattr(dtypes, name))
    return out


def _allowed_names() -> set:
    names = set()
    for g in _numpy_safe_globals():
        if isinstance(g, tuple):
            names.add(g[1])
        else:
            names.add(f"{g.__module__}.{g.__qualname__}")
    return names


def _corrupt(path: str, detail: str) -> CheckpointError:
    return CorruptCheckpointError(
        f"Checkpoint {path} is corrupt or incomplete ({detail}). Re-download it (compare its size/checksum with "
        "the source), or use the previous checkpoint (checkpoint_best.pth / checkpoint_latest.pth, or the previous "
        "stage's checkpoint_final.pth).", detail)


def _unsafe_message(path: str, globals_needed: Sequence[str]) -> CheckpointError:
    need = ", ".join(globals_needed) if globals_needed else "Python objects other than tensors"
    return CheckpointError(
        f"Checkpoint {path} contains Python objects that torch.load(weights_only=True) refuses to rebuild ({need}). "
        "Loading it needs full unpickling, which can execute arbitrary code: do it only for a file from a source "
        f"you trust, with {UNSAFE_PICKLE_OPTION} (or the environment variable {UNSAFE_PICKLE_ENV}=1; Python: "
        "load_checkpoint(path, allow_unsafe_pickle=True)).")


def _first_line(e: BaseException) -> str:
    """``Type: first sentence`` of an exception (torch's messages run on for paragraphs)."""
    text = str(e).strip().splitlines()
    if not text:
        return type(e).__name__
    first = text[0].split(". ")[0].rstrip(".")
    return f"{type(e).__name__}: {first[:200]}"


def read_checkpoint_file(path, allow_unsafe_pickle: bool = False):
    """``torch.load`` on CPU with clear :class:`CheckpointError` messages; weights-only unless allowed."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise CheckpointError(f"Checkpoint {path} does not exist (check the path; nothing was downloaded).")
    if os.path.isdir(path):
        inside = [f for f in ("checkpoint_final.pth", "checkpoint_best.pth", "checkpoint_latest.pth")
                  if os.path.isfile(os.path.join(path, f))]
        hint = f" It contains {', '.join(inside)}: pass one of those." if inside else ""
        raise CheckpointError(f"Checkpoint {path} is a directory, not a checkpoint file.{hint}")
    if os.path.getsize(path) == 0:
        raise _corrupt(path, "the file is empty, 0 bytes")
    try:
        if allow_unsafe_pickle:
            return torch.load(path, map_location="cpu", weights_only=False)
        with torch.serialization.safe_globals(_numpy_safe_globals()):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # zipfile / pickle / torch errors come in many types
        msg = str(e)
        if not allow_unsafe_pickle and "Unsupported global" in msg:
            needed = []
            try:
                allowed = _allowed_names()
                needed = [g for g in torch.serialization.get_unsafe_globals_in_checkpoint(path) if g not in allowed]
            except Exception:
                pass
            if not needed:
                needed = re.findall(r"GLOBAL ([\w.]+)", msg)[:1]
            raise _unsafe_message(path, needed) from None
        if allow_unsafe_pickle and isinstance(e, (ModuleNotFoundError, AttributeError)):
            raise CheckpointError(
                f"Checkpoint {path} pickles Python objects whose code is not importable here ({_first_line(e)}); "
                "install the package that defined them, or re-save the checkpoint as a plain state dict.") from None
        raise _corrupt(path, _first_line(e)) from None


# ---------------------------------------------------------------------------------------------------- state dicts
def _is_state_dict(obj) -> bool:
    return isinstance(obj, Mapping) and len(obj) > 0 and any(torch.is_tensor(v) for v in obj.values()) and \
        all(isinstance(k, str) for k in obj)


def normalise_state_dict(state_dict: Mapping) -> Tuple[dict, dict]:
    """Drop non-tensors, strip ``module.`` / ``_orig_mod.`` prefixes, map legacy Swin SSL encoder keys onto
    ``swinViT.*``. Returns ``(state_dict, info)`` with ``info = {'prefixes_stripped': [...],
    'legacy_encoder_keys': bool}``."""
    out, stripped = {}, set()
    for k, v in state_dict.items():
        if not torch.is_tensor(v):
            continue
        parts = str(k).split(".")
        while len(parts) > 1 and parts[0] in ("module", "_orig_mod"):
            stripped.add(parts.pop(0) + ".")
        if "_orig_mod" in parts[:-1]:
            stripped.add("_orig_mod.")
            parts = [p for p in parts[:-1] if p != "_orig_mod"] + parts[-1:]
        nk = ".".join(parts)
        if nk in out:
            raise CheckpointError(f"Two checkpoint tensors both become {nk!r} once the module./_orig_mod. "
                                  "prefixes are removed; the state dict is ambiguous.")
        out[nk] = v
    legacy = False
    if not any(k.startswith("swinViT.") for k in out) and "patch_embed.proj.weight" in out:
        legacy = True
        out = {("swinViT." + k if k.split(".")[0] in SWIN_ROOTS else k): v for k, v in out.items()}
    return out, {"prefixes_stripped": sorted(stripped), "legacy_encoder_keys": legacy}


def _roots(sd) -> set:
    return {k.split(".")[0] for k in sd}


def _plain(v):
    """numpy scalars -> Python numbers (metadata stays printable and JSON-friendly)."""
    if hasattr(v, "item") and not torch.is_tensor(v) and getattr(v, "shape", None) == ():
        return v.item()
    return v


def _nnunet_configuration(init_args: Mapping) -> Tuple[dict, Optional[str]]:
    plans = init_args.get("plans") or {}
    name = init_args.get("configuration")
    confs = plans.get("configurations", {}) if isinstance(plans, Mapping) else {}
    conf, seen = {}, set()
    while isinstance(name, str) and name in confs and name not in seen:
        seen.add(name)
        c = confs[name]
        conf = {**c, **conf}
        name = c.get("inherits_from")
    return conf, init_args.get("configuration")


def classify_by_keys(roots: set) -> dict:
    """Format and assumed conventions of a file without our or nnU-Net's metadata, from its tensor names alone
    (a bare state dict and one inside ``{'state_dict': ...}`` get the same checks).

    ``swinViT.*`` with segmentation modules: an official fine-tuned Swin-UNETR; ``swinViT.*`` otherwise: an official
    SSL file. Both were trained with MONAI < 1.5 (legacy merging) on (x, y, z) arrays and record no channel names.
    Anything else is ``raw`` (no Swin encoder to load)."""
    return _recognise(_Found({}, None, set(roots)), _KEY_RECOGNISERS)


def _find_state_dict(obj: Mapping, where: str) -> Tuple[Mapping, Optional[str]]:
    """``(state dict, key it was found under)``: the first of :data:`STATE_DICT_KEYS` holding tensors (or a
    module), else ``obj`` itself when it is a bare state dict (key None)."""
    for k in STATE_DICT_KEYS:
        if k in obj and isinstance(obj[k], torch.nn.Module):
            return obj[k].state_dict(), k
        if k in obj and _is_state_dict(obj[k]):
            return obj[k], k
    if _is_state_dict(obj):
        return obj, None
    keys = ", ".join(map(str, list(obj)[:10]))
    raise CheckpointError(f"Checkpoint {where} contains no state dict of tensors (top-level keys: {keys}).")


@dataclass
class _Found:
    """What the format recognisers look at: the loaded object, the key of its state dict and the tensor roots."""

    obj: Mapping
    container: Optional[str]
    roots: set

    @property
    def is_nnunet(self) -> bool:
        return self.container == "network_weights" and ("init_args" in self.obj or "trainer_name" in self.obj)

    @property
    def bsf_metadata(self) -> Optional[Mapping]:
        meta = self.obj.get("bsf_metadata") if self.container is not None else None
        return meta if isinstance(meta, Mapping) else None


def _nnunet_metadata(obj: Mapping) -> dict:
    """Trainer, configuration, network, channel names and preprocessing recorded by nnU-Net's checkpoint."""
    init_args = obj.get("init_args") or {}
    conf, conf_name = _nnunet_configuration(init_args)
    arch_block = conf.get("architecture") or {}
    arch = dict(arch_block.get("arch_kwargs") or {})
    net = arch_block.get("network_class_name")
    cn = (init_args.get("dataset_json") or {}).get("channel_names")
    meta = {
        "format": "bsf_nnunet", "trainer_name": obj.get("trainer_name"), "configuration": conf_name,
        "network_class": net, "arch_kwargs": arch, "epoch": _plain(obj.get("current_epoch")),
        "channel_names": [str(cn[k]) for k in sorted(cn, key=int)] if isinstance(cn, Mapping) and cn else None,
        "patch_size": conf.get("patch_size"), "spacing": conf.get("spacing"),
        "normalization": conf.get("normalization_schemes"),
    }
    if isinstance(conf.get("bsf"), Mapping) and conf["bsf"].get("variant"):
        meta["variant"] = conf["bsf"]["variant"]
    if net is None or "BSFSwinUNETR" in str(net):
        meta["merging"] = arch.get("merging", "legacy")
        meta["axis_order"] = arch.get("axis_order", "zyx")
    return meta


def _with_bsf_metadata(meta: dict, bsf_meta: Mapping, default_format: str) -> dict:
    """``meta`` overlaid with our own ``bsf_metadata`` (which wins over what nnU-Net's init_args say); the format
    is the one it declares if known, else ``default_format``."""
    declared = bsf_meta.get("format")
    meta.update({k: v for k, v in bsf_meta.items() if v is not None or k not in meta})
    arch = meta.get("arch_kwargs") or {}
    meta["format"] = declared if declared in FORMATS else default_format
    if declared is not None and declared != meta["format"]:
        meta["declared_format"] = declared
    meta.setdefault("merging", arch.get("merging", "legacy"))
    meta.setdefault("axis_order", arch.get("axis_order", "zyx"))
    meta.setdefault("channel_names", None)
    return meta


def _official_metadata(found: _Found, fmt: str) -> dict:
    """An official BrainSegFounder / MONAI file (see :func:`classify_by_keys`), with its training counters."""
    meta = {"format": fmt, "channel_names": None, "merging": "legacy", "merging_assumed": True,
            "axis_order": "xyz", "axis_order_assumed": True}
    if not _is_state_dict(found.obj):
        meta.update({k: _plain(found.obj[k]) for k in ("epoch", "global_step", "best_acc") if k in found.obj})
    return meta


# one recogniser per format, tried in this order (_RECOGNISERS); each returns the file's metadata or None
def _as_bsf_nnunet(found: _Found) -> Optional[dict]:
    if not found.is_nnunet:
        return None
    meta = _nnunet_metadata(found.obj)
    return meta if found.bsf_metadata is None else _with_bsf_metadata(meta, found.bsf_metadata, "bsf_nnunet")


def _as_bsf_pretrain(found: _Found) -> Optional[dict]:
    """Our pretraining checkpoints (or any file with our ``bsf_metadata``, in the format it declares)."""
    return None if found.bsf_metadata is None else _with_bsf_metadata({}, found.bsf_metadata, "bsf_pretrain")


def _as_monai_finetuned(found: _Found) -> Optional[dict]:
    if "swinViT" not in found.roots or not found.roots & set(SEGMENTATION_ROOTS):
        return None
    return _official_metadata(found, "monai_finetuned")


def _as_monai_ssl(found: _Found) -> Optional[dict]:
    return _official_metadata(found, "monai_ssl") if "swinViT" in found.roots else None


def _as_raw(found: _Found) -> dict:
    return {"format": "raw", "channel_names": None}


_KEY_RECOGNISERS = (_as_monai_finetuned, _as_monai_ssl, _as_raw)  # files without our or nnU-Net's metadata
_RECOGNISERS = (_as_bsf_nnunet, _as_bsf_pretrain) + _KEY_RECOGNISERS


def _recognise(found: _Found, recognisers) -> dict:
    return next(meta for meta in (recognise(found) for recognise in recognisers) if meta is not None)


def _architecture_metadata(state_dict: Mapping) -> dict:
    """Variant guess and channel counts read off the (normalised) tensors."""
    name, desc = guess_variant(state_dict)
    meta = {"variant_guess": name, "variant_description": desc}
    arch_info = describe_architecture(state_dict)
    if arch_info:
        meta.update(in_channels=arch_info["in_channels"], out_channels=arch_info["out_channels"])
    return meta


def checkpoint_from_object(obj, path: Optional[str] = None) -> Checkpoint:
    """A :class:`Checkpoint` from an already loaded object (any supported format; a module gives its state dict).

    The format is the first of :data:`_RECOGNISERS` that recognises the file."""
    where = path or "<in-memory checkpoint>"
    if isinstance(obj, torch.nn.Module):
        obj = obj.state_dict()
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"Checkpoint {where} holds a {type(obj).__name__}, not a dict of tensors or a "
                              "training checkpoint.")
    from .nnssl import is_nnssl_checkpoint, read_nnssl  # nnssl.py imports this module

    meta = None
    if is_nnssl_checkpoint(obj):  # before the others: it has nnU-Net's network_weights / init_args too
        raw_sd, meta = read_nnssl(obj, where)
        container = "network_weights"
    else:
        raw_sd, container = _find_state_dict(obj, where)
    sd, info = normalise_state_dict(raw_sd)
    if not sd:
        raise CheckpointError(f"Checkpoint {where} contains no tensors.")
    meta = meta or _recognise(_Found(obj, container, _roots(sd)), _RECOGNISERS)
    meta["state_dict_key"] = container
    meta["top_level_keys"] = [str(k) for k in obj][:20] if container else []
    meta.update(info)
    meta.update(_architecture_metadata(sd))
    return Checkpoint(state_dict=sd, metadata=meta, path=path)


def load_checkpoint(path, allow_unsafe_pickle: bool = False) -> Checkpoint:
    """Read any supported checkpoint file: state dict normalised, metadata collected and inferred."""
    path = os.fspath(path)
    if path.endswith(".safetensors"):
        return load_safetensors_checkpoint(path)
    return checkpoint_from_object(read_checkpoint_file(path, allow_unsafe_pickle), path=path)


def load_safetensors_checkpoint(path: str) -> Checkpoint:
    """A ``.safetensors`` state dict (e.g. ``bsf-nnunet export --to hub``), metadata from the
    ``bsf_model.json`` beside it if there is one (else classified by its tensor names like a bare state dict).
    safetensors files hold tensors only: nothing to unpickle."""
    import json

    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not os.path.isfile(path) or os.path.getsize(path) == 0:
        read_checkpoint_file(path)  # raises the missing / directory / empty-file error
    try:
        obj = {"state_dict": load_file(path, device="cpu")}
    except (SafetensorError, OSError, ValueError) as e:
        raise _corrupt(path, _first_line(e)) from None
    meta_path = os.path.join(os.path.dirname(path), SAFETENSORS_METADATA_FILE)
    if os.path.isfile(meta_path):
        try:
            with open(meta_path) as f:
                obj["bsf_metadata"] = json.load(f)
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{meta_path} (the metadata of {path}) cannot be read ({_first_line(e)}): "
                                  "download it again, or move it away to load the tensors without it.") from None
    return checkpoint_from_object(obj, path=path)


# ---------------------------------------------------------------------------------------------------- variants
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
