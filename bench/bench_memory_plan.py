"""The memory plan against measurement: activation peaks of the DiT, the VAE decoder and Step-LLM at official widths.

    python bench/bench_memory_plan.py                      # every case (about an hour on 2 busy CPU cores)
    python bench/bench_memory_plan.py --only dit --cases dit-bf16-1024 --out runs/memory.jsonl

Method: ``stepvideo_core.memory.allocation_peak`` (torch.profiler with ``profile_memory=True``: every allocation and free
made through torch's allocator during one forward, summed in time order; the maximum is the peak). Weights and
inputs exist before the call and are not counted, so the peak is the activation memory the formulas in
``stepvideo_core/memory.py`` predict. Each case builds one model at the official width with random weights: the
DiT with two blocks (from the second block on the peak is the same at any depth), the VAE decoder on one 3-latent
chunk of a tile, Step-LLM with one layer on a prompt pair (320 tokens each). The "fit" cases are the ones the
formulas' constants were read from; the "check" cases (other token counts, batch, fp8 weights, tile sizes) must
land within +-20% (the script exits 1 otherwise).

Last full run: see the README's "Memory plan" section and the closing report of the memory-plan work.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from stepvideo_core.memory import allocation_peak  # noqa: E402

# (name, role, kwargs): "fit" cases fixed the formula's constants, "check" cases test it.
DIT_CASES = [
    ("dit-bf16-2048", "fit", dict(tokens=2048, dtype="bf16")),
    ("dit-fp32-2048", "fit", dict(tokens=2048, dtype="fp32")),
    ("dit-bf16-2048-chunk512", "fit", dict(tokens=2048, dtype="bf16", ff_chunk_size=512)),
    ("dit-fp32-2048-chunk512", "fit", dict(tokens=2048, dtype="fp32", ff_chunk_size=512)),
    ("dit-bf16-1024", "check", dict(tokens=1024, dtype="bf16")),
    ("dit-fp32-1024-chunk256", "check", dict(tokens=1024, dtype="fp32", ff_chunk_size=256)),
    ("dit-fp8-bf16-1024", "check", dict(tokens=1024, dtype="bf16", weight_dtype="fp8")),
    ("dit-bf16-batch2-1024", "check", dict(tokens=1024, dtype="bf16", batch=2)),
    ("dit-bf16-4096", "check", dict(tokens=4096, dtype="bf16")),
]
VAE_CASES = [
    ("vae-fp32-tile4", "check", dict(tile=4)),  # the VAE plan has no fitted constant: every tile size checks it
    ("vae-fp32-tile8", "check", dict(tile=8)),
    ("vae-fp32-tile6", "check", dict(tile=6)),
    ("vae-fp32-tile12", "check", dict(tile=12)),
]
LLM_CASES = [
    ("llm-fp32-pair", "check", dict(dtype="fp32")),  # nor the Step-LLM plan
    ("llm-bf16-pair", "check", dict(dtype="bf16")),
    ("llm-fp8-bf16-pair", "check", dict(dtype="bf16", weight_dtype="fp8")),
]
DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "fp8": "float8_e4m3fn"}


def _dtype(name):
    import torch

    return getattr(torch, DTYPES[name])


def _random_(model, dtype, weight_dtype):
    """Random weights in place (small values), stored in ``weight_dtype`` for the weight layers."""
    import torch

    from stepvideo_core.ops import is_weight_layer

    g = torch.Generator().manual_seed(0)
    for module in model.modules():
        for name, p in list(module.named_parameters(recurse=False)):
            store = weight_dtype if (name == "weight" and is_weight_layer(module)) else dtype
            data = torch.randn(p.shape, generator=g, dtype=torch.float32).mul_(0.02).to(store)
            setattr(module, name, torch.nn.Parameter(data, requires_grad=False))
    return model.eval()


def measure_dit(tokens: int, dtype: str, weight_dtype: str | None = None, ff_chunk_size: int = 0, batch: int = 1) -> dict:
    import torch

    from stepvideo_core.dit import DiTConfig, StepVideoDiT
    from stepvideo_core.memory import dit_activation_bytes

    compute = _dtype(dtype)
    config = DiTConfig(num_layers=2, ff_chunk_size=ff_chunk_size)
    with torch.device("meta"):
        model = StepVideoDiT(config)
    model = _random_(model.to_empty(device="cpu"), compute, _dtype(weight_dtype or dtype))
    model.compute_dtype = compute
    g = torch.Generator().manual_seed(1)
    frames, side = tokens // 256, 16
    x = torch.randn(batch, frames, config.in_channels, side, side, generator=g).to(compute)
    t = torch.full((batch,), 0.3)
    llm = torch.randn(batch, 320, 6144, generator=g).to(compute)
    clip = torch.randn(batch, 77, 1024, generator=g).to(compute)
    mask = torch.zeros(batch, 397, dtype=compute)
    mask[:, :77 + 100] = 1
    with torch.no_grad():
        model(x[:, :1], t, llm, mask, clip)  # first call: one-off allocations (oneDNN primitives) stay out
        start = time.perf_counter()
        peak, _ = allocation_peak(lambda: model(x, t, llm, mask, clip))
    predicted = dit_activation_bytes(config, batch, tokens, compute, weight_dtype=_dtype(weight_dtype or dtype))
    return dict(measured=peak, predicted=predicted, seconds=time.perf_counter() - start)


def measure_vae(tile: int, dtype: str = "fp32") -> dict:
    import torch

    from stepvideo_core.memory import vae_tile_bytes
    from stepvideo_core.vae import Decoder, VAEConfig

    compute = _dtype(dtype)
    config = VAEConfig()
    with torch.device("meta"):
        decoder = Decoder(config, __import__("stepvideo_core.ops", fromlist=["default_ops"]).default_ops)
    decoder = _random_(decoder.to_empty(device="cpu"), compute, compute)
    z = torch.randn(1, config.z_channels, 3, tile, tile, generator=torch.Generator().manual_seed(1)).to(compute)
    with torch.no_grad():
        decoder(z[..., :2, :2].contiguous())
        start = time.perf_counter()
        peak, _ = allocation_peak(lambda: decoder(z))
    return dict(measured=peak, predicted=vae_tile_bytes(config, tile, tile, compute), seconds=time.perf_counter() - start)


def measure_llm(dtype: str, weight_dtype: str | None = None, batch: int = 2, length: int = 320) -> dict:
    import torch

    from stepvideo_core.memory import step_llm_activation_bytes
    from stepvideo_core.step_llm import StepLLM, StepLLMConfig

    compute = _dtype(dtype)
    config = StepLLMConfig(num_layers=1)
    with torch.device("meta"):
        model = StepLLM(config)
    model = _random_(model.to_empty(device="cpu"), compute, _dtype(weight_dtype or dtype))
    model.compute_dtype = compute
    ids = torch.randint(3, config.vocab_size, (batch, length), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        model(ids[:, :8])
        start = time.perf_counter()
        peak, _ = allocation_peak(lambda: model(ids))
    predicted = step_llm_activation_bytes(config, batch, length, compute, weight_dtype=_dtype(weight_dtype or dtype))
    return dict(measured=peak, predicted=predicted, seconds=time.perf_counter() - start)


MEASURE = {"dit": (DIT_CASES, measure_dit), "vae": (VAE_CASES, measure_vae), "llm": (LLM_CASES, measure_llm)}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--only", default="dit,vae,llm", help="comma-separated parts: dit, vae, llm")
    p.add_argument("--cases", default="", help="comma-separated case names (default: all of the chosen parts)")
    p.add_argument("--out", help="append one JSON line per case here as it finishes")
    args = p.parse_args()
    wanted = set(filter(None, args.cases.split(",")))
    failures = 0
    for part in args.only.split(","):
        cases, fn = MEASURE[part]
        for name, role, kwargs in cases:
            if wanted and name not in wanted:
                continue
            result = fn(**kwargs)
            ratio = result["measured"] / result["predicted"]
            row = dict(case=name, role=role, **kwargs, **result, ratio=round(ratio, 3))
            ok = 0.8 <= ratio <= 1.2
            failures += role == "check" and not ok
            print(f"{name:26s} {role:5s} measured {result['measured'] / 2**20:9.1f} MiB  predicted "
                  f"{result['predicted'] / 2**20:9.1f} MiB  ratio {ratio:.3f} {'ok' if ok else 'OFF'}  "
                  f"({result['seconds']:.0f} s)", flush=True)
            if args.out:
                with open(args.out, "a") as f:
                    f.write(json.dumps(row) + "\n")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
