"""Step-Video-T2V in plain PyTorch: DiT, Video-VAE, text encoders, sampler. Imports nothing from ComfyUI."""

__version__ = "0.1.0"
