"""Training data: a folder of clips with same-name ``.txt`` captions, each fitted to a bucket of the model's rules.

    data/
      walk.mp4   walk.txt      # caption: English or Chinese, UTF-8
      pan.webm   pan.txt
      still.png  still.txt     # an image trains as a one-frame clip

Videos (mp4, webm, mov, mkv, gif, ...) and images are read with PyAV. A clip keeps its first frames (as many
whole 17-frame chunks as it has, up to the ``frames`` asked for; a still image keeps its one frame) and is scaled
to cover its bucket and centre-cropped: the bucket keeps the clip's aspect ratio at about the area asked for,
each side a multiple of 16 (``video_shape``'s rules). Files that cannot be used are skipped, each with the
reason, and the report lists them; a folder with nothing usable is an error that shows that report.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..video_shape import FRAMES_PER_CHUNK, SPATIAL_FACTOR, check_request

VIDEO_EXTENSIONS = (".mp4", ".webm", ".mov", ".mkv", ".avi", ".gif", ".m4v")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
CAPTION_EXTENSION = ".txt"


class DataError(ValueError):
    """Training data that cannot be used; the message names the file or folder and the fix."""


@dataclass(frozen=True)
class Bucket:
    frames: int
    height: int
    width: int

    def __str__(self) -> str:
        return f"{self.width}x{self.height}x{self.frames}"


@dataclass(frozen=True)
class BucketSettings:
    """What the clips are fitted to: at most ``frames`` frames (a multiple of 17) and about ``width * height``
    pixels, in the clip's own aspect ratio."""

    frames: int
    width: int
    height: int

    def __post_init__(self):
        check_request(self.width, self.height, self.frames)

    def bucket(self, width: int, height: int, frames: int) -> Bucket:
        """The bucket of a source of ``width`` x ``height`` with ``frames`` usable frames (1 for an image)."""
        scale = math.sqrt(self.width * self.height / (width * height))
        sides = [max(SPATIAL_FACTOR, round(side * scale / SPATIAL_FACTOR) * SPATIAL_FACTOR) for side in (width, height)]
        take = 1 if frames == 1 else min(frames, self.frames) // FRAMES_PER_CHUNK * FRAMES_PER_CHUNK
        return Bucket(take, sides[1], sides[0])


@dataclass(frozen=True)
class Clip:
    path: Path
    caption: str
    bucket: Bucket


@dataclass(frozen=True)
class Skipped:
    path: Path
    reason: str


@dataclass
class DataReport:
    clips: list[Clip]
    skipped: list[Skipped]

    def summary(self) -> str:
        buckets: dict[str, int] = {}
        for clip in self.clips:
            buckets[str(clip.bucket)] = buckets.get(str(clip.bucket), 0) + 1
        lines = [f"training data: {len(self.clips)} clip(s) in {len(buckets)} bucket(s) ("
                 + ", ".join(f"{n} x {b}" for b, n in sorted(buckets.items())) + f"), {len(self.skipped)} skipped"]
        lines += [f"  skipped {s.path}: {s.reason}" for s in self.skipped]
        return "\n".join(lines)


def read_caption(media: Path) -> str:
    """The caption of ``media`` from its same-name ``.txt``; a ``DataError`` naming the file when there is none."""
    path = media.with_suffix(CAPTION_EXTENSION)
    if not path.exists():
        raise DataError(f"no caption: {path.name} is missing (each clip needs a same-name .txt file holding its "
                        "caption)")
    try:
        text = path.read_text(encoding="utf-8").strip()
    except UnicodeDecodeError:
        raise DataError(f"caption {path} is not UTF-8 text; save it as UTF-8") from None
    if not text:
        raise DataError(f"caption {path} is empty; write what the clip shows")
    return text


def probe(path: Path, want_frames: int) -> tuple[int, int, int]:
    """(width, height, frames available up to ``want_frames``) of a video or image, read with PyAV; a
    ``DataError`` naming the file when it cannot be decoded."""
    import av

    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise DataError(f"{path} holds no video stream")
            frames, size = 0, None
            for frame in container.decode(video=0):
                size = (frame.width, frame.height)
                frames += 1
                if frames >= want_frames:
                    break
    except DataError:
        raise
    except (OSError, av.error.FFmpegError, ValueError) as e:
        raise DataError(f"cannot read {path} as a video or image ({e}); re-encode it (e.g. to H.264 MP4) or remove "
                        "it") from None
    if size is None:
        raise DataError(f"{path} has no decodable frame; re-encode it or remove it")
    return size[0], size[1], frames


def read_frames(path: Path, bucket: Bucket) -> np.ndarray:
    """The clip's first ``bucket.frames`` frames as uint8 ``[T, H, W, 3]``, scaled (by FFmpeg's area filter) to
    cover the bucket and centre-cropped to it."""
    import av

    out = np.empty((bucket.frames, bucket.height, bucket.width, 3), np.uint8)
    count = 0
    with av.open(str(path)) as container:
        for frame in container.decode(video=0):
            scale = max(bucket.width / frame.width, bucket.height / frame.height)
            w, h = max(bucket.width, round(frame.width * scale)), max(bucket.height, round(frame.height * scale))
            rgb = frame.reformat(width=w, height=h, format="rgb24", interpolation="AREA").to_ndarray()
            top, left = (h - bucket.height) // 2, (w - bucket.width) // 2
            out[count] = rgb[top:top + bucket.height, left:left + bucket.width]
            count += 1
            if count == bucket.frames:
                return out
    raise DataError(f"{path}: only {count} frame(s) could be decoded of the {bucket.frames} its bucket needs; the "
                    "file changed since it was scanned or is damaged")


def check_clip(path: Path, settings: BucketSettings) -> Clip:
    """The ``Clip`` for one media file, or a ``DataError`` saying why it cannot train."""
    caption = read_caption(path)
    is_image = path.suffix.lower() in IMAGE_EXTENSIONS
    width, height, frames = probe(path, 1 if is_image else settings.frames)
    if min(width, height) < SPATIAL_FACTOR:
        raise DataError(f"{path} is {width}x{height}: too small, a side needs at least {SPATIAL_FACTOR} pixels")
    if frames < FRAMES_PER_CHUNK and frames != 1:
        raise DataError(f"{path} has {frames} frames: too short, a clip needs at least {FRAMES_PER_CHUNK} (one "
                        "chunk of the VAE); use a longer clip, or a still image for one frame")
    if frames == 1 and not is_image:
        is_image = True  # a one-frame video trains as an image
    return Clip(path, caption, settings.bucket(width, height, 1 if is_image else frames))


def media_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in VIDEO_EXTENSIONS + IMAGE_EXTENSIONS)


def scan_folder(folder: str | Path, settings: BucketSettings) -> DataReport:
    """Every usable clip of ``folder`` (not its sub-folders), and the files skipped with why. A ``DataError`` when
    the folder is missing, holds no media, or none of it can be used."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"training data folder {folder} does not exist")
    files = media_files(folder)
    if not files:
        raise DataError(f"training data folder {folder} holds no video or image (looked for "
                        f"{', '.join(VIDEO_EXTENSIONS + IMAGE_EXTENSIONS)}, each with a same-name .txt caption)")
    clips, skipped = [], []
    for path in files:
        try:
            clips.append(check_clip(path, settings))
        except DataError as e:
            skipped.append(Skipped(path, str(e)))
    report = DataReport(clips, skipped)
    if not clips:
        raise DataError(f"no usable clip in {folder}:\n{report.summary()}")
    return report


@dataclass(frozen=True)
class Pair:
    prompt: str
    chosen: Clip
    rejected: Clip


def read_pairs(path: str | Path, settings: BucketSettings) -> list[Pair]:
    """Video-DPO preference pairs from JSONL, one ``{"prompt": ..., "chosen": video, "rejected": video}`` a line,
    the video paths relative to the JSONL's folder. The rejected clip is fitted to the chosen one's bucket (the
    two share noise and time in the loss). A missing or unreadable file, or a bad line, is a ``DataError`` naming
    the line and the file: a pair cannot be half skipped."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"pairs file {path} does not exist")
    pairs = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path} line {number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{where} is not JSON ({e})") from None
        missing = [k for k in ("prompt", "chosen", "rejected") if not isinstance(row, dict) or not row.get(k)]
        if missing:
            raise DataError(f"{where} lacks {', '.join(missing)}; each line is "
                            '{"prompt": "...", "chosen": "a.mp4", "rejected": "b.mp4"}')
        clips = {}
        for key in ("chosen", "rejected"):
            media = (path.parent / row[key]).resolve()
            if not media.is_file():
                raise DataError(f"{where}: the {key} video {media} does not exist")
            width, height, frames = probe(media, settings.frames)
            if frames < FRAMES_PER_CHUNK and frames != 1:
                raise DataError(f"{where}: the {key} video {media} has {frames} frames, fewer than "
                                f"{FRAMES_PER_CHUNK}")
            clips[key] = (media, settings.bucket(width, height, frames))
        bucket = clips["chosen"][1]
        if clips["rejected"][1].frames < bucket.frames:
            raise DataError(f"{where}: the rejected video {clips['rejected'][0]} is shorter than the chosen one "
                            f"({clips['rejected'][1].frames} against {bucket.frames} frames); a pair needs equal "
                            "lengths")
        prompt = str(row["prompt"]).strip()
        pairs.append(Pair(prompt, Clip(clips["chosen"][0], prompt, bucket), Clip(clips["rejected"][0], prompt, bucket)))
    if not pairs:
        raise DataError(f"pairs file {path} holds no pair")
    return pairs
