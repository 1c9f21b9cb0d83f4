"""Host memory of the Ray actors that hold a GGUF DiT, measured on this machine's CPU (two CPU actors, local Ray).

    python bench/bench_ray_gguf.py [--width 6144 --layers 1]

A DiT checkpoint of the release's width and reduced depth (random bf16 weights) is converted to Q8_0; then two CPU
actors load, one engine after another: the bf16 safetensors (weights kept in bf16, whole on each actor), the Q8_0
GGUF whole on each actor, and the Q8_0 GGUF sharded with FSDP2. For each, per actor: the bytes of the DiT it holds
(``stored_bytes`` from the actor) and its peak resident memory, sampled from ``/proc`` every few ms while loading:
anonymous (over that of actors that loaded the shipped 3.5 MB Step-Video-Tiny: the interpreter, torch and Ray)
and file-backed (the checkpoint's mapped pages: page cache shared by the actors of a machine, reclaimable). The point is Raylight
issue #96 (two workers loading a 14.7 GB GGUF exhausted 64 GB of RAM): an actor here should peak at about the
quantized bytes it keeps plus one tensor, never at a dequantized copy.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.bench_gguf import write_full_width_dit  # noqa: E402
from bench.measure import mib  # noqa: E402


class ActorMemory:
    """Samples the resident memory of this machine's Ray workers (the DiT actors among them) every few ms,
    split as Linux does: anonymous (what the process itself allocated) and file-backed (pages of mapped files,
    shared by every process that maps the same file and reclaimable)."""

    def __enter__(self):
        self.peaks: dict[int, dict[str, int]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self._sample(self.peaks)

    def _run(self):
        pids, scanned = [], 0.0
        while not self._stop.is_set():
            if time.monotonic() - scanned > 0.1:  # new workers; reading every process's cmdline is the slow part
                pids, scanned = _actor_pids(), time.monotonic()
            self._sample(pids)
            time.sleep(0.002)

    def _sample(self, pids):
        for pid in list(pids):
            sample = _rss(pid)
            if sample:
                peak = self.peaks.setdefault(pid, {"anon": 0, "file": 0, "total": 0})
                for k, v in sample.items():
                    peak[k] = max(peak[k], v)


def _actor_pids() -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    if f.read(5) == b"ray::":  # Ray workers (the actors among them)
                        pids.append(int(entry))
            except OSError:
                pass
    return pids


def _rss(pid: int) -> dict[str, int] | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            fields = dict(line.split(":", 1) for line in f if line.startswith(("RssAnon", "RssFile")))
    except OSError:
        return None
    if len(fields) < 2:  # a process that is exiting has no memory lines
        return None
    anon, file = (int(fields[k].split()[0]) * 1024 for k in ("RssAnon", "RssFile"))
    return {"anon": anon, "file": file, "total": anon + file}


def load_on_actors(path: Path, **spec) -> tuple[list[dict], int]:
    """(each actor's peak anonymous / file-backed / total RSS, bytes rank 0 holds) while two CPU actors load
    ``path``."""
    from stepvideo_core.distributed.actor import DiTSpec
    from stepvideo_core.distributed.engine import EngineConfig, RayEngine

    engine = RayEngine(EngineConfig(devices=("cpu", "cpu"), cluster="auto", collective_timeout_s=120),
                       DiTSpec(str(path), **spec))
    try:
        with ActorMemory() as memory:
            engine.start()
        return [memory.peaks[r["pid"]] for r in engine.ranks], engine.model_info["stored_bytes"]
    finally:
        engine.close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--width", type=int, default=6144)
    p.add_argument("--layers", type=int, default=1)
    args = p.parse_args()
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", "131072")  # freed tensors go back to the OS (as measure.py)
    import ray
    import torch

    from stepvideo_core.quantize import convert
    from stepvideo_core.tiny import model as tiny

    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "dit.safetensors"
        write_full_width_dit(src, args.width, args.layers)
        q8 = convert(src, "Q8_0", Path(tmp) / "dit_q8.gguf").out
        ray.init(num_cpus=4, include_dashboard=False)
        try:
            base, _ = load_on_actors(tiny.TINY_DIR / "transformer", weight_dtype=torch.float32)
            rows = [("bf16 safetensors, whole", load_on_actors(src, weight_dtype=torch.bfloat16)),
                    ("Q8_0 GGUF, whole", load_on_actors(q8, weight_dtype=torch.float32)),
                    ("Q8_0 GGUF, shard_weights", load_on_actors(q8, weight_dtype=torch.float32, shard_weights=True))]
        finally:
            ray.shutdown()
        base_anon = max(b["anon"] for b in base)
        print(f"width {args.width}, {args.layers} block(s); bf16 file {mib(src.stat().st_size)}, Q8_0 file "
              f"{mib(q8.stat().st_size)}; actors' baseline peak anonymous RSS (tiny DiT) {mib(base_anon)}")
        print("| load | held by rank 0 | peak anonymous RSS over baseline, rank 0 / 1 | peak file-backed RSS, rank 0 / 1 |")
        print("| --- | --- | --- | --- |")
        for name, (peaks, held) in rows:
            anon = " / ".join(mib(p["anon"] - b["anon"]) for p, b in zip(peaks, base))
            file = " / ".join(mib(p["file"]) for p in peaks)
            print(f"| {name} | {mib(held)} | {anon} | {file} |", flush=True)


if __name__ == "__main__":
    main()
