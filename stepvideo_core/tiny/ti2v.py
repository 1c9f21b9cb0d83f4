"""Step-Video-Tiny TI2V: the tiny DiT taught image to video, the way Step-Video-TI2V grew out of Step-Video-T2V.

    python -m stepvideo_core.tiny.ti2v --work runs/tiny-ti2v             # latents, DiT phases, export
    python -m stepvideo_core.tiny.ti2v --evaluate                        # oracle + first-frame PSNR, held out

The shipped T2V DiT is widened: its patch embedding reads twice the channels (latents, then the condition), the
condition half starting at zero, and a motion-score embedder whose output layer starts at zero, so the widened
model starts out as exactly the T2V model. It is then fine-tuned with flow matching on the synthetic world, the
condition being the clip's first frame encoded alone (``image_condition``'s recipe); the VAE and both text
encoders are the shipped ones, frozen and shared. The motion score is 2 for clips where nothing moves and 5 (the
official default) otherwise, so "2 = stable" holds here as in the release. Weights go to
``models/step-video-tiny-ti2v/transformer`` in the official layout.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from ..dit import StepVideoDiT, load_dit
from ..image_condition import image_condition
from ..pipeline import GenerationSettings, latent_shape, sample_latents
from ..scheduler import make_noise
from ..text_encoding import NEGATIVE_MAGIC, POSITIVE_MAGIC, TextConditioning, combined_mask, encode_prompts
from ..vae import load_vae
from ..video_io import save_png, to_uint8
from . import evaluate, oracle, synthetic
from . import model as tiny
from .train import (
    EMA,
    SEED,
    cosine_lr,
    flow_matching_loss,
    log,
    sample_training_times,
    scene_batches,
    write_transformer,
)

STILL_SCORE, MOVING_SCORE = 2.0, 5.0
# The shipped workflow's example: its start image (workflows/inputs/) is this scene's first frame.
EXAMPLE = synthetic.SceneObject("red", "circle", "right", x=0, y=0, half=0)
EXAMPLE_PROMPT = synthetic.english_phrase(EXAMPLE, 0)
EXAMPLE_IMAGE_NAME = "step_video_tiny_ti2v_start.png"
# (steps, learning rate) per phase; each phase resumes from its last checkpoint and goes on from the previous phase's
# weights. The shipped recipe is one phase of 800 steps of 12 clips (364 s on the 2 cores, training.json).
PHASES = ((800, 5e-4),)


def motion_score_for(motions) -> float:
    """The world's motion score: 2 (the release's "stable") when nothing moves, 5 (its default) otherwise."""
    return STILL_SCORE if all(m == "still" for m in motions) else MOVING_SCORE


def widen_for_image(t2v: StepVideoDiT, seed: int = SEED) -> StepVideoDiT:
    """A TI2V DiT that computes exactly what ``t2v`` computes: every T2V weight copied, the patch embedding's
    condition channels and the motion-score embedder's output layer at zero (its input layer random, so
    gradients can reach it)."""
    config = replace(t2v.config, use_additional_conditions=True)
    torch.manual_seed(seed)
    model = StepVideoDiT(config)
    source = t2v.state_dict()
    target = model.state_dict()
    with torch.no_grad():
        for key, value in source.items():
            if key == "pos_embed.proj.weight":
                target[key].zero_()
                target[key][:, : config.in_channels] = value
            else:
                target[key].copy_(value)
        embedder = model.adaln_single.emb.motion_score_embedder
        embedder.linear_2.weight.zero_()
        embedder.linear_2.bias.zero_()
    return model


# ---- data -------------------------------------------------------------------------------------------------------


@torch.no_grad()
def encode_dataset(work: Path, count: int = 240, batch: int = 4) -> Path:
    """``count`` training clips: posterior means of the whole clip (what the DiT learns, as in
    ``train.encode_latents``), posterior moments of its first frame encoded alone (the condition is drawn from
    them, as the pipeline encodes a start image), captions, and each clip's motion score."""
    vae = load_vae(tiny.paths()["vae"], dtype=torch.float32)
    rng = random.Random(SEED + 41)
    combos = synthetic.training_combos()
    clips, firsts, records = [], [], []
    start = time.time()
    for i, scenes, x in scene_batches(rng, combos, count, batch):
        clips.append(vae.encoder(x).permute(0, 2, 1, 3, 4).chunk(2, dim=2)[0].contiguous())
        firsts.append(vae.encoder(x[:, :, :1]).permute(0, 2, 1, 3, 4).contiguous())
        records += [{"en": list(s.captions["en"]), "zh": list(s.captions["zh"]),
                     "motion_score": motion_score_for(o.motion for o in s.objects)} for s in scenes]
        if i % 40 == 0:
            log(f"ti2v latents {i}/{count} ({time.time() - start:.0f} s)")
    path = work / "ti2v_latents.safetensors"
    save_file({"clip": torch.cat(clips), "first": torch.cat(firsts)}, str(path))
    (work / "ti2v_captions.json").write_text(json.dumps(records, ensure_ascii=False))
    (work / "ti2v_latents.json").write_text(json.dumps({"clips": count, "seconds": round(time.time() - start)}))
    return path


def posterior_sample(moments: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    mean, logvar = moments.chunk(2, dim=2)
    return mean + (0.5 * logvar.clamp(-30, 20)).exp() * torch.randn(mean.shape, generator=generator)


# ---- training ----------------------------------------------------------------------------------------------------


@torch.no_grad()
def encode_short(encoders, texts: list[str]) -> dict:
    """DiT text inputs with the LLM run on the longest prompt's tokens only: the same states as the full 320
    (its attention is causal and the DiT cuts keys to the longest mask anyway), several times cheaper."""
    ids, mask = encoders.tokenizer(texts)
    length = int(mask.sum(1).max())
    llm_states = encoders.step_llm(ids[:, :length], mask[:, :length])
    return TextConditioning(llm_states, combined_mask(mask[:, :length]), encoders.clip(texts)).dit_kwargs()


def _checkpoint(work: Path, phase: int) -> Path:
    return work / f"ti2v_phase{phase}_checkpoint.pt"


def train_phase(work: Path, phase: int, steps: int, lr: float, batch: int = 12, uncond: float = 0.1,
                chinese: float = 0.5, warmup: int = 50, seconds: float | None = None, save_every: int = 100) -> None:
    """One fine-tuning phase: flow matching with the first frame as the condition, text encoders frozen. Resumes
    from its own checkpoint (model, EMA, optimiser, step, random state) if one exists."""
    store = load_file(str(work / "ti2v_latents.safetensors"))
    records = json.loads((work / "ti2v_captions.json").read_text())
    scores = torch.tensor([r["motion_score"] for r in records])
    text_model = tiny.load_tiny().text
    if phase == 1:
        dit = widen_for_image(load_dit(tiny.paths()["transformer"], weight_dtype=torch.float32))
    else:
        dit = StepVideoDiT(tiny.TI2V_DIT_CONFIG)
        dit.load_state_dict(load_file(str(work / f"ti2v_dit_phase{phase - 1}.safetensors")))
    dit.train().requires_grad_(True)
    opt = torch.optim.AdamW(dit.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.99))
    ema = EMA([dit], decay=0.995)
    rng, gen, first_step = random.Random(SEED + 43 + phase), torch.Generator().manual_seed(SEED + 44 + phase), 0
    earlier_seconds = 0.0  # spent by the runs this one resumes
    ckpt = _checkpoint(work, phase)
    if ckpt.exists():
        state = torch.load(ckpt, weights_only=True)
        dit.load_state_dict(state["dit"])
        opt.load_state_dict(state["opt"])
        for s, v in zip(ema.shadow, state["ema"]):
            s.copy_(v)
        rng.setstate(state["rng"])
        gen.set_state(state["gen"])
        first_step, earlier_seconds = state["step"], float(state["seconds"])
        log(f"ti2v phase {phase}: resumed at step {first_step}")
    start, running = time.time(), None
    for step in range(first_step, steps):
        opt.param_groups[0]["lr"] = cosine_lr(step, steps, lr, warmup=warmup)
        idx = torch.randint(0, len(records), (batch,), generator=gen)
        latents = store["clip"][idx]
        condition = torch.zeros_like(latents)
        condition[:, :1] = posterior_sample(store["first"][idx], gen)
        texts = []
        for i in idx.tolist():
            if rng.random() < uncond:
                texts.append(NEGATIVE_MAGIC)
            else:
                texts.append(rng.choice(records[i]["zh" if rng.random() < chinese else "en"]) + POSITIVE_MAGIC)
        text = encode_short(text_model, texts)
        text["condition_hidden_states"] = condition
        text["motion_score"] = scores[idx]
        t = sample_training_times(batch, gen, tiny.SETTINGS.shift)
        loss = flow_matching_loss(dit, latents, text, t, torch.randn(latents.shape, generator=gen))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(dit.parameters(), 1.0)
        opt.step()
        ema.update(step)
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        if step % 25 == 0 or step == steps - 1:
            log(f"ti2v phase {phase} step {step}/{steps} loss {running:.4f} ({time.time() - start:.0f} s)")
        out_of_time = seconds is not None and time.time() - start > seconds
        if (step + 1) % save_every == 0 or out_of_time:
            torch.save({"dit": dit.state_dict(), "opt": opt.state_dict(), "ema": ema.shadow, "rng": rng.getstate(),
                        "gen": gen.get_state(), "step": step + 1, "seconds": earlier_seconds + time.time() - start},
                       ckpt)
        if out_of_time:
            log(f"ti2v phase {phase}: time budget reached at step {step + 1}; run again to resume")
            return
    ema.copy_to()
    save_file({k: v.contiguous() for k, v in dit.state_dict().items()}, str(work / f"ti2v_dit_phase{phase}.safetensors"))
    (work / f"ti2v_dit_phase{phase}.json").write_text(json.dumps({"steps": steps, "batch": batch, "lr": lr,
                                                                  "seconds": round(earlier_seconds + time.time() - start)}))
    ckpt.unlink(missing_ok=True)


def export(work: Path, out: Path = tiny.TI2V_DIR, dtype: torch.dtype = torch.float16) -> None:
    """The last phase's DiT in the official layout (fp16, one shard + index + config.json)."""
    state = load_file(str(work / f"ti2v_dit_phase{len(PHASES)}.safetensors"))
    write_transformer(out / "transformer", {k: v.to(dtype) for k, v in state.items()}, tiny.TI2V_DIT_CONFIG)
    stats = {name: json.loads((work / f"{name}.json").read_text())
             for name in ("ti2v_latents", *(f"ti2v_dit_phase{i + 1}" for i in range(len(PHASES))))
             if (work / f"{name}.json").exists()}
    (out / "training.json").write_text(json.dumps(stats, indent=1))
    log(f"exported to {out}")


# ---- model and evaluation -------------------------------------------------------------------------------------


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """Peak signal-to-noise ratio of two uint8 images, in dB."""
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


@torch.no_grad()
def generate_from_image(model: tiny.TinyModel, prompt: str, start: np.ndarray, seed: int,
                        motion_score: float = MOVING_SCORE,
                        settings: GenerationSettings = tiny.SETTINGS) -> np.ndarray:
    """One clip [T, H, W, 3] uint8 from a uint8 start image [H, W, 3] and a prompt."""
    image = torch.from_numpy(start).permute(2, 0, 1).float() / 127.5 - 1.0
    condition = image_condition(model.vae, image, settings.num_frames, settings.height, settings.width,
                                motion_score=motion_score, generator=torch.Generator().manual_seed(seed))
    pos, neg = encode_prompts(model.text, prompt, after="keep")
    noise = make_noise(latent_shape(settings, model.dit.config.in_channels, 1), seed)
    latents = sample_latents(model.dit, pos, neg, settings, noise=noise, image=condition)
    return to_uint8(model.vae.decode(latents)[0])


def evaluate_ti2v(model: tiny.TinyModel, seeds=(0, 1), still_score: bool = False) -> dict:
    """Held-out combinations, English and Chinese: a start frame rendered from a world scene of the combination,
    its caption as the prompt; the oracle checks the clip against that scene's object, and the first generated
    frame is compared with the start image (PSNR). ``still_score`` asks with motion score 2 for "still" prompts
    (the world's "stable"), otherwise every prompt gets the default 5."""
    report = {}
    for language in evaluate.LANGUAGES:
        rows, psnrs = [], []
        for seed in seeds:
            rng = random.Random(1000 + seed)
            for prompt in evaluate.held_out_prompts((language,)):
                scene = synthetic.scene_for(*prompt.target, rng)
                start = synthetic.render(scene)[0]
                score = STILL_SCORE if still_score and prompt.target[2] == "still" else MOVING_SCORE
                frames = generate_from_image(model, prompt.text, start, seed, score)
                rows.append((prompt.target, oracle.score(frames, scene.objects[0])))
                psnrs.append(psnr(frames[0], start))
        report[language] = {**evaluate.summarise(rows), "first_frame_psnr": float(np.mean(psnrs))}
    return report


def example_start_image() -> np.ndarray:
    """The example's start image, uint8 [H, W, 3]: the first frame of a fixed scene of the world."""
    scene = synthetic.scene_for(*EXAMPLE.combo, random.Random(7), background="black")
    return synthetic.render(scene)[0]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default="runs/tiny-ti2v")
    p.add_argument("--stage", default="all", choices=["all", "latents", "dit", "export"])
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--seconds", type=float, default=None, help="stop a phase after this long (run again to resume)")
    p.add_argument("--evaluate", action="store_true", help="score the shipped (or --model) TI2V model instead")
    p.add_argument("--model", default=str(tiny.TI2V_DIR))
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--still-score", action="store_true", help="motion score 2 for 'still' prompts when evaluating")
    p.add_argument("--example", default=None, help="write the example start image into this folder and stop")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.example:
        print(save_png(example_start_image(), Path(args.example) / EXAMPLE_IMAGE_NAME))
        return
    if args.evaluate:
        report = evaluate_ti2v(tiny.load_tiny_ti2v(args.model), tuple(range(args.seeds)), args.still_score)
        print(json.dumps(report, indent=1))
        return
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    if args.stage in ("all", "latents") and not (work / "ti2v_latents.json").exists():
        encode_dataset(work)
    if args.stage in ("all", "dit"):
        for phase, (steps, lr) in enumerate(PHASES, start=1):
            if not (work / f"ti2v_dit_phase{phase}.json").exists():
                train_phase(work, phase, steps, lr, seconds=args.seconds)
                if not (work / f"ti2v_dit_phase{phase}.json").exists():
                    return  # stopped by the time budget
    if args.stage in ("all", "export"):
        export(work)


if __name__ == "__main__":
    main()
