"""Sequence parallel: token shards, sequence-parallel self-attention (Ulysses all-to-all, ring attention, or
yunchang's USP kernels) and the DiT forward over sharded tokens (``branch_forward``)."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.distributed as dist

from ..attention import AttentionFn
from ..dit import Rope3D, StepVideoDiT
from ..image_condition import ImageCondition
from ..step_cache import GROUP_MEAN_KEY
from ..text_encoding import TextConditioning
from .plan import ParallelContext, ParallelError


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


def _all_to_all(x: torch.Tensor, group) -> torch.Tensor:
    """Exchange ``x[i]`` (leading dim = group size) with rank i of ``group``; returns what each rank sent us."""
    x = x.contiguous()
    out = torch.empty_like(x)  # after contiguous(): empty_like keeps a permuted input's strides
    dist.all_to_all_single(out, x, group=group)
    return out


def attention_with_lse(q, k, v, valid_keys: int, query_chunk: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
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
            o, s = attention_with_lse(q, kv[0], kv[1], valid)
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
    # a caller's own statistic wins (the Ray ranks average over every rank when the batch is split, too)
    options = {GROUP_MEAN_KEY: ctx.sequence_mean, **(transformer_options or {})}
    out = dit.finish(dit.run_blocks(shard.take(tokens), context, options), embedded)
    return shard.gather(out, ctx.sequence_group), grid
