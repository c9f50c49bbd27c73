"""Self-supervised pretraining variants of :class:`~bsf_nnunet.training.pretrain.BSFPretrainTrainer`:
network sizes, the official schedule lengths, and the toy variants of the demo and the tests."""
from __future__ import annotations

from ..pretrain import BSFPretrainTrainer


class BSFPretrainTrainer_official(BSFPretrainTrainer):
    """The official schedule lengths (lab-smile/BrainSegFounder, docs/fidelity_review.md item 2): stage 1 100 000 steps
    at a constant lr 4e-4 without warm-up (the README's command passes no --lrdecay); stage 2 (from a stage-1
    checkpoint) 50 000 steps, lr 6e-6, 500 warm-up steps, then cosine decay (downstream/BraTS/ssl/launch.sh), loading
    what the official scripts load from stage 1 (the Swin layers 1-4: ``bsf_handover = "official"``), on the
    official intensity scale (``ScaleIntensityRanged(-1000..1000 -> 0..1, clip)`` of estimated raw intensities,
    inpainting noise in [0, 1]: ``bsf_ssl_intensity = "official"``; it changes the balance of the three losses,
    bench/ssl_loss_balance.py)."""

    bsf_handover = "official"  # stage 2 loads the stage-1 Swin layers 1-4 only
    bsf_ssl_intensity = "official"  # the SSL losses see the official [0, 1] scale
    bsf_lr_decay = False
    bsf_warmup_steps = 0
    bsf_recipe = dict(BSFPretrainTrainer.bsf_recipe, num_epochs=400)           # 400 x 250 = 100 000 steps
    bsf_stage2_recipe = {"initial_lr": 6e-6, "warmup_steps": 500, "num_epochs": 200, "lr_decay": True}  # 50 000


class BSFPretrainTrainer_Toy(BSFPretrainTrainer):
    """Toy encoder (as BSFTrainer_Toy) on 64^3 crops, 5 epochs of 25 iterations: minutes on a CPU."""

    bsf_variant = "toy"
    bsf_crop_size = 64
    bsf_patch_cap = 64
    bsf_warmup_fraction = 0.1
    bsf_recipe = dict(BSFPretrainTrainer.bsf_recipe, num_epochs=5, num_iterations_per_epoch=25,
                      num_val_iterations_per_epoch=2, initial_lr=1e-3, save_every=1)


class BSFPretrainTrainer_ToyFast(BSFPretrainTrainer_Toy):
    """Toy pretraining with a shorter schedule (``bsf-nnunet demo --fast``)."""

    bsf_crops_per_volume = 1
    bsf_recipe = dict(BSFPretrainTrainer_Toy.bsf_recipe, num_epochs=2, num_iterations_per_epoch=10,
                      num_val_iterations_per_epoch=1)


class BSFPretrainTrainer_DR(BSFPretrainTrainer):
    """Pretraining with label-free intensity domain randomization of the crops (as BSF_DOMAIN_RANDOMIZATION=1)."""

    bsf_domain_randomization = True


class BSFPretrainTrainer_ToyDR(BSFPretrainTrainer_Toy):
    bsf_domain_randomization = True


class BSFPretrainTrainer_ToyFastDR(BSFPretrainTrainer_ToyFast):
    bsf_domain_randomization = True


class BSFPretrainTrainer_Tiny(BSFPretrainTrainer):
    bsf_variant = "tiny"


class BSFPretrainTrainer_Big(BSFPretrainTrainer):
    bsf_variant = "big"


class BSFPretrainTrainer_Large(BSFPretrainTrainer):
    bsf_variant = "large"
