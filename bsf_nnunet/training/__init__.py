"""nnU-Net trainers of bsf-nnunet. nnU-Net discovers them through the shims in ``trainers/``."""
from .bsf_trainer import (
    BSFTrainer, BSFTrainer_Big, BSFTrainer_Large, BSFTrainer_scratch, BSFTrainer_Tiny, BSFTrainer_Toy,
)

__all__ = ["BSFTrainer", "BSFTrainer_Big", "BSFTrainer_Large", "BSFTrainer_scratch", "BSFTrainer_Tiny",
           "BSFTrainer_Toy"]
