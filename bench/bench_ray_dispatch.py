"""What the Ray engine's per-step dispatch costs next to a modelled step of the release model.

    python bench/bench_ray_dispatch.py            # measures on a local Ray (about a minute on 2 CPU cores)
    python bench/bench_ray_dispatch.py --repeats 3

From the shapes (992x544, 204 frames: latents 64 x 36 x 34 x 62, guided: batch 2, bf16 as ComfyUI hands the DiT
its input): each step sends the latents once into Ray's object store (every rank on a node reads the same copy)
and receives rank 0's output; the conditioning (Step-LLM 320 x 6144 and CLIP 77 x 1024 states, mask) crosses once
per run, under a content hash; later steps only compare it with the last one sent.

Measured here, on a local Ray (object store in shared memory): the round trip of one dispatch with two actors that
only echo (no DiT), i.e. ``ray.put`` + two actor calls + fetching the result, and the content hash of the
conditioning and the per-step comparison. Modelled: a step's time from its FLOPs at a stated throughput (``bench_parallel.step_flops`` at
``GPU_FLOPS``) divided over N GPUs, and the transfer over 10 Gb/s and 1 Gb/s links when ComfyUI and the actors sit on
different machines (bytes / bandwidth, both directions, no overlap).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench.bench_parallel import GPU_FLOPS, step_flops  # noqa: E402
from bench.measure import emit  # noqa: E402
from stepvideo_core.distributed.actor import pack, unpack  # noqa: E402
from stepvideo_core.distributed.engine import RemoteDiT, conditioning_key  # noqa: E402

LATENT = (2, 64, 36, 34, 62)  # guided batch, channels, latent frames, height, width
LLM, CLIP = (2, 320, 6144), (2, 77, 1024)
LINKS = {"10 Gb/s": 10e9 / 8, "1 Gb/s": 1e9 / 8}
GPUS = (2, 4, 8)


class Echo:
    """Stands in for a DiT rank: receives the call, rank 0 answers with a tensor of the latents' size."""

    def __init__(self, rank: int):
        self.rank = rank

    def forward(self, call: dict):
        x = unpack(call["x"])
        return {"out": pack(torch.empty(x.shape, dtype=x.dtype)) if self.rank == 0 else None}


def measure(repeats: int) -> dict:
    import ray

    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        actors = [ray.remote(Echo).options(num_cpus=1).remote(r) for r in range(2)]
        ray.get([a.__ray_ready__.remote() for a in actors])
        x = torch.randn(LATENT).to(torch.bfloat16)
        call = {"x": x, "t": torch.full((2,), 0.5), "cond_key": "k", "options": {"sigmas": torch.full((2,), 0.5)}}
        times = []
        for i in range(repeats + 1):
            start = time.perf_counter()
            ref = ray.put({**call, "x": pack(x)})  # as RemoteDiT sends it
            answers = ray.get([a.forward.remote(ref) for a in actors])
            out = unpack(answers[0]["out"]).to("cpu", copy=True)
            if i:  # the first round warms the workers up
                times.append(time.perf_counter() - start)
        assert out.shape == LATENT
    finally:
        ray.shutdown()
    bundle = {"llm_states": torch.randn(LLM).to(torch.bfloat16), "mask": torch.ones(LLM[:2]),
              "clip_states": torch.randn(CLIP).to(torch.bfloat16), "condition": None, "motion_score": None}
    hashes, checks = [], []
    remote = RemoteDiT(engine=None)
    for _ in range(repeats):
        start = time.perf_counter()
        conditioning_key(bundle)
        hashes.append(time.perf_counter() - start)
        again = {k: None if v is None else v.clone() for k, v in bundle.items()}  # a new step's equal tensors
        remote._key(bundle)
        start = time.perf_counter()
        remote._key(again)  # every step after the first: an exact comparison
        checks.append(time.perf_counter() - start)
    return {"dispatch_s": statistics.median(times), "hash_s": statistics.median(hashes),
            "check_s": statistics.median(checks)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    latents_bytes = 2
    for n in LATENT:
        latents_bytes *= n
    cond_bytes = 2 * (LLM[0] * LLM[1] * LLM[2] + CLIP[0] * CLIP[1] * CLIP[2]) + 4 * LLM[0] * LLM[1]
    per_step = 2 * latents_bytes  # in and out
    one_gpu_step = step_flops() / GPU_FLOPS
    got = measure(args.repeats)
    local = got["dispatch_s"] + got["check_s"]
    print("## Per-step dispatch of the Ray engine at 992x544, 204 frames, guided, bf16\n")
    print(f"- latents in: {latents_bytes / 1e6:.1f} MB, output back: {latents_bytes / 1e6:.1f} MB per step; "
          f"conditioning {cond_bytes / 1e6:.1f} MB once per run")
    print(f"- measured here (2 CPU cores, local Ray, 2 echo actors): dispatch round trip {got['dispatch_s'] * 1e3:.1f} "
          f"ms; conditioning check per step {got['check_s'] * 1e3:.1f} ms (its hash, once per run: "
          f"{got['hash_s'] * 1e3:.1f} ms); per step together {local * 1e3:.1f} ms")
    print(f"- modelled step: {step_flops() / 1e15:.0f} PFLOP at {GPU_FLOPS / 1e12:.0f} TFLOP/s = {one_gpu_step:.1f} s "
          "on one GPU, divided by N GPUs (ideal split)\n")
    print("| GPUs | modelled step | same host (measured) | 10 Gb/s link | 1 Gb/s link |")
    print("| --- | --- | --- | --- | --- |")
    rows = []
    for n in GPUS:
        step = one_gpu_step / n
        cells = [f"{local * 1e3:.0f} ms = {100 * local / step:.2f}%"]
        row = {"gpus": n, "step_s": step, "same_host_s": local}
        for name, bandwidth in LINKS.items():
            cost = local + per_step / bandwidth
            cells.append(f"{cost * 1e3:.0f} ms = {100 * cost / step:.1f}%")
            row[name] = cost
        rows.append(row)
        print(f"| {n} | {step:.2f} s | " + " | ".join(cells) + " |")
    emit({"bench": "ray_dispatch", "latents_bytes": latents_bytes, "conditioning_bytes": cond_bytes, **got, "rows": rows})


if __name__ == "__main__":
    main()
