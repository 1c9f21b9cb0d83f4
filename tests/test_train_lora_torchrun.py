"""Several processes train the same LoRA as one: torchrun with 2 processes (gloo), the frozen DiT sharded by FSDP2
and the adapters data parallel, against one process accumulating the same two samples one at a time."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from stepvideo_core import train_lora
from stepvideo_core.tiny.lora_lesson import write_clips

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow  # two torchrun processes load the tiny model: about 20 s on 2 cores
def test_torchrun_two_processes_equal_one(tmp_path):
    write_clips(tmp_path / "clips", count=4, seed=1)
    args = ["--data", str(tmp_path / "clips"), "--steps", "3", "--batch-size", "2", "--seed", "1", "--quiet",
            "--cache-dir", str(tmp_path / "cache")]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:  # one process: the two samples of each step one after the other, gradients summed (as the all-reduce does)
        train_lora.main(args + ["--out", str(tmp_path / "one.safetensors"), "--micro-batch", "1"])
    finally:
        torch.set_num_threads(threads)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr",
                          "127.0.0.1", "--master-port", str(free_port()), "-m", "stepvideo_core.train_lora", *args,
                          "--out", str(tmp_path / "two.safetensors")], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "sharded over 2 processes (FSDP2)" in run.stderr
    one, two = load_file(str(tmp_path / "one.safetensors")), load_file(str(tmp_path / "two.safetensors"))
    assert one.keys() == two.keys()
    factors = [k for k in one if not k.endswith(".alpha")]
    largest = max(float(one[k].abs().max()) for k in factors)
    assert all(float(one[k].abs().max()) > 0 for k in factors if "lora_up" in k)  # the adapters did move
    worst = max(float((one[k] - two[k]).abs().max()) for k in factors)
    assert worst <= 1e-5 * largest, (worst, largest)  # measured: 0 (bit for bit)
