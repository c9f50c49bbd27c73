"""Read BrainSegFounder / Swin-UNETR checkpoints of any supported format (copying them into a model:
:mod:`bsf_nnunet.weights.transfer`).

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

Why this module is a little over 400 lines: it is the project's one checkpoint reader, and the safe file reading
and the per-format recognisers (one short function each, tried in the order of ``_RECOGNISERS``) are read together
when a file is refused or misclassified; transfer into a model already lives apart.
"""
from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Optional, Sequence, Tuple

import torch

from ..errors import BSFError
from .architecture import describe_architecture, guess_variant

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
    """Read any supported checkpoint file: state dict normalised, metadata collected and inferred, completed by
    the file's sidecar (``<file>.bsf.json``, :mod:`bsf_nnunet.weights.sidecar`) where it has one."""
    from .sidecar import apply_sidecar  # sidecar.py imports this module

    path = os.fspath(path)
    if path.endswith(".safetensors"):
        ckpt = load_safetensors_checkpoint(path)
    else:
        ckpt = checkpoint_from_object(read_checkpoint_file(path, allow_unsafe_pickle), path=path)
    apply_sidecar(ckpt.metadata, path)
    return ckpt


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
