"""The Video-VAE's tiled decode on CUDA against its untiled decode: the official widths with random weights, one
17-frame chunk at 544x992, bf16 (how the pack decodes on a GPU), tiles of 16 latents overlapping by 4 (the node's
default). Both peaks are recorded beside the memory plan's.

Seam tolerance: a tile sees only its own neighbourhood (the mid-level attention included), so tiled and untiled
differ by design. The CPU test (tests/test_vae.py) holds 4-latent tiles, the worst case, to 28 dB and every pixel
to a quarter of the value range; bench/bench_vae.py measured 40.9-42.1 dB for 8- and 18-latent tiles. Here, at 16
latents: at least 32 dB, and no pixel off by more than a quarter of the range (a seam is a stripe of such pixels).
"""

from __future__ import annotations

import torch

from stepvideo_core import memory
from stepvideo_core.vae import VAEConfig, VideoVAE
from tests.gpu.helpers import CUDA_ONLY, materialise, psnr

pytestmark = CUDA_ONLY

TILE, OVERLAP = 16, 4
MIN_PSNR_DB = 32.0


def peak_of(fn) -> tuple[torch.Tensor, int]:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = fn()
    torch.cuda.synchronize()
    return out, torch.cuda.max_memory_allocated() - base


@torch.no_grad()
def test_tiled_decode_equals_untiled_within_the_seam_tolerance(figures):
    config = VAEConfig()
    with torch.device("meta"):
        vae = VideoVAE(config, dtype=torch.bfloat16)
    materialise(vae, torch.device("cuda"), torch.bfloat16, torch.bfloat16)
    g = torch.Generator(device="cuda").manual_seed(2)
    z = torch.randn(1, 3, config.z_channels, 34, 62, generator=g, device="cuda", dtype=torch.bfloat16)
    vae.decode(z[..., :4, :4])  # kernel choice first, so neither measured call pays for it
    untiled, untiled_peak = peak_of(lambda: vae.decode(z))
    tiled, tiled_peak = peak_of(lambda: vae.decode(z, tile_size=TILE, tile_overlap=OVERLAP))
    value = psnr(tiled.float(), untiled.float())
    value_range = float(untiled.float().max() - untiled.float().min())
    worst = float((tiled.float() - untiled.float()).abs().max())
    figures.update(psnr_db=value, max_abs_over_range=worst / value_range, min_psnr_db=MIN_PSNR_DB,
                   untiled_peak_bytes=untiled_peak, tiled_peak_bytes=tiled_peak,
                   untiled_predicted_bytes=memory.vae_decode_bytes(config, 1, 3, 34, 62, torch.bfloat16),
                   tiled_predicted_bytes=memory.vae_decode_bytes(config, 1, 3, 34, 62, torch.bfloat16, TILE),
                   frames=tiled.shape[1], height=tiled.shape[-2], width=tiled.shape[-1])
    assert tiled.shape == untiled.shape == (1, 17, 3, 544, 992)
    assert torch.isfinite(untiled).all() and torch.isfinite(tiled).all()
    assert value >= MIN_PSNR_DB, value
    assert worst < 0.25 * value_range, worst / value_range
    assert tiled_peak < untiled_peak, "tiles exist to bound memory"
