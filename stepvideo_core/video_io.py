"""Writing decoded videos (uint8 conversion as the reference does it, H.264 MP4 files and PNG contact sheets) and
reading start images, with PyAV."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import numpy as np
import torch


def to_uint8(video: torch.Tensor) -> np.ndarray:
    """[T, 3, H, W] in [-1, 1] -> [T, H, W, 3] uint8, truncating like the reference (not rounding)."""
    x = ((video.detach().float().clamp(-1, 1) + 1) * 127.5).clamp(0, 255).to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def _encode(frames: np.ndarray, path: Path, codec: str, pix_fmt: str, rate: Fraction, fmt: str | None = None,
            options: dict[str, str] | None = None, container_options: dict[str, str] | None = None) -> Path:
    import av

    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), mode="w", format=fmt, options=container_options or {}) as container:
        stream = container.add_stream(codec, rate=rate, options=options or {})
        stream.height, stream.width = frames.shape[1:3]
        stream.pix_fmt = pix_fmt
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")))
        container.mux(stream.encode())  # flush the encoder's delayed frames
    return path


def save_mp4(frames: np.ndarray, path: str | Path, fps: float = 25.0, crf: int = 18) -> Path:
    """``[T, H, W, 3]`` uint8 -> an H.264 MP4 (yuv420p, the profile browsers and players decode; ``crf`` 18 is
    visually lossless), with the index at the front so playback starts before the whole file has loaded."""
    t, h, w, _ = frames.shape
    if h % 2 or w % 2:  # 4:2:0 chroma covers 2x2 pixel blocks
        raise ValueError(f"H.264 (yuv420p) needs an even width and height, got {w}x{h}")
    return _encode(frames, Path(path), "h264", "yuv420p", Fraction(fps).limit_denominator(1001),
                   options={"crf": str(crf)}, container_options={"movflags": "+faststart"})


def contact_sheet(frames: np.ndarray, columns: int = 6, max_frames: int = 18) -> np.ndarray:
    """A grid of evenly spaced frames, for a quick look at a whole clip in one PNG."""
    index = np.linspace(0, len(frames) - 1, min(max_frames, len(frames))).round().astype(int)
    picked = frames[index]
    rows = -(-len(picked) // columns)
    h, w = picked.shape[1:3]
    sheet = np.zeros((rows * h, min(columns, len(picked)) * w, 3), dtype=np.uint8)
    for i, frame in enumerate(picked):
        r, c = divmod(i, columns)
        sheet[r * h:(r + 1) * h, c * w:(c + 1) * w] = frame
    return sheet


def save_png(image: np.ndarray, path: str | Path) -> Path:
    """``[H, W, 3]`` uint8 -> a PNG (lossless)."""
    return _encode(image[None], Path(path), "png", "rgb24", Fraction(1), fmt="image2",
                   container_options={"update": "1"})


def load_image(path: str | Path) -> torch.Tensor:
    """An image file (PNG, JPEG, WebP, ...; a video's first frame too) as RGB ``[3, H, W]`` in [-1, 1] (alpha
    dropped), the range the VAE takes."""
    import av

    try:
        with av.open(str(path)) as container:
            frame = next(container.decode(video=0)).to_ndarray(format="rgb24")
    except (OSError, av.error.FFmpegError, StopIteration) as e:
        raise FileNotFoundError(f"could not read an image from {path} ({e})") from None
    return torch.from_numpy(np.ascontiguousarray(frame)).permute(2, 0, 1).float() / 127.5 - 1.0
