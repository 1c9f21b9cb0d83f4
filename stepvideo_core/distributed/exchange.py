"""What ranks hand each other around sampling: the text conditioning (encoded once, broadcast) and the decoded
video (VAE chunks dealt out to the ranks, frames gathered on rank 0)."""

from __future__ import annotations

import torch
import torch.distributed as dist

from ..image_condition import ImageCondition
from ..text_encoding import TextConditioning
from ..vae import VideoVAE, blend_chunk_borders
from ..video_shape import LATENTS_PER_CHUNK, video_frames
from .plan import ParallelContext


def broadcast_conditioning(positive: TextConditioning | None, negative: TextConditioning | None,
                           ctx: ParallelContext, src: int = 0) -> tuple[TextConditioning, TextConditioning | None]:
    """Send the conditioning encoded on rank ``src`` to every rank (others pass None)."""
    meta = [None]
    if ctx.rank == src:
        meta = [[None if c is None else [(tuple(t.shape), t.dtype) for t in (c.llm_states, c.mask, c.clip_states)]
                 for c in (positive, negative)]]
    dist.broadcast_object_list(meta, src=src)
    received = []
    for mine, spec in zip((positive, negative), meta[0]):
        if spec is None:
            received.append(None)
            continue
        tensors = ([t.to(ctx.device) for t in (mine.llm_states, mine.mask, mine.clip_states)] if ctx.rank == src
                   else [torch.empty(shape, dtype=dtype, device=ctx.device) for shape, dtype in spec])
        for t in tensors:
            dist.broadcast(t, src=src)
        received.append(TextConditioning(*tensors))
    return received[0], received[1]


def decode(vae: VideoVAE, latents: torch.Tensor, ctx: ParallelContext, **decode_kwargs) -> torch.Tensor | None:
    """``vae.decode`` with its 3-latent chunks dealt out to the ranks (chunk i to rank i mod world) and the
    frames gathered on rank 0, which blends the chunk borders; returns the video on rank 0, None elsewhere.

    Each chunk is decoded independently in ``vae.decode`` as well, so this equals the one-process decode."""
    world = ctx.plan.world_size
    starts = list(range(0, latents.shape[1], LATENTS_PER_CHUNK))
    mine = {s: vae.decode(latents[:, s:s + LATENTS_PER_CHUNK], **decode_kwargs)
            for i, s in enumerate(starts) if i % world == ctx.rank}
    if ctx.rank != 0:
        for s in sorted(mine):
            dist.send(mine[s].contiguous(), dst=0)
        return None
    first = mine[0]
    pieces = []
    for i, s in enumerate(starts):
        if i % world == 0:
            pieces.append(mine[s])
            continue
        frames = video_frames(min(LATENTS_PER_CHUNK, latents.shape[1] - s))
        piece = first.new_empty((first.shape[0], frames, *first.shape[2:]))
        dist.recv(piece, src=i % world)
        pieces.append(piece)
    return blend_chunk_borders(torch.cat(pieces, dim=1), keep=vae.config.blend_keep)


def broadcast_image_condition(condition: ImageCondition | None, ctx: ParallelContext, src: int = 0) -> ImageCondition:
    """Send the TI2V image condition made on rank ``src`` (the VAE encodes once) to every rank (others pass None)."""
    meta = [None]
    if ctx.rank == src:
        meta = [(tuple(condition.latents.shape), condition.latents.dtype, float(condition.motion_score))]
    dist.broadcast_object_list(meta, src=src)
    shape, dtype, score = meta[0]
    latents = (condition.latents.to(ctx.device).contiguous() if ctx.rank == src
               else torch.empty(shape, dtype=dtype, device=ctx.device))
    dist.broadcast(latents, src=src)
    return ImageCondition(latents, score)
