"""How ranks share one generation: the plan (guidance x ring x ulysses), this process's place in the
default process group, and the process groups of each split. See ``distributed/__init__.py`` for the overview."""

from __future__ import annotations

import importlib.util
import math
import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

SP_ATTENTION = ("torch", "yunchang")


class ParallelError(ValueError):
    """A parallel layout that cannot work; the message says which value and what to choose instead."""


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


def _my_group(groups: list[list[int]], rank: int, timeout: timedelta | None = None):
    """Create every group (a collective call: all ranks create all groups in the same order); return ours.
    ``timeout`` bounds each collective of the group (torch gives a new group its 30-minute default otherwise,
    whatever the default group's timeout)."""
    mine = None
    for ranks in groups:
        group = dist.new_group(ranks, timeout=timeout)
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
    def build(cls, plan: ParallelPlan, group: DistributedGroup, timeout: timedelta | None = None) -> ParallelContext:
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
        seq = _my_group([[g * p + s for s in range(p)] for g in range(g_n)], rank, timeout)
        guid = _my_group([[g * p + s for g in range(g_n)] for s in range(p)], rank, timeout)
        uly = _my_group([[g * p + r * u + i for i in range(u)] for g in range(g_n) for r in range(plan.ring)], rank, timeout)
        ring = _my_group([[g * p + r * u + i for r in range(plan.ring)] for g in range(g_n) for i in range(u)], rank, timeout)
        usp = _yunchang_attention(plan, rank, group.device) if plan.attention == "yunchang" else None
        return cls(plan, rank, group.device, rank // p, rank % p, seq, guid, uly, ring, usp)


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
