"""Fault catalogue, parallel runs: the worker pool behind the parallel sampler, serving the shipped Step-Video-Tiny.

A worker in a thread (fast) gets bad jobs (NaN guidance, a LoRA that does not fit, a cancel part-way) and must say
what was wrong and serve the next job exactly; a pool of two CPU worker processes (slow) is interrupted and has a
worker killed part-way, and must name it and give exact latents on the next run. Through the ``tiny`` fixture the
in-process models must also be unchanged.
"""

from __future__ import annotations

import math
import os
import signal
import threading
from dataclasses import replace
from multiprocessing import Pipe

import pytest
import torch
from safetensors.torch import save_file

from stepvideo_core import worker_pool as wp
from stepvideo_core.distributed import ParallelPlan
from stepvideo_core.pipeline import sample_latents
from stepvideo_core.pool_worker import Worker
from stepvideo_core.text_encoding import encode_prompts
from stepvideo_core.tiny import model as tiny_model
from tests.fault_fixtures import tiny_fixture

# The catalogue reloads or probes the tiny model around every fault: a few minutes in all, so it runs with the
# slow set (scripts/run_tests.sh --all, as CI does).
pytestmark = pytest.mark.slow

tiny = tiny_fixture()
SETTINGS = replace(tiny_model.SETTINGS, height=32, width=32, steps=4)
TRANSFORMER = str(tiny_model.paths()["transformer"])


@pytest.fixture
def job(tiny):
    with torch.no_grad():
        pos, neg = encode_prompts(tiny.text, "a yellow circle moves down", after="keep")
    return wp.SampleJob(pos, neg, SETTINGS, torch.zeros(1, 3, 16, 2, 2))


def in_process(tiny, job):
    with torch.no_grad():
        return sample_latents(tiny.dit, job.positive, job.negative, job.settings, latents=job.latents)


class ThreadWorker:
    """Rank 0 of a one-worker pool serving a pipe in a thread; the test answers its steps as the pool would."""

    def __init__(self):
        self.conn, end = Pipe()
        self.thread = threading.Thread(target=Worker(end, 0, 1, "cpu").serve, daemon=True)
        self.thread.start()
        wp.send(self.conn, "load", wp.load_body(wp.DiTSpec(TRANSFORMER)))
        assert self.next()[0] == "loaded"

    def next(self):
        assert self.conn.poll(120), "the worker did not answer"
        return wp.receive(self.conn)

    def run(self, job_id, job, cancel_at=None):
        wp.send(self.conn, "sample", wp.job_body(job_id, job, ParallelPlan()))
        while True:
            kind, body = self.next()
            if kind != "progress":
                return kind, body
            wp.send(self.conn, "continue", {"job": job_id, "cancel": body["step"] == cancel_at})

    def stop(self):
        wp.send(self.conn, "shutdown", {})
        self.thread.join(30)


@pytest.fixture
def worker():
    w = ThreadWorker()
    yield w
    w.stop()


def test_worker_gets_nan_guidance_names_it_and_serves_on(tiny, worker, job):
    kind, body = worker.run(0, replace(job, settings=replace(SETTINGS, cfg=math.nan)))
    assert kind == "failed" and "cfg (guidance scale) is nan" in body["error"]
    kind, body = worker.run(1, job)
    assert kind == "done" and torch.equal(body["latents"], in_process(tiny, job))


def test_worker_gets_a_lora_that_does_not_fit_names_the_layer_and_serves_on(tiny, worker, job, tmp_path):
    lora = tmp_path / "wide.safetensors"
    save_file({"diffusion_model.transformer_blocks.0.attn1.wo.lora_up.weight": torch.zeros(6144, 4),
               "diffusion_model.transformer_blocks.0.attn1.wo.lora_down.weight": torch.zeros(4, 6144)}, str(lora))
    kind, body = worker.run(0, replace(job, loras=((str(lora), 1.0),)))
    assert kind == "failed" and "wide.safetensors" in body["error"]
    assert "layer transformer_blocks.0.attn1.wo" in body["error"]
    kind, body = worker.run(1, job)
    assert kind == "done" and torch.equal(body["latents"], in_process(tiny, job)), "no LoRA left attached"


def test_worker_cancelled_mid_run_stops_at_that_step_and_the_next_run_is_exact(tiny, worker, job):
    kind, body = worker.run(0, job, cancel_at=2)
    assert (kind, body["step"], body["total"]) == ("cancelled", 2, 4)
    kind, body = worker.run(1, job)
    assert kind == "done" and torch.equal(body["latents"], in_process(tiny, job))


@pytest.mark.slow
def test_pool_interrupted_then_a_worker_killed_mid_run(tiny, job):
    pool = wp.WorkerPool(wp.PoolConfig(("cpu", "cpu")), wp.DiTSpec(TRANSFORMER))
    want = in_process(tiny, job)
    try:
        seen = []
        with pytest.raises(wp.SamplingCancelled):
            pool.sample(job, on_progress=lambda step, total, *preview: seen.append(step),
                        should_cancel=lambda: len(seen) >= 2)
        assert seen == [1, 2] and pool.running
        assert (pool.sample(job) - want).abs().max() <= 1e-5 * want.abs().max()

        victim = pool._workers[1].process

        def kill_rank_1(step, total, *preview):
            if step == 1:
                os.kill(victim.pid, signal.SIGKILL)

        with pytest.raises(wp.WorkerDied, match=r"worker 1 \(device cpu, pid \d+\) was killed by SIGKILL.*next run "
                                                r"starts fresh workers"):
            pool.sample(job, on_progress=kill_rank_1)
        assert not pool.running
        assert (pool.sample(job) - want).abs().max() <= 1e-5 * want.abs().max()
    finally:
        pool.close()
