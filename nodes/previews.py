"""Live previews: the latent -> RGB tables ComfyUI's previewer uses for Step-Video latents."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..stepvideo_core.tiny import model as tiny

# Step-Video-Tiny's latent -> RGB table (``latent_rgb_factors`` rows, one per channel, and the bias), fitted with
# fit_preview_rgb on clips of its training world encoded and decoded by its VAE. tests/test_nodes_no_comfy.py refits
# it from the shipped weights and prints a new table when they change.
TINY_PREVIEW_RGB: tuple[list[list[float]], list[float]] = (
    [[0.2085, 0.1813, 0.1109],
    [-0.0098, -0.091, -0.094],
    [0.1522, 0.1085, 0.0538],
    [-0.0358, -0.0384, -0.0713],
    [-0.0596, -0.1474, -0.1428],
    [-0.0757, -0.0817, -0.0423],
    [0.0543, 0.1339, 0.1546],
    [0.1484, 0.1133, 0.0812],
    [-0.1207, -0.1475, -0.1595],
    [0.1787, 0.1496, 0.0742],
    [0.1926, 0.1152, -0.0378],
    [-0.0319, -0.0196, -0.0482],
    [-0.0715, -0.0314, 0.0209],
    [-0.1183, -0.036, 0.0724],
    [0.0453, -0.0173, -0.0895],
    [-0.0065, 0.0113, 0.0014]],
    [0.0815, -0.0984, 0.0009]
)


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
