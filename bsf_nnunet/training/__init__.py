"""nnU-Net trainers of bsf-nnunet. nnU-Net discovers them through the shims in ``trainers/``.

Which trainer builds which variant is registered in ``plans/variants.json`` (``planning.presets.variant_trainers``);
``__all__`` lists every trainer class defined here.
"""
from .bsf_trainer import (  # noqa: F401 (re-exported: __all__ below lists them)
    BSFTrainer,
    BSFTrainer_Big,
    BSFTrainer_DR,
    BSFTrainer_DR_scratch,
    BSFTrainer_freeze50,
    BSFTrainer_imported,
    BSFTrainer_Large,
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
from .pretrain_trainer import (  # noqa: F401 (re-exported: __all__ below lists them)
    BSFPretrainTrainer,
    BSFPretrainTrainer_Big,
    BSFPretrainTrainer_Large,
    BSFPretrainTrainer_official,
    BSFPretrainTrainer_Tiny,
    BSFPretrainTrainer_Toy,
    BSFPretrainTrainer_ToyFast,
)

__all__ = sorted(name for name, obj in dict(globals()).items()
                 if isinstance(obj, type) and issubclass(obj, BSFTrainer))
