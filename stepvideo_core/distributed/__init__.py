"""One generation split over several processes with torch.distributed: launched by ``torchrun`` (the command
line) or as Ray actors (``engine.py``, what ComfyUI uses).

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

Modules: ``plan`` (the layout and its process groups), ``sequence`` (token shards, sequence-parallel attention,
the forward over shards), ``guidance`` (the guidance split and the sampler), ``exchange`` (conditioning broadcast,
distributed decoding), ``sharding`` (FSDP2 loading). The names below are re-exported here.
"""

from .exchange import broadcast_conditioning, broadcast_image_condition, decode
from .guidance import parallel_velocity, sample_latents
from .plan import (
    SP_ATTENTION,
    DistributedGroup,
    ParallelContext,
    ParallelError,
    ParallelPlan,
    init_from_environment,
)
from .sequence import SequenceParallelAttention, TokenShard, YunchangAttention, branch_forward, ring_attention
from .sharding import load_dit_sharded

__all__ = [
    "SP_ATTENTION", "DistributedGroup", "ParallelContext", "ParallelError", "ParallelPlan", "SequenceParallelAttention",
    "TokenShard", "YunchangAttention", "branch_forward", "broadcast_conditioning", "broadcast_image_condition", "decode", "init_from_environment",
    "load_dit_sharded", "parallel_velocity", "ring_attention", "sample_latents",
]
