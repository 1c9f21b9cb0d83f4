"""MP4 and PNG writing, read back with PyAV (an independent decoder of what was written)."""

from fractions import Fraction

import av
import numpy as np
import pytest
import torch

from stepvideo_core.video_io import contact_sheet, save_mp4, save_png, to_uint8


def smooth_clip(t: int = 20, h: int = 48, w: int = 64) -> np.ndarray:
    """Moving colour gradients: content an encoder keeps close at crf 18 (noise would not be)."""
    y, x = np.mgrid[0:h, 0:w]
    frames = [np.stack([(x * 4 + 8 * i) % 256, (y * 5) % 256, np.full_like(x, 40 + 6 * i)], -1) for i in range(t)]
    return np.asarray(frames, dtype=np.uint8)


def test_uint8_conversion_truncates_like_the_reference():
    video = torch.tensor([-1.0, 0.0, 0.999, 1.5]).view(4, 1, 1, 1).expand(4, 3, 2, 2)
    assert to_uint8(video)[:, 0, 0, 0].tolist() == [0, 127, 254, 255]  # 127.5 -> 127, 254.87 -> 254: truncation


def test_mp4_is_h264_with_every_frame_at_25_fps(tmp_path):
    frames = smooth_clip()
    path = save_mp4(frames, tmp_path / "out" / "clip.mp4")
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        assert stream.codec_context.name == "h264" and stream.codec_context.pix_fmt == "yuv420p"
        assert (stream.width, stream.height) == (64, 48)
        assert stream.average_rate == Fraction(25)
        decoded = np.stack([f.to_ndarray(format="rgb24") for f in container.decode(stream)])
    assert decoded.shape == frames.shape
    error = np.abs(decoded.astype(int) - frames.astype(int))
    assert error.mean() < 3 and np.median(error) <= 2, (error.mean(), np.median(error))
    # the frames stay in order: each decoded frame is closest to its own source frame
    distance = np.abs(decoded[:, None].astype(int) - frames[None].astype(int)).mean(axis=(2, 3, 4))
    assert (distance.argmin(axis=1) == np.arange(len(frames))).all()
    with pytest.raises(ValueError, match="even width and height"):
        save_mp4(frames[:, :, :63], tmp_path / "odd.mp4")


def test_png_contact_sheet_is_lossless(tmp_path):
    frames = smooth_clip(t=4, h=16, w=16)
    sheet = contact_sheet(frames, columns=2)
    assert sheet.shape == (32, 32, 3)
    assert np.array_equal(sheet[16:, 16:], frames[3]) and np.array_equal(sheet[:16, 16:], frames[1])
    path = save_png(sheet, tmp_path / "sheet.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with av.open(str(path)) as container:
        (image,) = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    assert np.array_equal(image, sheet)
