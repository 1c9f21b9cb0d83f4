"""Video-DPO for Step-Video-Tiny: preference pairs scored by the oracle, and a Diffusion-DPO LoRA on the DiT.

    python -m stepvideo_core.tiny.dpo --work runs/dpo                 # pairs, training, LoRA file
    python -m stepvideo_core.tiny.dpo --work runs/dpo --stage pairs

The objective is Diffusion-DPO (Wallace et al., 2023) in Step-Video's flow-matching convention. For a prompt c
with a preferred clip x_w and a rejected one x_l (latents), one time t and one noise draw e shared by both:

    x_t       = t * x + (1 - t) * e                      (t = 0 is noise, as the sampler runs)
    err(m, x) = mean over elements of (v_m(x_t, t, c) - (x - e))^2
    margin    = [err(lora, x_w) - err(ref, x_w)] - [err(lora, x_l) - err(ref, x_l)]
    loss      = -log sigmoid(-beta * margin)

``ref`` is the frozen base model (the same DiT with the adapters at strength 0), so the LoRA is rewarded for
fitting the winner better than the base does, relative to the loser. ``beta`` multiplies a per-element mean
error, so it is large (the paper's 5000 is on the same per-element scale).
"""

from __future__ import annotations

import argparse
import json
import random
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from ..lora import TARGET_MODULES, LoraSet, attach, new_trainable_lora, save_lora
from ..scheduler import flow_matching_loss, sample_training_times
from ..text_encoding import TextConditioning, encode_prompts
from . import model as tiny
from . import oracle, synthetic
from .evaluate import sample_clips

SEED = 7
LORA_DIR = tiny.TINY_DIR.parent / "loras"
LORA_FILE = LORA_DIR / "step-video-tiny-dpo.safetensors"


@dataclass
class DPOConfig:
    rank: int = 8
    alpha: float = 8.0
    targets: tuple[str, ...] = TARGET_MODULES
    beta: float = 2000.0
    steps: int = 400
    batch: int = 8
    lr: float = 1e-3


def dpo_loss(lora_w: torch.Tensor, ref_w: torch.Tensor, lora_l: torch.Tensor, ref_l: torch.Tensor,
             beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample flow-matching errors in; (mean loss, share of pairs the LoRA already ranks right) out."""
    margin = (lora_w - ref_w) - (lora_l - ref_l)
    return -F.logsigmoid(-beta * margin).mean(), (margin < 0).float().mean()


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


def train_dpo(model: tiny.TinyModel, pairs: dict, config: DPOConfig | None = None, seed: int = SEED,
              log_every: int = 25) -> tuple[LoraSet, list[dict]]:
    """Train a LoRA on the DiT with the DPO loss; the text encoders and the base DiT stay frozen."""
    config = config or DPOConfig()
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    dit = model.dit.requires_grad_(False)
    with torch.no_grad():
        pos, _ = encode_prompts(model.text, pairs["texts"], after="keep")
    lora = new_trainable_lora(dit, config.rank, config.targets, config.alpha, seed=seed)
    params = [t for pair in lora.pairs.values() for t in (pair.up, pair.down)]
    opt = torch.optim.AdamW(params, lr=config.lr, weight_decay=0.0)
    hooks = attach(dit, lora, 1.0)
    winners, losers = pairs["winners"].float(), pairs["losers"].float()
    history, start = [], time.time()
    try:
        for step in range(config.steps):
            idx = torch.randint(0, len(winners), (config.batch,), generator=gen)
            text = TextConditioning(pos.llm_states[idx], pos.mask[idx], pos.clip_states[idx]).dit_kwargs()
            t = sample_training_times(config.batch, gen, tiny.SETTINGS.shift)
            both = torch.cat([winners[idx], losers[idx]])
            noise = torch.randn(both[:config.batch].shape, generator=gen)
            text2 = {k: torch.cat([v, v]) for k, v in text.items()}
            t2, noise2 = torch.cat([t, t]), torch.cat([noise, noise])
            with torch.no_grad():
                hooks.set_strength(0.0)
                ref = flow_matching_loss(dit, both, text2, t2, noise2, reduce=False)
                hooks.set_strength(1.0)
            err = flow_matching_loss(dit, both, text2, t2, noise2, reduce=False)
            n = config.batch
            loss, acc = dpo_loss(err[:n], ref[:n], err[n:], ref[n:], config.beta)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if step % log_every == 0 or step == config.steps - 1:
                history.append({"step": step, "loss": round(loss.item(), 4), "ranked_right": round(acc.item(), 3)})
                print(f"dpo step {step}/{config.steps} loss {loss.item():.4f} ranked right {acc.item():.2f} "
                      f"({time.time() - start:.0f} s)", flush=True)
    finally:
        hooks.detach()
    return lora, history


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
        lora, history = train_dpo(model, pairs, config)
        meta = {"beta": str(config.beta), "lr": str(config.lr), "rank": str(config.rank), "alpha": str(config.alpha),
                "steps": str(config.steps), "pairs": str(len(pairs["texts"])), "seconds": str(round(time.time() - start)),
                "base_model": tiny.NAME}
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        save_lora(lora, out, metadata=meta)
        (work / "train.json").write_text(json.dumps({"meta": meta, "history": history}, indent=1))
        print(f"saved {out}")


if __name__ == "__main__":
    main()
