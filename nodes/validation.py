"""Widget options of the nodes and the checks of their values, with messages that name the limit and the fix."""

from __future__ import annotations

import torch

from ..stepvideo_core import ops, video_shape
from ..stepvideo_core.scheduler import PRESETS, SamplerPreset
from .conversions import LATENT_CHANNELS

# Every dtype combo lists names of stepvideo_core.ops.WEIGHT_DTYPES; "default" lets ComfyUI choose.
WEIGHT_DTYPES = ("default", *ops.WEIGHT_DTYPES)
# The DiT loader also offers ComfyUI's fp8 fast matmul (fp8 weights multiplied in fp8 where the GPU can).
FAST_FP8 = "fp8_e4m3fn_fast"
DIT_WEIGHT_DTYPES = (*WEIGHT_DTYPES, FAST_FP8)
LLM_DTYPES = tuple(ops.WEIGHT_DTYPES)
VAE_DTYPES = tuple(name for name, dtype in ops.WEIGHT_DTYPES.items() if dtype not in ops.FP8_DTYPES)
ATTENTION_CHOICES = ("comfy", "sdpa", "sageattention", "flash-attn")
LORA_STRENGTH_RANGE = (-4.0, 4.0)  # of every LoRA loader's strength widget
# The presets of scheduler.PRESETS (the official ones and Step-Video-Tiny's); "custom" uses the widgets.
SAMPLER_PRESETS = (*PRESETS, "custom")



def parse_dtype(name: str) -> torch.dtype | None:
    """'default' -> None (let the host choose); otherwise the torch dtype; unknown names raise ValueError."""
    if name == "default":
        return None
    if name == FAST_FP8:
        return torch.float8_e4m3fn  # stored as e4m3; the loader turns on fp8 matmul
    if name not in ops.WEIGHT_DTYPES:
        raise ValueError(f"unknown dtype {name!r}; choose one of {', '.join(DIT_WEIGHT_DTYPES)}")
    return ops.WEIGHT_DTYPES[name]


def check_choice(name: str, value, choices) -> bool | str:
    """validate_inputs helper: V3 combos are not checked by the server, so check them here."""
    if value is None or value in choices:
        return True
    return f"{name} {value!r} is not one of: {', '.join(map(str, choices))}"


# ---- sampler settings ----------------------------------------------------------------------------------------


def resolve_preset(preset: str, steps: int, cfg: float, shift: float) -> SamplerPreset:
    """A named preset overrides steps/cfg/shift; 'custom' keeps the widget values."""
    if preset == "custom":
        return SamplerPreset(int(steps), float(cfg), float(shift))
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(SAMPLER_PRESETS)}")
    return PRESETS[preset]


def preset_summary() -> str:
    """'standard (50 steps, cfg 9, shift 13), ...' for node descriptions, from the presets themselves."""
    return ", ".join(f"{name} ({p.steps} steps, cfg {p.cfg:g}, shift {p.shift:g})" for name, p in PRESETS.items())


# ---- empty latent validation -------------------------------------------------------------------------------


def validate_video_request(width, height, frames, batch_size=1) -> bool | str:
    """validate_inputs form (True or the message) of ``video_shape.request_error``; linked inputs arrive as None."""
    return video_shape.request_error(width, height, frames, batch_size) or True


def empty_latent_shape(width: int, height: int, frames: int, batch_size: int = 1) -> tuple[int, int, int, int, int]:
    """ComfyUI's latent layout ``[b, C, F, h, w]`` of a request checked by ``video_shape``."""
    return (batch_size, LATENT_CHANNELS, *video_shape.latent_grid(width, height, frames, batch_size))


# ---- VAE decode tiling ---------------------------------------------------------------------------------------

# In latent units (1 = 16 pixels). 512 latents = 8192 pixels, twice video_shape.MAX_SIDE: a tile that size always
# covers the frame (the decode then runs untiled), so a larger one can only be a typo.
MAX_TILE_SIZE = 512
MAX_TILE_OVERLAP = MAX_TILE_SIZE // 2  # tiles overlap by at most half a tile


def validate_tiling(tile_size, tile_overlap) -> bool | str:
    """validate_inputs form (True or one message naming every broken limit) of the decode node's tiling widgets;
    linked inputs arrive as None."""
    problems = []
    if tile_size is not None and not 0 <= tile_size <= MAX_TILE_SIZE:
        problems.append(f"tile_size {tile_size} must be 0 (no tiling) or 1 to {MAX_TILE_SIZE} latents "
                        f"({MAX_TILE_SIZE} = {MAX_TILE_SIZE * video_shape.SPATIAL_FACTOR} pixels)")
    if tile_overlap is not None and not 0 <= tile_overlap <= MAX_TILE_OVERLAP:
        problems.append(f"tile_overlap {tile_overlap} must be 0 to {MAX_TILE_OVERLAP} latents")
    elif tile_size and tile_overlap and 0 < tile_size <= MAX_TILE_SIZE and tile_overlap * 2 > tile_size:
        problems.append(f"tile_overlap {tile_overlap} must be at most half of tile_size {tile_size} "
                        f"(<= {tile_size // 2})")
    return True if not problems else "Step-Video VAE decode: " + "; ".join(problems) + "."


def not_found(what: str, value: str, where: str) -> str:
    return f"{what} {value!r} not found in {where}. Put the file there (or refresh the browser) and pick it again."
