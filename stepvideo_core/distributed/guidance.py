"""The guidance split and the sampler: the guided velocity on every rank, with the conditional and the
unconditional branch on different ranks when the plan says so, and ``pipeline.sample_latents`` over the ranks."""

from __future__ import annotations

import torch
import torch.distributed as dist

from ..dit import StepVideoDiT
from ..image_condition import ImageCondition
from ..pipeline import GenerationSettings, check_sampling_inputs, latent_shape, sampling_oom_advice
from ..scheduler import StepCallback, denoise_sigmas, guidance_on, make_noise, sample_euler
from ..text_encoding import TextConditioning
from .plan import ParallelContext, ParallelError
from .sequence import branch_forward


def parallel_velocity(dit: StepVideoDiT, ctx: ParallelContext, positive: TextConditioning,
                      negative: TextConditioning | None, cfg: float, image: ImageCondition | None = None,
                      transformer_options: dict | None = None):
    """A ``VelocityFn`` that gives the guided velocity on every rank; with guidance parallel this rank runs
    only its own branch (positive on guidance rank 0, negative on 1) and the branches are exchanged. An image
    condition (TI2V) goes to both branches and ``transformer_options`` to every call with ``"sigmas"`` set,
    as in ``pipeline.dit_velocity``."""
    guided = guidance_on(cfg, negative is not None)
    if ctx.plan.guidance == 2 and not guided:
        raise ParallelError("the plan splits guidance over ranks but sampling is unguided; choose the plan with "
                            "guided=False")
    if ctx.plan.guidance == 2:
        text = positive if ctx.guidance_rank == 0 else negative
    else:
        text = TextConditioning.cat([positive, negative]) if guided else positive
    text = text.to(device=ctx.device)
    if image is not None:
        image = ImageCondition(image.latents.to(ctx.device), image.motion_score)

    def call(x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int, int]]:
        options = None if transformer_options is None else {**transformer_options, "sigmas": 1 - t}
        return branch_forward(dit, ctx, x, t, text, image, options)

    def fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        x, t = x.to(ctx.device), t.to(ctx.device)
        if guided and ctx.plan.guidance == 1:
            out, grid = call(torch.cat([x, x]), torch.cat([t, t]))
            v_cond, v_uncond = dit.unpatchify(out, grid).float().chunk(2)
            return v_uncond + cfg * (v_cond - v_uncond)
        out, grid = call(x, t)
        v = dit.unpatchify(out, grid).float()
        if ctx.plan.guidance == 1:
            return v
        both = [torch.empty_like(v) for _ in range(2)]
        dist.all_gather(both, v.contiguous(), group=ctx.guidance_group)
        v_cond, v_uncond = both
        return v_uncond + cfg * (v_cond - v_uncond)

    return fn


def sample_latents(dit: StepVideoDiT, ctx: ParallelContext, positive: TextConditioning,
                   negative: TextConditioning | None, settings: GenerationSettings,
                   latents: torch.Tensor | None = None, callback: StepCallback | None = None,
                   noise: torch.Tensor | None = None, image: ImageCondition | None = None,
                   transformer_options: dict | None = None) -> torch.Tensor:
    """``pipeline.sample_latents`` split over the ranks, with the same arguments: the same seeded noise and
    schedule everywhere, the same fp32 latents ``[b, F, C, h, w]`` returned on every rank. ``latents`` and
    ``noise``, when given, must be the same on every rank; ``transformer_options`` (e.g. a step cache's, one per
    rank) gets the schedule as the pipeline sets it."""
    check_sampling_inputs(dit, positive, negative, settings, latents, image)
    shape = latent_shape(settings, dit.config.in_channels, positive.mask.shape[0]) if latents is None else latents.shape
    noise = make_noise(shape, settings.seed) if noise is None else noise
    guided = guidance_on(settings.cfg, negative is not None)
    sigmas = denoise_sigmas(settings.steps, settings.shift, settings.denoise)
    if transformer_options is not None:
        transformer_options = {**transformer_options, "sample_sigmas": 1 - sigmas}
    velocity = parallel_velocity(dit, ctx, positive, negative if guided else None, settings.cfg, image,
                                 transformer_options)
    return sample_euler(velocity, noise.to(ctx.device), sigmas,
                        latents=None if latents is None else latents.to(ctx.device), callback=callback,
                        compute_dtype=dit.compute_dtype, oom_advice=sampling_oom_advice(dit, tuple(shape)))
