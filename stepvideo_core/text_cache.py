"""A disk cache of encoded prompt pairs, so a prompt already encoded once never needs Step-LLM (39 GB) again.

An entry is one ``.safetensors`` file holding the positive and negative ``TextConditioning`` of one prompt. Its
name is a SHA-256 over everything the states depend on: the prompt, the negative prompt, the two magic-suffix
switches, the output dtype and the encoders' identity (``encoder_identity``: every file's relative path, size
and modification time under the Step-LLM and Hunyuan-CLIP folders, plus the settings the caller names, such as
the weight dtype). Replacing a weight file therefore changes every key.

The cache never grows past ``max_bytes`` (1 GiB by default: about 120 pairs at the official size, 8.2 MB each in
bf16; the CLI's own cache, under the user's cache folder, takes ``CLI_MAX_BYTES``): after each write the least recently used entries (a hit refreshes an entry's modification time) are
deleted until the rest fit. An entry that cannot be read back whole (truncated, foreign, wrong shapes) is
deleted and reported as a miss, so the prompt is encoded again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .step_llm import MAX_LENGTH as LLM_TOKENS
from .text_encoding import CLIP_TOKENS, PrepareHook, TextConditioning, TextEncoders, encode_prompts

log = logging.getLogger("stepvideo")

CACHE_FORMAT = "stepvideo-text-cache-1"  # part of every key: a layout change invalidates old entries
DEFAULT_MAX_BYTES = 1 << 30
# The CLI's limit: 2 GiB holds the official eval set's 128 prompts (1.05 GB in bf16) with room for as many again.
CLI_MAX_BYTES = 2 << 30
SUFFIX = ".safetensors"
FIELDS = ("llm_states", "mask", "clip_states")


def encoder_identity(folders: Iterable[str | os.PathLike], **settings) -> str:
    """A fingerprint of the encoder files (relative path, size, mtime of every file under each folder, or of the
    file itself) and of ``settings`` (anything else the states depend on, e.g. ``llm_dtype="bf16"``). Reads only
    file metadata, so it costs nothing next to loading the encoders."""
    parts = []
    for folder in folders:
        root = Path(folder)
        files = sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else [root]
        for f in files:
            st = f.stat()
            parts.append((str(f.relative_to(root)) if root.is_dir() else f.name, st.st_size, st.st_mtime_ns))
        parts.append(("folder", str(root.resolve())))
    blob = json.dumps({"files": parts, "settings": {k: str(v) for k, v in sorted(settings.items())}})
    return hashlib.sha256(blob.encode()).hexdigest()


@dataclass
class TextEmbeddingCache:
    folder: Path
    max_bytes: int = DEFAULT_MAX_BYTES

    def __post_init__(self):
        self.folder = Path(self.folder)
        if self.max_bytes <= 0:
            raise ValueError(f"max_bytes must be positive, not {self.max_bytes}")

    @staticmethod
    def key(identity: str, prompt: str, negative_prompt: str | None, positive_magic: bool | str,
            negative_magic: bool | str, dtype: torch.dtype | None) -> str:
        """``positive_magic`` / ``negative_magic`` as ``encode_prompts`` takes them: True (the T2V suffix), False or
        "" (none), or the suffix itself (the TI2V one), which keys apart from True."""
        fields = dict(format=CACHE_FORMAT, identity=identity, prompt=prompt, negative_prompt=negative_prompt or "",
                      positive_magic=_magic_key(positive_magic), negative_magic=_magic_key(negative_magic),
                      dtype=str(dtype))
        return hashlib.sha256(json.dumps(fields, ensure_ascii=False, sort_keys=True).encode()).hexdigest()

    def path(self, key: str) -> Path:
        return self.folder / f"{key}{SUFFIX}"

    def load(self, key: str) -> tuple[TextConditioning, TextConditioning] | None:
        """The cached (positive, negative) pair, or None on a miss; an unreadable entry is deleted (a miss)."""
        path = self.path(key)
        if not path.is_file():
            return None
        try:
            tensors = load_file(path)
            pair = tuple(TextConditioning(*(tensors[f"{side}.{f}"] for f in FIELDS)) for side in ("positive", "negative"))
            for c in pair:
                if (c.llm_states.ndim != 3 or c.llm_states.shape[1] != LLM_TOKENS or c.clip_states.shape[1] != CLIP_TOKENS
                        or c.mask.shape != (c.llm_states.shape[0], CLIP_TOKENS + LLM_TOKENS)):
                    raise ValueError(f"unexpected shapes {tuple(c.llm_states.shape)}, {tuple(c.mask.shape)}")
        except (SafetensorError, OSError, KeyError, ValueError) as e:
            log.warning("StepVideo: text cache entry %s is unreadable (%s); encoding the prompt again", path.name, e)
            path.unlink(missing_ok=True)
            return None
        os.utime(path)  # least recently used goes first
        return pair  # type: ignore[return-value]

    def store(self, key: str, positive: TextConditioning, negative: TextConditioning) -> None:
        """Write atomically (a temporary file renamed into place), then evict down to ``max_bytes``."""
        self.folder.mkdir(parents=True, exist_ok=True)
        tensors = {f"{side}.{f}": getattr(c, f).detach().to("cpu").contiguous()
                   for side, c in (("positive", positive), ("negative", negative)) for f in FIELDS}
        fd, tmp = tempfile.mkstemp(dir=self.folder, suffix=".tmp")
        os.close(fd)
        try:
            save_file(tensors, tmp, metadata={"format": CACHE_FORMAT})
            os.replace(tmp, self.path(key))
        finally:
            Path(tmp).unlink(missing_ok=True)
        self.evict(keep=key)

    def entries(self) -> list[Path]:
        return sorted(self.folder.glob(f"*{SUFFIX}"), key=lambda p: p.stat().st_mtime_ns) if self.folder.is_dir() else []

    def evict(self, keep: str | None = None) -> None:
        """Delete the least recently used entries until the cache fits ``max_bytes`` (``keep`` goes last)."""
        entries = self.entries()
        if keep is not None:
            entries.sort(key=lambda p: p.stem == keep)
        total = sum(p.stat().st_size for p in entries)
        for p in entries:
            if total <= self.max_bytes:
                break
            total -= p.stat().st_size
            p.unlink(missing_ok=True)


def _magic_key(magic: bool | str) -> bool | str:
    return magic if isinstance(magic, str) and magic else bool(magic)


def default_folder() -> Path:
    """The CLI's text cache: ``$STEPVIDEO_CACHE_DIR/text_cache`` when set, else ``stepvideo/text_cache`` in the
    user's cache folder (``%LOCALAPPDATA%`` on Windows, ``$XDG_CACHE_HOME`` or ``~/.cache`` elsewhere)."""
    root = os.environ.get("STEPVIDEO_CACHE_DIR")
    if root:
        return Path(root) / "text_cache"
    if os.name == "nt" and os.environ.get("LOCALAPPDATA"):
        base = Path(os.environ["LOCALAPPDATA"])
    else:
        base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "stepvideo" / "text_cache"


def encode_prompts_cached(
    cache: TextEmbeddingCache | None,
    identity: str,
    get_encoders: Callable[[], TextEncoders],
    prompt: str,
    negative_prompt: str | None = None,
    *,
    positive_magic: bool | str = True,
    negative_magic: bool | str = True,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    after: str = "offload",
    prepare: PrepareHook | None = None,
) -> tuple[TextConditioning, TextConditioning, bool]:
    """``encode_prompts`` for one prompt through ``cache``: (positive, negative, hit).

    ``get_encoders`` is called only on a miss, so a caller that loads the encoders inside it never loads them
    for a cached prompt. A hit returns the stored states on ``device`` (the CPU when None).
    """
    key = None
    if cache is not None:
        key = cache.key(identity, prompt, negative_prompt, positive_magic, negative_magic, dtype)
        pair = cache.load(key)
        if pair is not None:
            pos, neg = (c.to(device=device or "cpu") for c in pair)
            return pos, neg, True
    pos, neg = encode_prompts(get_encoders(), prompt, negative_prompt, positive_magic=positive_magic,
                              negative_magic=negative_magic, device=device, dtype=dtype, after=after,
                              prepare=prepare)
    if cache is not None:
        cache.store(key, pos, neg)
    return pos, neg, False
