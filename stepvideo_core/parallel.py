"""One generation split over several processes with torch.distributed (launched by ``torchrun``).

Three ways to split, which compose (world size = guidance x ring x ulysses):

- **Guidance parallel** (``guidance=2``): the conditional and the unconditional branch of classifier-free
  guidance run on different ranks; after each DiT call the two halves swap their (small) outputs and every
  rank forms ``uncond + cfg * (cond - uncond)``. Needs an even world size and cfg != 1.
- **Sequence parallel** (``ulysses x ring`` ranks per branch): after ``StepVideoDiT.prepare`` the video tokens
  are cut into contiguous shards, one per rank (the Rope3D tables are cut the same way); every block runs on
  its shard and only self-attention talks to the other ranks: **Ulysses** swaps a token shard of every head
  for all tokens of a group of heads (two all-to-alls per block), **ring attention** passes key/value shards
  round the ring and merges the partial softmaxes by their log-sum-exp. Ulysses is used as far as the head
  count allows (degree = gcd(heads, ranks)), ring for the rest (48 heads: pure Ulysses on 2, 3, 4, 6 or 8
  ranks per branch; Step-Video-Tiny's 4 heads on 3 ranks: pure ring; on 6 ranks: 2 x 3). After ``finish``
  the shards are gathered and unpatchified, so every rank holds the whole velocity and steps identically.
  Cross-attention needs no communication (each rank's queries see all text keys).
- **Weight sharding** (``shard_weights``): every transformer block is wrapped with FSDP2's ``fully_shard``
  over all ranks, so each rank stores 1/world of the block weights and gathers one block's weights just
  before running it (freed after). Chosen over tensor parallel because (1) it leaves the official modules
  and their fused per-head ``wqkv`` layout untouched (LoRA hooks, fp8 storage and the cast-on-call ops work
  as on one device); (2) its traffic per DiT call is the weights once (~30 GB in fp8, ~60 GB in bf16,
  split over the ranks), while tensor parallel would all-reduce the activations twice per block (at 75,888
  tokens x 6144 x 2 bytes = 0.93 GB each, 96 per call: ~90 GB); (3) it composes with sequence and guidance
  parallel unchanged, since every rank runs every block in the same order.

The forward is not forked: the stages of ``StepVideoDiT`` (``prepare -> run_blocks -> finish -> unpatchify``)
run as they are, with a sharded token tensor and a ``BlockContext`` whose ``self_attention`` is the
sequence-parallel function. Noise is drawn from the seed on every rank (identical), text conditioning is
encoded once on rank 0 and broadcast (``broadcast_conditioning``). NCCL on GPUs, gloo on CPUs.

Typical use (what ``python -m stepvideo_core.generate`` does under ``torchrun``)::

    group = init_from_environment()                      # None outside torchrun / with one process
    plan = ParallelPlan.choose(group.world_size, heads, guided=cfg != 1, shard_weights=...)
    ctx = ParallelContext.build(plan, group)
    dit = load_dit_sharded(path, ctx) if plan.shard_weights else load_dit(path, device=ctx.device)
    positive, negative = broadcast_conditioning(pos_or_none, neg_or_none, ctx)
    latents = sample_latents(dit, ctx, positive, negative, settings)   # the same on every rank
    video = decode(vae, latents, ctx)                                  # whole video on rank 0, None elsewhere
"""

from __future__ import annotations

import importlib.util
import math
import os
from dataclasses import dataclass, replace

import torch
import torch.distributed as dist

from .attention import AttentionFn
from .dit import DIT_NAME, Rope3D, StepVideoDiT, open_dit_checkpoint, resolve_compute_dtype
from .image_condition import ImageCondition
from .loading import check_keys, storage_dtype, to_storage_dtype
from .pipeline import GenerationSettings, check_sampling_inputs, latent_shape, sampling_oom_advice
from .scheduler import StepCallback, denoise_sigmas, guidance_on, make_noise, sample_euler
from .step_cache import GROUP_MEAN_KEY
from .text_encoding import TextConditioning
from .vae import VideoVAE, blend_chunk_borders
from .video_shape import LATENTS_PER_CHUNK, video_frames

SP_ATTENTION = ("torch", "yunchang")


class ParallelError(ValueError):
    """A parallel layout that cannot work; the message says which value and what to choose instead."""


# ---- the plan and its process groups ---------------------------------------------------------------------


@dataclass(frozen=True)
class ParallelPlan:
    """How ``world_size`` ranks share one generation: guidance (1 or 2) x ring x ulysses ranks."""

    guidance: int = 1
    ring: int = 1
    ulysses: int = 1
    shard_weights: bool = False
    attention: str = "torch"  # sequence-parallel attention: "torch" (ours) or "yunchang" (xDiT's USP, if installed)

    @property
    def sequence(self) -> int:
        """Ranks that share one branch's tokens."""
        return self.ring * self.ulysses

    @property
    def world_size(self) -> int:
        return self.guidance * self.sequence

    def describe(self) -> str:
        parts = [f"{self.world_size} process(es)"]
        if self.guidance > 1:
            parts.append("guidance parallel (cond/uncond on separate ranks)")
        if self.sequence > 1:
            parts.append(f"sequence parallel over {self.sequence} ranks (Ulysses {self.ulysses} x ring {self.ring})")
        if self.sequence > 1 and self.attention != "torch":
            parts.append(f"attention by {self.attention}")
        if self.shard_weights:
            parts.append(f"DiT block weights sharded {self.world_size} ways (FSDP2)")
        return ", ".join(parts)

    @classmethod
    def choose(cls, world_size: int, heads: int, guided: bool, guidance_parallel: bool | None = None,
               ulysses: int | None = None, shard_weights: bool = False, attention: str = "torch") -> ParallelPlan:
        """The layout for ``world_size`` ranks: guidance parallel when possible (even world, guided sampling)
        unless ``guidance_parallel`` is False, then as much Ulysses as ``heads`` allows and ring for the rest.
        ``attention`` picks who computes sequence-parallel attention: "torch" (``SequenceParallelAttention``,
        nothing but torch) or "yunchang" (xDiT's USP kernels, when the package is installed)."""
        if attention not in SP_ATTENTION:
            raise ParallelError(f"sequence-parallel attention {attention!r} is not one of {', '.join(SP_ATTENTION)}")
        if attention == "yunchang" and importlib.util.find_spec("yunchang") is None:
            raise ParallelError("sequence-parallel attention 'yunchang' was chosen but the package is not installed: "
                                "pip install yunchang (and flash-attn on GPUs), or choose 'torch', which needs nothing.")
        if world_size < 1:
            raise ParallelError(f"world size must be at least 1, got {world_size}")
        can_split_guidance = guided and world_size % 2 == 0
        if guidance_parallel and not can_split_guidance:
            why = "sampling is unguided (cfg 1 or no negative)" if not guided else f"the world size {world_size} is odd"
            raise ParallelError(f"guidance parallel needs an even number of processes and cfg != 1, but {why}; "
                                "launch an even number of processes or turn guidance parallel off.")
        guidance = 2 if can_split_guidance and guidance_parallel is not False else 1
        sequence = world_size // guidance
        if ulysses is None:
            ulysses = math.gcd(heads, sequence)
        if ulysses < 1 or sequence % ulysses or heads % ulysses:
            raise ParallelError(
                f"Ulysses degree {ulysses} must divide both the {sequence} ranks per branch and the {heads} attention "
                f"heads; choose one of {[d for d in range(1, sequence + 1) if sequence % d == 0 and heads % d == 0]}.")
        return cls(guidance=guidance, ring=sequence // ulysses, ulysses=ulysses, shard_weights=shard_weights,
                   attention=attention)


@dataclass(frozen=True)
class DistributedGroup:
    """This process's place in the default process group and the device it computes on."""

    rank: int
    world_size: int
    device: torch.device


def init_from_environment(backend: str | None = None, device: str | torch.device | None = None) -> DistributedGroup | None:
    """Join the process group ``torchrun`` describes in the environment; None when run as one plain process.

    The backend is NCCL when CUDA is available and gloo otherwise; each process takes the GPU numbered by its
    ``LOCAL_RANK``."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device is None:
        device = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend or ("nccl" if device.type == "cuda" else "gloo"))
    return DistributedGroup(dist.get_rank(), dist.get_world_size(), device)


def _my_group(groups: list[list[int]], rank: int):
    """Create every group (a collective call: all ranks create all groups in the same order); return ours."""
    mine = None
    for ranks in groups:
        group = dist.new_group(ranks)
        if rank in ranks:
            mine = group
    return mine


@dataclass
class ParallelContext:
    """The plan, this rank's coordinates in it, and the process groups of each split."""

    plan: ParallelPlan
    rank: int
    device: torch.device
    guidance_rank: int  # 0: conditional branch, 1: unconditional
    sequence_rank: int  # index of this rank's token shard within its branch
    sequence_group: object
    guidance_group: object
    ulysses_group: object
    ring_group: object
    usp: object = None  # yunchang's LongContextAttention when the plan asks for it

    @property
    def ring_rank(self) -> int:
        return self.sequence_rank // self.plan.ulysses

    def sequence_mean(self, value: torch.Tensor) -> torch.Tensor:
        """The mean of a scalar over the ranks sharing this branch's tokens (the same result on each of them)."""
        total = value.detach().float().reshape(1).clone()
        dist.all_reduce(total, group=self.sequence_group)
        return total[0] / self.plan.sequence

    @classmethod
    def build(cls, plan: ParallelPlan, group: DistributedGroup) -> ParallelContext:
        """Make the process groups. Global rank = guidance * sequence + ring * ulysses + ulysses index, so the
        ranks of an Ulysses group are neighbours (on one node when possible)."""
        if plan.world_size != group.world_size:
            raise ParallelError(f"the plan needs {plan.world_size} processes but {group.world_size} were launched")
        if plan.attention == "yunchang" and plan.ring > 1 and group.device.type != "cuda":
            # yunchang's CPU kernel (SDPA math) returns no log-sum-exp, so its ring would merge blocks wrongly
            raise ParallelError(f"yunchang's ring attention needs a GPU (its CPU kernel gives no log-sum-exp); this "
                                f"plan has a ring of {plan.ring} on {group.device.type}. Use the 'torch' "
                                "sequence-parallel attention, or a Ulysses degree that covers all ranks.")
        g_n, p, u = plan.guidance, plan.sequence, plan.ulysses
        rank = group.rank
        seq = _my_group([[g * p + s for s in range(p)] for g in range(g_n)], rank)
        guid = _my_group([[g * p + s for g in range(g_n)] for s in range(p)], rank)
        uly = _my_group([[g * p + r * u + i for i in range(u)] for g in range(g_n) for r in range(plan.ring)], rank)
        ring = _my_group([[g * p + r * u + i for r in range(plan.ring)] for g in range(g_n) for i in range(u)], rank)
        usp = _yunchang_attention(plan, rank, group.device) if plan.attention == "yunchang" else None
        return cls(plan, rank, group.device, rank // p, rank % p, seq, guid, uly, ring, usp)


# ---- token shards ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TokenShard:
    """This rank's contiguous slice of ``tokens`` video tokens, padded at the end to ``ranks`` equal shards."""

    tokens: int
    ranks: int
    index: int

    @property
    def size(self) -> int:
        return -(-self.tokens // self.ranks)

    @property
    def padded(self) -> int:
        return self.size * self.ranks

    @property
    def start(self) -> int:
        return self.index * self.size

    def take(self, x: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """This rank's shard of ``x`` along ``dim`` (zeros where it runs past the real tokens)."""
        part = x.narrow(dim, min(self.start, self.tokens), max(0, min(self.size, self.tokens - self.start)))
        missing = self.size - part.shape[dim]
        if missing:
            pad_shape = list(part.shape)
            pad_shape[dim] = missing
            part = torch.cat([part, part.new_zeros(pad_shape)], dim=dim)
        return part

    def rope(self, rope: Rope3D) -> Rope3D:
        """The same rotary tables restricted to this shard's tokens."""
        shard = object.__new__(Rope3D)
        shard.__dict__.update(rope.__dict__)
        shard.cos, shard.sin_signed = self.take(rope.cos), self.take(rope.sin_signed)
        return shard

    def gather(self, x: torch.Tensor, group) -> torch.Tensor:
        """All ranks' shards ``[b, size, ...]`` -> the whole sequence ``[b, tokens, ...]`` on every rank."""
        parts = [torch.empty_like(x) for _ in range(self.ranks)]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts, dim=1)[:, :self.tokens]


# ---- sequence-parallel self-attention ---------------------------------------------------------------------


def _all_to_all(x: torch.Tensor, group) -> torch.Tensor:
    """Exchange ``x[i]`` (leading dim = group size) with rank i of ``group``; returns what each rank sent us."""
    x = x.contiguous()
    out = torch.empty_like(x)  # after contiguous(): empty_like keeps a permuted input's strides
    dist.all_to_all_single(out, x, group=group)
    return out


def _attention_with_lse(q, k, v, valid_keys: int, query_chunk: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention over the first ``valid_keys`` keys in fp32, with the log-sum-exp of each query's scores
    (what ring attention needs to merge partial results); queries in chunks to bound the score matrix."""
    k, v = k[:, :, :valid_keys].float(), v[:, :, :valid_keys].float()
    scale = 1.0 / math.sqrt(q.shape[-1])
    outs, lses = [], []
    for qc in q.float().split(query_chunk, dim=2):
        scores = torch.matmul(qc, k.transpose(-1, -2)) * scale
        lse = torch.logsumexp(scores, dim=-1, keepdim=True)
        outs.append(torch.matmul(torch.exp(scores - lse), v))
        lses.append(lse)
    return torch.cat(outs, dim=2), torch.cat(lses, dim=2)


def ring_attention(q, k, v, group, ring_rank: int, ring_size: int, valid_tokens: int) -> torch.Tensor:
    """Exact attention of this rank's queries over the keys/values of every rank in ``group``.

    Block ``r`` of keys holds tokens ``[r * n, (r + 1) * n)``; keys at or past ``valid_tokens`` (padding) are
    left out. Each step attends to the block at hand while the next one travels round the ring."""
    block = q.shape[2]
    kv = torch.stack([k, v]).contiguous()
    send_to = dist.get_global_rank(group, (ring_rank + 1) % ring_size)
    recv_from = dist.get_global_rank(group, (ring_rank - 1) % ring_size)
    out = lse = None
    for step in range(ring_size):
        pending, incoming = [], None
        if step + 1 < ring_size:
            incoming = torch.empty_like(kv)
            pending = dist.batch_isend_irecv([dist.P2POp(dist.isend, kv, send_to, group),
                                              dist.P2POp(dist.irecv, incoming, recv_from, group)])
        source = (ring_rank - step) % ring_size
        valid = min(block, max(0, valid_tokens - source * block))
        if valid:
            o, s = _attention_with_lse(q, kv[0], kv[1], valid)
            if out is None:
                out, lse = o, s
            else:
                merged = torch.logaddexp(lse, s)
                out = out * torch.exp(lse - merged) + o * torch.exp(s - merged)
                lse = merged
        for request in pending:
            request.wait()
        if incoming is not None:
            kv = incoming
    return out.to(q.dtype)


class SequenceParallelAttention:
    """Self-attention over tokens sharded across the sequence ranks: Ulysses (all-to-all over heads) within
    ``ulysses_group``, then ring attention across ``ring_group`` when the plan has a ring.

    Called as an ``AttentionFn`` with this rank's shard ``[b, heads, shard, d]``; ``inner`` computes plain
    attention when there is no ring (any back-end: SDPA, SageAttention, flash-attn)."""

    def __init__(self, ctx: ParallelContext, shard: TokenShard, inner: AttentionFn):
        self.ctx, self.shard, self.inner = ctx, shard, inner

    def __call__(self, q, k, v, mask=None, transformer_options=None):
        if mask is not None:
            raise ParallelError("sequence-parallel self-attention takes no mask")
        plan, ctx = self.ctx.plan, self.ctx
        b, heads, n, d = q.shape
        u = plan.ulysses
        if u > 1:
            # [b, H, n, d] -> [u, 3, b, H/u, n, d]: head group j goes to Ulysses rank j; we get our head group
            # for the u neighbouring token shards, which are contiguous in the sequence.
            send = q.new_empty(u, 3, b, heads // u, n, d)
            for i, t in enumerate((q, k, v)):  # one copy into the send buffer (the DiT hands over strided views)
                send[:, i].copy_(t.unflatten(1, (u, heads // u)).transpose(0, 1))
            qkv = _all_to_all(send, ctx.ulysses_group)
            q, k, v = qkv.permute(1, 2, 3, 0, 4, 5).reshape(3, b, heads // u, u * n, d)
        # Tokens now held: block ``ring_rank`` of the sequence, of length u * n.
        if plan.ring > 1:
            out = ring_attention(q, k, v, ctx.ring_group, ctx.ring_rank, plan.ring, self.shard.tokens)
        else:
            real = self.shard.tokens  # without a ring we hold every token: leave the padding out of the keys
            out = self.inner(q[:, :, :real], k[:, :, :real], v[:, :, :real], None, transformer_options)
            if real < q.shape[2]:
                out = torch.cat([out, out.new_zeros(b, out.shape[1], q.shape[2] - real, d)], dim=2)
        if u > 1:
            out = out.reshape(b, heads // u, u, n, d).permute(2, 0, 1, 3, 4)  # token shard j goes back to rank j
            out = _all_to_all(out, ctx.ulysses_group).permute(1, 0, 2, 3, 4).reshape(b, heads, n, d)
        return out


def _yunchang_attention(plan: ParallelPlan, rank: int, device: torch.device):
    """yunchang's USP layer for ``plan``. Its ``set_seq_parallel_pg`` makes the same groups as ours (Ulysses
    groups of neighbouring ranks, rings across them, one set per guidance branch) and keeps them in yunchang's
    own module state, so one process serves one yunchang plan at a time."""
    from yunchang import LongContextAttention, set_seq_parallel_pg
    from yunchang.kernels import AttnType

    set_seq_parallel_pg(plan.ulysses, plan.ring, rank, plan.world_size, use_ulysses_low=True)
    if device.type == "cuda":
        kind = AttnType.FA if importlib.util.find_spec("flash_attn") else AttnType.TORCH_EFFICIENT
    else:
        kind = AttnType.TORCH_MATH
    return LongContextAttention(ring_impl_type="basic", attn_type=kind)


class YunchangAttention:
    """Sequence-parallel self-attention by yunchang (xDiT's USP): the same Ulysses x ring split as
    ``SequenceParallelAttention``, with its kernels. It has no notion of padding, so the token count must
    divide into equal shards (true at the official sizes: 75,888 = 2^4 x 3^2 x 17 x 31)."""

    def __init__(self, ctx: ParallelContext, shard: TokenShard):
        if shard.padded != shard.tokens:
            raise ParallelError(
                f"yunchang attention needs the {shard.tokens} video tokens to split evenly over {shard.ranks} ranks; "
                "choose another process count or size, or the 'torch' sequence-parallel attention, which pads.")
        self.layer = ctx.usp

    def __call__(self, q, k, v, mask=None, transformer_options=None):
        if mask is not None:
            raise ParallelError("sequence-parallel self-attention takes no mask")
        # ours: [b, heads, tokens, d]; yunchang's: [b, tokens, heads, d]
        out = self.layer(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), softmax_scale=q.shape[-1] ** -0.5,
                         causal=False)
        return out.transpose(1, 2)


# ---- the DiT and the sampler ------------------------------------------------------------------------------


def branch_forward(dit: StepVideoDiT, ctx: ParallelContext, x: torch.Tensor, t: torch.Tensor,
                   text: TextConditioning, image: ImageCondition | None = None,
                   transformer_options: dict | None = None) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """(The DiT's output tokens ``[b, tokens, p*p*C]`` for this rank's branch, token grid), with the tokens
    split over the sequence group and gathered again, so every rank of the group holds all of them.

    ``transformer_options`` reaches every block as in ``StepVideoDiT.forward``; with sharded tokens it also
    carries ``step_cache.GROUP_MEAN_KEY``, so a step cache decides from statistics of all the tokens, the
    same decision on every rank of the group."""
    extra = image.dit_kwargs(x.shape[0]) if image is not None else {}
    tokens, context, embedded, grid = dit.prepare(x, t, **text.dit_kwargs(), **extra)
    if ctx.plan.sequence == 1:
        return dit.finish(dit.run_blocks(tokens, context, transformer_options), embedded), grid
    shard = TokenShard(tokens.shape[1], ctx.plan.sequence, ctx.sequence_rank)
    if ctx.plan.attention == "yunchang":
        attention = YunchangAttention(ctx, shard)
    else:
        attention = SequenceParallelAttention(ctx, shard, context.self_attention or context.attention)
    context = replace(context, rope=shard.rope(context.rope), self_attention=attention)
    options = {**(transformer_options or {}), GROUP_MEAN_KEY: ctx.sequence_mean}
    out = dit.finish(dit.run_blocks(shard.take(tokens), context, options), embedded)
    return shard.gather(out, ctx.sequence_group), grid


def parallel_velocity(dit: StepVideoDiT, ctx: ParallelContext, positive: TextConditioning,
                      negative: TextConditioning | None, cfg: float, image: ImageCondition | None = None,
                      transformer_options: dict | None = None):
    """A ``VelocityFn`` that gives the guided velocity on every rank; with guidance parallel this rank runs
    only its own branch (positive on guidance rank 0, negative on 1) and the branches are exchanged. An image
    condition (TI2V) goes to both branches and ``transformer_options`` to every call with ``"sigmas"`` set,
    as in ``pipeline.dit_velocity``."""
    guided = guidance_on(cfg, negative is not None)
    if ctx.plan.guidance == 2 and not guided:
        raise ParallelError("the plan splits guidance over ranks but sampling is unguided; choose the plan with "
                            "guided=False")
    if ctx.plan.guidance == 2:
        text = positive if ctx.guidance_rank == 0 else negative
    else:
        text = TextConditioning.cat([positive, negative]) if guided else positive
    text = text.to(device=ctx.device)
    if image is not None:
        image = ImageCondition(image.latents.to(ctx.device), image.motion_score)

    def call(x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int, int]]:
        options = None if transformer_options is None else {**transformer_options, "sigmas": 1 - t}
        return branch_forward(dit, ctx, x, t, text, image, options)

    def fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        x, t = x.to(ctx.device), t.to(ctx.device)
        if guided and ctx.plan.guidance == 1:
            out, grid = call(torch.cat([x, x]), torch.cat([t, t]))
            v_cond, v_uncond = dit.unpatchify(out, grid).float().chunk(2)
            return v_uncond + cfg * (v_cond - v_uncond)
        out, grid = call(x, t)
        v = dit.unpatchify(out, grid).float()
        if ctx.plan.guidance == 1:
            return v
        both = [torch.empty_like(v) for _ in range(2)]
        dist.all_gather(both, v.contiguous(), group=ctx.guidance_group)
        v_cond, v_uncond = both
        return v_uncond + cfg * (v_cond - v_uncond)

    return fn


def sample_latents(dit: StepVideoDiT, ctx: ParallelContext, positive: TextConditioning,
                   negative: TextConditioning | None, settings: GenerationSettings,
                   latents: torch.Tensor | None = None, callback: StepCallback | None = None,
                   noise: torch.Tensor | None = None, image: ImageCondition | None = None,
                   transformer_options: dict | None = None) -> torch.Tensor:
    """``pipeline.sample_latents`` split over the ranks, with the same arguments: the same seeded noise and
    schedule everywhere, the same fp32 latents ``[b, F, C, h, w]`` returned on every rank. ``latents`` and
    ``noise``, when given, must be the same on every rank; ``transformer_options`` (e.g. a step cache's, one per
    rank) gets the schedule as the pipeline sets it."""
    check_sampling_inputs(dit, positive, negative, settings, latents, image)
    shape = latent_shape(settings, dit.config.in_channels, positive.mask.shape[0]) if latents is None else latents.shape
    noise = make_noise(shape, settings.seed) if noise is None else noise
    guided = guidance_on(settings.cfg, negative is not None)
    sigmas = denoise_sigmas(settings.steps, settings.shift, settings.denoise)
    if transformer_options is not None:
        transformer_options = {**transformer_options, "sample_sigmas": 1 - sigmas}
    velocity = parallel_velocity(dit, ctx, positive, negative if guided else None, settings.cfg, image,
                                 transformer_options)
    return sample_euler(velocity, noise.to(ctx.device), sigmas,
                        latents=None if latents is None else latents.to(ctx.device), callback=callback,
                        compute_dtype=dit.compute_dtype, oom_advice=sampling_oom_advice(dit, tuple(shape)))


# ---- conditioning and decoding ------------------------------------------------------------------------------


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


# ---- weight sharding ------------------------------------------------------------------------------------------


def load_dit_sharded(path, ctx: ParallelContext, weight_dtype: torch.dtype = torch.bfloat16,
                     compute_dtype: torch.dtype | None = None, operations=None, **config_overrides) -> StepVideoDiT:
    """``load_dit`` straight into sharded blocks: the model is built and sharded on the meta device, then each
    rank reads the checkpoint one tensor at a time and keeps only its own rows of the block weights.

    Every transformer block is wrapped with FSDP2's ``fully_shard`` over all ranks (dim 0 of each tensor); the
    rest of the DiT (embeddings, projections: about 1% of it) is whole on every rank. A block gathers its
    weights just before it runs and frees them after (``reshard_after_forward``), so a rank holds 1/world of
    the blocks plus the block at hand. Host memory holds one tensor at a time, so four 24 GB GPUs on a 64 GB
    machine can load the 30B DiT in fp8, which neither fits one GPU nor four whole copies in host memory."""
    from torch.distributed.device_mesh import init_device_mesh  # FSDP2 is imported only when sharding
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    compute_dtype = resolve_compute_dtype(weight_dtype, compute_dtype)
    model, ckpt, key_map = open_dit_checkpoint(path, operations, **config_overrides)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    mapping = check_keys(ckpt, expected, DIT_NAME, key_map)
    dtypes = {}
    for name, param in list(model.named_parameters()):  # storage dtypes first: FSDP2 shards what it is given
        owner_name, _, attr = name.rpartition(".")
        owner = model.get_submodule(owner_name)
        dtypes[name] = storage_dtype(owner, attr, weight_dtype, compute_dtype)
        owner._parameters[attr] = torch.nn.Parameter(param.to(dtypes[name]), requires_grad=False)
    mesh = init_device_mesh(ctx.device.type, (ctx.plan.world_size,))
    for block in model.transformer_blocks:
        fully_shard(block, mesh=mesh, reshard_after_forward=True)
    model.to_empty(device=ctx.device)
    world, rank = ctx.plan.world_size, ctx.rank
    with torch.no_grad():
        for name, param in model.named_parameters():
            full = to_storage_dtype(ckpt.read(mapping[name]), dtypes[name])
            if isinstance(param, DTensor):
                rows = list(torch.chunk(full, world, dim=0))  # FSDP2's Shard(0): torch.chunk, empty at the end
                mine = rows[rank] if rank < len(rows) else full[:0]
                param.to_local().copy_(mine)
            else:
                param.copy_(full)
    model.compute_dtype = compute_dtype
    return model.eval()
