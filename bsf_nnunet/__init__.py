"""bsf-nnunet: BrainSegFounder (Swin-UNETR foundation model for brain MRI) inside nnU-Net v2."""

__version__ = "0.1.0"
