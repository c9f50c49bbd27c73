"""Preset JSON files of bsf-nnunet (installed as the package ``bsf_nnunet_plans``). Read them with
``bsf_nnunet.planning.presets``."""
