"""Parity of stepvideo_core.vae with the official ``stepvideo/vae/vae.py`` (fp32, CPU, shared random weights).

Skipped unless STEPVIDEO_REFERENCE points at a Step-Video-T2V checkout. Tolerance: max|diff| <= 1e-4 x max|ref|.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from stepvideo_core.vae import VAEConfig, VideoVAE
from tests.builders import SMALL_VAE, randomize_fan_in
from tests.reference_impl import import_reference


def reference_vae(config: VAEConfig, state_dict: dict[str, torch.Tensor]):
    """The official AutoencoderKL's encode/decode around official encoder/decoder modules of ``config``'s size.

    ``AutoencoderKL.__init__`` hard-codes the official widths, so the two halves are built directly with the
    widths under test; chunking, sampling and the border mix are the reference's own methods.
    """
    ref = import_reference("vae.vae")
    ref.base_group_norm.spatial = True  # what AutoencoderKL(version=2) sets (a module-global flag)
    model = ref.AutoencoderKL.__new__(ref.AutoencoderKL)
    nn.Module.__init__(model)
    model.encoder = ref.VideoEncoder(ch=config.encoder_channels, ch_mult=config.encoder_channel_mult,
                                     num_res_blocks=config.encoder_num_res_blocks, z_channels=config.z_channels,
                                     version=2)
    model.decoder = ref.VideoDecoder(ch=config.decoder_channels, ch_mult=config.decoder_channel_mult,
                                     num_res_blocks=config.decoder_num_res_blocks - 1, z_channels=config.z_channels,
                                     version=2)
    model.frame_len, model.latent_len, model.world_size = 17, 3, 1
    # Our names are the release file's; the reference module wraps the decoder's last conv in ".conv" and
    # renames the file's keys on load the same way.
    model.load_state_dict({k.replace("decoder.conv_out.", "decoder.conv_out.conv."): v for k, v in state_dict.items()},
                          strict=True)
    return model.eval(), ref


def assert_parity(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    assert ours.shape == theirs.shape
    diff = (ours.float() - theirs.float()).abs().max().item()
    scale = theirs.float().abs().max().item()
    assert diff <= 1e-4 * scale, f"max|diff| {diff:.3g} vs max|ref| {scale:.3g}"


def run_parity(config: VAEConfig, frames: int, height: int, width: int, seed: int = 0):
    ours = randomize_fan_in(VideoVAE(config), seed).eval()
    ref_model, ref = reference_vae(config, ours.state_dict())
    g = torch.Generator().manual_seed(seed + 1)
    video = torch.rand(1, frames, 3, height, width, generator=g) * 2 - 1

    moments = ours.encode_moments(video)
    ref_moments = torch.cat([ref_model.naive_encode(c) for c in video.split(17, dim=1)], dim=1)
    assert_parity(moments, ref_moments)
    # The posterior sample with a seeded generator is the reference's draw.
    sample = ours.encode(video, generator=torch.Generator().manual_seed(3))
    ref_sample = ref.DiagonalGaussianDistribution(ref_moments).sample(generator=torch.Generator().manual_seed(3))
    assert_parity(sample, ref_sample)

    z = torch.randn(1, moments.shape[1], config.z_channels, height // 16, width // 16, generator=g)
    assert_parity(ours.decode(z), ref_model.decode(z.clone()))


def test_parity_reduced_widths_two_chunks():
    # 34 frames: two independent chunks and one blended border, in both directions.
    run_parity(SMALL_VAE, frames=34, height=16, width=32)


def test_parity_reduced_widths_partial_tail():
    # 17 + 9 frames -> 3 + 2 latents: the tail chunk is shorter than 17 frames. Other width ratios too.
    config = VAEConfig(z_channels=16, encoder_channels=32, encoder_channel_mult=(1, 2, 2, 4),
                       decoder_channels=32, decoder_channel_mult=(2, 2, 4, 4))
    run_parity(config, frames=26, height=16, width=32, seed=5)


@pytest.mark.slow
def test_parity_official_widths_small_resolution():
    run_parity(VAEConfig(), frames=17, height=32, width=32, seed=7)
