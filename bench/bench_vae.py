"""Video-VAE decode benchmark: time and peak memory, ours vs the official code, tiled vs untiled.

    python bench/bench_vae.py            # every case below, one fresh subprocess per measurement
    python bench/bench_vae.py --quick    # smaller sizes (a smoke run)

Each measurement runs in its own subprocess: it builds the model (seeded random weights, identical for ours and
the reference), makes the seeded latents, resets the kernel's peak-RSS counter (``/proc/self/clear_refs``), then
times one decode. Peak memory is the rise of the peak resident set over the resident set just before the decode
(weights and inputs excluded), so allocator caches and every temporary count. The reference runs when
STEPVIDEO_REFERENCE points at a Step-Video-T2V checkout. Outputs go to a temporary folder so the parent can
compare them (PSNR of tiled vs untiled, max|diff| of ours vs the reference).

Cases (CPU): the official widths at 17 frames and a small size (ours vs reference, tiled vs untiled), and a
quarter-width decoder (z = 32) at 34 frames x 544 x 992, the model's full size (ours vs reference, tiled vs
untiled). On a GPU the same script measures CUDA peak allocation instead (``--device cuda``).

Recorded on 2 shared CPU cores (torch 2.13, fp32, other jobs running; times are noisy, memory is not):
  official-17f-64x128  ours 31.6 s / +1632 MiB vs reference 33.5 s / +874 MiB (0.94x time; 1.87x peak, before
                       the decoder head went back to the standard layout, which removes the extra reordered
                       0.9 GB weight copy); tiled (4x5, overlap 2) 1.45x time, PSNR 34.0 dB (tiles ~ image here)
  official-17f-32x64   (final code) ours 7.83 s / +74 MiB vs reference 8.51 s / +874 MiB: 0.92x time, 0.08x peak;
                       tiled (2x3, overlap 1) 1.45x time, PSNR 29.8 dB (tiles this small are only a smoke test)
  quarter-17f-128x256  ours 9.85 s / +466 MiB vs reference 10.70 s / +593 MiB: 0.92x time, 0.79x peak;
                       tiled (8x10, overlap 2) 1.15x time, 67.6% peak, PSNR 40.9 dB
  narrow-34f-544x992   untiled 294 s / +4484 MiB; tiled (18, overlap 2) 206 s / +983 MiB: 0.70x time,
                       21.9% peak, PSNR 42.1 dB
  quarter-34f-544x992  untiled 541 s / +7084 MiB (the tiled run was cut off by the time limit)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CASES = {
    # name: (config overrides, latent frames, latent h, latent w, tile size (latents), tile overlap, run reference)
    "official-17f-64x128": (dict(), 3, 4, 8, (4, 5), 2, True),
    "quarter-17f-128x256": (QUARTER := dict(z_channels=32, encoder_channels=32, encoder_channel_mult=(1, 2, 4, 4),
                                            decoder_channels=32, decoder_channel_mult=(1, 2, 4, 4)),
                            3, 8, 16, (8, 10), 2, True),
    # The model's full size with the narrowest decoder the 32-group norms allow (32/32/64/64 channels), so the
    # default run stays near 10 minutes on 2 CPU cores; the reference at this size needs --full-reference.
    "narrow-34f-544x992": (dict(z_channels=16, encoder_channels=32, encoder_channel_mult=(1, 1, 2, 2),
                                decoder_channels=32, decoder_channel_mult=(1, 1, 2, 2)), 6, 34, 62, 18, 2, False),
}
EXTRA = {
    # Quarter widths at full size: ~9 min untiled and more tiled on 2 shared CPU cores (--only quarter-34f-544x992).
    "quarter-34f-544x992": (QUARTER, 6, 34, 62, 18, 2, False),
}
QUICK = {
    "official-17f-32x64": (dict(), 3, 2, 4, (2, 3), 1, True),
    "quarter-17f-128x256": CASES["quarter-17f-128x256"],
}


def rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(field)


def child(args) -> None:
    import torch

    from stepvideo_core.vae import VAEConfig, VideoVAE
    from tests.builders import randomize_fan_in

    overrides, n, h, w, tile, overlap, _ = json.loads(args.case)
    for k in ("encoder_channel_mult", "decoder_channel_mult"):
        if k in overrides:
            overrides[k] = tuple(overrides[k])
    config = VAEConfig(**overrides)
    device = torch.device(args.device)
    with torch.device("meta"):
        ours = VideoVAE(config)
    ours = randomize_fan_in(ours.to_empty(device="cpu"), seed=0).eval()
    ours.encoder = None  # decode only: keep the encoder's weights out of the process
    latents = torch.randn(1, n, config.z_channels, h, w, generator=torch.Generator().manual_seed(1))

    if args.impl == "reference":
        os.environ.setdefault("STEPVIDEO_REFERENCE", os.environ.get("STEPVIDEO_REFERENCE", ""))
        from tests.reference_impl import import_reference

        ref = import_reference("vae.vae")
        ref.base_group_norm.spatial = True
        model = ref.AutoencoderKL.__new__(ref.AutoencoderKL)
        torch.nn.Module.__init__(model)
        model.decoder = ref.VideoDecoder(ch=config.decoder_channels, ch_mult=config.decoder_channel_mult,
                                         num_res_blocks=config.decoder_num_res_blocks - 1,
                                         z_channels=config.z_channels, version=2)
        model.decoder.load_state_dict({k[len("decoder."):]: v for k, v in ours.state_dict().items()
                                       if k.startswith("decoder.")})
        model.frame_len, model.latent_len, model.world_size = 17, 3, 1
        del ours
        model = model.to(device).eval()

        def run():
            return model.decode(latents.to(device))
    else:
        model = ours.to(device)
        tile_size = (tile if isinstance(tile, int) else tuple(tile)) if args.impl == "ours-tiled" else None

        def run():
            return model.decode(latents.to(device), tile_size=tile_size, tile_overlap=overlap)

    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM (peak RSS) to the current RSS
        base = rss_kib("VmRSS") * 1024
    t0 = time.perf_counter()
    out = run()
    if device.type == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = rss_kib("VmHWM") * 1024 - base
    seconds = time.perf_counter() - t0
    torch.save(out.float().cpu(), args.out)
    print(json.dumps({"seconds": seconds, "peak_bytes": peak, "shape": list(out.shape)}))


def measure(case, impl: str, device: str, tmp: Path) -> dict:
    out = tmp / f"{impl}.pt"
    cmd = [sys.executable, __file__, "--child", "--impl", impl, "--case", json.dumps(case), "--device", device,
           "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        raise RuntimeError(f"{impl} failed:\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["out"] = out
    return result


def psnr(a, b) -> float:
    peak = float(b.max() - b.min())
    mse = float((a - b).pow(2).mean())
    return float("inf") if mse == 0 else 10 * math.log10(peak**2 / mse)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--child", action="store_true")
    parser.add_argument("--impl", default="ours")
    parser.add_argument("--case")
    parser.add_argument("--out")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--only", help="run only the case with this name")
    parser.add_argument("--full-reference", action="store_true", help="also run the reference at full size")
    args = parser.parse_args()
    if args.child:
        child(args)
        return

    import torch

    have_ref = bool(os.environ.get("STEPVIDEO_REFERENCE"))
    cases = QUICK if args.quick else CASES
    if args.only:
        cases = {**CASES, **QUICK, **EXTRA}
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {args.device}; "
          f"reference: {os.environ.get('STEPVIDEO_REFERENCE') or 'not set (STEPVIDEO_REFERENCE)'}")
    for name, case in cases.items():
        if args.only and name != args.only:
            continue
        overrides, n, h, w, tile, overlap, with_ref = case
        print(f"\n== {name}: latents [1, {n}, {overrides.get('z_channels', 64)}, {h}, {w}] -> "
              f"{(n // 3) * 17 + (0, 1, 9)[n % 3]} frames {16 * h}x{16 * w}; tiles {tile} latents, overlap {overlap}")
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            run_ref = have_ref and (with_ref or args.full_reference)
            impls = ["ours", "ours-tiled"] + (["reference"] if run_ref else [])
            res = {}
            for impl in impls:
                res[impl] = measure(case, impl, args.device, tmp)
                r = res[impl]
                print(f"  {impl:11s} {r['seconds']:8.2f} s   peak +{r['peak_bytes'] / 2**20:9.1f} MiB", flush=True)
            ours = torch.load(res["ours"]["out"], weights_only=True)
            tiled = torch.load(res["ours-tiled"]["out"], weights_only=True)
            print(f"  tiled / untiled: time {res['ours-tiled']['seconds'] / res['ours']['seconds']:.2f}x, "
                  f"peak {res['ours-tiled']['peak_bytes'] / res['ours']['peak_bytes']:.1%}, "
                  f"PSNR {psnr(tiled, ours):.1f} dB (max|diff| {float((tiled - ours).abs().max()):.3g}, "
                  f"output range {float(ours.min()):.2f}..{float(ours.max()):.2f})")
            if run_ref:
                ref = torch.load(res["reference"]["out"], weights_only=True)
                diff = float((ours - ref).abs().max()) / float(ref.abs().max())
                print(f"  ours / reference (untiled): time {res['ours']['seconds'] / res['reference']['seconds']:.2f}x, "
                      f"peak {res['ours']['peak_bytes'] / res['reference']['peak_bytes']:.2f}x, "
                      f"max|diff|/max|ref| {diff:.2e}")


if __name__ == "__main__":
    main()
