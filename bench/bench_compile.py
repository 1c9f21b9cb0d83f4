"""torch.compile of the DiT blocks (``stepvideo_core/compile.py``) against eager, side by side in one process.

    python bench/bench_compile.py                                   # CPU fp32, a reduced DiT
    python bench/bench_compile.py --device cuda --dtype bf16 --width 3072 --layers 8 --tokens 4096

Reports the first call's time (compilation), the best of --rounds forward times of each, their ratio, and the
largest difference between the compiled and eager outputs relative to the output's magnitude.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=tuple(DTYPES), default="fp32")
    p.add_argument("--width", type=int, default=512)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--tokens", type=int, default=768, help="video tokens (3 latent frames x 16 x tokens/48)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--mode", default=None)
    args = p.parse_args(argv)

    import torch

    from stepvideo_core.compile import CompiledBlocks, CompileSettings
    from stepvideo_core.dit import DiTConfig, StepVideoDiT

    dtype = getattr(torch, DTYPES[args.dtype])
    cfg = DiTConfig(num_attention_heads=args.width // 128, attention_head_dim=128, in_channels=16, out_channels=16,
                    num_layers=args.layers, caption_channels=(256, 128))
    torch.manual_seed(0)
    dit = StepVideoDiT(cfg, device=args.device, dtype=dtype).eval().requires_grad_(False)
    dit.compute_dtype = dtype
    w = args.tokens // 48
    x = torch.randn(2, 3, 16, 16, w, device=args.device)
    llm, clip = torch.randn(2, 320, 256, device=args.device), torch.randn(2, 77, 128, device=args.device)
    mask = torch.ones(2, 397, device=args.device)
    t = torch.tensor([0.3, 0.3], device=args.device)

    def forward():
        with torch.no_grad():
            out = dit(x, t, llm, mask, clip)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        return out

    def best(fn):
        times = []
        for _ in range(args.rounds):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return min(times)

    eager_out = forward()
    compiled = CompiledBlocks(dit, CompileSettings(mode=args.mode))
    start = time.perf_counter()
    compiled_out = compiled.run(forward)
    first = time.perf_counter() - start
    eager, fast = best(forward), best(lambda: compiled.run(forward))
    diff = float((compiled_out.float() - eager_out.float()).abs().max() / eager_out.float().abs().max())
    print(json.dumps({"device": args.device, "dtype": args.dtype, "width": args.width, "layers": args.layers,
                      "tokens": 3 * 16 * w, "compile_failed": compiled.failed, "first_call_s": round(first, 1),
                      "eager_s": round(eager, 4), "compiled_s": round(fast, 4), "speedup": round(eager / fast, 3),
                      "max_rel_diff": diff}))


if __name__ == "__main__":
    main()
