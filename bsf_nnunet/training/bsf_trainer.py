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
import pydoc

import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager, PlansManager
from torch import nn

from ..planning.presets import get_variant
from ..planning.swin_config import NETWORK_CLASS_NAME, ConfigurationError, derive_swin_configuration
from .lr import WarmupCosineLR


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

    # ------------------------------------------------------------------ optimisation
    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(self.network.parameters(), lr=self.initial_lr, weight_decay=self.weight_decay)
        warmup = max(1, int(round(self.bsf_warmup_fraction * self.num_epochs))) if self.num_epochs > 1 else 0
        scheduler = WarmupCosineLR(optimizer, self.initial_lr, self.num_epochs, warmup)
        return optimizer, scheduler

    def train_step(self, batch: dict) -> dict:
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


class BSFTrainer_Toy(BSFTrainer):
    """Feature size 12, depths 1-1-1-1: for tests, demos and quick checks (minutes on a CPU)."""

    bsf_variant = "toy"
    bsf_patch_cap = 64
    bsf_warmup_fraction = 0.2
    bsf_recipe = dict(BSFTrainer.bsf_recipe, num_epochs=5, num_iterations_per_epoch=25,
                      num_val_iterations_per_epoch=5, initial_lr=1e-3)
