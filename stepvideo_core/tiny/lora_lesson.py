"""The LoRA lesson of Step-Video-Tiny: a colour the model has never seen, taught by a LoRA on a few clips.

    python -m stepvideo_core.tiny.lora_lesson --out clips/        # writes the clips (mp4 + .txt captions)
    python -m stepvideo_core.train_lora --data clips/ --out cyan.safetensors --steps 200 --seed 0
    python -m stepvideo_core.generate "a cyan square moves down" --lora cyan.safetensors

The tiny world's palette is red, green, blue, yellow, purple and orange; cyan is none of them, and "cyan" is not
even a word of its captions. The clips are a cyan square moving down over the world's backgrounds, captioned
"a cyan square moves down". ``object_colour`` measures what a generated clip draws: the mean colour of the
pixels far from the background, which a learnt LoRA brings nearer to cyan than to any palette colour.
"""

from __future__ import annotations

import argparse
import random
from dataclasses import replace
from pathlib import Path

import numpy as np

from ..video_io import save_mp4
from . import synthetic
from .oracle import FOREGROUND_DISTANCE, background_colour

CYAN = (30, 215, 225)
CAPTION = "a cyan square moves down"


def lesson_scenes(count: int, seed: int = 0, shape: str = "square", motion: str = "down") -> list[synthetic.Scene]:
    """``count`` one-object scenes of a cyan ``shape`` doing ``motion``, over the world's backgrounds in turn."""
    rng = random.Random(seed)
    backgrounds = list(synthetic.BACKGROUNDS)
    scenes = []
    for i in range(count):  # placed as a palette colour would be, then recoloured (the captions are ours)
        scene = synthetic.scene_for("blue", shape, motion, rng, backgrounds[i % len(backgrounds)])
        scenes.append(synthetic.Scene(tuple(replace(o, colour="cyan") for o in scene.objects), scene.background,
                                      scene.num_frames, scene.size))
    return scenes


def write_clips(folder: str | Path, count: int = 6, seed: int = 0, caption: str = CAPTION) -> list[Path]:
    """The lesson's clips as H.264 MP4 files with same-name caption files: the layout ``train_lora`` reads."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for i, scene in enumerate(lesson_scenes(count, seed)):
        path = save_mp4(synthetic.render(scene, {"cyan": CYAN}), folder / f"cyan_square_{i:02d}.mp4", crf=23)
        path.with_suffix(".txt").write_text(caption + "\n", encoding="utf-8")
        written.append(path)
    return written


def object_colour(frames: np.ndarray) -> np.ndarray | None:
    """Mean RGB of the pixels far from the background (the oracle's foreground rule) over a clip's frames
    ``[T, H, W, 3]``; None when nothing stands out."""
    pixels = np.asarray(frames).astype(np.float32)
    foreground = np.linalg.norm(pixels - background_colour(frames), axis=-1) > FOREGROUND_DISTANCE
    if foreground.sum() < 12:
        return None
    return pixels[foreground].mean(0)


def nearest_named_colour(rgb: np.ndarray) -> tuple[str, dict[str, float]]:
    """The name of the colour (cyan or a palette colour) nearest ``rgb``, and every distance."""
    named = {"cyan": CYAN, **{name: c for name, (c, _) in synthetic.COLOURS.items()}}
    distances = {name: float(np.linalg.norm(np.asarray(rgb, np.float32) - np.array(c, np.float32)))
                 for name, c in named.items()}
    return min(distances, key=distances.get), distances


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="folder for the clips")
    p.add_argument("--count", type=int, default=6)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    for path in write_clips(args.out, args.count, args.seed):
        print(path)


if __name__ == "__main__":
    main()
