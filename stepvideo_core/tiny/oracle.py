"""An evaluator that knows the synthetic world: finds the object in generated frames and checks it against the
prompt's colour, shape and motion, plus two artifact measures (off-palette pixels, background flicker).

It reads only pixels. The background is the median border colour; object pixels are those far from it; the
object's colour is the palette entry most of them are closest to; its shape is read from how much of its
bounding box it fills (square 1.0, circle pi/4, triangle 1/2); its motion from the centroid track and the
change in area between the first and last frames.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

try:  # the pack itself does not need OpenCV; only this evaluator of the training lab does
    import cv2
except ImportError as e:
    raise ImportError("The Step-Video-Tiny oracle needs OpenCV (connected components): install the lab extra, "
                      "pip install 'stepvideo-t2v[lab]', or pip install opencv-python-headless") from e

from .synthetic import BACKGROUNDS, COLOURS, DIRECTIONS, SCALE_CHANGE, SHAPES, SceneObject

FOREGROUND_DISTANCE = 60.0  # RGB distance from the background that makes a pixel part of an object
MIN_PIXELS = 12  # an object smaller than this in a frame counts as not there
STILL_PIXELS = 10.0  # centroid travel below this (and no size change) is "still"
GROWTH_THRESHOLD = 1.3  # linear size change beyond this reads as "grow" / "shrink"
# Fill-ratio boundaries: triangle 0.5 | circle 0.785 | square 1.0.
TRIANGLE_BELOW, SQUARE_ABOVE = 0.64, 0.89

_PALETTE_NAMES = list(COLOURS)
_PALETTE = np.array([COLOURS[c][0] for c in _PALETTE_NAMES], np.float32)
_ALL_REFERENCE = np.concatenate([_PALETTE, np.array([v[0] for v in BACKGROUNDS.values()], np.float32)])


@dataclass
class Detection:
    colour: str | None
    shape: str | None
    motion: str | None
    fill_ratio: float
    displacement: tuple[float, float]  # centroid travel (x, y), pixels
    scale: float  # linear size, last frames / first frames
    colour_purity: float  # share of the object's pixels nearest to the detected colour
    off_palette: float  # share of all pixels far from every palette and background colour
    flicker: float  # mean absolute frame-to-frame change of background pixels, in [0, 1]


@dataclass
class Score:
    colour: bool
    shape: bool
    motion: bool
    adherence: float  # continuous prompt adherence in [0, 1]
    artifacts: float  # continuous artifact measure in [0, 1], lower is better
    detection: Detection

    @property
    def overall(self) -> float:
        """One number for ranking samples: the three checks, refined by the continuous parts."""
        return (self.colour + self.shape + self.motion) / 3 + 0.5 * self.adherence - 2.0 * self.artifacts


def _distances(pixels: np.ndarray, colours: np.ndarray) -> np.ndarray:
    return np.linalg.norm(pixels[..., None, :] - colours, axis=-1)


def background_colour(frames: np.ndarray) -> np.ndarray:
    border = np.concatenate([frames[:, 0], frames[:, -1], frames[:, :, 0], frames[:, :, -1]], axis=1)
    return np.median(border.reshape(-1, 3), axis=0).astype(np.float32)


def _largest_component(mask: np.ndarray) -> np.ndarray | None:
    count, labels, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    if count <= 1:
        return None
    best = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
    if stats[best, cv2.CC_STAT_AREA] < MIN_PIXELS:
        return None
    return labels == best


def classify_motion(displacement: tuple[float, float], scale: float) -> str:
    dx, dy = displacement
    travel = max(abs(dx), abs(dy))
    if travel < 2 * STILL_PIXELS and (scale > GROWTH_THRESHOLD or scale < 1 / GROWTH_THRESHOLD):
        return "grow" if scale > 1 else "shrink"
    if travel < STILL_PIXELS:
        return "still"
    if abs(dx) >= abs(dy):
        return "right" if dx > 0 else "left"
    return "down" if dy > 0 else "up"


def classify_shape(fill_ratio: float) -> str:
    if fill_ratio < TRIANGLE_BELOW:
        return "triangle"
    return "square" if fill_ratio > SQUARE_ABOVE else "circle"


def detect(frames: np.ndarray, colour: str | None = None) -> Detection:
    """Find one object in uint8 frames [T, H, W, 3]; with ``colour``, the object of that colour if present."""
    frames = np.asarray(frames)
    pixels = frames.astype(np.float32)
    bg = background_colour(frames)
    foreground = np.linalg.norm(pixels - bg, axis=-1) > FOREGROUND_DISTANCE
    nearest = np.argmin(_distances(pixels, _PALETTE), axis=-1)
    off_palette = float((_distances(pixels, _ALL_REFERENCE).min(-1) > FOREGROUND_DISTANCE).mean())
    steady_bg = ~foreground[1:] & ~foreground[:-1]
    change = np.abs(pixels[1:] - pixels[:-1]).mean(-1)
    flicker = float(change[steady_bg].mean() / 255) if steady_bg.any() else 0.0

    votes = np.bincount(nearest[foreground], minlength=len(_PALETTE))
    if votes.sum() < MIN_PIXELS:
        return Detection(None, None, None, 0.0, (0.0, 0.0), 1.0, 0.0, off_palette, flicker)
    detected = int(np.argmax(votes))
    wanted = _PALETTE_NAMES.index(colour) if colour in COLOURS and votes[_PALETTE_NAMES.index(colour)] >= MIN_PIXELS * len(frames) else detected
    purity = float(votes[detected] / votes.sum())

    centres, areas, fills = [], [], []
    for t in range(len(frames)):
        component = _largest_component(foreground[t] & (nearest[t] == wanted))
        if component is None:
            continue
        ys, xs = np.nonzero(component)
        area = float(len(xs))
        box = float((xs.max() - xs.min() + 1) * (ys.max() - ys.min() + 1))
        centres.append((xs.mean(), ys.mean()))
        areas.append(area)
        fills.append(area / box)
    if len(centres) < max(2, len(frames) // 3):
        return Detection(_PALETTE_NAMES[detected], None, None, 0.0, (0.0, 0.0), 1.0, purity, off_palette, flicker)
    edge = max(1, len(centres) // 6)  # average a few frames at each end against noise
    first, last = np.mean(centres[:edge], axis=0), np.mean(centres[-edge:], axis=0)
    displacement = (float(last[0] - first[0]), float(last[1] - first[1]))
    scale = float(np.sqrt(np.mean(areas[-edge:]) / max(np.mean(areas[:edge]), 1.0)))
    fill = float(np.median(fills))
    return Detection(_PALETTE_NAMES[detected], classify_shape(fill), classify_motion(displacement, scale), fill,
                     displacement, scale, purity, off_palette, flicker)


_IDEAL_FILL = {"triangle": 0.5, "circle": np.pi / 4, "square": 1.0}


def score(frames: np.ndarray, target: SceneObject | tuple[str, str, str]) -> Score:
    """Check one generated clip against the object it was asked for (a ``SceneObject`` or (colour, shape, motion))."""
    colour, shape, motion = target.combo if isinstance(target, SceneObject) else target
    if colour not in COLOURS or shape not in SHAPES:
        raise ValueError(f"unknown target {colour!r} {shape!r}")
    det = detect(frames, colour)
    # Continuous adherence: colour purity, closeness of the fill ratio to the shape's, and the motion vector's
    # agreement with the asked one (direction for moves, size change for grow/shrink, stillness for still).
    colour_part = det.colour_purity if det.colour == colour else 0.0
    shape_part = max(0.0, 1.0 - abs(det.fill_ratio - _IDEAL_FILL[shape]) / 0.25) if det.shape else 0.0
    dx, dy = det.displacement
    if motion in DIRECTIONS:
        ux, uy = DIRECTIONS[motion]
        motion_part = float(np.clip((dx * ux + dy * uy) / 40.0, 0, 1))
    elif motion in ("grow", "shrink"):
        change = np.log(max(det.scale, 1e-3)) * (1 if motion == "grow" else -1)
        motion_part = float(np.clip(change / np.log(SCALE_CHANGE), 0, 1))
    else:
        motion_part = float(np.clip(1 - np.hypot(dx, dy) / 20.0, 0, 1)) * float(abs(np.log(max(det.scale, 1e-3))) < 0.2)
    adherence = (colour_part + shape_part + motion_part) / 3
    artifacts = min(1.0, det.off_palette + 4 * det.flicker)
    return Score(det.colour == colour, det.shape == shape, det.motion == motion, adherence, artifacts, det)
