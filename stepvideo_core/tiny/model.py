"""Step-Video-Tiny: the official architecture at small sizes, trained by ``tiny.train`` on the synthetic world.

The weights ship with the pack in the official download's layout (``transformer/``, ``vae/vae_v2.safetensors``,
``step_llm/``, ``hunyuan_clip/``), so the same loaders that read the 30B release read them. Its latents have
16 channels instead of 64 (the VAE's 2048-wide latent convolutions alone would outgrow the size budget).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import torch

from ..dit import DiTConfig, StepVideoDiT, load_dit
from ..pipeline import GenerationSettings
from ..step_llm import StepLLMConfig
from ..text_encoding import TextEncoders, load_text_encoders
from ..vae import VAEConfig, VideoVAE, load_vae

NAME = "step-video-tiny"


def builtin_models() -> Path:
    """The folder of the built-in models: the pack's ``models/`` in a checkout (where ComfyUI finds them), else the
    copy that ``pip install .`` puts beside the package (``stepvideo_core/builtin_models``, see pyproject.toml)."""
    checkout = Path(__file__).resolve().parents[2] / "models"
    return checkout if (checkout / NAME).is_dir() else Path(__file__).resolve().parents[1] / "builtin_models"


TINY_DIR = builtin_models() / NAME
# Image to video: only the DiT differs (fine-tuned by ``tiny.ti2v``); it shares the VAE and encoders in TINY_DIR.
TI2V_DIR = TINY_DIR.parent / "step-video-tiny-ti2v"

VAE_CONFIG = VAEConfig(z_channels=16, encoder_channels=8, encoder_channel_mult=(1, 2, 4, 8), encoder_num_res_blocks=1,
                       decoder_channels=8, decoder_channel_mult=(1, 2, 4, 8), decoder_num_res_blocks=1, norm_groups=2)
LLM_CONFIG = dict(hidden_size=128, num_layers=2, num_attention_heads=4, num_attention_groups=2, ffn_hidden_size=256)
CLIP_CONFIG = dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256,
                   max_position_embeddings=80, type_vocab_size=2)
DIT_CONFIG = DiTConfig(num_attention_heads=4, attention_head_dim=32, in_channels=16, out_channels=16, num_layers=6,
                       caption_channels=(128, 128))
TI2V_DIT_CONFIG = replace(DIT_CONFIG, use_additional_conditions=True)
# What the tiny model was trained for: 128x128, 17 frames, and the scheduler's "tiny" preset.
SETTINGS = GenerationSettings.from_preset("tiny", num_frames=17, height=128, width=128)


def llm_config(vocab_size: int) -> StepLLMConfig:
    return StepLLMConfig(vocab_size=vocab_size, **LLM_CONFIG)


@dataclass
class TinyModel:
    dit: StepVideoDiT
    vae: VideoVAE
    text: TextEncoders


def paths(root: str | Path = TINY_DIR) -> dict[str, Path]:
    root = Path(root)
    return {"transformer": root / "transformer", "vae": root / "vae" / "vae_v2.safetensors",
            "step_llm": root / "step_llm", "hunyuan_clip": root / "hunyuan_clip"}


def load_tiny(root: str | Path = TINY_DIR, device: torch.device | str = "cpu") -> TinyModel:
    """Load the shipped (or a freshly trained) Step-Video-Tiny in fp32."""
    p = paths(root)
    if not p["transformer"].exists():
        raise FileNotFoundError(f"Step-Video-Tiny weights not found in {root}; train them with "
                                "`python -m stepvideo_core.tiny.train` or restore models/step-video-tiny from git.")
    return TinyModel(load_dit(p["transformer"], weight_dtype=torch.float32, device=device),
                     load_vae(p["vae"], dtype=torch.float32, device=device),
                     load_text_encoders(p["step_llm"], p["hunyuan_clip"], weight_dtype=torch.float32, device=device))


def load_tiny_ti2v(root: str | Path = TI2V_DIR, shared: str | Path = TINY_DIR,
                   device: torch.device | str = "cpu") -> TinyModel:
    """Step-Video-Tiny TI2V in fp32: its DiT from ``root``, the VAE and text encoders it shares from ``shared``."""
    transformer = Path(root) / "transformer"
    if not transformer.exists():
        raise FileNotFoundError(f"Step-Video-Tiny TI2V weights not found in {root}; train them with "
                                "`python -m stepvideo_core.tiny.ti2v` or restore models/step-video-tiny-ti2v from git.")
    base = load_tiny(shared, device=device)
    return TinyModel(load_dit(transformer, weight_dtype=torch.float32, device=device), base.vae, base.text)
