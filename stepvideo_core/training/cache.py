"""The first stage of training: VAE latents and text embeddings computed once and kept as safetensors files.

Each file's name carries a hash of everything its content depends on (the media file's path, size and time, its
bucket, and the encoding model's files; for text, the caption and the text encoders' files), so a changed clip,
caption, bucket or model makes a new entry and an unchanged one is read back. The text encoders run first and
are dropped, then the VAE runs and is dropped, so the DiT that trains next has the device to itself.

Latents are the VAE posterior's means (the tiny lab's choice: its DiT learnt means too, and sampling decodes
whatever the DiT makes without adding posterior noise).
"""

from __future__ import annotations

import gc
import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..text_encoding import TextConditioning, encode_prompts
from .data import Clip, Pair, read_frames

Log = Callable[[str], None]


def identity(path: Path) -> str:
    """What a file or folder is, cheaply: resolved path, size and modification time of every file in it."""
    path = Path(path).resolve()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return "|".join(f"{p}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in files)


def _digest(*parts: str) -> str:
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Encoders:
    """Where the encoding models are, and how to load them (called only when something is missing). ``owned``:
    the loaders make new models, which are dropped after use; False when they hand out a host's models (ComfyUI's
    loaders), which stay. ``prepare`` is ``text_encoding.PrepareHook``, for a host that moves models itself."""

    text_id: str
    vae_id: str
    load_text: Callable[[], object]
    load_vae: Callable[[], object]
    owned: bool = True
    prepare: Callable[[str], None] | None = None


@dataclass
class Sample:
    """One training sample: latents ``[F, C, h, w]`` (the winner's, for DPO), its caption's states, and for DPO the
    loser's latents. Each is a tensor or the cache file that holds it (read when the sample is drawn)."""

    latents: torch.Tensor | Path
    text: TextConditioning | Path
    loser: torch.Tensor | Path | None = None
    shape: tuple[int, ...] = ()

    def load(self) -> tuple[torch.Tensor, TextConditioning, torch.Tensor | None]:
        return _latents(self.latents), _text(self.text), None if self.loser is None else _latents(self.loser)


def _latents(x: torch.Tensor | Path) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x
    with safe_open(str(x), "pt") as f:
        return f.get_tensor("latents")


def _text(x: TextConditioning | Path) -> TextConditioning:
    if isinstance(x, TextConditioning):
        return x
    with safe_open(str(x), "pt") as f:
        return TextConditioning(f.get_tensor("llm_states"), f.get_tensor("mask"), f.get_tensor("clip_states"))


@dataclass
class TrainingSet:
    """What the trainer draws from: samples grouped by latent shape (a batch comes from one group), and the
    negative prompt's states, which replace a caption under caption dropout (as the unconditional branch of
    guidance sees it)."""

    samples: list[Sample]
    negative: TextConditioning

    def __post_init__(self):
        for s in self.samples:
            if not s.shape:
                s.shape = tuple(_latents(s.latents).shape)

    def groups(self) -> list[list[int]]:
        by_shape: dict[tuple[int, ...], list[int]] = {}
        for i, s in enumerate(self.samples):
            by_shape.setdefault(s.shape, []).append(i)
        return [by_shape[k] for k in sorted(by_shape)]

    @property
    def is_pairs(self) -> bool:
        return self.samples[0].loser is not None


def _save_text(cond: TextConditioning, path: Path) -> None:
    save_file({"llm_states": cond.llm_states.contiguous(), "mask": cond.mask.contiguous(),
               "clip_states": cond.clip_states.contiguous()}, str(path))


def _collect() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def build_cache(clips: Sequence[Clip] | Sequence[Pair], folder: str | Path, encoders: Encoders,
                log: Log = print, device: torch.device | str = "cpu") -> TrainingSet:
    """Encode whatever of ``clips`` (or DPO ``pairs``) is not cached yet into ``folder`` and return the training
    set, whose samples read their files when drawn."""
    folder = Path(folder)
    (folder / "text").mkdir(parents=True, exist_ok=True)
    (folder / "latents").mkdir(parents=True, exist_ok=True)
    pairs = bool(clips) and isinstance(clips[0], Pair)
    captions = sorted({c.prompt if pairs else c.caption for c in clips})
    text_file = {c: folder / "text" / f"{_digest(c, encoders.text_id)}.safetensors" for c in captions}
    negative_file = folder / "text" / f"negative-{_digest(encoders.text_id)}.safetensors"
    todo = [c for c in captions if not text_file[c].exists()]
    if todo or not negative_file.exists():
        log(f"cache: encoding {len(todo)} caption(s) with Step-LLM and CLIP")
        text = encoders.load_text()
        with torch.no_grad():
            for caption in todo or captions[:1]:
                pos, neg = encode_prompts(text, caption, after="keep", device=device, prepare=encoders.prepare)
                _save_text(pos.to("cpu"), text_file[caption])
                if not negative_file.exists():
                    _save_text(neg.to("cpu"), negative_file)
        if encoders.owned:
            text.release()
        del text
        _collect()

    media = [m for c in clips for m in ((c.chosen, c.rejected) if pairs else (c,))]
    latent_file = {m: folder / "latents" / f"{m.path.stem}_{m.bucket}_{_digest(identity(m.path), str(m.bucket), encoders.vae_id)}.safetensors"
                   for m in media}
    todo_media = [m for m in media if not latent_file[m].exists()]
    if todo_media:
        log(f"cache: encoding {len(todo_media)} clip(s) with the VAE")
        vae = encoders.load_vae()
        for i, m in enumerate(todo_media):
            frames = read_frames(m.path, m.bucket)
            video = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float() / 127.5 - 1.0
            latents = vae.encode(video[None], sample=False)[0].float().cpu()
            save_file({"latents": latents.contiguous()}, str(latent_file[m]))
            log(f"cache: {i + 1}/{len(todo_media)} {m.path.name} -> {tuple(latents.shape)}")
        del vae
        _collect()
    with safe_open(str(negative_file), "pt") as f:
        negative = TextConditioning(f.get_tensor("llm_states"), f.get_tensor("mask"), f.get_tensor("clip_states"))
    samples = []
    for c in clips:
        if pairs:
            samples.append(Sample(latent_file[c.chosen], text_file[c.prompt], latent_file[c.rejected]))
        else:
            samples.append(Sample(latent_file[c], text_file[c.caption]))
    return TrainingSet(samples, negative)
