"""The Step-Video-T2V diffusion transformer, with the official checkpoint's module names.

Module and parameter names follow ``transformer/diffusion_pytorch_model-*.safetensors`` exactly, so the
official shards load without any key conversion. Layers come from an injectable ``operations`` namespace
(see ``ops.py``); attention is one pluggable function (see ``attention.py``).
"""

from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .attention import AttentionFn, sdpa_attention
from .loading import Checkpoint, CheckpointError, load_checkpoint_model, open_checkpoint_model, read_config_json
from .ops import FP8_DTYPES, RMSNorm, default_ops

BLOCK_NORM_EPS = 1e-5  # block norm1/norm2; the model-level norm_eps applies only to caption_norm and norm_out
TIMESTEP_CHANNELS = 256
TIMESTEP_SCALE = 1000.0
ROPE_THETA = 10000.0
MOTION_SCORE_KEY = "adaln_single.emb.motion_score_embedder.linear_1.weight"  # only Step-Video-TI2V has it


@dataclass
class DiTConfig:
    """Constructor fields of the official ``StepVideoModel``; defaults are the released 30B model."""

    num_attention_heads: int = 48
    attention_head_dim: int = 128
    in_channels: int = 64
    out_channels: int = 64
    num_layers: int = 48
    patch_size: int = 1
    caption_channels: tuple[int, int] = (6144, 1024)
    norm_eps: float = 1e-6
    # Step-Video-TI2V (the official constructor's name for it): the patch embedding reads the noisy latents and the
    # image-condition latents concatenated along channels (2 x in_channels), and a motion-score embedding is added
    # to the timestep embedding. False is Step-Video-T2V.
    use_additional_conditions: bool = False
    # Reproduce the reference's rounding through the compute dtype (bf16 in practice): the timestep is cast
    # to it and multiplied by 1000 in it, RoPE angles are cast to it before cos/sin, and the text-mask sum
    # is taken in it (so more than 256 valid keys round to bf16 precision). In fp32 all three are no-ops.
    # Turning it off computes these in fp32, which differs from what the official pipeline feeds the weights.
    reference_rounding: bool = True
    # Low-memory path: run the feed-forward over at most this many tokens at a time (0 = all at once).
    ff_chunk_size: int = 0

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def patch_in_channels(self) -> int:
        """Channels the patch embedding reads: the latents, plus the condition latents for TI2V."""
        return 2 * self.in_channels if self.use_additional_conditions else self.in_channels

    @property
    def rope_split(self) -> tuple[int, int, int]:
        """Channels of each head rotated by (frame, row, column): half, quarter, quarter (64/32/32 at 128)."""
        d = self.attention_head_dim
        return (d // 2, d // 4, d // 4)

    @classmethod
    def from_shapes(cls, shapes: dict[str, tuple[int, ...]], **overrides) -> DiTConfig:
        """Infer the architecture from checkpoint tensor shapes (official key names); a motion-score embedder marks
        Step-Video-TI2V, whose patch embedding reads twice the latent channels."""
        try:
            inner, patch_in, p, _ = shapes["pos_embed.proj.weight"]
            head_dim = shapes["transformer_blocks.0.attn1.q_norm.weight"][0]
            out_ch = shapes["proj_out.weight"][0] // (p * p)
            caption = shapes["caption_projection.linear_1.weight"][1]
            clip = shapes["clip_projection.weight"][1]
        except KeyError as e:
            raise ValueError(f"not a Step-Video DiT checkpoint: key {e.args[0]!r} is missing") from None
        check_head_dim(shapes, inner)
        # Blocks counted by their self-attention weight, from block 0 up to the first one without it, so one stray
        # extra key (even a whole stray block's weight far past the last) is reported as extra, not as a whole
        # block's worth of missing ones.
        blocks = {int(k.split(".")[1]) for k in shapes if re.fullmatch(r"transformer_blocks\.\d+\.attn1\.wqkv\.weight", k)}
        layers = next(i for i in range(len(blocks) + 1) if i not in blocks) or 1 + max(blocks, default=0)
        image_to_video = MOTION_SCORE_KEY in shapes
        if image_to_video and patch_in % 2:
            raise ValueError(f"a Step-Video-TI2V checkpoint's patch embedding reads latents + condition (an even channel "
                             f"count), but 'pos_embed.proj.weight' has {patch_in} input channels")
        return cls(
            num_attention_heads=inner // head_dim,
            attention_head_dim=head_dim,
            in_channels=patch_in // 2 if image_to_video else patch_in,
            out_channels=out_ch,
            num_layers=layers,
            patch_size=p,
            caption_channels=(caption, clip),
            use_additional_conditions=image_to_video,
            **overrides,
        )


HEAD_DIM_KEY = "transformer_blocks.0.attn1.q_norm.weight"  # the tensor the head size is read from


def check_head_dim(shapes: dict[str, tuple[int, ...]], inner: int) -> None:
    """A ``ValueError`` naming ``HEAD_DIM_KEY`` when its shape disagrees with every other QK-norm of the file (or
    does not divide the model width): a damaged tensor there would otherwise show as dozens of others differing."""
    head_dim = shapes[HEAD_DIM_KEY][0] if len(shapes[HEAD_DIM_KEY]) == 1 else None
    others = Counter(shape for key, shape in shapes.items()
                     if key != HEAD_DIM_KEY and re.fullmatch(r"transformer_blocks\.\d+\.attn[12]\.[qk]_norm\.weight", key))
    if others and (head_dim,) not in others:
        (common, count), = others.most_common(1)
        raise ValueError(f"{HEAD_DIM_KEY!r} has shape {shapes[HEAD_DIM_KEY]} but the {count} other QK-norm weights "
                         f"have {common}: the head size is read from this tensor, so it is damaged (or comes from "
                         "another model)")
    if head_dim is None or head_dim <= 0 or inner % head_dim:
        raise ValueError(f"{HEAD_DIM_KEY!r} has shape {shapes[HEAD_DIM_KEY]}, which gives no head size that divides "
                         f"the model width {inner}: the tensor is damaged")


class Rope3D:
    """Rotary tables for a (frames, rows, columns) token grid, built once per forward and shared by all blocks.

    Each axis rotates its own slice of a head with the rotate-half (NeoX) form. Applying it is one fused
    expression, ``x * cos + x[..., perm] * sin_signed``, where ``perm``/``sin_signed`` encode rotate-half for
    all three slices at once.
    """

    def __init__(self, grid: tuple[int, int, int], split: tuple[int, int, int], dtype, device, reference_rounding: bool):
        cos_parts, sin_parts, perm, sign = [], [], [], []
        axes = torch.meshgrid(*[torch.arange(n, device=device) for n in grid], indexing="ij")
        offset = 0
        for chunk, pos in zip(split, axes):
            half = chunk // 2
            inv_freq = 1.0 / (ROPE_THETA ** (torch.arange(0, chunk, 2, device=device).float() / chunk))
            angles = pos.reshape(-1, 1).float() * inv_freq
            if reference_rounding:
                angles = angles.to(dtype)  # the reference takes cos/sin of angles already rounded to the activation dtype
            angles = torch.cat([angles, angles], dim=-1)
            cos_parts.append(angles.cos().to(dtype))
            sin_parts.append(angles.sin().to(dtype))
            perm += [offset + half + i for i in range(half)] + [offset + i for i in range(half)]
            sign += [-1.0] * half + [1.0] * half
            offset += chunk
        self.cos = torch.cat(cos_parts, dim=-1)[None, :, None, :]
        sign_t = torch.tensor(sign, device=device, dtype=dtype)
        self.sin_signed = (torch.cat(sin_parts, dim=-1) * sign_t)[None, :, None, :]
        self.perm = torch.tensor(perm, device=device)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x: [b, tokens, heads, head_dim]"""
        return x * self.cos + x[..., self.perm] * self.sin_signed


class SelfAttention(nn.Module):
    def __init__(self, dim: int, head_dim: int, operations, device=None, dtype=None):
        super().__init__()
        self.heads, self.head_dim = dim // head_dim, head_dim
        # Fused projection, rows laid out per head as [q_h | k_h | v_h] (384 rows per head at head_dim 128).
        self.wqkv = operations.Linear(dim, 3 * dim, bias=False, device=device, dtype=dtype)
        self.wo = operations.Linear(dim, dim, bias=False, device=device, dtype=dtype)
        self.q_norm = RMSNorm(head_dim, device=device, dtype=dtype)
        self.k_norm = RMSNorm(head_dim, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor, rope: Rope3D, attention: AttentionFn, transformer_options: dict) -> torch.Tensor:
        b, n, _ = x.shape
        q, k, v = self.wqkv(x).view(b, n, self.heads, 3 * self.head_dim).split(self.head_dim, dim=-1)
        q, k = rope(self.q_norm(q)), rope(self.k_norm(k))
        out = attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), None, transformer_options)
        return self.wo(out.transpose(1, 2).reshape(b, n, -1))


class CrossAttention(nn.Module):
    def __init__(self, dim: int, head_dim: int, operations, device=None, dtype=None):
        super().__init__()
        self.heads, self.head_dim = dim // head_dim, head_dim
        self.wq = operations.Linear(dim, dim, bias=False, device=device, dtype=dtype)
        # Fused projection, rows laid out per head as [k_h | v_h].
        self.wkv = operations.Linear(dim, 2 * dim, bias=False, device=device, dtype=dtype)
        self.wo = operations.Linear(dim, dim, bias=False, device=device, dtype=dtype)
        self.q_norm = RMSNorm(head_dim, device=device, dtype=dtype)
        self.k_norm = RMSNorm(head_dim, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor, text: torch.Tensor, mask: torch.Tensor, attention: AttentionFn,
                transformer_options: dict) -> torch.Tensor:
        b, n, _ = x.shape
        q = self.q_norm(self.wq(x).view(b, n, self.heads, self.head_dim))
        k, v = self.wkv(text).view(b, text.shape[1], self.heads, 2 * self.head_dim).split(self.head_dim, dim=-1)
        k = self.k_norm(k)
        out = attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), mask, transformer_options)
        return self.wo(out.transpose(1, 2).reshape(b, n, -1))


class GELUProjection(nn.Module):
    def __init__(self, dim_in: int, dim_out: int, operations, device=None, dtype=None):
        super().__init__()
        self.proj = operations.Linear(dim_in, dim_out, bias=False, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.proj(x), approximate="tanh")


class FeedForward(nn.Module):
    def __init__(self, dim: int, operations, device=None, dtype=None):
        super().__init__()
        # Index 1 is a parameter-free slot in the official module list; keeping it keeps the key ``ff.net.2``.
        self.net = nn.ModuleList(
            [
                GELUProjection(dim, 4 * dim, operations, device, dtype),
                nn.Identity(),
                operations.Linear(4 * dim, dim, bias=False, device=device, dtype=dtype),
            ]
        )

    def forward(self, x: torch.Tensor, chunk_size: int = 0) -> torch.Tensor:
        if chunk_size <= 0 or x.shape[1] <= chunk_size:
            return self.net[2](self.net[0](x))
        return torch.cat([self.net[2](self.net[0](part)) for part in x.split(chunk_size, dim=1)], dim=1)


class TransformerBlock(nn.Module):
    def __init__(self, dim: int, head_dim: int, operations, device=None, dtype=None):
        super().__init__()
        self.norm1 = operations.LayerNorm(dim, eps=BLOCK_NORM_EPS, device=device, dtype=dtype)
        self.attn1 = SelfAttention(dim, head_dim, operations, device, dtype)
        self.norm2 = operations.LayerNorm(dim, eps=BLOCK_NORM_EPS, device=device, dtype=dtype)
        self.attn2 = CrossAttention(dim, head_dim, operations, device, dtype)
        self.ff = FeedForward(dim, operations, device, dtype)
        self.scale_shift_table = nn.Parameter(torch.randn(6, dim, device=device, dtype=dtype) / dim**0.5)

    def forward(self, x, modulation, text, text_mask, rope, attention, ff_chunk_size=0, self_attention=None,
                transformer_options=None):
        """``transformer_options``: the host's per-call options (a plain dict), handed to every attention call."""
        options = {} if transformer_options is None else transformer_options
        table = self.scale_shift_table.to(device=x.device, dtype=x.dtype)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = (table[None] + modulation).chunk(6, dim=1)
        h = self.norm1(x) * (1 + scale_msa) + shift_msa
        x = gate_msa * self.attn1(h, rope, self_attention or attention, options) + x
        # Cross-attention in Step-Video has no pre-norm, no modulation and no gate.
        x = self.attn2(x, text, text_mask, attention, options) + x
        h = self.norm2(x) * (1 + scale_mlp) + shift_mlp
        return gate_mlp * self.ff(h, ff_chunk_size) + x


class PatchEmbed(nn.Module):
    def __init__(self, patch: int, in_channels: int, dim: int, operations, device=None, dtype=None):
        super().__init__()
        self.proj = operations.Conv2d(in_channels, dim, kernel_size=patch, stride=patch, bias=True, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class TimestepEmbedder(nn.Module):
    def __init__(self, dim: int, operations, device=None, dtype=None):
        super().__init__()
        self.linear_1 = operations.Linear(TIMESTEP_CHANNELS, dim, device=device, dtype=dtype)
        self.linear_2 = operations.Linear(dim, dim, device=device, dtype=dtype)

    def forward(self, sinusoid: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(sinusoid)))


class TimestepEmbedding(nn.Module):
    def __init__(self, dim: int, operations, device=None, dtype=None, motion_score: bool = False):
        super().__init__()
        self.timestep_embedder = TimestepEmbedder(dim, operations, device, dtype)
        # TI2V: the motion score goes through its own MLP of the same form (sinusoid of the raw score, no x1000).
        self.motion_score_embedder = TimestepEmbedder(dim, operations, device, dtype) if motion_score else None


class AdaLayerNormSingle(nn.Module):
    def __init__(self, dim: int, operations, device=None, dtype=None, motion_score: bool = False):
        super().__init__()
        self.emb = TimestepEmbedding(dim, operations, device, dtype, motion_score)
        self.linear = operations.Linear(dim, 6 * dim, device=device, dtype=dtype)


class CaptionProjection(nn.Module):
    def __init__(self, in_features: int, dim: int, operations, device=None, dtype=None):
        super().__init__()
        self.linear_1 = operations.Linear(in_features, dim, device=device, dtype=dtype)
        self.linear_2 = operations.Linear(dim, dim, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.gelu(self.linear_1(x), approximate="tanh"))


def timestep_sinusoid(t_scaled: torch.Tensor, channels: int = TIMESTEP_CHANNELS) -> torch.Tensor:
    """[cos | sin] of t * 10000^(-k/half): cos first, no frequency shift (the PixArt-alpha convention)."""
    half = channels // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t_scaled.device, dtype=torch.float32) / half)
    angles = t_scaled.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)


@dataclass
class BlockContext:
    """What every transformer block reads besides the video tokens; built once per forward by ``prepare``."""

    modulation: torch.Tensor  # [b, 6, D]: AdaLN-single shift/scale/gate for attention and feed-forward
    text: torch.Tensor  # [b, keys, D]: projected CLIP + Step-LLM states
    text_mask: torch.Tensor  # [b, 1, 1, keys], True = attend
    rope: Rope3D
    attention: AttentionFn
    ff_chunk_size: int
    # Self-attention when it differs from ``attention`` (sequence parallel: the tokens are sharded over ranks).
    self_attention: AttentionFn | None = None


class StepVideoDiT(nn.Module):
    def __init__(self, config: DiTConfig | None = None, operations=None, device=None, dtype=None):
        super().__init__()
        self.config = config = config or DiTConfig()
        ops = operations or default_ops
        dim = config.inner_dim
        llm_channels, clip_channels = config.caption_channels
        self.pos_embed = PatchEmbed(config.patch_size, config.patch_in_channels, dim, ops, device, dtype)
        self.transformer_blocks = nn.ModuleList(
            [TransformerBlock(dim, config.attention_head_dim, ops, device, dtype) for _ in range(config.num_layers)]
        )
        self.norm_out = ops.LayerNorm(dim, eps=config.norm_eps, elementwise_affine=False, device=device, dtype=dtype)
        self.scale_shift_table = nn.Parameter(torch.randn(2, dim, device=device, dtype=dtype) / dim**0.5)
        self.proj_out = ops.Linear(dim, config.patch_size**2 * config.out_channels, device=device, dtype=dtype)
        self.adaln_single = AdaLayerNormSingle(dim, ops, device, dtype, motion_score=config.use_additional_conditions)
        self.clip_projection = ops.Linear(clip_channels, dim, device=device, dtype=dtype)
        self.caption_norm = ops.LayerNorm(llm_channels, eps=config.norm_eps, elementwise_affine=False, device=device, dtype=dtype)
        self.caption_projection = CaptionProjection(llm_channels, dim, ops, device, dtype)
        self.attention: AttentionFn = sdpa_attention
        self.compute_dtype: torch.dtype = dtype or torch.float32

    def set_attention(self, fn: AttentionFn) -> None:
        self.attention = fn

    def embed_timestep(self, timestep: torch.Tensor, dtype: torch.dtype,
                       motion_score: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (per-block modulation [b, 6, D], embedded timestep [b, D]) for t in [0, 1), 0 = noise.

        TI2V adds the embedded ``motion_score`` [b] to the embedded timestep, so it reaches every block's
        modulation and the final norm."""
        if self.config.reference_rounding:
            t_scaled = timestep.to(dtype) * TIMESTEP_SCALE  # the pipeline casts t to the model dtype, x1000 happens in it
        else:
            t_scaled = timestep.float() * TIMESTEP_SCALE
        embedded = self.adaln_single.emb.timestep_embedder(timestep_sinusoid(t_scaled).to(dtype))
        if motion_score is not None:
            # The reference builds the score tensor in the activation dtype (bf16 in practice) before the sinusoid.
            score = motion_score.to(dtype) if self.config.reference_rounding else motion_score.float()
            embedded = embedded + self.adaln_single.emb.motion_score_embedder(timestep_sinusoid(score).to(dtype))
        modulation = self.adaln_single.linear(F.silu(embedded))
        return modulation.view(-1, 6, self.config.inner_dim), embedded

    def embed_text(self, llm_states, mask, clip_states, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Project both encoders' states, CLIP first, and cut to the longest sample's key count.

        As in the reference, a sample's key count is the sum of its 397-long mask and its valid keys are taken
        to be that many leading positions.
        """
        text = self.caption_projection(self.caption_norm(llm_states.to(dtype)))
        text = torch.cat([self.clip_projection(clip_states.to(dtype)), text], dim=1)
        lengths = (mask.to(dtype) if self.config.reference_rounding else mask.float()).sum(dim=1).long()
        max_len = int(lengths.max())
        key_mask = torch.arange(max_len, device=text.device)[None, :] < lengths[:, None]
        return text[:, :max_len], key_mask[:, None, None, :]

    def prepare(
        self,
        hidden_states: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        encoder_attention_mask: torch.Tensor,
        encoder_hidden_states_2: torch.Tensor,
        condition_hidden_states: torch.Tensor | None = None,
        motion_score: torch.Tensor | float | None = None,
    ) -> tuple[torch.Tensor, BlockContext, torch.Tensor, tuple[int, int, int]]:
        """Patchify and embed: (video tokens [b, N, D], what every block reads, embedded timestep, token grid).

        ``forward`` is ``prepare`` -> ``run_blocks`` -> ``finish`` -> ``unpatchify``; features that change one stage
        (sequence-parallel sharding of the tokens, extra conditions, per-block hooks) change that stage only.
        """
        cfg = self.config
        dtype = self.compute_dtype
        b, frames, _, height, width = hidden_states.shape
        p = cfg.patch_size
        if height % p or width % p:
            raise ValueError(f"latent height/width ({height}x{width}) must be multiples of the patch size {p}")
        grid = (frames, height // p, width // p)
        timestep = timestep.reshape(-1).to(hidden_states.device)
        if timestep.numel() == 1 and b > 1:
            timestep = timestep.expand(b)

        patches = hidden_states.to(dtype)
        condition, score = self.check_image_condition(hidden_states, condition_hidden_states, motion_score)
        if condition is not None:
            patches = torch.cat([patches, condition.to(device=patches.device, dtype=dtype)], dim=2)
        x = self.pos_embed(patches.flatten(0, 1))  # [(b F), h*w, D]
        x = x.reshape(b, frames * grid[1] * grid[2], cfg.inner_dim)
        modulation, embedded = self.embed_timestep(timestep, dtype, score)
        text, text_mask = self.embed_text(encoder_hidden_states, encoder_attention_mask, encoder_hidden_states_2, dtype)
        rope = Rope3D(grid, cfg.rope_split, dtype, x.device, cfg.reference_rounding)
        context = BlockContext(modulation, text, text_mask, rope, self.attention, cfg.ff_chunk_size)
        return x, context, embedded, grid

    def check_image_condition(self, hidden_states: torch.Tensor, condition: torch.Tensor | None,
                              motion_score: torch.Tensor | float | None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """TI2V inputs checked against the model kind: (condition [b, F, C, h, w], motion score [b]), both None for
        T2V. A condition of batch 1 serves the whole batch."""
        given = [name for name, v in (("condition_hidden_states", condition), ("motion_score", motion_score))
                 if v is not None]
        if not self.config.use_additional_conditions:
            if given:
                raise ValueError(f"this is a Step-Video-T2V DiT (text to video); it takes no {' or '.join(given)}. "
                                 "Load Step-Video-TI2V weights for image to video, or leave the image condition out.")
            return None, None
        missing = [name for name in ("condition_hidden_states", "motion_score") if name not in given]
        if missing:
            raise ValueError(f"this is a Step-Video-TI2V DiT (image to video); it needs {' and '.join(missing)}: the "
                             "start image's latents (stepvideo_core.image_condition) and a motion score (official "
                             "default 5). Use Step-Video-T2V weights for text to video.")
        b = hidden_states.shape[0]
        if condition.ndim != 5 or condition.shape[1:] != hidden_states.shape[1:] or condition.shape[0] not in (1, b):
            raise ValueError(f"condition_hidden_states {tuple(condition.shape)} must have the latents' shape "
                             f"{tuple(hidden_states.shape)} (batch 1 or {b}); build it for the same frames and size")
        score = torch.as_tensor(motion_score, dtype=torch.float32, device=hidden_states.device).reshape(-1)
        if score.numel() not in (1, b):
            raise ValueError(f"motion_score has {score.numel()} values for a batch of {b}")
        return condition.expand(b, *condition.shape[1:]), score.expand(b)

    def run_blocks(self, x: torch.Tensor, context: BlockContext, transformer_options: dict | None = None) -> torch.Tensor:
        """The transformer blocks in order; ``transformer_options`` reaches every block and attention call.

        Per-block replacement: a callable at ``transformer_options["patches_replace"]["dit"][("double_block", i)]``
        runs instead of block ``i`` (the key core ComfyUI uses for Wan's blocks, which have the same
        self-attention + text cross-attention + feed-forward layout). It is called as ``patch(args, extra)`` with
        ``args = {"img": tokens [b, N, D], "txt": text [b, keys, D], "txt_mask": [b, 1, 1, keys], "vec": modulation
        [b, 6, D], "pe": Rope3D, "block_index": i, "transformer_options": dict}`` and ``extra = {"original_block":
        fn}``, where ``fn(args)`` runs the block on ``args`` and returns ``{"img": tokens}``; the patch returns a
        dict whose ``"img"`` is the block's output.
        """
        options = {} if transformer_options is None else transformer_options
        replaced = options.get("patches_replace", {}).get("dit", {})
        for i, block in enumerate(self.transformer_blocks):
            patch = replaced.get(("double_block", i))
            if patch is None:
                x = block(x, context.modulation, context.text, context.text_mask, context.rope, context.attention,
                          context.ff_chunk_size, context.self_attention, options)
                continue

            def original_block(args, block=block):
                return {"img": block(args["img"], args["vec"], args["txt"], args["txt_mask"], args["pe"],
                                     context.attention, context.ff_chunk_size, context.self_attention,
                                     args["transformer_options"])}

            args = {"img": x, "txt": context.text, "txt_mask": context.text_mask, "vec": context.modulation,
                    "pe": context.rope, "block_index": i, "transformer_options": options}
            x = patch(args, {"original_block": original_block})["img"]
        return x

    def finish(self, x: torch.Tensor, embedded: torch.Tensor) -> torch.Tensor:
        """The final modulated norm and projection, token by token: [b, N, D] -> [b, N, p*p*C_out]."""
        table = self.scale_shift_table.to(device=x.device, dtype=x.dtype)
        shift, scale = (table[None] + embedded[:, None]).chunk(2, dim=1)
        return self.proj_out(self.norm_out(x) * (1 + scale) + shift)

    def unpatchify(self, x: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
        """[b, N, p*p*C_out] tokens back to latents [b, F, C_out, h, w]."""
        frames, gh, gw = grid
        p, c = self.config.patch_size, self.config.out_channels
        x = x.reshape(x.shape[0], frames, gh, gw, p, p, c)
        return x.permute(0, 1, 6, 2, 4, 3, 5).reshape(x.shape[0], frames, c, gh * p, gw * p)

    def forward(
        self,
        hidden_states: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        encoder_attention_mask: torch.Tensor,
        encoder_hidden_states_2: torch.Tensor,
        condition_hidden_states: torch.Tensor | None = None,
        motion_score: torch.Tensor | float | None = None,
        transformer_options: dict | None = None,
    ) -> torch.Tensor:
        """Velocity for latents ``[b, F, C, h, w]`` at reference timesteps ``[b]`` (0 = noise, 1 = data).

        Step-Video-TI2V also takes ``condition_hidden_states`` (latents like ``hidden_states``: the start image's
        latent frame, then zeros) and ``motion_score`` (a float or ``[b]``). ``transformer_options`` is a host's
        per-call options dict (ComfyUI's); see ``run_blocks`` for what is read."""
        x, context, embedded, grid = self.prepare(hidden_states, timestep, encoder_hidden_states,
                                                  encoder_attention_mask, encoder_hidden_states_2,
                                                  condition_hidden_states, motion_score)
        x = self.run_blocks(x, context, transformer_options)
        return self.unpatchify(self.finish(x, embedded), grid)


# config.json fields that the tensor shapes also determine; the two must agree.
CONFIG_JSON_FIELDS = ("num_layers", "num_attention_heads", "attention_head_dim", "in_channels", "out_channels",
                      "patch_size", "caption_channels", "use_additional_conditions")


def check_config_json(ckpt: Checkpoint, config: DiTConfig) -> None:
    """A ``CheckpointError`` when the folder's ``config.json`` disagrees with the architecture read from the
    tensors: a shard that lost its last blocks would otherwise load as a shallower model without a word."""
    values = read_config_json(ckpt)
    if values is None:
        return
    diffs = []
    for name in CONFIG_JSON_FIELDS:
        if name in values:
            said = tuple(values[name]) if isinstance(values[name], list) else values[name]
            if said != getattr(config, name):
                diffs.append(f"{name} {said!r} in config.json but {getattr(config, name)!r} in the tensors")
    if diffs:
        said_layers = values.get("num_layers")
        lost = (f" Blocks transformer_blocks.{config.num_layers} to {said_layers - 1} are missing from the weights: "
                "a shard is missing or was cut short." if isinstance(said_layers, int)
                and said_layers > config.num_layers else "")
        raise CheckpointError(f"{ckpt.path}: config.json and the weights disagree: {'; '.join(diffs)}.{lost} Download "
                              "the folder again, or remove a config.json that belongs to another model.")


DIT_NAME = "Step-Video DiT"
DIT_ANCHORS = ("pos_embed.proj.weight",)


def resolve_compute_dtype(weight_dtype: torch.dtype, compute_dtype: torch.dtype | None) -> torch.dtype:
    """The dtype the DiT computes in: bf16 for fp8-stored weights, else the weights' own, unless given."""
    if compute_dtype is None:
        compute_dtype = torch.bfloat16 if weight_dtype in FP8_DTYPES else weight_dtype
    if compute_dtype in FP8_DTYPES:
        raise ValueError("fp8 is a storage dtype; compute in bfloat16 or float16")
    return compute_dtype


def _builder(operations, config_overrides):
    def build(ckpt: Checkpoint, shapes: dict[str, tuple[int, ...]]) -> StepVideoDiT:
        config = DiTConfig.from_shapes(shapes, **config_overrides)
        check_config_json(ckpt, config)
        return StepVideoDiT(config, operations=operations)

    return build


def open_dit_checkpoint(path: str | Path, operations=None, **config_overrides):
    """(The DiT built on the meta device from the checkpoint's shapes, the checkpoint, its key map), for loaders
    that fill it their own way (``distributed.load_dit_sharded`` keeps each rank's shard of the block weights)."""
    return open_checkpoint_model(path, model_name=DIT_NAME, anchors=DIT_ANCHORS, build=_builder(operations, config_overrides))


def load_dit(
    path: str | Path,
    weight_dtype: torch.dtype = torch.bfloat16,
    compute_dtype: torch.dtype | None = None,
    device: torch.device | str = "cpu",
    operations=None,
    **config_overrides,
) -> StepVideoDiT:
    """Load the official ``transformer/`` folder (shards + index) or a single ``.safetensors`` file.

    The architecture is read from the tensor shapes, so reduced configs load the same way. The model is built
    on the meta device and filled tensor by tensor. fp8 ``weight_dtype`` stores Linear/Conv weights in fp8
    and computes in ``compute_dtype`` (bf16 by default), upcasting one layer at a time.
    """
    compute_dtype = resolve_compute_dtype(weight_dtype, compute_dtype)
    model = load_checkpoint_model(path, model_name=DIT_NAME, anchors=DIT_ANCHORS, weight_dtype=weight_dtype,
                                  compute_dtype=compute_dtype, device=device, build=_builder(operations, config_overrides))
    model.compute_dtype = compute_dtype
    return model
