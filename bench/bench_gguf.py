"""GGUF figures, measured on this machine's CPU (no GPU figures here: see bench/gpu_figures.py's gguf section).

    python bench/bench_gguf.py dequant [--width 6144 --tokens 256 2048]   # per-layer dequantization overhead
    python bench/bench_gguf.py tiny                                     # Step-Video-Tiny: size, load RAM, PSNR, oracle
    python bench/bench_gguf.py convert [--width 6144 --layers 1]        # the converter's peak RAM

- dequant: one Linear of [width, width] (and the feed-forward's [4 width, width]) on ``tokens`` tokens, fp32
  weights against Q8_0 and Q4_0 weights dequantized in the forward (to fp32 on the CPU), median of 3 runs, side by
  side in one process; the figure is the ratio of the GGUF layer's time to the fp32 layer's.
- tiny: the shipped Step-Video-Tiny DiT converted to Q8_0 and Q4_0 in a temporary folder; size on disk, peak
  resident memory while ``load_dit`` runs (a fresh process per format), and for held-out prompts with the same
  seeds: PSNR of the decoded frames against the fp32 DiT's and the oracle's colour/shape/motion accuracy.
- convert: a bf16 DiT checkpoint of full width and reduced depth (random weights) converted to Q8_0 in a fresh
  process; peak resident memory over the interpreter's, against the largest tensor's size.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.measure import PeakRSS, emit, mib, run_variant, timed  # noqa: E402

SCRIPT = str(Path(__file__).resolve())


def bench_dequant(args) -> None:
    import torch
    import torch.nn.functional as F

    from stepvideo_core import gguf_quant

    torch.manual_seed(0)
    for rows in (args.width, 4 * args.width):
        shape = (rows, args.width)
        weight = torch.randn(shape) / args.width**0.5
        raws = {q: torch.from_numpy(gguf_quant.quantize(weight, gguf_quant.Q[q])) for q in ("Q8_0", "Q4_0")}
        for tokens in args.tokens:
            x = torch.randn(tokens, args.width)
            base = timed(lambda x=x, weight=weight: F.linear(x, weight))
            line = [f"{list(shape)} x {tokens} tokens: fp32 {base * 1e3:.1f} ms"]
            for q, raw in raws.items():
                qtype = gguf_quant.Q[q]
                t = timed(lambda x=x, raw=raw, qtype=qtype, shape=shape:
                          F.linear(x, gguf_quant.dequantize(raw, qtype, shape)))
                dq = timed(lambda raw=raw, qtype=qtype, shape=shape: gguf_quant.dequantize(raw, qtype, shape))
                line.append(f"{q} {t * 1e3:.1f} ms ({t / base:.2f}x; dequantize alone {dq * 1e3:.1f} ms)")
            print("; ".join(line), flush=True)


def _child_load(path: str) -> None:
    import torch

    from stepvideo_core.dit import load_dit

    with PeakRSS() as peak:
        model = load_dit(path, weight_dtype=torch.float32)
    held = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    emit({"peak_delta": peak.peak_delta, "held": held})


def bench_tiny(args) -> None:
    import numpy as np
    import torch

    from stepvideo_core.dit import load_dit
    from stepvideo_core.quantize import convert
    from stepvideo_core.tiny import evaluate, oracle
    from stepvideo_core.tiny import model as tiny
    from stepvideo_core.tiny.ti2v import psnr

    torch.set_num_threads(max(1, torch.get_num_threads()))
    prompts = evaluate.held_out_prompts(languages=("en",))[: args.prompts]
    base = tiny.load_tiny()
    fp32_dir = tiny.TINY_DIR / "transformer"
    with tempfile.TemporaryDirectory() as tmp:
        files = {"fp16 safetensors (shipped)": fp32_dir}
        for q in ("Q8_0", "Q4_0"):
            files[q] = convert(fp32_dir, q, Path(tmp) / f"tiny_{q}.gguf").out
        clips = {}
        print("| DiT | size on disk | peak RAM while loading (fp32 compute) | PSNR vs fp32, dB (min / mean) | "
              "colour / shape / motion |", flush=True)
        print("|---|---|---|---|---|")
        for name, path in files.items():
            size = sum(f.stat().st_size for f in Path(path).glob("*.safetensors")) if Path(path).is_dir() \
                else Path(path).stat().st_size
            load = run_variant(SCRIPT, "load", str(path))
            model = tiny.TinyModel(load_dit(path, weight_dtype=torch.float32), base.vae, base.text)
            clips[name] = [c for seed in args.seeds
                           for c in evaluate.sample_clips(model, [p.text for p in prompts], seed)[1]]
            targets = [p.target for _ in args.seeds for p in prompts]
            scores = [oracle.score(c, t) for c, t in zip(clips[name], targets)]
            acc = [np.mean([getattr(s, k) for s in scores]) for k in ("colour", "shape", "motion")]
            ref = clips["fp16 safetensors (shipped)"]
            values = [psnr(a, b) for a, b in zip(clips[name], ref)]
            quality = "reference" if name.startswith("fp16") else f"{min(values):.1f} / {np.mean(values):.1f}"
            print(f"| {name} | {mib(size)} | {mib(load['peak_delta'])} (model {mib(load['held'])}) | {quality} | "
                  f"{acc[0]:.0%} / {acc[1]:.0%} / {acc[2]:.0%} |", flush=True)
    print(f"({len(prompts)} held-out English prompts x seeds {list(args.seeds)}, preset tiny, 128x128, 17 frames)")


def _child_convert(src: str, out: str) -> None:
    from stepvideo_core.quantize import convert

    with PeakRSS() as peak:
        report = convert(src, "Q8_0", out)
    emit({"peak_delta": peak.peak_delta, "bytes": report.bytes, "source": report.source_bytes})


def write_full_width_dit(path: Path, width: int, layers: int) -> tuple:
    """A bf16 DiT checkpoint of the release's width and ``layers`` blocks (random weights) at ``path``; returns
    (name, shape) of its largest tensor."""
    import torch
    from safetensors.torch import save_file

    from stepvideo_core.dit import DiTConfig, StepVideoDiT

    config = DiTConfig(num_attention_heads=width // 128, attention_head_dim=128, num_layers=layers,
                       caption_channels=(width, 1024))
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in StepVideoDiT(config).state_dict().items()}
    g = torch.Generator().manual_seed(0)
    save_file({k: (torch.randn(s, generator=g) * 0.02).to(torch.bfloat16) for k, s in shapes.items()}, str(path))
    return max(shapes.items(), key=lambda kv: kv[1].numel())


def bench_convert(args) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "dit.safetensors"
        largest = write_full_width_dit(src, args.width, args.layers)
        result = run_variant(SCRIPT, "convert-child", str(src), str(Path(tmp) / "dit.gguf"))
    print(f"width {args.width}, {args.layers} block(s): bf16 {mib(result['source'])} -> Q8_0 {mib(result['bytes'])}; "
          f"converter peak RSS over the interpreter {mib(result['peak_delta'])}; largest tensor {largest[0]} "
          f"{tuple(largest[1])}: {mib(largest[1].numel() * 2)} bf16, "
          f"{mib(largest[1].numel() * 34 / 32)} Q8_0 -> peak = {result['peak_delta'] / (largest[1].numel() * 2):.2f}x "
          "the largest bf16 tensor")


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        kind, *rest = sys.argv[2:]
        {"load": _child_load, "convert-child": _child_convert}[kind](*rest)
        return
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="what", required=True)
    d = sub.add_parser("dequant")
    d.add_argument("--width", type=int, default=6144)
    d.add_argument("--tokens", type=int, nargs="+", default=[256, 2048])
    t = sub.add_parser("tiny")
    t.add_argument("--prompts", type=int, default=6)
    t.add_argument("--seeds", type=int, nargs="+", default=[0])
    c = sub.add_parser("convert")
    c.add_argument("--width", type=int, default=6144)
    c.add_argument("--layers", type=int, default=1)
    args = p.parse_args()
    {"dequant": bench_dequant, "tiny": bench_tiny, "convert": bench_convert}[args.what](args)


if __name__ == "__main__":
    main()
