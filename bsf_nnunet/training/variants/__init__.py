"""Trainer variants: each a subclass of a base trainer that changes a few class attributes (size, schedule, baseline,
augmentation), in nnU-Net's idiom. ``plans/variants.json`` names which trainers build which network variant; the
bases are ``training/finetune.py`` (fine-tuning) and ``training/pretrain.py`` (self-supervised), both on
``training/base.py``.
"""
