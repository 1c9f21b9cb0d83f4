"""Measurement helpers shared by the benchmarks: peak resident memory and wall time, each variant in its own process."""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def max_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class PeakRSS:
    """Samples this process's resident memory every millisecond; ``peak_delta`` is the rise over the start."""

    def __enter__(self):
        self.start = rss_bytes()
        self.peak = self.start
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes())
            time.sleep(0.001)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())

    @property
    def peak_delta(self) -> int:
        return self.peak - self.start


def timed(fn, repeats: int = 3, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def run_variant(script: str, *args: str, env: dict | None = None) -> dict:
    """Run ``script --child ARGS`` in a fresh interpreter; it prints one JSON line as its last output."""
    # A fixed mmap threshold makes glibc return every large freed block to the OS at once, so resident memory
    # follows live tensors instead of whatever the heap happened to keep from earlier work in the process.
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MALLOC_MMAP_THRESHOLD_": "131072", **(env or {})}
    out = subprocess.run([sys.executable, script, "--child", *args], capture_output=True, text=True, env=env, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"{script} {' '.join(args)} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def emit(result: dict) -> None:
    print(json.dumps(result), flush=True)


def mib(n: float) -> str:
    return f"{n / 2**20:,.0f} MiB"
