"""OpenVINO and ONNX Runtime as CPU engines of BSFSwinUNETR inference (bsf_nnunet.network.cpu_engine)."""
import contextlib
import os
import subprocess
import sys
import warnings

import pytest
import torch

from bsf_nnunet.devices import cpu_has_native_bf16, cpu_signature
from bsf_nnunet.errors import ConfigurationError
from bsf_nnunet.network import BSFSwinUNETR, cpu_engine
from bsf_nnunet.network.cpu_engine import OnnxRuntimeEngine, OpenVinoEngine, configure_cpu_engine, cpu_engine_choice
from bsf_nnunet.planning.presets import variant_arch_kwargs

pytest.importorskip("onnxruntime")
pytest.importorskip("openvino")

ENGINES = [OpenVinoEngine, OnnxRuntimeEngine]


@pytest.fixture(autouse=True)
def _fp32(monkeypatch):
    """OpenVINO computes in bf16 where the CPU has native bf16 (BSF_CPU_BF16); these tests compare fp32 to 1e-4."""
    monkeypatch.setenv("BSF_CPU_BF16", "0")


def _net(seed=0, **kw):
    torch.manual_seed(seed)
    return BSFSwinUNETR(1, 2, **variant_arch_kwargs("toy"), **kw).eval()


def _torch_out(net, x):
    with torch.no_grad():
        return net.torch_forward(x)


SHAPE = (1, 1, 32, 32, 64)  # small: the bottleneck (1, 1, 2) still has more than one voxel (instance norm)


def _x(seed):
    return torch.randn(*SHAPE, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("engine_class", ENGINES)
def test_engine_matches_torch_legacy_zyx(tmp_path, engine_class):
    net = _net(merging="legacy", axis_order="zyx")
    x = _x(1)
    net.cpu_engine = engine = engine_class(str(tmp_path))
    with torch.no_grad():
        out = net(x)
    assert engine.exports == 1 and engine.failed is None and not net.training  # the exporter keeps eval mode
    torch.testing.assert_close(out, _torch_out(net, x), atol=1e-4, rtol=0)
    files = [f for f in os.listdir(tmp_path) if f != "openvino"]  # OpenVINO's compiled-model cache
    assert len(files) == 1 and files[0].endswith(engine.suffix), files  # no temporary left behind


@pytest.mark.parametrize("engine_class", ENGINES)
def test_fixed_xyz_new_weights_new_session_and_cache_reuse(tmp_path, engine_class):
    net, other = _net(0, merging="fixed", axis_order="xyz"), _net(1, merging="fixed", axis_order="xyz")
    x = _x(2)
    net.cpu_engine = engine = engine_class(str(tmp_path))
    with torch.inference_mode():  # as nnU-Net's predictor
        first = net(x)
        net.load_state_dict(other.state_dict())  # the next fold of an ensemble
        second = net(x)
    assert engine.exports == 2 and engine.failed is None
    assert not torch.allclose(first, second)
    torch.testing.assert_close(second, _torch_out(other, x), atol=1e-4, rtol=0)
    # a new network (a new process) with the same weights reuses the cached file
    other.cpu_engine = again = engine_class(str(tmp_path))
    with torch.no_grad():
        torch.testing.assert_close(other(x), second, atol=0, rtol=0)
    exported = [f for f in os.listdir(tmp_path) if f.endswith(engine.suffix)]
    assert again.exports == 0 and len(exported) == 2
    if engine_class is OpenVinoEngine:  # the compiled models are cached too
        assert len(os.listdir(tmp_path / "openvino" / f"f32-{cpu_signature()}")) >= 2


def test_openvino_precision_follows_the_bf16_switch(tmp_path, monkeypatch, capsys):
    """BSF_CPU_BF16 (default: native bf16) decides OpenVINO's precision, set explicitly either way; bf16 stays
    within bf16 rounding of PyTorch fp32 and gets its own compiled model."""
    monkeypatch.setattr(cpu_engine, "_printed", set())
    net, x = _net(3), _x(4)
    ref = _torch_out(net, x)
    for switch, precision in (("1", "bf16"), ("0", "f32")):
        monkeypatch.setenv("BSF_CPU_BF16", switch)
        engine = OpenVinoEngine(str(tmp_path))
        assert engine.precision() == {"bf16": "bf16", "f32": "fp32"}[precision]
        net.cpu_engine = engine
        with torch.no_grad():
            out = net(x)
        assert engine.failed is None
        assert f"OpenVINO ({engine.precision()}," in capsys.readouterr().out
        atol = 5e-2 * float(ref.abs().max()) if precision == "bf16" else 1e-4
        torch.testing.assert_close(out, ref, atol=atol, rtol=0)
        folder = next(f for f in os.listdir(tmp_path) if f.endswith(engine.suffix))
        compiled = cpu_engine.compile_openvino(str(tmp_path / folder / cpu_engine.OPENVINO_MODEL),
                                               str(tmp_path / "openvino"), bf16=switch == "1")
        got = compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()
        # asked for bf16 on a CPU without it, OpenVINO may keep f32 or emulate: only native CPUs are checked
        assert got == precision or (precision == "bf16" and not cpu_has_native_bf16()), got


_COMPILE_AND_RUN = """
import sys, numpy as np
from bsf_nnunet.network.cpu_engine import compile_openvino
request = compile_openvino(sys.argv[1], sys.argv[2], bf16=sys.argv[3] == "1").create_infer_request()
print(float(np.abs(request.infer({0: np.ones(%s, np.float32)})[0]).max()))
""" % (SHAPE,)


def test_openvino_cache_of_one_precision_is_never_loaded_for_the_other(tmp_path):
    """OpenVINO 2026.4 gives an f32 and a bf16 compilation of one file the same cache key; a new process that asked
    for bf16 loaded the f32 model and died of a segmentation fault at its first inference (AMX CPU). Each precision
    has its own cache folder; both orders, each compilation in a fresh process as in nnUNetv2_predict runs."""
    onnx = str(tmp_path / "toy.onnx")
    cpu_engine.export_onnx_file(_net(5), SHAPE, onnx)
    for switch in ("0", "1", "1", "0"):  # compile f32, then bf16 beside it, then load each from the cache
        done = subprocess.run([sys.executable, "-c", _COMPILE_AND_RUN, onnx, str(tmp_path / "openvino"), switch],
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, (switch, done.returncode, done.stderr[-2000:])
    assert sorted(os.listdir(tmp_path / "openvino")) == [f"bf16-{cpu_signature()}", f"f32-{cpu_signature()}"]


def test_engine_only_for_cpu_fp32_inference():
    net = configure_cpu_engine(_net(), "openvino")
    x = torch.zeros(SHAPE)
    assert not net._engine_applies(x)  # gradients enabled
    with torch.no_grad():
        assert net._engine_applies(x)
        assert not net._engine_applies(x.double())
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert not net._engine_applies(x)
        net.train()
        assert not net._engine_applies(x)
        assert not configure_cpu_engine(net.eval(), "torch")._engine_applies(x)


def test_choice_from_environment(monkeypatch):
    net = _net()
    monkeypatch.setenv(cpu_engine.ENGINE_ENV, "torch")
    assert configure_cpu_engine(net).cpu_engine is None
    monkeypatch.delenv(cpu_engine.ENGINE_ENV)
    assert cpu_engine_choice() == "openvino"
    assert isinstance(configure_cpu_engine(net).cpu_engine, OpenVinoEngine)
    for value, engine in (("ort", OnnxRuntimeEngine), ("ONNXRUNTIME", OnnxRuntimeEngine), ("ov", OpenVinoEngine)):
        monkeypatch.setenv(cpu_engine.ENGINE_ENV, value)
        assert isinstance(configure_cpu_engine(net).cpu_engine, engine)
    monkeypatch.setenv(cpu_engine.ENGINE_ENV, "tensorrt")
    with pytest.raises(ConfigurationError, match="BSF_CPU_ENGINE='tensorrt': use openvino or onnxruntime"):
        cpu_engine_choice()


def test_default_is_the_first_engine_installed(monkeypatch, capsys):
    monkeypatch.delenv(cpu_engine.ENGINE_ENV, raising=False)
    installed = {"openvino", "onnxruntime", "torch"}
    monkeypatch.setattr(cpu_engine, "engine_installed", lambda engine: engine in installed)
    for missing, expected in (("openvino", "onnxruntime"), ("onnxruntime", "torch")):
        installed.discard(missing)
        assert cpu_engine_choice() == expected
    monkeypatch.setenv(cpu_engine.ENGINE_ENV, "openvino")  # asked for, not installed: PyTorch, said once
    assert cpu_engine_choice() == "torch"
    assert "BSF_CPU_ENGINE=openvino but openvino is not installed" in capsys.readouterr().out


@pytest.mark.parametrize("engine_class", ENGINES)
def test_export_failure_falls_back_to_torch(tmp_path, monkeypatch, capsys, engine_class):
    def broken(network, shape, path):
        raise RuntimeError("exporter exploded")

    monkeypatch.setattr(cpu_engine, "export_onnx_file", broken)
    monkeypatch.setattr(cpu_engine, "export_openvino_model", broken)
    net = _net()
    net.cpu_engine = engine = engine_class(str(tmp_path))
    reference = torch.ones(1)
    monkeypatch.setattr(net, "torch_forward", lambda x: reference)
    with torch.no_grad():
        assert net(torch.zeros(SHAPE)) is reference
        assert net(torch.zeros(SHAPE)) is reference  # not tried again
    assert "exporter exploded" in engine.failed and not net._engine_applies(torch.zeros(SHAPE))
    message = capsys.readouterr().out
    assert message.count(f"{engine.label} failed (RuntimeError: exporter exploded)") == 1
    assert "BSF_CPU_ENGINE=torch" in message and os.listdir(tmp_path) == []


def test_trainer_uses_engine_only_for_final_validation(monkeypatch):
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    from bsf_nnunet.training.finetune import BSFTrainer

    seen = []
    monkeypatch.setattr(nnUNetTrainer, "perform_actual_validation",
                        lambda self, save_probabilities=False: seen.append(self.network.cpu_engine))
    monkeypatch.delenv(cpu_engine.ENGINE_ENV, raising=False)
    trainer = object.__new__(BSFTrainer)
    trainer.network = _net()
    trainer.perform_actual_validation()
    assert isinstance(seen[0], OpenVinoEngine) and trainer.network.cpu_engine is None


def _trace(wrapper, x):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings about Python shape checks
        return torch.jit.trace(wrapper, (x,), check_trace=False)


def _torch_export(wrapper, x):
    return torch.export.export(wrapper, (torch.zeros(SHAPE),)).module()


@pytest.mark.parametrize("exporter", [_trace, _torch_export], ids=["jit_trace", "torch_export"])
def test_export_traces_the_explicit_attention(monkeypatch, exporter):
    """Fused attention's per-window bias would become a constant the engines fold into 0.8 GB for Small at 96^3: the
    ONNX export (jit.trace) and the OpenVINO export (torch.export) take the explicit path and compute the same."""
    from bsf_nnunet.network import swin_unetr

    calls = []
    fused = swin_unetr._sdpa_window_attention_forward
    monkeypatch.setattr(swin_unetr, "_sdpa_window_attention_forward", lambda *a: calls.append(1) or fused(*a))
    net, x = _net(), _x(3)
    with torch.no_grad():
        eager = net.torch_forward(x)
        assert calls  # eager inference without gradients: fused attention
        calls.clear()
        exported = exporter(cpu_engine._TorchForward(net), x)
        assert not calls
        torch.testing.assert_close(exported(x), eager, atol=1e-5, rtol=0)


@pytest.mark.parametrize("dims, shift", [((21, 21, 35), (3, 3, 3)), ((7, 14, 7), (3, 3, 3)), ((14, 7, 21), (3, 2, 1))])
def test_shift_masks_from_region_ids_equal_monai(dims, shift):
    """The mask computed in the graph (region numbers, equal or not) is MONAI's compute_mask, window by window."""
    from monai.networks.nets import swin_unetr as monai_swin_unetr

    from bsf_nnunet.network.swin_unetr import shift_masks_computed_in_graph

    window = (7, 7, 7)
    expected = monai_swin_unetr.compute_mask(list(dims), window, shift, torch.device("cpu"))
    with shift_masks_computed_in_graph(torch.zeros(1)):
        got = monai_swin_unetr.compute_mask(list(dims), window, shift, torch.device("cpu"))
    torch.testing.assert_close(got, expected, atol=0, rtol=0)
    assert monai_swin_unetr.compute_mask(list(dims), window, shift, None).shape == expected.shape  # restored


def _folded_mask_constants(folder, windows, tokens):
    """Shapes of the constants holding a (windows, tokens, tokens) mask once OpenVINO has folded the exported model's
    constant subgraphs, as its compiler does."""
    import openvino
    from openvino.passes import ConstantFolding, Manager

    model = openvino.Core().read_model(os.path.join(folder, cpu_engine.OPENVINO_MODEL))
    passes = Manager()
    passes.register_pass(ConstantFolding())
    passes.run_passes(model)
    shapes = [tuple(op.get_output_shape(0)) for op in model.get_ops() if op.get_type_name() == "Constant"]
    return [s for s in shapes if s[-2:] == (tokens, tokens) and windows in s[:-2]]


def test_openvino_export_holds_no_folded_shift_mask(tmp_path, monkeypatch):
    """MONAI's shift masks, traced as they are, become a (windows, 343, 343) constant that OpenVINO folds element by
    element at compile time (25 s of 29 for Small at 128^3); the export computes them from small constants instead."""
    windows, tokens = 3 * 3 * 5, 7 ** 3  # the first stage: 16 x 16 x 32 tokens padded to 21 x 21 x 35
    net = BSFSwinUNETR(1, 2, **dict(variant_arch_kwargs("toy"), depths=[2, 2, 2, 2])).eval()  # shifted blocks
    cpu_engine.export_openvino_model(net, SHAPE, str(tmp_path / "ours"))
    assert _folded_mask_constants(tmp_path / "ours", windows, tokens) == []
    # without the replacement the mask is there: the check above can fail
    monkeypatch.setattr(cpu_engine, "shift_masks_computed_in_graph", lambda anchor: contextlib.nullcontext())
    cpu_engine.export_openvino_model(net, SHAPE, str(tmp_path / "monai"))
    assert _folded_mask_constants(tmp_path / "monai", windows, tokens)
