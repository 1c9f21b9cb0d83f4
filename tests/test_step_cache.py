"""The step cache (``stepvideo_core/step_cache.py``) on a small random DiT through the core pipeline."""

import numpy as np
import pytest
import torch

from stepvideo_core.pipeline import GenerationSettings, sample_latents
from stepvideo_core.step_cache import StepCache, StepCacheSettings
from stepvideo_core.text_encoding import TextConditioning
from tests.builders import small_dit, text_inputs

SETTINGS = GenerationSettings(num_frames=17, height=32, width=48, steps=12, cfg=5.0, shift=3.0, seed=4)


def conditioning(b=1, seed=1):
    llm, mask, clip = text_inputs(b, 6, (24, 12), (4,) * b, seed=seed)
    return TextConditioning(llm, mask.bool(), clip)


def run(dit, cache=None, settings=SETTINGS):
    options = None if cache is None else cache.transformer_options(dit)
    with torch.no_grad():
        return sample_latents(dit, conditioning(), conditioning(seed=2), settings, transformer_options=options)


def test_threshold_zero_is_the_uncached_run_bit_for_bit():
    dit = small_dit(layers=3)
    cache = StepCache(StepCacheSettings(threshold=0.0))
    assert torch.equal(run(dit, cache), run(dit))
    s = cache.stats
    assert (s.forward_passes, s.computed, s.block_evaluations) == (12, 12, 36)


def test_skipped_pass_adds_the_residual_extrapolated_in_sigma():
    """Every pass after the first two is skipped (huge threshold): the blocks' output is then x + R1 + (sigma -
    s1) / (s1 - s2) * (R1 - R2), with R the blocks' residuals recorded by hand at the two last computed passes."""
    dit = small_dit(layers=2)
    cond = TextConditioning.cat([conditioning(), conditioning(seed=2)])
    cache = StepCache(StepCacheSettings(threshold=1e9, start=0.0))
    options = cache.transformer_options(dit, base={"sample_sigmas": torch.tensor([1.0, 0.8, 0.6, 0.5, 0.0])})
    residuals = {}

    def blocks_residual(call_options, sigma):
        x = torch.randn(2, 3, 4, 2, 3, generator=torch.Generator().manual_seed(int(sigma * 10)))  # latents move
        hidden, context, _, _ = dit.prepare(x, torch.full((2,), 1 - sigma), **cond.dit_kwargs())
        return hidden, dit.run_blocks(hidden, context, call_options) - hidden

    with torch.no_grad():
        for sigma in (1.0, 0.8):
            hidden, residuals[sigma] = blocks_residual({**options, "sigmas": torch.full((2,), sigma)}, sigma)
        assert cache.stats.computed == 2  # the transformation rate needs two computed passes
        _, got = blocks_residual({**options, "sigmas": torch.full((2,), 0.6)}, 0.6)
        _, uncached = blocks_residual(None, 0.6)
    r1, r2 = residuals[0.8], residuals[1.0]
    torch.testing.assert_close(got, r1 + (0.6 - 0.8) / (0.8 - 1.0) * (r1 - r2))
    assert not torch.allclose(got, uncached)
    assert cache.stats.forward_passes == 3 and cache.stats.block_evaluations == 4


def test_cached_run_skips_passes_and_stays_close():
    dit = small_dit(layers=3)
    settings = GenerationSettings(**{**SETTINGS.__dict__, "steps": 30})
    ref = run(dit, settings=settings)
    cache = StepCache(StepCacheSettings(threshold=0.5))  # random weights change more per step than trained ones
    got = run(dit, cache, settings)
    s = cache.stats
    assert s.forward_passes == 30 and 0 < s.computed < 30
    assert s.block_evaluations == 3 * s.computed
    assert f"{s.computed} of 30" in s.summary()
    assert (got - ref).abs().mean() < 0.1 * ref.abs().mean()


def test_a_new_run_and_separate_call_kinds_start_afresh():
    """Reusing the cache for a second run (or after a cancelled one) gives the same result as a fresh cache."""
    dit = small_dit(layers=2)
    cache = StepCache(StepCacheSettings(threshold=0.3))
    first = run(dit, cache)
    assert torch.equal(run(dit, cache), first)
    assert torch.equal(run(dit, StepCache(StepCacheSettings(threshold=0.3))), first)


def test_bad_settings_and_missing_schedule_are_clear_errors():
    with pytest.raises(ValueError, match="start/end"):
        StepCacheSettings(threshold=0.2, start=0.5, end=0.4)
    with pytest.raises(ValueError, match=">= 0"):
        StepCacheSettings(threshold=-1)
    dit = small_dit(layers=1)
    cache = StepCache()
    llm, mask, clip = text_inputs(1, 6, (24, 12), (4,))
    with pytest.raises(ValueError, match="sample_sigmas"):
        dit(torch.randn(1, 3, 4, 2, 3), torch.tensor([0.5]), llm, mask, clip,
            transformer_options={**cache.transformer_options(dit), "sigmas": torch.tensor([0.5])})


@pytest.mark.slow  # ~25 s: 50 guided steps of the tiny model for 6 prompts, with and without the cache
def test_the_default_threshold_keeps_a_trained_models_video_and_what_the_oracle_reads():
    # The default was 0.3 until the tiny model learnt motion; on the trained model 0.3 kept 23 dB of the video and
    # lost half its motion, which is what this guards against: what the oracle reads must not change. Same prompts
    # and preset as the step-cache table of docs/speed-and-caching.md, which runs them through ComfyUI's sampler;
    # here the core pipeline samples them. Measured on the DiT of phase 13 (CPU, fp32): 2.63x fewer block
    # evaluations, 28.0 dB over the six clips (23.8-51.8 dB each), every read kept; on phase 10's DiT 2.50x, 36.8 dB.
    from stepvideo_core.tiny import evaluate, oracle
    from stepvideo_core.tiny import model as tiny
    from stepvideo_core.tiny.ti2v import psnr

    model = tiny.load_tiny()
    prompts = evaluate.held_out_prompts(("en",))[:6]
    settings = GenerationSettings.from_preset("standard", num_frames=17, height=128, width=128)
    cache = StepCache(StepCacheSettings())
    with torch.no_grad():
        _, plain = evaluate.sample_clips(model, [p.text for p in prompts], 0, settings)
        _, cached = evaluate.sample_clips(model, [p.text for p in prompts], 0, settings,
                                          transformer_options=cache.transformer_options(model.dit))
    assert cache.stats.forward_passes >= 2 * cache.stats.computed, cache.stats.summary()  # measured: 2.5x
    assert psnr(np.stack(plain), np.stack(cached)) > 25

    def checks(clip, prompt):
        score = oracle.score(clip, prompt.target)
        return score.colour, score.shape, score.motion

    for prompt, a, b in zip(prompts, plain, cached):
        assert checks(a, prompt) == checks(b, prompt), prompt
