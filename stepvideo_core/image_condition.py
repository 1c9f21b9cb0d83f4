"""Image to video (Step-Video-TI2V): the start image as the DiT's condition latents.

As the official TI2V pipeline builds it: the image is scaled to cover the video size and centre-cropped to it,
encoded by the VAE alone as one latent frame, and followed by zero latent frames up to the video's length. The
same condition goes to both guidance branches, and a motion score (official default 5: 2 = stable, 10 = strong
camera motion, 20 = intense) rides along into the timestep embedding.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .vae import VideoVAE
from .video_shape import latent_grid

DEFAULT_MOTION_SCORE = 5.0
# The motion scores a request may ask for; the model was trained on 2-20, and beyond 100 a value is a typo.
MOTION_SCORE_RANGE = (0.0, 100.0)
# The official TI2V run's frame count (4.08 s at 25 fps), shorter than the T2V release's 204.
OFFICIAL_TI2V_FRAMES = 102


@dataclass
class ImageCondition:
    """What a TI2V DiT takes besides the text: ``latents`` [b, F, C, h, w] (the image's latent frame, then zeros)
    and the motion score."""

    latents: torch.Tensor
    motion_score: float = DEFAULT_MOTION_SCORE

    def dit_kwargs(self, batch: int) -> dict:
        """Keyword arguments for ``StepVideoDiT.forward`` at a DiT batch of ``batch`` rows: the condition is tiled,
        so the rows of a guided call ([samples; samples]) each get their own sample's image."""
        latents = self.latents
        if latents.shape[0] != batch:
            if batch % latents.shape[0]:
                raise ValueError(f"an image condition of batch {latents.shape[0]} cannot serve a DiT batch of {batch}")
            latents = latents.repeat(batch // latents.shape[0], 1, 1, 1, 1)
        return dict(condition_hidden_states=latents, motion_score=self.motion_score)


def resize_and_crop(image: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """``[..., 3, H, W]`` scaled (bilinear, antialiased: what torchvision's Resize does to tensors) so that it covers
    ``height`` x ``width`` with one side exact, then cropped to it around the centre (the lower-right half-pixel
    goes when the excess is odd), as the reference does."""
    h, w = image.shape[-2:]
    if width / height > w / h:  # the image is narrower than the video: fit its width, crop top and bottom
        scale = width / w
    else:
        scale = height / h
    new_h, new_w = max(height, round(h * scale)), max(width, round(w * scale))
    lead = image.shape[:-3]
    flat = image.reshape(-1, *image.shape[-3:]).float()
    if (new_h, new_w) != (h, w):
        flat = F.interpolate(flat, size=(new_h, new_w), mode="bilinear", align_corners=False, antialias=True)
    top, left = (new_h - height) // 2, (new_w - width) // 2
    return flat[..., top:top + height, left:left + width].reshape(*lead, 3, height, width)


@torch.no_grad()
def image_condition(vae: VideoVAE, image: torch.Tensor, num_frames: int, height: int, width: int, batch: int = 1,
                    motion_score: float = DEFAULT_MOTION_SCORE, sample: bool = True,
                    generator: torch.Generator | None = None) -> ImageCondition:
    """The TI2V condition for a start ``image`` [3, H, W] in [-1, 1] and a video of ``num_frames`` x ``height`` x
    ``width``: latents ``[batch, latent frames, C, height/16, width/16]`` in fp32.

    ``sample`` draws from the VAE's posterior as the reference does (seed it with ``generator``); False takes the
    posterior mean."""
    if image.ndim != 3 or image.shape[0] != 3:
        raise ValueError(f"the start image must be one RGB image [3, H, W] in [-1, 1], got shape {tuple(image.shape)}")
    frames, _, _ = latent_grid(width, height, num_frames, batch)
    fitted = resize_and_crop(image, height, width)
    first = vae.encode(fitted[None, None], sample=sample, generator=generator).float()  # [1, 1, C, h, w]
    latents = torch.zeros((batch, frames, *first.shape[2:]), dtype=torch.float32, device=first.device)
    latents[:, :1] = first
    return ImageCondition(latents, float(motion_score))
