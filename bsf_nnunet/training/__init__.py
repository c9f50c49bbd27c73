"""nnU-Net trainers of bsf-nnunet. nnU-Net discovers them through the shims in ``trainers/``.

The bases are ``finetune.BSFTrainer`` (fine-tuning) and ``pretrain.BSFPretrainTrainer`` (self-supervised stages),
both built on ``base.BSFTrainerBase`` (what they share; not a trainer to run, so ``__all__`` and nnU-Net's search
leave it out); every other trainer is a variant in ``variants/`` that changes a few class attributes. Which trainer
builds which network variant is registered in ``plans/variants.json`` (``planning.presets.variant_trainers``);
``__all__`` lists every trainer class. Importing the package applies bsf-nnunet's hooks into nnU-Net (``nnunet_hooks``).
"""
from . import nnunet_hooks
from .base import BSFTrainerBase
from .finetune import BSFTrainer  # noqa: F401 (re-exported: __all__ below lists it)
from .pretrain import BSFPretrainTrainer  # noqa: F401 (re-exported: __all__ below lists it)
from .variants.finetune import (  # noqa: F401 (re-exported: __all__ below lists them)
    BSFTrainer_Big,
    BSFTrainer_DR,
    BSFTrainer_DR_scratch,
    BSFTrainer_freeze50,
    BSFTrainer_imported,
    BSFTrainer_Large,
    BSFTrainer_official,
    BSFTrainer_scratch,
    BSFTrainer_Tiny,
    BSFTrainer_Tiny_scratch,
    BSFTrainer_Toy,
    BSFTrainer_Toy_scratch,
    BSFTrainer_ToyDR,
    BSFTrainer_ToyDR_scratch,
    BSFTrainer_ToyFast,
    BSFTrainer_ToyFast_scratch,
    BSFTrainer_ToyFastDR,
    BSFTrainer_ToyFastDR_scratch,
)
from .variants.pretrain import (  # noqa: F401 (re-exported: __all__ below lists them)
    BSFPretrainTrainer_Big,
    BSFPretrainTrainer_DR,
    BSFPretrainTrainer_Large,
    BSFPretrainTrainer_official,
    BSFPretrainTrainer_Tiny,
    BSFPretrainTrainer_Toy,
    BSFPretrainTrainer_ToyDR,
    BSFPretrainTrainer_ToyFast,
    BSFPretrainTrainer_ToyFastDR,
)

nnunet_hooks.install()

__all__ = sorted(name for name, obj in dict(globals()).items()
                 if isinstance(obj, type) and issubclass(obj, BSFTrainerBase) and obj is not BSFTrainerBase)
