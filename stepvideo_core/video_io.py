"""Writing decoded videos: uint8 conversion as the reference does it, MP4 files and PNG contact sheets."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch


def to_uint8(video: torch.Tensor) -> np.ndarray:
    """[T, 3, H, W] in [-1, 1] -> [T, H, W, 3] uint8, truncating like the reference (not rounding)."""
    x = ((video.detach().float().clamp(-1, 1) + 1) * 127.5).clamp(0, 255).to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def save_mp4(frames: np.ndarray, path: str | Path, fps: float = 25.0) -> Path:
    import cv2

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    t, h, w, _ = frames.shape
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, (w, h))
    if not writer.isOpened():
        raise RuntimeError(f"OpenCV could not open an MP4 writer for {path}; install opencv-python-headless with video support")
    for frame in frames:
        writer.write(np.ascontiguousarray(frame[:, :, ::-1]))  # OpenCV wants BGR
    writer.release()
    return path


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
    import cv2

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(path), image[:, :, ::-1]):
        raise RuntimeError(f"could not write {path}")
    return path
