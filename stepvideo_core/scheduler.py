"""Flow-matching Euler sampling in Step-Video's convention.

Step-Video runs time from noise to data: ``x_s = s * data + (1 - s) * noise`` with ``s`` going 0 -> 1, and the
network predicts the velocity ``v = data - noise``. The schedule is SD3's time shift applied to
``linspace(1, 0)`` and then mirrored (``s = 1 - shift(u)``), which packs steps densely near pure noise.
Training in the same convention (the tiny lab's DiT and its DPO LoRA) uses the loss and time draw at the end.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplerPreset:
    steps: int
    cfg: float
    shift: float


PRESETS = {
    # The official README command: 50 steps, guidance 9, time shift 13.
    "standard": SamplerPreset(steps=50, cfg=9.0, shift=13.0),
    # stepvideo-t2v-turbo (step-distilled weights): 10-15 steps, guidance 5, time shift 17.
    "turbo": SamplerPreset(steps=10, cfg=5.0, shift=17.0),
    # What the built-in Step-Video-Tiny was trained and evaluated with (a milder shift for 3 latent frames).
    "tiny": SamplerPreset(steps=20, cfg=5.0, shift=3.0),
}


def time_shift(u: torch.Tensor, shift: float) -> torch.Tensor:
    return shift * u / (1 + (shift - 1) * u)


def step_video_sigmas(num_steps: int, shift: float) -> torch.Tensor:
    """The ``num_steps + 1`` noise levels of the reference scheduler, from 0 (noise) to 1 (data), in fp32."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be at least 1, got {num_steps}")
    if shift <= 0:
        raise ValueError(f"shift must be positive, got {shift}")
    return 1 - time_shift(torch.linspace(1, 0, num_steps + 1, dtype=torch.float32), shift)


def denoise_sigmas(num_steps: int, shift: float, denoise: float = 1.0) -> torch.Tensor:
    """Sigmas for partial denoising: the last ``num_steps`` levels of a ``num_steps / denoise`` schedule."""
    if not 0 < denoise <= 1:
        raise ValueError(f"denoise must be in (0, 1], got {denoise}")
    total = max(num_steps, round(num_steps / denoise))
    return step_video_sigmas(total, shift)[-(num_steps + 1):]


def make_noise(shape, seed: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Seeded Gaussian noise drawn on the CPU in fp32, so a seed gives the same video on any device.

    Deviation: the reference draws in bf16 on the GPU from a generator it constructs itself, ignoring the
    user's seed; here the seed is honoured and the draw does not depend on the device.
    """
    generator = torch.Generator(device="cpu").manual_seed(int(seed))
    return torch.randn(shape, generator=generator, dtype=torch.float32).to(device)


# velocity_fn(x [b, ...], t [b]) -> velocity like x
VelocityFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
# callback(steps done, total steps, latents after the step, clean latents predicted at this step); it may raise
# to cancel, which stops sampling before the next model call.
StepCallback = Callable[[int, int, torch.Tensor, torch.Tensor], None]


def guided_velocity(velocity_fn: VelocityFn, cfg: float) -> VelocityFn:
    """Classifier-free guidance with one batched call: the model sees [cond; uncond]."""

    def fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if cfg == 1.0:
            return velocity_fn(x, t)
        v_cond, v_uncond = velocity_fn(torch.cat([x, x]), torch.cat([t, t])).chunk(2)
        return v_uncond + cfg * (v_cond - v_uncond)

    return fn


def sample_euler(
    velocity_fn: VelocityFn,
    noise: torch.Tensor,
    sigmas: torch.Tensor,
    latents: torch.Tensor | None = None,
    callback: StepCallback | None = None,
) -> torch.Tensor:
    """Integrate from ``sigmas[0]`` to ``sigmas[-1]`` with Euler steps in fp32.

    With ``latents`` given and ``sigmas[0] > 0`` (partial denoise) the start is ``s * latents + (1 - s) * noise``.
    """
    sigmas = sigmas.to(torch.float32)
    x = noise.float()
    if latents is not None and sigmas[0] > 0:
        x = sigmas[0] * latents.float() + (1 - sigmas[0]) * x
    total = len(sigmas) - 1
    for i in range(total):
        s, s_next = sigmas[i], sigmas[i + 1]
        t = s.expand(x.shape[0]).to(x.device)
        v = velocity_fn(x, t).float()
        if not torch.isfinite(v).all():
            raise FloatingPointError(
                f"The model produced NaN/inf at step {i + 1}/{total}. This usually means fp16 overflow: "
                "use bf16 or fp32 compute, or check the weights."
            )
        denoised = x + (1 - s) * v
        x = x + v * (s_next - s)
        if callback is not None:
            callback(i + 1, total, x, denoised)
    return x


# ---- training in the same convention --------------------------------------------------------------------------


def sample_training_times(batch: int, generator: torch.Generator, shift: float) -> torch.Tensor:
    """Times for a training batch: even rows uniform, odd rows with the sampler's shift (``1 - time_shift(u)``,
    dense near noise, where inference spends its steps)."""
    u = torch.rand(batch, generator=generator)
    shifted = 1 - time_shift(u, shift)
    return torch.where(torch.arange(batch) % 2 == 0, u, shifted)


def flow_matching_loss(model, latents: torch.Tensor, text: dict, t: torch.Tensor, noise: torch.Tensor,
                       reduce: bool = True) -> torch.Tensor:
    """Mean squared error of ``model(x_t, t, **text)`` against the velocity ``data - noise``, at
    ``x_t = t * data + (1 - t) * noise`` (t = 0 is noise). With ``reduce=False``, one error per sample."""
    tt = t.view(-1, *([1] * (latents.ndim - 1)))
    x = tt * latents + (1 - tt) * noise
    error = (model(x, t, **text) - (latents - noise)).pow(2).flatten(1).mean(1)
    return error.mean() if reduce else error
