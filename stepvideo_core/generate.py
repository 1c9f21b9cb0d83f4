"""Text to video with the built-in Step-Video-Tiny on the CPU: an MP4 and a PNG contact sheet.

    python -m stepvideo_core.generate "a blue square moves right"
    python -m stepvideo_core.generate "红色的圆形向左移动" --seed 7 --out outputs

Step-Video-Tiny knows a small world: circles, squares and triangles in red, green, blue, yellow, purple or
orange, moving left, right, up or down, growing, shrinking or standing still, on black, white or gray. Any
prompt is accepted, in English or Chinese; prompts outside that world give something from inside it.
"""

from __future__ import annotations

import argparse
import hashlib
import time
from dataclasses import replace
from pathlib import Path

import torch

from .pipeline import generate
from .text_encoding import encode_prompts
from .tiny import model as tiny
from .video_io import contact_sheet, save_mp4, save_png, to_uint8


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("prompt", nargs="?", default="a blue square moves right")
    p.add_argument("--out", default="outputs")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=tiny.SETTINGS.steps)
    p.add_argument("--cfg", type=float, default=tiny.SETTINGS.cfg)
    p.add_argument("--lora", default=None, help="a LoRA file for the tiny DiT (e.g. the shipped DPO LoRA)")
    p.add_argument("--lora-strength", type=float, default=1.0)
    p.add_argument("--model", default=str(tiny.TINY_DIR))
    args = p.parse_args(argv)

    start = time.perf_counter()
    model = tiny.load_tiny(args.model)
    if args.lora:
        from .lora import attach, load_lora

        attach(model.dit, load_lora(args.lora, model.dit), args.lora_strength)
    settings = replace(tiny.SETTINGS, seed=args.seed, steps=args.steps, cfg=args.cfg)

    def progress(done, total, x, denoised):
        print(f"\rstep {done}/{total}", end="", flush=True)

    with torch.no_grad():
        pos, neg = encode_prompts(model.text, args.prompt, after="release")
        video = generate(model.dit, model.vae, pos, neg, settings, progress)
    frames = to_uint8(video[0])
    stem = "tiny_" + hashlib.sha256(f"{args.prompt}|{args.seed}".encode()).hexdigest()[:8]
    out = Path(args.out)
    mp4 = save_mp4(frames, out / f"{stem}.mp4")
    png = save_png(contact_sheet(frames), out / f"{stem}.png")
    print(f"\n{args.prompt!r}: {len(frames)} frames {settings.width}x{settings.height} in "
          f"{time.perf_counter() - start:.1f} s -> {mp4}, {png}")


if __name__ == "__main__":
    main()
