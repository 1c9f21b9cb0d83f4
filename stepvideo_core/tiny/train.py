"""Train Step-Video-Tiny from nothing on the synthetic world, in stages, with fixed seeds, on a CPU.

    python -m stepvideo_core.tiny.train --work runs/tiny            # every stage, then export to models/
    python -m stepvideo_core.tiny.train --work runs/tiny --stage vae

Stages: ``tokenizers`` (SentencePiece for Step-LLM, a WordPiece vocabulary for the BERT), ``vae`` (the Video-VAE
on reconstruction in three phases, then its output convolution solved by least squares), ``latents`` (the
training clips encoded once), ``dit`` (the DiT with flow matching, the two text encoders trained with it end to
end, in phases of falling learning rate), ``export`` (fp16 safetensors in the official layout). Every phase writes
its own file, and a stage skips the phases already done.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from ..dit import StepVideoDiT
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
               recolour: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """``count`` fresh training clips [b, 3, 17, H, W] in [-1, 1], optionally cropped square (anywhere, or
    ``around_objects``: a window holding the first object's start), and a mask [b, 1, 17, H, W] of the pixels
    that belong to objects (anything off the background colour). A share ``recolour`` of the clips get a
    random background colour: the world's backgrounds are all grey, and a VAE that only ever sees colour in
    small objects learns it very slowly."""
    combos = synthetic.training_combos()
    clips, masks = [], []
    for _ in range(count):
        scene = synthetic.make_scene(rng, combos)
        frames = synthetic.render(scene)
        bg = np.array(synthetic.BACKGROUNDS[scene.background][0])
        mask = (np.abs(frames.astype(int) - bg).max(-1) > 8)[None].astype(np.float32)
        video = synthetic.to_model_range(frames)
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


def train_vae(work: Path, steps: int = 220, full_steps: int = 24, batch: int = 4, crop: int = 64,
              lr: float = 1e-3, kl_weight: float = 3e-3, object_weight: float = 0.0, init: Path | None = None,
              name: str = "vae", warmup: int = 30, recolour: float = 0.0) -> Path:
    """Reconstruction (L1 + MSE) with a light KL term, first on 64-pixel crops, then on whole 128-pixel clips
    (per-frame GroupNorm statistics differ between the two, so the last steps see what inference sees).

    Objects cover a few percent of a frame, so a plain pixel average is satisfied by the background alone:
    ``object_weight`` adds that many times the error on object pixels (the second phase of the recipe)."""
    torch.manual_seed(SEED)
    rng = random.Random(SEED + (0 if init is None else 17))
    if init is None:
        vae = VideoVAE(tiny.VAE_CONFIG)
        with torch.no_grad():  # start nearly deterministic (sigma ~ 0.05): posterior noise at sigma 1 swamps early learning
            vae.encoder.conv_out.conv.bias[tiny.VAE_CONFIG.z_channels:].fill_(-6.0)
    else:
        vae = load_vae(init, dtype=torch.float32).train().requires_grad_(True)
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0, betas=(0.9, 0.99))
    total = steps + full_steps
    start = time.time()
    for step in range(total):
        full = step >= steps
        x, objects = clip_batch(rng, batch // 2 if full else batch, None if full else crop,
                                around_objects=object_weight > 0, recolour=recolour)
        for group in opt.param_groups:
            group["lr"] = cosine_lr(step, total, lr, warmup=warmup)
        moments = vae.encoder(x)
        mean, logvar = moments.chunk(2, dim=1)
        logvar = logvar.clamp(-30, 20)
        z = mean + torch.randn_like(mean) * (0.5 * logvar).exp()
        y = vae.decoder(z)
        weight = 1 + object_weight * objects
        rec = ((y - x).abs() * weight).mean() + ((y - x).pow(2) * weight).mean()
        kl = 0.5 * (mean.pow(2) + logvar.exp() - 1 - logvar).mean()
        loss = rec + kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        if step % 10 == 0 or step == total - 1:
            object_error = float(((y - x).detach().abs() * objects).sum() / objects.sum().clamp(min=1) / 3)
            log(f"{name} step {step}/{total} rec {rec.item():.4f} object L1 {object_error:.3f} kl {kl.item():.3f} "
                f"z std {mean.std().item():.2f} ({time.time() - start:.0f} s)")
    path = work / f"{name}.safetensors"
    save_vae(vae, path)
    (work / f"{name}.json").write_text(json.dumps({"steps": total, "seconds": round(time.time() - start),
                                                   "object_weight": object_weight}))
    return path


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
                                                   "fitted": "decoder.conv_out (least squares)"}))
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


def encode_latents(work: Path, count: int = 900, batch: int = 4) -> Path:
    """Encode ``count`` training clips once: posterior mean and log-variance [n, 3, z, 8, 8] (the DiT's layout)
    plus the captions of each clip; the DiT stage draws a fresh posterior sample from them every time."""
    vae = load_vae(work / "vae.safetensors", dtype=torch.float32)
    rng = random.Random(SEED + 1)
    combos = synthetic.training_combos()
    means, logvars, captions = [], [], []
    start = time.time()
    for i, scenes, x in scene_batches(rng, combos, count, batch):
        mean, logvar = vae.encoder(x).permute(0, 2, 1, 3, 4).chunk(2, dim=2)
        means.append(mean.contiguous())
        logvars.append(logvar.clamp(-30, 20).contiguous())
        captions += [{"en": list(s.captions["en"]), "zh": list(s.captions["zh"])} for s in scenes]
        if i % 200 == 0:
            log(f"latents {i}/{count} ({time.time() - start:.0f} s)")
    path = work / "latents.safetensors"
    mean = torch.cat(means)
    save_file({"mean": mean, "logvar": torch.cat(logvars)}, str(path))
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


def train_dit(work: Path, steps: int = 650, batch: int = 12, lr: float = 1e-3, text_lr: float = 5e-4,
              uncond: float = 0.1, chinese: float = 0.5, seconds: float | None = None, warmup: int = 100, phase: int = 1) -> None:
    """Flow matching on the encoded clips; the text encoders learn with the DiT. A caption is replaced by the
    negative prompt the pipeline uses (NEGATIVE_MAGIC) ``uncond`` of the time, which trains the guidance's
    unconditional branch; every other caption carries POSITIVE_MAGIC, as at inference."""
    torch.manual_seed(SEED)
    rng = random.Random(SEED + 2)
    gen = torch.Generator().manual_seed(SEED + 3)
    store = load_file(str(work / "latents.safetensors"))
    means, stds = store["mean"], (0.5 * store["logvar"]).exp()
    captions = json.loads((work / "captions.json").read_text())
    tokenizer, llm, bert_tokenizer, bert = new_text_encoders(work)
    dit = StepVideoDiT(tiny.DIT_CONFIG)
    if phase == 1:
        init_dit_for_training(dit)
    else:  # go on from the previous phase's (EMA) weights with a fresh optimiser
        for module, part in ((dit, "dit"), (llm, "llm"), (bert, "bert")):
            module.load_state_dict(load_file(str(work / f"{part}_phase{phase - 1}.safetensors")))
    for m in (dit, llm, bert):
        m.train()
    opt = torch.optim.AdamW([{"params": dit.parameters(), "lr": lr, "weight_decay": 0.01},
                             {"params": list(llm.parameters()) + list(bert.parameters()), "lr": text_lr,
                              "weight_decay": 0.01}], betas=(0.9, 0.99))
    peaks = [g["lr"] for g in opt.param_groups]
    ema = EMA([dit, llm, bert], decay=0.998)
    start, running = time.time(), None
    for step in range(steps):
        for g, peak in zip(opt.param_groups, peaks):
            g["lr"] = cosine_lr(step, steps, peak, warmup=warmup)
        idx = torch.randint(0, len(means), (batch,), generator=gen)
        latents = means[idx] + stds[idx] * torch.randn(means[idx].shape, generator=gen)
        texts = []
        for i in idx.tolist():
            if rng.random() < uncond:
                texts.append(NEGATIVE_MAGIC)
            else:
                lang = "zh" if rng.random() < chinese else "en"
                texts.append(rng.choice(captions[i][lang]) + POSITIVE_MAGIC)
        text = encode_for_training(texts, tokenizer, llm, bert_tokenizer, bert)
        t = sample_training_times(batch, gen, tiny.SETTINGS.shift)
        loss = flow_matching_loss(dit, latents, text, t, torch.randn(latents.shape, generator=gen))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], 1.0)
        opt.step()
        ema.update(step)
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        if step % 50 == 0 or step == steps - 1:
            log(f"dit phase {phase} step {step}/{steps} loss {running:.4f} ({time.time() - start:.0f} s)")
        if seconds and time.time() - start > seconds:
            log(f"dit: time budget reached at step {step}")
            steps = step + 1
            break
    ema.copy_to()
    state = {"dit": dit.state_dict(), "llm": llm.state_dict(), "bert": bert.state_dict()}
    for part, sd in state.items():
        save_file({k: v.contiguous() for k, v in sd.items()}, str(work / f"{part}_phase{phase}.safetensors"))
    bert.config.to_json_file(str(work / "bert_config.json"))
    (work / f"dit_phase{phase}.json").write_text(json.dumps({"steps": steps, "batch": batch, "lr": lr,
                                                             "seconds": round(time.time() - start)}))


# (steps, DiT learning rate; the text encoders learn at half of it) per phase.
# The shipped run stopped phase 2 at step 1458 of 1600 (``--dit-seconds 1000``); training.json records it.
DIT_PHASES = ((650, 1e-3), (1600, 5e-4), (1600, 2.5e-4))

# ---- export ---------------------------------------------------------------------------------------------------


def _write_single_shard(folder: Path, stem: str, state: dict[str, torch.Tensor]) -> None:
    """The official sharded layout with one shard: ``<stem>-00001-of-00001.safetensors`` plus its index."""
    folder.mkdir(parents=True, exist_ok=True)
    shard = f"{stem}-00001-of-00001.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(folder / shard))
    index = {"metadata": {"total_size": sum(v.numel() * v.element_size() for v in state.values())},
             "weight_map": {k: shard for k in sorted(state)}}
    (folder / f"{stem}.safetensors.index.json").write_text(json.dumps(index, indent=1))


def export(work: Path, out: Path = tiny.TINY_DIR, dtype: torch.dtype = torch.float16) -> None:
    """Write the trained weights in the official download's layout, in fp16 (the release stores 2 bytes per
    weight too; fp16 rather than bf16 keeps three more mantissa bits for these small weights)."""
    import shutil

    def cast(file: Path) -> dict[str, torch.Tensor]:
        return {k: v.to(dtype) if v.is_floating_point() else v for k, v in load_file(str(file)).items()}

    cfg = tiny.DIT_CONFIG
    last = f"_phase{len(DIT_PHASES)}"
    _write_single_shard(out / "transformer", "diffusion_pytorch_model", cast(work / f"dit{last}.safetensors"))
    (out / "transformer" / "config.json").write_text(json.dumps({
        "_class_name": "StepVideoModel", "num_attention_heads": cfg.num_attention_heads,
        "attention_head_dim": cfg.attention_head_dim, "in_channels": cfg.in_channels, "out_channels": cfg.out_channels,
        "num_layers": cfg.num_layers, "dropout": 0.0, "patch_size": cfg.patch_size, "norm_type": "ada_norm_single",
        "norm_elementwise_affine": False, "norm_eps": cfg.norm_eps, "use_additional_conditions": False,
        "caption_channels": list(cfg.caption_channels), "attention_type": "torch"}, indent=1))
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
    stats = {name: json.loads((work / f"{name}.json").read_text()) for name in ("vae_phase1", "vae_phase2", "vae_phase3", "vae", "latents", *(f"dit_phase{i + 1}" for i in range(len(DIT_PHASES))))
             if (work / f"{name}.json").exists()}
    (out / "training.json").write_text(json.dumps(stats, indent=1))
    log(f"exported to {out}")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default="runs/tiny")
    p.add_argument("--stage", default="all", choices=["all", "tokenizers", "vae", "latents", "dit", "export"])
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--dit-seconds", type=float, default=None, help="stop each DiT phase early after this long")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    if args.stage in ("all", "tokenizers"):
        train_tokenizers(work)
    if args.stage in ("all", "vae"):
        # Four phases, each resumable: plain reconstruction; objects weighted up and half the backgrounds
        # recoloured (teaches colour, which the grey backgrounds never show); back to the world's own clips;
        # the decoder's output convolution solved for whole frames.
        phases = [work / f"vae_phase{i}.safetensors" for i in (1, 2, 3)]
        if not phases[0].exists():
            train_vae(work, name="vae_phase1")
        if not phases[1].exists():
            train_vae(work, steps=180, full_steps=12, lr=5e-4, object_weight=5.0, init=phases[0], name="vae_phase2",
                      warmup=10, recolour=0.5)
        if not phases[2].exists():
            train_vae(work, steps=100, full_steps=12, lr=3e-4, object_weight=5.0, init=phases[1], name="vae_phase3",
                      warmup=10)
        calibrate_decoder_output(work, phases[2])
    if args.stage in ("all", "latents"):
        encode_latents(work)
    if args.stage in ("all", "dit"):
        # Phases, each resumable: from scratch, then on from the last phase's EMA weights with a fresh
        # optimiser and a lower learning rate.
        for phase, (steps, lr) in enumerate(DIT_PHASES, start=1):
            if not (work / f"dit_phase{phase}.json").exists():
                train_dit(work, steps=steps, lr=lr, text_lr=lr / 2, seconds=args.dit_seconds, phase=phase,
                          warmup=100 if phase == 1 else 50)
    if args.stage in ("all", "export"):
        export(work)


if __name__ == "__main__":
    main()
