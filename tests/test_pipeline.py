from dataclasses import replace

import pytest
import torch

from stepvideo_core.pipeline import GenerationSettings, dit_velocity, generate, latent_shape, sample_latents
from stepvideo_core.text_encoding import TextConditioning
from stepvideo_core.video_shape import request_error
from tests.builders import small_dit, small_vae, text_inputs

CAPTION = (24, 12)


def conditioning(valid, seed):
    llm, mask, clip = text_inputs(1, 320, CAPTION, (valid,), seed=seed)
    return TextConditioning(llm, mask, clip)


def test_guided_velocity_is_uncond_plus_scale_times_difference():
    dit = small_dit(channels=4, caption=CAPTION, layers=1)
    pos, neg = conditioning(7, 1), conditioning(3, 2)
    x = torch.randn(1, 1, 4, 2, 2)
    t = torch.tensor([0.2])
    with torch.no_grad():
        both = dit_velocity(dit, pos, neg)(torch.cat([x, x]), torch.cat([t, t]))
        alone_pos = dit(x, t, **pos.dit_kwargs())
        alone_neg = dit(x, t, **neg.dit_kwargs())
    torch.testing.assert_close(both[0], alone_pos[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(both[1], alone_neg[0], atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_sampling_is_seeded_and_prompt_dependent():
    dit = small_dit(channels=4, caption=CAPTION, layers=1)
    settings = GenerationSettings(num_frames=17, height=32, width=48, steps=3, cfg=5.0, shift=17.0, seed=11)
    assert latent_shape(settings, 4) == (1, 3, 4, 2, 3)
    pos, neg = conditioning(7, 1), conditioning(3, 2)
    with torch.no_grad():
        a = sample_latents(dit, pos, neg, settings)
        b = sample_latents(dit, pos, neg, settings)
        other_prompt = sample_latents(dit, conditioning(9, 5), neg, settings)
        settings.seed = 12
        other_seed = sample_latents(dit, pos, neg, settings)
    assert torch.equal(a, b)
    assert not torch.allclose(a, other_prompt) and not torch.allclose(a, other_seed)


@pytest.mark.slow
def test_generate_decodes_whole_chunks_of_17_frames():
    vae = small_vae()
    dit = small_dit(channels=vae.config.z_channels, caption=CAPTION, layers=1)
    settings = GenerationSettings(num_frames=34, height=32, width=32, steps=2, cfg=3.0, shift=13.0)
    with torch.no_grad():
        video = generate(dit, vae, conditioning(5, 1), conditioning(2, 2), settings)
        assert video.shape == (1, 34, 3, 32, 32)
        # Unlike the official pipeline (which rounds down: 16 frames gave one image), bad requests raise,
        # with the message the nodes give, before any sampling.
        for frames, expected in ((16, "frames 16 must be at least 17 (nearest valid: 17)"),
                                 (18, "frames 18 must be a multiple of 17 (nearest valid: 17 or 34)"),
                                 (40, "frames 40 must be a multiple of 17 (nearest valid: 34 or 51)")):
            with pytest.raises(ValueError) as err:
                generate(dit, vae, conditioning(5, 1), None, replace(settings, num_frames=frames))
            assert expected in str(err.value)
            assert str(err.value) == request_error(32, 32, frames)


def test_latent_shape_checks_the_request_as_the_nodes_do():
    assert latent_shape(GenerationSettings(), 64) == (1, 36, 64, 34, 62)  # official 992x544x204
    assert latent_shape(GenerationSettings(num_frames=17, height=128, width=96), 16, batch=2) == (2, 3, 16, 8, 6)
    for bad in (dict(height=500), dict(num_frames=0), dict(num_frames=10_000), dict(width=100_000)):
        with pytest.raises(ValueError) as err:
            latent_shape(GenerationSettings(**bad), 64)
        s = GenerationSettings(**bad)
        assert str(err.value) == request_error(s.width, s.height, s.num_frames)
