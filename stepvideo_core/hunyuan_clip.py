"""Hunyuan-CLIP: the Chinese BERT (HunyuanDiT's "CLIP" text encoder) whose last hidden state is the DiT's second
text stream, loaded by ``transformers`` itself (``BertModel.from_pretrained``, ``BertTokenizer``).

The official folder is read as it is stored: ``clip_text_encoder/`` (``config.json`` and ``pytorch_model.bin``
with ``bert.``-prefixed keys, or a ``model.safetensors``) and ``tokenizer/vocab.txt``. ``transformers`` strips
the prefix, builds the model on the meta device, casts to the asked dtype, and reads ``.bin`` files with
``torch.load(weights_only=True)`` (no pickle code runs). Only local files are read. Its loading report is
turned into a ``CheckpointError`` naming the folder when a weight the encoder uses is missing.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import SafetensorError
from torch import nn

from .loading import CheckpointError, check_device, identify_foreign

MAX_LENGTH = 77
ENCODER_DIR = "clip_text_encoder"
TOKENIZER_DIR = "tokenizer"
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
# Heads that exports keep next to the encoder (the pooler, BertForPreTraining's "cls."); the conditioning never
# uses them, so they may be in the file without being loaded.
IGNORED_PREFIXES = ("cls.", "pooler.", "bert.pooler.")


def _require(path: Path, what: str) -> Path:
    if not path.exists():
        raise FileNotFoundError(f"Hunyuan-CLIP {what} not found: expected {path.name} at {path} "
                                "(hunyuan_clip/ of stepfun-ai/stepvideo-t2v holds clip_text_encoder/ and tokenizer/).")
    return path


def _split_folder(folder: str | Path) -> tuple[Path, Path]:
    folder = _require(Path(folder), "folder")
    return folder / ENCODER_DIR, folder / TOKENIZER_DIR


@contextmanager
def _quiet_transformers():
    """Hold back transformers' load report and progress bar (an unused pooler would be reported on every load);
    what matters in the report is checked here. The previous settings come back afterwards."""
    from transformers.utils import logging as hf_logging

    verbosity, bar = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity(logging.ERROR)
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bar:
            hf_logging.enable_progress_bar()


def load_bert(encoder_dir: Path, dtype: torch.dtype):
    """``BertModel.from_pretrained`` on ``encoder_dir`` without its pooler; every problem a user can meet becomes
    a ``FileNotFoundError`` or ``CheckpointError`` that names the folder."""
    import pickle

    from transformers import BertModel

    if not any((encoder_dir / name).is_file() for name in WEIGHT_FILES):
        raise FileNotFoundError(f"Hunyuan-CLIP weights not found: expected {' or '.join(WEIGHT_FILES)} in {encoder_dir}.")
    try:
        with _quiet_transformers():
            model, report = BertModel.from_pretrained(str(encoder_dir), dtype=dtype, add_pooling_layer=False,
                                                      local_files_only=True, output_loading_info=True)
    except pickle.UnpicklingError as e:  # weights_only refuses anything that is not plain tensors
        raise CheckpointError(f"{encoder_dir}: the weights could not be read as plain tensors "
                              f"({str(e).splitlines()[0]}).") from None
    except SafetensorError as e:
        raise CheckpointError(f"{encoder_dir}: the weights file is not a readable safetensors file ({e}); download "
                              "it again.") from None
    except (OSError, RuntimeError, ValueError) as e:  # size mismatches, broken config.json
        raise CheckpointError(f"{encoder_dir}: the weights do not fit its config.json ({str(e).splitlines()[0]}).") from None
    missing = sorted(report["missing_keys"])
    unexpected = sorted(k for k in report["unexpected_keys"] if not k.startswith(IGNORED_PREFIXES))
    if missing and "embeddings.word_embeddings.weight" in missing:
        foreign = identify_foreign(unexpected)
        what = f"look like {foreign}" if foreign else "have no BERT embeddings"
        raise CheckpointError(f"{encoder_dir}: the weights {what}; this is not a Hunyuan-CLIP text encoder.")
    if missing or unexpected:
        raise CheckpointError(f"{encoder_dir}: weights do not match its config.json (missing {missing[:4]}, "
                              f"unexpected {unexpected[:4]}).")
    return model


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
    from transformers import BertTokenizer

    device = check_device(device)
    encoder_dir, tokenizer_dir = _split_folder(folder)
    _require(_require(encoder_dir, "text encoder folder") / "config.json", "text encoder config")
    _require(_require(tokenizer_dir, "tokenizer folder") / "vocab.txt", "tokenizer vocabulary")
    tokenizer = BertTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True)
    model = load_bert(encoder_dir, dtype)
    return HunyuanClip(model.to(device).eval().requires_grad_(False), tokenizer, max_length)
