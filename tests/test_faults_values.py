"""Fault catalogue, values: bad prompts, settings, tensors and names given to the core API.

Every test asserts the message (what was wrong, which input, what to do) and, through the ``tiny`` fixture, that
every loaded model still gives its earlier output afterwards.
"""

from __future__ import annotations

import math
import re
from dataclasses import replace

import pytest
import torch

from stepvideo_core.dit import load_dit
from stepvideo_core.lora import LoraError, attach, new_trainable_lora
from stepvideo_core.pipeline import GenerationSettings, generate, latent_shape, sample_latents
from stepvideo_core.scheduler import make_noise
from stepvideo_core.step_llm import PromptTruncatedWarning
from stepvideo_core.text_encoding import TextConditioning, encode_prompts
from stepvideo_core.tiny import model as tiny_model
from tests.fault_fixtures import tiny_fixture

# The catalogue reloads or probes the tiny model around every fault: a few minutes in all, so it runs with the
# slow set (scripts/run_tests.sh --all, as CI does).
pytestmark = pytest.mark.slow

tiny = tiny_fixture()
# Small and quick: 32x32, 17 frames (3 latent frames of 2x2), 2 steps.
SETTINGS = replace(tiny_model.SETTINGS, height=32, width=32, steps=2)


@pytest.fixture
def text(tiny):
    with torch.no_grad():
        return encode_prompts(tiny.text, "a blue square moves right", after="keep")


def sample(tiny, text, settings=SETTINGS, dit=None, **kwargs):
    with torch.no_grad():
        return sample_latents(dit or tiny.dit, *text, settings, **kwargs)


# ---- prompts ---------------------------------------------------------------------------------------------------


def test_prompt_none(tiny):
    with pytest.raises(ValueError, match="the prompt is None: give the text"):
        encode_prompts(tiny.text, None, after="keep")


@pytest.mark.parametrize("prompt", ["", "   \n\t"])
def test_prompt_empty(tiny, prompt):
    with pytest.raises(ValueError, match="the prompt is empty: describe the video"):
        encode_prompts(tiny.text, prompt, after="keep")


@pytest.mark.parametrize("prompt, code, position", [("a red\x00 circle", "U+0000", 5), ("\x1b[31mred", "U+001B", 0),
                                                    ("a cat\x7f", "U+007F", 5)])
def test_prompt_control_characters(tiny, prompt, code, position):
    with pytest.raises(ValueError,
                       match=rf"control character.*first {re.escape(code)} at position {position}.*remove them"):
        encode_prompts(tiny.text, prompt, after="keep")


def test_negative_prompt_control_characters(tiny):
    with pytest.raises(ValueError, match="the negative prompt holds 1 control character"):
        encode_prompts(tiny.text, "a cat", "blurry\x08", after="keep")


def test_prompt_of_another_type(tiny):
    with pytest.raises(ValueError, match="prompt 2 must be text, got int"):
        encode_prompts(tiny.text, ["a cat", 7], after="keep")


def test_very_long_prompt_says_it_was_truncated_and_the_limit(tiny):
    with pytest.warns(PromptTruncatedWarning, match=r"tokens dropped \(at most 318 fit\)"):
        pos, _ = encode_prompts(tiny.text, "a red circle moves left " * 200, after="keep")
    assert int(pos.mask[0].sum()) == 77 + 320, "the kept part fills the whole Step-LLM window"


# ---- frame counts and sizes: the core checks them as the nodes do (video_shape) ----------------------------------


@pytest.mark.parametrize("change, message", [
    (dict(num_frames=16), r"frames 16 must be at least 17 \(nearest valid: 17\)"),
    (dict(num_frames=0), r"frames 0 must be at least 17"),
    (dict(num_frames=18), r"frames 18 must be a multiple of 17 \(nearest valid: 17 or 34\)"),
    (dict(num_frames=10_000), r"frames 10000 must be at most 1700"),
    (dict(width=100_000), r"width 100000 must be at most 4096"),
    (dict(height=100), r"height 100 must be a multiple of 16 \(nearest valid: 96 or 112\)"),
    (dict(num_frames=17.5), r"frames 17.5 must be a whole number"),
])
def test_video_shape(tiny, text, change, message):
    with pytest.raises(ValueError, match="Step-Video video shape: " + message):
        with torch.no_grad():
            generate(tiny.dit, tiny.vae, *text, replace(SETTINGS, **change))


def test_batch_past_the_limit(tiny):
    with pytest.raises(ValueError, match=r"batch_size 100 must be at most 64 \(nearest valid: 64\)\.$"):
        latent_shape(SETTINGS, 16, batch=100)


# ---- sampler settings --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("field, value, message", [
    ("steps", 0, "steps 0 is out of range: use a whole number from 1 to 1000"),
    ("steps", 2.5, "steps must be a whole number from 1 to 1000, got 2.5"),
    ("steps", 100_000, "steps 100000 is out of range"),
    ("cfg", math.nan, r"cfg \(guidance scale\) is nan: it must be a number from 0 to 100. A NaN/inf setting"),
    ("cfg", -1.0, r"cfg \(guidance scale\) -1 is out of range"),
    ("shift", 0.0, "shift 0 is out of range: use a number from 0.01 to 100"),
    ("shift", math.inf, "shift is inf"),
    ("denoise", 0.0, "denoise 0 would run no step"),
    ("denoise", 1.5, "denoise 1.5 is out of range: use a number from 0.01 to 1"),
    ("denoise", math.nan, "denoise is nan"),
])
def test_sampler_setting(tiny, text, field, value, message):
    with pytest.raises(ValueError, match=message):
        sample(tiny, text, replace(SETTINGS, **{field: value}))


def test_unknown_preset_lists_the_presets():
    with pytest.raises(ValueError, match=r"unknown sampler preset 'fast'; the presets are: standard \(50 steps"):
        GenerationSettings.from_preset("fast")


def test_tiny_preset_named_in_the_readme_exists():
    settings = GenerationSettings.from_preset("tiny", num_frames=17)
    assert (settings.steps, settings.cfg, settings.shift) == (20, 5.0, 3.0) == (
        tiny_model.SETTINGS.steps, tiny_model.SETTINGS.cfg, tiny_model.SETTINGS.shift)


# ---- NaN / inf: the message names the input ----------------------------------------------------------------------


def test_nan_starting_latents(tiny, text):
    latents = torch.zeros(1, 3, 16, 2, 2)
    latents[0, 1, 2, 1, 0] = math.nan
    with pytest.raises(ValueError, match=r"the input latents holds 1 NaN/inf value\(s\) \(first at index "
                                         r"\(0, 1, 2, 1, 0\)") as e:
        sample(tiny, text, replace(SETTINGS, denoise=0.5), latents=latents)
    assert "fp16" not in str(e.value)


def test_inf_noise(tiny, text):
    noise = make_noise((1, 3, 16, 2, 2), 0)
    noise[0, 0, 0, 0, 0] = math.inf
    with pytest.raises(ValueError, match="the starting noise holds 1 NaN/inf"):
        sample(tiny, text, noise=noise)


def test_nan_conditioning(tiny, text):
    pos, neg = text
    bad = TextConditioning(pos.llm_states.clone(), pos.mask, pos.clip_states)
    bad.llm_states[0, 5, 7] = math.nan
    with pytest.raises(ValueError, match=r"the positive conditioning \(Step-LLM states\) holds 1 NaN/inf"):
        sample(tiny, (bad, neg))


def test_nan_lora_strength(tiny):
    lora = new_trainable_lora(tiny.dit, rank=2)
    with pytest.raises(LoraError, match="LoRA strength nan is not a finite number; use e.g. 1.0"):
        attach(tiny.dit, lora, math.nan)
    attached = attach(tiny.dit, lora, 1.0)
    try:
        with pytest.raises(LoraError, match="LoRA strength inf is not a finite number"):
            attached.set_strength(math.inf)
    finally:
        attached.detach()


def _poison_block(dit, value):
    """A hook making one block's output NaN/inf, as an overflowing or damaged layer would."""
    def hook(module, inputs, output):
        return output * value
    return dit.transformer_blocks[1].register_forward_hook(hook)


def test_model_nan_in_fp32_blames_the_weights_not_fp16(tiny, text):
    handle = _poison_block(tiny.dit, math.nan)
    try:
        with pytest.raises(FloatingPointError, match="at step 1/2 from finite inputs while computing in float32: its "
                                                     "weights .* damaged") as e:
            sample(tiny, text)
    finally:
        handle.remove()
    assert "fp16" not in str(e.value)


def test_model_overflow_in_fp16_says_fp16_overflow(tiny, text):
    dit16 = load_dit(tiny_model.paths()["transformer"], weight_dtype=torch.float16)
    handle = _poison_block(dit16, math.inf)
    with pytest.raises(FloatingPointError, match="computing in float16: this is fp16 overflow. Use bf16 or fp32"):
        with torch.no_grad():
            sample_latents(dit16, *text, SETTINGS)
    handle.remove()


# ---- tensors from the wrong place --------------------------------------------------------------------------------


def test_conditioning_from_another_models_text_encoders(tiny, text):
    pos, neg = text
    wide = TextConditioning(torch.zeros(1, 320, 6144), pos.mask, torch.zeros(1, 77, 1024))
    with pytest.raises(ValueError, match=r"the positive conditioning: its Step-LLM states have shape \(1, 320, 6144\) "
                                         "but this DiT takes 128 channels; encode the prompt with the text encoders"):
        sample(tiny, (wide, neg))


def test_latents_from_another_vae(tiny, text):
    with pytest.raises(ValueError, match="the input latents have 64 channels but this DiT takes 16"):
        sample(tiny, text, replace(SETTINGS, denoise=0.5), latents=torch.zeros(1, 3, 64, 2, 2))


def test_nan_latent_decodes_to_an_error_naming_frame_and_position(tiny):
    latents = torch.zeros(1, 3, 16, 2, 2)
    latents[0, 2, 5, 1, 0] = math.inf
    with pytest.raises(ValueError, match="The latents to decode hold 1 NaN/inf value\\(s\\), the first at video 0, "
                                         "latent frame 2, channel 5, row 1, column 0.*decode to black frames"):
        tiny.vae.decode(latents)


def test_nan_video_frame_to_encode(tiny):
    video = torch.zeros(1, 17, 3, 32, 32)
    video[0, 9, 1, 10, 20] = math.nan
    with pytest.raises(ValueError, match="The video to encode holds 1 NaN/inf value\\(s\\), the first at video 0, "
                                         "frame 9, colour channel 1, row 10, column 20"):
        tiny.vae.encode(video)


def test_vae_nan_output_names_the_latent_frames(tiny):
    handle = tiny.vae.decoder.register_forward_hook(lambda module, inputs, output: output * math.nan)
    try:
        with pytest.raises(FloatingPointError, match="NaN/inf decoding latent frames 0-2 from finite inputs while "
                                                     "computing in float32: its weights"):
            tiny.vae.decode(torch.zeros(1, 3, 16, 2, 2))
    finally:
        handle.remove()


@pytest.mark.parametrize("tile_size, overlap", [(0, 0), (4, 3)])
def test_bad_tile_settings(tiny, tile_size, overlap):
    with pytest.raises(ValueError, match="need tiles >= 1 latent and an overlap of at most half a tile"):
        tiny.vae.decode(torch.zeros(1, 3, 16, 2, 2), tile_size=tile_size, tile_overlap=overlap)


def test_unknown_after_choice(tiny):
    with pytest.raises(ValueError, match="after must be 'keep', 'offload' or 'release', not 'drop'"):
        encode_prompts(tiny.text, "a cat", after="drop")


def test_fp8_compute_dtype(tiny):
    with pytest.raises(ValueError, match="fp8 is a storage dtype; compute in bfloat16 or float16"):
        load_dit(tiny_model.paths()["transformer"], weight_dtype=torch.float8_e4m3fn,
                 compute_dtype=torch.float8_e4m3fn)


def test_generate_still_works_after_every_value_fault(tiny, text):
    """The end-to-end check after the catalogue above: a normal generation is deterministic."""
    with torch.no_grad():
        a = generate(tiny.dit, tiny.vae, *text, SETTINGS)
        b = generate(tiny.dit, tiny.vae, *text, SETTINGS)
    assert torch.equal(a, b) and torch.isfinite(a).all()


# ---- image to video (TI2V) -----------------------------------------------------------------------------------------


@pytest.fixture
def ti2v():
    from tests.builders import small_dit

    return small_dit(heads=2, head_dim=16, layers=1, channels=16, caption=(128, 128), use_additional_conditions=True)


def start_image(motion_score=5.0, shape=(1, 3, 16, 2, 2)):
    from stepvideo_core.image_condition import ImageCondition

    return ImageCondition(torch.zeros(shape), motion_score)


def test_ti2v_dit_without_its_image(tiny, text, ti2v):
    with pytest.raises(ValueError, match="this is a Step-Video-TI2V DiT .*it needs condition_hidden_states and "
                                         "motion_score: the start image's latents"):
        sample(tiny, text, dit=ti2v)


def test_t2v_dit_given_an_image(tiny, text):
    with pytest.raises(ValueError, match="this is a Step-Video-T2V DiT .*it takes no condition_hidden_states or "
                                         "motion_score. Load Step-Video-TI2V weights"):
        sample(tiny, text, image=start_image())


def test_ti2v_image_of_another_shape(tiny, text, ti2v):
    with pytest.raises(ValueError, match=r"condition_hidden_states \(\d, 3, 16, 4, 4\) must have the latents' shape "
                                         r"\(\d, 3, 16, 2, 2\) .*build it for the same frames and size"):
        sample(tiny, text, dit=ti2v, image=start_image(shape=(1, 3, 16, 4, 4)))


@pytest.mark.parametrize("score", [math.nan, math.inf])
def test_ti2v_motion_score_not_finite(tiny, text, ti2v, score):
    with pytest.raises(ValueError, match=f"the motion score is {score}: use a finite number \\(official default 5"):
        sample(tiny, text, dit=ti2v, image=start_image(score))


def test_ti2v_start_image_with_nan(tiny):
    from stepvideo_core.image_condition import image_condition

    image = torch.zeros(3, 32, 32)
    image[1, 4, 5] = math.nan
    with pytest.raises(ValueError, match="The video to encode holds 1 NaN/inf value\\(s\\), the first at video 0, "
                                         "frame 0, colour channel 1"):
        image_condition(tiny.vae, image, 17, 32, 32)
