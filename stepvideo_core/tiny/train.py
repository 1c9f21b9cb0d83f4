"""Train Step-Video-Tiny from nothing on the synthetic world, in stages, with fixed seeds, on a CPU.

    python -m stepvideo_core.tiny.train --work runs/tiny            # every stage, then export to models/
    python -m stepvideo_core.tiny.train --work runs/tiny --stage vae

Stages: ``tokenizers`` (SentencePiece for Step-LLM, a WordPiece vocabulary for the BERT), ``text`` (both text
encoders pretrained to tell apart the colour, shape and motion a caption names), ``vae`` (the Video-VAE on
reconstruction in the phases of ``VAE_PHASES``, then its output convolution solved by least squares),
``latents`` (the training clips encoded once), ``dit`` (the DiT with flow matching, the two text encoders
trained with it end to end, in the phases of ``DIT_PHASES``), ``export`` (fp16 safetensors in the official
layout). Every phase writes its own file, and a stage skips the phases already done. The long phases write a
checkpoint every few minutes and a rerun resumes from it, so a run that is stopped loses at most those minutes.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from ..dit import DiTConfig, StepVideoDiT
from ..scheduler import flow_matching_loss, sample_training_times
from ..step_llm import CONTROL_TOKENS, MASK_TOKENS, TOKENIZER_FILE, StepLLM, StepLLMTokenizer
from ..text_encoding import NEGATIVE_MAGIC, POSITIVE_MAGIC, combined_mask
from ..vae import NORM_GROUPS_KEY, VideoVAE, load_vae
from . import model as tiny
from . import synthetic

SEED = 20261121


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def cosine_lr(step: int, total: int, peak: float, warmup: int, floor: float = 0.05) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


def clip_batch(rng: random.Random, count: int, crop: int | None = None, around_objects: bool = False,
               recolour: float = 0.0, frames: int = 17) -> tuple[torch.Tensor, torch.Tensor]:
    """``count`` fresh training clips [b, 3, frames, H, W] in [-1, 1], optionally cropped square (anywhere, or
    ``around_objects``: a window holding the first object's start), and a mask [b, 1, frames, H, W] of the pixels
    that belong to objects (anything off the background colour). A share ``recolour`` of the clips get a
    random background colour: the world's backgrounds are all grey, and a VAE that only ever sees colour in
    small objects learns it very slowly. ``frames`` below 17 keeps the first frames of a 17-frame clip (every
    VAE layer is causal, so they are encoded exactly as inside the whole clip)."""
    combos = synthetic.training_combos()
    clips, masks = [], []
    for _ in range(count):
        scene = synthetic.make_scene(rng, combos)
        rendered = synthetic.render(scene)[:frames]
        bg = np.array(synthetic.BACKGROUNDS[scene.background][0])
        mask = (np.abs(rendered.astype(int) - bg).max(-1) > 8)[None].astype(np.float32)
        video = synthetic.to_model_range(rendered)
        if rng.random() < recolour:
            colour = np.array([rng.uniform(-1, 1) for _ in range(3)], np.float32)[:, None, None, None]
            video = np.where(mask > 0, video, colour)
        if crop and around_objects:
            obj = scene.objects[0]
            x = min(max(int(obj.x) - rng.randrange(8, crop - 8), 0), synthetic.SIZE - crop)
            y = min(max(int(obj.y) - rng.randrange(8, crop - 8), 0), synthetic.SIZE - crop)
        elif crop:
            y, x = rng.randrange(0, synthetic.SIZE - crop + 1), rng.randrange(0, synthetic.SIZE - crop + 1)
        if crop:
            video, mask = video[:, :, y:y + crop, x:x + crop], mask[:, :, y:y + crop, x:x + crop]
        clips.append(torch.from_numpy(np.ascontiguousarray(video)))
        masks.append(torch.from_numpy(np.ascontiguousarray(mask)))
    return torch.stack(clips), torch.stack(masks)


# ---- tokenizers ------------------------------------------------------------------------------------------------


def caption_corpus() -> list[str]:
    """Every single-object caption of the world (held-out combinations too: they are words, not clips), a set
    of two-object ones, and the two prompt suffixes of the official pipeline."""
    rng = random.Random(SEED)
    lines = []
    for colour in synthetic.COLOURS:
        for shape in synthetic.SHAPES:
            for motion in synthetic.MOTIONS:
                for background in synthetic.BACKGROUNDS:
                    scene = synthetic.scene_for(colour, shape, motion, rng, background)
                    lines += scene.captions["en"] + scene.captions["zh"]
    combos = synthetic.training_combos()
    for _ in range(300):
        lines += synthetic.make_scene(rng, combos, two_objects=1.0).captions["en"][:1]
    return sorted(set(lines)) + [POSITIVE_MAGIC, NEGATIVE_MAGIC]


def train_sentencepiece(folder: Path, corpus: list[str], vocab_size: int = 640) -> Path:
    """A BPE SentencePiece model with the Step-1 chat tokenizer's ids (unk 0, bos 1, eos 2) and special tokens;
    byte fallback lets any text, in any script, be encoded."""
    import sentencepiece as spm

    folder.mkdir(parents=True, exist_ok=True)
    text = folder / "corpus.txt"
    text.write_text("\n".join(corpus) + "\n", encoding="utf-8")
    try:
        spm.SentencePieceTrainer.train(
            input=str(text), model_prefix=str(folder / Path(TOKENIZER_FILE).stem), vocab_size=vocab_size,
            model_type="bpe", character_coverage=1.0, hard_vocab_limit=False, unk_id=0, bos_id=1, eos_id=2,
            pad_id=-1, control_symbols=list(CONTROL_TOKENS), user_defined_symbols=list(MASK_TOKENS),
            byte_fallback=True, minloglevel=2, num_threads=1,
        )
    finally:
        text.unlink()
    (folder / (Path(TOKENIZER_FILE).stem + ".vocab")).unlink()
    return folder / TOKENIZER_FILE


BERT_SPECIALS = ["[PAD]"] + [f"[unused{i}]" for i in range(1, 100)] + ["[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def bert_words(corpus: list[str]) -> set[str]:
    """Every piece BERT's basic tokenizer makes of the corpus (``tokenizers``' BERT normaliser and pre-tokenizer,
    set as the shipped tokenizer_config.json asks: lower case, CJK characters and punctuation on their own)."""
    from tokenizers import normalizers, pre_tokenizers

    normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True, lowercase=True)
    splitter = pre_tokenizers.BertPreTokenizer()
    return {piece for line in corpus for piece, _ in splitter.pre_tokenize_str(normalizer.normalize_str(line))}


def write_wordpiece_vocab(folder: Path, corpus: list[str]) -> Path:
    """A BERT vocabulary in the Chinese-RoBERTa id order: specials, then every character and whole word of the
    corpus, sorted (no sub-word pieces: the world's words are few). Written by ``tokenizers``' WordPiece model."""
    from tokenizers.models import WordPiece

    pieces = sorted(bert_words(corpus) | set(",.!?;:'\"()-"))
    folder.mkdir(parents=True, exist_ok=True)
    (path,) = WordPiece({token: i for i, token in enumerate(BERT_SPECIALS + pieces)}, unk_token="[UNK]").save(str(folder))
    (folder / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": True, "tokenize_chinese_chars": True}))
    return Path(path)


def train_tokenizers(work: Path) -> None:
    corpus = caption_corpus()
    train_sentencepiece(work / "step_llm", corpus)
    write_wordpiece_vocab(work / "hunyuan_clip" / "tokenizer", corpus)
    log(f"tokenizers: {len(corpus)} corpus lines")


# ---- VAE -----------------------------------------------------------------------------------------------------


def vae_official_state(vae: VideoVAE) -> dict[str, torch.Tensor]:
    """The state dict under the release's key names, which are the module's own (tests/host builds with it)."""
    return vae.state_dict()


def save_vae(vae: VideoVAE, path: Path) -> None:
    """The release's key names, with the GroupNorm group count in the metadata (no tensor shape tells it)."""
    save_file({k: v.contiguous() for k, v in vae_official_state(vae).items()}, str(path),
              metadata={NORM_GROUPS_KEY: str(vae.config.norm_groups)})


@dataclass(frozen=True)
class VAEPhase:
    """One VAE training phase: reconstruction (L1 + MSE, object pixels weighted up) plus a light KL term."""

    name: str
    steps: int
    lr: float
    batch: int = 2
    frames: int = 17
    crop: int | None = None  # None: whole 128-pixel frames, whose per-frame norm statistics are inference's
    object_weight: float = 5.0  # objects cover a few percent of a frame; a plain average sees only background
    edge_weight: float = 0.0  # L1 of the spatial gradients: sharp edges and corners carry the shape
    recolour: float = 0.0
    kl_weight: float = 0.02  # at 3e-3 the latents' spread passed 7 within 80 steps, a poor match for unit noise
    warmup: int = 30
    init: str | None = None  # the phase whose weights this one starts from (None: from nothing)
    # The encoder fixed and the decoder trained on posterior means, the latents the DiT learns and makes: the
    # latents stay as they were, so a DiT trained on them stays valid.
    decoder_only: bool = False
    boundary_weight: float = 0.0  # extra weight on the pixels within a pixel of an object's outline
    decoder_res_blocks: int = 0  # more res blocks per decoder level than ``init`` has deepen it (deepen_decoder)


def deepen_decoder(vae: VideoVAE, blocks: int) -> VideoVAE:
    """The VAE with ``blocks`` res blocks at every decoder level, computing exactly what ``vae`` computes: the
    new blocks are appended after each level's last one with their second convolution at zero, and a res block
    adds its input to that convolution's output, so each passes its input through until training moves it."""
    torch.manual_seed(SEED)
    deeper = VideoVAE(replace(vae.config, decoder_num_res_blocks=blocks))
    missing, unexpected = deeper.load_state_dict(vae.state_dict(), strict=False)
    old = vae.config.decoder_num_res_blocks
    if unexpected or any(not k.startswith("decoder.up.") or int(k.split(".")[4]) < old for k in missing):
        raise ValueError(f"cannot deepen this decoder: unexpected {unexpected[:3]}, missing {missing[:3]}")
    with torch.no_grad():
        for stage in deeper.decoder.up:
            for block in stage.block[old:]:
                block.conv2.conv.weight.zero_()
                block.conv2.conv.bias.zero_()
    return deeper


def spatial_gradients(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return x[..., 1:, :] - x[..., :-1, :], x[..., :, 1:] - x[..., :, :-1]


def outline(objects: torch.Tensor) -> torch.Tensor:
    """The pixels within one pixel of an object's outline in masks [b, 1, T, H, W]: the mask dilated by a 3x3
    square minus the mask eroded by it. The oracle reads shape from how much of its box an object fills, and
    corners and tips are where a blurred outline loses it."""
    frames = objects.transpose(1, 2).flatten(0, 1)
    band = F.max_pool2d(frames, 3, 1, 1) + F.max_pool2d(-frames, 3, 1, 1)
    return band.unflatten(0, objects.shape[:1] + objects.shape[2:3]).transpose(1, 2)


def train_vae(work: Path, phase: VAEPhase, config=None, save_every: float = 240.0) -> Path:
    """Train one VAE phase; resumable: a checkpoint (weights, optimiser, step) is written every ``save_every``
    seconds and a rerun goes on from it, so an interrupted phase loses at most that much. Each step's clips and
    noise come from generators seeded by the step number, so a resumed phase sees what an unbroken one would."""
    config = config or tiny.VAE_CONFIG
    final, checkpoint = work / f"{phase.name}.safetensors", work / f"{phase.name}.ckpt.pt"
    if phase.init is None:
        torch.manual_seed(SEED)
        vae = VideoVAE(config)
        with torch.no_grad():  # start nearly deterministic (sigma ~ 0.05): posterior noise at sigma 1 swamps early learning
            vae.encoder.conv_out.conv.bias[config.z_channels:].fill_(-6.0)
    else:
        vae = load_vae(work / f"{phase.init}.safetensors", dtype=torch.float32)
        if phase.decoder_res_blocks > vae.config.decoder_num_res_blocks:
            vae = deepen_decoder(vae, phase.decoder_res_blocks)
    vae.train().requires_grad_(True)
    if phase.decoder_only:
        vae.encoder.eval().requires_grad_(False)
    trained = vae.decoder if phase.decoder_only else vae
    opt = torch.optim.AdamW(trained.parameters(), lr=phase.lr, weight_decay=0.0, betas=(0.9, 0.99))
    first, spent = 0, 0.0
    if checkpoint.exists():
        state = torch.load(checkpoint, weights_only=True)
        vae.load_state_dict(state["vae"])
        opt.load_state_dict(state["optimizer"])
        first, spent = int(state["step"]), float(state["seconds"])
        log(f"{phase.name}: resuming at step {first}")
    start, saved = time.time() - spent, time.time()
    for step in range(first, phase.steps):
        rng = random.Random(f"{SEED}/{phase.name}/{step}")
        noise = torch.Generator().manual_seed(SEED + step)
        x, objects = clip_batch(rng, phase.batch, phase.crop, around_objects=phase.crop is not None,
                                recolour=phase.recolour, frames=phase.frames)
        for group in opt.param_groups:
            group["lr"] = cosine_lr(step, phase.steps, phase.lr, warmup=phase.warmup)
        with torch.set_grad_enabled(not phase.decoder_only):
            mean, logvar = vae.encoder(x).chunk(2, dim=1)
        logvar = logvar.clamp(-30, 20)
        sample = torch.randn(mean.shape, generator=noise) * (0.5 * logvar).exp()
        y = vae.decoder(mean if phase.decoder_only else mean + sample)
        weight = 1 + phase.object_weight * objects
        if phase.boundary_weight:
            weight = weight + phase.boundary_weight * outline(objects)
        rec = ((y - x).abs() * weight).mean() + ((y - x).pow(2) * weight).mean()
        if phase.edge_weight:
            rec = rec + phase.edge_weight * sum((gy - gx).abs().mean() for gy, gx in
                                                zip(spatial_gradients(y), spatial_gradients(x)))
        kl = 0.5 * (mean.pow(2) + logvar.exp() - 1 - logvar).mean()
        loss = rec if phase.decoder_only else rec + phase.kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trained.parameters(), 1.0)
        opt.step()
        if step % 10 == 0 or step == phase.steps - 1:
            object_error = float(((y - x).detach().abs() * objects).sum() / objects.sum().clamp(min=1) / 3)
            log(f"{phase.name} step {step}/{phase.steps} rec {rec.item():.4f} object L1 {object_error:.3f} "
                f"kl {kl.item():.3f} z std {mean.std().item():.2f} ({time.time() - start:.0f} s)")
        if time.time() - saved > save_every:
            torch.save({"vae": vae.state_dict(), "optimizer": opt.state_dict(), "step": step + 1,
                        "seconds": time.time() - start}, checkpoint)
            save_vae(vae, work / f"{phase.name}.latest.safetensors")  # scoreable while the phase runs
            saved = time.time()
    save_vae(vae, final)
    (work / f"{phase.name}.json").write_text(json.dumps({**asdict(phase), "seconds": round(time.time() - start)}))
    checkpoint.unlink(missing_ok=True)
    (work / f"{phase.name}.latest.safetensors").unlink(missing_ok=True)
    return final


# The VAE recipe: cheap 64-pixel crops around objects first (a quarter of a whole clip's cost), then whole
# clips, whose per-frame norm statistics are the ones inference sees; ``calibrate_decoder_output`` follows.
VAE_PHASES = (
    VAEPhase("vae_phase1", steps=2000, lr=1e-3, batch=4, crop=64, edge_weight=0.5, recolour=0.3),
    VAEPhase("vae_phase2", steps=1600, lr=5e-4, batch=2, edge_weight=0.5, warmup=10, init="vae_phase1"),
    # After phase 2 every colour and motion read right but triangles came back with rounded tips (1 of 14 read
    # as a triangle). Neither edges weighted x4 (400 steps) nor the decoder alone trained on the posterior means
    # (300 steps) fixed that: the KL term kept the posterior noise at sigma 0.49 against a spread of 0.65 in the
    # means, so the encoder sent only what survives that noise. A twentieth of the KL weight lets it send more.
    VAEPhase("vae_phase3", steps=600, lr=3e-4, batch=2, edge_weight=1.0, kl_weight=1e-3, warmup=10,
             init="vae_phase2"),
    # Phase 3's reconstructions read shape 67%. Tried on it and dropped (the model card has the scores), each a
    # decoder-only phase (the latents and so the DiT unchanged) on 9-frame clips with outlines weighted x10:
    # VAEPhase("vae_phase4", 360, 3e-4, frames=9, edge_weight=1.0, boundary_weight=10.0, warmup=10,
    # init="vae_phase3", decoder_only=True), and the same for 240 steps with decoder_res_blocks=2. Neither moved
    # the fill ratios the oracle reads shape from: given these latents the decoder already draws what it can.
)


def conv_patches(features: torch.Tensor) -> torch.Tensor:
    """The inputs a 3x3x3 causal conv (spatial padding 1) sees at each output position: ``[b, c, t + 2, H, W]``
    (leading zero frames included) -> ``[b * t * H * W, c * 27]``, in the conv weight's (c, dt, dy, dx) order."""
    b, c, frames, h, w = features.shape
    padded = F.pad(features, (1, 1, 1, 1))
    taps = [padded[:, :, dt:dt + frames - 2, dy:dy + h, dx:dx + w] for dt in range(3) for dy in range(3) for dx in range(3)]
    return torch.stack(taps, 2).permute(0, 3, 4, 5, 1, 2).reshape(-1, c * 27)


@torch.no_grad()
def calibrate_decoder_output(work: Path, init: Path, clips: int = 24, object_weight: float = 4.0,
                             name: str = "vae") -> Path:
    """The last VAE phase, in closed form: the decoder's output convolution refitted by weighted least squares
    on whole 128-pixel clips, the rest of the VAE fixed.

    The crops the earlier phases train on are cheap, but per-frame GroupNorm statistics of a crop are not those
    of a whole frame, and whole frames decoded with a colour cast (a dark grey background came out blue). That
    convolution is linear in its input, so the best one for whole frames is a solve, not a training run; the
    encoder, and with it the DiT's latents, stay as they are."""
    vae = load_vae(init, dtype=torch.float32)
    rng = random.Random(SEED + 5)
    conv = vae.decoder.conv_out
    dropped = vae.config.decoder_dropped_frames
    captured = {}
    hook = vae.decoder.conv_out.register_forward_pre_hook(lambda module, args: captured.__setitem__("x", args[0]))
    n = conv.in_channels * 27 + 1
    gram, moment = torch.zeros(n, n, dtype=torch.float64), torch.zeros(n, 3, dtype=torch.float64)
    start = time.time()
    for _ in range(clips):
        x, objects = clip_batch(rng, 1)
        vae.decoder(vae.encoder(x).chunk(2, dim=1)[0])
        rows = conv_patches(captured["x"][:, :, dropped:].contiguous()).double()  # the frames the decoder keeps
        rows = torch.cat([rows, torch.ones(len(rows), 1, dtype=torch.float64)], 1)
        weight = (1 + object_weight * objects).permute(0, 2, 3, 4, 1).reshape(-1, 1).double()
        gram += (rows * weight).T @ rows
        moment += (rows * weight).T @ x.permute(0, 2, 3, 4, 1).reshape(-1, 3).double()
    hook.remove()
    solution = torch.linalg.solve(gram + 1e-3 * torch.eye(n, dtype=torch.float64), moment)
    conv.weight.copy_(solution[:-1].T.reshape(conv.weight.shape))
    conv.bias.copy_(solution[-1])
    path = work / f"{name}.safetensors"
    save_vae(vae, path)
    (work / f"{name}.json").write_text(json.dumps({"clips": clips, "seconds": round(time.time() - start),
                                                   "object_weight": object_weight,
                                                   "fitted": "decoder.conv_out (least squares)", "from": init.stem}))
    log(f"{name}: decoder output refitted on {clips} clips ({time.time() - start:.0f} s)")
    return path


# ---- latents ----------------------------------------------------------------------------------------------


@torch.no_grad()
def scene_batches(rng: random.Random, combos, count: int, batch: int):
    """``count`` random world scenes in batches: (clips done before, scenes, clips [b, 3, T, H, W] in the VAE's
    range)."""
    for i in range(0, count, batch):
        scenes = [synthetic.make_scene(rng, combos) for _ in range(min(batch, count - i))]
        yield i, scenes, torch.stack([torch.from_numpy(synthetic.to_model_range(synthetic.render(s))) for s in scenes])


def encode_latents(work: Path, count: int = 1200, batch: int = 4) -> Path:
    """Encode ``count`` training clips once: posterior means [n, 3, z, 8, 8] (the DiT's layout) plus the
    captions of each clip. The DiT learns the means, not posterior samples: after the VAE's second phase a
    sample's noise (sigma ~0.5 against a spread of ~0.65 in the means) was most of what the DiT had to learn,
    and the pipeline decodes whatever the DiT makes without adding any."""
    vae = load_vae(work / "vae.safetensors", dtype=torch.float32)
    rng = random.Random(SEED + 1)
    combos = synthetic.training_combos()
    means, captions = [], []
    start = time.time()
    for i, scenes, x in scene_batches(rng, combos, count, batch):
        means.append(vae.encoder(x).permute(0, 2, 1, 3, 4).chunk(2, dim=2)[0].contiguous())
        captions += [{"en": list(s.captions["en"]), "zh": list(s.captions["zh"])} for s in scenes]
        if i % 200 == 0:
            log(f"latents {i}/{count} ({time.time() - start:.0f} s)")
    path = work / "latents.safetensors"
    mean = torch.cat(means)
    save_file({"mean": mean}, str(path))
    (work / "captions.json").write_text(json.dumps(captions, ensure_ascii=False))
    log(f"latents: {count} clips, mean std {mean.std():.3f}, {time.time() - start:.0f} s")
    (work / "latents.json").write_text(json.dumps({"clips": count, "seconds": round(time.time() - start),
                                                   "latent_std": round(float(mean.std()), 3)}))
    return path


# ---- text encoders + DiT -------------------------------------------------------------------------------------


def new_text_encoders(work: Path):
    """Fresh Step-LLM and BERT sized by ``tiny``, over the tokenizers trained in ``work``."""
    from transformers import BertConfig, BertModel, BertTokenizer

    tokenizer = StepLLMTokenizer(work / "step_llm")
    llm = StepLLM(tiny.llm_config(tokenizer.sp.get_piece_size()))
    with torch.no_grad():
        llm.tok_embeddings.word_embeddings.weight.normal_(0, 0.02)
    bert_tokenizer = BertTokenizer.from_pretrained(str(work / "hunyuan_clip" / "tokenizer"), local_files_only=True)
    bert = BertModel(BertConfig(vocab_size=len(bert_tokenizer), pad_token_id=0, **tiny.CLIP_CONFIG),
                     add_pooling_layer=False)
    return tokenizer, llm, bert_tokenizer, bert


def encode_for_training(texts, tokenizer, llm, bert_tokenizer, bert):
    """Text states with gradients, cut to the longest prompt in the batch (causal attention makes the cut exact)."""
    ids, mask = tokenizer(texts)
    length = int(mask.sum(1).max())
    ids, mask = ids[:, :length], mask[:, :length]
    llm_states = llm(ids, mask)
    enc = bert_tokenizer(list(texts), padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    clip_states = bert(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).last_hidden_state
    return dict(encoder_hidden_states=llm_states, encoder_attention_mask=combined_mask(mask),
                encoder_hidden_states_2=clip_states)


# What the text pretraining teaches each encoder to tell apart in a one-object caption.
CAPTION_ATTRIBUTES = {"colour": tuple(synthetic.COLOURS), "shape": tuple(synthetic.SHAPES), "motion": synthetic.MOTIONS}


def pretrain_text(work: Path, steps: int = 600, batch: int = 48, lr: float = 2e-3) -> dict[str, float]:
    """Teach both text encoders, before the DiT starts, to tell apart the colour, shape and motion a caption names.

    Through the DiT's loss alone the encoders learn colour words quickly and shape and motion words hardly at all
    (``evaluate --reliance``: swapping a shape or motion word changed the DiT's estimate by under 1%). Here each
    encoder's states, averaged over the caption's tokens, feed small linear heads that classify the three
    attributes of one-object captions of the training combinations, in both languages and every training
    phrasing. The heads are thrown away; the encoders start the DiT stage from these weights. Returns the
    heads' accuracy on captions of the held-out combinations and on their paraphrases."""
    torch.manual_seed(SEED)
    rng = random.Random(SEED + 4)
    tokenizer, llm, bert_tokenizer, bert = new_text_encoders(work)
    width = tiny.LLM_CONFIG["hidden_size"]
    heads = torch.nn.ModuleDict({f"{encoder}_{attribute}": torch.nn.Linear(width, len(values))
                                 for encoder in ("llm", "bert") for attribute, values in CAPTION_ATTRIBUTES.items()})
    params = [*llm.parameters(), *bert.parameters(), *heads.parameters()]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    combos = synthetic.training_combos()

    def pooled_states(texts: list[str]) -> dict[str, torch.Tensor]:
        ids, mask = tokenizer(texts)
        length = int(mask.sum(1).max())
        mask = mask[:, :length].float()
        enc = bert_tokenizer(texts, padding=True, return_tensors="pt")
        bert_mask = enc["attention_mask"].float()
        states = bert(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).last_hidden_state
        return {"llm": (llm(ids[:, :length]) * mask[..., None]).sum(1) / mask.sum(1, keepdim=True),
                "bert": (states * bert_mask[..., None]).sum(1) / bert_mask.sum(1, keepdim=True)}

    def labels(objects, attribute: str) -> torch.Tensor:
        return torch.tensor([CAPTION_ATTRIBUTES[attribute].index(getattr(o, attribute)) for o in objects])

    start = time.time()
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = cosine_lr(step, steps, lr, warmup=30)
        scenes = [synthetic.scene_for(*rng.choice(combos), rng) for _ in range(batch)]
        pooled = pooled_states([rng.choice(s.captions[rng.choice(("en", "zh"))]) + POSITIVE_MAGIC for s in scenes])
        objects = [s.objects[0] for s in scenes]
        loss = sum(F.cross_entropy(head(pooled[name.split("_")[0]]), labels(objects, name.split("_")[1]))
                   for name, head in heads.items())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if step % 50 == 0 or step == steps - 1:
            log(f"text step {step}/{steps} loss {loss.item():.3f} ({time.time() - start:.0f} s)")
    # How well the words came apart, on captions never trained on: the held-out combinations in the training
    # phrasings, and the evaluation's paraphrases of them.
    accuracy = {}
    with torch.no_grad():
        held_out = [synthetic.scene_for(*combo, rng, background) for combo in sorted(synthetic.HELD_OUT)
                    for background in synthetic.BACKGROUNDS]
        for kind, texts_of in (("held_out", lambda s: s.captions), ("paraphrases", synthetic.paraphrase_captions)):
            pairs = [(s.objects[0], text) for s in held_out for lang in ("en", "zh") for text in texts_of(s)[lang]]
            pooled = pooled_states([text + POSITIVE_MAGIC for _, text in pairs])
            for name, head in heads.items():
                encoder, attribute = name.split("_")
                hits = head(pooled[encoder]).argmax(-1) == labels([o for o, _ in pairs], attribute)
                accuracy[f"{kind} {name}"] = round(float(hits.float().mean()), 3)
    log("text probes: " + ", ".join(f"{k} {v:.2f}" for k, v in accuracy.items()))
    for part, module in (("llm", llm), ("bert", bert)):
        save_file({k: v.contiguous() for k, v in module.state_dict().items()}, str(work / f"{part}_text.safetensors"))
    report = {"steps": steps, "batch": batch, "lr": lr, "seconds": round(time.time() - start), "accuracy": accuracy}
    (work / "text.json").write_text(json.dumps(report))
    return report


def init_dit_for_training(dit: StepVideoDiT) -> None:
    """DiT-style start: the timestep modulation and the output projection at zero, so every block starts as
    the identity and the first prediction is zero."""
    with torch.no_grad():
        for module in (dit.adaln_single.linear, dit.proj_out):
            module.weight.zero_()
            module.bias.zero_()


class EMA:
    def __init__(self, modules, decay: float):
        self.decay = decay
        self.params = [p for m in modules for p in m.parameters() if p.requires_grad]
        self.shadow = [p.detach().clone() for p in self.params]

    @torch.no_grad()
    def update(self, step: int) -> None:
        d = min(self.decay, (1 + step) / (10 + step))
        for s, p in zip(self.shadow, self.params):
            s.lerp_(p.detach(), 1 - d)

    @torch.no_grad()
    def copy_to(self) -> None:
        for s, p in zip(self.shadow, self.params):
            p.copy_(s)


def deepen_dit(state: dict[str, torch.Tensor], layers: int, seed: int = SEED) -> StepVideoDiT:
    """A DiT of ``layers`` blocks that computes exactly what the smaller one in ``state`` computes: its blocks are
    kept and new ones appended whose output projections (self-attention, cross-attention, feed-forward) start at
    zero, so each new block passes its input through unchanged until training moves those projections."""
    torch.manual_seed(seed)
    dit = StepVideoDiT(replace(tiny.DIT_CONFIG, num_layers=layers))
    missing, unexpected = dit.load_state_dict(state, strict=False)
    old = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("transformer_blocks."))
    if unexpected or any(not k.startswith("transformer_blocks.") or int(k.split(".")[1]) < old for k in missing):
        raise ValueError(f"cannot deepen this DiT: unexpected {unexpected[:3]}, missing {missing[:3]}")
    with torch.no_grad():
        for block in dit.transformer_blocks[old:]:
            for projection in (block.attn1.wo, block.attn2.wo, block.ff.net[2]):
                projection.weight.zero_()
    return dit


def object_cell_weights(latents: torch.Tensor, boost: float) -> torch.Tensor:
    """Loss weights [B, T, 1, H, W] for latents [B, T, C, H, W]: ``1 + boost`` on the cells an object covers, 1
    elsewhere, scaled to mean 1 per clip. A cell is an object's when its distance to the frame's background latent
    (the median over cells, channel by channel) is over half the frame's largest distance. An object covers 4-9
    of a frame's 64 cells, so with equal weights the loss is mostly background, while shape lives in those cells."""
    background = latents.flatten(3).median(-1).values[..., None, None]
    distance = (latents - background).norm(dim=2, keepdim=True)
    weight = 1 + boost * (distance > 0.5 * distance.amax(dim=(3, 4), keepdim=True)).float()
    return weight / weight.mean(dim=(1, 2, 3, 4), keepdim=True)


# Shape contrast (phases with ``shape_contrast``): only captions of clips noised to t below this, where the noisy
# latents do not yet show the shape, and a swapped caption's error is asked to be this much above the true one's.
CONTRAST_BELOW_T = 0.7
CONTRAST_MARGIN = 0.5


def shape_contrast_loss(dit: StepVideoDiT, latents: torch.Tensor, texts: list[str], t: torch.Tensor,
                        noise: torch.Tensor, encode, object_boost: float, strength: float) -> tuple[torch.Tensor, float | None]:
    """Flow matching on the batch plus a hinge that makes the DiT read shape words: every captioned clip noised to
    t < CONTRAST_BELOW_T is denoised a second time, from the same noisy latents, under its caption with the shape
    words swapped (``synthetic.swap_shapes``), and ``relu((1 + CONTRAST_MARGIN) * true - swapped) / true`` on
    the two errors, weighted ``strength`` and by the share of such clips, is added to the loss. A DiT that ignores
    shape words has swapped == true and pays ``strength * CONTRAST_MARGIN`` per clip. ``encode`` makes text states
    of a list of captions. Returns the loss and the mean ratio swapped / true (None when no clip qualified)."""
    pick = [k for k, text in enumerate(texts) if text != NEGATIVE_MAGIC and t[k] < CONTRAST_BELOW_T]
    text = encode(texts + [synthetic.swap_shapes(texts[k]) for k in pick])
    rows = list(range(len(texts))) + pick
    weight = object_cell_weights(latents[rows], object_boost) if object_boost else None
    errors = flow_matching_loss(dit, latents[rows], text, t[rows], noise[rows], reduce=False, weight=weight)
    true, swapped = errors[:len(texts)], errors[len(texts):]
    loss = true.mean()
    if not pick:
        return loss, None
    base = true[pick]
    hinge = torch.relu((1 + CONTRAST_MARGIN) * base - swapped) / base.detach()
    return loss + strength * hinge.mean() * len(pick) / len(texts), (swapped / base).mean().item()


def train_dit(work: Path, steps: int = 650, batch: int = 12, lr: float = 1e-3, text_lr: float = 5e-4,
              uncond: float = 0.1, chinese: float = 0.5, seconds: float | None = None, warmup: int = 100,
              phase: int = 1, save_every: float = 240.0, object_boost: float = 0.0, layers: int = 4,
              text_frozen: bool = False, shape_contrast: float = 0.0) -> None:
    """Flow matching on the encoded clips; the text encoders learn with the DiT. A caption is replaced by the
    negative prompt the pipeline uses (NEGATIVE_MAGIC) ``uncond`` of the time, which trains the guidance's
    unconditional branch; every other caption carries POSITIVE_MAGIC, as at inference. ``object_boost`` weights
    the error on the cells objects cover up (``object_cell_weights``). A phase with more ``layers`` than the last
    one deepens its DiT (``deepen_dit``); ``text_frozen`` keeps the text encoders as the last phase left them.
    ``shape_contrast`` adds ``shape_contrast_loss`` with that strength (text encoders frozen: the swapped captions
    must move the DiT, not the encoders), and such a phase draws from its own stream of seeds.

    Resumable like ``train_vae``: a checkpoint every ``save_every`` seconds, each step's draws seeded by its
    number. ``seconds`` caps the phase's total time, resumed runs included."""
    if shape_contrast and not text_frozen:
        raise ValueError("a shape-contrast phase needs text_frozen=True")
    torch.manual_seed(SEED)
    store = load_file(str(work / "latents.safetensors"))
    means = store["mean"]
    captions = json.loads((work / "captions.json").read_text())
    tokenizer, llm, bert_tokenizer, bert = new_text_encoders(work)
    if phase == 1:
        dit = StepVideoDiT(replace(tiny.DIT_CONFIG, num_layers=layers))
        init_dit_for_training(dit)
        for module, part in ((llm, "llm"), (bert, "bert")):  # the pretrained text encoders, when that stage ran
            if (work / f"{part}_text.safetensors").exists():
                module.load_state_dict(load_file(str(work / f"{part}_text.safetensors")))
    else:  # go on from the previous phase's (EMA) weights with a fresh optimiser
        dit = deepen_dit(load_file(str(work / f"dit_phase{phase - 1}.safetensors")), layers)
        for module, part in ((llm, "llm"), (bert, "bert")):
            module.load_state_dict(load_file(str(work / f"{part}_phase{phase - 1}.safetensors")))
    dit.train()
    groups = [{"params": dit.parameters(), "lr": lr, "weight_decay": 0.01}]
    for m in (llm, bert):
        m.train(not text_frozen).requires_grad_(not text_frozen)
    if not text_frozen:
        groups.append({"params": list(llm.parameters()) + list(bert.parameters()), "lr": text_lr, "weight_decay": 0.01})
    opt = torch.optim.AdamW(groups, betas=(0.9, 0.99))
    peaks = [g["lr"] for g in opt.param_groups]
    ema = EMA([dit, llm, bert], decay=0.998)

    @torch.no_grad()
    def frozen_encode(captions: list[str]) -> dict:
        return encode_for_training(captions, tokenizer, llm, bert_tokenizer, bert)

    modules = {"dit": dit, "llm": llm, "bert": bert}
    checkpoint = work / f"dit_phase{phase}.ckpt.pt"
    first, spent, running = 0, 0.0, None
    if checkpoint.exists():
        state = torch.load(checkpoint, weights_only=True)
        for part, module in modules.items():
            module.load_state_dict(state[part])
        opt.load_state_dict(state["optimizer"])
        for shadow, saved in zip(ema.shadow, state["ema"]):
            shadow.copy_(saved)
        first, spent, running = int(state["step"]), float(state["seconds"]), float(state["loss"])
        log(f"dit phase {phase}: resuming at step {first}")
    start, saved = time.time() - spent, time.time()
    step = first
    for step in range(first, steps):
        if seconds and time.time() - start > seconds:
            log(f"dit: time budget reached at step {step}")
            break
        rng = random.Random(f"{SEED}/{'contrast' if shape_contrast else 'dit'}{phase}/{step}")
        gen = torch.Generator().manual_seed(SEED + 1000 * phase + step)
        torch.manual_seed(SEED + 1000 * phase + step)  # the BERT's dropout draws from the global generator
        for g, peak in zip(opt.param_groups, peaks):
            g["lr"] = cosine_lr(step, steps, peak, warmup=warmup)
        idx = torch.randint(0, len(means), (batch,), generator=gen)
        latents = means[idx]
        texts = []
        for i in idx.tolist():
            if rng.random() < uncond:
                texts.append(NEGATIVE_MAGIC)
            else:
                lang = "zh" if rng.random() < chinese else "en"
                texts.append(rng.choice(captions[i][lang]) + POSITIVE_MAGIC)
        if shape_contrast:
            t = sample_training_times(batch, gen, tiny.SETTINGS.shift)
            noise = torch.randn(latents.shape, generator=gen)
            loss, ratio = shape_contrast_loss(dit, latents, texts, t, noise, frozen_encode, object_boost, shape_contrast)
        else:
            with torch.set_grad_enabled(not text_frozen):
                text = encode_for_training(texts, tokenizer, llm, bert_tokenizer, bert)
            t = sample_training_times(batch, gen, tiny.SETTINGS.shift)
            weight = object_cell_weights(latents, object_boost) if object_boost else None
            loss = flow_matching_loss(dit, latents, text, t, torch.randn(latents.shape, generator=gen), weight=weight)
            ratio = None
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], 1.0)
        opt.step()
        ema.update(step)
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        if step % 50 == 0 or step == steps - 1:
            contrast = f" swapped/true {ratio:.3f}" if ratio is not None else ""
            log(f"dit phase {phase} step {step}/{steps} loss {running:.4f}{contrast} ({time.time() - start:.0f} s)")
        if time.time() - saved > save_every:
            torch.save({**{part: m.state_dict() for part, m in modules.items()}, "optimizer": opt.state_dict(),
                        "ema": list(ema.shadow), "step": step + 1, "seconds": time.time() - start,
                        "loss": running}, checkpoint)
            saved = time.time()
    else:
        step = steps
    ema.copy_to()
    for part, module in modules.items():
        save_file({k: v.contiguous() for k, v in module.state_dict().items()}, str(work / f"{part}_phase{phase}.safetensors"))
    bert.config.to_json_file(str(work / "bert_config.json"))
    record = {"steps": step, "batch": batch, "lr": lr, "object_boost": object_boost, "layers": layers,
              "text_frozen": text_frozen, **({"shape_contrast": shape_contrast} if shape_contrast else {}),
              "seconds": round(time.time() - start)}
    (work / f"dit_phase{phase}.json").write_text(json.dumps(record))
    checkpoint.unlink(missing_ok=True)


@dataclass(frozen=True)
class DiTPhase:
    """One DiT phase: a fresh optimiser and cosine schedule, on from the previous phase's EMA weights."""

    steps: int
    lr: float  # the DiT's; the text encoders learn at half of it
    object_boost: float = 0.0  # extra loss weight on the latent cells objects cover (object_cell_weights)
    layers: int = 4  # the DiT's depth; more than the last phase's deepens it (deepen_dit)
    text_frozen: bool = False
    shape_contrast: float = 0.0  # strength of shape_contrast_loss (0: plain flow matching)


# The shipped weights' phases (training.json records them). Motion climbed at every phase (held-out English 19%
# after phase 2, then 31, 47, 81 and 94%), so each further phase of 3,500 steps (about 20 minutes) stayed while it
# helped. From phase 7 on, object cells weigh x5: shape lives in the 4-9 cells of a frame that an object covers,
# and the DiT's reading of shape words doubled in phase 7 (see the model card). Phase 10 appends two blocks: the
# latents carry shape that the 4-block DiT did not make, and a heavier object weight on it gained nothing. Its text
# encoders stay frozen, so the TI2V DiT and the LoRA see the same text states as the T2V DiT.
DIT_PHASES = (DiTPhase(650, 1e-3), DiTPhase(1600, 5e-4), DiTPhase(1600, 2.5e-4),
              *(DiTPhase(3500, 2.5e-4) for _ in range(3)), *(DiTPhase(3500, 2.5e-4, object_boost=4.0) for _ in range(3)),
              DiTPhase(3500, 2.5e-4, object_boost=4.0, layers=tiny.DIT_CONFIG.num_layers, text_frozen=True),
              # Phase 10, the deeper DiT's first, raised held-out shape 5-9 points where a heavier object weight on
              # the 4-block DiT gained none, so phases 11 and 12 give the 6 blocks more phases of the same kind
              # (shape 44/42% -> 50/50% -> 61/47%, English/Chinese; a phase 12 on 8 blocks read the same).
              *(DiTPhase(3500, 2.5e-4, object_boost=4.0, layers=tiny.DIT_CONFIG.num_layers, text_frozen=True)
                for _ in range(2)),
              # The DiT read shape words far less than colour or motion words (swapping one raised its error 17%,
              # against 135% and 127%), so phase 13 adds shape_contrast_loss: shape 61/47% -> 64/64%, and the
              # demo prompt reads as a square on 2 of 4 seeds.
              DiTPhase(2000, 2.5e-4, object_boost=4.0, layers=tiny.DIT_CONFIG.num_layers, text_frozen=True,
                       shape_contrast=0.5))


# ---- export ---------------------------------------------------------------------------------------------------


def _write_single_shard(folder: Path, stem: str, state: dict[str, torch.Tensor]) -> None:
    """The official sharded layout with one shard: ``<stem>-00001-of-00001.safetensors`` plus its index."""
    folder.mkdir(parents=True, exist_ok=True)
    shard = f"{stem}-00001-of-00001.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(folder / shard))
    index = {"metadata": {"total_size": sum(v.numel() * v.element_size() for v in state.values())},
             "weight_map": {k: shard for k in sorted(state)}}
    (folder / f"{stem}.safetensors.index.json").write_text(json.dumps(index, indent=1))


def write_transformer(folder: Path, state: dict[str, torch.Tensor], cfg: DiTConfig) -> None:
    """A DiT in the release's ``transformer/`` layout: one shard, its index and the diffusers-style config.json."""
    _write_single_shard(folder, "diffusion_pytorch_model", state)
    (folder / "config.json").write_text(json.dumps({
        "_class_name": "StepVideoModel", "num_attention_heads": cfg.num_attention_heads,
        "attention_head_dim": cfg.attention_head_dim, "in_channels": cfg.in_channels, "out_channels": cfg.out_channels,
        "num_layers": cfg.num_layers, "dropout": 0.0, "patch_size": cfg.patch_size, "norm_type": "ada_norm_single",
        "norm_elementwise_affine": False, "norm_eps": cfg.norm_eps,
        "use_additional_conditions": cfg.use_additional_conditions, "caption_channels": list(cfg.caption_channels),
        "attention_type": "torch"}, indent=1))


def last_dit_phase(work: Path) -> int:
    """The newest finished DiT phase in ``work`` (0 when none has finished)."""
    done = [int(p.stem.removeprefix("dit_phase")) for p in work.glob("dit_phase*.json")]
    return max(done, default=0)


def export(work: Path, out: Path = tiny.TINY_DIR, dtype: torch.dtype = torch.float16, phase: int | None = None) -> None:
    """Write the trained weights of DiT phase ``phase`` (default: the newest finished one) in the official
    download's layout, in fp16 (the release stores 2 bytes per weight too; fp16 rather than bf16 keeps three
    more mantissa bits for these small weights). ``training.json`` records every stage that ran."""
    import shutil

    def cast(file: Path) -> dict[str, torch.Tensor]:
        return {k: v.to(dtype) if v.is_floating_point() else v for k, v in load_file(str(file)).items()}

    phase = phase or last_dit_phase(work)
    last = f"_phase{phase}"
    dit = cast(work / f"dit{last}.safetensors")
    write_transformer(out / "transformer", dit, DiTConfig.from_shapes({k: tuple(v.shape) for k, v in dit.items()}))
    (out / "vae").mkdir(parents=True, exist_ok=True)
    save_file(cast(work / "vae.safetensors"), str(out / "vae" / "vae_v2.safetensors"),
              metadata={NORM_GROUPS_KEY: str(tiny.VAE_CONFIG.norm_groups)})
    llm = tiny.llm_config(StepLLMTokenizer(work / "step_llm").sp.get_piece_size())
    _write_single_shard(out / "step_llm", "model", cast(work / f"llm{last}.safetensors"))
    (out / "step_llm" / "config.json").write_text(json.dumps({
        "architectures": ["Step1Model"], "hidden_size": llm.hidden_size, "num_layers": llm.num_layers,
        "num_attention_heads": llm.num_attention_heads, "num_attention_groups": llm.num_attention_groups,
        "ffn_hidden_size": llm.ffn_hidden_size, "padded_vocab_size": llm.vocab_size,
        "layernorm_epsilon": llm.layernorm_epsilon, "torch_dtype": "float16"}, indent=1))
    shutil.copy(work / "step_llm" / TOKENIZER_FILE, out / "step_llm" / TOKENIZER_FILE)
    clip = out / "hunyuan_clip"
    (clip / "clip_text_encoder").mkdir(parents=True, exist_ok=True)
    shutil.copy(work / "bert_config.json", clip / "clip_text_encoder" / "config.json")
    save_file({"bert." + k: v for k, v in cast(work / f"bert{last}.safetensors").items() if not k.endswith("position_ids")},
              str(clip / "clip_text_encoder" / "model.safetensors"))
    shutil.copytree(work / "hunyuan_clip" / "tokenizer", clip / "tokenizer", dirs_exist_ok=True)
    stages = ["seeded", "text", *(p.name for p in VAE_PHASES), "vae", "latents",
              *(f"dit_phase{i}" for i in range(1, phase + 1))]
    stats = {name: json.loads((work / f"{name}.json").read_text()) for name in stages if (work / f"{name}.json").exists()}
    (out / "training.json").write_text(json.dumps(stats, indent=1))
    log(f"exported to {out}")


def seed_from_export(work: Path, shipped: Path = tiny.TINY_DIR) -> int:
    """Fill ``work`` from an exported model so that the recipe goes on from it instead of from nothing: the
    tokenizers, the VAE (``vae.safetensors``, and as the file of the export's last VAE phase the start of any
    later VAE phase), the DiT and both text encoders as ``*_phase<N>.safetensors`` of the export's last DiT
    phase N, the BERT config, and every stage's record from the export's ``training.json``; ``main`` then skips
    what they record as done. Returns N. The latents are not exported: the ``latents`` stage encodes them again.

    A deliberate deviation from a rerun from nothing: the export holds fp16 roundings of the phases' fp32
    weights, and the last VAE phase's own output convolution was replaced by the least-squares solve before
    export, so what goes on from here starts within fp16 rounding of where the original run stood, not bit for
    bit there. ``seeded.json`` records it, and ``export`` carries that record into the next ``training.json``.
    A rerun from nothing stays one command: ``--work`` on an empty folder, without ``--resume-from-shipped``."""
    import shutil

    from transformers import BertConfig, BertModel

    from ..dit import load_dit

    records = json.loads((shipped / "training.json").read_text())
    phase = max(int(name.removeprefix("dit_phase")) for name in records if name.startswith("dit_phase"))
    work.mkdir(parents=True, exist_ok=True)
    (work / "step_llm").mkdir(exist_ok=True)
    shutil.copy(shipped / "step_llm" / TOKENIZER_FILE, work / "step_llm" / TOKENIZER_FILE)
    shutil.copytree(shipped / "hunyuan_clip" / "tokenizer", work / "hunyuan_clip" / "tokenizer", dirs_exist_ok=True)
    shutil.copy(shipped / "hunyuan_clip" / "clip_text_encoder" / "config.json", work / "bert_config.json")

    def fp32(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v.float().contiguous() if v.is_floating_point() else v for k, v in state.items()}

    vae = load_vae(shipped / "vae" / "vae_v2.safetensors", dtype=torch.float32)
    last_vae_phase = [p.name for p in VAE_PHASES if p.name in records][-1]
    for name in ("vae", last_vae_phase):
        save_vae(vae, work / f"{name}.safetensors")
    dit = load_dit(shipped / "transformer", weight_dtype=torch.float32)
    save_file(fp32(dit.state_dict()), str(work / f"dit_phase{phase}.safetensors"))
    llm = StepLLM(tiny.llm_config(StepLLMTokenizer(work / "step_llm").sp.get_piece_size()))
    llm.load_state_dict(load_file(str(shipped / "step_llm" / "model-00001-of-00001.safetensors")))
    bert = BertModel(BertConfig.from_json_file(str(work / "bert_config.json")), add_pooling_layer=False)
    clip_state = load_file(str(shipped / "hunyuan_clip" / "clip_text_encoder" / "model.safetensors"))
    missing, unexpected = bert.load_state_dict({k.removeprefix("bert."): v for k, v in clip_state.items()}, strict=False)
    if unexpected or any(not k.endswith("position_ids") for k in missing):
        raise ValueError(f"{shipped}: the BERT weights do not fit its config (missing {missing[:3]}, unexpected "
                         f"{unexpected[:3]}); export the model again with this version of tiny.train")
    for part, module in (("llm", llm), ("bert", bert)):
        save_file(fp32(module.state_dict()), str(work / f"{part}_phase{phase}.safetensors"))
    for name, record in records.items():
        if name not in ("latents", "seeded"):  # the latents stage runs again: they are not shipped
            (work / f"{name}.json").write_text(json.dumps(record))
    seeded = {"from": shipped.name, "dit_phase": phase,
              "note": "weights are the export's fp16 values in fp32; the last VAE phase's file is the exported VAE "
                      "(its output convolution solved by least squares); latents encoded again from it"}
    if "seeded" in records:  # that export was itself seeded: keep the chain
        seeded["earlier"] = records["seeded"]
    (work / "seeded.json").write_text(json.dumps(seeded))
    log(f"seeded {work} from {shipped}: stages through dit_phase{phase} recorded as done")
    return phase


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default="runs/tiny")
    p.add_argument("--stage", default="all", choices=["all", "tokenizers", "text", "vae", "latents", "dit", "export"])
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--dit-seconds", type=float, default=None, help="stop each DiT phase early after this long")
    p.add_argument("--resume-from-shipped", action="store_true",
                   help="go on from the shipped weights (seed_from_export) instead of training every stage from nothing")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    if args.resume_from_shipped and not (work / "seeded.json").exists():
        if any(work.glob("*_phase*.json")):
            raise SystemExit(f"{work} already holds training phases; --resume-from-shipped needs an empty --work folder")
        seed_from_export(work)
    if args.stage in ("all", "tokenizers") and not (work / "seeded.json").exists():
        train_tokenizers(work)
    if args.stage in ("all", "text") and not (work / "text.json").exists():
        pretrain_text(work)
    if args.stage in ("all", "vae"):
        for phase in VAE_PHASES:
            if not (work / f"{phase.name}.json").exists():  # written when the phase ends
                train_vae(work, phase)
        solved = work / "vae.json"
        if not solved.exists() or json.loads(solved.read_text()).get("from") != VAE_PHASES[-1].name:
            calibrate_decoder_output(work, work / f"{VAE_PHASES[-1].name}.safetensors")
    if args.stage in ("all", "latents") and not (work / "latents.json").exists():
        encode_latents(work)
    if args.stage in ("all", "dit"):
        # DIT_PHASES, each resumable: from scratch, then each on from the last one's EMA weights.
        for phase, spec in enumerate(DIT_PHASES, start=1):
            if not (work / f"dit_phase{phase}.json").exists():
                train_dit(work, steps=spec.steps, lr=spec.lr, text_lr=spec.lr / 2, seconds=args.dit_seconds,
                          phase=phase, warmup=100 if phase == 1 else 50, object_boost=spec.object_boost,
                          layers=spec.layers, text_frozen=spec.text_frozen, shape_contrast=spec.shape_contrast)
    if args.stage in ("all", "export"):
        export(work)


if __name__ == "__main__":
    main()
