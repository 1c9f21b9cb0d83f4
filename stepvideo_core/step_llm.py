"""Step-LLM, the 48-layer bilingual decoder whose last hidden layer conditions the DiT, in plain PyTorch.

The official model calls a closed CUDA kernel for attention (sm_80/86/90, Python 3.10, old torch only). Here
attention is written out: causal, grouped-query (48 query heads share 8 key/value groups, head h -> group h // 6)
and, by default, the square-root ALiBi bias that the Step-1 family's pure-PyTorch fallback and the MindSpore
Step-Video port use. That bias is inferred, not verified against the kernel, so it sits behind one config field
(``position_bias``). Module names follow ``step_llm/*.safetensors`` so the official shards load without renaming.
"""

from __future__ import annotations

import json
import math
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .loading import load_checkpoint_model
from .ops import FP8_DTYPES, RMSNorm, default_ops

POSITION_BIASES = ("sqrt_alibi", "alibi", "none")
FFN_MULTIPLE = 256  # the official FeedForward rounds its hidden size up to this (a no-op for 16896)
EMBED_KEY = "tok_embeddings.word_embeddings.weight"

TOKENIZER_FILE = "step1_chat_tokenizer.model"
BOS_ID, EOS_ID, PAD_ID = 1, 2, 2  # hard-coded by the official wrapper, whatever the SentencePiece model says
MAX_LENGTH = 320
CONTROL_TOKENS = ("<|BOT|>", "<|EOT|>", "<|CALL_START|>", "<|CALL_END|>", "<|THINK_START|>", "<|THINK_END|>")
MASK_TOKENS = ("<|MASK_1e69f|>", "<|UNMASK_1e69f|>")


@dataclass
class StepLLMConfig:
    """Architecture fields of ``step_llm/config.json``; defaults are the released model."""

    hidden_size: int = 6144
    num_layers: int = 48
    num_attention_heads: int = 48
    num_attention_groups: int = 8
    ffn_hidden_size: int = 16896
    vocab_size: int = 65536
    layernorm_epsilon: float = 1e-5
    # Unverified against the closed kernel (see the module docstring); "none" is plain causal attention.
    position_bias: str = "sqrt_alibi"

    def __post_init__(self):
        if self.position_bias not in POSITION_BIASES:
            raise ValueError(f"position_bias must be one of {POSITION_BIASES}, not {self.position_bias!r}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError("hidden_size must be a multiple of num_attention_heads")
        if self.num_attention_heads % self.num_attention_groups:
            raise ValueError("num_attention_heads must be a multiple of num_attention_groups")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def heads_per_group(self) -> int:
        return self.num_attention_heads // self.num_attention_groups

    @property
    def ffn_dim(self) -> int:
        return -(-self.ffn_hidden_size // FFN_MULTIPLE) * FFN_MULTIPLE

    @classmethod
    def read_json(cls, path: str | Path) -> dict:
        """The known fields of an official ``config.json`` (``padded_vocab_size`` is the table's row count)."""
        return cls.known_fields(json.loads(Path(path).read_text()))

    @classmethod
    def known_fields(cls, raw: dict) -> dict:
        """The fields of a ``config.json``'s values that this config has."""
        raw = dict(raw)
        if "padded_vocab_size" in raw:
            raw["vocab_size"] = raw["padded_vocab_size"]
        known = {f.name for f in fields(cls)}
        return {k: v for k, v in raw.items() if k in known}

    @classmethod
    def from_shapes(cls, shapes: dict[str, tuple[int, ...]], head_dim: int = 128, **overrides) -> StepLLMConfig:
        """Infer the architecture from tensor shapes; the head size (128 in the release) is not in the shapes."""
        try:
            vocab, hidden = shapes[EMBED_KEY]
            qkv_rows = shapes["transformer.layers.0.attention.wqkv.weight"][0]
            ffn = shapes["transformer.layers.0.feed_forward.w2.weight"][1]
        except KeyError as e:
            raise ValueError(f"not a Step-LLM checkpoint: key {e.args[0]!r} is missing") from None
        # layers counted by their attention weight: one stray extra key is then reported as extra
        layers = 1 + max(int(k.split(".")[2]) for k in shapes
                         if re.fullmatch(r"transformer\.layers\.\d+\.attention\.wqkv\.weight", k))
        values = dict(hidden_size=hidden, num_layers=layers, num_attention_heads=hidden // head_dim,
                      num_attention_groups=(qkv_rows - hidden) // (2 * head_dim), ffn_hidden_size=ffn, vocab_size=vocab)
        return cls(**{**values, **overrides})


def alibi_slopes(num_heads: int) -> torch.Tensor:
    """Per-head ALiBi slopes in head order: the geometric series for the largest power of two n <= heads, then
    the odd-indexed members of the 2n series for the remaining heads (48 heads: 2^(-k/4), k=1..32, then
    2^(-(2j-1)/8), j=1..16)."""
    n = 2 ** math.floor(math.log2(num_heads))
    first = [2.0 ** (-8.0 * k / n) for k in range(1, n + 1)]
    rest = [2.0 ** (-4.0 * (2 * j - 1) / n) for j in range(1, num_heads - n + 1)]
    return torch.tensor(first + rest, dtype=torch.float64)


def relative_distance(length: int, kind: str, device=None) -> torch.Tensor:
    """[L, L] fp32 penalty base (sqrt(i-j), i-j, or 0 for plain causal) with +inf above the diagonal, so that
    ``-slope * distance`` is the whole additive bias, causal mask included."""
    pos = torch.arange(length, device=device, dtype=torch.float32)
    dist = (pos[:, None] - pos[None, :]).clamp(min=0)
    if kind == "sqrt_alibi":
        dist = dist.sqrt()
    elif kind == "none":
        dist = torch.zeros_like(dist)
    return dist.masked_fill(torch.ones(length, length, dtype=torch.bool, device=device).triu(1), float("inf"))


def grouped_causal_attention(q, k, v, distance, slopes) -> torch.Tensor:
    """Causal attention for q [b, H, L, d] and k, v [b, G, L, d], head h reading group h // (H // G).

    One group at a time: its heads are folded into the query rows, so K/V are never copied out per head, and
    the bias for just those heads is built from the shared [L, L] distance, so at most [H // G, L, L] of bias
    exists at once (2.4 MB at 320 tokens) instead of [H, L, L]. Scores and softmax are fp32 from the (bf16)
    inputs, which is what a flash-style kernel with an in-kernel bias accumulates in.
    """
    b, heads, length, d = q.shape
    groups = k.shape[1]
    per = heads // groups
    out = torch.empty_like(q)
    for g in range(groups):
        heads_g = slice(g * per, (g + 1) * per)
        qg = q[:, heads_g].float().reshape(b, per * length, d)
        scores = torch.bmm(qg, k[:, g].float().transpose(1, 2)).view(b, per, length, length)
        scores.mul_(1.0 / math.sqrt(d)).sub_(distance * slopes[heads_g, None, None])  # +inf -> -inf: causal
        probs = scores.softmax(dim=-1).view(b, per * length, length)
        out[:, heads_g] = torch.bmm(probs, v[:, g].float()).view(b, per, length, d).to(q.dtype)
    return out


class Attention(nn.Module):
    def __init__(self, cfg: StepLLMConfig, operations, device=None, dtype=None):
        super().__init__()
        self.cfg = cfg
        kv_rows = 2 * cfg.head_dim * cfg.num_attention_groups
        self.wqkv = operations.Linear(cfg.hidden_size, cfg.hidden_size + kv_rows, bias=False, device=device, dtype=dtype)
        self.wo = operations.Linear(cfg.hidden_size, cfg.hidden_size, bias=False, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor, distance: torch.Tensor, slopes: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        b, length, _ = x.shape
        # wqkv rows: all query heads first, then per group its key rows followed by its value rows.
        q, kv = self.wqkv(x).split([cfg.hidden_size, 2 * cfg.head_dim * cfg.num_attention_groups], dim=-1)
        q = q.view(b, length, cfg.num_attention_heads, cfg.head_dim).transpose(1, 2)
        k, v = kv.view(b, length, cfg.num_attention_groups, 2 * cfg.head_dim).transpose(1, 2).chunk(2, dim=-1)
        out = grouped_causal_attention(q, k, v, distance, slopes)
        return self.wo(out.transpose(1, 2).reshape(b, length, cfg.hidden_size))


class FeedForward(nn.Module):
    def __init__(self, cfg: StepLLMConfig, operations, device=None, dtype=None):
        super().__init__()
        self.w1 = operations.Linear(cfg.hidden_size, 2 * cfg.ffn_dim, bias=False, device=device, dtype=dtype)
        self.w2 = operations.Linear(cfg.ffn_dim, cfg.hidden_size, bias=False, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.w1(x).chunk(2, dim=-1)  # w1 stacks the gate half on top of the up half
        return self.w2(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, cfg: StepLLMConfig, operations, device=None, dtype=None):
        super().__init__()
        self.attention_norm = RMSNorm(cfg.hidden_size, eps=cfg.layernorm_epsilon, device=device, dtype=dtype)
        self.attention = Attention(cfg, operations, device, dtype)
        self.ffn_norm = RMSNorm(cfg.hidden_size, eps=cfg.layernorm_epsilon, device=device, dtype=dtype)
        self.feed_forward = FeedForward(cfg, operations, device, dtype)

    def forward(self, x, distance, slopes):
        x = x + self.attention(self.attention_norm(x), distance, slopes)
        return x + self.feed_forward(self.ffn_norm(x))


class Embeddings(nn.Module):
    def __init__(self, cfg: StepLLMConfig, operations, device=None, dtype=None):
        super().__init__()
        self.word_embeddings = operations.Embedding(cfg.vocab_size, cfg.hidden_size, device=device, dtype=dtype)


class Layers(nn.Module):
    def __init__(self, cfg: StepLLMConfig, operations, device=None, dtype=None):
        super().__init__()
        self.layers = nn.ModuleList([Block(cfg, operations, device, dtype) for _ in range(cfg.num_layers)])


class StepLLM(nn.Module):
    def __init__(self, config: StepLLMConfig | None = None, operations=None, device=None, dtype=None):
        super().__init__()
        self.config = config = config or StepLLMConfig()
        ops = operations or default_ops
        self.tok_embeddings = Embeddings(config, ops, device, dtype)
        self.transformer = Layers(config, ops, device, dtype)
        self.compute_dtype: torch.dtype = dtype or torch.float32

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Last layer's hidden states [b, L, hidden] (the model has no final norm).

        ``attention_mask`` is accepted for the reference's signature and ignored, as there: attention is purely
        causal, and since padding only ever follows the valid tokens, no valid token attends to a pad.
        """
        del attention_mask
        cfg = self.config
        x = self.tok_embeddings.word_embeddings(input_ids).to(self.compute_dtype)
        length = input_ids.shape[1]
        distance = relative_distance(length, cfg.position_bias, device=x.device)
        slopes = alibi_slopes(cfg.num_attention_heads).to(device=x.device, dtype=torch.float32)
        for block in self.transformer.layers:
            x = block(x, distance, slopes)
        return x


def load_step_llm(
    folder: str | Path,
    weight_dtype: torch.dtype = torch.bfloat16,
    compute_dtype: torch.dtype | None = None,
    device: torch.device | str = "cpu",
    operations=None,
    **config_overrides,
) -> StepLLM:
    """Load the official ``step_llm/`` folder (shards + index, optional ``config.json``), one ``.safetensors``, or a
    ``.gguf`` (the file, or the folder holding it in place of the shards; ``weight_dtype`` is then the compute
    dtype and block-type weights stay quantized).

    The model is built on the meta device and filled one tensor at a time. fp8 ``weight_dtype`` (e4m3fn or
    e5m2) stores the Linear and embedding weights in fp8 (about 20 GB instead of 39) and computes in
    ``compute_dtype`` (bf16 by default). Weights may stay on the CPU while inputs go to the GPU: the default
    operations move each layer's weights at call time.
    """
    if compute_dtype is None:
        compute_dtype = torch.bfloat16 if weight_dtype in FP8_DTYPES else weight_dtype
    if compute_dtype in FP8_DTYPES:
        raise ValueError("fp8 is a storage dtype; compute in bfloat16, float16 or float32")
    # config.json fixes what the shapes cannot (head count, eps); the shapes fix the rest, so reduced-depth
    # checkpoints load without editing their config.
    config_file = (Path(folder) if Path(folder).is_dir() else Path(folder).parent) / "config.json"

    def build(ckpt, shapes) -> StepLLM:
        # A GGUF carries its source's config.json (the converter records it), for a file kept away from its folder.
        from_json = (StepLLMConfig.read_json(config_file) if config_file.is_file() else
                     StepLLMConfig.known_fields(ckpt.config()) if hasattr(ckpt, "config") else {})
        head_dim = from_json["hidden_size"] // from_json["num_attention_heads"] if "num_attention_heads" in from_json else 128
        extra = {k: from_json[k] for k in ("layernorm_epsilon", "position_bias") if k in from_json}
        return StepLLM(StepLLMConfig.from_shapes(shapes, head_dim=head_dim, **{**extra, **config_overrides}),
                       operations=operations)

    model = load_checkpoint_model(folder, model_name="Step-LLM text encoder", anchors=(EMBED_KEY,), build=build,
                                  weight_dtype=weight_dtype, compute_dtype=compute_dtype, device=device,
                                  hint="Use the step_llm/ folder of stepfun-ai/stepvideo-t2v.")
    model.compute_dtype = compute_dtype
    return model


def tokenizer_folder(step_llm: str | Path) -> Path:
    """Where the tokenizer of a Step-LLM checkpoint is: its folder, or the folder of a single ``.gguf`` file."""
    path = Path(step_llm)
    return path.parent if path.suffix == ".gguf" else path


class PromptTruncatedWarning(UserWarning):
    pass


class StepLLMTokenizer:
    """``step1_chat_tokenizer.model`` with the official wrapper's framing: [BOS] + ids[:318] + [EOS] + PADs."""

    def __init__(self, path: str | Path, max_length: int = MAX_LENGTH):
        import sentencepiece

        path = Path(path)
        file = path / TOKENIZER_FILE if path.is_dir() or not path.suffix else path
        if not file.is_file():
            raise FileNotFoundError(
                f"Step-LLM tokenizer not found: expected {file.name} at {file} "
                f"(it ships inside the step_llm/ folder of stepfun-ai/stepvideo-t2v)."
            )
        try:
            self.sp = sentencepiece.SentencePieceProcessor(model_file=str(file))
        except (OSError, RuntimeError) as e:
            raise ValueError(f"{file} is not a valid SentencePiece model ({e}).") from None
        missing = [t for t in CONTROL_TOKENS if self.sp.piece_to_id(t) == self.sp.unk_id() or not self.sp.is_control(self.sp.piece_to_id(t))]
        missing += [t for t in MASK_TOKENS if self.sp.piece_to_id(t) == self.sp.unk_id()]
        if missing:
            raise ValueError(f"{file} is not the Step-1 chat tokenizer: it lacks the special token(s) {', '.join(missing)}.")
        self.file = file
        self.max_length = max_length

    def tokenize(self, text: str) -> list[int]:
        return self.sp.encode_as_ids(text)

    def __call__(self, texts: str | Sequence[str], max_length: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (input_ids, attention_mask), both int64 [b, max_length]; the mask is 1 on BOS..EOS."""
        length = max_length or self.max_length
        texts = [texts] if isinstance(texts, str) else list(texts) or [""]
        ids = torch.full((len(texts), length), PAD_ID, dtype=torch.long)
        mask = torch.zeros((len(texts), length), dtype=torch.long)
        for row, text in enumerate(texts):
            tokens = self.tokenize(text)
            if len(tokens) > length - 2:
                warnings.warn(
                    f"Step-LLM prompt truncated: {len(tokens) - (length - 2)} of {len(tokens)} tokens dropped "
                    f"(at most {length - 2} fit). Prompt starts: {text[:40]!r}",
                    PromptTruncatedWarning, stacklevel=2,
                )
                tokens = tokens[:length - 2]
            framed = [BOS_ID, *tokens, EOS_ID]
            ids[row, :len(framed)] = torch.tensor(framed)
            mask[row, :len(framed)] = 1
        return ids, mask
