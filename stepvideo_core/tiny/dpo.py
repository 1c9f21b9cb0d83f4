"""Video-DPO for Step-Video-Tiny: preference pairs scored by the oracle, and a Diffusion-DPO LoRA on the DiT.

    python -m stepvideo_core.tiny.dpo --work runs/dpo                 # pairs, training, LoRA file
    python -m stepvideo_core.tiny.dpo --work runs/dpo --stage pairs

The objective is Diffusion-DPO in Step-Video's flow-matching convention, and the training loop is the pack's
LoRA trainer (``stepvideo_core.training``: formula and beta convention in ``training/losses.py``); this module
makes the oracle-ranked pairs and hands them to it. The reference is the frozen base model (the same DiT with
the adapters at strength 0).
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from ..lora import TARGET_MODULES
from ..text_encoding import TextConditioning, encode_prompts
from ..training.cache import Sample, TrainingSet
from ..training.trainer import TrainConfig, TrainResult, train
from . import model as tiny
from . import oracle, synthetic
from .evaluate import sample_clips

SEED = 7
LORA_DIR = tiny.TINY_DIR.parent / "loras"
LORA_FILE = LORA_DIR / "step-video-tiny-dpo.safetensors"


@dataclass
class DPOConfig:
    """The shipped LoRA's settings. On the DiT of phase 13 the earlier ones (beta 2000, lr 1e-3, 400 steps) drove the
    DPO loss to zero within a few dozen steps and cost 14 / 6 points of held-out shape; lr 3e-4 for 100 steps still
    cost 8 / 3; these keep every score within a clip or two of the base (the LoRA card)."""

    rank: int = 8
    alpha: float = 8.0
    targets: tuple[str, ...] = TARGET_MODULES
    beta: float = 500.0
    steps: int = 200
    batch: int = 8
    lr: float = 3e-4


# ---- preference data ------------------------------------------------------------------------------------------


def training_prompts(per_language: int, seed: int = SEED) -> list[tuple[str, str, tuple[str, str, str]]]:
    """(text, language, target) for combinations seen in training, in varied phrasings; the evaluation's
    held-out combinations are never used here."""
    rng = random.Random(seed)
    combos = synthetic.training_combos()
    rng.shuffle(combos)
    out = []
    for lang in ("en", "zh"):
        for combo in combos[:per_language]:
            obj = synthetic.SceneObject(*combo, x=0, y=0, half=0)
            out.append((synthetic.phrase(obj, lang, rng.randrange(3)), lang, combo))
    return out


@torch.no_grad()
def make_pairs(model: tiny.TinyModel, prompts, samples: int = 4, min_gap: float = 0.15, batch: int = 8,
               settings=tiny.SETTINGS) -> dict:
    """Sample ``samples`` clips per prompt, score each with the oracle, keep (best, worst) when they differ by
    at least ``min_gap`` in the overall score."""
    texts = [p[0] for p in prompts]
    scores = [[] for _ in prompts]
    latents = [[] for _ in prompts]
    start = time.time()
    for k in range(samples):
        lat, clips = sample_clips(model, texts, SEED * 1000 + k * 100_000, settings, batch)
        for i, (frames, prompt) in enumerate(zip(clips, prompts)):
            scores[i].append(oracle.score(frames, prompt[2]).overall)
            latents[i].append(lat[i])
        print(f"pairs: sample {k + 1}/{samples} of {len(prompts)} prompts ({time.time() - start:.0f} s)", flush=True)
    wins, losses, kept, gaps = [], [], [], []
    for i, s in enumerate(scores):
        best, worst = int(np.argmax(s)), int(np.argmin(s))
        if s[best] - s[worst] >= min_gap:
            wins.append(latents[i][best])
            losses.append(latents[i][worst])
            kept.append(i)
            gaps.append(s[best] - s[worst])
    return {"winners": torch.stack(wins), "losers": torch.stack(losses), "texts": [texts[i] for i in kept],
            "targets": [prompts[i][2] for i in kept], "languages": [prompts[i][1] for i in kept],
            "mean_gap": float(np.mean(gaps)), "prompts": len(prompts), "samples": samples,
            "mean_score": float(np.mean(scores))}


def save_pairs(pairs: dict, work: Path) -> None:
    save_file({"winners": pairs["winners"].contiguous(), "losers": pairs["losers"].contiguous()},
              str(work / "pairs.safetensors"))
    meta = {k: v for k, v in pairs.items() if k not in ("winners", "losers")}
    (work / "pairs.json").write_text(json.dumps(meta, ensure_ascii=False, indent=1))


def load_pairs(work: Path) -> dict:
    return {**load_file(str(work / "pairs.safetensors")), **json.loads((work / "pairs.json").read_text())}


# ---- training -------------------------------------------------------------------------------------------------


def training_set(model: tiny.TinyModel, pairs: dict) -> TrainingSet:
    """The pairs as the LoRA trainer's samples, in memory: winner and loser latents with their prompt's states."""
    with torch.no_grad():
        pos, neg = encode_prompts(model.text, pairs["texts"], after="keep")
    samples = [Sample(w.float(), TextConditioning(pos.llm_states[i:i + 1], pos.mask[i:i + 1], pos.clip_states[i:i + 1]),
                      loser.float()) for i, (w, loser) in enumerate(zip(pairs["winners"], pairs["losers"]))]
    return TrainingSet(samples, TextConditioning(neg.llm_states[:1], neg.mask[:1], neg.clip_states[:1]))


def train_dpo(model: tiny.TinyModel, pairs: dict, out: Path, config: DPOConfig | None = None, seed: int = SEED,
              metadata: dict[str, str] | None = None) -> TrainResult:
    """Train a LoRA on the DiT with the DPO loss by the pack's LoRA trainer (``training.trainer``), saved to
    ``out``; the text encoders and the base DiT stay frozen."""
    config = config or DPOConfig()
    train_config = TrainConfig(method="dpo", steps=config.steps, rank=config.rank, alpha=config.alpha, lr=config.lr,
                               batch_size=config.batch, seed=seed, targets=config.targets, shift=tiny.SETTINGS.shift,
                               beta=config.beta, grad_clip=0.0, checkpoint_every=config.steps)
    return train(model.dit, training_set(model, pairs), train_config, out, resume=True, metadata=metadata)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default="runs/dpo")
    p.add_argument("--stage", default="all", choices=["all", "pairs", "train"])
    p.add_argument("--prompts-per-language", type=int, default=24)
    p.add_argument("--samples", type=int, default=4)
    p.add_argument("--steps", type=int, default=DPOConfig.steps)
    p.add_argument("--beta", type=float, default=DPOConfig.beta)
    p.add_argument("--lr", type=float, default=DPOConfig.lr)
    p.add_argument("--out", default=str(LORA_FILE))
    args = p.parse_args(argv)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    model = tiny.load_tiny()
    if args.stage in ("all", "pairs"):
        pairs = make_pairs(model, training_prompts(args.prompts_per_language), samples=args.samples)
        save_pairs(pairs, work)
        print(f"pairs: kept {len(pairs['texts'])} of {pairs['prompts']} prompts, mean gap {pairs['mean_gap']:.3f}")
    if args.stage in ("all", "train"):
        pairs = load_pairs(work)
        config = replace(DPOConfig(), steps=args.steps, beta=args.beta, lr=args.lr)
        start = time.time()
        meta = {"pairs": str(len(pairs["texts"])), "base_model": tiny.NAME}
        result = train_dpo(model, pairs, work / "dpo.safetensors", config, metadata=meta)
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(result.paths["lora"], out)
        (work / "train.json").write_text(json.dumps({"seconds": round(time.time() - start), "config": asdict(config),
                                                      "history": result.history[::25]}, indent=1))
        print(f"saved {out}")

if __name__ == "__main__":
    main()
