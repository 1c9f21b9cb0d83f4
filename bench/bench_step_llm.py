"""Step-LLM encode time and peak memory at 320 tokens, and our grouped sqrt-ALiBi attention vs a naive full-bias one.

Run: ``python bench/bench_step_llm.py`` (defaults: 2 layers at the full 6144 width, batch 1, fp32 on CPU; pass
``--device cuda --dtype bfloat16`` on a GPU). Each measurement runs in a fresh subprocess so peak memory is its own:
on CPU the peak resident-set growth over the process's state just before the measured call, on CUDA
``max_memory_allocated`` growth. The vocabulary is cut to 1024 rows: the embedding lookup costs nothing, and
the release's 65536-row table would only add constant memory.
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from stepvideo_core.step_llm import StepLLM, StepLLMConfig, alibi_slopes, grouped_causal_attention, relative_distance  # noqa: E402


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class Meter:
    def __init__(self, device: torch.device):
        self.device = device

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            self.base = rss_bytes()
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() - self.base
        else:
            self.peak = max(0, peak_rss_bytes() - self.base)
        self.seconds = time.perf_counter() - self.t0


def naive_attention(q, k, v, slopes):
    """What the shortcut avoids: K/V copied out to every head and one [H, L, L] bias for all heads at once."""
    heads, length = q.shape[1], q.shape[2]
    per = heads // k.shape[1]
    k = k.repeat_interleave(per, dim=1).float()
    v = v.repeat_interleave(per, dim=1).float()
    pos = torch.arange(length, device=q.device, dtype=torch.float32)
    dist = (pos[:, None] - pos[None, :]).clamp(min=0).sqrt()
    bias = -slopes[:, None, None] * dist
    bias = bias.masked_fill(torch.ones(length, length, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
    scores = q.float() @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]) + bias
    return (scores.softmax(-1) @ v).to(q.dtype)


def part_encode(args, device, dtype) -> dict:
    cfg = StepLLMConfig(num_layers=args.layers, hidden_size=args.width, num_attention_heads=args.width // 128,
                        num_attention_groups=args.width // 768, ffn_hidden_size=args.width * 16896 // 6144, vocab_size=1024)
    with torch.device("meta"):
        model = StepLLM(cfg, dtype=dtype)
    model = model.to_empty(device=device)
    with torch.no_grad():
        for p in model.parameters():
            p.uniform_(-1 / math.sqrt(p.shape[-1]), 1 / math.sqrt(p.shape[-1]))
    model.compute_dtype = dtype
    ids = torch.randint(3, 1024, (args.batch, args.tokens), device=device)
    with torch.no_grad():
        model(ids[:, :16])  # warm-up: kernels, thread pool
        with Meter(device) as m:
            out = model(ids)
    params = sum(p.numel() for p in model.parameters())
    return dict(seconds=m.seconds, peak_bytes=m.peak, params=params, weight_bytes=params * dtype.itemsize,
                finite=bool(torch.isfinite(out).all()))


def part_attention(args, device, dtype, which: str) -> dict:
    heads, groups, d = args.width // 128, args.width // 768, 128
    torch.manual_seed(0)
    q = torch.randn(args.batch, heads, args.tokens, d, device=device, dtype=dtype)
    k = torch.randn(args.batch, groups, args.tokens, d, device=device, dtype=dtype)
    v = torch.randn(args.batch, groups, args.tokens, d, device=device, dtype=dtype)
    slopes = alibi_slopes(heads).to(device=device, dtype=torch.float32)

    def ours():
        return grouped_causal_attention(q, k, v, relative_distance(args.tokens, "sqrt_alibi", device), slopes)

    fn = ours if which == "ours" else (lambda: naive_attention(q, k, v, slopes))
    with torch.no_grad():
        ref = fn()
        for _ in range(2):  # the first calls pay for allocator and thread-pool warm-up
            fn()
        with Meter(device) as m:
            for _ in range(args.repeats):
                out = fn()
    other = naive_attention(q, k, v, slopes) if which == "ours" else ref
    return dict(seconds=m.seconds / args.repeats, peak_bytes=m.peak,
                max_abs_diff_vs_naive=float((out.float() - other.float()).abs().max()))


def run_part(name: str, argv: list[str]) -> dict:
    out = subprocess.run([sys.executable, __file__, "--part", name, *argv], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--width", type=int, default=6144, help="a multiple of 768 (128-wide heads, 6 per group)")
    ap.add_argument("--tokens", type=int, default=320)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch default)")
    ap.add_argument("--part", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    if args.part:
        result = part_encode(args, device, dtype) if args.part == "encode" else part_attention(args, device, dtype, args.part)
        print(json.dumps(result))
        return

    argv = [a for a in sys.argv[1:]]
    mib = 2**20
    print(f"Step-LLM bench: {args.layers} layers x {args.width} wide, {args.tokens} tokens, batch {args.batch}, "
          f"{args.dtype} on {args.device} ({torch.get_num_threads()} threads), torch {torch.__version__}")
    enc = run_part("encode", argv)
    per_layer = enc["seconds"] / args.layers
    print(f"  encode: {enc['seconds']:.2f} s ({per_layer:.2f} s/layer -> ~{per_layer * 48:.0f} s for all 48 layers), "
          f"weights {enc['weight_bytes'] / mib:.0f} MiB, peak activation growth {enc['peak_bytes'] / mib:.0f} MiB, "
          f"finite={enc['finite']}")
    ours = run_part("ours", argv)
    naive = run_part("naive", argv)
    print(f"  attention, one layer ({args.width // 128} heads / {args.width // 768} groups), mean of {args.repeats}:")
    print(f"    ours  (per-group bias, shared sqrt-distance): {ours['seconds'] * 1e3:.1f} ms, peak {ours['peak_bytes'] / mib:.1f} MiB, "
          f"max|ours - naive| = {ours['max_abs_diff_vs_naive']:.2e}")
    print(f"    naive (full [H,L,L] bias, K/V repeated):      {naive['seconds'] * 1e3:.1f} ms, peak {naive['peak_bytes'] / mib:.1f} MiB")
    print(f"    ratio ours/naive: time {ours['seconds'] / naive['seconds']:.2f}x, "
          f"peak memory {ours['peak_bytes'] / max(naive['peak_bytes'], 1):.2f}x")


if __name__ == "__main__":
    main()
