"""The CUDA checks' report: each test's outcome and the figures it recorded, written as JSON when
``STEPVIDEO_GPU_REPORT`` names a file (``scripts/gpu_check.sh`` sets it; a plain pytest run writes nothing).

A test records its figures (errors, peaks, tolerances) in the ``figures`` dict before it asserts, so a failed
check still reports how far off it was."""

from __future__ import annotations

import gc
import importlib.metadata
import json
import math
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPORT_ENV = "STEPVIDEO_GPU_REPORT"
_RESULTS = pytest.StashKey[dict]()
_ENVIRONMENT = pytest.StashKey[dict]()
PACKAGES = ("torch", "triton", "sageattention", "gguf", "transformers", "tokenizers", "safetensors", "einops",
            "numpy", "pytest")


def _results(config: pytest.Config) -> dict:
    if _RESULTS not in config.stash:
        config.stash[_RESULTS] = {}
    return config.stash[_RESULTS]


def _entry(config: pytest.Config, nodeid: str) -> dict:
    return _results(config).setdefault(nodeid, {"test": nodeid, "outcome": "not run", "figures": {}})


@pytest.fixture(autouse=True)
def free_gpu_memory():
    """Each check starts with the previous one's tensors gone, so peaks and out-of-memory errors are its own."""
    yield
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


@pytest.fixture
def figures(request) -> dict:
    """A dict the test fills with its figures; they go to the report under the test's id."""
    return _entry(request.config, request.node.nodeid)["figures"]


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    entry = _entry(item.config, item.nodeid)
    if report.when == "call" or report.outcome != "passed":
        if entry["outcome"] in ("not run", "passed"):  # a teardown error after a pass still counts as a failure
            entry["outcome"] = "error" if report.when != "call" and report.failed else report.outcome
            entry["message"] = _message(report)
        entry["seconds"] = round(entry.get("seconds", 0.0) + report.duration, 3)
    if report.when == "teardown":
        write_report(item.config)  # after every test, so a run killed by its time limit keeps what it had


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    """A module that fails to import (a package missing on the GPU machine) is a failed check too."""
    outcome = yield
    report = outcome.get_result()
    if report.failed:
        entry = _entry(collector.config, report.nodeid)
        entry.update(outcome="error", message="collection failed: " + _message(report))
        write_report(collector.config)


def _message(report) -> str:
    if report.passed:
        return ""
    if report.skipped and isinstance(report.longrepr, tuple):
        return str(report.longrepr[2]).removeprefix("Skipped: ")
    text = report.longreprtext.strip().splitlines()
    errors = [line for line in text if line.startswith("E ")]
    return "\n".join((errors or text)[-12:])


def environment() -> dict:
    """What the figures were measured with: the card, torch and CUDA, and the packages the checks use."""
    env = {"python": sys.version.split()[0], "platform": platform.platform(), "torch": torch.__version__,
           "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(), "cuda_available": torch.cuda.is_available(),
           "packages": {}}
    for name in PACKAGES:
        try:
            env["packages"][name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            env["packages"][name] = None
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env.update(device=props.name, capability=f"{props.major}.{props.minor}", gpu_memory_bytes=props.total_memory,
                   multiprocessors=props.multi_processor_count, driver=_driver_version())
    else:
        env["device"] = platform.processor() or platform.machine() or "cpu"
    return env


def _driver_version() -> str | None:
    try:
        done = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip().splitlines()[0] if done.returncode == 0 and done.stdout.strip() else None


def plain(value):
    """JSON without NaN or Infinity (not JSON): non-finite floats become strings; tensors and dtypes are named."""
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return plain(value.item())
    if value is None or isinstance(value, (bool, int, str)):
        return value
    return str(value)


def write_report(config: pytest.Config, exit_status: int | None = None) -> None:
    path = os.environ.get(REPORT_ENV)
    if not path:
        return
    if _ENVIRONMENT not in config.stash:
        config.stash[_ENVIRONMENT] = environment()
    tests = list(_results(config).values())
    counts = {}
    for t in tests:
        counts[t["outcome"]] = counts.get(t["outcome"], 0) + 1
    report = {"environment": config.stash[_ENVIRONMENT], "finished": exit_status is not None,
              "exit_status": exit_status, "counts": counts, "tests": tests}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(plain(report), indent=1))


def pytest_sessionfinish(session, exitstatus):
    write_report(session.config, int(exitstatus))
