"""BSFTrainerBase: what BrainSegFounder's fine-tuning and pretraining trainers share inside nnU-Net v2.

The trainers work from the plain ``nnUNetPlans`` that ``nnUNetv2_plan_and_preprocess`` writes: at construction the
base turns the requested configuration into a Swin-UNETR one (patch /32 and >= 64, a batch size that fits, the
architecture block naming ``bsf_nnunet.network.swin_unetr.BSFSwinUNETR`` with the variant's kwargs). nnU-Net then
saves these plans into the results folder, so ``nnUNetv2_predict`` rebuilds the identical network through the
static ``build_network_architecture``.

Shared here: the configuration and the network from the plans, precision (bf16 autocast where supported), loading
pretrained weights (``-pretrained_weights``, channel mapping, axis order), reading checkpoints (safe unpickling, the
fallback from a corrupt ``--c`` checkpoint), the architecture a checkpoint was trained with, the start of a training
run (stop signals, guards), the disk-full and out-of-memory guards. The trainers are ``finetune.BSFTrainer``
(fine-tuning) and ``pretrain.BSFPretrainTrainer`` (self-supervised stages); variants are subclasses that change
class attributes (nnU-Net's idiom, ``training/variants/``); architecture presets live in ``plans/variants.json``.
``BSFTrainerBase`` itself is not a trainer to run: ``bsf_nnunet.training.__all__`` (and so the shims in
``trainers/`` that nnU-Net searches) leaves it out.

Everything that does not need the trainer lives beside it: precision (``precision.py``), pre-emption
(``preemption.py``), guards (``guards.py``), nnU-Net patches (``nnunet_hooks.py``), architecture restore and weight
transfer (``bsf_nnunet/weights``).
"""
from __future__ import annotations

import contextlib
import os

import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager, PlansManager
from torch import nn

from .. import settings
from ..allocator import tune_cpu_allocator
from ..errors import BSFError, ConfigurationError
from ..io import DiskFullError
from ..planning.presets import get_variant
from ..planning.swin_config import NETWORK_CLASS_NAME, derive_swin_configuration
from ..weights.description import channel_names
from ..weights.restore import SIZE_KEYS, arch_conflicts, build_network
from .precision import CPU_BF16_ENV, bf16_supported, cpu_has_native_bf16
from .preemption import PreemptionMixin, StopRequested

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


class BSFTrainerBase(PreemptionMixin, nnUNetTrainer):
    """The part of every BSF trainer that fine-tuning (``BSFTrainer``) and pretraining (``BSFPretrainTrainer``)
    share: not a trainer to run by itself (nnU-Net does not find it)."""

    bsf_variant = "small"
    bsf_merging = "legacy"
    bsf_patch_cap = None  # cap per patch axis (still a multiple of 32, >= 64)
    bsf_max_batch_size = None
    bsf_extra_arch_kwargs = None  # e.g. {"use_checkpoint": True}
    bsf_warmup_fraction = 0.05  # of num_epochs (pretraining: of all steps)
    bsf_use_pretraining = True  # False: never load pretrained weights (the scratch baseline)
    # what -pretrained_weights and stage chaining load: "by-name" (every tensor that fits, input filters matched by
    # channel name) or "official" (the Swin layers 1-4 only, as the official scripts' strict=False loading)
    bsf_handover = "by-name"
    # intensity domain randomization (domain_randomization.py): of the training patches from their labels when
    # fine-tuning, label-free of the crops when pretraining; None: decided by BSF_DOMAIN_RANDOMIZATION (off unless 1)
    bsf_domain_randomization = None
    bsf_recipe: dict = {}  # nnU-Net's attributes (initial_lr, num_epochs, ...), set at construction; each trainer's own

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

    # ------------------------------------------------------------------ pretrained weights
    def target_channel_names(self) -> list:
        return channel_names(self.dataset_json)

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
                 if resolved.entry is not None else
                 f"; what the file does not record from its sidecar {ckpt.metadata['sidecar']}"
                 if ckpt.metadata.get("sidecar") else "")
        self.print_to_log_file(f"Initialised from {resolved.describe()} ({how}{table}):\n{report.summary()}")

    def _named_source_channels(self, recorded, entry=None):
        """``BSF_PRETRAINED_CHANNELS`` names, for one run, the channels of checkpoints that record none (official
        files given as a path without a sidecar); a checkpoint that records its channels (ours, nnU-Net's, or in its
        sidecar ``FILE.bsf.json``) or a published file (``entry``, whose channels the table gives) keeps them, so the
        variable can stay exported through a whole stage 1 -> stage 2 -> fine-tuning chain."""
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

    def _pretrained_encoder_only(self) -> bool:
        return False

    def _handover_scope(self) -> str:
        if self.bsf_handover not in ("by-name", "official"):
            raise ConfigurationError(f"{self.__class__.__name__}.bsf_handover must be 'by-name' or 'official', got "
                                     f"{self.bsf_handover!r}")
        return "official" if self.bsf_handover == "official" else "all"

    def _set_axis_order(self, axis: str, why: str) -> None:
        """Switch the network's axis order and record it in the plans (saved to the results' plans.json, which
        nnUNetv2_predict rebuilds the network from)."""
        _unwrap(self.network).set_axis_order(axis)
        self.configuration_manager.configuration["architecture"]["arch_kwargs"]["axis_order"] = axis
        self.plans_manager.plans["configurations"][self.configuration_name]["architecture"]["arch_kwargs"][
            "axis_order"] = axis
        self.print_to_log_file(f"  {why}: the network sees {axis} arrays (nnU-Net's (z, y, x) input transposed "
                               "to match; recorded in plans.json)")

    # ------------------------------------------------------------------ checkpoints
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

    def _checkpoint_to_load(self, filename_or_checkpoint):
        """The checkpoint dict that ``load_checkpoint`` applies, read without unpickling code (a truncated or
        corrupt file: see :meth:`_read_checkpoint`; None when none loads and training starts from scratch), with
        the trainer initialised and its network rebuilt in the architecture (axis order) the checkpoint records."""
        checkpoint, where = filename_or_checkpoint, "the checkpoint"
        if isinstance(checkpoint, str):
            checkpoint, where = self._read_checkpoint(checkpoint)
            if checkpoint is None:
                return None  # --c, but no checkpoint loads: training starts from scratch (logged)
        if not self.was_initialized:
            self.initialize()
        self._restore_architecture(saved_arch_kwargs(checkpoint, self.configuration_name), where)
        return checkpoint

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

    @contextlib.contextmanager
    def _stop_if_disk_full(self):
        """A checkpoint write that finds the disk full (or the quota exceeded) ends the run with the message alone
        (exit code 1, no traceback) and in the training log."""
        try:
            yield
        except DiskFullError as e:
            self.print_to_log_file(str(e), also_print_to_console=False)
            raise SystemExit(f"{self.__class__.__name__} stopped: {e}") from None

    # ------------------------------------------------------------------ training run
    def _begin_training(self) -> None:
        """The start of both trainers' on_train_start: stop-signal handlers, the checks before the first epoch,
        initialisation."""
        from .guards import before_training

        self._install_preemption_handlers()  # before the augmentation workers fork (they inherit it)
        before_training(self)  # one run per fold (a lock), finite raw images
        if not self.was_initialized:
            self.initialize()

    def run_training(self):
        """nnU-Net's training loop; a stop signal before the first step of this run finished ends it at once."""
        try:
            super().run_training()
        except StopRequested as stop:
            self._stopped_while_starting(stop)

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
