"""nnU-Net trainers of bsf-nnunet. nnU-Net discovers them through the shims in ``trainers/``."""
from .bsf_trainer import (
    BSFTrainer, BSFTrainer_Big, BSFTrainer_freeze50, BSFTrainer_Large, BSFTrainer_scratch, BSFTrainer_Tiny,
    BSFTrainer_Toy, BSFTrainer_Toy_scratch,
)
from .pretrain_trainer import (
    BSFPretrainTrainer, BSFPretrainTrainer_Big, BSFPretrainTrainer_Large, BSFPretrainTrainer_Tiny,
    BSFPretrainTrainer_Toy,
)

__all__ = ["BSFTrainer", "BSFTrainer_Big", "BSFTrainer_Large", "BSFTrainer_scratch", "BSFTrainer_Tiny",
           "BSFTrainer_Toy", "BSFTrainer_Toy_scratch", "BSFTrainer_freeze50", "BSFPretrainTrainer",
           "BSFPretrainTrainer_Tiny", "BSFPretrainTrainer_Big", "BSFPretrainTrainer_Large", "BSFPretrainTrainer_Toy"]
