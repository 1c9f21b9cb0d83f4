"""Video-DPO through the train_lora CLI on oracle-ranked pairs of Step-Video-Tiny clips, and the gain it gives.

    OMP_NUM_THREADS=1 python bench/dpo_cli_measure.py --work runs/dpo_cli [--prompts-per-language 12]

1. Pairs as the tiny lab makes them (``tiny.dpo.make_pairs``: several samples per training prompt, the oracle's
   best and worst), written as MP4 files and a pairs.jsonl, the layout a user brings.
2. ``python -m stepvideo_core.train_lora --method dpo --pairs pairs.jsonl`` (the clips go through the VAE again).
3. The held-out evaluation of the lab (``tiny.evaluate``), base and with the LoRA, one seed.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from stepvideo_core import train_lora
from stepvideo_core.lora import attach, load_lora
from stepvideo_core.tiny import dpo, evaluate
from stepvideo_core.tiny import model as tiny
from stepvideo_core.video_io import save_mp4, to_uint8


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--work", default="runs/dpo_cli")
    p.add_argument("--prompts-per-language", type=int, default=12)
    p.add_argument("--steps", type=int, default=200)
    args = p.parse_args()
    work = Path(args.work)
    (work / "clips").mkdir(parents=True, exist_ok=True)
    model = tiny.load_tiny()
    start = time.time()
    pairs = dpo.make_pairs(model, dpo.training_prompts(args.prompts_per_language))
    lines = []
    with torch.no_grad():
        for i, (text, w, loser) in enumerate(zip(pairs["texts"], pairs["winners"], pairs["losers"])):
            for tag, lat in (("chosen", w), ("rejected", loser)):
                save_mp4(to_uint8(model.vae.decode(lat[None].float())[0]), work / "clips" / f"{i:03d}_{tag}.mp4")
            lines.append({"prompt": text, "chosen": f"clips/{i:03d}_chosen.mp4", "rejected": f"clips/{i:03d}_rejected.mp4"})
    (work / "pairs.jsonl").write_text("\n".join(json.dumps(x, ensure_ascii=False) for x in lines) + "\n", encoding="utf-8")
    made = time.time() - start
    out = work / "dpo.safetensors"
    start = time.time()
    train_lora.main(["--pairs", str(work / "pairs.jsonl"), "--out", str(out), "--steps", str(args.steps),
                     "--rank", "8", "--lr", "1e-3", "--batch-size", "8", "--beta", "2000", "--seed", "7", "--quiet",
                     "--resume"])
    trained = time.time() - start
    prompts = evaluate.held_out_prompts()
    base = evaluate.evaluate(model, prompts, seeds=(0,))
    handle = attach(model.dit, load_lora(out, model.dit), 1.0)
    tuned = evaluate.evaluate(model, prompts, seeds=(0,))
    handle.detach()
    keys = ("overall", "colour", "shape", "motion", "artifacts")
    result = {"pairs": len(lines), "prompts": pairs["prompts"], "mean_gap": pairs["mean_gap"], "pairs_seconds": round(made),
              "train_seconds": round(trained), "steps": args.steps,
              "base": {lang: {k: round(base[lang][k], 3) for k in keys} for lang in base},
              "lora": {lang: {k: round(tuned[lang][k], 3) for k in keys} for lang in tuned}}
    (work / "result.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
