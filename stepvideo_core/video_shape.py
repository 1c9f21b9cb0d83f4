"""The video shape rules of Step-Video-T2V in one place: frame counts, latent frames, sizes, limits, messages.

Every caller that checks or converts a video or latent shape imports this module: the VAE, the pipeline (and
so the CLI and the tiny lab) and the nodes. ``js/stepvideo.js`` keeps a copy of the numbers for the UI and
names this module; change both together.

Frames. The Video-VAE compresses time by 8 with a causal first frame, in independent chunks of 17 frames
(1 + 2 x 8) that encode to 3 latent frames. A generation request asks for whole chunks: a multiple of 17
frames (17 -> 3 latent frames, 204 -> 36). The encoder also takes the reference's tails after whole chunks:
17q + 1 frames (the last frame alone -> 1 latent) and 17q + 9 (-> 2 latents), so a single image encodes to one
latent frame. Any number of latent frames decodes: 17 frames per 3 latents, a trailing 1 or 2 latents giving
1 or 9 frames.

Sizes. Width and height are multiples of 16 (one latent cell is 16 x 16 pixels; the DiT's patch size is 1).

Limits (requests only; the VAE itself takes any multiple of 16 and any encodable frame count):
- ``MAX_SIDE = 4096`` pixels: a 4096 x 4096 latent frame alone is 256 x 256 = 65,536 DiT tokens, about the
  token count of the whole official 992 x 544 x 204 run (75,888) that the model was trained for, and each
  decoded frame is 4096^2 x 3 values; larger sides are beyond anything the model has seen and almost always a
  typo. It is also the limit the node's widget has always had.
- ``MAX_FRAMES = 1700`` frames (100 chunks, 68 s at 25 fps, 300 latent frames): 8.3 x the trained 204. The
  DiT's 3D RoPE has no position limit, so the cap is practical: attention is quadratic in tokens, so 1700
  frames at the official size is ~70 x the attention work of the official run; longer requests are typos.
- ``MAX_BATCH = 64`` videos: the node's widget limit; each video of a batch is sampled side by side.
"""

from __future__ import annotations

import numbers

FRAMES_PER_CHUNK = 17
LATENTS_PER_CHUNK = 3
SPATIAL_FACTOR = 16
TRAINED_FRAMES = 204  # the official pipeline's longest clip (8.16 s at 25 fps)
MAX_FRAMES = 1700
MAX_SIDE = 4096
MAX_BATCH = 64
# Trailing frames (after whole 17-frame chunks) that the encoder accepts, and the latent frames they give.
_TAIL_FRAMES_TO_LATENTS = {0: 0, 1: 1, 9: 2}
_TAIL_LATENTS_TO_FRAMES = {latents: frames for frames, latents in _TAIL_FRAMES_TO_LATENTS.items()}
_PREFIX = "Step-Video video shape: "
_FRAMES_WHY = f"frames come in chunks of {FRAMES_PER_CHUNK} ({FRAMES_PER_CHUNK} video frames -> {LATENTS_PER_CHUNK} latent frames)"
_SIZE_WHY = f"sizes are multiples of {SPATIAL_FACTOR} (one latent cell is {SPATIAL_FACTOR}x{SPATIAL_FACTOR} pixels)"


def nearest_valid(value: int, step: int, low: int, high: int | None = None) -> tuple[int, ...]:
    """The valid values nearest ``value`` on the grid of ``step`` within ``[low, high]``: the value itself when
    valid, the bound it passed, or the grid values below and above it. ``low`` and ``high`` are on the grid."""
    if value <= low:
        return (low,)
    if high is not None and value >= high:
        return (high,)
    below = value // step * step
    return (value,) if below == value else (below, below + step)


def _problem(name: str, value, step: int, low: int, high: int | None) -> str | None:
    """``None`` when ``value`` is valid, else ``'<name> <value> must ... (nearest valid: a or b)'``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        return f"{name} {value!r} must be a whole number"
    if value < low:
        rule = f"must be at least {low}"
    elif high is not None and value > high:
        rule = f"must be at most {high}"
    elif value % step:
        rule = f"must be a multiple of {step}"
    else:
        return None
    nearest = " or ".join(str(v) for v in nearest_valid(int(value), step, low, high))
    return f"{name} {value} {rule} (nearest valid: {nearest})"


def _message(problems: list[str], why: list[str]) -> str:
    reasons = "; ".join(why)
    return f"{_PREFIX}{'; '.join(problems)}." + (f" {reasons[:1].upper()}{reasons[1:]}." if reasons else "")


# ---- generation requests (the nodes, the pipeline, the CLI) --------------------------------------------------


def request_error(width, height, frames, batch_size=1) -> str | None:
    """``None`` when a request for ``batch_size`` videos of ``frames`` frames at ``width`` x ``height`` is valid,
    else one message naming every problem with its nearest valid values. ``None`` inputs are skipped (a node's
    linked input is only known when the graph runs)."""
    size = [_problem(n, v, SPATIAL_FACTOR, SPATIAL_FACTOR, MAX_SIDE) for n, v in (("width", width), ("height", height))
            if v is not None]
    size = [p for p in size if p]
    frame = _problem("frames", frames, FRAMES_PER_CHUNK, FRAMES_PER_CHUNK, MAX_FRAMES) if frames is not None else None
    batch = _problem("batch_size", batch_size, 1, 1, MAX_BATCH) if batch_size is not None else None
    problems = [*size, *(p for p in (frame, batch) if p)]
    if not problems:
        return None
    return _message(problems, [why for why, bad in ((_SIZE_WHY, size), (_FRAMES_WHY, frame)) if bad])


def check_request(width: int, height: int, frames: int, batch_size: int = 1) -> None:
    """Raise a ``ValueError`` with :func:`request_error`'s message unless the request is valid."""
    message = request_error(width, height, frames, batch_size)
    if message is not None:
        raise ValueError(message)


def latent_grid(width: int, height: int, frames: int, batch_size: int = 1) -> tuple[int, int, int]:
    """``(latent frames, latent height, latent width)`` of a checked request (992 x 544 x 204 -> (36, 34, 62))."""
    check_request(width, height, frames, batch_size)
    return latent_frames(frames), height // SPATIAL_FACTOR, width // SPATIAL_FACTOR


# ---- the VAE's rules (any encodable video, any latent) --------------------------------------------------------


def encodable_frames(num_frames: int) -> bool:
    """True when the VAE encodes a video of this many frames: 17q + r frames with r in {0, 1, 9}, at least 1."""
    return num_frames >= 1 and num_frames % FRAMES_PER_CHUNK in _TAIL_FRAMES_TO_LATENTS


_TAILS_WHY = "a single frame, or a trailing 1 or 9 frames after whole chunks, also encodes"


def _encode_frames_problem(num_frames) -> str | None:
    if isinstance(num_frames, bool) or not isinstance(num_frames, numbers.Integral):
        return f"frames {num_frames!r} must be a whole number"
    if encodable_frames(num_frames):
        return None
    # the nearest whole chunks; below one chunk, the single frame
    lower = max(num_frames // FRAMES_PER_CHUNK * FRAMES_PER_CHUNK, 1)
    upper = max(-(-num_frames // FRAMES_PER_CHUNK) * FRAMES_PER_CHUNK, FRAMES_PER_CHUNK)
    return f"frames {num_frames} must be a multiple of {FRAMES_PER_CHUNK} (nearest valid: {lower} or {upper})"


def _size_problems(height, width) -> list[str]:
    return [p for p in (_problem(n, v, SPATIAL_FACTOR, SPATIAL_FACTOR, None)
                        for n, v in (("width", width), ("height", height))) if p]


def latent_frames(num_frames: int) -> int:
    """Latent frames of a video: 3 per 17-frame chunk (17 -> 3, 34 -> 6, 204 -> 36; 1 -> 1, 18 -> 4, 26 -> 5)."""
    problem = _encode_frames_problem(num_frames)
    if problem:
        raise ValueError(_message([problem], [_FRAMES_WHY, _TAILS_WHY]))
    q, r = divmod(int(num_frames), FRAMES_PER_CHUNK)
    return q * LATENTS_PER_CHUNK + _TAIL_FRAMES_TO_LATENTS[r]


def video_frames(num_latents: int) -> int:
    """Frames decoded from ``num_latents`` latent frames: 17 per 3 latents (3 -> 17, 36 -> 204, 1 -> 1, 2 -> 9)."""
    if num_latents < 1:
        raise ValueError(f"{_PREFIX}need at least one latent frame, got {num_latents}.")
    q, r = divmod(num_latents, LATENTS_PER_CHUNK)
    return q * FRAMES_PER_CHUNK + _TAIL_LATENTS_TO_FRAMES[r]


def latent_size(height: int, width: int) -> tuple[int, int]:
    """``(height / 16, width / 16)``; a ``ValueError`` names the nearest valid sizes unless both are positive
    multiples of 16 (the VAE has no upper limit; requests do, see :func:`request_error`)."""
    problems = _size_problems(height, width)
    if problems:
        raise ValueError(_message(problems, [_SIZE_WHY]))
    return height // SPATIAL_FACTOR, width // SPATIAL_FACTOR


def encoded_grid(num_frames: int, height: int, width: int) -> tuple[int, int, int]:
    """``(latent frames, latent height, latent width)`` the VAE encodes a video of this shape to; one
    ``ValueError`` names every problem (frames and sizes) with the nearest valid values."""
    size = _size_problems(height, width)
    frames = _encode_frames_problem(num_frames)
    if size or frames:
        why = ([_SIZE_WHY] if size else []) + ([_FRAMES_WHY, _TAILS_WHY] if frames else [])
        raise ValueError(_message(size + ([frames] if frames else []), why))
    return (latent_frames(num_frames), *latent_size(height, width))
