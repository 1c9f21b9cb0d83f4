"""Sequence, guidance and weight-sharded generation on gloo (CPU) against the one-process result.

Each world size is spawned once (module fixture) and runs every layout in one go, since starting processes
dominates the time; the tests then compare what the ranks returned with single-process sampling.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import save_file

from stepvideo_core import distributed as parallel  # the torchrun path under its old name
from stepvideo_core.attention import math_attention
from stepvideo_core.distributed import DistributedGroup, ParallelContext, ParallelError, ParallelPlan, TokenShard
from stepvideo_core.distributed.sequence import attention_with_lse
from stepvideo_core.dit import load_dit
from stepvideo_core.image_condition import ImageCondition
from stepvideo_core.pipeline import GenerationSettings, sample_latents
from stepvideo_core.step_cache import StepCache, StepCacheSettings
from stepvideo_core.text_encoding import TextConditioning
from tests.builders import small_dit, small_vae, text_inputs, vae_latents

CAPTION = (24, 12)
HAS_YUNCHANG = importlib.util.find_spec("yunchang") is not None
# 17 frames at 64x80: 3 x 4 x 5 = 60 latent tokens, which 2 and 3 ranks split unevenly once padded (60 = 2 x 30,
# and at 48x80: 3 x 3 x 5 = 45 = 3 x 15): both an even and an odd token count get used below.
SETTINGS = GenerationSettings(num_frames=17, height=64, width=80, steps=3, cfg=4.0, shift=5.0, seed=3)
ODD_SETTINGS = GenerationSettings(num_frames=17, height=48, width=80, steps=3, cfg=4.0, shift=5.0, seed=4)
CACHED = GenerationSettings(num_frames=17, height=64, width=80, steps=10, cfg=4.0, shift=5.0, seed=6)
CACHE = StepCacheSettings(threshold=1.0)
PARTIAL = GenerationSettings(num_frames=17, height=64, width=80, steps=2, cfg=4.0, shift=5.0, seed=5, denoise=0.5)


def reduced_dit(heads: int):
    return small_dit(heads=heads, head_dim=8, layers=2, channels=4, caption=CAPTION, seed=5)


def conditioning():
    llm, mask, clip = text_inputs(2, 320, CAPTION, (9, 4), seed=2)
    pos = TextConditioning(llm[:1], mask[:1], clip[:1])
    neg = TextConditioning(llm[1:], mask[1:], clip[1:])
    return pos, neg


def layouts(world: int, heads: int):
    """(name, plan) for every layout worth checking at this world size."""
    out = [("sequence", ParallelPlan.choose(world, heads, guided=True, guidance_parallel=False))]
    if world % 2 == 0:
        out.append(("guidance", ParallelPlan.choose(world, heads, guided=True, guidance_parallel=True)))
        if world >= 4:
            out.append(("both", ParallelPlan.choose(world, heads, guided=True)))
    out.append(("ring", ParallelPlan.choose(world, heads, guided=True, guidance_parallel=False, ulysses=1)))
    out.append(("sharded", ParallelPlan.choose(world, heads, guided=True, shard_weights=True)))
    out.append(("sharded-sequence", ParallelPlan.choose(world, heads, guided=True, guidance_parallel=False,
                                                        shard_weights=True)))
    return out


def _worker(rank: int, world: int, store: str, heads: int, results: str, dit_file: str):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    group = DistributedGroup(rank, world, torch.device("cpu"))
    pos, neg = conditioning()
    out = {}
    with torch.no_grad():
        for name, plan in layouts(world, heads):
            ctx = ParallelContext.build(plan, group)
            if plan.shard_weights:
                dit = parallel.load_dit_sharded(dit_file, ctx, weight_dtype=torch.float32)
            else:
                dit = reduced_dit(heads)
            got_pos, got_neg = parallel.broadcast_conditioning(pos if rank == 0 else None, neg if rank == 0 else None, ctx)
            for key, settings in (("even", SETTINGS), ("odd", ODD_SETTINGS)):
                out[f"{name}/{key}"] = parallel.sample_latents(dit, ctx, got_pos, got_neg, settings)
            out[f"{name}/plan"] = dataclasses.asdict(plan)  # plain values, so the results load with weights_only
            if name == "sequence":  # the other entry points of sample_latents: a start image (TI2V), partial denoise
                cache = StepCache(CACHE)  # and a step cache, which must take one decision on every rank
                out["cache"] = parallel.sample_latents(dit, ctx, got_pos, got_neg, CACHED,
                                                       transformer_options=cache.transformer_options(dit))
                out["cache/stats"] = (cache.stats.forward_passes, cache.stats.computed)
                out["ti2v"] = parallel.sample_latents(ti2v_dit(heads), ctx, got_pos, got_neg, SETTINGS, image=start_image())
                out["denoise"] = parallel.sample_latents(dit, ctx, got_pos, got_neg, PARTIAL, latents=start_latents())
        if HAS_YUNCHANG and heads % world == 0:  # xDiT's USP attention, where installed (Ulysses: exact on the CPU)
            plan = ParallelPlan.choose(world, heads, guided=True, guidance_parallel=False, attention="yunchang")
            out["yunchang"] = parallel.sample_latents(reduced_dit(heads), ParallelContext.build(plan, group), got_pos,
                                                      got_neg, SETTINGS)
        if HAS_YUNCHANG:
            ring = ParallelPlan.choose(world, heads, guided=False, ulysses=1, attention="yunchang")
            try:
                ParallelContext.build(ring, group)
            except ParallelError as e:
                out["yunchang/ring"] = str(e)
        # fp8 storage: FSDP2 gathers fp8 weights beside bf16 norms; compare one bf16 call with one process
        x, t = torch.randn(1, 3, 4, 4, 5, generator=torch.Generator().manual_seed(9)), torch.tensor([0.4])
        fp8 = parallel.load_dit_sharded(dit_file, ctx, weight_dtype=torch.float8_e4m3fn)
        wqkv = fp8.transformer_blocks[0].attn1.wqkv.weight
        out["fp8/shard"] = (tuple(wqkv.shape), tuple(wqkv.to_local().shape), wqkv.to_local().dtype)
        out["fp8"] = parallel.parallel_velocity(fp8, ctx, got_pos, None, 1.0)(x, t)
        out["fp8/single"] = load_dit(dit_file, weight_dtype=torch.float8_e4m3fn)(x, t, **got_pos.dit_kwargs()).float()
        # three chunks of 3 latents and a tail of 2, dealt out to the ranks; tiled on one layout
        z = vae_latents(n=11)
        out["decode"] = parallel.decode(small_vae(), z, ctx)
        out["decode/tiled"] = parallel.decode(small_vae(), z, ctx, tile_size=2, tile_overlap=1)
    torch.save(out, os.path.join(results, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


def run_world(world: int, heads: int) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        dit_file = os.path.join(tmp, "dit.safetensors")
        save_file(reduced_dit(heads).state_dict(), dit_file)
        mp.spawn(_worker, args=(world, os.path.join(tmp, "store"), heads, tmp, dit_file), nprocs=world, join=True)
        return [torch.load(os.path.join(tmp, f"rank{r}.pt"), weights_only=True) for r in range(world)]


def ti2v_dit(heads: int):
    return small_dit(heads=heads, head_dim=8, layers=2, channels=4, caption=CAPTION, seed=6,
                     use_additional_conditions=True)


def start_image() -> ImageCondition:
    latents = torch.zeros(1, 3, 4, 4, 5)
    latents[:, :1] = torch.randn(1, 1, 4, 4, 5, generator=torch.Generator().manual_seed(7))
    return ImageCondition(latents, motion_score=5.0)


def start_latents() -> torch.Tensor:
    return torch.randn(1, 3, 4, 4, 5, generator=torch.Generator().manual_seed(8))


def single_process(heads: int) -> dict:
    dit = reduced_dit(heads)
    pos, neg = conditioning()
    with torch.no_grad():
        out = {key: sample_latents(dit, pos, neg, s) for key, s in (("even", SETTINGS), ("odd", ODD_SETTINGS))}
        out["ti2v"] = sample_latents(ti2v_dit(heads), pos, neg, SETTINGS, image=start_image())
        out["denoise"] = sample_latents(dit, pos, neg, PARTIAL, latents=start_latents())
        cache = StepCache(CACHE)
        out["cache"] = sample_latents(dit, pos, neg, CACHED, transformer_options=cache.transformer_options(dit))
        out["cache/stats"] = (cache.stats.forward_passes, cache.stats.computed)
    return out


def assert_same(got: torch.Tensor, want: torch.Tensor, what: str):
    err = (got - want).abs().max().item()
    assert err <= 1e-5 * want.abs().max().item(), f"{what}: max |diff| {err:.3g} vs max |ref| {want.abs().max():.3g}"


@pytest.mark.slow
@pytest.mark.parametrize("world,heads", [(2, 4), (3, 6), (3, 4), (4, 4)])
def test_parallel_latents_equal_single_process(world, heads):
    ranks = run_world(world, heads)
    want = single_process(heads)
    names = {k.split("/")[0] for k in ranks[0] if k.endswith("/plan")}
    for name in names:
        for key in ("even", "odd"):
            for r, result in enumerate(ranks):
                assert_same(result[f"{name}/{key}"], want[key], f"{name} ({ParallelPlan(**result[f'{name}/plan']).describe()}) rank {r} {key}")
    for r, result in enumerate(ranks):
        passes, computed = result["cache/stats"]
        assert passes == CACHED.steps and computed < passes, "the cache skipped steps"
        assert result["cache/stats"] == ranks[0]["cache/stats"], "every rank took the same decisions"
        if result["cache/stats"] == want["cache/stats"]:  # statistics of sharded tokens may tip a decision
            assert_same(result["cache"], want["cache"], f"step cache rank {r}")
    for r, result in enumerate(ranks):
        if HAS_YUNCHANG:
            assert "needs a GPU" in result["yunchang/ring"]
            if heads % world == 0:
                assert_same(result["yunchang"], want["even"], f"yunchang Ulysses rank {r}")
        assert_same(result["ti2v"], want["ti2v"], f"TI2V rank {r}")
        assert_same(result["denoise"], want["denoise"], f"partial denoise rank {r}")
    for r, result in enumerate(ranks):
        fp8, single = result["fp8"], result["fp8/single"]
        assert (fp8 - single).abs().max() <= 2e-2 * single.abs().max(), f"fp8 sharded rank {r}"
        (rows, cols), local, dtype = result["fp8/shard"]
        assert local == (len(torch.arange(rows).chunk(world)[r]), cols) and dtype == torch.float8_e4m3fn, "1/world of the rows, in fp8"
    with torch.no_grad():
        z = vae_latents(n=11)
        whole, tiled = small_vae().decode(z), small_vae().decode(z, tile_size=2, tile_overlap=1)
    assert torch.equal(ranks[0]["decode"], whole) and torch.equal(ranks[0]["decode/tiled"], tiled)
    assert all(r["decode"] is None for r in ranks[1:]), "the video is gathered on rank 0 only"
    if world == 3 and heads == 4:
        assert ranks[0]["sequence/plan"]["ring"] == 3, "4 heads on 3 ranks cannot use Ulysses: the ring path ran"


def test_plan_prefers_guidance_then_ulysses_and_explains_bad_layouts():
    assert ParallelPlan.choose(8, 48, guided=True) == ParallelPlan(guidance=2, ring=1, ulysses=4)
    assert ParallelPlan.choose(8, 48, guided=False) == ParallelPlan(guidance=1, ring=1, ulysses=8)
    assert ParallelPlan.choose(6, 4, guided=False) == ParallelPlan(guidance=1, ring=3, ulysses=2)
    assert ParallelPlan.choose(5, 48, guided=True) == ParallelPlan(guidance=1, ring=5, ulysses=1)
    with pytest.raises(ParallelError, match="odd"):
        ParallelPlan.choose(3, 48, guided=True, guidance_parallel=True)
    with pytest.raises(ParallelError, match=r"choose one of \[1, 2\]"):
        ParallelPlan.choose(4, 6, guided=False, ulysses=4)


def test_token_shards_cover_the_sequence_once_and_pad_the_end():
    x = torch.arange(10.0).view(1, 10, 1)
    shards = [TokenShard(10, 4, i) for i in range(4)]
    assert [s.size for s in shards] == [3] * 4
    taken = torch.cat([s.take(x) for s in shards], dim=1)
    assert torch.equal(taken[0, :10, 0], torch.arange(10.0)) and torch.equal(taken[0, 10:, 0], torch.zeros(2))


def test_lse_merge_of_key_blocks_is_full_attention():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 7, 8, generator=g) for _ in range(3))
    o1, l1 = attention_with_lse(q, k[:, :, :4], v[:, :, :4], 4)
    o2, l2 = attention_with_lse(q, k[:, :, 4:], v[:, :, 4:], 3)
    lse = torch.logaddexp(l1, l2)
    merged = o1 * torch.exp(l1 - lse) + o2 * torch.exp(l2 - lse)
    torch.testing.assert_close(merged, math_attention(q, k, v), atol=1e-6, rtol=1e-5)


def test_shard_rows_are_fsdp2s_split():
    """The rows a rank loads (and a sharded weight patch writes) are torch.chunk's, which FSDP2's Shard(0) uses."""
    from stepvideo_core.distributed.sharding import shard_rows

    for rows in (1, 3, 4, 5, 7, 64):
        for world in (1, 2, 3, 4):
            full = torch.arange(rows)
            chunks = list(torch.chunk(full, world))
            for rank in range(world):
                want = chunks[rank] if rank < len(chunks) else full[:0]
                assert torch.equal(full[shard_rows(rows, rank, world)], want), (rows, world, rank)
