"""Widget options of the nodes and the checks of their values, with messages that name the limit and the fix."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..stepvideo_core.scheduler import PRESETS, SamplerPreset
from ..stepvideo_core.tiny import model as tiny
from ..stepvideo_core.vae import FRAMES_PER_CHUNK, SPATIAL_FACTOR, latent_frames
from .conversions import LATENT_CHANNELS

WEIGHT_DTYPES = ("default", "bf16", "fp16", "fp32", "fp8_e4m3fn", "fp8_e5m2")
LLM_DTYPES = ("bf16", "fp16", "fp32", "fp8_e4m3fn", "fp8_e5m2")
VAE_DTYPES = ("bf16", "fp16", "fp32")
ATTENTION_CHOICES = ("comfy", "sdpa", "sageattention", "flash-attn")
# The official presets, plus what Step-Video-Tiny was trained for (tiny.SETTINGS); "custom" uses the widgets.
NAMED_PRESETS = {**PRESETS, "tiny": SamplerPreset(tiny.SETTINGS.steps, tiny.SETTINGS.cfg, tiny.SETTINGS.shift)}
SAMPLER_PRESETS = (*NAMED_PRESETS, "custom")

_DTYPES = {
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
    "fp32": torch.float32,
    "fp8_e4m3fn": torch.float8_e4m3fn,
    "fp8_e5m2": torch.float8_e5m2,
}


def parse_dtype(name: str) -> torch.dtype | None:
    """'default' -> None (let the host choose); otherwise the torch dtype; unknown names raise ValueError."""
    if name == "default":
        return None
    try:
        return _DTYPES[name]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; choose one of {', '.join(WEIGHT_DTYPES)}") from None


def check_choice(name: str, value, choices) -> bool | str:
    """validate_inputs helper: V3 combos are not checked by the server, so check them here."""
    if value is None or value in choices:
        return True
    return f"{name} {value!r} is not one of: {', '.join(map(str, choices))}"


# ---- sampler settings ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SamplerSettings:
    steps: int
    cfg: float
    shift: float


def resolve_preset(preset: str, steps: int, cfg: float, shift: float) -> SamplerSettings:
    """A named preset overrides steps/cfg/shift; 'custom' keeps the widget values."""
    if preset == "custom":
        return SamplerSettings(int(steps), float(cfg), float(shift))
    if preset not in NAMED_PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(SAMPLER_PRESETS)}")
    p = NAMED_PRESETS[preset]
    return SamplerSettings(p.steps, p.cfg, p.shift)


def preset_summary() -> str:
    """'standard (50 steps, cfg 9, shift 13), ...' for node descriptions, from the presets themselves."""
    return ", ".join(f"{name} ({p.steps} steps, cfg {p.cfg:g}, shift {p.shift:g})" for name, p in NAMED_PRESETS.items())


# ---- empty latent validation -------------------------------------------------------------------------------


def _nearest_multiple(value: int, step: int) -> tuple[int, int]:
    lower = max(value // step * step, step)
    upper = max(-(-value // step) * step, step)
    return lower, upper


def validate_video_request(width, height, frames, batch_size=1) -> bool | str:
    """True, or one message listing every problem with the nearest valid values."""
    problems = []
    for name, v in (("width", width), ("height", height)):
        if v is None:
            continue
        if v < SPATIAL_FACTOR or v % SPATIAL_FACTOR:
            lo, hi = _nearest_multiple(int(v), SPATIAL_FACTOR)
            problems.append(f"{name} {v} must be a multiple of {SPATIAL_FACTOR} (nearest valid: "
                            f"{lo} or {hi})" if lo != hi else f"{name} {v} must be at least {SPATIAL_FACTOR}")
    if frames is not None and (frames < FRAMES_PER_CHUNK or frames % FRAMES_PER_CHUNK):
        lo, hi = _nearest_multiple(int(frames), FRAMES_PER_CHUNK)
        if lo != hi:
            problems.append(f"frames {frames} must be a multiple of {FRAMES_PER_CHUNK} (17 frames -> 3 latent frames; "
                            f"nearest valid: {lo} or {hi})")
        else:
            problems.append(f"frames {frames} must be at least {FRAMES_PER_CHUNK}")
    if batch_size is not None and batch_size < 1:
        problems.append(f"batch_size {batch_size} must be at least 1")
    return True if not problems else "Step-Video: " + "; ".join(problems) + "."


def empty_latent_shape(width: int, height: int, frames: int, batch_size: int = 1) -> tuple[int, int, int, int, int]:
    msg = validate_video_request(width, height, frames, batch_size)
    if msg is not True:
        raise ValueError(msg)
    return (int(batch_size), LATENT_CHANNELS, latent_frames(int(frames)), height // SPATIAL_FACTOR, width // SPATIAL_FACTOR)


def not_found(what: str, value: str, where: str) -> str:
    return f"{what} {value!r} not found in {where}. Put the file there (or refresh the browser) and pick it again."


def lora_report(matched: int, accepted: int, source_keys: int, unmatched: list[str]) -> str:
    msg = f"Step-Video LoRA: {accepted} of {matched} DiT layer(s) patched from {source_keys} tensor(s)"
    if unmatched:
        msg += f"; {len(unmatched)} tensor(s) matched no layer (e.g. {', '.join(unmatched[:3])})"
    return msg
