"""Several GPUs: communication per denoising step, measured collective times, expected speedups, memory per GPU.

    python bench/bench_parallel.py                 # all four tables (the gloo measurement takes about a minute)
    python bench/bench_parallel.py --skip-measure  # the model-only tables

The figures are for the official request, 992x544, 204 frames: 36 x 34 x 62 = 75,888 video tokens, width 6144,
48 blocks, bf16 activations, 50 steps with guidance. All numbers are per rank.

1. Volume: what ``stepvideo_core/distributed`` sends per step. Ulysses (degree U, per block) all-to-alls q, k, v and the
   attention output: 4 x (tokens/P) x 6144 x 2 bytes x (U-1)/U leave each rank; ring (degree R) passes R-1
   key/value blocks of 2 x (tokens/P) x 6144 x 2 bytes; guidance parallel exchanges the velocity once per step;
   the final gather of the sequence shards moves the 64-channel output. Without guidance parallel the guided
   call has batch 2, doubling the activation traffic. FSDP2 sharding gathers every block's weights once per step.
2. Measured: all_to_all_single and all_gather on gloo (CPU, this machine) for 2, 4 and 8 processes, fitted to
   time = latency + bytes sent per rank / bandwidth; then ``stepvideo_core/distributed``'s own Ulysses exchange for one block
   (the two all-to-alls with their reshapes, no attention) against what the fit predicts for its bytes.
3. Expected speedup = T1 / (T1 / N + communication), with T1 the one-GPU step time from the FLOP count at a
   stated throughput, and communication = volume / link bandwidth, not overlapped with compute (our Ulysses
   all-to-alls are synchronous; FSDP2 prefetches the next block's weights, so the weight gather is shown apart).
   Stated links: NVLink (H100/H800 SXM, 8 GPUs): 300 GB/s all-to-all per GPU; PCIe 4.0 x16 without NVLink:
   20 GB/s; and the effective bandwidth of the exchange measured in step 2 (what gloo over shared memory on this
   machine would give). Beside: xDiT's published speedups (1.97x / 3.7x / 7.1x on 2 / 4 / 8 GPUs) and the official
   743 s on 4 GPUs.
4. Memory per GPU by mode: weights (29.34 B parameters; 604 M per block; sharded: 1/world of the blocks plus
   two whole ones, the block at hand and the one FSDP2 prefetches) plus activations: the peak rise while the
   blocks run, measured on the CPU in copies of the blocks' input (one block, width 512, 8,192 tokens), times the
   rank's tokens x 6144 x 2 bytes per row of the DiT batch. A GPU's attention kernel may keep less.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.measure import PeakRSS, emit, run_variant  # noqa: E402

TOKENS = 36 * 34 * 62  # 75,888
WIDTH = 6144
HEADS = 48
LAYERS = 48
OUT_CHANNELS = 64
TEXT_KEYS = 397
STEPS = 50
BF16 = 2
BLOCK_PARAMS = 16 * WIDTH * WIDTH  # wqkv 3, wo 1, cross wq 1 + wkv 2 + wo 1, feed-forward 8 (x D^2)
DIT_PARAMS = 29_342_478_400  # the release's state dict (tests/test_dit.py counts it)
LINKS = {"NVLink": 300e9, "PCIe 4.0": 20e9}
GPU_FLOPS = 400e12  # stated: bf16 throughput a 30B DiT reaches on an H100/H800 (about 40% of the dense peak)
XDIT = {2: 1.97, 4: 3.7, 8: 7.1}
OFFICIAL_4GPU_S = 743.0


def step_flops() -> float:
    """FLOPs of one guided step (two branches): 28 D^2 per token for the projections and feed-forward, 4 N^2 D for
    self-attention, 4 N L D for cross-attention, per block."""
    per_block = 28 * TOKENS * WIDTH**2 + 4 * TOKENS**2 * WIDTH + 4 * TOKENS * TEXT_KEYS * WIDTH
    return 2 * LAYERS * per_block


def layouts(n: int) -> list[tuple[str, int, int, int]]:
    """(name, guidance, ring, ulysses) for n GPUs, as ``ParallelPlan.choose`` would pick them (48 heads)."""
    from math import gcd

    out = [("Ulysses", 1, 1, gcd(HEADS, n))]
    if n % 2 == 0:
        out.append(("guidance x Ulysses", 2, 1, gcd(HEADS, n // 2)))
    out.append(("ring", 1, n, 1))
    return out


def step_volume(guidance: int, ring: int, ulysses: int) -> float:
    """Bytes one rank sends per guided step for activations (sequence and guidance parallel)."""
    p = ring * ulysses
    batch = 1 if guidance == 2 else 2
    shard = TOKENS / p * WIDTH * BF16 * batch
    per_block = 4 * shard * (ulysses - 1) / ulysses + (ring - 1) * 2 * shard
    gather = TOKENS * OUT_CHANNELS * BF16 * batch * (p - 1) / p if p > 1 else 0.0
    velocity = TOKENS * OUT_CHANNELS * 4 if guidance == 2 else 0.0  # fp32, one exchange per step
    return LAYERS * per_block + gather + velocity


def weight_volume(world: int, weight_bytes: int) -> float:
    """Bytes one rank receives per step when the blocks are sharded over ``world`` ranks (one DiT call per step)."""
    return LAYERS * BLOCK_PARAMS * weight_bytes * (world - 1) / world


# ---- the gloo measurement --------------------------------------------------------------------------------------


def best_time(op, barrier, repeats: int = 5) -> float:
    """Fastest of ``repeats`` synchronised runs after a warm-up: the machine is shared, so the minimum is the
    figure least disturbed by other work."""
    op()
    times = []
    for _ in range(repeats):
        barrier()
        t0 = time.perf_counter()
        op()
        barrier()
        times.append(time.perf_counter() - t0)
    return min(times)


def _measure(rank: int, world: int, store: str, sizes: list[int], out: str) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    rows = []
    for size in sizes:
        x = torch.ones(size // 4, dtype=torch.float32)  # ``size`` bytes per rank
        y = torch.empty_like(x)
        parts = [torch.empty(size // 4 // world) for _ in range(world)]
        piece = torch.ones(size // 4 // world)
        ops = (("all_to_all", dist.all_to_all_single, (y, x), size * (world - 1) / world),
               ("all_gather", dist.all_gather, (parts, piece), size / world * (world - 1)))
        for name, collective, operands, sent in ops:
            def op(collective=collective, operands=operands):
                collective(*operands)

            rows.append({"op": name, "bytes": sent, "s": best_time(op, dist.barrier)})
    if HEADS % world == 0:  # the real exchange: the distributed package's Ulysses attention on a 1/32 slice of the tokens
        from stepvideo_core.distributed import (
            DistributedGroup,
            ParallelContext,
            ParallelPlan,
            SequenceParallelAttention,
            TokenShard,
        )

        ctx = ParallelContext.build(ParallelPlan(ulysses=world), DistributedGroup(rank, world, torch.device("cpu")))
        shard = TokenShard(TOKENS // 32, world, rank)
        attention = SequenceParallelAttention(ctx, shard, inner=lambda q, k, v, mask, options: v)  # no compute: exchange only
        q = torch.ones(1, HEADS, shard.size, WIDTH // HEADS, dtype=torch.bfloat16)
        rows.append({"op": "ulysses_block", "bytes": 4 * q.numel() * BF16 * (world - 1) / world,
                     "s": best_time(lambda: attention(q, q, q), dist.barrier),
                     "copy_s": best_time(lambda: torch.stack([q, q, q]), dist.barrier)})  # one q/k/v-sized copy
    if rank == 0:
        Path(out).write_text(json.dumps(rows))
    dist.destroy_process_group()


def measure_gloo(world: int, sizes: list[int]) -> list[dict]:
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "rows.json")
        mp.spawn(_measure, args=(world, os.path.join(tmp, "store"), sizes, out), nprocs=world, join=True)
        return json.loads(Path(out).read_text())


def fit(rows: list[dict]) -> tuple[float, float]:
    """Least squares time = latency + bytes / bandwidth with latency >= 0; returns (latency s, bandwidth B/s)."""
    n = len(rows)
    xs, ys = [r["bytes"] for r in rows], [r["s"] for r in rows]
    mx, my = sum(xs) / n, sum(ys) / n
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    if my - slope * mx < 0:  # a negative latency fits noise: refit through the origin
        return 0.0, sum(x * x for x in xs) / sum(x * y for x, y in zip(xs, ys))
    return my - slope * mx, 1 / slope


# ---- tables ---------------------------------------------------------------------------------------------------


def gb(x: float) -> str:
    return f"{x / 1e9:.2f}" if x < 1e9 else f"{x / 1e9:.1f}"


def volume_table() -> None:
    print("\n### Communication per guided step, per rank (992x544x204, 75,888 tokens)\n")
    print("| GPUs | layout | activations (GB) | FSDP2 weight gather, fp8 / bf16 (GB) |")
    print("|---|---|---|---|")
    for n in (2, 4, 8):
        for name, g, r, u in layouts(n):
            print(f"| {n} | {name} ({g}x{r}x{u}) | {gb(step_volume(g, r, u))} | "
                  f"{gb(weight_volume(n, 1))} / {gb(weight_volume(n, 2))} |")


def speedup_table(gloo_bandwidth: dict[int, float]) -> None:
    """``gloo_bandwidth``: bytes per second of the distributed package's Ulysses exchange measured here, per process count."""
    t1 = step_flops() / GPU_FLOPS
    print(f"\n### Expected speedup (T1 = {step_flops():.3g} FLOPs / {GPU_FLOPS / 1e12:.0f} TFLOP/s = {t1:.1f} s per "
          f"step on one GPU, {STEPS * t1:.0f} s for {STEPS} steps; communication = volume / link bandwidth)\n")
    links = list(LINKS)
    head = " | ".join(f"{link} ({LINKS[link] / 1e9:.0f} GB/s): step, speedup" for link in links)
    print(f"| GPUs | layout | {head} | at the exchange bandwidth measured here on gloo | xDiT (NVLink) |")
    print("|---|---|" + "---|" * len(links) + "---|---|")
    for n in (2, 4, 8):
        for name, g, r, u in layouts(n):
            vol = step_volume(g, r, u)
            cells = [f"{t1 / n + vol / LINKS[link]:.2f} s, {t1 / (t1 / n + vol / LINKS[link]):.2f}x" for link in links]
            if n in gloo_bandwidth:
                step = t1 / n + vol / gloo_bandwidth[n]
                cells.append(f"{gloo_bandwidth[n] / 1e9:.2f} GB/s: {step:.1f} s, {t1 / step:.2f}x")
            else:
                cells.append("-")
            print(f"| {n} | {name} | {' | '.join(cells)} | {XDIT[n]}x |")
    four = t1 / 4 + step_volume(2, 1, 2) / LINKS["NVLink"]
    print(f"\n4 GPUs, guidance x Ulysses on NVLink: {STEPS * four:.0f} s of DiT time for {STEPS} steps "
          f"(official, xDiT on 4 GPUs, whole run with text encoding and decoding: {OFFICIAL_4GPU_S:.0f} s). FSDP2's "
          "weight gather (first table) overlaps with compute: at 4 GPUs on PCIe, fp8, "
          f"{weight_volume(4, 1) / LINKS['PCIe 4.0']:.1f} s per step against {t1 / 4:.1f} s of compute.")


def activation_copies(ff_chunk_size: int) -> float:
    """Peak rise of resident memory while the blocks run, in copies of the blocks' input ``[b, tokens, width]``:
    measured here on the CPU with one block at width 512 over 8,192 tokens (fp32); run it in a fresh process
    (``run_variant``), since memory a process has freed still counts as resident."""
    import torch

    from stepvideo_core.dit import DiTConfig, StepVideoDiT

    cfg = DiTConfig(num_attention_heads=4, attention_head_dim=128, in_channels=16, out_channels=16, num_layers=1,
                    caption_channels=(128, 128), ff_chunk_size=ff_chunk_size)
    torch.manual_seed(0)
    dit = StepVideoDiT(cfg).eval()
    x = torch.randn(1, 4, 16, 32, 64)  # 4 x 32 x 64 = 8,192 tokens
    with torch.no_grad():
        tokens, context, _, _ = dit.prepare(x, torch.tensor([0.5]), torch.randn(1, 320, 128), torch.ones(1, 397),
                                            torch.randn(1, 77, 128))
        dit.run_blocks(tokens, context)  # warm-up: the allocator's pools exist before the measured run
        with PeakRSS() as peak:
            dit.run_blocks(tokens, context)
    return peak.peak_delta / (tokens.numel() * tokens.element_size())


def memory_table(frames: int = 204) -> dict:
    """Weights (exact) and activations (measured copies x the rank's tokens) per GPU; returns the copy counts."""
    copies = {chunked: run_variant(__file__, str(1024 if chunked else 0))["copies"]
              for chunked in (False, True)}
    nonblock = DIT_PARAMS - LAYERS * BLOCK_PARAMS

    def act(tokens: int, p: int, batch: int, chunked: bool) -> float:
        return copies[chunked] * tokens * WIDTH * BF16 * batch / p

    def weights(n: int, sharded: bool, nbytes: int) -> float:
        return (LAYERS * BLOCK_PARAMS / n + 2 * BLOCK_PARAMS + nonblock) * nbytes if sharded else DIT_PARAMS * nbytes

    print(f"\n### Memory per GPU at 992x544x204 (weights exact; activations = {copies[False]:.1f} copies of the rank's "
          f"hidden states, {copies[True]:.1f} with --ff-chunk-size, as measured on the CPU for one block)\n")
    print("| GPUs | mode | DiT fp8 (GB) | DiT bf16 (GB) | activations (GB), ff chunked |")
    print("|---|---|---|---|---|")
    for n in (1, 2, 4, 8):
        modes = [("one GPU", 1, 1, False)] if n == 1 else [
            ("Ulysses", 1, n, False), ("guidance x Ulysses", 2, n // 2, False),
            ("guidance x Ulysses + sharded weights", 2, n // 2, True)]
        for name, g, p, sharded in modes:
            batch = 1 if g == 2 else 2
            print(f"| {n} | {name} | {gb(weights(n, sharded, 1))} | {gb(weights(n, sharded, 2))} | "
                  f"{gb(act(TOKENS, p, batch, False))}, {gb(act(TOKENS, p, batch, True))} |")
    print("\n### Suggested setups: DiT + activations + 2 GB (CUDA context, VAE tiles) per GPU\n")
    print("| GPUs | weights | frames | sharded | ff chunked | per GPU (GB) |")
    print("|---|---|---|---|---|---|")
    for n, nbytes, frames_, sharded, chunked in ((2, 1, 204, True, True), (2, 1, 136, True, True),
                                                  (2, 1, 102, True, True), (4, 1, 204, True, False),
                                                  (4, 1, 204, True, True), (2, 2, 204, False, False),
                                                  (8, 2, 204, False, False)):
        tokens = (frames_ // 17 * 3) * 34 * 62
        total = weights(n, sharded, nbytes) + act(tokens, n // 2, 1, chunked) + 2e9
        print(f"| {n} | {'fp8' if nbytes == 1 else 'bf16'} | {frames_} | {sharded} | {chunked} | {gb(total)} |")
    return copies


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--skip-measure", action="store_true", help="model-only tables (no gloo processes)")
    p.add_argument("--worlds", default="2,4,8")
    p.add_argument("--child", type=int, help=argparse.SUPPRESS)  # one activation measurement (ff chunk size)
    args = p.parse_args()
    if args.child is not None:
        emit({"copies": activation_copies(args.child)})
        return
    volume_table()
    exchange_bandwidth: dict[int, float] = {}
    if not args.skip_measure:
        print("\n### Measured on gloo (CPU, this machine; best of 5): time = latency + bytes sent per rank / bandwidth\n")
        print("| processes | collective | latency (ms) | bandwidth (GB/s) | bytes per rank: time (ms) |")
        print("|---|---|---|---|---|")
        exchanges = []
        for world in map(int, args.worlds.split(",")):
            rows = measure_gloo(world, [2**20, 4 * 2**20, 16 * 2**20, 32 * 2**20])
            fits = {}
            for op in ("all_to_all", "all_gather"):
                mine = [r for r in rows if r["op"] == op]
                fits[op] = fit(mine)
                points = ", ".join(f"{r['bytes'] / 2**20:.1f} MiB: {1e3 * r['s']:.1f}" for r in mine)
                print(f"| {world} | {op} | {1e3 * fits[op][0]:.2f} | {fits[op][1] / 1e9:.2f} | {points} |")
            for r in rows:
                if r["op"] == "ulysses_block":
                    latency, bandwidth = fits["all_to_all"]
                    exchanges.append((world, r, 2 * latency + r["bytes"] / bandwidth))  # two all-to-alls per block
                    exchange_bandwidth[world] = r["bytes"] / r["s"]
        print("\n### the distributed package's Ulysses exchange for one block at 1/32 of the tokens (bf16), against the fit\n")
        print("| processes | bytes sent per rank (MiB) | measured (ms) | predicted by the all-to-all fit (ms) | "
              "one q/k/v-sized memory copy here (ms) | effective bandwidth (GB/s) |")
        print("|---|---|---|---|---|---|")
        for world, r, predicted in exchanges:
            print(f"| {world} | {r['bytes'] / 2**20:.1f} | {1e3 * r['s']:.1f} | {1e3 * predicted:.1f} | "
                  f"{1e3 * r['copy_s']:.1f} | {exchange_bandwidth[world] / 1e9:.2f} |")
        print("\nThe exchange also reorders q/k/v and the output (about four copies of that size per block); on this "
              "shared CPU a copy runs at a few hundred MB/s, on a GPU at its memory bandwidth (TB/s), where the link "
              "is what counts, so the speedups below use the link model.")
    speedup_table(exchange_bandwidth)
    memory_table()


if __name__ == "__main__":
    main()
