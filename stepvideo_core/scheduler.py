"""Flow-matching Euler sampling in Step-Video's convention.

Step-Video runs time from noise to data: ``x_s = s * data + (1 - s) * noise`` with ``s`` going 0 -> 1, and the
network predicts the velocity ``v = data - noise``. The schedule is SD3's time shift applied to
``linspace(1, 0)`` and then mirrored (``s = 1 - shift(u)``), which packs steps densely near pure noise.
Training in the same convention (the tiny lab's DiT and its DPO LoRA) uses the loss and time draw at the end.
"""

from __future__ import annotations

import math
import numbers
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

# The preset a request gets when it names none (the official README command's settings).
DEFAULT_PRESET = "standard"
# Accepted ranges of the sampler settings (the nodes' widgets use the same): beyond them a value is a typo.
STEPS_RANGE = (1, 1000)
CFG_RANGE = (0.0, 100.0)
SHIFT_RANGE = (0.01, 100.0)
# Partial denoise runs the last fraction of a longer schedule: 0 would run no step, so the lowest accepted value is
# the widgets' first step above it.
DENOISE_RANGE = (0.01, 1.0)
# Seeds: any unsigned 64-bit integer (ComfyUI's seed widgets), 0 when none is given (CLI, nodes, pipeline).
DEFAULT_SEED = 0
SEED_RANGE = (0, 0xFFFFFFFFFFFFFFFF)


def preset(name: str) -> SamplerPreset:
    """The named preset; an unknown name raises a ``ValueError`` listing the known ones."""
    try:
        return PRESETS[name]
    except (KeyError, TypeError):
        known = ", ".join(f"{n} ({p.steps} steps, cfg {p.cfg:g}, shift {p.shift:g})" for n, p in PRESETS.items())
        raise ValueError(f"unknown sampler preset {name!r}; the presets are: {known}.") from None


def _check_number(name: str, value, low: float, high: float, whole: bool = False) -> None:
    """A ``ValueError`` naming the input unless ``value`` is a finite number in ``[low, high]``."""
    kind = "a whole number" if whole else "a number"
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or (
            whole and not (isinstance(value, numbers.Integral) or float(value).is_integer())):
        raise ValueError(f"{name} must be {kind} from {low:g} to {high:g}, got {value!r}.")
    if not math.isfinite(value):
        raise ValueError(f"{name} is {value}: it must be {kind} from {low:g} to {high:g}. A NaN/inf setting makes "
                         "every step NaN; set a finite value.")
    if not low <= value <= high:
        raise ValueError(f"{name} {value:g} is out of range: use {kind} from {low:g} to {high:g}.")


def check_settings(steps: int, cfg: float, shift: float, denoise: float = 1.0) -> None:
    """Check the sampler settings up front, naming the first bad one (NaN/inf included)."""
    _check_number("steps", steps, *STEPS_RANGE, whole=True)
    _check_number("cfg (guidance scale)", cfg, *CFG_RANGE)
    _check_number("shift", shift, *SHIFT_RANGE)
    if denoise == 0:
        raise ValueError(f"denoise 0 would run no step: use a value from {DENOISE_RANGE[0]:g} to {DENOISE_RANGE[1]:g} "
                         "(1 = start from pure noise).")
    _check_number("denoise", denoise, *DENOISE_RANGE)


def check_finite(name: str, tensor: torch.Tensor) -> None:
    """A ``ValueError`` naming ``name`` and the first NaN/inf position unless every value is finite."""
    bad = ~torch.isfinite(tensor)
    if bad.any():
        first = tuple(int(i) for i in bad.nonzero()[0])
        raise ValueError(f"{name} holds {int(bad.sum())} NaN/inf value(s) (first at index {first} of shape "
                         f"{tuple(tensor.shape)}); every step would be NaN. Check where these values come from.")


def time_shift(u: torch.Tensor, shift: float) -> torch.Tensor:
    return shift * u / (1 + (shift - 1) * u)


def step_video_sigmas(num_steps: int, shift: float) -> torch.Tensor:
    """The ``num_steps + 1`` noise levels of the reference scheduler, from 0 (noise) to 1 (data), in fp32."""
    # no upper limit on steps here: a partial denoise asks for a longer schedule than the steps it runs
    if isinstance(num_steps, bool) or not isinstance(num_steps, numbers.Integral) or num_steps < 1:
        raise ValueError(f"steps must be a whole number of at least 1, got {num_steps!r}.")
    _check_number("shift", shift, *SHIFT_RANGE)
    return 1 - time_shift(torch.linspace(1, 0, num_steps + 1, dtype=torch.float32), shift)


def denoise_sigmas(num_steps: int, shift: float, denoise: float = 1.0) -> torch.Tensor:
    """Sigmas for partial denoising: the last ``num_steps`` levels of a ``num_steps / denoise`` schedule."""
    check_settings(num_steps, 1.0, shift, denoise)
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


def guidance_on(cfg: float, has_negative: bool = True) -> bool:
    """Whether sampling runs the unconditional branch: a negative conditioning and a scale other than 1 (at 1,
    ``uncond + cfg * (cond - uncond)`` is the conditional velocity alone)."""
    return has_negative and cfg != 1.0


def guided_velocity(velocity_fn: VelocityFn, cfg: float) -> VelocityFn:
    """Classifier-free guidance with one batched call: the model sees [cond; uncond]."""
    _check_number("cfg (guidance scale)", cfg, *CFG_RANGE)

    def fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if not guidance_on(cfg):
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
    compute_dtype: torch.dtype | None = None,
    oom_advice: str = "",
) -> torch.Tensor:
    """Integrate from ``sigmas[0]`` to ``sigmas[-1]`` with Euler steps in fp32.

    With ``latents`` given and ``sigmas[0] > 0`` (partial denoise) the start is ``s * latents + (1 - s) * noise``.
    Inputs are checked to be finite first, so a NaN/inf from the model can only come from the model: the error
    then names fp16 overflow when ``compute_dtype`` is fp16, else the weights. Out of memory at a step re-raises
    ``torch.OutOfMemoryError`` naming the step, followed by ``oom_advice``.
    """
    check_finite("the starting noise", noise)
    if latents is not None:
        check_finite("the input latents", latents)
    sigmas = sigmas.to(torch.float32)
    x = noise.float()
    if latents is not None and sigmas[0] > 0:
        x = sigmas[0] * latents.float() + (1 - sigmas[0]) * x
    total = len(sigmas) - 1
    for i in range(total):
        s, s_next = sigmas[i], sigmas[i + 1]
        t = s.expand(x.shape[0]).to(x.device)
        try:
            v = velocity_fn(x, t).float()
        except torch.OutOfMemoryError as e:
            raise torch.OutOfMemoryError(f"Out of memory at sampling step {i + 1}/{total} (latents "
                                         f"{tuple(x.shape)}). {oom_advice}".strip() + f" [{e}]") from e
        if not torch.isfinite(v).all():
            raise FloatingPointError(model_nan_message(f"at step {i + 1}/{total}", compute_dtype))
        denoised = x + (1 - s) * v
        x = x + v * (s_next - s)
        if callback is not None:
            callback(i + 1, total, x, denoised)
    return x


def model_nan_message(where: str, compute_dtype: torch.dtype | None) -> str:
    """Why a model gave NaN/inf from finite inputs: fp16 overflow when it computes in fp16, else its weights."""
    if compute_dtype == torch.float16:
        return (f"The model produced NaN/inf {where} from finite inputs while computing in float16: this is fp16 "
                "overflow. Use bf16 or fp32 compute.")
    dtype = str(compute_dtype).removeprefix("torch.") if compute_dtype is not None else "its compute dtype"
    return (f"The model produced NaN/inf {where} from finite inputs while computing in {dtype}: its weights (or a "
            "LoRA's) are probably damaged or hold NaN/inf. Re-download the checkpoint, or load it without the LoRA.")


# ---- training in the same convention --------------------------------------------------------------------------


def sample_training_times(batch: int, generator: torch.Generator, shift: float, first: int = 0) -> torch.Tensor:
    """Times for a training batch: even draws uniform, odd draws with the sampler's shift (``1 - time_shift(u)``,
    dense near noise, where inference spends its steps). Draws are counted from ``first``, so a trainer that draws
    one sample at a time (``first`` = the draw's number in the run) still alternates."""
    u = torch.rand(batch, generator=generator)
    shifted = 1 - time_shift(u, shift)
    return torch.where((torch.arange(batch) + first) % 2 == 0, u, shifted)


def flow_matching_loss(model, latents: torch.Tensor, text: dict, t: torch.Tensor, noise: torch.Tensor,
                       reduce: bool = True, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Mean squared error of ``model(x_t, t, **text)`` against the velocity ``data - noise``, at
    ``x_t = t * data + (1 - t) * noise`` (t = 0 is noise). With ``reduce=False``, one error per sample;
    ``weight`` (broadcast against the latents) weights the squared error element by element."""
    tt = t.view(-1, *([1] * (latents.ndim - 1)))
    x = tt * latents + (1 - tt) * noise
    squared = (model(x, t, **text) - (latents - noise)).pow(2)
    error = (squared if weight is None else squared * weight).flatten(1).mean(1)
    return error.mean() if reduce else error
