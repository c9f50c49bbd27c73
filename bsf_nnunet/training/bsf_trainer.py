"""BSFTrainer: BrainSegFounder Swin-UNETR fine-tuning inside nnU-Net v2.

The trainer works from the plain ``nnUNetPlans`` that ``nnUNetv2_plan_and_preprocess`` writes: at construction
it turns the requested configuration into a Swin-UNETR one (patch /32 and >= 64, a batch size that fits, the
architecture block naming ``bsf_nnunet.network.swin_unetr.BSFSwinUNETR`` with the variant's kwargs). nnU-Net then
saves these plans into the results folder, so ``nnUNetv2_predict`` rebuilds the identical network through the
static ``build_network_architecture``.

Variants are subclasses that change class attributes (nnU-Net's idiom, ``training/variants/``); architecture presets
live in ``plans/variants.json``.

Why this module is longer than 400 lines: its methods are overrides of ``nnUNetTrainer`` that nnU-Net calls by name
and that share the trainer's state (network, plans, fold, data loaders), so they stay on the one class. Everything
that does not need the trainer lives beside it: precision (``precision.py``), pre-emption (``preemption.py``),
guards (``guards.py``), data streams (``data.py``), hand-over (``handover.py``), nnU-Net patches
(``nnunet_hooks.py``), architecture restore and weight transfer (``bsf_nnunet/weights``).
"""
from __future__ import annotations

import contextlib
import os
import weakref

import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager, PlansManager
from torch import nn

from .. import settings
from ..allocator import release_free_cpu_memory, tune_cpu_allocator
from ..errors import BSFError, ConfigurationError
from ..io import DiskFullError, atomic_path, remove_stale_temporaries
from ..network.cpu_engine import configure_cpu_engine
from ..planning.presets import get_variant, variant_trainers
from ..planning.swin_config import NETWORK_CLASS_NAME, derive_swin_configuration
from ..weights.restore import SIZE_KEYS, arch_conflicts, build_network
from .lr import WarmupCosineLR
from .precision import CPU_BF16_ENV, autocast_dtype, bf16_supported, cpu_has_native_bf16, float_output
from .predict_checks import record_training_orientations
from .preemption import (  # noqa: F401 (STOP_AFTER_EPOCH_ENV)
    STOP_AFTER_EPOCH_ENV,
    PreemptionMixin,
    StopRequested,
    children_leave_stops_to_the_trainer,
)

PRETRAINED_CHANNELS_ENV = "BSF_PRETRAINED_CHANNELS"
UNSAFE_PICKLE_ENV = "BSF_ALLOW_UNSAFE_PICKLE"
# what nnUNetv2_train --c may continue from, newest first (checkpoint_final.pth ends a training)
RESUMABLE_CHECKPOINTS = ("checkpoint_latest.pth", "checkpoint_best.pth")


class TrainingHealthError(BSFError, RuntimeError):
    """Training stopped because the loss or the gradients stopped being finite, or memory ran out."""


def out_of_memory_message(trainer_name: str, variant: str, patch_size, batch_size: int, device_type: str) -> str:
    """What to reduce when a training step runs out of memory (one paragraph)."""
    return (f"{trainer_name} ran out of {'GPU' if device_type == 'cuda' else 'host'} memory in a training step "
            f"(variant {variant}, patch {list(patch_size)}, batch size {batch_size}). Reduce, in this order: the "
            "batch size (set BSF_MEMORY_GB to the memory you really have, e.g. BSF_MEMORY_GB=20, and the trainer "
            "picks a smaller batch), gradient checkpointing (a trainer subclass with bsf_extra_arch_kwargs = "
            "{'use_checkpoint': True}), the patch size (bsf-nnunet plan -d ID --patch 96 96 96), or the variant "
            "(BSFTrainer_Tiny). Nothing was saved after the last checkpoint; continue with --c.")


def _unwrap(module: nn.Module) -> nn.Module:
    module = getattr(module, "module", module)  # DDP
    return getattr(module, "_orig_mod", module)  # torch.compile


def _unsafe_pickle_allowed() -> bool:
    return settings.value(UNSAFE_PICKLE_ENV)


def saved_arch_kwargs(checkpoint: dict, configuration: str) -> dict:
    """The architecture arguments a trainer checkpoint was trained with: ``bsf_metadata['arch_kwargs']`` (our
    pretraining checkpoints), else the configuration of the plans nnU-Net saved in ``init_args``; {} if neither."""
    meta = checkpoint.get("bsf_metadata") or {}
    if isinstance(meta.get("arch_kwargs"), dict):
        return dict(meta["arch_kwargs"])
    plans = (checkpoint.get("init_args") or {}).get("plans") or {}
    conf = (plans.get("configurations") or {}).get(configuration) or {}
    return dict((conf.get("architecture") or {}).get("arch_kwargs") or {})


class BSFTrainer(PreemptionMixin, nnUNetTrainer):
    """Small variant (depths 2-2-6-2, 64.1 M parameters): the paper's best model (BF-S 64M)."""

    bsf_variant = "small"
    bsf_merging = "legacy"
    bsf_patch_cap = None  # cap per patch axis (still a multiple of 32, >= 64)
    bsf_max_batch_size = None
    bsf_extra_arch_kwargs = None  # e.g. {"use_checkpoint": True}
    bsf_warmup_fraction = 0.05  # of num_epochs
    bsf_use_pretraining = True  # False: never load pretrained weights (the scratch baseline)
    # stage chaining: this trainer's fold F results initialise fold F. Subclasses that set bsf_variant get their
    # variant's pretraining trainer from the registry (plans/variants.json) unless they name one themselves.
    bsf_pretrain_trainer = "BSFPretrainTrainer"
    bsf_freeze_encoder_epochs = 0  # keep swinViT frozen for the first N epochs
    # what -pretrained_weights and stage chaining load: "by-name" (every tensor that fits, input filters matched by
    # channel name) or "official" (the Swin layers 1-4 only, as the official scripts' strict=False loading)
    bsf_handover = "by-name"
    bsf_final_validation = True  # False: a training run skips nnU-Net's final validation (--val still runs it)
    # SynthSeg-style intensity randomization of the training patches (domain_randomization.py); None: decided by
    # BSF_DOMAIN_RANDOMIZATION (off unless set to 1)
    bsf_domain_randomization = None
    bsf_seed = 12345  # each epoch reseeds python/numpy/torch from (seed, fold, epoch): --c repeats the same stream
    bsf_recipe = {"initial_lr": 1e-4, "weight_decay": 1e-5, "num_epochs": 1000, "num_iterations_per_epoch": 250,
                  "num_val_iterations_per_epoch": 50, "save_every": 5}

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "bsf_variant" in cls.__dict__ and "bsf_pretrain_trainer" not in cls.__dict__:
            pretrainer = variant_trainers()[cls.bsf_variant][1]
            if pretrainer != cls.__name__:
                cls.bsf_pretrain_trainer = pretrainer

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        for k, v in self.bsf_recipe.items():
            setattr(self, k, v)
        self.enable_deep_supervision = False
        self.bsf_amp_dtype = torch.bfloat16 if bf16_supported(self.device) else None
        if self.bsf_amp_dtype is not None:
            self.grad_scaler = None  # bf16 needs no loss scaling
        self.bsf_pretrained_from = None
        self._adapt_configuration(configuration)
        if self.device.type == "cpu":
            self.print_to_log_file(f"  {tune_cpu_allocator()}")

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
        if self.device.type == "cpu":
            why = (f"{CPU_BF16_ENV} is set" if settings.is_set(CPU_BF16_ENV)
                   else "this CPU has native bf16" if cpu_has_native_bf16() else "this CPU has no native bf16")
            self.print_to_log_file(
                f"  precision: bf16 autocast ({why}; {CPU_BF16_ENV}=0 trains in fp32)"
                if self.bsf_amp_dtype is not None else
                f"  precision: fp32 ({why}; {CPU_BF16_ENV}=1 turns on bf16 autocast, fast only on CPUs with "
                "AVX512-BF16/AMX)")

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
        # nnUNetv2_predict on CPU: the CPU engine the user chose (BSF_CPU_ENGINE)
        return build_network(configuration_manager.network_arch_init_kwargs, num_input_channels, num_output_channels)

    def set_deep_supervision_enabled(self, enabled: bool):
        """Swin-UNETR has a single output: nothing to switch."""

    def _get_deep_supervision_scales(self):
        return None

    def initialize(self):
        if self.bsf_seed is not None and not self.was_initialized:
            self._seed_epoch(-1)  # reproducible initial weights (per fold, so that the folds of an ensemble differ)
        super().initialize()
        from .data import checked_dataset_class

        self.dataset_class = checked_dataset_class(self.dataset_class)  # names a truncated/corrupt case
        # lets our -pretrained_weights handler find the trainer that owns this network
        _unwrap(self.network).__dict__["_bsf_owner"] = weakref.ref(self)
        # weights change every epoch: the per-epoch validation runs PyTorch (perform_actual_validation may use ORT)
        configure_cpu_engine(_unwrap(self.network), "torch")

    def perform_actual_validation(self, save_probabilities: bool = False):
        """nnU-Net's final validation with the final weights, through the CPU engine that nnUNetv2_predict uses.
        Trainers with ``bsf_final_validation = False`` skip it right after training; ``--val`` always runs it."""
        if not self.bsf_final_validation and self.__dict__.get("_bsf_trained_in_this_process"):
            self.print_to_log_file(f"{self.__class__.__name__} skips the final validation after training (its "
                                   "profile has no time for it); run nnUNetv2_train with --val to compute it.")
            return
        release_free_cpu_memory()  # the training steps' freed blocks (kept for reuse on CPU) are not needed now
        configure_cpu_engine(_unwrap(self.network))
        try:
            # a stop signal ends it at once (checkpoint_final.pth is complete; --val validates again)
            self._run_final_validation(lambda: super(BSFTrainer, self).perform_actual_validation(save_probabilities))
        finally:
            configure_cpu_engine(_unwrap(self.network), "torch")

    # ------------------------------------------------------------------ pretrained weights
    def target_channel_names(self) -> list:
        cn = self.dataset_json["channel_names"]
        return [str(cn[k]) for k in sorted(cn, key=int)]

    def load_bsf_pretrained(self, path: str, how: str = "-pretrained_weights") -> None:
        """Initialise from any supported checkpoint (ours, nnU-Net's, official MONAI SSL/fine-tuned, raw), given as
        a path or as a published / Hugging Face name (``bsf:NAME``, ``hf://OWNER/REPO/FILE``; downloaded once)."""
        if not self.bsf_use_pretraining:
            raise ConfigurationError(
                f"{self.__class__.__name__} trains from scratch by definition and never loads pretrained weights; "
                f"drop -pretrained_weights or use BSFTrainer.")
        from ..weights import transfer_weights
        from ..weights.hub import resolve_checkpoint

        if not self.was_initialized:
            self.initialize()
        resolved = resolve_checkpoint(path, allow_unsafe_pickle=_unsafe_pickle_allowed())
        ckpt = resolved.load(allow_unsafe_pickle=_unsafe_pickle_allowed())
        src = self._named_source_channels(ckpt.metadata.get("channel_names"), resolved.entry)
        report = transfer_weights(_unwrap(self.network), ckpt, source_channels=src,
                                  target_channels=self.target_channel_names(), verbose=False,
                                  encoder_only=self._pretrained_encoder_only(), scope=self._handover_scope())
        axis = ckpt.metadata.get("axis_order", "zyx")
        if axis != getattr(_unwrap(self.network), "axis_order", axis):
            self._set_axis_order(axis, "the checkpoint was trained on " + axis + " arrays")
        self.bsf_pretrained_from = resolved.source
        table = (f"; channels, merging and axis order of {resolved.entry.spec} from the published-weights table"
                 if resolved.entry is not None else "")
        self.print_to_log_file(f"Initialised from {resolved.describe()} ({how}{table}):\n{report.summary()}")

    def _named_source_channels(self, recorded, entry=None):
        """``BSF_PRETRAINED_CHANNELS`` names the channels of checkpoints that record none (official files given as
        a path); a checkpoint that records its channels (ours, nnU-Net's) or a published file (``entry``, whose
        channels the table gives) keeps them, so the variable can stay exported through a whole stage 1 -> stage
        2 -> fine-tuning chain."""
        from ..weights import parse_channel_list

        given = settings.value(PRETRAINED_CHANNELS_ENV)
        given = parse_channel_list(given) if given else None
        if given is not None and recorded:
            if [str(c) for c in recorded] != given:
                who = f"the published-weights table names the channels of {entry.spec}" if entry is not None else \
                    "the checkpoint records its channels"
                self.print_to_log_file(f"  {PRETRAINED_CHANNELS_ENV}={','.join(given)} not used: {who} "
                                       f"({', '.join(map(str, recorded))})")
            return None
        return given

    def _set_axis_order(self, axis: str, why: str) -> None:
        """Switch the network's axis order and record it in the plans (saved to the results' plans.json, which
        nnUNetv2_predict rebuilds the network from)."""
        _unwrap(self.network).set_axis_order(axis)
        self.configuration_manager.configuration["architecture"]["arch_kwargs"]["axis_order"] = axis
        self.plans_manager.plans["configurations"][self.configuration_name]["architecture"]["arch_kwargs"][
            "axis_order"] = axis
        self.print_to_log_file(f"  {why}: the network sees {axis} arrays (nnU-Net's (z, y, x) input transposed "
                               "to match; recorded in plans.json)")

    def _restore_architecture(self, saved: dict, where: str) -> None:
        """Make the network the one a checkpoint was trained with before its weights are loaded (--c, --val):
        nnU-Net rebuilds it from the preprocessed plans, which know nothing of an axis order taken from weights."""
        current = self.configuration_manager.network_arch_init_kwargs
        conflicts = arch_conflicts(saved, current, ("merging", *SIZE_KEYS))
        if conflicts:
            raise ConfigurationError(
                f"{where} was trained with {', '.join(conflicts)}, which {self.__class__.__name__} plans: continue "
                "or validate it with the trainer (variant) that wrote it.")
        axis = saved.get("axis_order", "zyx")
        if axis != getattr(_unwrap(self.network), "axis_order", axis):
            self._set_axis_order(axis, f"{os.path.basename(where)} was trained on {axis} arrays")

    def load_checkpoint(self, filename_or_checkpoint) -> None:
        """nnU-Net's loading for --c, --val and --val_best, read without unpickling code, into the architecture
        (axis order) that the checkpoint was trained with. A truncated or corrupt file: see _read_checkpoint."""
        checkpoint, where = filename_or_checkpoint, "the checkpoint"
        if isinstance(checkpoint, str):
            checkpoint, where = self._read_checkpoint(checkpoint)
            if checkpoint is None:
                return  # --c, but no checkpoint loads: training starts from scratch (logged)
        if not self.was_initialized:
            self.initialize()
        self._restore_architecture(saved_arch_kwargs(checkpoint, self.configuration_name), where)
        self._apply_checkpoint(checkpoint)

    def _read_checkpoint(self, path: str):
        """(checkpoint, the file it came from). When nnUNetv2_train --c continues a training (nothing trained yet in
        this process) from checkpoint_latest.pth or checkpoint_best.pth, a truncated or corrupt file is renamed to
        <name>.corrupt (kept, never picked again) and the next of latest -> best in the fold folder is read; when
        none loads: (None, None) and training starts from scratch, saying so in the log. checkpoint_final.pth,
        --val and --val_best never fall back (validating another checkpoint than the one asked for would be
        silently wrong): a corrupt file there is an error that names it."""
        from ..weights import CheckpointError, read_checkpoint_file
        from ..weights.loader import CorruptCheckpointError

        name, folder = os.path.basename(path), os.path.dirname(path)
        if not (getattr(self.logger, "resume", False) and self.current_epoch == 0 and name in RESUMABLE_CHECKPOINTS):
            try:
                return read_checkpoint_file(path, _unsafe_pickle_allowed()), path
            except CorruptCheckpointError as e:
                raise CorruptCheckpointError(
                    f"{path} is truncated or corrupt ({e.detail}). It is not replaced by another checkpoint here: "
                    f"move it away (e.g. to {name}.corrupt) and continue the training with nnUNetv2_train ... --c, "
                    "which resumes from checkpoint_latest.pth / checkpoint_best.pth, or train the fold again.",
                    e.detail) from None
        for candidate in RESUMABLE_CHECKPOINTS[RESUMABLE_CHECKPOINTS.index(name):]:
            file = os.path.join(folder, candidate)
            try:
                checkpoint = read_checkpoint_file(file, _unsafe_pickle_allowed())
            except CorruptCheckpointError as e:
                self._set_aside_corrupt(file, e.detail)
                continue
            except CheckpointError:
                if os.path.exists(file):
                    raise
                continue  # not there (or set aside by another DDP rank)
            if candidate != name:
                self.print_to_log_file(f"Continuing from {candidate} (epoch {checkpoint.get('current_epoch')}).")
            return checkpoint, file
        self.print_to_log_file(f"No checkpoint in {folder} loads ({', '.join(RESUMABLE_CHECKPOINTS)} are missing or "
                               "corrupt): this training starts from scratch (epoch 0).")
        return None, None

    def _set_aside_corrupt(self, path: str, detail: str) -> None:
        """Rename a corrupt checkpoint to <name>.corrupt (or .corrupt1, ...: nothing is overwritten) and say so."""
        target, n = path + ".corrupt", 1
        while os.path.lexists(target):
            target, n = f"{path}.corrupt{n}", n + 1
        if self.local_rank == 0:
            with contextlib.suppress(FileNotFoundError):
                os.rename(path, target)
        self.print_to_log_file(f"{os.path.basename(path)} in {os.path.dirname(path)} is truncated or corrupt "
                               f"({detail}): renamed to {os.path.basename(target)} (kept, not used again).")

    def _apply_checkpoint(self, checkpoint: dict) -> None:
        """What nnU-Net's load_checkpoint does with a loaded checkpoint (nnU-Net 2.8 itself only accepts a path)."""
        from ..ssl.model import strip_prefix

        # weights saved from a DDP-wrapped network carry module.; the unwrapped network has none
        _unwrap(self.network).load_state_dict(strip_prefix(checkpoint["network_weights"], "module."))
        self.my_init_kwargs = checkpoint["init_args"]
        self.current_epoch = checkpoint["current_epoch"]
        self._take_partial_epoch(checkpoint["logging"])  # a stop in the middle of an epoch: its finished steps
        self.logger.load_checkpoint(checkpoint["logging"])
        self._best_ema = checkpoint["_best_ema"]
        self.inference_allowed_mirroring_axes = checkpoint.get("inference_allowed_mirroring_axes",
                                                               self.inference_allowed_mirroring_axes)
        self.optimizer.load_state_dict(checkpoint["optimizer_state"])
        if self.grad_scaler is not None and checkpoint.get("grad_scaler_state") is not None:
            self.grad_scaler.load_state_dict(checkpoint["grad_scaler_state"])

    def _pretrained_encoder_only(self) -> bool:
        return False

    def _handover_scope(self) -> str:
        if self.bsf_handover not in ("by-name", "official"):
            raise ConfigurationError(f"{self.__class__.__name__}.bsf_handover must be 'by-name' or 'official', got "
                                     f"{self.bsf_handover!r}")
        return "official" if self.bsf_handover == "official" else "all"

    def _chained_checkpoint(self):
        from nnunetv2.paths import nnUNet_results
        from nnunetv2.utilities.file_path_utilities import get_output_folder

        if not nnUNet_results.is_set() or not self.bsf_pretrain_trainer:
            return None
        from .handover import finished_checkpoint, handover_checkpoint

        folder = get_output_folder(self.plans_manager.dataset_name, self.bsf_pretrain_trainer,
                                   self.plans_manager.plans_name, self.configuration_name, self.fold)
        finished = finished_checkpoint(folder)
        return handover_checkpoint(folder) if os.path.isfile(finished) else finished

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
        from .guards import before_training

        self._install_preemption_handlers()  # before the augmentation workers fork (they inherit it)
        before_training(self)  # one run per fold (a lock), finite raw images
        if not self.was_initialized:
            self.initialize()
        self._maybe_chain_pretraining()
        record_training_orientations(self)  # into plans.json, for nnUNetv2_predict's orientation check
        super().on_train_start()

    def run_training(self):
        """nnU-Net's training loop; a stop signal before the first step of this run finished ends it at once."""
        try:
            super().run_training()
        except StopRequested as stop:
            self._stopped_while_starting(stop)

    # ------------------------------------------------------------------ pre-emption (preemption.py)
    def on_epoch_end(self):
        super().on_epoch_end()
        self._check_stop(end_of_epoch=True)

    def on_train_end(self):
        super().on_train_end()
        self._bsf_trained_in_this_process = True
        if self.local_rank == 0:
            remove_stale_temporaries(self.output_folder, "checkpoint_")

    def _seed_epoch(self, epoch=None) -> None:
        """Seed every RNG of this process from (seed, fold, epoch). With nnUNet_n_proc_DA=0 (augmentation in this
        process) on CPU an interrupted and resumed run then computes exactly what an uninterrupted one does."""
        import random

        import numpy as np

        fold = self.fold if isinstance(self.fold, int) else 99
        epoch = self.current_epoch if epoch is None else epoch
        seed = (int(self.bsf_seed) * 1_000_003 + fold * 10_007 + int(epoch) + 1) % (2 ** 31)
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)

    def get_dataloaders(self):
        """nnU-Net's training and validation pipelines (same datasets, transforms, batch size and worker count) with
        a seeded batch stream: batch n of the run draws its cases and augmentation from (seed, fold, rank, n), and
        the workers hand batches back in order (training/data.py). A run continued with --c at epoch e starts the
        stream at e's first batch, so every epoch sees the same cases and patches as an uninterrupted run, with
        nnUNet_n_proc_DA workers. Without workers (nnUNet_n_proc_DA=0) and with ``bsf_seed = None``: nnU-Net's
        own pipeline (in-process augmentation is already deterministic given the per-epoch seeds)."""
        from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class
        from nnunetv2.utilities.default_n_proc_DA import get_allowed_n_proc_DA


        n_proc = get_allowed_n_proc_DA()
        if self.bsf_seed is None or n_proc == 0:
            with children_leave_stops_to_the_trainer():  # nnU-Net's workers start in there
                return super().get_dataloaders()
        if self.dataset_class is None:
            self.dataset_class = infer_dataset_class(self.preprocessed_dataset_folder)
        patch = self.configuration_manager.patch_size
        scales = self._get_deep_supervision_scales()
        rotation, dummy_2d, initial_patch, mirror_axes = \
            self.configure_rotation_dummyDA_mirroring_and_inital_patch_size()
        lm = self.label_manager
        labels = dict(is_cascaded=self.is_cascaded, foreground_labels=lm.foreground_labels,
                      regions=lm.foreground_regions if lm.has_regions else None, ignore_label=lm.ignore_label)
        tr_transforms = self.get_training_transforms(patch, rotation, scales, mirror_axes, dummy_2d,
                                                     use_mask_for_norm=self.configuration_manager.use_mask_for_norm,
                                                     **labels)
        val_transforms = self.get_validation_transforms(scales, **labels)
        fold = self.fold if isinstance(self.fold, int) else 99
        rank = torch.distributed.get_rank() if self.is_ddp else 0
        ds_tr, ds_val = self.get_tr_and_val_datasets()
        plan = ((ds_tr, initial_patch, tr_transforms, self.num_iterations_per_epoch, n_proc),  # as nnU-Net
                (ds_val, patch, val_transforms, self.num_val_iterations_per_epoch, max(1, n_proc // 2)))
        with children_leave_stops_to_the_trainer():  # the workers fork when their first batch is asked for
            return self._start_streams(plan, fold, rank, patch, lm)

    def _start_streams(self, plan, fold, rank, patch, lm):
        from .data import SeededDataLoader, start_augmenter

        streams = []
        for stream, (ds, first_patch, transforms, per_epoch, procs) in enumerate(plan):
            loader = SeededDataLoader(ds, self.batch_size, first_patch, patch, lm,
                                      oversample_foreground_percent=self.oversample_foreground_percent,
                                      transforms=transforms, probabilistic_oversampling=self.probabilistic_oversampling,
                                      seed=(self.bsf_seed, fold, rank, stream), start=self.current_epoch * per_epoch)
            streams.append(start_augmenter(loader, procs, pin_memory=self.device.type == "cuda"))
        for s in streams:
            next(s)  # start the workers (nnU-Net does the same; the stream reserves this batch for it)
        return tuple(streams)

    def get_training_transforms(self, patch_size, rotation_for_DA, deep_supervision_scales, mirror_axes,
                                do_dummy_2d_data_aug, **kwargs):
        """nnU-Net's training transforms, with intensity domain randomization after the spatial transform when
        ``bsf_domain_randomization`` (or ``BSF_DOMAIN_RANDOMIZATION=1``) asks for it."""
        from .domain_randomization import DOMAIN_RANDOMIZATION_ENV, with_domain_randomization

        transforms = nnUNetTrainer.get_training_transforms(patch_size, rotation_for_DA, deep_supervision_scales,
                                                           mirror_axes, do_dummy_2d_data_aug, **kwargs)
        wanted = self.bsf_domain_randomization
        if wanted is None:
            wanted = bool(settings.value(DOMAIN_RANDOMIZATION_ENV))
        if wanted:
            transforms = with_domain_randomization(transforms)
            self.print_to_log_file("  intensity domain randomization on (synthetic images from the labels, per-label "
                                   "contrast remapping, bias field)")
        return transforms

    def on_train_epoch_start(self):
        self._start_epoch_record()
        if self.bsf_seed is not None:
            self._seed_epoch()
        if self.bsf_freeze_encoder_epochs:
            frozen = self.current_epoch < self.bsf_freeze_encoder_epochs
            for p in _unwrap(self.network).swinViT.parameters():
                p.requires_grad_(not frozen)
            if self.current_epoch in (0, self.bsf_freeze_encoder_epochs):
                self.print_to_log_file(f"encoder (swinViT) {'frozen' if frozen else 'trainable'}")
        super().on_train_epoch_start()

    def save_checkpoint(self, filename: str) -> None:
        """nnU-Net's checkpoint, written to a temporary name and renamed (never half-written); a full disk stops the
        run with a message, the previous checkpoint intact."""
        if self.local_rank != 0 or self.disable_checkpointing:
            super().save_checkpoint(filename)  # writes nothing (says so when checkpointing is disabled)
            return
        remove_stale_temporaries(os.path.dirname(os.path.abspath(filename)), os.path.basename(filename))
        with self._stop_if_disk_full(), atomic_path(filename, keep_extension=False) as tmp:
            super().save_checkpoint(tmp)

    @contextlib.contextmanager
    def _stop_if_disk_full(self):
        """A checkpoint write that finds the disk full (or the quota exceeded) ends the run with the message alone
        (exit code 1, no traceback) and in the training log."""
        try:
            yield
        except DiskFullError as e:
            self.print_to_log_file(str(e), also_print_to_console=False)
            raise SystemExit(f"{self.__class__.__name__} stopped: {e}") from None

    # ------------------------------------------------------------------ optimisation
    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(self.network.parameters(), lr=self.initial_lr, weight_decay=self.weight_decay)
        warmup = max(1, int(round(self.bsf_warmup_fraction * self.num_epochs))) if self.num_epochs > 1 else 0
        scheduler = WarmupCosineLR(optimizer, self.initial_lr, self.num_epochs, warmup)
        return optimizer, scheduler

    @contextlib.contextmanager
    def _oom_guard(self):
        """Turn an out-of-memory error into a message that says what to reduce."""
        try:
            yield
        except torch.OutOfMemoryError:
            cm = self.configuration_manager
            msg = out_of_memory_message(self.__class__.__name__, cm.configuration.get("bsf", {}).get(
                "variant", self.bsf_variant), cm.patch_size, cm.batch_size, self.device.type)
            self.print_to_log_file(msg)
            raise TrainingHealthError(msg) from None

    def _unhealthy(self, what: str, value) -> None:
        msg = (f"{what} became {value} in epoch {self.current_epoch} of {self.__class__.__name__} (fold {self.fold}). "
               "Training stopped before the optimiser applied it, and nothing was saved after it: the last "
               "checkpoint (checkpoint_latest.pth / checkpoint_best.pth) is intact. Lower the learning rate (a "
               "trainer subclass with a smaller initial_lr in bsf_recipe), check the data (bsf-nnunet check -d ID "
               "finds NaN/Inf voxels), and continue with --c.")
        self.print_to_log_file(msg)
        raise TrainingHealthError(msg)

    def train_step(self, batch: dict) -> dict:
        """nnU-Net's step (bf16 autocast on CUDA where supported and on CPUs with native bf16, loss in fp32,
        clipping at 12) that refuses non-finite losses and gradients and explains out-of-memory errors."""
        self._check_stop(end_of_epoch=False)
        replayed = self._skipped_step()  # after --c from a stop in the middle of an epoch: its finished steps
        if replayed is not None:
            return replayed
        data = batch["data"].to(self.device, non_blocking=True)
        target = batch["target"]
        if isinstance(target, list):
            target = [t.to(self.device, non_blocking=True) for t in target]
        else:
            target = target.to(self.device, non_blocking=True)
        self.optimizer.zero_grad(set_to_none=True)
        with self._oom_guard():
            # CUDA: autocast as nnU-Net (bf16 where supported, else fp16 with its grad scaler); CPU: bf16 autocast
            # where the CPU has native bf16 (cpu_bf16_enabled), else fp32
            use_amp = self.device.type == "cuda" or self.bsf_amp_dtype is not None
            with autocast_dtype(self.device.type, self.bsf_amp_dtype), \
                    (torch.autocast(self.device.type, enabled=True) if use_amp else contextlib.nullcontext()):
                output = self.network(data)
            loss = self.loss(float_output(output) if use_amp else output, target)
            if not torch.isfinite(loss.detach()).all():
                self._unhealthy("The training loss", loss.item())
            if self.grad_scaler is not None:
                self.grad_scaler.scale(loss).backward()
                self.grad_scaler.unscale_(self.optimizer)
            else:
                loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(self.network.parameters(), 12)
            if self.grad_scaler is not None:
                # fp16 loss scaling: inf gradients are expected now and then (the scaler skips the step)
                self.grad_scaler.step(self.optimizer)
                self.grad_scaler.update()
            else:
                if not torch.isfinite(grad_norm):
                    self._unhealthy("The gradient norm", grad_norm.item())
                self.optimizer.step()
        return self._note_step({"loss": loss.detach().cpu().numpy()})

    def validation_step(self, batch: dict) -> dict:
        self._check_stop(end_of_epoch=False)
        with autocast_dtype(self.device.type, self.bsf_amp_dtype):
            return super().validation_step(batch)
