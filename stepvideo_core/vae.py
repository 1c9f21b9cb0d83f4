"""The Step-Video-T2V Video-VAE (version 2: 64 latent channels, 16x16 spatial, 17 frames -> 3 latents).

Module and parameter names are those of ``vae/vae_v2.safetensors``, so the official state dict loads as stored
with ``load_state_dict(strict=True)`` (the decoder's last conv is stored unwrapped, ``decoder.conv_out.weight``,
and is a plain Conv3d here). Layers come from an injectable ``operations`` namespace (see ``ops.py``).

Tensors inside the networks use the ``[b, c, t, h, w]`` layout; the public ``encode``/``decode`` use the
pipeline's ``[b, t, c, h, w]``. Every temporal convolution is causal with *zero* padding (two zero frames in
front), GroupNorm statistics are taken per frame (``VAEConfig.per_frame_norm``), and the video is processed in
independent chunks of 17 frames / 3 latents, with the reference's sequential 0.6/0.4 blend at chunk borders.

Deliberate differences from the reference (each also noted where it happens): spatial tiling in ``decode``
(the reference has none); no multi-process chunk distribution (the reference's ``world_size > 1`` path);
``torch.no_grad`` instead of ``torch.inference_mode`` (outputs stay usable in autograd-enabled code); no v1
(16-channel) VAE, which the loader refuses; no time-splitting of convolutions over 2^30 elements (the
reference's workaround for a CUDA indexing limit; PyTorch handles those sizes itself). Memory layout and
evaluation order differ (channels-last activations, frame groups), which changes results only by rounding.

Frame and size rules (17 frames -> 3 latents, trailing 1 or 9 frames, sizes in multiples of 16) live in
``video_shape.py``; ``encode`` raises its ``ValueError`` naming the nearest valid values. Any latent count and
latent size decodes.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from einops import rearrange, reduce
from torch import nn

from .loading import CheckpointError, load_checkpoint_model
from .ops import FP8_DTYPES, default_ops
from .scheduler import model_nan_message
from .video_shape import FRAMES_PER_CHUNK, LATENTS_PER_CHUNK, SPATIAL_FACTOR, encoded_grid, video_frames

ProgressCallback = Callable[[int, int], None]


# ----------------------------------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------------------------------


@dataclass
class VAEConfig:
    """Architecture of the Video-VAE; defaults are the official version 2 (``vae_v2.safetensors``)."""

    in_channels: int = 3
    out_channels: int = 3
    z_channels: int = 64
    encoder_channels: int = 32
    encoder_channel_mult: tuple[int, ...] = (4, 8, 16, 16)
    encoder_num_res_blocks: int = 2
    encoder_temporal_levels: tuple[int, ...] = (1, 2)  # levels whose downsample also halves time
    decoder_channels: int = 128
    decoder_channel_mult: tuple[int, ...] = (1, 2, 4, 4)
    decoder_num_res_blocks: int = 3
    decoder_temporal_levels: tuple[int, ...] = (2, 3)  # levels whose upsample also doubles time
    norm_groups: int = 32
    norm_eps: float = 1e-5
    # v2 normalises each frame on its own (the reference switches this on with a module-global flag when it
    # builds a version-2 model); False gives clip-wide statistics as in v1.
    per_frame_norm: bool = True
    blend_keep: float = 0.6  # chunk-border blend: a border frame keeps 0.6 of itself and takes 0.4 of its neighbour

    @property
    def patch_channels(self) -> int:
        """Channels between the 2x2x2 space-to-channel stage and the latent (2048 for z = 64)."""
        return 4 * self.z_channels * 8

    @property
    def decoder_dropped_frames(self) -> int:
        """Leading frames the decoder discards: 2^(temporal upsamplings) - 1 = 3."""
        return 2 ** len(self.decoder_temporal_levels) - 1

    @classmethod
    def from_shapes(cls, shapes: dict[str, tuple[int, ...]], **overrides) -> VAEConfig:
        """Infer the architecture from checkpoint tensor shapes (official key names)."""
        enc_ch = shapes["encoder.conv_in.conv.weight"][0]
        enc_levels = 1 + max(int(k.split(".")[2]) for k in shapes if k.startswith("encoder.down."))
        enc_blocks = 1 + max(int(k.split(".")[4]) for k in shapes if k.startswith("encoder.down.0.block."))
        enc_mult = tuple(shapes[f"encoder.down.{i}.block.0.conv1.conv.weight"][0] // enc_ch for i in range(enc_levels))
        enc_temporal = tuple(i for i in range(enc_levels) if f"encoder.down.{i}.downsample.conv.conv.weight" in shapes)
        dec_levels = 1 + max(int(k.split(".")[2]) for k in shapes if k.startswith("decoder.up."))
        dec_blocks = 1 + max(int(k.split(".")[4]) for k in shapes if k.startswith("decoder.up.0.block."))
        dec_widths = [shapes[f"decoder.up.{i}.block.0.conv1.conv.weight"][0] for i in range(dec_levels)]
        dec_ch = dec_widths[0]  # only channel products matter; express them relative to level 0
        dec_temporal = tuple(i for i in range(dec_levels) if f"decoder.up.{i}.upsample.conv3d.conv1.conv.weight" in shapes)
        fields = dict(
            in_channels=shapes["encoder.conv_in.conv.weight"][1],
            out_channels=shapes["decoder.conv_out.weight"][0],
            z_channels=shapes["decoder.conv_in.conv.weight"][1],
            encoder_channels=enc_ch,
            encoder_channel_mult=enc_mult,
            encoder_num_res_blocks=enc_blocks,
            encoder_temporal_levels=enc_temporal,
            decoder_channels=dec_ch,
            decoder_channel_mult=tuple(w // dec_ch for w in dec_widths),
            decoder_num_res_blocks=dec_blocks,
            decoder_temporal_levels=dec_temporal,
        )
        fields.update(overrides)
        return cls(**fields)


# ----------------------------------------------------------------------------------------------------------
# Building blocks. All work on [b, c, t, h, w].
# ----------------------------------------------------------------------------------------------------------


# Activations are kept in channels-last order ([b, t, h, w, c] in memory, still indexed [b, c, t, h, w]):
# oneDNN convolves that layout without reordering, and a group of frames is then a free [n, c, h, w] view
# for the per-frame norms.
CL = torch.channels_last_3d


def empty_cl(shape, like: torch.Tensor) -> torch.Tensor:
    return torch.empty(shape, dtype=like.dtype, device=like.device, memory_format=CL)


def pad_front(x: torch.Tensor, frames: int) -> torch.Tensor:
    """``frames`` zero frames in front of ``x`` (a copy in the same memory layout)."""
    b, c, t, h, w = x.shape
    layout = CL if x.is_contiguous(memory_format=CL) and not x.is_contiguous() else torch.contiguous_format
    out = torch.empty((b, c, t + frames, h, w), dtype=x.dtype, device=x.device, memory_format=layout)
    out[:, :, :frames].zero_()
    out[:, :, frames:].copy_(x)
    return out


# Per-frame work (GroupNorm, 2D up/downsampling) runs on groups of frames of at most this many input elements:
# small activations go in one batched call, large ones a frame at a time, so the transposed copy that a
# [b*t, c, h, w] view needs stays small next to the activation itself.
FRAME_GROUP_ELEMENTS = 1 << 22


def map_frames(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, out: torch.Tensor, offset: int = 0) -> torch.Tensor:
    """Apply a 2D function ``[n, c, h, w] -> [n, c', h', w']`` to every frame of ``x`` ``[b, c, t, h, w]``,
    writing frame ``i`` into ``out[:, :, offset + i]``."""
    b, c, t = x.shape[:3]
    step = max(1, FRAME_GROUP_ELEMENTS // max(1, x[:, :, 0].numel()))
    for s in range(0, t, step):
        e = min(s + step, t)
        frames = x[:, :, s:e].transpose(1, 2).reshape(b * (e - s), c, *x.shape[3:])
        y = fn(frames)
        del frames
        out[:, :, offset + s:offset + e].copy_(y.view(b, e - s, *y.shape[1:]).transpose(1, 2))
    return out


def norm_frames(x: torch.Tensor, norm: nn.Module, per_frame: bool, silu: bool, front_pad: int = 0,
                out: torch.Tensor | None = None) -> torch.Tensor:
    """GroupNorm (per frame or over the clip), optional SiLU, written after ``front_pad`` zero frames.

    The causal zero frames of the next convolution are allocated here, in the output buffer, which saves a
    padded copy. ``out`` may be ``x`` itself when ``front_pad`` is 0 (normalise in place).
    """
    b, c, t, h, w = x.shape
    training = torch.is_grad_enabled()
    if out is None or (training and out is x):  # autograd needs ``x`` intact for the backward pass
        out = empty_cl((b, c, t + front_pad, h, w), x)
    if front_pad:
        out[:, :, :front_pad].zero_()

    def fn(frames: torch.Tensor) -> torch.Tensor:
        y = norm(frames)
        return F.silu(y, inplace=not training) if silu else y

    if per_frame:
        return map_frames(fn, x, out, offset=front_pad)
    out[:, :, front_pad:].copy_(fn(x))
    return out


class CausalConv3d(nn.Module):
    """Conv3d that sees only the current and earlier frames: zero frames in front, same-size spatial padding.

    ``forward(x, padded=True)`` takes an input that already carries its leading zero frames (as produced by
    ``norm_frames(..., front_pad=...)``), which saves a padded copy of the activation.
    """

    def __init__(self, cin: int, cout: int, kernel: int, ops, stride: int = 1, device=None, dtype=None):
        super().__init__()
        self.time_pad = kernel - 1  # (k - 1) + max(1 - stride, 0): 2 for k = 3 at stride 1 and 2, 0 for k = 1
        self.conv = ops.Conv3d(cin, cout, kernel, stride=stride, padding=(0, kernel // 2, kernel // 2),
                               device=device, dtype=dtype)

    def forward(self, x: torch.Tensor, padded: bool = False) -> torch.Tensor:
        if self.time_pad and not padded:
            x = pad_front(x, self.time_pad)
        return self.conv(x)


class ConvWrapper(nn.Module):
    """A ``.conv`` level around a causal conv, present in the checkpoint names of the (un)patchify stages."""

    def __init__(self, cin: int, cout: int, ops, device=None, dtype=None):
        super().__init__()
        self.conv = CausalConv3d(cin, cout, 3, ops, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class ResnetBlock(nn.Module):
    """GN-SiLU-conv twice, plus the input (through a 1x1x1 conv when the width changes). No time embedding."""

    def __init__(self, cin: int, cout: int, cfg: VAEConfig, ops, device=None, dtype=None):
        super().__init__()
        self.per_frame = cfg.per_frame_norm
        self.norm1 = ops.GroupNorm(cfg.norm_groups, cin, eps=cfg.norm_eps, device=device, dtype=dtype)
        self.conv1 = CausalConv3d(cin, cout, 3, ops, device=device, dtype=dtype)
        self.norm2 = ops.GroupNorm(cfg.norm_groups, cout, eps=cfg.norm_eps, device=device, dtype=dtype)
        self.conv2 = CausalConv3d(cout, cout, 3, ops, device=device, dtype=dtype)
        self.nin_shortcut = CausalConv3d(cin, cout, 1, ops, device=device, dtype=dtype) if cin != cout else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The causal zero frames go in *after* GN + SiLU (the norm never sees them).
        h = self.conv1(norm_frames(x, self.norm1, self.per_frame, silu=True, front_pad=2), padded=True)
        n = norm_frames(h, self.norm2, self.per_frame, silu=True, front_pad=2)
        del h  # free before the next conv allocates its output
        h = self.conv2(n, padded=True)
        del n
        return h.add_(x if self.nin_shortcut is None else self.nin_shortcut(x))


class CausalAttention(nn.Module):
    """Single-head self-attention over every (t, y, x) position in raster order, with a causal mask."""

    def __init__(self, channels: int, cfg: VAEConfig, ops, device=None, dtype=None):
        super().__init__()
        self.per_frame = cfg.per_frame_norm
        self.norm = ops.GroupNorm(cfg.norm_groups, channels, eps=cfg.norm_eps, device=device, dtype=dtype)
        self.q = CausalConv3d(channels, channels, 1, ops, device=device, dtype=dtype)
        self.k = CausalConv3d(channels, channels, 1, ops, device=device, dtype=dtype)
        self.v = CausalConv3d(channels, channels, 1, ops, device=device, dtype=dtype)
        self.proj_out = CausalConv3d(channels, channels, 1, ops, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, t, h, w = x.shape
        hn = norm_frames(x, self.norm, self.per_frame, silu=False)

        # [b, c, t, h, w] -> [b, 1 head, t*h*w, c]: a view for channels-last input.
        q, k, v = (conv(hn).flatten(2).transpose(1, 2).unsqueeze(1) for conv in (self.q, self.k, self.v))
        del hn
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        del q, k, v
        a = a.reshape(b, t, h, w, c).permute(0, 4, 1, 2, 3)  # back to [b, c, t, h, w], channels-last
        return self.proj_out(a).add_(x)


class Downsample2D(nn.Module):
    """Per-frame 3x3 stride-2 conv after one zero row/column at the bottom/right (no padding elsewhere)."""

    def __init__(self, channels: int, ops, device=None, dtype=None):
        super().__init__()
        self.conv = ops.Conv2d(channels, channels, 3, stride=2, padding=0, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, t, h, w = x.shape
        out = empty_cl((b, self.conv.out_channels, t, (h - 2) // 2 + 1, (w - 2) // 2 + 1), x)
        return map_frames(lambda f: self.conv(F.pad(f, (0, 1, 0, 1))), x, out)


class Downsample3D(nn.Module):
    """Causal 3x3x3 conv with stride 2 in time and space: t -> (t - 1) // 2 + 1 frames."""

    def __init__(self, channels: int, ops, device=None, dtype=None):
        super().__init__()
        self.conv = CausalConv3d(channels, channels, 3, ops, stride=2, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample2D(nn.Module):
    """Per-frame nearest 2x upsampling followed by a 3x3 conv."""

    def __init__(self, channels: int, ops, device=None, dtype=None):
        super().__init__()
        self.conv = ops.Conv2d(channels, channels, 3, padding=1, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, t, h, w = x.shape
        out = empty_cl((b, self.conv.out_channels, t, 2 * h, 2 * w), x)
        return map_frames(lambda f: self.conv(F.interpolate(f, scale_factor=2.0, mode="nearest")), x, out)


class UpsampleResBlock(nn.Module):
    """The refinement after a 3D upsample: ``SiLU(GN2(conv2(SiLU(GN1(conv1(x))))) + x) + x``.

    The residual is added twice, before and after the final SiLU, as in the released weights' training code.
    Here the convs are padded with zero frames *before* the norm (unlike ``ResnetBlock``).
    """

    def __init__(self, channels: int, cfg: VAEConfig, ops, device=None, dtype=None):
        super().__init__()
        self.per_frame = cfg.per_frame_norm
        self.conv1 = CausalConv3d(channels, channels, 3, ops, device=device, dtype=dtype)
        self.norm1 = ops.GroupNorm(cfg.norm_groups, channels, eps=cfg.norm_eps, device=device, dtype=dtype)
        self.conv2 = CausalConv3d(channels, channels, 3, ops, device=device, dtype=dtype)
        self.norm2 = ops.GroupNorm(cfg.norm_groups, channels, eps=cfg.norm_eps, device=device, dtype=dtype)

    def forward(self, x_padded: torch.Tensor) -> torch.Tensor:
        """``x_padded``: the block input with its two leading zero frames already in place."""
        x = x_padded[:, :, 2:]
        h = self.conv1(x_padded, padded=True)
        n = norm_frames(h, self.norm1, self.per_frame, silu=True, front_pad=2)
        del h
        h = self.conv2(n, padded=True)
        del n
        h = norm_frames(h, self.norm2, self.per_frame, silu=False, out=h)
        h.add_(x)
        F.silu(h, inplace=True)
        return h.add_(x)


class Upsample3D(nn.Module):
    """Nearest 2x upsampling in time and space, then ``UpsampleResBlock`` (stored as ``conv3d``)."""

    def __init__(self, channels: int, cfg: VAEConfig, ops, device=None, dtype=None):
        super().__init__()
        self.conv3d = UpsampleResBlock(channels, cfg, ops, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, t, h, w = x.shape
        # Nearest-neighbour 2x (the reference interpolates in 8 channel slices: the same values).
        # Write the upsampled frames straight after two zero frames: one buffer serves as the padded conv
        # input and (through a view) as the residual.
        buf = empty_cl((b, c, 2 * t + 2, 2 * h, 2 * w), x)
        buf[:, :, :2].zero_()
        buf[:, :, 2:].view(b, c, t, 2, h, 2, w, 2).copy_(x[:, :, :, None, :, None, :, None].expand(b, c, t, 2, h, 2, w, 2))
        return self.conv3d(buf)


def space_to_channel(x: torch.Tensor, factor: int = 2) -> torch.Tensor:
    """Fold each ``factor``^3 neighbourhood into channels (index ``c*f^3 + dt*f^2 + dy*f + dx``).

    ``factor - 1`` zero frames are prepended first, so 5 frames fold into 3.
    """
    if factor > 1:
        x = F.pad(x, (0, 0, 0, 0, factor - 1, 0))
    x = rearrange(x, "b c (t dt) (h dy) (w dx) -> b (c dt dy dx) t h w", dt=factor, dy=factor, dx=factor)
    return x.contiguous(memory_format=CL)


def channel_to_space(x: torch.Tensor, factor: int = 2) -> torch.Tensor:
    """Inverse of ``space_to_channel``: unfold channels into ``factor``^3 neighbourhoods, drop the first
    ``factor - 1`` frames (3 latent frames unfold into 5)."""
    x = rearrange(x, "b (c dt dy dx) t h w -> b c (t dt) (h dy) (w dx)", dt=factor, dy=factor, dx=factor)
    return x[:, :, factor - 1:].contiguous(memory_format=CL)


def channel_average(x: torch.Tensor, out_channels: int) -> torch.Tensor:
    """Average consecutive groups of channels down to ``out_channels``."""
    return reduce(x, "b (c group) t h w -> b c t h w", "mean", c=out_channels).contiguous(memory_format=CL)


class Stage(nn.Module):
    """One resolution level: ``block`` (res blocks) and an optional ``downsample``/``upsample``."""


# ----------------------------------------------------------------------------------------------------------
# Encoder and decoder
# ----------------------------------------------------------------------------------------------------------


class Encoder(nn.Module):
    def __init__(self, cfg: VAEConfig, ops, device=None, dtype=None):
        super().__init__()
        self.cfg = cfg
        kw = dict(device=device, dtype=dtype)
        ch = cfg.encoder_channels
        widths = [ch] + [ch * m for m in cfg.encoder_channel_mult]
        self.conv_in = CausalConv3d(cfg.in_channels, ch, 3, ops, **kw)
        self.down = nn.ModuleList()
        last = len(cfg.encoder_channel_mult) - 1
        for i in range(len(cfg.encoder_channel_mult)):
            stage = Stage()
            cin, cout = widths[i], widths[i + 1]
            stage.block = nn.ModuleList(
                [ResnetBlock(cin if j == 0 else cout, cout, cfg, ops, **kw) for j in range(cfg.encoder_num_res_blocks)]
            )
            if i != last:
                stage.downsample = (Downsample3D(cout, ops, **kw) if i in cfg.encoder_temporal_levels
                                    else Downsample2D(cout, ops, **kw))
            self.down.append(stage)
        top = widths[-1]
        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(top, top, cfg, ops, **kw)
        self.mid.attn_1 = CausalAttention(top, cfg, ops, **kw)
        self.mid.block_2 = ResnetBlock(top, top, cfg, ops, **kw)
        self.norm_out = ops.GroupNorm(cfg.norm_groups, top, eps=cfg.norm_eps, **kw)
        self.conv_patchify = ConvWrapper(top, cfg.patch_channels // 8, ops, **kw)
        self.conv_out = CausalConv3d(cfg.patch_channels, 2 * cfg.z_channels, 3, ops, **kw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[b, 3, t, H, W]`` -> posterior moments ``[b, 2z, l, H/16, W/16]`` (mean first, then log-variance)."""
        cfg = self.cfg
        h = self.conv_in(x.contiguous(memory_format=CL))
        for stage in self.down:
            for block in stage.block:
                h = block(h)
            if hasattr(stage, "downsample"):
                h = stage.downsample(h)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        h = norm_frames(h, self.norm_out, cfg.per_frame_norm, silu=True, out=h)
        # Two shortcut paths without weights: the folded input averaged down to the conv's width.
        h = space_to_channel(self.conv_patchify(h)).add_(channel_average(space_to_channel(h), cfg.patch_channels))
        return self.conv_out(h).add_(channel_average(h, 2 * cfg.z_channels))


class Decoder(nn.Module):
    def __init__(self, cfg: VAEConfig, ops, device=None, dtype=None):
        super().__init__()
        self.cfg = cfg
        kw = dict(device=device, dtype=dtype)
        ch = cfg.decoder_channels
        levels = len(cfg.decoder_channel_mult)
        top = ch * cfg.decoder_channel_mult[-1]
        self.conv_in = CausalConv3d(cfg.z_channels, cfg.patch_channels, 3, ops, **kw)
        self.conv_unpatchify = ConvWrapper(cfg.patch_channels, top * 8, ops, **kw)
        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(top, top, cfg, ops, **kw)
        self.mid.attn_1 = CausalAttention(top, cfg, ops, **kw)
        self.mid.block_2 = ResnetBlock(top, top, cfg, ops, **kw)
        stages: list[Stage] = []
        cin = top
        for i in reversed(range(levels)):
            stage = Stage()
            cout = ch * cfg.decoder_channel_mult[i]
            stage.block = nn.ModuleList(
                [ResnetBlock(cin if j == 0 else cout, cout, cfg, ops, **kw) for j in range(cfg.decoder_num_res_blocks)]
            )
            cin = cout
            if i != 0:
                stage.upsample = (Upsample3D(cout, cfg, ops, **kw) if i in cfg.decoder_temporal_levels
                                  else Upsample2D(cout, ops, **kw))
            stages.insert(0, stage)
        self.up = nn.ModuleList(stages)  # up[i] is level i; the forward pass runs from the top level down
        self.norm_out = ops.GroupNorm(cfg.norm_groups, cin, eps=cfg.norm_eps, **kw)
        # The release stores this conv unwrapped (decoder.conv_out.weight/.bias, the reference renames it on
        # load). It always gets its two zero frames from norm_frames, so it is a plain Conv3d here and the
        # module's names are the file's: the official state dict loads with load_state_dict(strict=True).
        self.conv_out = ops.Conv3d(cin, cfg.out_channels, 3, padding=(0, 1, 1), **kw)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """Latents ``[b, z, l, h, w]`` -> frames ``[b, 3, 8l - 7, 16h, 16w]`` (one independent chunk)."""
        cfg = self.cfg
        # Weight-free shortcuts: the input repeated channel-wise up to the conv's width.
        # The two wide head convs (64 -> 2048 -> 4096 channels on latent-sized frames) run in the standard
        # layout, as in the reference: channels-last there makes oneDNN keep a reordered copy of the
        # 0.9 GB unpatchify weight, which dominates peak memory at small sizes.
        z = z.contiguous()
        h = self.conv_in(z).add_(z.repeat_interleave(cfg.patch_channels // cfg.z_channels, dim=1))
        shortcut = channel_to_space(h.repeat_interleave(self.conv_unpatchify.conv.conv.out_channels // cfg.patch_channels, dim=1))
        h = channel_to_space(self.conv_unpatchify(h)).add_(shortcut)
        del shortcut
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        for stage in reversed(self.up):
            for block in stage.block:
                h = block(h)
            if hasattr(stage, "upsample"):
                h = stage.upsample(h)
        h = self.conv_out(norm_frames(h, self.norm_out, cfg.per_frame_norm, silu=True, front_pad=2))
        return h[:, :, cfg.decoder_dropped_frames:]


# ----------------------------------------------------------------------------------------------------------
# Chunk-border blend and tiling helpers
# ----------------------------------------------------------------------------------------------------------


def blend_chunk_borders(video: torch.Tensor, keep: float = 0.6, chunk: int = FRAMES_PER_CHUNK) -> torch.Tensor:
    """In place on ``[b, T, ...]``: at every border between 17-frame chunks, with ``f`` the last frame of a
    chunk and ``g`` the first of the next, first ``g <- keep*g + (1-keep)*f``, then ``f <- keep*f + (1-keep)*g``
    using the *updated* ``g`` (the reference's sequential order; ``f`` ends as 0.76 f + 0.24 g for 0.6)."""
    n = video.shape[1]
    last = slice(chunk - 1, n - 1, chunk)
    first = slice(chunk, n, chunk)
    video[:, first] = video[:, first] * keep + video[:, last] * (1.0 - keep)
    video[:, last] = video[:, last] * keep + video[:, first] * (1.0 - keep)
    return video


def tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Start offsets of tiles of ``tile`` covering ``length`` with at least ``overlap`` shared; the last tile
    is shifted back to end exactly at ``length``."""
    if length <= tile:
        return [0]
    stride = tile - overlap
    n = math.ceil((length - overlap) / stride)
    return sorted({min(i * stride, length - tile) for i in range(n)})


def feather(length: int, ramp_in: int, ramp_out: int) -> torch.Tensor:
    """1D weights: linear ramp up over the first ``ramp_in`` samples, down over the last ``ramp_out``."""
    w = torch.ones(length, dtype=torch.float32)
    if ramp_in:
        w[:ramp_in] = (torch.arange(ramp_in, dtype=torch.float32) + 0.5) / ramp_in
    if ramp_out:
        w[length - ramp_out:] = torch.minimum(w[length - ramp_out:],
                                              (torch.arange(ramp_out, 0, -1, dtype=torch.float32) - 0.5) / ramp_out)
    return w


def _tiles_1d(length: int, tile: int, overlap: int, scale: int) -> list[tuple[int, int, torch.Tensor]]:
    """(start, end, pixel weights) per tile along one axis, ramps spanning each actual overlap."""
    starts = tile_starts(length, tile, overlap)
    ends = [min(s + tile, length) for s in starts]
    out = []
    for k, (s, e) in enumerate(zip(starts, ends)):
        ramp_in = (ends[k - 1] - s) * scale if k > 0 else 0
        ramp_out = (e - starts[k + 1]) * scale if k + 1 < len(starts) else 0
        out.append((s, e, feather((e - s) * scale, ramp_in, ramp_out)))
    return out


def _pair(v: int | tuple[int, int]) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


# ----------------------------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------------------------


class VideoVAE(nn.Module):
    """Encoder + decoder of the Step-Video Video-VAE with chunked, optionally tiled, decoding.

    The module holds no state that a call changes, so an exception raised from a progress callback (to cancel)
    leaves it ready for the next call.
    """

    def __init__(self, config: VAEConfig | None = None, operations=None, device=None, dtype=None):
        super().__init__()
        self.config = config = config or VAEConfig()
        ops = operations or default_ops
        for w in (config.encoder_channels, config.decoder_channels):
            if w % config.norm_groups:
                raise ValueError(f"channel width {w} is not divisible by the {config.norm_groups} GroupNorm groups")
        for side, mult, base in (("encoder", config.encoder_channel_mult, config.encoder_channels),
                                 ("decoder", config.decoder_channel_mult, config.decoder_channels)):
            if (base * mult[-1] * 8) % config.patch_channels:
                raise ValueError(f"{side} top width {base * mult[-1]} x 8 must be a multiple of the "
                                 f"{config.patch_channels} patch channels (32 x z_channels)")
        self.encoder = Encoder(config, ops, device=device, dtype=dtype)
        self.decoder = Decoder(config, ops, device=device, dtype=dtype)

    @property
    def compute_dtype(self) -> torch.dtype:
        dtype = self.decoder.conv_in.conv.weight.dtype
        return torch.bfloat16 if dtype in FP8_DTYPES else dtype

    @property
    def device(self) -> torch.device:
        return self.decoder.conv_in.conv.weight.device

    # ---- encoding ----------------------------------------------------------------------------------------

    # no_grad rather than the reference's inference_mode, so results can be used in autograd-enabled code.
    @torch.no_grad()
    def encode_moments(self, video: torch.Tensor, callback: ProgressCallback | None = None) -> torch.Tensor:
        """``[b, T, 3, H, W]`` in [-1, 1] -> posterior moments ``[b, L, 2z, H/16, W/16]``, one 17-frame chunk
        at a time (activations of one chunk in memory at once)."""
        if video.ndim != 5 or video.shape[2] != self.config.in_channels:
            raise ValueError(f"expected video [b, T, {self.config.in_channels}, H, W], got {tuple(video.shape)}")
        b, n, _, height, width = video.shape
        num_latents, lh, lw = encoded_grid(n, height, width)
        _check_finite("The video to encode holds", video, ("video", "frame", "colour channel", "row", "column"))
        dtype, device = self.compute_dtype, self.device
        moments = torch.empty((b, num_latents, 2 * self.config.z_channels, lh, lw), dtype=dtype, device=device)
        starts = list(range(0, n, FRAMES_PER_CHUNK))
        pos = 0
        for k, s in enumerate(starts):
            chunk = video[:, s:s + FRAMES_PER_CHUNK].to(device=device, dtype=dtype).permute(0, 2, 1, 3, 4).contiguous()
            try:
                m = self.encoder(chunk)
            except torch.OutOfMemoryError as e:
                raise torch.OutOfMemoryError(
                    f"Out of memory encoding frames {s}-{s + chunk.shape[2] - 1} ({height}x{width}). To fit: encode a "
                    f"smaller width/height{', in bf16' if dtype == torch.float32 else ''}, or let ComfyUI offload "
                    f"the other models first. [{e}]") from e
            moments[:, pos:pos + m.shape[2]] = m.permute(0, 2, 1, 3, 4)
            pos += m.shape[2]
            del chunk, m
            if callback is not None:
                callback(k + 1, len(starts))
        return moments

    @torch.no_grad()
    def encode(self, video: torch.Tensor, sample: bool = True, generator: torch.Generator | None = None,
               callback: ProgressCallback | None = None) -> torch.Tensor:
        """``[b, T, 3, H, W]`` in [-1, 1] -> latents ``[b, L, z, H/16, W/16]`` (L = 3 per 17 frames).

        ``sample=True`` draws ``mean + exp(logvar / 2) * eps`` (the reference's behaviour; ``eps`` is drawn in
        fp32 over the whole latent in one call, so a seeded generator reproduces the reference); ``False``
        returns the mean. Log-variance is clamped to [-30, 20]. No scaling or shift is applied.
        """
        moments = self.encode_moments(video, callback=callback)
        mean, logvar = moments.chunk(2, dim=2)
        if not sample:
            return mean.contiguous()
        std = torch.exp(0.5 * logvar.clamp(-30.0, 20.0))
        eps = torch.randn(mean.shape, generator=generator, device=moments.device).to(moments.dtype)
        return mean + std * eps

    # ---- decoding ----------------------------------------------------------------------------------------

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, tile_size: int | tuple[int, int] | None = None, tile_overlap: int = 4,
               callback: ProgressCallback | None = None) -> torch.Tensor:
        """Latents ``[b, L, z, h, w]`` -> video ``[b, 8L', 3, 16h, 16w]`` (17 frames per 3 latents), ~[-1, 1].

        Each 3-latent chunk is decoded independently and chunk borders are blended as in the reference.
        ``tile_size`` (latent units, int or (h, w)) decodes each chunk in overlapping spatial tiles blended with
        linear ramps across each overlap (``tile_overlap`` latents; 1 latent = 16 pixels), bounding peak memory
        by the tile instead of the frame. Tiles see only their own neighbourhood (the mid-level attention
        included), so tiled output is close to, not equal to, untiled output. ``callback(done, total)`` is
        called after every chunk (untiled) or tile; raising from it cancels the decode.
        """
        cfg = self.config
        if latents.ndim != 5 or latents.shape[2] != cfg.z_channels:
            raise ValueError(f"expected latents [b, L, {cfg.z_channels}, h, w], got {tuple(latents.shape)}")
        b, num_latents, _, lh, lw = latents.shape
        _check_finite("The latents to decode hold", latents, ("video", "latent frame", "channel", "row", "column"),
                      "The sampler (or a node that edited the latents) produced them; without this check they "
                      "decode to black frames.")
        dtype, device = self.compute_dtype, self.device
        height, width = lh * SPATIAL_FACTOR, lw * SPATIAL_FACTOR
        chunks = list(range(0, num_latents, LATENTS_PER_CHUNK))
        if tile_size is None:
            tiles = [((0, lh, None), (0, lw, None))]
        else:
            th, tw = _pair(tile_size)
            if th < 1 or tw < 1 or tile_overlap < 0 or tile_overlap * 2 > min(th, tw):
                raise ValueError(f"tile_size {tile_size} / tile_overlap {tile_overlap}: need tiles >= 1 latent and "
                                 "an overlap of at most half a tile")
            tiles = [(ty, tx) for ty in _tiles_1d(lh, th, tile_overlap, SPATIAL_FACTOR)
                     for tx in _tiles_1d(lw, tw, tile_overlap, SPATIAL_FACTOR)]
        # Deviation: the reference has no tiling, and can spread chunks over several processes (world_size > 1);
        # here chunks run one after another in this process, each optionally in spatial tiles.
        total, done = len(chunks) * len(tiles), 0
        video = torch.empty((b, video_frames(num_latents), cfg.out_channels, height, width), dtype=dtype, device=device)
        pos = 0
        for s in chunks:
            z = latents[:, s:s + LATENTS_PER_CHUNK].to(device=device, dtype=dtype).permute(0, 2, 1, 3, 4)
            n = video_frames(z.shape[2])
            target = video[:, pos:pos + n].permute(0, 2, 1, 3, 4)  # [b, 3, n, H, W] view into the output
            if len(tiles) == 1:
                target.copy_(self._decode_part(z.contiguous(), s, tile_size, tile_overlap))
                done += 1
                if callback is not None:
                    callback(done, total)
            else:
                acc = torch.zeros((b, cfg.out_channels, n, height, width), dtype=torch.float32, device=device)
                weight = torch.zeros((height, width), dtype=torch.float32, device=device)
                for (y0, y1, wy), (x0, x1, wx) in tiles:
                    part = self._decode_part(z[..., y0:y1, x0:x1].contiguous(), s, tile_size, tile_overlap)
                    w2 = (wy[:, None] * wx[None, :]).to(device)
                    ys, xs = slice(y0 * SPATIAL_FACTOR, y1 * SPATIAL_FACTOR), slice(x0 * SPATIAL_FACTOR, x1 * SPATIAL_FACTOR)
                    acc[..., ys, xs].addcmul_(part.float(), w2)
                    weight[ys, xs] += w2
                    del part
                    done += 1
                    if callback is not None:
                        callback(done, total)
                target.copy_(acc.div_(weight))
                del acc, weight
            pos += n
        return blend_chunk_borders(video, keep=cfg.blend_keep)

    def _decode_part(self, z: torch.Tensor, first: int, tile_size, tile_overlap: int) -> torch.Tensor:
        """One chunk (or tile of it) through the decoder; out of memory and NaN/inf outputs say what to change."""
        latents = f"latent frames {first}-{first + z.shape[2] - 1}"
        try:
            out = self.decoder(z)
        except torch.OutOfMemoryError as e:
            if tile_size is None:
                tip = "decode in tiles (tile_size 16, tile_overlap 4)"
            else:
                th, tw = _pair(tile_size)
                tip = (f"use smaller tiles (now {th}x{tw} latents; try {max(th // 2, 1)}x{max(tw // 2, 1)} with "
                       f"tile_overlap {min(tile_overlap, max(min(th, tw) // 4, 0))})")
            if self.compute_dtype == torch.float32:
                tip += ", decode in bf16"
            raise torch.OutOfMemoryError(f"Out of memory decoding {latents} ({z.shape[3]}x{z.shape[4]} latents). "
                                         f"To fit: {tip}, or let ComfyUI offload the DiT first. [{e}]") from e
        if not torch.isfinite(out).all():
            raise FloatingPointError(model_nan_message(f"decoding {latents}", self.compute_dtype))
        return out


def _check_finite(what: str, tensor: torch.Tensor, axes: tuple[str, ...], why: str = "") -> None:
    """A ``ValueError`` naming the first NaN/inf position by its axes' names (e.g. latent frame, row, column)."""
    bad = ~torch.isfinite(tensor)
    if bad.any():
        first = bad.nonzero()[0].tolist()
        where = ", ".join(f"{axis} {i}" for axis, i in zip(axes, first))
        raise ValueError(f"{what} {int(bad.sum())} NaN/inf value(s), the first at {where} (shape "
                         f"{tuple(tensor.shape)}). {why}".strip())


# ----------------------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------------------


NORM_GROUPS_KEY = "norm_groups"  # safetensors metadata of a VAE whose GroupNorms do not use 32 groups


def load_vae(path: str | Path, dtype: torch.dtype = torch.bfloat16, device: torch.device | str = "cpu",
             operations=None, **config_overrides) -> VideoVAE:
    """Load ``vae/vae_v2.safetensors`` (as stored, strictly) into a ``VideoVAE``.

    The architecture is read from tensor shapes, so reduced configs saved the same way load too. The v1 file
    (``vae.safetensors``, 16 latent channels) and other models' VAEs are refused with a message saying so.
    """
    if dtype in FP8_DTYPES:
        raise ValueError("the VAE runs in bfloat16, float16 or float32; fp8 is not supported for it")

    def build(ckpt, shapes) -> VideoVAE:
        # Deviation: the reference also builds the v1 VAE; Step-Video-T2V's DiT uses v2 only, so v1 is refused.
        if "encoder.conv_patchify.conv.conv.weight" not in shapes:
            z = shapes["decoder.conv_in.conv.weight"][1]
            raise CheckpointError(
                f"{ckpt.path} is the version-1 Step-Video VAE ({z} latent channels, usually named vae.safetensors). "
                "Step-Video-T2V's DiT works with the version-2 VAE: load vae/vae_v2.safetensors (64 latent channels) "
                "instead.")
        # GroupNorm's group count is in no tensor shape: the release uses the default (32); a reduced VAE such as
        # Step-Video-Tiny's records its own in the file's safetensors metadata.
        overrides = dict(config_overrides)
        metadata = ckpt.metadata()
        if NORM_GROUPS_KEY in metadata and "norm_groups" not in overrides:
            try:
                overrides["norm_groups"] = int(metadata[NORM_GROUPS_KEY])
            except ValueError:
                raise CheckpointError(f"{ckpt.path}: metadata {NORM_GROUPS_KEY}={metadata[NORM_GROUPS_KEY]!r} is "
                                      "not an integer.") from None
        config = VAEConfig.from_shapes(shapes, **overrides)
        try:
            return VideoVAE(config, operations=operations)
        except ValueError as e:
            raise CheckpointError(f"{ckpt.path} does not fit a Step-Video VAE: {e}. If its GroupNorms use another "
                                  f"group count than {config.norm_groups}, the file must name it in its safetensors "
                                  f"metadata ({NORM_GROUPS_KEY!r}).") from None

    return load_checkpoint_model(path, model_name="Step-Video VAE (v2)", build=build, weight_dtype=dtype,
                                 compute_dtype=dtype, device=device,
                                 anchors=("decoder.conv_in.conv.weight", "encoder.conv_in.conv.weight"),
                                 hint="Use vae/vae_v2.safetensors from stepfun-ai/stepvideo-t2v.")
