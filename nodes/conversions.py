"""Conversions between ComfyUI's conventions and the core's (no ComfyUI import, so CI tests them).

ComfyUI conventions bridged here:
- latents are ``[B, C, T, H, W]`` in ComfyUI and ``[B, T, C, H, W]`` in the core;
- ComfyUI's flow (CONST) sampling uses ``x = (1 - sigma) * x0 + sigma * noise`` with sigma 1 -> 0 and expects the
  model to return ``noise - x0``; the core uses ``s = 1 - sigma`` (0 = noise) and predicts ``x0 - noise``. So the
  DiT is called at ``t = 1 - sigma`` and its velocity is negated;
- IMAGE is ``[N, H, W, 3]`` in [0, 1]; the core's video is ``[b, T, 3, H, W]`` in [-1, 1].
"""

from __future__ import annotations

import torch

from ..stepvideo_core.image_condition import ImageCondition
from ..stepvideo_core.scheduler import denoise_sigmas, make_noise
from ..stepvideo_core.text_encoding import TextConditioning
from ..stepvideo_core.tiny import model as tiny

# Channels of StepVideoEmptyLatent's (all-zero) latent: the 30B model's. Samplers resize an empty latent to the
# model's own count (Step-Video-Tiny: 16), as ComfyUI's KSampler does, so one empty-latent node serves both.
LATENT_CHANNELS = 64
MASK_KEY = "stepvideo_mask"  # keys of our extra tensors in a CONDITIONING entry's dict
CLIP_KEY = "stepvideo_clip"
IMAGE_LATENTS_KEY = "stepvideo_image_latents"  # TI2V: the start image's condition latents [1, C, T, h, w]
MOTION_SCORE_KEY = "stepvideo_motion_score"  # TI2V: the motion score as a tensor [1]


def comfy_sigmas(steps: int, shift: float, denoise: float = 1.0) -> torch.Tensor:
    """ComfyUI sigmas (1 = noise -> 0 = data) of the reference schedule: ``1 - denoise_sigmas``."""
    return 1.0 - denoise_sigmas(int(steps), float(shift), float(denoise))


def noise_for(latent: torch.Tensor, seed: int) -> torch.Tensor:
    """Seeded noise for a ComfyUI latent ``[B, C, T, H, W]``, drawn in the core's layout so a seed gives the same
    video as the core pipeline (``stepvideo_core.pipeline.sample_latents``) and the demo CLI."""
    ours = make_noise(tuple(to_core_latent(latent).shape), seed)
    return to_comfy_latent(ours)


# ---- layouts ----------------------------------------------------------------------------------------------


def to_core_latent(samples: torch.Tensor) -> torch.Tensor:
    """ComfyUI ``[B, C, T, H, W]`` -> core ``[B, T, C, H, W]``."""
    if samples.ndim != 5:
        raise ValueError(f"Step-Video latents are 5-D [batch, channels, frames, height, width]; got shape "
                         f"{tuple(samples.shape)}. Use StepVideoEmptyLatent or StepVideoVAEEncode to make them.")
    return samples.movedim(1, 2)


def check_latent_channels(samples: torch.Tensor, expected: int, consumer: str) -> None:
    """A ComfyUI latent ``[B, C, T, H, W]`` must have the channels of the model or VAE that takes it."""
    if samples.shape[1] != expected:
        raise ValueError(f"The latent has {samples.shape[1]} channels but {consumer} takes {expected}. Step-Video-T2V "
                         f"latents have {LATENT_CHANNELS} channels and Step-Video-Tiny's {tiny.VAE_CONFIG.z_channels}: "
                         "use the VAE and model of one family (an empty StepVideoEmptyLatent fits either when it goes "
                         "through a sampler first).")


def to_comfy_latent(latents: torch.Tensor) -> torch.Tensor:
    """Core ``[B, T, C, H, W]`` -> ComfyUI ``[B, C, T, H, W]``."""
    return latents.movedim(2, 1)


def video_to_images(video: torch.Tensor) -> torch.Tensor:
    """Core video ``[b, T, 3, H, W]`` in [-1, 1] -> IMAGE ``[b*T, H, W, 3]`` float32 in [0, 1]."""
    frames = video.float().permute(0, 1, 3, 4, 2).flatten(0, 1)
    return ((frames + 1.0) * 0.5).clamp(0.0, 1.0).contiguous()


def images_to_video(images: torch.Tensor) -> torch.Tensor:
    """IMAGE ``[N, H, W, C]`` in [0, 1] -> core video ``[1, N, 3, H, W]`` in [-1, 1] (alpha dropped)."""
    if images.ndim != 4:
        raise ValueError(f"expected IMAGE frames [N, H, W, 3], got shape {tuple(images.shape)}")
    rgb = images[..., :3].float()
    return (rgb * 2.0 - 1.0).permute(0, 3, 1, 2).unsqueeze(0).contiguous()


# ---- conditioning --------------------------------------------------------------------------------------------


def to_conditioning(text: TextConditioning) -> list:
    """Core conditioning -> ComfyUI CONDITIONING: Step-LLM states as the cross-attention tensor, mask and CLIP
    states as extra keys (the model's ``extra_conds`` forwards them). All fixed length, so cond and uncond batch."""
    return [[text.llm_states, {MASK_KEY: text.mask, CLIP_KEY: text.clip_states}]]


def from_conditioning(cond: list) -> TextConditioning:
    """First entry of a CONDITIONING made by StepVideoTextEncode back into core conditioning."""
    if not cond:
        raise ValueError("empty CONDITIONING")
    states, extra = cond[0][0], cond[0][1]
    if MASK_KEY not in extra or CLIP_KEY not in extra:
        raise ValueError("this CONDITIONING was not made by StepVideoTextEncode (no Step-Video mask / CLIP states)")
    return TextConditioning(states, extra[MASK_KEY], extra[CLIP_KEY])


def image_condition_values(condition: ImageCondition) -> dict[str, torch.Tensor]:
    """The TI2V condition as CONDITIONING values (ComfyUI layout, batch 1: the model repeats them to the batch, and
    the positive and negative entries carry the same ones, as the reference gives both guidance branches)."""
    return {IMAGE_LATENTS_KEY: to_comfy_latent(condition.latents[:1]).contiguous(),
            MOTION_SCORE_KEY: torch.tensor([float(condition.motion_score)])}


# ---- LoRA -------------------------------------------------------------------------------------------------------


def lora_patch_keys(pairs: dict) -> dict[str, tuple]:
    """``{model state-dict key: (up, down)}`` for ComfyUI patches on a BaseModel (``diffusion_model.`` prefix)."""
    return {f"diffusion_model.{name}.weight": (pair.up, pair.down) for name, pair in pairs.items()}
