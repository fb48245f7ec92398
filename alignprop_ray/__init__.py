"""alignprop-ray: AlignProp reward fine-tuning of diffusion models, orchestrated with Ray."""

__version__ = "0.1.0"
