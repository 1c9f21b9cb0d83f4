"""Run the whole generation path on a small, randomly initialised model of the official architecture.

    python -m stepvideo_core.demo "a blue square moves right" --out outputs

This shows that sampling, guidance and the chunked VAE decode run end to end on a CPU and write a video.
The weights are random, so the picture is structured noise, not the prompt: the built-in trained
Step-Video-Tiny model replaces this demo. The prompt seeds the stand-in text states so different prompts
give different videos.
"""

from __future__ import annotations

import argparse
import hashlib
import time
from pathlib import Path

import torch

from .dit import DiTConfig, StepVideoDiT
from .pipeline import GenerationSettings, generate
from .text_encoding import TextConditioning
from .vae import VAEConfig, VideoVAE
from .video_io import contact_sheet, save_mp4, save_png, to_uint8

DEMO_DIT = DiTConfig(num_attention_heads=2, attention_head_dim=32, in_channels=8, out_channels=8, num_layers=2,
                     caption_channels=(64, 32))
DEMO_VAE = VAEConfig(z_channels=8, encoder_channels=16, encoder_channel_mult=(1, 1, 2, 2), decoder_channels=32,
                     decoder_channel_mult=(1, 1, 2, 2), decoder_num_res_blocks=1, encoder_num_res_blocks=1, norm_groups=8)


def stand_in_conditioning(prompt: str) -> TextConditioning:
    seed = int.from_bytes(hashlib.sha256(prompt.encode()).digest()[:8], "little")
    g = torch.Generator().manual_seed(seed)
    llm_len = min(320, 8 + len(prompt))
    mask = torch.zeros(1, 77 + 320)
    mask[:, : 77 + llm_len] = 1
    return TextConditioning(torch.randn(1, 320, DEMO_DIT.caption_channels[0], generator=g), mask,
                            torch.randn(1, 77, DEMO_DIT.caption_channels[1], generator=g))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("prompt", nargs="?", default="a red circle moves to the left")
    p.add_argument("--out", default="outputs")
    p.add_argument("--frames", type=int, default=34)
    p.add_argument("--height", type=int, default=128)
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--seed", type=int, default=1234)
    args = p.parse_args(argv)

    torch.manual_seed(0)
    dit, vae = StepVideoDiT(DEMO_DIT).eval(), VideoVAE(DEMO_VAE).eval()
    settings = GenerationSettings.from_preset("turbo", num_frames=args.frames, height=args.height, width=args.width,
                                              seed=args.seed)
    start = time.perf_counter()

    def progress(done, total, x, denoised):
        print(f"\rstep {done}/{total}", end="", flush=True)

    with torch.no_grad():
        video = generate(dit, vae, stand_in_conditioning(args.prompt), stand_in_conditioning(""), settings, progress)
    frames = to_uint8(video[0])
    out = Path(args.out)
    stem = "demo_" + hashlib.sha256(args.prompt.encode()).hexdigest()[:8]
    mp4 = save_mp4(frames, out / f"{stem}.mp4")
    png = save_png(contact_sheet(frames), out / f"{stem}.png")
    print(f"\n{len(frames)} frames {args.width}x{args.height} in {time.perf_counter() - start:.1f} s "
          f"(random-weight demo model) -> {mp4}, {png}")


if __name__ == "__main__":
    main()
