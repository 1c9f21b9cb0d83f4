"""Live previews: the latent -> RGB tables ComfyUI's previewer uses for Step-Video latents."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..stepvideo_core.tiny import model as tiny

# Step-Video-Tiny's latent -> RGB table (``latent_rgb_factors`` rows, one per channel, and the bias), fitted with
# fit_preview_rgb on clips of its training world encoded and decoded by its VAE. tests/test_nodes_no_comfy.py refits
# it from the shipped weights and prints a new table when they change.
TINY_PREVIEW_RGB: tuple[list[list[float]], list[float]] = (
    [[-0.2817, -0.2972, -0.2401],
    [0.5745, 0.5633, 0.4831],
    [0.012, -0.0563, 0.0154],
    [-0.0386, -0.0345, -0.0272],
    [0.024, 0.0393, 0.0799],
    [-0.0832, 0.0967, 0.0943],
    [-0.0453, -0.0656, -0.0422],
    [-0.0343, 0.0055, -0.028],
    [0.0888, 0.0693, 0.1176],
    [0.0434, 0.0687, 0.0514],
    [-0.1396, -0.1475, -0.1348],
    [-0.1594, -0.2534, -0.5013],
    [-0.037, 0.0126, -0.0324],
    [0.3752, 0.3646, 0.1623],
    [-0.0409, -0.0738, -0.1576],
    [0.1382, 0.0468, 0.0534]],
    [0.0679, 0.0112, -0.0138])


def preview_rgb(channels: int) -> tuple[list[list[float]], list[float]]:
    """(``latent_rgb_factors``, ``latent_rgb_factors_bias``) for a model with ``channels`` latent channels.

    Step-Video-Tiny (16) uses its fitted table. Otherwise a fixed, seeded random projection: previews then show
    structure and motion but not true colours (the 30B VAE's table needs its 100 GB download to fit).
    """
    if channels == tiny.VAE_CONFIG.z_channels:
        return TINY_PREVIEW_RGB
    g = torch.Generator().manual_seed(64)
    return (torch.randn(channels, 3, generator=g) * 0.08).tolist(), [0.0, 0.0, 0.0]


def fit_preview_rgb(latents: torch.Tensor, video: torch.Tensor) -> tuple[list[list[float]], list[float]]:
    """Least-squares latent -> RGB map: ``latents`` ``[B, C, T, h, w]`` against the ``video`` ``[B, 3, F, H, W]``
    (in [-1, 1], the preview's range) they decode to, averaged over each latent's patch and span of frames."""
    target = F.adaptive_avg_pool3d(video.float(), latents.shape[2:])
    x = latents.float().movedim(1, -1).reshape(-1, latents.shape[1])
    y = target.movedim(1, -1).reshape(-1, 3)
    solution = torch.linalg.lstsq(torch.cat([x, torch.ones(len(x), 1)], 1), y).solution
    return solution[:-1].tolist(), solution[-1].tolist()


def preview_rgb_error(factors: list[list[float]], bias: list[float], latents: torch.Tensor, video: torch.Tensor) -> float:
    """Mean absolute error (in [-1, 1] units) of a latent -> RGB table on the data fit_preview_rgb takes."""
    target = F.adaptive_avg_pool3d(video.float(), latents.shape[2:]).movedim(1, -1)
    rgb = latents.float().movedim(1, -1) @ torch.tensor(factors) + torch.tensor(bias)
    return float((rgb - target).abs().mean())
