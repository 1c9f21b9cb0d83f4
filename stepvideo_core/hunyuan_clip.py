"""Hunyuan-CLIP: the Chinese BERT (HunyuanDiT's "CLIP" text encoder) whose last hidden state is the DiT's second
text stream, on ``transformers``' ``BertModel`` and ``BertTokenizer``.

Only local files are read. Weights are loaded without pickle code execution: ``.safetensors`` directly, a
``pytorch_model.bin`` through ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from .loading import Checkpoint, CheckpointError, identify_foreign

MAX_LENGTH = 77
ENCODER_DIR = "clip_text_encoder"
TOKENIZER_DIR = "tokenizer"
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
# Heads that some exports keep next to the encoder; the conditioning never uses them.
IGNORED_PREFIXES = ("cls.", "pooler.")


def _require(path: Path, what: str) -> Path:
    if not path.exists():
        raise FileNotFoundError(f"Hunyuan-CLIP {what} not found: expected {path.name} at {path} "
                                "(hunyuan_clip/ of stepfun-ai/stepvideo-t2v holds clip_text_encoder/ and tokenizer/).")
    return path


def _split_folder(folder: str | Path) -> tuple[Path, Path]:
    folder = _require(Path(folder), "folder")
    return folder / ENCODER_DIR, folder / TOKENIZER_DIR


def read_state_dict(encoder_dir: Path) -> dict[str, torch.Tensor]:
    for name in WEIGHT_FILES:
        file = encoder_dir / name
        if not file.is_file():
            continue
        if file.suffix == ".bin":
            try:
                state = torch.load(file, map_location="cpu", weights_only=True)
            except Exception as e:  # weights_only refuses anything that is not plain tensors
                raise CheckpointError(f"{file} could not be read as plain tensors ({type(e).__name__}: {e}).") from None
        else:
            ckpt = Checkpoint(file)
            state = {k: ckpt.read(k) for k in ckpt.keys()}
        return state
    found = sorted(p.name for p in encoder_dir.glob("*.safetensors"))
    if found:  # a differently named single safetensors file
        ckpt = Checkpoint(encoder_dir / found[0]) if len(found) == 1 else Checkpoint(encoder_dir)
        return {k: ckpt.read(k) for k in ckpt.keys()}
    raise FileNotFoundError(f"Hunyuan-CLIP weights not found: expected {' or '.join(WEIGHT_FILES)} in {encoder_dir}.")


class HunyuanClip(nn.Module):
    """Tokenizer + BERT; ``forward(texts)`` returns ``last_hidden_state`` [b, 77, hidden] for all positions."""

    def __init__(self, model, tokenizer, max_length: int = MAX_LENGTH):
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.max_length = max_length

    def tokenize(self, texts: str | Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        texts = [texts] if isinstance(texts, str) else list(texts)
        enc = self.tokenizer(texts, padding="max_length", max_length=self.max_length, truncation=True,
                             return_attention_mask=True, return_tensors="pt")
        return enc["input_ids"], enc["attention_mask"]

    @torch.no_grad()
    def forward(self, texts: str | Sequence[str]) -> torch.Tensor:
        ids, mask = self.tokenize(texts)
        device = next(self.model.parameters()).device
        return self.model(input_ids=ids.to(device), attention_mask=mask.to(device)).last_hidden_state


def load_hunyuan_clip(folder: str | Path, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                      max_length: int = MAX_LENGTH) -> HunyuanClip:
    """Load ``hunyuan_clip/`` (``clip_text_encoder/`` config + weights, ``tokenizer/vocab.txt``); fp32 by default,
    as in the reference."""
    from transformers import BertConfig, BertModel, BertTokenizer

    encoder_dir, tokenizer_dir = _split_folder(folder)
    config_file = _require(_require(encoder_dir, "text encoder folder") / "config.json", "text encoder config")
    _require(_require(tokenizer_dir, "tokenizer folder") / "vocab.txt", "tokenizer vocabulary")
    tokenizer = BertTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True)

    config = BertConfig.from_json_file(str(config_file))
    state = read_state_dict(encoder_dir)
    # Exports differ: BertModel keys are bare, BertForPreTraining-style ones carry "bert." (and MLM heads).
    if any(k.startswith("bert.") for k in state):
        state = {k[len("bert."):]: v for k, v in state.items() if k.startswith("bert.")}
    state = {k: v for k, v in state.items() if not k.startswith(IGNORED_PREFIXES) and not k.endswith("position_ids")}
    if "embeddings.word_embeddings.weight" not in state:
        foreign = identify_foreign(state)
        what = f"looks like {foreign}" if foreign else "has no BERT embeddings"
        raise CheckpointError(f"{encoder_dir}: the weights {what}; this is not a Hunyuan-CLIP text encoder.")
    with torch.device("meta"):
        model = BertModel(config, add_pooling_layer=False)
    expected = {k for k in model.state_dict() if not k.endswith("position_ids")}
    missing, unexpected = expected - set(state), set(state) - expected
    if missing or unexpected:
        raise CheckpointError(
            f"{encoder_dir}: weights do not match its config.json (missing {sorted(missing)[:4]}, "
            f"unexpected {sorted(unexpected)[:4]})."
        )
    bad = [k for k, v in model.state_dict().items() if k in state and tuple(state[k].shape) != tuple(v.shape)]
    if bad:
        raise CheckpointError(f"{encoder_dir}: tensor shapes differ from config.json for {bad[:4]}.")
    model.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=False, assign=True)
    for name, buf in list(model.named_buffers()):  # non-persistent buffers (position ids) are still on meta
        if buf.is_meta:
            owner_name, _, attr = name.rpartition(".")
            owner = model.get_submodule(owner_name)
            if attr == "position_ids":
                owner._buffers[attr] = torch.arange(buf.shape[-1]).expand(buf.shape)
            elif attr == "token_type_ids":
                owner._buffers[attr] = torch.zeros(buf.shape, dtype=torch.long)
            else:
                raise CheckpointError(f"{encoder_dir}: unexpected uninitialised buffer {name}.")
    return HunyuanClip(model.to(device).eval().requires_grad_(False), tokenizer, max_length)
