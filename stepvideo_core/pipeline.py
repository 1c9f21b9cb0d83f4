"""Text (and image) to video with the core models: conditioning -> guided flow-matching sampling -> VAE decode."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .dit import StepVideoDiT
from .image_condition import ImageCondition
from .ops import FP8_DTYPES
from .scheduler import (
    DEFAULT_PRESET,
    DEFAULT_SEED,
    PRESETS,
    StepCallback,
    VelocityFn,
    check_finite,
    check_settings,
    denoise_sigmas,
    guidance_on,
    guided_velocity,
    make_noise,
    preset,
    sample_euler,
)
from .text_encoding import TextConditioning
from .video_shape import latent_grid


@dataclass
class GenerationSettings:
    """One generation's request; the defaults are the official release's (992x544, 204 frames, standard preset),
    and the one place the nodes and the CLI read the release's default size from."""

    num_frames: int = 204
    height: int = 544
    width: int = 992
    steps: int = PRESETS[DEFAULT_PRESET].steps
    cfg: float = PRESETS[DEFAULT_PRESET].cfg
    shift: float = PRESETS[DEFAULT_PRESET].shift
    seed: int = DEFAULT_SEED
    denoise: float = 1.0

    @classmethod
    def from_preset(cls, name: str, **overrides) -> GenerationSettings:
        chosen = preset(name)
        return cls(**{"steps": chosen.steps, "cfg": chosen.cfg, "shift": chosen.shift, **overrides})


def latent_shape(settings: GenerationSettings, channels: int, batch: int = 1) -> tuple[int, ...]:
    """``[b, latent frames, C, H/16, W/16]``; the request is checked (and explained) by ``video_shape``, exactly
    as the nodes check it."""
    frames, h, w = latent_grid(settings.width, settings.height, settings.num_frames, batch)
    return (batch, frames, channels, h, w)


def dit_velocity(dit: StepVideoDiT, positive: TextConditioning, negative: TextConditioning | None,
                 image: ImageCondition | None = None, transformer_options: dict | None = None) -> VelocityFn:
    """The DiT as a velocity function of fp32 latents; with a negative, calls see the batch [positive; negative].
    An image condition (TI2V) goes to every row, both guidance branches alike, as in the reference.
    ``transformer_options`` (e.g. a step cache's, see ``step_cache.py``) reaches every call, with the current noise
    level set as ComfyUI sets it: ``"sigmas"`` = 1 - t per sample."""
    text = TextConditioning.cat([positive, negative]) if negative is not None else positive
    device = next(dit.parameters()).device
    text = text.to(device=device)
    if image is not None:
        image = ImageCondition(image.latents.to(device), image.motion_score)

    def fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        rows = x.shape[0] // text.mask.shape[0]
        batch = text if rows == 1 else TextConditioning(*(v.repeat_interleave(rows, 0) for v in
                                                          (text.llm_states, text.mask, text.clip_states)))
        extra = image.dit_kwargs(x.shape[0]) if image is not None else {}
        options = None if transformer_options is None else {**transformer_options, "sigmas": 1 - t}
        return dit(x.to(device), t.to(device), **batch.dit_kwargs(), **extra, transformer_options=options).float()

    return fn


def sample_latents(
    dit: StepVideoDiT,
    positive: TextConditioning,
    negative: TextConditioning | None,
    settings: GenerationSettings,
    latents: torch.Tensor | None = None,
    callback: StepCallback | None = None,
    noise: torch.Tensor | None = None,
    image: ImageCondition | None = None,
    transformer_options: dict | None = None,
) -> torch.Tensor:
    """Sample fp32 latents ``[b, F, C, h, w]``; ``latents`` with ``settings.denoise < 1`` starts part-way.

    ``noise`` replaces the seeded draw (e.g. one seed per sample of a batch); ``image`` is the start image's
    condition for a TI2V DiT (``image_condition.image_condition``). ``transformer_options`` reaches every DiT call,
    with the schedule as ComfyUI sets it (``"sample_sigmas"`` = 1 - the reference levels). Settings and inputs
    are checked before the first step, each error naming the input."""
    check_sampling_inputs(dit, positive, negative, settings, latents, image)
    shape = latent_shape(settings, dit.config.in_channels, positive.mask.shape[0]) if latents is None else latents.shape
    noise = make_noise(shape, settings.seed) if noise is None else noise
    # The noise is drawn on the CPU (so a seed gives the same video anywhere) and sampled where the DiT is: the
    # velocity comes back on the DiT's device, and Euler steps must not mix devices.
    device = next(dit.parameters()).device
    noise = noise.to(device)
    latents = None if latents is None else latents.to(device)
    use_cfg = guidance_on(settings.cfg, negative is not None)
    sigmas = denoise_sigmas(settings.steps, settings.shift, settings.denoise)
    if transformer_options is not None:
        transformer_options = {**transformer_options, "sample_sigmas": 1 - sigmas}
    velocity = dit_velocity(dit, positive, negative if use_cfg else None, image, transformer_options)
    if use_cfg:
        velocity = guided_velocity(velocity, settings.cfg)
    return sample_euler(velocity, noise, sigmas, latents=latents, callback=callback, compute_dtype=dit.compute_dtype,
                        oom_advice=sampling_oom_advice(dit, tuple(shape)))


def check_sampling_inputs(dit: StepVideoDiT, positive: TextConditioning, negative: TextConditioning | None,
                          settings: GenerationSettings, latents: torch.Tensor | None = None,
                          image: ImageCondition | None = None) -> None:
    """Raise a ``ValueError`` naming the input unless the settings, conditioning and latents fit ``dit``; run
    before the first step so that a NaN/inf during sampling can only come from the model."""
    check_settings(settings.steps, settings.cfg, settings.shift, settings.denoise)
    for name, cond in (("positive", positive), ("negative", negative)):
        if cond is not None:
            cond.check(f"the {name} conditioning", dit.config.caption_channels)
    if latents is not None and latents.shape[2] != dit.config.in_channels:
        raise ValueError(f"the input latents have {latents.shape[2]} channels but this DiT takes "
                         f"{dit.config.in_channels}: they come from another model's VAE or empty-latent node.")
    if image is not None:
        score = torch.as_tensor(image.motion_score, dtype=torch.float32)
        if not torch.isfinite(score).all():
            raise ValueError(f"the motion score is {image.motion_score}: use a finite number (official default 5; 2 = "
                             "stable, 10 = strong camera motion, 20 = intense).")
        check_finite("the image condition's latents", image.latents)


def sampling_oom_advice(dit: StepVideoDiT, shape: tuple[int, ...]) -> str:
    """What to change when the DiT runs out of memory on latents of ``shape``, given how it is loaded."""
    tips = []
    if dit.transformer_blocks[0].attn1.wqkv.weight.dtype not in FP8_DTYPES:
        tips.append("load the DiT with weight dtype fp8_e4m3fn (half the memory of bf16)")
    if dit.compute_dtype == torch.float32:
        tips.append("compute in bf16 rather than fp32")
    if not dit.config.ff_chunk_size:
        tips.append("set ff_chunk_size (e.g. 16384) to run the feed-forward in chunks")
    tips.append("let ComfyUI offload weights (--lowvram)")
    if shape[0] > 1:
        tips.append(f"sample fewer videos at once (batch {shape[0]})")
    tips.append(f"use fewer frames ({shape[1]} latent frames now) or a smaller width/height")
    return "To fit: " + "; ".join(tips) + "."


def generate(dit, vae, positive, negative, settings: GenerationSettings, callback=None, decode_kwargs=None,
             image: ImageCondition | None = None, transformer_options: dict | None = None) -> torch.Tensor:
    """Latents sampled then decoded: video ``[b, T, 3, H, W]`` in [-1, 1]; ``image`` and ``transformer_options`` as in
    ``sample_latents``.

    Deviation: the official pipeline rounds the frame count down to a multiple of 17 (at least 1), so 16 frames
    silently gave one image; here a count that is not a multiple of 17 raises, naming the nearest valid counts."""
    latents = sample_latents(dit, positive, negative, settings, callback=callback, image=image,
                             transformer_options=transformer_options)
    vae_dtype = next(vae.parameters()).dtype
    return vae.decode(latents.to(vae_dtype), **(decode_kwargs or {})).float()
