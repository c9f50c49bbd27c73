"""nnU-Net trainers of bsf-nnunet. nnU-Net discovers them through the shims in ``trainers/``."""
from .bsf_trainer import (
    BSFTrainer, BSFTrainer_Big, BSFTrainer_freeze50, BSFTrainer_imported, BSFTrainer_Large, BSFTrainer_scratch, BSFTrainer_Tiny,
    BSFTrainer_Tiny_scratch,
    BSFTrainer_Toy, BSFTrainer_Toy_scratch, BSFTrainer_ToyFast, BSFTrainer_ToyFast_scratch,
)
from .pretrain_trainer import (
    BSFPretrainTrainer, BSFPretrainTrainer_Big, BSFPretrainTrainer_Large, BSFPretrainTrainer_Tiny,
    BSFPretrainTrainer_Toy, BSFPretrainTrainer_ToyFast,
)

__all__ = ["BSFTrainer", "BSFTrainer_Big", "BSFTrainer_Large", "BSFTrainer_scratch", "BSFTrainer_Tiny", "BSFTrainer_Tiny_scratch",
           "BSFTrainer_Toy", "BSFTrainer_Toy_scratch", "BSFTrainer_ToyFast", "BSFTrainer_ToyFast_scratch", "BSFTrainer_freeze50", "BSFTrainer_imported", "BSFPretrainTrainer",
           "BSFPretrainTrainer_Tiny", "BSFPretrainTrainer_Big", "BSFPretrainTrainer_Large", "BSFPretrainTrainer_Toy",
           "BSFPretrainTrainer_ToyFast"]
