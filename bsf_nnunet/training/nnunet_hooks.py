"""Every change bsf-nnunet makes to nnU-Net's own modules, in one place, applied when ``bsf_nnunet.training`` is
imported (by nnU-Net's trainer discovery, ``nnUNetv2_predict`` through the start-up file, or any import):

* ``nnunetv2.run.run_training.load_pretrained_weights``: ``-pretrained_weights`` of a BSF trainer goes through the
  trainer's own loader (channel mapping, published ``bsf:`` / ``hf://`` names); other trainers keep nnU-Net's.
* ``nnUNetPredictor._manage_input_and_output_lists``: for a BSF model, the cases of ``-i`` are checked before
  preprocessing (``predict_checks.check_prediction_cases``: incomplete cases refused, far-off geometry warned
  about) and the CPU allocator setting is applied.
* ``nnUNetPredictor.predict_sliding_window_return_logits``: a BSF model whose plans say
  ``bsf.inference_blending = "constant"`` (``import-model``'s default, the original's inference) is predicted with
  constant window weights; nnUNetv2_predict has no option for it (it always asks for the Gaussian). Hooked there,
  not at initialisation: nnU-Net imports the trainers, and so these hooks, in the middle of
  ``initialize_from_trained_model_folder``.

Each hook checks that what it replaces is still there and raises :class:`~bsf_nnunet.errors.ConfigurationError`
naming the installed nnU-Net version when it is not (the tested versions are in the README).
"""
from __future__ import annotations

from ..allocator import tune_cpu_allocator
from ..errors import ConfigurationError
from ..planning.swin_config import NETWORK_CLASS_NAME
from ..versions import installed_version
from .base import _unwrap
from .predict_checks import check_prediction_cases


def _require(module, name: str) -> None:
    if not callable(getattr(module, name, None)):
        raise ConfigurationError(
            f"nnU-Net {installed_version('nnunetv2', 'unknown')}: {module.__name__}.{name} is gone, so bsf-nnunet "
            "cannot hook into it.",
            hint="install a tested nnU-Net version (pip install 'nnunetv2>=2.8,<2.9') or report it")


def install_pretrained_weights_handler() -> None:
    """Make nnU-Net's ``-pretrained_weights`` use our loader for BSF networks (other trainers: nnU-Net's own)."""
    import nnunetv2.run.run_training as rt

    _require(rt, "load_pretrained_weights")
    original = getattr(rt.load_pretrained_weights, "_bsf_original", rt.load_pretrained_weights)

    def load_pretrained_weights(network, fname, verbose=False):
        # nnU-Net passes the -pretrained_weights string through unchanged: bsf:NAME / hf:// names arrive as they are
        ref = _unwrap(network).__dict__.get("_bsf_owner")
        trainer = ref() if ref is not None else None
        if trainer is None:
            from ..weights.hub import is_hub_spec, resolve_checkpoint

            return original(network, resolve_checkpoint(fname).path if is_hub_spec(fname) else fname, verbose)
        trainer.load_bsf_pretrained(fname)

    load_pretrained_weights._bsf_original = original
    rt.load_pretrained_weights = load_pretrained_weights


def install_prediction_input_checks() -> None:
    """Check the cases of ``-i`` before preprocessing for BSF networks (other networks: untouched)."""
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    # nnU-Net offers no per-case hook before preprocessing: the predictor builds the network through the trainer's
    # static build_network_architecture, which never sees the input files. _manage_input_and_output_lists is the
    # one place, used by predict_from_files and predict_from_files_sequential alike, where the per-case file lists
    # exist in the main process.
    _require(nnUNetPredictor, "_manage_input_and_output_lists")
    original = getattr(nnUNetPredictor._manage_input_and_output_lists, "_bsf_original",
                       nnUNetPredictor._manage_input_and_output_lists)

    def _manage_input_and_output_lists(self, *args, **kwargs):
        result = original(self, *args, **kwargs)
        if self.configuration_manager.network_arch_class_name == NETWORK_CLASS_NAME:
            if self.device.type == "cpu":
                print(tune_cpu_allocator(), flush=True)
            check_prediction_cases(result[0], self.plans_manager.plans, self.configuration_manager.configuration,
                                   self.dataset_json)
        return result

    _manage_input_and_output_lists._bsf_original = original
    nnUNetPredictor._manage_input_and_output_lists = _manage_input_and_output_lists


def install_blending_from_plans() -> None:
    """Blend windows as a BSF model's plans ask (``bsf.inference_blending``); other models: nnU-Net's choice."""
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    _require(nnUNetPredictor, "predict_sliding_window_return_logits")
    original = getattr(nnUNetPredictor.predict_sliding_window_return_logits, "_bsf_original",
                       nnUNetPredictor.predict_sliding_window_return_logits)

    def predict_sliding_window_return_logits(self, input_image):
        bsf = self.configuration_manager.configuration.get("bsf") or {}
        if bsf.get("inference_blending") == "constant" and self.use_gaussian:
            self.use_gaussian = False
            print("BSF: overlapping windows blended with constant weights, as the original inference "
                  "(plans bsf.inference_blending)", flush=True)
        return original(self, input_image)

    predict_sliding_window_return_logits._bsf_original = original
    nnUNetPredictor.predict_sliding_window_return_logits = predict_sliding_window_return_logits


def install() -> None:
    """Apply every hook (idempotent)."""
    install_pretrained_weights_handler()
    install_prediction_input_checks()
    install_blending_from_plans()
