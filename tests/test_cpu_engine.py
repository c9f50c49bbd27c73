"""ONNX Runtime as the CPU engine of BSFSwinUNETR inference (bsf_nnunet.network.cpu_engine)."""
import os

import pytest
import torch

from bsf_nnunet.network import BSFSwinUNETR, cpu_engine
from bsf_nnunet.network.cpu_engine import OnnxRuntimeEngine, configure_cpu_engine, cpu_engine_choice
from bsf_nnunet.planning.presets import variant_arch_kwargs

pytest.importorskip("onnxruntime")


def _net(seed=0, **kw):
    torch.manual_seed(seed)
    return BSFSwinUNETR(1, 2, **variant_arch_kwargs("toy"), **kw).eval()


def _torch_out(net, x):
    with torch.no_grad():
        return net.torch_forward(x)


SHAPE = (1, 1, 32, 32, 64)  # small: the bottleneck (1, 1, 2) still has more than one voxel (instance norm)


def _x(seed):
    return torch.randn(*SHAPE, generator=torch.Generator().manual_seed(seed))


def test_engine_matches_torch_legacy_zyx(tmp_path):
    net = _net(merging="legacy", axis_order="zyx")
    x = _x(1)
    net.cpu_engine = engine = OnnxRuntimeEngine(str(tmp_path))
    with torch.no_grad():
        out = net(x)
    assert engine.exports == 1 and engine.failed is None and not net.training  # the exporter keeps eval mode
    torch.testing.assert_close(out, _torch_out(net, x), atol=1e-4, rtol=0)
    files = os.listdir(tmp_path)
    assert len(files) == 1 and files[0].endswith(".onnx"), files  # no temporary left behind


def test_fixed_xyz_new_weights_new_session_and_cache_reuse(tmp_path):
    net, other = _net(0, merging="fixed", axis_order="xyz"), _net(1, merging="fixed", axis_order="xyz")
    x = _x(2)
    net.cpu_engine = engine = OnnxRuntimeEngine(str(tmp_path))
    with torch.inference_mode():  # as nnU-Net's predictor
        first = net(x)
        net.load_state_dict(other.state_dict())  # the next fold of an ensemble
        second = net(x)
    assert engine.exports == 2 and engine.failed is None
    assert not torch.allclose(first, second)
    torch.testing.assert_close(second, _torch_out(other, x), atol=1e-4, rtol=0)
    # a new network (a new process) with the same weights reuses the cached file
    other.cpu_engine = again = OnnxRuntimeEngine(str(tmp_path))
    with torch.no_grad():
        torch.testing.assert_close(other(x), second, atol=0, rtol=0)
    assert again.exports == 0 and len(os.listdir(tmp_path)) == 2


def test_engine_only_for_cpu_fp32_inference():
    net = configure_cpu_engine(_net(), "onnxruntime")
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
    assert cpu_engine_choice() == "onnxruntime"
    assert isinstance(configure_cpu_engine(net).cpu_engine, OnnxRuntimeEngine)
    monkeypatch.setenv(cpu_engine.ENGINE_ENV, "tensorrt")
    with pytest.raises(ValueError, match="BSF_CPU_ENGINE"):
        cpu_engine_choice()


def test_export_failure_falls_back_to_torch(tmp_path, monkeypatch, capsys):
    def broken(network, shape, path):
        raise RuntimeError("exporter exploded")

    monkeypatch.setattr(cpu_engine, "export_onnx_file", broken)
    net = _net()
    net.cpu_engine = engine = OnnxRuntimeEngine(str(tmp_path))
    reference = torch.ones(1)
    monkeypatch.setattr(net, "torch_forward", lambda x: reference)
    with torch.no_grad():
        assert net(torch.zeros(SHAPE)) is reference
        assert net(torch.zeros(SHAPE)) is reference  # not tried again
    assert "exporter exploded" in engine.failed and not net._engine_applies(torch.zeros(SHAPE))
    message = capsys.readouterr().out
    assert message.count("ONNX Runtime failed (RuntimeError: exporter exploded)") == 1
    assert "BSF_CPU_ENGINE=torch" in message and os.listdir(tmp_path) == []


def test_trainer_uses_engine_only_for_final_validation(monkeypatch):
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    from bsf_nnunet.training.bsf_trainer import BSFTrainer

    seen = []
    monkeypatch.setattr(nnUNetTrainer, "perform_actual_validation",
                        lambda self, save_probabilities=False: seen.append(self.network.cpu_engine))
    monkeypatch.delenv(cpu_engine.ENGINE_ENV, raising=False)
    trainer = object.__new__(BSFTrainer)
    trainer.network = _net()
    trainer.perform_actual_validation()
    assert isinstance(seen[0], OnnxRuntimeEngine) and trainer.network.cpu_engine is None
