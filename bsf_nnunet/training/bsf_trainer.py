"""BSFTrainer: BrainSegFounder Swin-UNETR fine-tuning inside nnU-Net v2.

The trainer works from the plain ``nnUNetPlans`` that ``nnUNetv2_plan_and_preprocess`` writes: at construction
it turns the requested configuration into a Swin-UNETR one (patch /32 and >= 64, a batch size that fits, the
architecture block naming ``bsf_nnunet.network.swin_unetr.BSFSwinUNETR`` with the variant's kwargs). nnU-Net then
saves these plans into the results folder, so ``nnUNetv2_predict`` rebuilds the identical network through the
static ``build_network_architecture``.

Variants are subclasses that change class attributes (nnU-Net's idiom); architecture presets live in
``plans/variants.json``.
"""
from __future__ import annotations

import contextlib
import os
import pydoc
import signal
import threading
import weakref

import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager, PlansManager
from torch import nn

from ..planning.presets import get_variant
from ..planning.swin_config import NETWORK_CLASS_NAME, ConfigurationError, derive_swin_configuration
from .lr import WarmupCosineLR

PRETRAINED_CHANNELS_ENV = "BSF_PRETRAINED_CHANNELS"
STOP_AFTER_EPOCH_ENV = "BSF_STOP_AFTER_EPOCH"
UNSAFE_PICKLE_ENV = "BSF_ALLOW_UNSAFE_PICKLE"


def _unwrap(module: nn.Module) -> nn.Module:
    module = getattr(module, "module", module)  # DDP
    return getattr(module, "_orig_mod", module)  # torch.compile


def _bf16_supported(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_available() and torch.cuda.is_bf16_supported()


@contextlib.contextmanager
def _autocast_dtype(device_type: str, dtype):
    """Make ``torch.autocast(device_type)`` (as nnU-Net calls it) use ``dtype`` inside this block."""
    if dtype is None:
        yield
        return
    old = torch.get_autocast_dtype(device_type)
    torch.set_autocast_dtype(device_type, dtype)
    try:
        yield
    finally:
        torch.set_autocast_dtype(device_type, old)


class BSFTrainer(nnUNetTrainer):
    """Small variant (depths 2-2-6-2, 64.1 M parameters): the paper's best model (BF-S 64M)."""

    bsf_variant = "small"
    bsf_merging = "legacy"
    bsf_patch_cap = None  # cap per patch axis (still a multiple of 32, >= 64)
    bsf_max_batch_size = None
    bsf_extra_arch_kwargs = None  # e.g. {"use_checkpoint": True}
    bsf_warmup_fraction = 0.05  # of num_epochs
    bsf_use_pretraining = True  # False: never load pretrained weights (the scratch baseline)
    bsf_pretrain_trainer = "BSFPretrainTrainer"  # stage chaining: its fold F results initialise fold F
    bsf_freeze_encoder_epochs = 0  # keep swinViT frozen for the first N epochs
    bsf_recipe = {"initial_lr": 1e-4, "weight_decay": 1e-5, "num_epochs": 1000, "num_iterations_per_epoch": 250,
                  "num_val_iterations_per_epoch": 50}

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        for k, v in self.bsf_recipe.items():
            setattr(self, k, v)
        self.enable_deep_supervision = False
        self.bsf_amp_dtype = torch.bfloat16 if _bf16_supported(self.device) else None
        if self.bsf_amp_dtype is not None:
            self.grad_scaler = None  # bf16 needs no loss scaling
        self.bsf_pretrained_from = None
        self._adapt_configuration(configuration)

    # ------------------------------------------------------------------ configuration
    def _adapt_configuration(self, configuration: str) -> None:
        resolved = self.plans_manager._internal_resolve_configuration_inheritance(configuration)
        try:
            new_conf, notes = derive_swin_configuration(
                resolved, variant=self.bsf_variant, merging=self.bsf_merging, device_type=self.device.type,
                patch_cap=self.bsf_patch_cap, max_batch_size=self.bsf_max_batch_size,
                extra_arch_kwargs=self.bsf_extra_arch_kwargs)
        except ConfigurationError as e:
            raise ConfigurationError(f"{self.__class__.__name__}, configuration {configuration!r}: {e}") from None
        # nnU-Net keeps these plans (they are saved into the results folder by on_train_start)
        self.plans_manager.plans["configurations"][configuration] = new_conf
        self.plans_manager.get_configuration.cache_clear()
        self.configuration_manager = ConfigurationManager(new_conf)
        info = new_conf["bsf"]
        self.print_to_log_file(
            f"BrainSegFounder {self.__class__.__name__}: variant {info['variant']} "
            f"({get_variant(info['variant'])['params_m']} M parameters at 4->3 channels), merging {self.bsf_merging}, "
            f"patch {new_conf['patch_size']}, batch size {new_conf['batch_size']} "
            f"(estimated {info['estimated_memory_gb']} GiB of {info['memory_budget_gb']} GiB budget)")
        for n in notes:
            self.print_to_log_file(f"  note: {n}")

    # ------------------------------------------------------------------ network
    @staticmethod
    def build_network_architecture(plans_manager: PlansManager,
                                   configuration_manager: ConfigurationManager,
                                   num_input_channels: int,
                                   num_output_channels: int,
                                   enable_deep_supervision: bool = True) -> nn.Module:
        name = configuration_manager.network_arch_class_name
        if name != NETWORK_CLASS_NAME:
            raise ConfigurationError(
                f"These plans describe the network {name!r}, not BrainSegFounder's Swin-UNETR. BSF trainers write "
                "their configuration into the plans.json of their results folder; predict with the results folder "
                "of a BSF trainer (-tr BSFTrainer...) or re-train it."
            )
        cls = pydoc.locate(name)
        kwargs = dict(configuration_manager.network_arch_init_kwargs)
        return cls(num_input_channels, num_output_channels, deep_supervision=False, **kwargs)

    def set_deep_supervision_enabled(self, enabled: bool):
        """Swin-UNETR has a single output: nothing to switch."""

    def _get_deep_supervision_scales(self):
        return None

    def initialize(self):
        super().initialize()
        # lets our -pretrained_weights handler find the trainer that owns this network
        _unwrap(self.network).__dict__["_bsf_owner"] = weakref.ref(self)

    # ------------------------------------------------------------------ pretrained weights
    def target_channel_names(self) -> list:
        cn = self.dataset_json["channel_names"]
        return [str(cn[k]) for k in sorted(cn, key=int)]

    def load_bsf_pretrained(self, path: str, how: str = "-pretrained_weights") -> None:
        """Initialise from any supported checkpoint (ours, nnU-Net's, official MONAI SSL/fine-tuned, raw)."""
        if not self.bsf_use_pretraining:
            raise ConfigurationError(
                f"{self.__class__.__name__} trains from scratch by definition and never loads pretrained weights; "
                f"drop -pretrained_weights or use BSFTrainer.")
        from ..weights import load_checkpoint, parse_channel_list, transfer_weights

        if not self.was_initialized:
            self.initialize()
        ckpt = load_checkpoint(path, allow_unsafe_pickle=os.environ.get(UNSAFE_PICKLE_ENV, "") in ("1", "true"))
        src = os.environ.get(PRETRAINED_CHANNELS_ENV)
        src = parse_channel_list(src) if src else None
        report = transfer_weights(_unwrap(self.network), ckpt, source_channels=src,
                                  target_channels=self.target_channel_names(), verbose=False,
                                  encoder_only=self._pretrained_encoder_only())
        axis = ckpt.metadata.get("axis_order", "zyx")
        if axis != getattr(_unwrap(self.network), "axis_order", axis):
            _unwrap(self.network).set_axis_order(axis)
            self.configuration_manager.configuration["architecture"]["arch_kwargs"]["axis_order"] = axis
            self.plans_manager.plans["configurations"][self.configuration_name]["architecture"]["arch_kwargs"][
                "axis_order"] = axis
            self.print_to_log_file(f"  the checkpoint was trained on {axis} arrays: the network now transposes "
                                   "nnU-Net's (z, y, x) input to match (recorded in plans.json)")
        self.bsf_pretrained_from = os.path.abspath(path)
        self.print_to_log_file(f"Initialised from {path} ({how}):\n{report.summary()}")

    def _pretrained_encoder_only(self) -> bool:
        return False

    def _chained_checkpoint(self):
        from nnunetv2.paths import nnUNet_results

        if not nnUNet_results.is_set() or not self.bsf_pretrain_trainer:
            return None
        folder = os.path.join(str(nnUNet_results), self.plans_manager.dataset_name,
                              f"{self.bsf_pretrain_trainer}__{self.plans_manager.plans_name}__{self.configuration_name}",
                              f"fold_{self.fold}")
        return os.path.join(folder, "checkpoint_final.pth")

    def _maybe_chain_pretraining(self) -> None:
        if self.current_epoch > 0 or self.bsf_pretrained_from is not None:
            return  # resumed (--c) or -pretrained_weights given
        if not self.bsf_use_pretraining:
            self.print_to_log_file(f"{self.__class__.__name__}: random initialisation (scratch baseline).")
            return
        ckpt = self._chained_checkpoint()
        if ckpt and os.path.isfile(ckpt):
            self.load_bsf_pretrained(ckpt, how=f"stage chaining from {self.bsf_pretrain_trainer} fold {self.fold}")
        else:
            self.print_to_log_file(f"No self-supervised pretraining found ({ckpt}); training from random "
                                   "initialisation. Pretrain with -tr " + str(self.bsf_pretrain_trainer) +
                                   " or pass -pretrained_weights.")

    def on_train_start(self):
        if not self.was_initialized:
            self.initialize()
        self._maybe_chain_pretraining()
        super().on_train_start()
        self._install_preemption_handlers()

    # ------------------------------------------------------------------ pre-emption
    def _install_preemption_handlers(self) -> None:
        """SIGTERM / SIGUSR1 (cluster pre-emption): finish the current iteration, save, exit 0; --c continues."""
        self._bsf_stop_signal = None
        if threading.current_thread() is not threading.main_thread():
            return

        def handler(signum, frame):
            self._bsf_stop_signal = signal.Signals(signum).name

        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, handler)

    def _stop_now(self, reason: str, mid_epoch: bool) -> None:
        # checkpoints store current_epoch + 1 as the epoch to run next: after an epoch (counter already advanced)
        # that is the next epoch; in the middle of one it is the unfinished epoch, redone after --c
        self.current_epoch -= 1
        self.save_checkpoint(os.path.join(self.output_folder, "checkpoint_latest.pth"))
        self.current_epoch += 1
        self.print_to_log_file(f"{reason}: saved checkpoint_latest.pth and stopped. Continue with the same "
                               "nnUNetv2_train command plus --c.")
        raise SystemExit(0)

    def _check_stop(self, end_of_epoch: bool) -> None:
        sig = getattr(self, "_bsf_stop_signal", None)
        if sig:
            self._stop_now(f"Received {sig}", mid_epoch=not end_of_epoch)
        env = os.environ.get(STOP_AFTER_EPOCH_ENV)
        if end_of_epoch and env not in (None, "") and self.current_epoch - 1 >= int(env) \
                and self.current_epoch < self.num_epochs:
            self._stop_now(f"{STOP_AFTER_EPOCH_ENV}={env} reached", mid_epoch=False)

    def on_epoch_end(self):
        super().on_epoch_end()
        self._check_stop(end_of_epoch=True)

    def on_train_epoch_start(self):
        if self.bsf_freeze_encoder_epochs:
            frozen = self.current_epoch < self.bsf_freeze_encoder_epochs
            for p in _unwrap(self.network).swinViT.parameters():
                p.requires_grad_(not frozen)
            if self.current_epoch in (0, self.bsf_freeze_encoder_epochs):
                self.print_to_log_file(f"encoder (swinViT) {'frozen' if frozen else 'trainable'}")
        super().on_train_epoch_start()

    def save_checkpoint(self, filename: str) -> None:
        """nnU-Net's checkpoint, written to a temporary name and renamed (never half-written)."""
        tmp = os.path.join(os.path.dirname(filename), ".tmp_" + os.path.basename(filename))
        super().save_checkpoint(tmp)
        if os.path.isfile(tmp):
            os.replace(tmp, filename)

    # ------------------------------------------------------------------ optimisation
    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(self.network.parameters(), lr=self.initial_lr, weight_decay=self.weight_decay)
        warmup = max(1, int(round(self.bsf_warmup_fraction * self.num_epochs))) if self.num_epochs > 1 else 0
        scheduler = WarmupCosineLR(optimizer, self.initial_lr, self.num_epochs, warmup)
        return optimizer, scheduler

    def train_step(self, batch: dict) -> dict:
        self._check_stop(end_of_epoch=False)
        with _autocast_dtype(self.device.type, self.bsf_amp_dtype):
            return super().train_step(batch)

    def validation_step(self, batch: dict) -> dict:
        with _autocast_dtype(self.device.type, self.bsf_amp_dtype):
            return super().validation_step(batch)


class BSFTrainer_Tiny(BSFTrainer):
    """Depths 2-2-2-2, 62.2 M parameters."""

    bsf_variant = "tiny"


class BSFTrainer_Big(BSFTrainer):
    """Depths 2-2-18-2, 69.7 M parameters."""

    bsf_variant = "big"


class BSFTrainer_Large(BSFTrainer):
    """Feature size 96, depths 2-2-18-2, heads 4-8-16-32, ~277 M parameters."""

    bsf_variant = "large"


class BSFTrainer_scratch(BSFTrainer):
    """The Small variant trained from random initialisation: the baseline of the low-data study."""

    bsf_use_pretraining = False


class BSFTrainer_freeze50(BSFTrainer):
    """Small variant with the pretrained encoder frozen for the first 50 epochs."""

    bsf_freeze_encoder_epochs = 50


class BSFTrainer_imported(BSFTrainer):
    """Results folders written by ``bsf-nnunet import-model`` (the network is rebuilt from their plans)."""


class BSFTrainer_Toy(BSFTrainer):
    """Feature size 12, depths 1-1-1-1: for tests, demos and quick checks (minutes on a CPU)."""

    bsf_variant = "toy"
    bsf_patch_cap = 64
    bsf_pretrain_trainer = "BSFPretrainTrainer_Toy"
    bsf_warmup_fraction = 0.2
    bsf_recipe = dict(BSFTrainer.bsf_recipe, num_epochs=5, num_iterations_per_epoch=25,
                      num_val_iterations_per_epoch=5, initial_lr=1e-3)


class BSFTrainer_Toy_scratch(BSFTrainer_Toy):
    """The toy variant from random initialisation (the demo's baseline)."""

    bsf_use_pretraining = False


class BSFTrainer_ToyFast(BSFTrainer_Toy):
    """Toy variant with a shorter schedule (``bsf-nnunet demo --fast``)."""

    bsf_pretrain_trainer = "BSFPretrainTrainer_ToyFast"
    bsf_recipe = dict(BSFTrainer_Toy.bsf_recipe, num_epochs=3, num_iterations_per_epoch=15,
                      num_val_iterations_per_epoch=2)


class BSFTrainer_ToyFast_scratch(BSFTrainer_ToyFast):
    bsf_use_pretraining = False


def _install_pretrained_weights_handler() -> None:
    """Make nnU-Net's ``-pretrained_weights`` use our loader for BSF networks (other trainers: nnU-Net's own)."""
    try:
        import nnunetv2.run.run_training as rt
    except Exception:  # pragma: no cover - nnU-Net layout changed
        return
    original = getattr(rt.load_pretrained_weights, "_bsf_original", rt.load_pretrained_weights)

    def load_pretrained_weights(network, fname, verbose=False):
        ref = _unwrap(network).__dict__.get("_bsf_owner")
        trainer = ref() if ref is not None else None
        if trainer is None:
            return original(network, fname, verbose)
        trainer.load_bsf_pretrained(fname)

    load_pretrained_weights._bsf_original = original
    rt.load_pretrained_weights = load_pretrained_weights


_install_pretrained_weights_handler()
