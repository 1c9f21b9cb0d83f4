"""Generate with Step-Video-Tiny and score the clips with the oracle.

    python -m stepvideo_core.tiny.evaluate                      # held-out combinations, English and Chinese
    python -m stepvideo_core.tiny.evaluate --lora models/loras/step-video-tiny-dpo.safetensors
    python -m stepvideo_core.tiny.evaluate --vae                # the VAE alone: reconstructions of ground truth
    python -m stepvideo_core.tiny.evaluate --vae --vae-file runs/tiny/vae.safetensors   # a VAE still in training
    python -m stepvideo_core.tiny.evaluate --reliance           # how much the DiT reads each kind of caption word
    python -m stepvideo_core.tiny.evaluate --paraphrases        # held-out combinations in phrasings never trained on
    python -m stepvideo_core.tiny.evaluate --demo               # the README's prompt, seeds 0-3

The prompts are the world's captions of combinations never seen in training (``synthetic.HELD_OUT``), one
phrasing per language; each is sampled with a few seeds at the tiny model's own settings.
"""

from __future__ import annotations

import argparse
import json
import random
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from ..pipeline import GenerationSettings, latent_shape, sample_latents
from ..scheduler import make_noise
from ..text_encoding import encode_prompts
from ..vae import load_vae
from ..video_io import save_png, to_uint8
from . import model as tiny
from . import oracle, synthetic

LANGUAGES = ("en", "zh")


@dataclass(frozen=True)
class Prompt:
    text: str
    language: str
    target: tuple[str, str, str]  # (colour, shape, motion)


def held_out_prompts(languages=LANGUAGES, variant: int = 0, combos=None) -> list[Prompt]:
    """One caption per held-out combination and language, phrased as the world's captions are."""
    out = []
    for combo in sorted(combos or synthetic.HELD_OUT):
        obj = synthetic.SceneObject(*combo, x=0, y=0, half=0)
        out += [Prompt(synthetic.phrase(obj, lang, variant), lang, combo) for lang in languages]
    return out


def paraphrase_prompts(languages=LANGUAGES, offset: int = 0, combos=None) -> list[Prompt]:
    """One paraphrase (``synthetic.paraphrase_captions``) per held-out combination and language. The frames and
    backgrounds are taken in turn over the sorted combinations, starting at frame ``offset``, so 18 combinations
    use every frame four or five times at the cost of the plain evaluation."""
    out = []
    backgrounds = list(synthetic.BACKGROUNDS)
    for i, combo in enumerate(sorted(combos or synthetic.HELD_OUT)):
        obj = synthetic.SceneObject(*combo, x=0, y=0, half=0)
        texts = synthetic.paraphrase_captions(synthetic.Scene((obj,), backgrounds[i % len(backgrounds)]))
        out += [Prompt(texts[lang][(i + offset) % len(texts[lang])], lang, combo) for lang in languages]
    return out


@torch.no_grad()
def sample_clips(model: tiny.TinyModel, prompts: list[str], seed: int, settings: GenerationSettings = tiny.SETTINGS,
                 batch: int = 8, transformer_options: dict | None = None) -> tuple[torch.Tensor, list[np.ndarray]]:
    """Latents [n, F, C, h, w] and uint8 clips [T, H, W, 3], one per prompt; prompt ``i`` gets the noise of seed
    ``seed + i`` whatever the batching, so a clip can be reproduced on its own. ``transformer_options`` go to every
    DiT call (a step cache's, for instance)."""
    shape = latent_shape(settings, model.dit.config.in_channels, 1)
    latents, clips = [], []
    for start in range(0, len(prompts), batch):
        chunk = prompts[start:start + batch]
        pos, neg = encode_prompts(model.text, chunk, after="keep")
        noise = torch.cat([make_noise(shape, seed + start + i) for i in range(len(chunk))])
        lat = sample_latents(model.dit, pos, neg, settings, noise=noise, transformer_options=transformer_options)
        latents.append(lat)
        clips += [to_uint8(v) for v in model.vae.decode(lat)]
    return torch.cat(latents), clips


def generate_frames(model: tiny.TinyModel, prompts: list[str], seed: int,
                    settings: GenerationSettings = tiny.SETTINGS) -> list[np.ndarray]:
    return sample_clips(model, prompts, seed, settings)[1]


def evaluate(model: tiny.TinyModel, prompts: list[Prompt], seeds=(0, 1), settings: GenerationSettings = tiny.SETTINGS,
             sheet: Path | None = None) -> dict:
    """Accuracy of colour, shape and motion per language, plus the mean continuous score. ``sheet``: a PNG of
    the first seed's clips for every third prompt."""
    rows = []
    for seed in seeds:
        clips = generate_frames(model, [p.text for p in prompts], seed, settings)
        for prompt, frames in zip(prompts, clips):
            s = oracle.score(frames, prompt.target)
            rows.append((prompt, s))
        if sheet and seed == seeds[0]:
            save_png(clip_rows(clips[::3]), sheet)
    return {lang: summarise([(p.target, s) for p, s in rows if p.language == lang])
            for lang in sorted({p.language for p, _ in rows})}


def summarise(rows: list[tuple[tuple[str, str, str], oracle.Score]]) -> dict:
    """Accuracies and mean scores of (asked combination, score) rows, with what the oracle read for each asked
    shape and motion: ``{"motion": {"left": {"shrink": 3, "left": 2, ...}, ...}}`` ("none": no object found).
    The tables show *how* a check fails (objects standing still, squares read as triangles), which the
    accuracies alone hide."""
    scores = [s for _, s in rows]
    confusion: dict[str, dict[str, dict[str, int]]] = {"shape": {}, "motion": {}}
    for (_, shape, motion), s in rows:
        for attribute, asked in (("shape", shape), ("motion", motion)):
            read = str(getattr(s.detection, attribute) or "none")
            counts = confusion[attribute].setdefault(asked, {})
            counts[read] = counts.get(read, 0) + 1
    return {"samples": len(scores),
            **{key: float(np.mean([getattr(s, key) for s in scores]))
               for key in ("colour", "shape", "motion", "overall", "artifacts")},
            "read_as": confusion}


DEMO_PROMPT = Prompt("a blue square moves right", "en", ("blue", "square", "right"))  # the README's first command


def demo_check(model: tiny.TinyModel, seeds=(0, 1, 2, 3), prompt: Prompt = DEMO_PROMPT,
               settings: GenerationSettings = tiny.SETTINGS) -> dict:
    """The oracle on the README's prompt for each seed, sampled as ``python -m stepvideo_core.generate PROMPT --seed
    N`` samples it (one prompt, noise of seed N): what the oracle read per seed, whether all three checks pass, and
    the summary over the seeds."""
    rows, per_seed = [], {}
    for seed in seeds:
        (frames,) = generate_frames(model, [prompt.text], seed, settings)
        s = oracle.score(frames, prompt.target)
        rows.append((prompt.target, s))
        per_seed[seed] = {"read": [s.detection.colour, s.detection.shape, s.detection.motion],
                          "right": bool(s.colour and s.shape and s.motion)}
    return {"prompt": prompt.text, "seeds": per_seed, "all_right": sum(v["right"] for v in per_seed.values()),
            "summary": summarise(rows)}


def round_trip_combos() -> list[tuple[str, str, str]]:
    """Every colour with every motion, the shapes taken in turn: 42 ground-truth clips for the VAE check."""
    shapes = list(synthetic.SHAPES)
    return [(colour, shapes[(i + j) % len(shapes)], motion)
            for i, colour in enumerate(synthetic.COLOURS) for j, motion in enumerate(synthetic.MOTIONS)]


def scene_video(scene: synthetic.Scene) -> torch.Tensor:
    """A ground-truth clip in the pipeline's layout: [T, 3, H, W] in [-1, 1]."""
    return torch.from_numpy(synthetic.to_model_range(synthetic.render(scene))).permute(1, 0, 2, 3)


@torch.no_grad()
def vae_round_trip(vae, combos=None, seed: int = 11, sheet: Path | None = None) -> dict:
    """The oracle on the VAE's reconstructions (posterior means) of ground-truth clips: the most that any DiT
    can reach through this VAE. ``sheet``: a PNG of every fifth clip (of the default 42: every shape and every
    motion), ground truth above reconstruction."""
    rng = random.Random(seed)
    rows, strips = [], []
    for i, combo in enumerate(combos or round_trip_combos()):
        scene = synthetic.scene_for(*combo, rng)
        x = scene_video(scene)[None]
        frames = to_uint8(vae.decode(vae.encode(x, sample=False))[0])
        rows.append((combo, oracle.score(frames, scene.objects[0])))
        if i % 5 == 0:
            strips += [synthetic.render(scene), frames]
    if sheet:
        save_png(clip_rows(strips), sheet)
    return summarise(rows)


SHEET_FRAMES = (0, 4, 8, 12, 16)


def clip_rows(clips: list[np.ndarray], frames=SHEET_FRAMES, gap: int = 2) -> np.ndarray:
    """One row per clip of the given frames, with white gaps between frames and rows (uint8 [H, W, 3])."""
    rows = []
    for clip in clips:
        tiles = [np.pad(clip[f], ((0, gap), (0, gap), (0, 0)), constant_values=255) for f in frames if f < len(clip)]
        rows.append(np.concatenate(tiles, axis=1))
    return np.concatenate(rows, axis=0)


# The swapped-in value for each caption attribute (a different one, never the same).
ATTRIBUTE_SWAPS = {
    "colour": dict(zip(synthetic.COLOURS, list(synthetic.COLOURS)[1:] + list(synthetic.COLOURS)[:1])),
    "shape": dict(zip(synthetic.SHAPES, list(synthetic.SHAPES)[1:] + list(synthetic.SHAPES)[:1])),
    "motion": {"left": "right", "right": "left", "up": "down", "down": "up", "grow": "shrink", "shrink": "grow",
               "still": "right"},
}


@torch.no_grad()
def caption_reliance(model: tiny.TinyModel, times=(0.2, 0.4), clips: int = 21, seed: int = 5,
                     swaps: dict[str, dict[str, str]] = ATTRIBUTE_SWAPS) -> dict[str, dict[float, float]]:
    """How much the DiT reads each kind of caption word. Ground-truth clips of training combinations are encoded
    and noised to time ``t``; the DiT's estimate of the clean latents (``x_t + (1 - t) v``) is scored against
    the truth once with the clip's own English caption and once with one attribute swapped ("left" -> "right",
    "red" -> "green", ...). The result is the error ratio, swapped over true: 1.0 means the word is ignored."""
    rng = random.Random(seed)
    combos = synthetic.training_combos()
    scenes = [synthetic.scene_for(*combos[rng.randrange(len(combos))], rng) for _ in range(clips)]
    latents = model.vae.encode(torch.stack([scene_video(s) for s in scenes]), sample=False)
    noise = make_noise(tuple(latents.shape), seed)

    def clean_errors(objects) -> dict[float, float]:
        text, _ = encode_prompts(model.text, [synthetic.phrase(o, "en", 0) for o in objects], after="keep")
        errors = {}
        for t in times:
            x = t * latents + (1 - t) * noise
            estimate = x + (1 - t) * model.dit(x, torch.full((clips,), t), **text.dit_kwargs())
            errors[t] = float((estimate - latents).pow(2).mean())
        return errors

    true_objects = [s.objects[0] for s in scenes]
    true_errors = clean_errors(true_objects)
    report = {}
    for attribute, swap in swaps.items():
        swapped = clean_errors([replace(o, **{attribute: swap[getattr(o, attribute)]}) for o in true_objects])
        report[attribute] = {t: swapped[t] / true_errors[t] for t in times}
    return report


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(tiny.TINY_DIR))
    p.add_argument("--seeds", type=int, default=None, help="seeds per prompt (default 2; 4 with --demo)")
    p.add_argument("--lora", default=None)
    p.add_argument("--strength", type=float, default=1.0)
    p.add_argument("--out", default=None, help="write the report here as JSON")
    p.add_argument("--vae", action="store_true", help="score the VAE's reconstructions of ground-truth clips instead")
    p.add_argument("--vae-file", default=None,
                   help="with --vae: score this VAE file (e.g. a training phase's) instead of the model's")
    p.add_argument("--sheet", default=None, help="write a PNG contact sheet of some of the clips scored here")
    p.add_argument("--reliance", action="store_true", help="measure how much the DiT reads colour, shape and motion words")
    p.add_argument("--paraphrases", action="store_true",
                   help="ask for the held-out combinations in phrasings never trained on (synthetic.PARAPHRASE_FRAMES)")
    p.add_argument("--demo", action="store_true",
                   help=f"score the README's prompt {DEMO_PROMPT.text!r} for seeds 0 .. --seeds - 1 (default 0-3)")
    args = p.parse_args(argv)
    if args.vae and args.vae_file:
        print(json.dumps(vae_round_trip(load_vae(args.vae_file, dtype=torch.float32), sheet=args.sheet), indent=1))
        return
    model = tiny.load_tiny(args.model)
    if args.vae:
        print(json.dumps(vae_round_trip(model.vae, sheet=args.sheet), indent=1))
        return
    if args.reliance:
        print(json.dumps(caption_reliance(model), indent=1))
        return
    if args.lora:
        from ..lora import attach, load_lora

        attach(model.dit, load_lora(args.lora, model.dit), args.strength)
    if args.demo:
        report = demo_check(model, seeds=tuple(range(args.seeds or 4)))
    else:
        prompts = paraphrase_prompts() if args.paraphrases else held_out_prompts()
        report = evaluate(model, prompts, seeds=tuple(range(args.seeds or 2)), sheet=args.sheet)
    text = json.dumps(report, indent=1)
    print(text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
