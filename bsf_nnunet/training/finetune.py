"""BSFTrainer: BrainSegFounder Swin-UNETR fine-tuning inside nnU-Net v2.

What the trainers share (the Swin-UNETR configuration and network from the plans, precision, pretrained weights,
reading checkpoints, the guards) is in ``base.BSFTrainerBase``. Fine-tuning adds: stage chaining (this trainer's
fold F starts from the pretraining trainer's fold F, ``handover.py``), the seeded data streams (``data.py``) and
training transforms with optional domain randomization (``domain_randomization.py``), nnU-Net's checkpoints
written atomically and loaded into the architecture they were trained with, the training and validation steps that
refuse non-finite losses and gradients, and nnU-Net's final validation through the CPU engine of nnUNetv2_predict.

Variants are subclasses that change class attributes (nnU-Net's idiom, ``training/variants/finetune.py``).
"""
from __future__ import annotations

import contextlib
import os
import weakref

import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from ..allocator import release_free_cpu_memory
from ..io import atomic_path, remove_stale_temporaries
from ..network.cpu_engine import configure_cpu_engine
from ..planning.presets import variant_trainers
from .base import BSFTrainerBase, TrainingHealthError, _unwrap
from .lr import WarmupCosineLR
from .precision import autocast_dtype, float_output
from .predict_checks import record_training_orientations
from .preemption import children_leave_stops_to_the_trainer


class BSFTrainer(BSFTrainerBase):
    """Small variant (depths 2-2-6-2, 64.1 M parameters): the paper's best model (BF-S 64M)."""

    # stage chaining: this trainer's fold F results initialise fold F. Subclasses that set bsf_variant get their
    # variant's pretraining trainer from the registry (plans/variants.json) unless they name one themselves.
    bsf_pretrain_trainer = "BSFPretrainTrainer"
    bsf_freeze_encoder_epochs = 0  # keep swinViT frozen for the first N epochs
    bsf_final_validation = True  # False: a training run skips nnU-Net's final validation (--val still runs it)
    bsf_seed = 12345  # each epoch reseeds python/numpy/torch from (seed, fold, epoch): --c repeats the same stream
    bsf_recipe = {"initial_lr": 1e-4, "weight_decay": 1e-5, "num_epochs": 1000, "num_iterations_per_epoch": 250,
                  "num_val_iterations_per_epoch": 50, "save_every": 5}

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "bsf_variant" in cls.__dict__ and "bsf_pretrain_trainer" not in cls.__dict__:
            pretrainer = variant_trainers()[cls.bsf_variant][1]
            if pretrainer != cls.__name__:
                cls.bsf_pretrain_trainer = pretrainer

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

    # ------------------------------------------------------------------ stage chaining
    def _chained_checkpoint(self):
        from nnunetv2.utilities.file_path_utilities import get_output_folder

        from ..paths import nnunet_folder

        if nnunet_folder("nnUNet_results", required=False) is None or not self.bsf_pretrain_trainer:
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
        self._begin_training()
        self._maybe_chain_pretraining()
        record_training_orientations(self)  # into plans.json, for nnUNetv2_predict's orientation check
        super().on_train_start()

    # ------------------------------------------------------------------ pre-emption (preemption.py)
    def on_epoch_end(self):
        super().on_epoch_end()
        self._check_stop(end_of_epoch=True)

    def on_train_end(self):
        super().on_train_end()
        self._bsf_trained_in_this_process = True
        if self.local_rank == 0:
            remove_stale_temporaries(self.output_folder, "checkpoint_")

    # ------------------------------------------------------------------ data
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
        from .domain_randomization import randomization_wanted, with_domain_randomization

        transforms = nnUNetTrainer.get_training_transforms(patch_size, rotation_for_DA, deep_supervision_scales,
                                                           mirror_axes, do_dummy_2d_data_aug, **kwargs)
        if randomization_wanted(self.bsf_domain_randomization):
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

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self, filename: str) -> None:
        """nnU-Net's checkpoint, written to a temporary name and renamed (never half-written); a full disk stops the
        run with a message, the previous checkpoint intact."""
        if self.local_rank != 0 or self.disable_checkpointing:
            super().save_checkpoint(filename)  # writes nothing (says so when checkpointing is disabled)
            return
        remove_stale_temporaries(os.path.dirname(os.path.abspath(filename)), os.path.basename(filename))
        with self._stop_if_disk_full(), atomic_path(filename, keep_extension=False) as tmp:
            super().save_checkpoint(tmp)

    def load_checkpoint(self, filename_or_checkpoint) -> None:
        """nnU-Net's loading for --c, --val and --val_best, read without unpickling code, into the architecture
        (axis order) that the checkpoint was trained with. A truncated or corrupt file: see _read_checkpoint."""
        checkpoint = self._checkpoint_to_load(filename_or_checkpoint)
        if checkpoint is not None:
            self._apply_checkpoint(checkpoint)

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

    # ------------------------------------------------------------------ optimisation
    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(self.network.parameters(), lr=self.initial_lr, weight_decay=self.weight_decay)
        warmup = max(1, int(round(self.bsf_warmup_fraction * self.num_epochs))) if self.num_epochs > 1 else 0
        scheduler = WarmupCosineLR(optimizer, self.initial_lr, self.num_epochs, warmup)
        return optimizer, scheduler

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
