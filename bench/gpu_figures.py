"""GPU figures in one run: the full-size DiT, the VAE decode and Step-LLM encoding, with random weights, to a JSON file.

    python bench/gpu_figures.py --out runs/gpu_figures.json             # one large GPU (an H200: under 8 minutes)
    python bench/gpu_figures.py --dry-run --out /tmp/figures.json       # small sizes on the CPU (what the test runs)

What it measures (every model is built on the meta device and materialised on the GPU one tensor at a time with
random values: no checkpoint is read and no CPU copy of the weights is made):
- DiT, 48 blocks at 6144 wide, 544x992 at 102 and 204 frames: one guided step (positive and negative in one
  batch of 2, as ComfyUI batches them) per weight dtype (bf16; fp8 e4m3fn stored, computed in bf16 layer by layer)
  and per installed attention backend (sdpa, sageattention, flash-attn): seconds, peak memory over the weights
  (and the memory plan's prediction), FLOP/s and the fraction of the chip's dense bf16 peak, and 50 steps
  extrapolated (50 x the step; text encoding and decoding excluded).
- VAE: the tiled decode (tile 16, overlap 4: the node's default) of 204 frames at 544x992, official widths, bf16.
- Step-LLM: fp8 weights, one prompt pair (2 x 320 tokens).
- GGUF DiT (needs the gguf package): one guided step at 102 frames with Q8_0 and Q4_0 weights (random blocks, kept
  families as the converter writes them) dequantized per layer in bf16; compare with the bf16 sdpa row.

Robust by design: each measurement runs in its own try/except and records its error in the JSON; a total time
budget (``--budget``, default 450 s) skips what is left once it is spent, in priority order (the bf16 sdpa DiT
first, other backends last); the JSON is rewritten after every measurement, so a killed run keeps what it had.
Not part of CI: it needs a GPU. The figures it produced go in the README ("GPU figures").
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from stepvideo_core import memory  # noqa: E402
from stepvideo_core.attention import get_attention, is_available  # noqa: E402
from stepvideo_core.dit import DiTConfig, StepVideoDiT  # noqa: E402
from stepvideo_core.ops import is_weight_layer  # noqa: E402
from stepvideo_core.step_llm import StepLLM, StepLLMConfig  # noqa: E402
from stepvideo_core.vae import VAEConfig, VideoVAE  # noqa: E402
from stepvideo_core.video_shape import latent_frames  # noqa: E402

BACKENDS = ("sdpa", "sageattention", "flash-attn")
# Dense bf16 tensor-core peaks (FLOP/s, no sparsity) from the vendors' data sheets, matched on the device name.
BF16_PEAKS = {"H200": 989.4e12, "H100": 989.4e12, "H800": 989.4e12, "GH200": 989.4e12, "B200": 2250e12,
              "A100": 312e12, "A800": 312e12, "L40S": 362e12, "L40": 181e12, "RTX 4090": 165.2e12, "RTX 6000 Ada": 364e12}
STEPS = 50


def chip_peak(name: str) -> float | None:
    for key in sorted(BF16_PEAKS, key=len, reverse=True):
        if key in name:
            return BF16_PEAKS[key]
    return None


def dit_step_flops(config: DiTConfig, batch: int, tokens: int, keys: int = 397) -> float:
    """Multiply-adds x 2 of one DiT forward: per block and token, the projections (qkv 3D^2, out D^2, cross q and out
    2 D^2, feed-forward 8 D^2), self-attention (QK^T and PV over all tokens) and cross-attention (over ``keys``);
    per block and sample, the text keys/values (2 D^2 per key). Embeddings and the output head are negligible."""
    d = config.inner_dim
    per_token = 2 * 14 * d * d + 4 * tokens * d + 4 * keys * d
    return float(config.num_layers * batch * (tokens * per_token + keys * 4 * d * d))


def materialise(model: torch.nn.Module, device, dtype: torch.dtype, weight_dtype: torch.dtype) -> torch.nn.Module:
    """Replace a meta model's parameters by random values (std 0.02) made on ``device`` one tensor at a time, weight
    layers in ``weight_dtype``: at most one parameter's worth of temporary memory, never a CPU copy."""
    g = torch.Generator(device=device).manual_seed(0)
    for module in model.modules():
        for name, p in list(module.named_parameters(recurse=False)):
            store = weight_dtype if name == "weight" and is_weight_layer(module) else dtype
            data = torch.randn(p.shape, generator=g, device=device, dtype=dtype).mul_(0.02).to(store)
            setattr(module, name, torch.nn.Parameter(data, requires_grad=False))
    left = [name for name, b in model.named_buffers() if b.is_meta]
    if left:
        raise RuntimeError(f"buffers left on the meta device: {left[:4]}")
    return model.eval()


class Clock:
    """Wall time and peak memory of one call on ``device`` (CUDA: the allocator's peak over what was allocated
    before the call; CPU: torch's allocation records, ``stepvideo_core.memory.allocation_peak``)."""

    def __init__(self, device: torch.device):
        self.device = device

    def sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def measure(self, fn) -> tuple[float, int]:
        self.sync()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            base = torch.cuda.memory_allocated(self.device)
            start = time.perf_counter()
            fn()
            self.sync()
            return time.perf_counter() - start, torch.cuda.max_memory_allocated(self.device) - base
        from stepvideo_core.memory import allocation_peak

        start = time.perf_counter()
        peak, _ = allocation_peak(fn)
        return time.perf_counter() - start, peak


class Run:
    """The JSON being written, the time budget, and one try/except per measurement."""

    def __init__(self, out: Path, budget: float, info: dict):
        self.out, self.budget, self.start = out, budget, time.perf_counter()
        self.data = {**info, "budget_s": budget, "sections": []}

    def left(self) -> float:
        return self.budget - (time.perf_counter() - self.start)

    def record(self, section: str, params: dict, fn, expected_s: float = 0.0) -> dict | None:
        row = {"section": section, **params}
        if self.left() <= expected_s:
            row["skipped"] = f"time budget: {self.left():.0f} s left, about {expected_s:.0f} s needed"
            result = None
        else:
            try:
                result = fn()
                row.update(result)
            except Exception as e:  # a failed section is a figure too: record it and go on
                row["error"] = f"{type(e).__name__}: {e}"
                row["traceback"] = traceback.format_exc(limit=4)
                result = None
            finally:
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
        self.data["sections"].append(row)
        self.save()
        status = row.get("error") or row.get("skipped") or f"{row.get('seconds', 0):.2f} s"
        print(f"[{time.perf_counter() - self.start:6.0f} s] {section} {params}: {status}", flush=True)
        return result

    def save(self):
        self.data["elapsed_s"] = round(time.perf_counter() - self.start, 1)
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.out.write_text(json.dumps(self.data, indent=1))


def sizes(dry_run: bool) -> dict:
    if dry_run:  # a few seconds on a CPU: same code paths, small widths
        return dict(dit=DiTConfig(num_attention_heads=2, attention_head_dim=64, num_layers=2, caption_channels=(64, 32),
                                  in_channels=16, out_channels=16),
                    frames=(17, 34), height=32, width=48,
                    vae=VAEConfig(z_channels=8, encoder_channels=32, encoder_channel_mult=(1, 1, 1, 1),
                                  decoder_channels=32, decoder_channel_mult=(1, 1, 1, 1), decoder_num_res_blocks=1),
                    vae_frames=17, vae_tile=(2, 1), llm=StepLLMConfig(hidden_size=128, num_layers=2, num_attention_heads=2,
                                                                       num_attention_groups=1, ffn_hidden_size=256,
                                                                       vocab_size=512))
    return dict(dit=DiTConfig(), frames=(102, 204), height=544, width=992, vae=VAEConfig(), vae_frames=204,
                vae_tile=(16, 4), llm=StepLLMConfig())


def build_dit(config: DiTConfig, device, weight_dtype: torch.dtype) -> StepVideoDiT:
    with torch.device("meta"):
        model = StepVideoDiT(config, dtype=torch.bfloat16)
    model = materialise(model, device, torch.bfloat16, weight_dtype)
    model.compute_dtype = torch.bfloat16
    return model


def dit_step(model: StepVideoDiT, device, frames: int, lh: int, lw: int, backend: str, weight_dtype: torch.dtype,
             peak_flops: float | None) -> dict:
    """One guided step (batch 2) after a small warm-up call (kernel selection, JIT compilation)."""
    config = model.config
    tokens = latent_frames(frames) * lh * lw
    flops = 2 * dit_step_flops(config, 1, tokens)
    model.set_attention(get_attention(backend))
    g = torch.Generator(device=device).manual_seed(1)
    x = torch.randn(2, latent_frames(frames), config.in_channels, lh, lw, generator=g, device=device, dtype=torch.bfloat16)
    t = torch.full((2,), 0.5, device=device)
    llm = torch.randn(2, 320, config.caption_channels[0], generator=g, device=device, dtype=torch.bfloat16)
    clip = torch.randn(2, 77, config.caption_channels[1], generator=g, device=device, dtype=torch.bfloat16)
    mask = torch.zeros(2, 397, device=device, dtype=torch.bfloat16)
    mask[:, :77 + 120] = 1
    clock = Clock(device)
    with torch.no_grad():
        clock.measure(lambda: model(x[:, :1, :, :8, :8], t, llm, mask, clip))
        seconds, peak = clock.measure(lambda: model(x, t, llm, mask, clip))
    predicted = memory.dit_activation_bytes(config, 2, tokens, torch.bfloat16, weight_dtype=weight_dtype)
    out = {"seconds": float(f"{seconds:.4g}"), "peak_bytes": peak, "predicted_bytes": predicted,
           "peak_over_predicted": round(peak / predicted, 3), "flops": flops, "flops_per_s": flops / seconds,
           f"steps{STEPS}_s": round(STEPS * seconds, 1)}
    if peak_flops:
        out["fraction_of_bf16_peak"] = round(flops / seconds / peak_flops, 3)
    return out


def dit_section(run: Run, device, size: dict, dtypes, backends, peak_flops):
    config = size["dit"]
    lh, lw = size["height"] // 16, size["width"] // 16
    for backend in backends:
        if not is_available(backend):
            run.data["sections"].append({"section": "dit_step", "attention": backend, "skipped": "not installed"})
    backends = [b for b in backends if is_available(b)]
    rate = None  # FLOP/s of the last step, to forecast the next one against the budget
    built = {}

    def build(weight_dtype):
        built["model"] = build_dit(config, device, weight_dtype)
        return {"weight_bytes": sum(p.numel() * p.element_size() for p in built["model"].parameters())}

    for weight_name in dtypes if backends else ():
        weight_dtype = {"bf16": torch.bfloat16, "fp8": torch.float8_e4m3fn}[weight_name]
        if run.record("dit_build", {"weights": weight_name}, lambda w=weight_dtype: build(w)) is None:
            continue
        for backend in backends:
            for frames in size["frames"]:
                tokens = latent_frames(frames) * lh * lw
                expected = 1.5 * 2 * dit_step_flops(config, 1, tokens) / rate if rate else 0.0
                params = {"weights": weight_name, "attention": backend, "frames": frames, "height": size["height"],
                          "width": size["width"], "tokens": tokens}
                result = run.record("dit_step", params, lambda f=frames, b=backend, w=weight_dtype: dit_step(
                    built["model"], device, f, lh, lw, b, w, peak_flops), expected)
                if result:
                    rate = result["flops_per_s"]
        built.clear()


def build_gguf_dit(config: DiTConfig, device, qtype_name: str) -> StepVideoDiT:
    """The DiT as the converter would write it from bf16 (``quantize.choose_type`` per tensor), with random bytes
    made on ``device``: each quantized weight's blocks get random packed integers and one fixed, finite float16
    scale (the values do not change the time of dequantizing them), every other tensor random bf16."""
    from stepvideo_core import gguf_quant
    from stepvideo_core.gguf_ops import can_quantize, set_quantized_weight
    from stepvideo_core.quantize import choose_type

    qtype = gguf_quant.Q[qtype_name]
    with torch.device("meta"):
        model = StepVideoDiT(config, dtype=torch.bfloat16)
    g = torch.Generator(device=device).manual_seed(0)
    for module_name, module in model.named_modules():
        for name, p in list(module.named_parameters(recurse=False)):
            full = f"{module_name}.{name}" if module_name else name
            chosen, _ = choose_type(full, tuple(p.shape), qtype, torch.bfloat16)
            if name == "weight" and can_quantize(module) and chosen == qtype:
                block, size = gguf_quant.block_sizes(qtype)
                raw = torch.randint(0, 256, (p.numel() // block, size), generator=g, device=device, dtype=torch.uint8)
                raw[:, :2] = torch.full((1,), 2e-4, dtype=torch.float16, device=device).view(torch.uint8)
                set_quantized_weight(module, raw.view(p.shape[0], -1), qtype, tuple(p.shape))
                continue
            data = torch.randn(p.shape, generator=g, device=device, dtype=torch.bfloat16).mul_(0.02)
            setattr(module, name, torch.nn.Parameter(data, requires_grad=False))
    model.compute_dtype = torch.bfloat16
    model.weight_format = qtype
    return model.eval()


def gguf_section(run: Run, device, size: dict, peak_flops):
    """One guided step of the GGUF DiT (Q8_0, Q4_0: dequantized per layer in bf16) at the first frame count; the
    bf16 row of ``dit_section`` at the same size is the baseline (ratio = seconds / bf16 seconds)."""
    config, frames = size["dit"], size["frames"][0]
    lh, lw = size["height"] // 16, size["width"] // 16
    tokens = latent_frames(frames) * lh * lw
    built = {}

    def build(name):
        built["model"] = build_gguf_dit(config, device, name)
        return {"weight_bytes": sum(t.numel() * t.element_size() for t in built["model"].state_dict().values())}

    for name in ("Q8_0", "Q4_0"):
        if run.record("dit_build", {"weights": name}, lambda n=name: build(n)) is None:
            continue
        params = {"weights": name, "attention": "sdpa", "frames": frames, "height": size["height"],
                  "width": size["width"], "tokens": tokens}
        run.record("dit_step", params, lambda: dit_step(built["model"], device, frames, lh, lw, "sdpa",
                                                        built["model"].weight_format, peak_flops))
        built.clear()


def vae_section(run: Run, device, size: dict):
    config = size["vae"]
    tile, overlap = size["vae_tile"]
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32  # CPUs convolve half precision very slowly
    frames = size["vae_frames"]
    lh, lw = size["height"] // 16, size["width"] // 16

    def decode():
        with torch.device("meta"):
            vae = VideoVAE(config, dtype=dtype)
        vae = materialise(vae, device, dtype, dtype)
        z = torch.randn(1, latent_frames(frames), config.z_channels, lh, lw, device=device, dtype=dtype)
        with torch.no_grad():
            seconds, peak = Clock(device).measure(lambda: vae.decode(z, tile_size=tile, tile_overlap=overlap))
        predicted = memory.vae_decode_bytes(config, 1, latent_frames(frames), lh, lw, dtype, tile)
        return {"seconds": float(f"{seconds:.4g}"), "peak_bytes": peak, "predicted_bytes": predicted,
                "peak_over_predicted": round(peak / predicted, 3), "dtype": str(dtype)}

    run.record("vae_decode", {"frames": frames, "height": size["height"], "width": size["width"], "tile": tile,
                              "overlap": overlap}, decode)


def llm_section(run: Run, device, size: dict):
    config = size["llm"]

    def encode():
        with torch.device("meta"):
            llm = StepLLM(config, dtype=torch.bfloat16)
        llm = materialise(llm, device, torch.bfloat16, torch.float8_e4m3fn)
        llm.compute_dtype = torch.bfloat16
        ids = torch.randint(3, config.vocab_size, (2, 320), device=device)
        with torch.no_grad():
            llm(ids[:, :8])
            seconds, peak = Clock(device).measure(lambda: llm(ids))
        predicted = memory.step_llm_activation_bytes(config, 2, 320, torch.bfloat16, weight_dtype=torch.float8_e4m3fn)
        return {"seconds": float(f"{seconds:.4g}"), "peak_bytes": peak, "predicted_bytes": predicted,
                "peak_over_predicted": round(peak / predicted, 3),
                "weight_bytes": sum(p.numel() * p.element_size() for p in llm.parameters())}

    run.record("step_llm_encode", {"weights": "fp8", "prompts": 2, "tokens": 320}, encode)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=Path("runs/gpu_figures.json"))
    p.add_argument("--dry-run", action="store_true", help="small sizes on the CPU (a test of the script, not figures)")
    p.add_argument("--budget", type=float, default=450.0, help="seconds; what does not fit is recorded as skipped")
    p.add_argument("--peak-tflops", type=float, help="the chip's dense bf16 peak, if its name is not in the table")
    args = p.parse_args(argv)
    device = torch.device("cpu" if args.dry_run or not torch.cuda.is_available() else "cuda")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    peak = args.peak_tflops * 1e12 if args.peak_tflops else chip_peak(name) if device.type == "cuda" else None
    info = {"device": name, "torch": torch.__version__, "cuda": torch.version.cuda, "dry_run": args.dry_run,
            "bf16_peak_flops": peak,
            "backends_installed": [b for b in BACKENDS if is_available(b)]}
    if device.type == "cuda":
        info["gpu_memory_bytes"] = torch.cuda.get_device_properties(device).total_memory
    run = Run(args.out, args.budget, info)
    size = sizes(args.dry_run)
    # Priority order: what matters most runs first, so the budget drops the least important figures.
    dit_section(run, device, size, ("bf16", "fp8"), ("sdpa",), peak)
    vae_section(run, device, size)
    llm_section(run, device, size)
    gguf_section(run, device, size, peak)
    dit_section(run, device, size, ("bf16", "fp8"), BACKENDS[1:], peak)
    run.save()
    print(f"wrote {args.out} ({run.data['elapsed_s']} s)")
    return run.data


if __name__ == "__main__":
    main()
