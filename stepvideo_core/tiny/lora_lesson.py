"""The LoRA lesson of Step-Video-Tiny: a colour the model has never seen, taught by a LoRA on a few clips.

    python -m stepvideo_core.tiny.lora_lesson --out clips/        # writes the clips (mp4 + .txt captions)
    python -m stepvideo_core.train_lora --data clips/ --out cyan.safetensors --steps 300 --lr 2e-3 --seed 0
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
import torch

from ..video_io import save_mp4, to_uint8
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


def named_colours() -> dict[str, tuple[int, int, int]]:
    return {"cyan": CYAN, **{name: c for name, (c, _) in synthetic.COLOURS.items()}}


def nearest_named_colour(rgb, references: dict[str, np.ndarray] | None = None) -> tuple[str, dict[str, float]]:
    """The name of the colour (cyan or a palette colour) nearest ``rgb``, and every distance; ``references``
    replaces the colours' RGB values (``vae_references``)."""
    named = references or {k: np.array(v, np.float32) for k, v in named_colours().items()}
    distances = {name: float(np.linalg.norm(np.asarray(rgb, np.float32) - np.asarray(c, np.float32)))
                 for name, c in named.items()}
    return min(distances, key=distances.get), distances


@torch.no_grad()
def vae_references(vae, seed: int = 0) -> dict[str, dict[str, np.ndarray]]:
    """Each named colour as the VAE draws it, per background: a square of that colour rendered, encoded and
    decoded, then measured by ``object_colour``. The tiny VAE learnt the world's six colours only and draws
    cyan darker and bluer (measured: (30, 215, 225) on black comes back about (32, 100, 147)), so no DiT can
    make it draw true cyan; what a LoRA can teach is the VAE's cyan, and the lesson is judged against that."""
    refs: dict[str, dict[str, np.ndarray]] = {}
    rng = random.Random(seed)
    for background in synthetic.BACKGROUNDS:
        placed = synthetic.scene_for("blue", "square", "still", rng, background)
        refs[background] = {}
        for name in named_colours():
            scene = synthetic.Scene(tuple(replace(o, colour=name) for o in placed.objects), background)
            video = torch.from_numpy(synthetic.to_model_range(synthetic.render(scene, {"cyan": CYAN})))
            decoded = to_uint8(vae.decode(vae.encode(video.permute(1, 0, 2, 3)[None], sample=False))[0])
            refs[background][name] = object_colour(decoded)
    return refs


def judge(frames: np.ndarray, references: dict[str, dict[str, np.ndarray]]) -> str | None:
    """The named colour a generated clip's object is nearest, against the VAE's references for the clip's
    background (the world background nearest its border colour); None when the clip shows no object."""
    rgb = object_colour(frames)
    if rgb is None:
        return None
    border = background_colour(frames)
    background = min(synthetic.BACKGROUNDS, key=lambda b: np.linalg.norm(border - np.array(synthetic.BACKGROUNDS[b][0])))
    return nearest_named_colour(rgb, references[background])[0]


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
