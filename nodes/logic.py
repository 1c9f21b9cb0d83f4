"""Node logic that needs no ComfyUI: input parsing, validation messages, layout and convention bridges.

ComfyUI conventions bridged here:
- latents are ``[B, C, T, H, W]`` in ComfyUI and ``[B, T, C, H, W]`` in the core;
- ComfyUI's flow (CONST) sampling uses ``x = (1 - sigma) * x0 + sigma * noise`` with sigma 1 -> 0 and expects the
  model to return ``noise - x0``; the core uses ``s = 1 - sigma`` (0 = noise) and predicts ``x0 - noise``. So the
  DiT is called at ``t = 1 - sigma`` and its velocity is negated;
- IMAGE is ``[N, H, W, 3]`` in [0, 1]; the core's video is ``[b, T, 3, H, W]`` in [-1, 1].
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..stepvideo_core import tiny
from ..stepvideo_core.scheduler import PRESETS, SamplerPreset, denoise_sigmas, make_noise
from ..stepvideo_core.step_llm import TOKENIZER_FILE
from ..stepvideo_core.text_encoding import TextConditioning
from ..stepvideo_core.vae import FRAMES_PER_CHUNK, SPATIAL_FACTOR, latent_frames

# Channels of StepVideoEmptyLatent's (all-zero) latent: the 30B model's. Samplers resize an empty latent to the
# model's own count (Step-Video-Tiny: 16), as ComfyUI's KSampler does, so one empty-latent node serves both.
LATENT_CHANNELS = 64
OFFICIAL_PREFIX = "stepvideo/"  # combo values of the official multi-file layout: stepvideo/<download>/<part>
# The pack's own models/ folder: Step-Video-Tiny ships there in the official layout, so registering it as one more
# "stepvideo" root makes every loader list stepvideo/step-video-tiny/<part> without any download.
BUILTIN_MODELS_DIR = str(tiny.TINY_DIR.parent)
WEIGHT_DTYPES = ("default", "bf16", "fp16", "fp32", "fp8_e4m3fn", "fp8_e5m2")
LLM_DTYPES = ("bf16", "fp16", "fp32", "fp8_e4m3fn", "fp8_e5m2")
VAE_DTYPES = ("bf16", "fp16", "fp32")
ATTENTION_CHOICES = ("comfy", "sdpa", "sageattention", "flash-attn")
# The official presets, plus what Step-Video-Tiny was trained for (tiny.SETTINGS); "custom" uses the widgets.
NAMED_PRESETS = {**PRESETS, "tiny": SamplerPreset(tiny.SETTINGS.steps, tiny.SETTINGS.cfg, tiny.SETTINGS.shift)}
SAMPLER_PRESETS = (*NAMED_PRESETS, "custom")
MASK_KEY = "stepvideo_mask"  # keys of our extra tensors in a CONDITIONING entry's dict
CLIP_KEY = "stepvideo_clip"

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


def comfy_sigmas(steps: int, shift: float, denoise: float = 1.0) -> torch.Tensor:
    """ComfyUI sigmas (1 = noise -> 0 = data) of the reference schedule: ``1 - denoise_sigmas``."""
    return 1.0 - denoise_sigmas(int(steps), float(shift), float(denoise))


def noise_for(latent: torch.Tensor, seed: int) -> torch.Tensor:
    """Seeded noise for a ComfyUI latent ``[B, C, T, H, W]``, drawn in the core's layout so a seed gives the same
    video as the core pipeline (``stepvideo_core.pipeline.sample_latents``) and the demo CLI."""
    ours = make_noise(tuple(to_core_latent(latent).shape), seed)
    return to_comfy_latent(ours)


# ---- layouts ----------------------------------------------------------------------------------------------


def to_core_latent(samples: torch.Tensor) -> torch.Tensor:
    """ComfyUI ``[B, C, T, H, W]`` -> core ``[B, T, C, H, W]``."""
    if samples.ndim != 5:
        raise ValueError(f"Step-Video latents are 5-D [batch, channels, frames, height, width]; got shape "
                         f"{tuple(samples.shape)}. Use StepVideoEmptyLatent or StepVideoVAEEncode to make them.")
    return samples.movedim(1, 2)


def check_latent_channels(samples: torch.Tensor, expected: int, consumer: str) -> None:
    """A ComfyUI latent ``[B, C, T, H, W]`` must have the channels of the model or VAE that takes it."""
    if samples.shape[1] != expected:
        raise ValueError(f"The latent has {samples.shape[1]} channels but {consumer} takes {expected}. Step-Video-T2V "
                         f"latents have {LATENT_CHANNELS} channels and Step-Video-Tiny's {tiny.VAE_CONFIG.z_channels}: "
                         "use the VAE and model of one family (an empty StepVideoEmptyLatent fits either when it goes "
                         "through a sampler first).")


def to_comfy_latent(latents: torch.Tensor) -> torch.Tensor:
    """Core ``[B, T, C, H, W]`` -> ComfyUI ``[B, C, T, H, W]``."""
    return latents.movedim(2, 1)


def video_to_images(video: torch.Tensor) -> torch.Tensor:
    """Core video ``[b, T, 3, H, W]`` in [-1, 1] -> IMAGE ``[b*T, H, W, 3]`` float32 in [0, 1]."""
    frames = video.float().permute(0, 1, 3, 4, 2).flatten(0, 1)
    return ((frames + 1.0) * 0.5).clamp(0.0, 1.0).contiguous()


def images_to_video(images: torch.Tensor) -> torch.Tensor:
    """IMAGE ``[N, H, W, C]`` in [0, 1] -> core video ``[1, N, 3, H, W]`` in [-1, 1] (alpha dropped)."""
    if images.ndim != 4:
        raise ValueError(f"expected IMAGE frames [N, H, W, 3], got shape {tuple(images.shape)}")
    rgb = images[..., :3].float()
    return (rgb * 2.0 - 1.0).permute(0, 3, 1, 2).unsqueeze(0).contiguous()


# ---- live previews -------------------------------------------------------------------------------------------

# Step-Video-Tiny's latent -> RGB table (``latent_rgb_factors`` rows, one per channel, and the bias), fitted with
# fit_preview_rgb on clips of its training world encoded and decoded by its VAE. tests/test_nodes_logic.py refits
# it from the shipped weights and prints a new table when they change.
TINY_PREVIEW_RGB: tuple[list[list[float]], list[float]] | None = (
    [[0.2085, 0.1813, 0.1109],
    [-0.0098, -0.091, -0.094],
    [0.1522, 0.1085, 0.0538],
    [-0.0358, -0.0384, -0.0713],
    [-0.0596, -0.1474, -0.1428],
    [-0.0757, -0.0817, -0.0423],
    [0.0543, 0.1339, 0.1546],
    [0.1484, 0.1133, 0.0812],
    [-0.1207, -0.1475, -0.1595],
    [0.1787, 0.1496, 0.0742],
    [0.1926, 0.1152, -0.0378],
    [-0.0319, -0.0196, -0.0482],
    [-0.0715, -0.0314, 0.0209],
    [-0.1183, -0.036, 0.0724],
    [0.0453, -0.0173, -0.0895],
    [-0.0065, 0.0113, 0.0014]],
    [0.0815, -0.0984, 0.0009]
)


def preview_rgb(channels: int) -> tuple[list[list[float]], list[float]]:
    """(``latent_rgb_factors``, ``latent_rgb_factors_bias``) for a model with ``channels`` latent channels.

    Step-Video-Tiny (16) uses its fitted table. Otherwise a fixed, seeded random projection: previews then show
    structure and motion but not true colours (the 30B VAE's table needs its 100 GB download to fit).
    """
    if channels == tiny.VAE_CONFIG.z_channels and TINY_PREVIEW_RGB is not None:
        return TINY_PREVIEW_RGB
    g = torch.Generator().manual_seed(64)
    return (torch.randn(channels, 3, generator=g) * 0.08).tolist(), [0.0, 0.0, 0.0]


def fit_preview_rgb(latents: torch.Tensor, video: torch.Tensor) -> tuple[list[list[float]], list[float]]:
    """Least-squares latent -> RGB map: ``latents`` ``[B, C, T, h, w]`` against the ``video`` ``[B, 3, F, H, W]``
    (in [-1, 1], the preview's range) they decode to, averaged over each latent's patch and span of frames."""
    target = F.adaptive_avg_pool3d(video.float(), latents.shape[2:])
    x = latents.float().movedim(1, -1).reshape(-1, latents.shape[1])
    y = target.movedim(1, -1).reshape(-1, 3)
    solution = torch.linalg.lstsq(torch.cat([x, torch.ones(len(x), 1)], 1), y).solution
    return solution[:-1].tolist(), solution[-1].tolist()


def preview_rgb_error(factors: list[list[float]], bias: list[float], latents: torch.Tensor, video: torch.Tensor) -> float:
    """Mean absolute error (in [-1, 1] units) of a latent -> RGB table on the data fit_preview_rgb takes."""
    target = F.adaptive_avg_pool3d(video.float(), latents.shape[2:]).movedim(1, -1)
    rgb = latents.float().movedim(1, -1) @ torch.tensor(factors) + torch.tensor(bias)
    return float((rgb - target).abs().mean())


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


# ---- conditioning --------------------------------------------------------------------------------------------


def to_conditioning(text: TextConditioning) -> list:
    """Core conditioning -> ComfyUI CONDITIONING: Step-LLM states as the cross-attention tensor, mask and CLIP
    states as extra keys (the model's ``extra_conds`` forwards them). All fixed length, so cond and uncond batch."""
    return [[text.llm_states, {MASK_KEY: text.mask, CLIP_KEY: text.clip_states}]]


def from_conditioning(cond: list) -> TextConditioning:
    """First entry of a CONDITIONING made by StepVideoTextEncode back into core conditioning."""
    if not cond:
        raise ValueError("empty CONDITIONING")
    states, extra = cond[0][0], cond[0][1]
    if MASK_KEY not in extra or CLIP_KEY not in extra:
        raise ValueError("this CONDITIONING was not made by StepVideoTextEncode (no Step-Video mask / CLIP states)")
    return TextConditioning(states, extra[MASK_KEY], extra[CLIP_KEY])


# ---- model files -----------------------------------------------------------------------------------------------


def list_official(roots, part: str, check=os.path.isdir) -> list[str]:
    """``stepvideo/<download>/<part>`` for every ``<root>/<download>/<part>`` that exists (``check``)."""
    found = set()
    for root in roots:
        if not os.path.isdir(root):
            continue
        for name in sorted(os.listdir(root)):
            if check(os.path.join(root, name, part)):
                found.add(f"{OFFICIAL_PREFIX}{name}/{part}")
    return sorted(found)


def resolve_official(roots, value: str) -> str | None:
    """Path of a ``stepvideo/<download>/<part>`` combo value under the first root that has it, else None."""
    if not value.startswith(OFFICIAL_PREFIX):
        return None
    rel = value[len(OFFICIAL_PREFIX):]
    if ".." in rel.replace("\\", "/").split("/"):
        return None
    for root in roots:
        path = os.path.join(root, rel)
        if os.path.exists(path):
            return path
    return None


def list_subfolders(roots, marker: str) -> list[str]:
    """Names of ``<root>/<name>/`` folders that contain ``marker`` (a file or folder)."""
    found = set()
    for root in roots:
        if not os.path.isdir(root):
            continue
        for name in os.listdir(root):
            if os.path.exists(os.path.join(root, name, marker)):
                found.add(name)
    return sorted(found)


def resolve_subfolder(roots, name: str) -> str | None:
    if not name or ".." in name.replace("\\", "/").split("/"):
        return None
    for root in roots:
        path = os.path.join(root, name)
        if os.path.isdir(path):
            return path
    return None


STEP_LLM_MARKER = TOKENIZER_FILE
HUNYUAN_CLIP_MARKER = "clip_text_encoder"


def not_found(what: str, value: str, where: str) -> str:
    return f"{what} {value!r} not found in {where}. Put the file there (or refresh the browser) and pick it again."


# ---- LoRA -------------------------------------------------------------------------------------------------------


def lora_patch_keys(pairs: dict) -> dict[str, tuple]:
    """``{model state-dict key: (up, down)}`` for ComfyUI patches on a BaseModel (``diffusion_model.`` prefix)."""
    return {f"diffusion_model.{name}.weight": (pair.up, pair.down) for name, pair in pairs.items()}


def lora_report(matched: int, accepted: int, source_keys: int, unmatched: list[str]) -> str:
    msg = f"Step-Video LoRA: {accepted} of {matched} DiT layer(s) patched from {source_keys} tensor(s)"
    if unmatched:
        msg += f"; {len(unmatched)} tensor(s) matched no layer (e.g. {', '.join(unmatched[:3])})"
    return msg
