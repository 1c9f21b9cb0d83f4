"""DiT forward: our implementation against the official StepVideoModel, same config, weights and inputs.

    python bench/bench_dit.py                       # CPU fp32, reduced config; needs STEPVIDEO_REFERENCE for ratios
    python bench/bench_dit.py --device cuda --dtype bf16 --layers 4 --width 6144 --frames 3 --height 34 --width-latent 62
    python bench/bench_dit.py --device cuda --attention sdpa,sageattention  # backend ratio

Memory: each variant in its own process. Time against the reference: both models in one process, forwards\ninterleaved, best of --rounds each; memory is the peak rise
during the forward (CPU: resident memory sampled every ms; CUDA: torch's peak allocated bytes).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.measure import PeakRSS, emit, mib, run_variant, timed  # noqa: E402

DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def child(args) -> None:
    import torch

    from stepvideo_core.attention import get_attention
    from stepvideo_core.dit import DiTConfig, StepVideoDiT

    dtype = getattr(torch, DTYPES[args.dtype])
    heads = args.width // 128
    cfg = DiTConfig(num_attention_heads=heads, attention_head_dim=128, num_layers=args.layers,
                    caption_channels=(args.caption, 1024))
    torch.manual_seed(0)
    with torch.device("meta"):
        ours = StepVideoDiT(cfg)
    state = {k: torch.randn(v.shape, dtype=torch.float32).mul_(0.02).to(dtype) for k, v in ours.state_dict().items()}

    def build(impl):
        if impl == "ours":
            model = StepVideoDiT(cfg, device="meta")
            model.load_state_dict(state, assign=True)
            model.compute_dtype = dtype
            model.set_attention(get_attention(args.attention))
        else:
            from tests.reference_impl import import_reference

            ref_module = import_reference("modules.model")
            model = ref_module.StepVideoModel(num_attention_heads=heads, attention_head_dim=128, num_layers=args.layers,
                                              caption_channels=[args.caption, 1024], attention_type="torch")
            model.load_state_dict(state)
        return model.to(args.device, dtype).eval()

    impls = ["ours", "reference"] if args.impl == "both" else [args.impl]
    models = {impl: build(impl) for impl in impls}
    state.clear()
    g = torch.Generator().manual_seed(1)
    b = 2  # one cond/uncond pair, as in guided sampling
    x = torch.randn(b, args.frames, 64, args.height, args.width_latent, generator=g).to(args.device, dtype)
    t = torch.tensor([0.3, 0.3], device=args.device)
    llm = torch.randn(b, 320, args.caption, generator=g).to(args.device, dtype)
    clip = torch.randn(b, 77, 1024, generator=g).to(args.device, dtype)
    mask = torch.zeros(b, 397, device=args.device, dtype=dtype)
    mask[:, : 77 + 60] = 1

    def run(impl):
        model = models[impl]
        with torch.inference_mode():
            if impl == "ours":
                out = model(x, t.to(dtype), llm, mask, clip)
            else:
                out = model(x, encoder_hidden_states=llm, encoder_hidden_states_2=clip, timestep=t.to(dtype),
                            encoder_attention_mask=mask, return_dict=False)
        if args.device == "cuda":
            torch.cuda.synchronize()
        return out

    if args.impl == "both":
        # Interleaved in one process: load from elsewhere on the machine slows both alike.
        for impl in impls:
            run(impl)
        best = dict.fromkeys(impls, float("inf"))
        for _ in range(args.rounds):
            for impl in impls:
                best[impl] = min(best[impl], timed(lambda i=impl: run(i), repeats=1, warmup=0))
        return emit(best)
    impl = impls[0]
    seconds = timed(lambda: run(impl))
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        run(impl)
        peak = torch.cuda.max_memory_allocated() - base
        total_peak = torch.cuda.max_memory_allocated()
    else:
        with PeakRSS() as meter:
            run(impl)
        peak, total_peak = meter.peak_delta, meter.peak
    emit({"seconds": seconds, "peak": peak, "total_peak": total_peak})


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--child", action="store_true")
    p.add_argument("--impl", default="ours")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="fp32", choices=DTYPES)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--width", type=int, default=1024, help="model width (heads x 128)")
    p.add_argument("--caption", type=int, default=1024, help="Step-LLM state width (6144 in the real model)")
    p.add_argument("--frames", type=int, default=3, help="latent frames (3 = 17 video frames)")
    p.add_argument("--height", type=int, default=16, help="latent height")
    p.add_argument("--width-latent", type=int, default=16, help="latent width")
    p.add_argument("--attention", default="sdpa", help="comma-separated backends for our model")
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    if args.child:
        return child(args)

    common = ["--device", args.device, "--dtype", args.dtype, "--layers", str(args.layers), "--width", str(args.width),
              "--caption", str(args.caption), "--frames", str(args.frames), "--height", str(args.height),
              "--width-latent", str(args.width_latent)]
    tokens = args.frames * args.height * args.width_latent
    print(f"DiT forward, batch 2 (cond+uncond), {args.layers} blocks x {args.width} wide, {tokens} tokens, "
          f"{args.dtype} on {args.device}")
    variants = {f"ours[{b}]": ["--impl", "ours", "--attention", b] for b in args.attention.split(",")}
    has_ref = bool(os.environ.get("STEPVIDEO_REFERENCE"))
    if has_ref:
        variants["reference"] = ["--impl", "reference"]
    results = {name: run_variant(__file__, *common, *extra) for name, extra in variants.items()}
    if has_ref:
        both = run_variant(__file__, *common, "--impl", "both", "--rounds", str(args.rounds))
        first = next(iter(results))
        results[first]["seconds"], results["reference"]["seconds"] = both["ours"], both["reference"]
    for name, r in results.items():
        print(f"  {name:22s} {r['seconds'] * 1000:9.1f} ms/forward   peak during forward {mib(r['peak'])}"
              f"   (process peak {mib(r['total_peak'])})")
    first = next(iter(results))
    if "reference" in results:
        ref = results["reference"]
        print(f"  ratio ours/reference: time {results[first]['seconds'] / ref['seconds']:.2f}x, "
              f"peak memory {results[first]['peak'] / max(ref['peak'], 1):.2f}x")
    else:
        print("  (set STEPVIDEO_REFERENCE to a Step-Video-T2V checkout for the reference ratio)")
    for name in list(results)[1:]:
        if name.startswith("ours"):
            print(f"  ratio {name}/{first}: time {results[name]['seconds'] / results[first]['seconds']:.2f}x")


if __name__ == "__main__":
    main()
