"""Fine-tuning variants of :class:`~bsf_nnunet.training.finetune.BSFTrainer`: network sizes, scratch baselines
(``bsf_use_pretraining = False``), a frozen encoder, domain randomization, and the toy variants of the demo and the
tests."""
from __future__ import annotations

from ..finetune import BSFTrainer


class BSFTrainer_Tiny(BSFTrainer):
    """Depths 2-2-2-2, 62.2 M parameters."""

    bsf_variant = "tiny"


class BSFTrainer_Big(BSFTrainer):
    """Depths 2-2-18-2, 69.7 M parameters."""

    bsf_variant = "big"


class BSFTrainer_Large(BSFTrainer):
    """Feature size 96, depths 2-2-18-2, heads 4-8-16-32, ~277 M parameters."""

    bsf_variant = "large"


class BSFTrainer_Tiny_scratch(BSFTrainer_Tiny):
    """The Tiny variant (the published files' architecture, depths 2-2-2-2) from random initialisation."""

    bsf_use_pretraining = False


class BSFTrainer_scratch(BSFTrainer):
    """The Small variant trained from random initialisation: the baseline of the low-data study."""

    bsf_use_pretraining = False


class BSFTrainer_freeze50(BSFTrainer):
    """Small variant with the pretrained encoder frozen for the first 50 epochs."""

    bsf_freeze_encoder_epochs = 50


class BSFTrainer_imported(BSFTrainer):
    """Results folders written by ``bsf-nnunet import-model`` (the network is rebuilt from their plans)."""


class BSFTrainer_DR(BSFTrainer):
    """Small variant with intensity domain randomization: for data from other scanners and sites than the training
    data (docs/robustness.md)."""

    bsf_domain_randomization = True


class BSFTrainer_DR_scratch(BSFTrainer_DR):
    """BSFTrainer_DR from random initialisation (its baseline)."""

    bsf_use_pretraining = False


class BSFTrainer_Toy(BSFTrainer):
    """Feature size 12, depths 1-1-1-1: for tests, demos and quick checks (minutes on a CPU)."""

    bsf_variant = "toy"
    bsf_patch_cap = 64
    bsf_warmup_fraction = 0.2
    bsf_recipe = dict(BSFTrainer.bsf_recipe, num_epochs=5, num_iterations_per_epoch=25,
                      num_val_iterations_per_epoch=5, initial_lr=1e-3, save_every=1)


class BSFTrainer_Toy_scratch(BSFTrainer_Toy):
    """The toy variant from random initialisation (the demo's baseline)."""

    bsf_use_pretraining = False


class BSFTrainer_ToyFast(BSFTrainer_Toy):
    """Toy variant with a shorter schedule (``bsf-nnunet demo --fast``, which scores its own test cases). It skips
    the final validation after training (``--val`` runs it), and its validation and predictions skip mirroring
    test-time augmentation (8x fewer forward passes on a CPU)."""

    def configure_rotation_dummyDA_mirroring_and_inital_patch_size(self):
        out = super().configure_rotation_dummyDA_mirroring_and_inital_patch_size()
        self.inference_allowed_mirroring_axes = None  # training augmentation keeps its mirroring
        return out

    bsf_pretrain_trainer = "BSFPretrainTrainer_ToyFast"
    bsf_final_validation = False
    bsf_recipe = dict(BSFTrainer_Toy.bsf_recipe, num_epochs=3, num_iterations_per_epoch=10,
                      num_val_iterations_per_epoch=1)


class BSFTrainer_ToyFast_scratch(BSFTrainer_ToyFast):
    bsf_use_pretraining = False


class BSFTrainer_ToyDR(BSFTrainer_Toy):
    """BSFTrainer_Toy with intensity domain randomization (the demo's long profile)."""

    bsf_domain_randomization = True


class BSFTrainer_ToyDR_scratch(BSFTrainer_ToyDR):
    bsf_use_pretraining = False


class BSFTrainer_ToyFastDR(BSFTrainer_ToyFast):
    """BSFTrainer_ToyFast with intensity domain randomization (the demo's --fast profile on other sources)."""

    bsf_domain_randomization = True


class BSFTrainer_ToyFastDR_scratch(BSFTrainer_ToyFastDR):
    bsf_use_pretraining = False


class BSFTrainer_official(BSFTrainer):
    """BSFTrainer that loads what the official fine-tuning loads from the stage-2 checkpoint: the Swin layers 1-4
    only (patch embedding, decoder and output head start as initialised); chains from BSFPretrainTrainer_official."""

    bsf_handover = "official"
    bsf_pretrain_trainer = "BSFPretrainTrainer_official"
