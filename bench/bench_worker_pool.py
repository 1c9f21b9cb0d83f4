"""What the worker pool behind the parallel sampler adds per denoising step, measured side by side in one run.

    python bench/bench_worker_pool.py              # 100 steps of a small DiT, CPU
    python bench/bench_worker_pool.py --steps 300

One worker process (no split, so the DiT does the same work in both) against the same DiT called in this process:
the difference per step is the pool's own cost. Per step, rank 0 reports the step and waits for the parent's answer
(two small messages over a local socket), and with previews on one latent frame travels with the report. The DiT
is small on purpose so that this cost is visible at all; next to a step of the 30B DiT (seconds) it is what the
table shows in milliseconds. Also measured: starting the pool (a fresh interpreter importing torch, joining the
process group, loading the DiT) and the first job's extra cost.

One run (2 CPU cores shared with other jobs, load average 13-19; 100 steps):

| | per step (ms) | pool cost per step (ms) | ratio to in-process |
|---|---|---|---|
| in this process | 10.82 | - | 1.00 |
| one worker process | 18.40 | 7.59 | 1.70 |
| one worker, previews on | 24.12 | 13.30 | 2.23 |
| the two messages alone (in one process, no scheduling) | - | 0.89 | - |

So about 1 ms per step is the messages themselves and the rest waiting for a core on a loaded machine; next to a
step of the 30B DiT (the official 743 s for 50 steps on 4 GPUs is about 15 s a step) either is below 0.1%. Starting the pool took 10-26 s here, almost all of it
importing torch in each worker; the first job is no slower than later ones.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from bench.measure import timed  # noqa: E402
from stepvideo_core import worker_pool as wp  # noqa: E402
from stepvideo_core.dit import load_dit  # noqa: E402
from stepvideo_core.pipeline import GenerationSettings, sample_latents  # noqa: E402
from stepvideo_core.text_encoding import TextConditioning  # noqa: E402
from tests.builders import small_dit, text_inputs  # noqa: E402

CAPTION = (24, 12)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=100)
    args = p.parse_args()
    torch.set_num_threads(1)  # the worker runs with what it inherits; keep both sides alike

    with tempfile.TemporaryDirectory() as tmp:
        path = str(Path(tmp) / "dit.safetensors")
        dit = small_dit(heads=2, head_dim=16, layers=2, channels=4, caption=CAPTION)
        save_file({k: v.contiguous() for k, v in dit.state_dict().items()}, path)
        dit = load_dit(path, weight_dtype=torch.float32)
        pos, neg = (TextConditioning(*text_inputs(1, 320, CAPTION, (n,), seed=s)) for n, s in ((7, 1), (3, 2)))
        settings = GenerationSettings(steps=args.steps, cfg=4.0, shift=5.0, seed=1)
        latents = torch.zeros(1, 3, 4, 4, 6)
        job = wp.SampleJob(pos, neg, settings, latents)
        previews = wp.SampleJob(pos, neg, settings, latents, preview=True)

        def in_process():
            with torch.no_grad():
                return sample_latents(dit, pos, neg, settings, latents=latents)

        pool = wp.WorkerPool(wp.PoolConfig(("cpu",)), wp.DiTSpec(path))
        t0 = time.perf_counter()
        pool.start()
        start_s = time.perf_counter() - t0
        try:
            t0 = time.perf_counter()
            pool.sample(job)
            first_s = time.perf_counter() - t0
            local = timed(in_process)
            pooled = timed(lambda: pool.sample(job))
            with_previews = timed(lambda: pool.sample(previews, on_progress=lambda step, total, preview: None))
            same = torch.equal(pool.sample(job), in_process())
        finally:
            pool.close()

    n = args.steps
    # The messages' own cost, without processes: one step's report and answer written and read back in memory.
    from multiprocessing import Pipe

    a, b = Pipe()

    def round_trip():
        for _ in range(n):
            wp.send(a, "progress", {"job": 0, "step": 1, "total": n, "preview": None})
            wp.receive(b)
            wp.send(b, "continue", {"job": 0, "cancel": False})
            wp.receive(a)

    messages = timed(round_trip)

    print(f"Small DiT (2 blocks, 72 tokens, guided), {n} steps, 1 CPU thread each, median of 3; pool latents equal "
          f"in-process latents: {same}")
    print("| | per step (ms) | pool cost per step (ms) | ratio to in-process |")
    print("|---|---|---|---|")
    print(f"| in this process | {1e3 * local / n:.2f} | - | 1.00 |")
    print(f"| one worker process | {1e3 * pooled / n:.2f} | {1e3 * (pooled - local) / n:.2f} | {pooled / local:.2f} |")
    print(f"| one worker, previews on | {1e3 * with_previews / n:.2f} | {1e3 * (with_previews - local) / n:.2f} | "
          f"{with_previews / local:.2f} |")
    print(f"| the two messages alone (in one process, no scheduling) | - | {1e3 * messages / n:.2f} | - |")
    print(f"\nStarting the pool (interpreter, torch import, process group, DiT load): {start_s:.1f} s; the first job "
          f"took {first_s:.2f} s, later ones {pooled:.2f} s.")


if __name__ == "__main__":
    main()
