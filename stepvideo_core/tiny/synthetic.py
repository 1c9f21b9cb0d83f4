"""The synthetic world Step-Video-Tiny is trained on: flat shapes moving over plain backgrounds, with captions.

A clip is one or two objects (a colour, a shape, a motion each) over a background colour. Everything is drawn
from a seeded generator, so a clip is reproducible from its ``Scene``; captions come in English and Chinese
with several phrasings each. A fixed set of (colour, shape, motion) combinations never appears in training
(``HELD_OUT``), so the evaluation asks for things the model has not seen together.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field

import numpy as np

# name -> (RGB, Chinese); chosen far apart in hue so the oracle can tell them apart after a lossy VAE.
COLOURS: dict[str, tuple[tuple[int, int, int], str]] = {
    "red": ((220, 40, 40), "红色"),
    "green": ((40, 190, 70), "绿色"),
    "blue": ((40, 90, 235), "蓝色"),
    "yellow": ((240, 215, 40), "黄色"),
    "purple": ((160, 60, 210), "紫色"),
    "orange": ((250, 140, 30), "橙色"),
}
BACKGROUNDS: dict[str, tuple[tuple[int, int, int], str]] = {
    "black": ((18, 18, 18), "黑色"),
    "white": ((238, 238, 238), "白色"),
    "gray": ((120, 120, 120), "灰色"),
}
SHAPES: dict[str, str] = {"circle": "圆形", "square": "正方形", "triangle": "三角形"}
MOTIONS = ("left", "right", "up", "down", "grow", "shrink", "still")
DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}

EN_MOTION = {
    "left": ("moves to the left", "moves left", "slides to the left", "moving left"),
    "right": ("moves to the right", "moves right", "slides to the right", "moving right"),
    "up": ("moves up", "moves upward", "rises", "moving up"),
    "down": ("moves down", "moves downward", "falls", "moving down"),
    "grow": ("grows", "gets bigger", "grows larger", "growing"),
    "shrink": ("shrinks", "gets smaller", "shrinks down", "shrinking"),
    "still": ("stays still", "does not move", "stands still", "staying still"),
}
ZH_MOTION = {
    "left": ("向左移动", "往左移动", "向左滑动"),
    "right": ("向右移动", "往右移动", "向右滑动"),
    "up": ("向上移动", "往上移动", "向上升起"),
    "down": ("向下移动", "往下移动", "向下落"),
    "grow": ("变大", "逐渐变大", "越变越大"),
    "shrink": ("变小", "逐渐变小", "越变越小"),
    "still": ("静止不动", "一动不动", "停在原地"),
}
ZH_SHAPE_SHORT = {"circle": "圆", "square": "方块", "triangle": "三角形"}

SIZE = 128
TRAVEL = (36.0, 52.0)  # pixels travelled over a whole clip by a moving object
HALF_SIZE = (16.0, 22.0)  # half-extent: radius of a circle, half the side of a square; objects span 2-3 latent cells
SCALE_CHANGE = 1.6  # a growing object ends this many times larger (a shrinking one this many times smaller)


def _held_out() -> frozenset[tuple[str, str, str]]:
    # One motion per (colour, shape), rotating so each motion is held out for 2-3 pairs and every single
    # attribute value still appears in training with others.
    out = set()
    for ci, colour in enumerate(COLOURS):
        for si, shape in enumerate(SHAPES):
            out.add((colour, shape, MOTIONS[(ci * len(SHAPES) + si) % len(MOTIONS)]))
    return frozenset(out)


HELD_OUT = _held_out()  # 18 of the 126 combinations


@dataclass(frozen=True)
class SceneObject:
    colour: str
    shape: str
    motion: str
    x: float  # centre at the first frame, pixels
    y: float
    half: float  # half-extent at the first frame
    travel: float = 0.0  # pixels over the clip (moving objects)

    @property
    def combo(self) -> tuple[str, str, str]:
        return (self.colour, self.shape, self.motion)

    def at(self, t: float) -> tuple[float, float, float]:
        """Centre and half-extent at clip time ``t`` in [0, 1]."""
        dx, dy = DIRECTIONS.get(self.motion, (0, 0))
        half = self.half
        if self.motion == "grow":
            half = self.half * SCALE_CHANGE ** t
        elif self.motion == "shrink":
            half = self.half * SCALE_CHANGE ** -t
        return self.x + dx * self.travel * t, self.y + dy * self.travel * t, half


@dataclass(frozen=True)
class Scene:
    objects: tuple[SceneObject, ...]
    background: str
    num_frames: int = 17
    size: int = SIZE
    captions: dict[str, tuple[str, ...]] = field(default_factory=dict, compare=False, hash=False)


def _place(rng: random.Random, motion: str, size: int, taken: list[tuple[float, float]]) -> tuple[float, float, float, float]:
    """A start position, size and travel that keep the object inside the frame for the whole clip."""
    for _ in range(100):
        half = rng.uniform(*HALF_SIZE)
        travel = rng.uniform(*TRAVEL) if motion in DIRECTIONS else 0.0
        reach = 1.5 * half * (SCALE_CHANGE if motion == "grow" else 1.0) + 3
        lo, hi = reach, size - reach
        dx, dy = DIRECTIONS.get(motion, (0, 0))
        x_lo, x_hi = lo - min(dx * travel, 0), hi - max(dx * travel, 0)
        y_lo, y_hi = lo - min(dy * travel, 0), hi - max(dy * travel, 0)
        x, y = rng.uniform(x_lo, x_hi), rng.uniform(y_lo, y_hi)
        # Two objects start apart, so the oracle can separate them by colour and position.
        if all(abs(x - ox) > 40 or abs(y - oy) > 40 for ox, oy in taken):
            return x, y, half, travel
    return x, y, half, travel


def training_combos() -> list[tuple[str, str, str]]:
    return [(c, s, m) for c in COLOURS for s in SHAPES for m in MOTIONS if (c, s, m) not in HELD_OUT]


def make_scene(rng: random.Random, combos: list[tuple[str, str, str]], num_frames: int = 17, size: int = SIZE,
               two_objects: float = 0.15) -> Scene:
    """A random scene whose objects use ``combos``; with probability ``two_objects`` there are two of them."""
    count = 2 if rng.random() < two_objects else 1
    chosen: list[tuple[str, str, str]] = []
    while len(chosen) < count:
        combo = rng.choice(combos)
        if all(combo[0] != c[0] for c in chosen):  # two objects never share a colour
            chosen.append(combo)
    background = rng.choice(list(BACKGROUNDS))
    objects, taken = [], []
    for colour, shape, motion in chosen:
        x, y, half, travel = _place(rng, motion, size, taken)
        taken.append((x, y))
        objects.append(SceneObject(colour, shape, motion, x, y, half, travel))
    scene = Scene(tuple(objects), background, num_frames, size)
    return Scene(scene.objects, background, num_frames, size, captions=captions(scene))


def scene_for(colour: str, shape: str, motion: str, rng: random.Random, background: str | None = None,
              num_frames: int = 17) -> Scene:
    """A one-object scene with the given attributes (evaluation, previews)."""
    x, y, half, travel = _place(rng, motion, SIZE, [])
    scene = Scene((SceneObject(colour, shape, motion, x, y, half, travel),),
                  background or rng.choice(list(BACKGROUNDS)), num_frames)
    return Scene(scene.objects, scene.background, num_frames, SIZE, captions=captions(scene))


# ---- captions -------------------------------------------------------------------------------------------------


def english_phrase(obj: SceneObject, variant: int) -> str:
    verb = EN_MOTION[obj.motion][variant % len(EN_MOTION[obj.motion])]
    article = "the" if variant % 3 == 2 else ("an" if obj.colour[0] in "aeiou" else "a")
    return f"{article} {obj.colour} {obj.shape} {verb}"


def chinese_phrase(obj: SceneObject, variant: int) -> str:
    colour, verb = COLOURS[obj.colour][1], ZH_MOTION[obj.motion][variant % len(ZH_MOTION[obj.motion])]
    if variant % 3 == 0:
        return f"一个{colour}的{SHAPES[obj.shape]}{verb}"
    if variant % 3 == 1:
        return f"{colour}{SHAPES[obj.shape]}{verb}"
    return f"{colour[0]}{ZH_SHAPE_SHORT[obj.shape]}{verb}"


def phrase(obj: SceneObject, language: str, variant: int) -> str:
    """One caption phrase of an object, ``language`` "en" or "zh"."""
    return english_phrase(obj, variant) if language == "en" else chinese_phrase(obj, variant)


def _shape_swaps() -> dict[str, str]:
    """Each shape word of the captions (English, Chinese, Chinese short forms) to the next shape's word, in the
    order circle -> square -> triangle -> circle. The short and full Chinese triangle are one word (三角形), which
    becomes the full circle (圆形), so a short-form caption of a triangle swaps to a full-form circle."""
    order = list(SHAPES)
    swaps: dict[str, str] = {}
    for table in ({s: s for s in SHAPES}, SHAPES, ZH_SHAPE_SHORT):
        for i, shape in enumerate(order):
            swaps.setdefault(table[shape], table[order[(i + 1) % len(order)]])
    return swaps


_SHAPE_SWAPS = _shape_swaps()
_SHAPE_WORD = re.compile("|".join(sorted(map(re.escape, _SHAPE_SWAPS), key=len, reverse=True)))


def swap_shapes(caption: str) -> str:
    """``caption`` with every shape word replaced by the next shape's ("a red circle" -> "a red square", "红圆" ->
    "红方块"): a caption that names the clip's colour and motion but the wrong shape (longest words first, so 圆形
    is not read as 圆)."""
    return _SHAPE_WORD.sub(lambda m: _SHAPE_SWAPS[m.group(0)], caption)


def captions(scene: Scene) -> dict[str, tuple[str, ...]]:
    """Several English and Chinese captions of a scene, some naming the background."""
    bg_en, bg_zh = scene.background, BACKGROUNDS[scene.background][1]
    en, zh = [], []
    for variant in range(4):
        phrase = " and ".join(english_phrase(o, variant + i) for i, o in enumerate(scene.objects))
        en.append(phrase if variant < 3 else f"{phrase} on a {bg_en} background")
        zh_phrase = "，".join(chinese_phrase(o, variant + i) for i, o in enumerate(scene.objects))
        zh.append(zh_phrase if variant < 3 else f"{bg_zh}背景上，{zh_phrase}")
    return {"en": tuple(en), "zh": tuple(zh)}


# ---- rendering ------------------------------------------------------------------------------------------------


def _coverage(shape: str, px: np.ndarray, py: np.ndarray, x: float, y: float, half: float) -> np.ndarray:
    """Anti-aliased coverage in [0, 1] from a signed distance (one pixel of soft edge)."""
    dx, dy = px - x, py - y
    if shape == "circle":
        d = np.sqrt(dx * dx + dy * dy) - half
    elif shape == "square":
        d = np.maximum(np.abs(dx), np.abs(dy)) - half
    elif shape == "triangle":
        # Upright equilateral triangle centred on its centroid; circumradius 1.5 * half gives it about the
        # area of the circle. Exact distance inside, a bound outside the corners (enough for a 1-pixel edge).
        r = 1.5 * half
        qx, qy = np.abs(dx) / r, dy / r
        d = np.maximum(qy - 0.5, (np.sqrt(3.0) * qx - qy - 1.0) / 2.0) * r
    else:
        raise ValueError(f"unknown shape {shape!r}; known: {', '.join(SHAPES)}")
    return np.clip(0.5 - d, 0.0, 1.0)


def render(scene: Scene, colours: dict[str, tuple[int, int, int]] | None = None) -> np.ndarray:
    """The clip as uint8 frames [T, H, W, 3]. ``colours`` adds RGB colours by name beyond the world's palette
    (the LoRA lesson's cyan, which the tiny model never saw)."""
    palette = {name: rgb for name, (rgb, _) in COLOURS.items()} | (colours or {})
    size = scene.size
    py, px = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    bg = np.array(BACKGROUNDS[scene.background][0], np.float32)
    frames = np.empty((scene.num_frames, size, size, 3), np.uint8)
    for t in range(scene.num_frames):
        img = np.broadcast_to(bg, (size, size, 3)).copy()
        for obj in scene.objects:
            x, y, half = obj.at(t / max(scene.num_frames - 1, 1))
            a = _coverage(obj.shape, px, py, x, y, half)[..., None]
            img = img * (1 - a) + np.array(palette[obj.colour], np.float32) * a
        frames[t] = np.clip(img + 0.5, 0, 255).astype(np.uint8)
    return frames


def to_model_range(frames: np.ndarray) -> np.ndarray:
    """uint8 [T, H, W, 3] -> float32 [3, T, H, W] in [-1, 1], the VAE's input layout and range."""
    return (frames.astype(np.float32) / 127.5 - 1.0).transpose(3, 0, 1, 2)


# ---- evaluation paraphrases -----------------------------------------------------------------------------------
# Prompts the model never trains on: new word orders and sentence frames built only from the words (English) and
# characters (Chinese) of the training captions, so every token is known to the shipped tokenizers and a drop in
# score measures phrasing, not vocabulary. They are for evaluation only: ``captions()`` and the caption corpus,
# to which the shipped tokenizers are pinned, do not use them.

# motion -> (leading phrase of an inverted sentence, its verb, a verb phrase the captions never use, a doubled one)
EN_PARAPHRASE_MOTION = {
    "left": ("to the left", "moves", "slides left", "slides left and moves to the left"),
    "right": ("to the right", "moves", "slides right", "slides right and moves to the right"),
    "up": ("upward", "rises", "rises up", "rises and moves upward"),
    "down": ("downward", "falls", "falls down", "falls and moves downward"),
    "grow": ("larger and larger", "grows", "grows bigger", "grows and gets larger"),
    "shrink": ("smaller and smaller", "shrinks", "shrinks smaller", "shrinks and gets smaller"),
    "still": ("still", "stands", "stands and stays still", "stays still and does not move"),
}
# motion -> a verb phrase the Chinese captions never use (known characters in new combinations)
ZH_PARAPHRASE_MOTION = {
    "left": "往左滑动", "right": "往右滑动", "up": "往上升起", "down": "往下落",
    "grow": "渐渐变大", "shrink": "渐渐变小", "still": "静止在原地",
}
# Sentence frames, filled with: colour, shape (the language's names), motion (a training verb phrase), fresh (the
# verb phrase above), doubled, front and verb (the inverted sentence's parts), background, the English article,
# and for Chinese the colour's first character and the short shape name.
PARAPHRASE_FRAMES: dict[str, tuple[str, ...]] = {
    "en": (
        "{front} {verb} the {colour} {shape}",  # inverted: "to the right moves the blue square"
        "on a {background} background the {colour} {shape} {fresh}",  # background first
        "{article} {colour} {shape} on a {background} background {motion}",  # background between subject and verb
        "the {colour} {shape} {doubled}",  # two verb phrases
    ),
    "zh": (
        "{fresh}的{colour}{shape}",  # the motion as a clause before the noun: "往右滑动的蓝色正方形"
        "{colour}{shape}在{background}背景上{motion}",  # the background inside the sentence
        "一个{shape}，{colour}的，{fresh}",  # shape first, colour after it
        "{background}背景上的{colour_short}{shape_short}{fresh}",  # background as a modifier
    ),
}


def paraphrase_captions(scene: Scene) -> dict[str, tuple[str, ...]]:
    """Every paraphrase frame filled for a one-object scene, English and Chinese, in ``PARAPHRASE_FRAMES`` order.
    None of them is a training caption (``captions()``); the evaluation uses them to ask for held-out
    combinations in words the model has seen but not in that order."""
    if len(scene.objects) != 1:
        raise ValueError(f"paraphrase_captions takes one-object scenes; this one has {len(scene.objects)} objects")
    obj = scene.objects[0]
    front, verb, fresh, doubled = EN_PARAPHRASE_MOTION[obj.motion]
    en = {"article": "an" if obj.colour[0] in "aeiou" else "a", "colour": obj.colour, "shape": obj.shape,
          "motion": EN_MOTION[obj.motion][0], "fresh": fresh, "doubled": doubled, "front": front, "verb": verb, "background": scene.background}
    colour_zh = COLOURS[obj.colour][1]
    zh = {"colour": colour_zh, "shape": SHAPES[obj.shape], "motion": ZH_MOTION[obj.motion][0],
          "fresh": ZH_PARAPHRASE_MOTION[obj.motion], "background": BACKGROUNDS[scene.background][1],
          "colour_short": colour_zh[0], "shape_short": ZH_SHAPE_SHORT[obj.shape]}
    return {"en": tuple(f.format(**en) for f in PARAPHRASE_FRAMES["en"]),
            "zh": tuple(f.format(**zh) for f in PARAPHRASE_FRAMES["zh"])}
