"""BSFPretrainTrainer: BrainSegFounder's self-supervised stages 1 and 2 as an nnU-Net trainer.

    nnUNetv2_train 500 3d_fullres all -tr BSFPretrainTrainer                        # stage 1 (e.g. UK Biobank)
    nnUNetv2_train 4 3d_fullres 0 -tr BSFPretrainTrainer -pretrained_weights S1.pth  # stage 2, fold 0's train cases

Swin-UNETR encoder + rotation, contrastive and reconstruction heads (``bsf_nnunet.ssl``); two augmented views per
crop (rotation in the official (y, z) plane + the official two-round inpainting, made on the device); loss =
CE(rotation) + NT-Xent (tau 0.5, negatives from the local batch as in the paper; ``bsf_contrastive_gather = True``
gathers them across DDP ranks) + L1 reconstruction. Stage 1: AdamW (lr 4e-4, wd 0.1); stage 2 (started from a
stage-1 checkpoint): the official stage-2 recipe (lr 6e-6, 500 warm-up steps, ``bsf_stage2_recipe``). Warmup then
cosine per step, bf16 autocast on CUDA and on CPUs with native bf16, gradient clipping. Intensities: nnU-Net's
z-scored crops (``bsf_ssl_intensity = "nnunet"``) or the official [0, 1] scale (``"official"``: MONAI's
``ScaleIntensityRanged(-1000..1000 -> 0..1, clip)`` of raw intensities estimated from the plans' statistics,
``training.ssl_data.OfficialIntensity``; inpainting noise in [0, 1]). Per epoch the log and
progress.png show each loss, the rotation accuracy and the contrastive top-1 (train and validation). Validation
loss on the fold's validation cases (held-out cases never enter pretraining).
Checkpoints are written atomically and carry the metadata the next stage needs (``bsf_metadata``) and nnssl's
adaptation plan (``nnssl_adaptation_plan``, for nnssl's fine-tuning); they load with ``torch.load(weights_only=True)``.

What it shares with fine-tuning (the configuration from the plans, precision, ``-pretrained_weights``, reading
checkpoints, the guards) comes from ``base.BSFTrainerBase``; it needs nothing of ``finetune.BSFTrainer``.

Why this module is longer than 400 lines: its methods are overrides of ``nnUNetTrainer`` that nnU-Net calls by name
and that share the trainer's state (network, plans, fold, data loaders), so they stay on the one class. Crops and
intensities live in ``ssl_data.py``, views and losses in ``bsf_nnunet/ssl``, schedules in ``lr.py``.
"""
from __future__ import annotations

import os
import random
import weakref
from time import time

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from ..errors import BSFError, ConfigurationError
from ..io import atomic_torch_save, remove_stale_temporaries
from ..weights.nnssl import plan_for_bsf_metadata
from .base import BSFTrainerBase, _unwrap
from .handover import HANDOVER_CHECKPOINT
from .lr import WarmupCosineLR
from .precision import autocast_dtype
from .preemption import PARTIAL_EPOCH_KEY
from .ssl_data import SSLCropLoader

SSL_PARTS = ("rot", "con", "rec", "rot_acc", "con_top1")
SSL_LOG_KEYS = tuple(f"{prefix}ssl_{k}" for prefix in ("", "val_") for k in SSL_PARTS)


class SSLDivergedError(BSFError, RuntimeError):
    pass


def _epoch_summary(log: dict, epoch: int, name: str, prefix: str) -> str:
    """One log line: total and per-task losses, rotation accuracy and contrastive top-1 of an epoch."""
    def get(key):
        values = log.get(prefix + key) or []
        return values[epoch] if len(values) > epoch else float("nan")

    total = log["train_losses" if name == "train" else "val_losses"][epoch]
    return (f"{name} loss {total:.4f} (rot {get('ssl_rot'):.4f}, con {get('ssl_con'):.4f}, rec {get('ssl_rec'):.4f}); "
            f"rotation accuracy {get('ssl_rot_acc'):.2f} (chance 0.25), contrastive top-1 {get('ssl_con_top1'):.2f}")


class BSFPretrainTrainer(BSFTrainerBase):
    """Self-supervised pretraining of the Small variant on 96^3 crops."""

    bsf_crop_size = 96
    bsf_crops_per_volume = 2
    bsf_volumes_per_batch = None  # None: the configuration's batch size
    bsf_foreground_probability = 0.9
    bsf_loss_weights = (1.0, 1.0, 1.0)  # rotation, contrastive, reconstruction
    bsf_temperature = 0.5
    bsf_contrastive_gather = False  # the paper: negatives from the local batch; True: from all DDP ranks
    # official stage 2 (lab-smile/BrainSegFounder downstream/BraTS/ssl/launch.sh), applied when the trainer starts
    # from a stage-1 checkpoint; None keeps the stage-1 recipe
    bsf_stage2_recipe = {"initial_lr": 6e-6, "warmup_steps": 500}
    bsf_warmup_steps = None  # None: bsf_warmup_fraction of all steps
    bsf_lr_decay = True  # cosine decay after the warm-up; False: constant (the official stage 1 without --lrdecay)
    bsf_seed = 12345
    bsf_grad_clip = 12.0
    # intensities the SSL losses see: "nnunet" = the preprocessed (z-scored) crops; "official" = BrainSegFounder's
    # ScaleIntensityRanged(-1000..1000 -> 0..1, clip) of raw intensities estimated from the plans' statistics, with
    # inpainting noise in [0, 1] (docs/fidelity.md; measured in bench/ssl_loss_balance.py)
    bsf_ssl_intensity = "nnunet"
    # official stage 1 computes on MONAI's (x, y, z) crops (its contrastive token and rotation plane are taken in that
    # order): a run that starts without weights uses it unless the plans' arch_kwargs name an axis_order; weights
    # (-pretrained_weights, --c) bring their own
    bsf_axis_order = "xyz"
    bsf_recipe = {"initial_lr": 4e-4, "weight_decay": 0.1, "num_epochs": 100, "num_iterations_per_epoch": 250,
                  "num_val_iterations_per_epoch": 25, "save_every": 5}

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        if self.is_ddp:
            if torch.cuda.is_available() and device.type == "cuda":
                # nnU-Net picks cuda:<global rank>; on several nodes the GPU index is the local rank
                self.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", self.local_rank)))
            else:
                self.device = torch.device("cpu")  # gloo / CPU DDP (tests, CPU clusters)
        self.bsf_stage = 1
        self.bsf_parent = None
        self.global_step = 0
        for k in SSL_LOG_KEYS:
            self.logger.local_logger.my_fantastic_logging.setdefault(k, [])

    # crops replace nnU-Net's patch: cubic, multiple of 32, >= 64
    def _adapt_configuration(self, configuration: str) -> None:
        crop = int(self.bsf_crop_size)
        if crop % 32 or crop < 64:
            raise ConfigurationError(f"{self.__class__.__name__}: crop size {crop} must be a multiple of 32 and >= 64.")
        resolved = self.plans_manager._internal_resolve_configuration_inheritance(configuration)
        resolved = dict(resolved, patch_size=[crop] * 3)
        self.plans_manager.plans["configurations"][configuration] = resolved
        super()._adapt_configuration(configuration)

    def _set_batch_size_and_oversample(self):
        """The configured batch size is per process (nnU-Net would split it across ranks)."""
        self.batch_size = self.configuration_manager.batch_size

    # ------------------------------------------------------------------ network
    @staticmethod
    def build_network_architecture(plans_manager, configuration_manager, num_input_channels, num_output_channels,
                                   enable_deep_supervision: bool = True) -> nn.Module:
        from ..ssl.model import BSFSSLModel

        kwargs = dict(configuration_manager.network_arch_init_kwargs)
        return BSFSSLModel(num_input_channels, **kwargs)

    def initialize(self):
        if self.was_initialized:
            raise RuntimeError("BSFPretrainTrainer.initialize called twice")
        from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels

        self._set_batch_size_and_oversample()
        self.num_input_channels = determine_num_input_channels(self.plans_manager, self.configuration_manager,
                                                               self.dataset_json)
        torch.manual_seed(self.bsf_seed)  # the same initial weights on every rank and in every run
        self.network = self.build_network_architecture(self.plans_manager, self.configuration_manager,
                                                       self.num_input_channels, 0, False).to(self.device)
        if "axis_order" not in self.configuration_manager.network_arch_init_kwargs and \
                self.bsf_axis_order != self.network.axis_order:
            self._set_axis_order(self.bsf_axis_order, "stage 1 computes in the order of the official (x, y, z) crops")
        self.optimizer, self.lr_scheduler = self.configure_optimizers()
        if self.is_ddp:
            ids = [self.local_rank] if self.device.type == "cuda" else None
            self.network = nn.parallel.DistributedDataParallel(self.network, device_ids=ids)
        _unwrap(self.network).__dict__["_bsf_owner"] = weakref.ref(self)
        self.loss = self._build_loss()
        from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class

        from .data import checked_dataset_class

        self.dataset_class = checked_dataset_class(infer_dataset_class(self.preprocessed_dataset_folder))
        self.was_initialized = True

    def load_bsf_pretrained(self, path: str, how: str = "-pretrained_weights") -> None:
        """Stage 2: start from a stage-1 (or official SSL) checkpoint, encoder and heads, with the stage-2 recipe."""
        super().load_bsf_pretrained(path, how)
        self._enter_stage2(self.bsf_pretrained_from)

    def _enter_stage2(self, parent: str) -> None:
        """Stage 2 trains with its own recipe (a fresh optimiser and schedule; --c then loads their state)."""
        self.bsf_stage, self.bsf_parent = 2, parent
        recipe = self.bsf_stage2_recipe
        if not recipe:
            self.print_to_log_file("Stage 2 keeps the stage-1 recipe (bsf_stage2_recipe is None).")
            return
        stage1_lr = self.initial_lr
        self.initial_lr = float(recipe["initial_lr"])
        self.bsf_warmup_steps = recipe.get("warmup_steps", self.bsf_warmup_steps)
        self.num_epochs = int(recipe.get("num_epochs", self.num_epochs))
        self.bsf_lr_decay = bool(recipe.get("lr_decay", self.bsf_lr_decay))
        self.optimizer, self.lr_scheduler = self.configure_optimizers()
        self.print_to_log_file(
            f"Stage-2 recipe (official BrainSegFounder stage 2): lr {self.initial_lr:g} (stage 1: {stage1_lr:g}), "
            f"{self.lr_scheduler.warmup_steps} warm-up steps, weight decay {self.weight_decay:g}, "
            f"{self.num_epochs * self.num_iterations_per_epoch} steps")

    def _build_loss(self):
        from ..ssl.losses import SSLLoss

        w = self.bsf_loss_weights
        return SSLLoss(w_rot=w[0], w_con=w[1], w_rec=w[2], temperature=self.bsf_temperature,
                       gather=self.bsf_contrastive_gather)

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(self.network.parameters(), lr=self.initial_lr, weight_decay=self.weight_decay)
        total = self.num_epochs * self.num_iterations_per_epoch
        warmup = self.bsf_warmup_steps
        if warmup is None:
            warmup = max(1, int(round(self.bsf_warmup_fraction * total))) if total > 1 else 0
        elif warmup > total // 2:
            self.print_to_log_file(f"  {warmup} warm-up steps exceed half of this run's {total} steps: "
                                   f"warming up for {total // 2}")
            warmup = total // 2
        return optimizer, WarmupCosineLR(optimizer, self.initial_lr, total, int(warmup), decay=self.bsf_lr_decay)

    @property
    def _module(self) -> nn.Module:
        m = self.network.module if self.is_ddp else self.network
        return getattr(m, "_orig_mod", m)

    # ------------------------------------------------------------------ data
    def get_dataloaders(self):
        tr_keys, val_keys = self.do_split()
        if self.fold != "all":
            overlap = set(tr_keys) & set(val_keys)
            if overlap:
                raise ConfigurationError(f"splits_final.json fold {self.fold}: cases {sorted(overlap)[:5]} are in both "
                                         "train and val; held-out cases must not be pretrained on.")
        self.print_to_log_file(f"Pretraining on {len(tr_keys)} cases, validating on {len(val_keys)} cases")
        ds_tr = self.dataset_class(self.preprocessed_dataset_folder, tr_keys)
        ds_val = self.dataset_class(self.preprocessed_dataset_folder, val_keys)
        rank = dist.get_rank() if self.is_ddp else 0
        world = dist.get_world_size() if self.is_ddp else 1
        vpb = self.bsf_volumes_per_batch or self.batch_size
        common = dict(crop_size=self.configuration_manager.patch_size, volumes_per_batch=vpb,
                      crops_per_volume=self.bsf_crops_per_volume,
                      foreground_probability=self.bsf_foreground_probability, rank=rank, world_size=world)
        intensity = self._ssl_intensity()
        self.print_to_log_file(f"SSL intensities (bsf_ssl_intensity = {self.bsf_ssl_intensity!r}): "
                               + ("nnU-Net's preprocessed values" if intensity is None else intensity.describe()))
        if vpb * self.bsf_crops_per_volume * world < 2:
            self.print_to_log_file("WARNING: one crop per step in total: the contrastive loss has no negatives. "
                                   "Use more crops per volume or a larger batch.")
        tr = SSLCropLoader(ds_tr, tr_keys, seed=self.bsf_seed, intensity=intensity,
                           randomization=self._ssl_randomization(), **common)
        val = SSLCropLoader(ds_val, val_keys, seed=self.bsf_seed + 1, fixed=True, intensity=intensity, **common)
        return tr, val

    def _ssl_randomization(self):
        """Label-free intensity randomization of the training crops (``LabelFreeRandomization``) when
        ``bsf_domain_randomization`` or ``BSF_DOMAIN_RANDOMIZATION=1`` asks for it; None otherwise. The validation
        crops stay as they are, so that the validation loss compares across epochs."""
        from .domain_randomization import LabelFreeRandomization, randomization_wanted

        if not randomization_wanted(self.bsf_domain_randomization):
            return None
        if self.bsf_ssl_intensity != "nnunet":
            raise ConfigurationError(f"{self.__class__.__name__}: domain randomization z-scores each crop, which the "
                                     f"official intensities (bsf_ssl_intensity = {self.bsf_ssl_intensity!r}) do not "
                                     "allow: unset BSF_DOMAIN_RANDOMIZATION (or bsf_domain_randomization), or "
                                     "use bsf_ssl_intensity = 'nnunet'.")
        self.print_to_log_file("  intensity domain randomization on (label-free: a random intensity curve and bias "
                               "field on half of the training crops)")
        return LabelFreeRandomization()

    def _ssl_intensity(self):
        """None (nnU-Net's values) or the official scaling (``ssl_data.OfficialIntensity``) of this dataset."""
        from .ssl_data import SSL_INTENSITY_MODES, OfficialIntensity

        mode = self.bsf_ssl_intensity
        if mode not in SSL_INTENSITY_MODES:
            raise ConfigurationError(f"{self.__class__.__name__}: bsf_ssl_intensity must be one of "
                                     f"{SSL_INTENSITY_MODES}, got {mode!r}")
        if mode == "nnunet":
            return None
        try:
            return OfficialIntensity.from_plans(self.plans_manager.plans, self.num_input_channels)
        except ValueError as e:
            raise ConfigurationError(f"{self.__class__.__name__}: {e}") from e

    def _noise_range(self):
        """The inpainting noise's range: the official [0, 1] with the official intensities, else each crop's own."""
        if self.bsf_ssl_intensity == "official":
            from .ssl_data import OFFICIAL_INTENSITY_RANGE

            return OFFICIAL_INTENSITY_RANGE[2:]
        return None

    # ------------------------------------------------------------------ training
    def on_train_start(self):
        self._begin_training()
        self.dataloader_train, self.dataloader_val = self.get_dataloaders()
        os.makedirs(self.output_folder, exist_ok=True)
        if self.local_rank == 0:
            self.dataset_class.unpack_dataset(self.preprocessed_dataset_folder, overwrite_existing=False,
                                              num_processes=1, verify=True)
        if self.is_ddp:
            dist.barrier()
        from batchgenerators.utilities.file_and_folder_operations import save_json

        if self.local_rank == 0:
            save_json(self.plans_manager.plans, os.path.join(self.output_folder_base, "plans.json"), sort_keys=False)
            save_json(self.dataset_json, os.path.join(self.output_folder_base, "dataset.json"), sort_keys=False)
        self.global_step = self.current_epoch * self.num_iterations_per_epoch
        self.print_to_log_file(f"Self-supervised pretraining, stage {self.bsf_stage}"
                               + (f" (parent: {self.bsf_parent})" if self.bsf_parent else ""))

    def _view_generator(self, epoch: int, val: bool) -> torch.Generator:
        rank = dist.get_rank() if self.is_ddp else 0
        g = torch.Generator()
        g.manual_seed(self.bsf_seed * 1000003 + (0 if val else epoch) * 101 + rank * 7 + (1 if val else 0))
        return g

    def on_train_epoch_start(self):
        self._start_epoch_record()
        self.network.train()
        self.dataloader_train.set_epoch(self.current_epoch)
        self._gen_train = self._view_generator(self.current_epoch, False)
        self.print_to_log_file("")
        self.print_to_log_file(f"Epoch {self.current_epoch}")
        self.print_to_log_file(f"Current learning rate: {self.optimizer.param_groups[0]['lr']:.3g}")
        self.logger.log("lrs", self.optimizer.param_groups[0]["lr"], self.current_epoch)

    def _forward_losses(self, batch: dict, generator: torch.Generator):
        from ..ssl.losses import ssl_metrics
        from ..ssl.views import make_views

        crops = torch.from_numpy(batch["data"]).to(self.device, non_blocking=True)
        v = make_views(crops, generator, plane=self._rotation_plane(), noise_range=self._noise_range())
        x = torch.cat([v["view1"], v["view2"]])
        with autocast_dtype(self.device.type, self.bsf_amp_dtype), \
                torch.autocast(self.device.type, enabled=self.bsf_amp_dtype is not None):
            rot, con, rec = self.network(x)
        n = crops.shape[0]
        rot, z1, z2, labels = rot.float(), con[:n].float(), con[n:].float(), torch.cat([v["rot1"], v["rot2"]])
        total, parts = self.loss(rot, labels, z1, z2, rec.float(), torch.cat([v["target1"], v["target2"]]))
        return total, {**parts, **ssl_metrics(rot, labels, z1, z2)}

    def _rotation_plane(self) -> tuple:
        """The official (y, z) rotation plane in this run's preprocessed arrays (after the plans' transpose)."""
        from ..ssl.views import official_plane

        return official_plane(self.plans_manager.transpose_forward)

    def train_step(self, batch: dict) -> dict:
        self._check_stop(end_of_epoch=False)
        replayed = self._skipped_step()  # after --c from a stop in the middle of an epoch: its finished steps
        if replayed is not None:
            from ..ssl.views import make_views

            make_views(torch.from_numpy(batch["data"]), self._gen_train,  # the finished step's random draws
                       plane=self._rotation_plane(), noise_range=self._noise_range())
            self.global_step += 1
            return replayed
        self.lr_scheduler.step(self.global_step)
        self.optimizer.zero_grad(set_to_none=True)
        with self._oom_guard():
            return self._checked_step(batch)

    def _checked_step(self, batch: dict) -> dict:
        total, parts = self._forward_losses(batch, self._gen_train)
        if not torch.isfinite(total):
            raise SSLDivergedError(
                f"Pretraining loss became {total.item()} at epoch {self.current_epoch}, step {self.global_step} "
                f"(rotation {float(parts['rot']):.4g}, contrastive {float(parts['con']):.4g}, reconstruction "
                f"{float(parts['rec']):.4g}). The last good checkpoint in {self.output_folder} is intact; lower the "
                "learning rate (a BSFPretrainTrainer subclass with a smaller initial_lr) and continue with --c.")
        total.backward()
        gn = torch.nn.utils.clip_grad_norm_(self.network.parameters(), self.bsf_grad_clip)
        if not torch.isfinite(gn):
            raise SSLDivergedError(f"Gradient norm became {gn.item()} at step {self.global_step}: exploding gradients. "
                                   f"The last good checkpoint in {self.output_folder} is intact; continue with --c and "
                                   "a lower learning rate.")
        self.optimizer.step()
        self.global_step += 1
        return self._note_step({"loss": total.detach().cpu().numpy(), **{k: float(v) for k, v in parts.items()}})

    def _reduce(self, values):
        m = float(np.mean(values))
        if self.is_ddp:
            t = torch.tensor([m], dtype=torch.float64, device=self.device)
            dist.all_reduce(t)
            m = t.item() / dist.get_world_size()
        return m

    def on_train_epoch_end(self, train_outputs):
        self.logger.log("train_losses", self._reduce([o["loss"] for o in train_outputs]), self.current_epoch)
        for k in SSL_PARTS:
            self.logger.log(f"ssl_{k}", self._reduce([o[k] for o in train_outputs]), self.current_epoch)

    def on_validation_epoch_start(self):
        self.network.eval()
        self.dataloader_val.set_epoch(self.current_epoch)
        self._gen_val = self._view_generator(self.current_epoch, True)

    def validation_step(self, batch: dict) -> dict:
        self._check_stop(end_of_epoch=False)
        total, parts = self._forward_losses(batch, self._gen_val)
        return {"loss": total.detach().cpu().numpy(), **{k: float(v) for k, v in parts.items()}}

    def on_validation_epoch_end(self, val_outputs):
        if not val_outputs:
            return
        self.logger.log("val_losses", self._reduce([o["loss"] for o in val_outputs]), self.current_epoch)
        for k in SSL_PARTS:
            self.logger.log(f"val_ssl_{k}", self._reduce([o[k] for o in val_outputs]), self.current_epoch)

    def on_epoch_end(self):
        log = self.logger.local_logger.my_fantastic_logging
        self.logger.log("epoch_end_timestamps", time(), self.current_epoch)
        e = self.current_epoch
        self.print_to_log_file(_epoch_summary(log, e, "train", ""))
        if len(log["val_losses"]) > e:
            self.print_to_log_file(_epoch_summary(log, e, "val", "val_"))
        self.print_to_log_file(f"Epoch time: {log['epoch_end_timestamps'][e] - log['epoch_start_timestamps'][e]:.2f} s")
        if (e + 1) % self.save_every == 0 and e != self.num_epochs - 1:
            self.save_checkpoint(os.path.join(self.output_folder, "checkpoint_latest.pth"))
        # the official best model (model_bestValRMSE.pt) is the one with the lowest validation L1 reconstruction loss
        validated = len(log["val_ssl_rec"]) > e
        val = log["val_ssl_rec"][e] if validated else log["ssl_rec"][e]
        if self._best_ema is None or val < self._best_ema:
            self._best_ema = float(val)
            self.print_to_log_file(f"New best {'validation' if validated else 'training'} reconstruction loss: "
                                   f"{val:.4f} (saved as {HANDOVER_CHECKPOINT}, which the next stage starts from)")
            self.save_checkpoint(os.path.join(self.output_folder, HANDOVER_CHECKPOINT))
        if self.local_rank == 0:
            from .progress import plot_ssl_progress

            plot_ssl_progress(log, os.path.join(self.output_folder, "progress.png"))
        self.current_epoch += 1
        self._check_stop(end_of_epoch=True)

    def perform_actual_validation(self, save_probabilities: bool = False):
        """No segmentation to validate: the validation loss is computed every epoch."""
        self.print_to_log_file("Pretraining: no segmentation validation (see val losses in progress.png).")

    # ------------------------------------------------------------------ checkpoints
    def bsf_metadata(self) -> dict:
        cm = self.configuration_manager
        arch = dict(cm.network_arch_init_kwargs)
        return {
            "format": "bsf_pretrain",
            "stage": int(self.bsf_stage),
            "parent": self.bsf_parent,
            "recipe": {"initial_lr": float(self.initial_lr), "weight_decay": float(self.weight_decay),
                       "warmup_steps": int(self.lr_scheduler.warmup_steps),
                       "total_steps": int(self.lr_scheduler.max_steps),
                       "contrastive_gather": bool(self.bsf_contrastive_gather)},
            "variant": cm.configuration.get("bsf", {}).get("variant", self.bsf_variant),
            "arch_kwargs": arch,
            "merging": arch.get("merging", self.bsf_merging),
            "ssl_intensity": str(self.bsf_ssl_intensity),
            "axis_order": arch.get("axis_order", "zyx"),
            "channel_names": self.target_channel_names(),
            "patch_size": [int(p) for p in cm.patch_size],
            "spacing": [float(s) for s in cm.spacing],
            "normalization": list(cm.normalization_schemes),
            "use_mask_for_norm": [bool(b) for b in cm.use_mask_for_norm],
            "dataset": self.plans_manager.dataset_name,
            "plans": self.plans_manager.plans_name,
            "configuration": self.configuration_name,
            "fold": str(self.fold),
            "trainer": self.__class__.__name__,
        }

    def save_checkpoint(self, filename: str) -> None:
        if self.local_rank != 0 or self.disable_checkpointing:
            return
        log = {k: v if k == PARTIAL_EPOCH_KEY else [float(x) if not isinstance(x, list) else [float(y) for y in x]
                                                    for x in v]
               for k, v in self.logger.local_logger.my_fantastic_logging.items()}
        meta = self.bsf_metadata()
        checkpoint = {
            "network_weights": self._module.state_dict(),
            "optimizer_state": self.optimizer.state_dict(),
            "grad_scaler_state": None,
            "logging": log,
            "_best_ema": None if self._best_ema is None else float(self._best_ema),
            "current_epoch": self.current_epoch + 1,
            "global_step": int(self.global_step),
            "trainer_name": self.__class__.__name__,
            "inference_allowed_mirroring_axes": None,
            "bsf_metadata": meta,
            "nnssl_adaptation_plan": plan_for_bsf_metadata(meta),  # what nnssl's fine-tuning reads (issue #32)
            "rng": {"torch": torch.get_rng_state(), "python": list(random.getstate()[1])},
        }
        with self._stop_if_disk_full():
            atomic_torch_save(checkpoint, filename)

    def load_checkpoint(self, filename_or_checkpoint) -> None:
        """--c (and stage chaining) for pretraining; a truncated or corrupt file as in
        BSFTrainerBase._read_checkpoint."""
        ckpt = self._checkpoint_to_load(filename_or_checkpoint)
        if ckpt is None:
            return  # --c, but no checkpoint loads: pretraining starts from scratch (logged)
        meta = ckpt.get("bsf_metadata", {})
        if int(meta.get("stage", 1)) >= 2 and self.bsf_stage < 2:
            self._enter_stage2(meta.get("parent"))
        self._module.load_state_dict(ckpt["network_weights"])
        self.optimizer.load_state_dict(ckpt["optimizer_state"])
        self.current_epoch = int(ckpt["current_epoch"])
        self.global_step = int(ckpt.get("global_step", self.current_epoch * self.num_iterations_per_epoch))
        self._best_ema = ckpt.get("_best_ema")
        self._take_partial_epoch(ckpt.get("logging"))  # a stop in the middle of an epoch: its finished steps
        for k, v in ckpt.get("logging", {}).items():
            self.logger.local_logger.my_fantastic_logging[k] = list(v)
        self.bsf_stage = meta.get("stage", self.bsf_stage)
        self.bsf_parent = meta.get("parent", self.bsf_parent)
        if "rng" in ckpt:
            torch.set_rng_state(ckpt["rng"]["torch"])
            if ckpt["rng"].get("python"):
                random.setstate((3, tuple(int(x) for x in ckpt["rng"]["python"]), None))

    def on_train_end(self):
        self.current_epoch -= 1
        self.save_checkpoint(os.path.join(self.output_folder, "checkpoint_final.pth"))
        self.current_epoch += 1
        latest = os.path.join(self.output_folder, "checkpoint_latest.pth")
        if self.local_rank == 0 and os.path.isfile(latest):
            os.remove(latest)
        if self.local_rank == 0:
            remove_stale_temporaries(self.output_folder, "checkpoint_")
        self.print_to_log_file("Pretraining done.")
