"""The worker pool behind the parallel sampler: its protocol and worker loop (one worker in a thread, fast), and real
pools of 2 CPU worker processes joined by gloo (slow): same latents as the single-process pipeline, cancel that stops
every worker after the same step and leaves the pool usable, a killed worker reported by rank and replaced."""

from __future__ import annotations

import io
import os
import signal
import threading
from dataclasses import replace
from multiprocessing import Pipe

import pytest
import torch
from safetensors.torch import save_file

from stepvideo_core import worker_pool as wp
from stepvideo_core.dit import load_dit
from stepvideo_core.lora import attach, load_lora, new_trainable_lora, save_lora
from stepvideo_core.pipeline import GenerationSettings, sample_latents
from stepvideo_core.pool_worker import Worker
from stepvideo_core.text_encoding import TextConditioning
from tests.builders import small_dit, text_inputs

CAPTION = (24, 12)
SETTINGS = GenerationSettings(num_frames=17, height=32, width=48, steps=6, cfg=4.0, shift=5.0, seed=5)


def conditioning(valid: int, seed: int) -> TextConditioning:
    return TextConditioning(*text_inputs(1, 320, CAPTION, (valid,), seed=seed))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A small random DiT as one .safetensors file, and a LoRA for it with non-zero up factors."""
    root = tmp_path_factory.mktemp("pool")
    dit = small_dit(heads=2, head_dim=16, layers=2, channels=4, caption=CAPTION)
    save_file({k: v.contiguous() for k, v in dit.state_dict().items()}, str(root / "dit.safetensors"))
    lora = new_trainable_lora(dit, rank=2, seed=3)
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for pair in lora.pairs.values():
            pair.up.copy_(torch.randn(pair.up.shape, generator=g) * 0.3)
    save_lora(lora, root / "lora.safetensors")
    return {"dit": str(root / "dit.safetensors"), "lora": str(root / "lora.safetensors")}


def make_job(loras=(), settings=SETTINGS, preview=False) -> wp.SampleJob:
    latents = torch.zeros(1, 3, 4, 2, 3)
    return wp.SampleJob(conditioning(7, 1), conditioning(3, 2), settings, latents, tuple(loras), preview)


def reference(path: str, job: wp.SampleJob) -> torch.Tensor:
    """The single-process pipeline on the same file, with the job's LoRAs attached."""
    dit = load_dit(path, weight_dtype=torch.float32)
    for lora_path, strength in job.loras:
        attach(dit, load_lora(lora_path, dit), strength)
    with torch.no_grad():
        return sample_latents(dit, job.positive, job.negative, job.settings, latents=job.latents)


def assert_matches(got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.shape == want.shape
    assert (got - want).abs().max() <= 1e-5 * want.abs().max(), (got - want).abs().max()


# ---- one worker in a thread: the protocol ---------------------------------------------------------------------------


class ThreadWorker:
    """A rank-0 Worker serving one end of a pipe in a thread; the test plays the parent on the other end."""

    def __init__(self, dit_path: str):
        self.conn, worker_end = Pipe()
        self.thread = threading.Thread(target=Worker(worker_end, 0, 1, "cpu").serve, daemon=True)
        self.thread.start()
        wp.send(self.conn, "load", wp.load_body(wp.DiTSpec(dit_path)))
        assert self.next() == ("loaded", {"rank": 0, "in_channels": 4, "heads": 2})

    def next(self) -> tuple[str, dict]:
        assert self.conn.poll(60), "the worker did not answer"
        return wp.receive(self.conn)

    def run(self, job_id: int, job: wp.SampleJob, cancel_at: int | None = None) -> tuple[str, dict, list[int]]:
        """Send the job, answer each step (cancel at ``cancel_at``); return the final message and the progress
        messages."""
        wp.send(self.conn, "sample", wp.job_body(job_id, job, wp.ParallelPlan()))
        steps = []
        while True:
            kind, body = self.next()
            assert body["job"] == job_id
            if kind != "progress":
                return kind, body, steps
            steps.append(body)
            assert body["total"] == job.settings.steps
            wp.send(self.conn, "continue", {"job": job_id, "cancel": body["step"] == cancel_at})

    def stop(self) -> None:
        wp.send(self.conn, "shutdown", {})
        self.thread.join(30)
        assert not self.thread.is_alive()


@pytest.fixture()
def worker(files):
    w = ThreadWorker(files["dit"])
    yield w
    w.stop()


def test_worker_samples_what_the_pipeline_samples_and_reports_every_step(worker, files):
    job = make_job()
    kind, body, steps = worker.run(0, job)
    assert kind == "done" and [p["step"] for p in steps] == list(range(1, SETTINGS.steps + 1))
    assert all(p["preview"] is None for p in steps)
    assert_matches(body["latents"], reference(files["dit"], job))


def test_previews_are_the_first_frame_of_each_steps_clean_prediction(worker):
    """At the last step the predicted clean latents are the result itself, so its preview is the result's first
    frame; earlier previews differ from it."""
    kind, body, steps = worker.run(0, make_job(preview=True))
    assert kind == "done" and len(steps) == SETTINGS.steps
    assert all(p["preview"].shape == (1, 1, 4, 2, 3) for p in steps)
    torch.testing.assert_close(steps[-1]["preview"], body["latents"][:1, :1], rtol=0, atol=1e-6)
    assert not torch.allclose(steps[0]["preview"], steps[-1]["preview"], atol=1e-3)


def test_cancel_stops_after_the_answered_step_and_the_next_job_is_whole(worker, files):
    job = make_job()
    kind, body, steps = worker.run(0, job, cancel_at=2)
    assert (kind, body["step"], body["total"], [p["step"] for p in steps]) == ("cancelled", 2, SETTINGS.steps, [1, 2])
    kind, body, _ = worker.run(1, job)
    assert kind == "done"
    assert_matches(body["latents"], reference(files["dit"], job))


def test_loras_reach_the_worker_and_are_removed_after_the_job(worker, files):
    with_lora = make_job(loras=[(files["lora"], 0.7)])
    _, body, _ = worker.run(0, with_lora)
    want = reference(files["dit"], with_lora)
    assert_matches(body["latents"], want)
    assert not torch.allclose(want, reference(files["dit"], make_job()), atol=1e-3), "the LoRA must change the video"
    _, body, _ = worker.run(1, make_job())
    assert_matches(body["latents"], reference(files["dit"], make_job()))


def test_a_bad_job_is_reported_with_its_cause_and_the_worker_serves_on(worker, files, tmp_path):
    kind, body, _ = worker.run(0, make_job(loras=[(str(tmp_path / "missing.safetensors"), 1.0)]))
    assert kind == "failed" and body["rank"] == 0
    assert "missing.safetensors" in body["error"] and "Traceback" in body["traceback"]
    kind, _, _ = worker.run(1, make_job())
    assert kind == "done"


def test_worker_exits_when_the_parent_goes_away(files):
    w = ThreadWorker(files["dit"])
    w.conn.close()
    w.thread.join(30)
    assert not w.thread.is_alive()


def test_messages_carry_data_only():
    """A message holding an object (which plain pickle would rebuild by running code) is refused when read."""
    a, b = Pipe()
    buf = io.BytesIO()
    torch.save(("sample", {"payload": GenerationSettings()}), buf)
    a.send_bytes(buf.getvalue())
    with pytest.raises(Exception, match="weights_only|Unsupported global"):
        wp.receive(b)
    wp.send(a, "continue", {"job": 3, "cancel": True, "t": torch.arange(3), "dtype": torch.float8_e4m3fn})
    kind, body = wp.receive(b)
    assert kind == "continue" and body["dtype"] is torch.float8_e4m3fn and torch.equal(body["t"], torch.arange(3))


# ---- devices, engine, messages --------------------------------------------------------------------------------------


def test_parse_devices():
    assert wp.parse_devices("all", gpu_count=3) == ("cuda:0", "cuda:1", "cuda:2")
    assert wp.parse_devices("all", workers=2, gpu_count=3) == ("cuda:0", "cuda:1")
    assert wp.parse_devices(" 2, cuda:0 ", gpu_count=3) == ("cuda:2", "cuda:0")
    assert wp.parse_devices("cpu", workers=3, gpu_count=0) == ("cpu", "cpu", "cpu")
    assert wp.parse_devices("cpu", gpu_count=0) == ("cpu",)
    with pytest.raises(ValueError, match="no CUDA GPU is visible.*'cpu'"):
        wp.parse_devices("all", gpu_count=0)
    with pytest.raises(ValueError, match="GPU 4 does not exist.*2 visible"):
        wp.parse_devices("0,4", gpu_count=2)
    with pytest.raises(ValueError, match="'gpu1' is not a GPU index"):
        wp.parse_devices("gpu1", gpu_count=2)
    with pytest.raises(ValueError, match="twice"):
        wp.parse_devices("0,cuda:0", gpu_count=2)
    with pytest.raises(ValueError, match="workers 3 but devices '0,1' lists only 2"):
        wp.parse_devices("0,1", workers=3, gpu_count=2)


def test_engine_check_names_what_is_missing(monkeypatch):
    import torch.distributed as dist

    if not torch.cuda.is_available():
        with pytest.raises(wp.PoolError, match="'cuda:0' does not exist"):
            wp.check_engine(wp.PoolConfig(("cuda:0", "cuda:1"), backend="gloo"))
    monkeypatch.setattr(dist, "is_nccl_available", lambda: False)
    with pytest.raises(wp.EngineUnavailable, match="'nccl' is not available.*Linux CUDA builds.*WSL2"):
        wp.check_engine(wp.PoolConfig(("cpu",), backend="nccl"))
    monkeypatch.setattr(dist, "is_available", lambda: False)
    with pytest.raises(wp.EngineUnavailable, match="no torch.distributed"):
        wp.check_engine(wp.PoolConfig(("cpu",)))


def test_exit_descriptions():
    assert "SIGKILL" in wp.describe_exit(-signal.SIGKILL) and "out-of-memory" in wp.describe_exit(-signal.SIGKILL)
    assert wp.describe_exit(3) == "exited with code 3"
    err = wp.WorkerDied(1, "cuda:1", 77, -signal.SIGSEGV, "sampling", last_error="CUDA error: illegal address")
    assert "worker 1 (device cuda:1, pid 77) was killed by SIGSEGV while sampling" in str(err)
    assert "illegal address" in str(err) and "next run starts fresh workers" in str(err)


# ---- real pools: 2 CPU workers joined by gloo -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def pool(files):
    p = wp.WorkerPool(wp.PoolConfig(("cpu", "cpu")), wp.DiTSpec(files["dit"]))
    p.start()
    yield p
    p.close()


@pytest.mark.slow
def test_pool_latents_equal_the_single_process_pipeline(pool, files):
    assert pool.in_channels == 4
    seen = []
    guided, unguided = make_job(), make_job(settings=replace(SETTINGS, cfg=1.0, seed=9))
    assert (pool.plan_for(guided).guidance, pool.plan_for(guided).sequence) == (2, 1)  # cond / uncond per worker
    assert (pool.plan_for(unguided).guidance, pool.plan_for(unguided).ulysses) == (1, 2)  # tokens split in two
    for job in (guided, make_job(loras=[(files["lora"], 0.7)]), unguided):
        seen.clear()
        got = pool.sample(job, on_progress=lambda step, total, preview: seen.append((step, total)))
        assert_matches(got, reference(files["dit"], job))
        assert seen == [(i, job.settings.steps) for i in range(1, job.settings.steps + 1)]


@pytest.mark.slow
def test_pool_cancel_stops_every_worker_after_the_same_step_and_the_next_run_works(pool, files):
    seen = []
    with pytest.raises(wp.SamplingCancelled) as info:
        pool.sample(make_job(), on_progress=lambda step, total, preview: seen.append(step),
                    should_cancel=lambda: len(seen) >= 2)
    assert (info.value.step, info.value.total) == (2, SETTINGS.steps) and seen == [1, 2]

    class Interrupted(Exception):  # what ComfyUI's progress hook raises on an interrupt
        pass

    def interrupt_at_3(step, total, preview):
        if step == 3:
            raise Interrupted

    with pytest.raises(Interrupted):
        pool.sample(make_job(), on_progress=interrupt_at_3)
    assert pool.running
    assert_matches(pool.sample(make_job()), reference(files["dit"], make_job()))


@pytest.mark.slow
def test_pool_reports_a_bad_job_from_every_rank_and_stays_loaded(pool, files, tmp_path):
    with pytest.raises(wp.WorkerFailed, match=r"(?s)worker 0 \(device cpu\) failed.*nowhere.safetensors.*still loaded"):
        pool.sample(make_job(loras=[(str(tmp_path / "nowhere.safetensors"), 1.0)]))
    assert pool.running
    assert_matches(pool.sample(make_job()), reference(files["dit"], make_job()))


@pytest.mark.slow
def test_a_killed_worker_is_named_and_the_next_run_starts_a_fresh_pool(files):
    p = wp.WorkerPool(wp.PoolConfig(("cpu", "cpu")), wp.DiTSpec(files["dit"]))
    try:
        p.start()
        victim = p._workers[1].process

        def kill_rank_1(step, total, preview):
            if step == 1:
                os.kill(victim.pid, signal.SIGKILL)

        with pytest.raises(wp.WorkerDied, match=r"worker 1 \(device cpu, pid \d+\) was killed by SIGKILL.* while "
                                                r"sampling.*next run starts fresh workers") as info:
            p.sample(make_job(), on_progress=kill_rank_1)
        assert info.value.rank == 1 and not p.running
        assert_matches(p.sample(make_job()), reference(files["dit"], make_job()))
        assert p._workers[1].process.pid != victim.pid
    finally:
        p.close()


@pytest.mark.slow
def test_sequence_parallel_with_sharded_weights_and_chunked_feed_forward_equals_the_pipeline(files):
    # and the feed-forward in chunks of 4 tokens (a rank holds 9): the same numbers with less activation memory
    p = wp.WorkerPool(wp.PoolConfig(("cpu", "cpu"), guidance_parallel=False, shard_weights=True),
                      wp.DiTSpec(files["dit"], ff_chunk_size=4))
    try:
        for job in (make_job(), make_job(loras=[(files["lora"], -0.5)])):
            assert_matches(p.sample(job), reference(files["dit"], job))
            plan = p.plan_for(job)
            assert (plan.guidance, plan.ulysses, plan.shard_weights) == (1, 2, True)
    finally:
        p.close()
