"""Projected GPU memory of LoRA training on the 30B release (a plan from formulas, not a measurement).

    python bench/train_lora_memory_plan.py

Per GPU: the frozen DiT's weights (bf16 2 bytes, fp8 1 byte per weight; under torchrun with FSDP2 sharding,
1/N of the blocks plus the block being gathered), the adapters in fp32 with their gradients and AdamW's two
moments (16 bytes per adapter weight), and the activations autograd keeps for the backward pass. Those are
estimated in units of one activation (tokens x 6144 x 2 bytes): with gradient checkpointing, each block's input
(1 unit) for all 48 blocks plus one block's saved tensors while it is recomputed; without it, every block's saved
tensors. A block's saved tensors are counted from dit.py: the normed and modulated input (2), fused qkv (3),
roped q and k (2), the attention output and the output projection's input (2), the cross-attention's input,
queries and output (3), the feed-forward's input, up-projection and GELU output (1 + 4 + 4): 21 units. The peak
of the forward itself is ``memory.dit_activation_bytes`` (measured within 20% by bench_memory_plan.py).
"""

from __future__ import annotations

import torch

from stepvideo_core.dit import DiTConfig
from stepvideo_core.lora import TARGET_MODULES
from stepvideo_core.memory import dit_activation_bytes
from stepvideo_core.video_shape import latent_frames

RELEASE = DiTConfig()  # 48 blocks, 48 heads x 128
SAVED_UNITS_PER_BLOCK = 21
GIB = 1024**3


def dit_weights(config: DiTConfig) -> int:
    d = config.inner_dim
    per_block = (3 + 1 + 1 + 2 + 1 + 4 + 4) * d * d  # wqkv, wo, cross wq, wkv, wo, ff up, ff down
    return config.num_layers * per_block + 600_000_000  # embeddings, caption and time projections (about 0.6 B)


def lora_weights(config: DiTConfig, rank: int) -> int:
    d = config.inner_dim
    shapes = {"attn1.wqkv": (d, 3 * d), "attn1.wo": (d, d), "attn2.wq": (d, d), "attn2.wkv": (d, 2 * d),
              "attn2.wo": (d, d), "ff.net.0.proj": (d, 4 * d), "ff.net.2": (4 * d, d)}
    return config.num_layers * rank * sum(sum(shapes[t]) for t in TARGET_MODULES)


def plan(width: int, height: int, frames: int, rank: int, weight_bytes: int, gpus: int, checkpointing: bool) -> dict:
    tokens = latent_frames(frames) * (height // 16) * (width // 16)
    unit = tokens * RELEASE.inner_dim * 2
    weights = dit_weights(RELEASE) * weight_bytes
    if gpus > 1:  # FSDP2: a shard of the blocks plus one gathered block
        block = weights / RELEASE.num_layers
        weights = weights / gpus + block
    adapters = lora_weights(RELEASE, rank) * 16
    forward_peak = dit_activation_bytes(RELEASE, 1, tokens, torch.bfloat16,
                                        weight_dtype=torch.float8_e4m3fn if weight_bytes == 1 else None)
    kept = (RELEASE.num_layers * unit + SAVED_UNITS_PER_BLOCK * unit) if checkpointing else \
        RELEASE.num_layers * SAVED_UNITS_PER_BLOCK * unit
    total = weights + adapters + kept + forward_peak
    return {"tokens": tokens, "weights": weights / GIB, "adapters": adapters / GIB, "activations": (kept + forward_peak) / GIB,
            "total": total / GIB}


def main() -> None:
    print("| size (w x h x frames) | tokens | base | GPUs | grad. ckpt | weights | LoRA + AdamW | activations | total (GiB, projected) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for (w, h, f) in ((544, 320, 51), (992, 544, 51), (992, 544, 102), (992, 544, 204)):
        for weight_bytes, gpus, ckpt in ((1, 1, True), (2, 1, True), (2, 4, True), (1, 1, False)):
            r = plan(w, h, f, 32, weight_bytes, gpus, ckpt)
            print(f"| {w}x{h}x{f} | {r['tokens']:,} | {'fp8' if weight_bytes == 1 else 'bf16'} | {gpus} | "
                  f"{'on' if ckpt else 'off'} | {r['weights']:.1f} | {r['adapters']:.1f} | {r['activations']:.1f} | "
                  f"**{r['total']:.1f}** |")
    print(f"\nrank 32: {lora_weights(RELEASE, 32) / 1e6:.0f} M adapter weights; DiT {dit_weights(RELEASE) / 1e9:.1f} B")


if __name__ == "__main__":
    main()
