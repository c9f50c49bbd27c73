"""Exported CPU execution engines of :class:`~bsf_nnunet.network.swin_unetr.BSFSwinUNETR` inference.

On CPU, OpenVINO and ONNX Runtime run the Swin-UNETR forward faster than PyTorch (docs/performance.md). A network
with an engine attached (``network.cpu_engine``, see :func:`configure_cpu_engine`) sends eval-mode, no-grad, fp32
CPU forwards through it; everything else (training, gradients, autocast, CUDA, tracing) stays in PyTorch.

``BSF_CPU_ENGINE=openvino|onnxruntime|torch`` chooses (default: the first of these that is installed; ``torch`` is
the exact PyTorch fp32 path). The network is exported once per window shape and weights into ``BSF_CACHE_DIR``
(default ``~/.cache/bsf_nnunet/onnx``), named by a digest of the weights, architecture, shape and library versions,
so later runs of the same model reuse it: for OpenVINO a folder with its own model format, from ``torch.export``
(Small at 128^3 on 2 cores: about 12 s to export and convert, 1-2 s to compile); for ONNX Runtime an ONNX file from
the legacy TorchScript exporter (opset 18, fixed shape). In both, the shifted-window masks are computed by the
graph from small constants (:func:`~bsf_nnunet.network.swin_unetr.shift_masks_computed_in_graph`) instead of being
folded into large constants. OpenVINO also keeps its compiled model there (``openvino/bf16-<cpu>`` or
``openvino/f32-<cpu>``, one per CPU instruction set; loads from the cache in under 1 s). ONNX Runtime computes in
fp32; OpenVINO in bf16 where the CPU computes bf16 natively (AVX512-BF16, AMX; ``BSF_CPU_BF16`` decides, as for
training), else fp32. In-process the compiled model is kept until the weights change (nnU-Net's predictor loads each
fold's weights into the same network; the change is seen from the parameters' version counters and data pointers). Any
export or engine failure falls back to PyTorch for that network with one printed line, never a crash.

This module knows nothing about trainers or nnU-Net.
"""
from __future__ import annotations

import hashlib
import importlib.util
import itertools
import os
import warnings
from typing import Callable, Optional

import numpy as np
import torch
from torch import nn

from ..devices import cpu_bf16_enabled, cpu_signature
from ..settings import value
from .swin_unetr import shift_masks_computed_in_graph

ENGINE_ENV = "BSF_CPU_ENGINE"
CACHE_ENV = "BSF_CACHE_DIR"
ENGINES = ("openvino", "onnxruntime", "torch")  # the default is the first one installed
ONNX_OPSET = 18
EXPORT_REVISION = 3  # bumped whenever the exported graph changes for the same weights (part of the file name)
ARCH_ATTRIBUTES = ("merging", "axis_order")

_printed = set()


def _print_once(message: str) -> None:
    """nnU-Net's predictor has no logger: print each distinct message once per process."""
    if message not in _printed:
        _printed.add(message)
        print(message, flush=True)


def engine_installed(engine: str) -> bool:
    """Whether the engine's Python package is importable (``torch`` always is)."""
    return engine == "torch" or importlib.util.find_spec(engine) is not None


def cpu_engine_choice() -> str:
    """``BSF_CPU_ENGINE`` (``openvino``, ``onnxruntime`` or ``torch``); by default the first of them installed."""
    env = value(ENGINE_ENV)  # openvino | onnxruntime | torch | auto (aliases ov, ort)
    if env == "auto":
        return next(e for e in ENGINES if engine_installed(e))
    if not engine_installed(env):
        _print_once(f"{ENGINE_ENV}={env} but {env} is not installed (pip install {env}): predicting with PyTorch on "
                    "CPU")
        return "torch"
    return env


def configure_cpu_engine(network: nn.Module, choice: Optional[str] = None) -> nn.Module:
    """Attach the engine ``choice`` (default: :func:`cpu_engine_choice`) to ``network``; ``"torch"`` detaches it."""
    choice = cpu_engine_choice() if choice is None else choice
    if choice not in ENGINES:
        raise ValueError(f"unknown CPU engine {choice!r}; use one of {ENGINES}")
    network.cpu_engine = {"openvino": OpenVinoEngine, "onnxruntime": OnnxRuntimeEngine}.get(choice, lambda: None)()
    return network


def default_cache_dir() -> str:
    return value(CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "bsf_nnunet", "onnx")


def weights_version(network: nn.Module) -> tuple:
    """Cheap fingerprint that changes whenever a parameter or buffer is written or replaced."""
    return tuple((t.data_ptr(), t._version) for t in itertools.chain(network.parameters(), network.buffers()))


def model_digest(network: nn.Module, shape: tuple) -> str:
    """sha256 of the weights, architecture, input shape and exporter versions: the cached ONNX file's name."""
    h = hashlib.sha256()
    meta = [type(network).__qualname__, tuple(shape), torch.__version__, ONNX_OPSET, EXPORT_REVISION]
    meta += [getattr(network, a, None) for a in ARCH_ATTRIBUTES]
    h.update(repr(meta).encode())
    for name, t in network.state_dict().items():
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()[:32]


class _TorchForward(nn.Module):
    """The network's PyTorch forward, for the exporter (never the engine itself)."""

    def __init__(self, network: nn.Module):
        super().__init__()
        self.network = network

    def forward(self, x):
        anchor = (x.reshape(-1)[:1] > 0).to(x.dtype) * 0  # a zero that engines cannot fold (NaN/Inf input too)
        with shift_masks_computed_in_graph(anchor):
            return self.network.torch_forward(x)


def export_onnx_file(network: nn.Module, shape: tuple, path: str, dynamic_batch: bool = False) -> None:
    """Trace ``network``'s PyTorch forward at input ``shape`` into ``path`` (opset :data:`ONNX_OPSET`, input
    ``input``, output ``logits``; ``dynamic_batch``: any batch size), written atomically: complete or absent. The
    one ONNX exporter: this engine's cache and ``bsf-nnunet export --to onnx`` both use it."""
    from ..io import atomic_path

    x = torch.zeros(shape)
    wrapper = _TorchForward(network).train(network.training)  # the exporter restores the wrapper's mode recursively
    dynamic = {"input": {0: "batch"}, "logits": {0: "batch"}} if dynamic_batch else None
    with atomic_path(path, keep_extension=False) as tmp, warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # tracer warnings about Python shape checks
        torch.onnx.export(wrapper, (x,), tmp, dynamo=False, opset_version=ONNX_OPSET,
                          input_names=["input"], output_names=["logits"], dynamic_axes=dynamic)


OPENVINO_MODEL = "model.xml"  # with model.bin beside it, in the exported folder


def export_openvino_model(network: nn.Module, shape: tuple, folder: str) -> None:
    """``network``'s PyTorch forward at input ``shape`` as an OpenVINO model (``folder``/model.xml and model.bin,
    fp32 weights), written atomically: the folder is complete or absent. ``torch.export`` traces with fake tensors,
    where the ONNX exporter runs the fp32 forward (Small at 128^3 on 2 cores: 2.8 s + 9 s conversion, against
    23.5 s for the ONNX file)."""
    import openvino

    from ..io import atomic_folder

    wrapper = _TorchForward(network)
    # replace=False: processes predicting in parallel (folds on a cluster) share the cache; the first export stays
    with atomic_folder(folder, replace=False) as tmp, warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        program = torch.export.export(wrapper, (torch.zeros(shape),))
        openvino.save_model(openvino.convert_model(program), os.path.join(tmp, OPENVINO_MODEL),
                            compress_to_fp16=False)


def open_session(path: str):
    """An ONNX Runtime CPU session using as many threads as PyTorch does."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # no arena and no pre-planned activation block: Small at 96^3 peaks at 3.2 GB instead of 5.1 GB for ~9% more time
    # (docs/performance.md); prediction on a workstation is bounded by memory before time
    options.enable_cpu_mem_arena = False
    options.enable_mem_pattern = False
    return ort.InferenceSession(path, sess_options=options, providers=["CPUExecutionProvider"])


def compile_openvino(path: str, cache_dir: str, bf16: bool = False):
    """An OpenVINO CPU model compiled from the model file ``path`` (OpenVINO's .xml or ONNX): latency mode,
    PyTorch's thread count, fp32 or (``bf16``) bf16 arithmetic; the compiled model is cached in
    ``cache_dir``/``bf16-<cpu>`` or ``f32-<cpu>`` (a second compilation of the same file with the same precision on
    the same kind of CPU loads it). The precision is always set explicitly: OpenVINO's own default is bf16 on CPUs
    with AMX, whatever the user chose. One cache folder per precision because OpenVINO 2026.4 finds an f32-compiled
    model under the same cache key when bf16 is asked for, and the process then dies of a segmentation fault at the
    first inference (an AMX CPU; f32 compiled, then bf16 in a new process). One per CPU instruction set
    (:func:`cpu_signature`) because its cache key is not known to tell CPUs apart either, and cluster nodes of
    different CPU generations often share one home folder (and so ``BSF_CACHE_DIR``)."""
    import openvino

    precision = "bf16" if bf16 else "f32"
    core = openvino.Core()
    core.set_property({"CACHE_DIR": os.path.join(cache_dir, f"{precision}-{cpu_signature()}")})
    config = {"INFERENCE_NUM_THREADS": torch.get_num_threads(), "PERFORMANCE_HINT": "LATENCY",
              "INFERENCE_PRECISION_HINT": precision}
    return core.compile_model(path, "CPU", config)


class ExportedEngine:
    """Runs a network's inference forward from an exported copy of it (one compiled model per input shape and
    weights), cached in a file or folder named by :func:`model_digest`. Subclasses say how the network is exported
    (``suffix``, :meth:`export`) and how the export becomes a function from an input array to the logits array
    (:meth:`open`)."""

    name = ""
    label = ""
    suffix = ""

    def __init__(self, cache_dir: Optional[str] = None):
        self.cache_dir = cache_dir
        self.failed: Optional[str] = None
        self.exports = 0  # exports written by this engine (tests, logs)
        self._weights = None
        self._sessions: dict = {}

    def accepts(self, x: torch.Tensor) -> bool:
        return self.failed is None and x.device.type == "cpu" and x.dtype == torch.float32

    def run(self, network: nn.Module, x: torch.Tensor) -> Optional[torch.Tensor]:
        """The logits for ``x``, or None after a failure (then the caller runs PyTorch)."""
        try:
            infer = self._session(network, tuple(x.shape))
            out = infer(x.detach().contiguous().numpy())
        except Exception as e:  # any engine problem falls back to PyTorch
            self.failed = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            self._sessions.clear()
            _print_once(f"BSF CPU engine: {self.label} failed ({self.failed[:300]}); predicting with PyTorch fp32 "
                        f"instead. Set {ENGINE_ENV}=torch to skip the attempt.")
            return None
        return torch.from_numpy(out)

    def export(self, network: nn.Module, shape: tuple, path: str) -> None:
        raise NotImplementedError

    def open(self, path: str, folder: str) -> Callable[[np.ndarray], np.ndarray]:
        raise NotImplementedError

    def precision(self) -> str:
        return "fp32"

    def _session(self, network: nn.Module, shape: tuple):
        version = weights_version(network)
        if version != self._weights:  # new weights (e.g. the next fold): drop the sessions of the old ones
            self._sessions.clear()
            self._weights = version
        if shape not in self._sessions:
            self._sessions[shape] = self._load_or_export(network, shape)
        return self._sessions[shape]

    def _load_or_export(self, network: nn.Module, shape: tuple):
        folder = self.cache_dir or default_cache_dir()
        path = os.path.join(folder, f"swin_unetr_{model_digest(network, shape)}{self.suffix}")
        if not os.path.exists(path):
            with torch.inference_mode(False):
                self.export(network, shape, path)
            self.exports += 1
        infer = self.open(path, folder)
        others = " or ".join(f"{ENGINE_ENV}={e}" for e in ENGINES if e != self.name)
        _print_once(f"BSF CPU engine: {self.label} ({self.precision()}, {torch.get_num_threads()} threads; model "
                    f"cached in {folder}). {others} to change it.")
        return infer


class OnnxRuntimeEngine(ExportedEngine):
    name, label, suffix = "onnxruntime", "ONNX Runtime", ".onnx"

    def export(self, network: nn.Module, shape: tuple, path: str) -> None:
        export_onnx_file(network, shape, path)

    def open(self, path: str, folder: str) -> Callable[[np.ndarray], np.ndarray]:
        session = open_session(path)
        return lambda x: session.run(None, {"input": x})[0]


class OpenVinoEngine(ExportedEngine):
    name, label, suffix = "openvino", "OpenVINO", ".openvino"

    def export(self, network: nn.Module, shape: tuple, path: str) -> None:
        export_openvino_model(network, shape, path)

    def precision(self) -> str:
        """bf16 where the CPU computes it natively (``BSF_CPU_BF16`` decides, as for training), else fp32."""
        return "bf16" if cpu_bf16_enabled() else "fp32"

    def open(self, path: str, folder: str) -> Callable[[np.ndarray], np.ndarray]:
        bf16 = self.precision() == "bf16"
        model = os.path.join(path, OPENVINO_MODEL)
        request = compile_openvino(model, os.path.join(folder, "openvino"), bf16=bf16).create_infer_request()
        # the request owns its output buffer and overwrites it at the next call: copy
        return lambda x: np.array(request.infer({0: x})[0], copy=True)
