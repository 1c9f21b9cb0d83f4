"""A pool of persistent worker processes that sample Step-Video latents on several devices of one machine.

``WorkerPool`` starts one process per device, joins them in one torch.distributed group (NCCL when every device is
a GPU, gloo otherwise), has each load the DiT itself from the same file, and keeps them between jobs. A job carries
the conditioning tensors, the settings, the starting latents and the LoRAs as (file, strength); rank 0 reports each
step and returns the latents.

Why plain processes and torch.distributed rather than Ray or ``torch.multiprocessing.spawn``: the parallel forward
runs on torch.distributed in any case (the same code as a ``torchrun`` launch), so a second cluster runtime adds a
large dependency and buys nothing on one machine. ``spawn`` re-runs the parent's ``__main__`` in every child (under
ComfyUI that is ``main.py``, custom-node prestartup scripts included) and imports the target by the parent's module
name, which for a custom node is not importable. So each worker is a fresh interpreter (``subprocess`` running
``pool_worker.main``) that imports ``stepvideo_core`` alone and talks to the parent over an authenticated local
socket (``multiprocessing.connection``).

Protocol: each message is ``(kind, body)``, ``body`` a dict of plain values, dtypes and CPU tensors, written with
``torch.save`` and read with ``torch.load(weights_only=True)``, so a message carries data, never code.

- parent -> worker: ``load`` {spec, shard_weights}, ``sample`` {job, plan, positive, negative, settings, latents,
  loras, preview}, ``continue`` {job, cancel} (the answer to each ``progress``), ``shutdown`` {}
- worker -> parent: ``hello`` {rank, pid}, ``loaded`` {rank, in_channels, heads}, ``progress`` {job, step, total,
  preview} (rank 0 only), ``done`` {job, rank, latents (rank 0) or None}, ``cancelled`` {job, rank, step, total},
  ``failed`` {job, rank, error, traceback}

Cancel: after each step rank 0 reports it and waits for the parent's answer (one local round trip, nothing next to a
DiT step), then broadcasts the answer to the other ranks. So every rank stops after the same step, the step at which
the parent decided, none is left waiting in a collective, and the pool stays loaded for the next job. A worker that
dies (its socket closes) shuts the whole pool down with an error naming it; a worker that fails while the others
are stuck in a collective does the same after a grace period.
"""

from __future__ import annotations

import io
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import traceback
import weakref
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from multiprocessing import AuthenticationError
from multiprocessing.connection import Connection, answer_challenge, deliver_challenge, wait
from pathlib import Path

import torch

from .parallel import ParallelPlan
from .pipeline import GenerationSettings
from .scheduler import guidance_on
from .text_encoding import TextConditioning

HOST = "127.0.0.1"
ROOT = Path(__file__).resolve().parents[1]  # the folder holding stepvideo_core, put on the workers' sys.path
# What each worker runs: a fresh interpreter importing only the core package (the root comes from the environment,
# so no path is ever spliced into code).
WORKER_BOOT = ("import os, sys; sys.path.insert(0, os.environ['STEPVIDEO_POOL_ROOT']); "
               "from stepvideo_core.pool_worker import main; main()")
WORKER_HINT = "Its own output (traceback, CUDA or NCCL messages) is in this console above."

# (steps done, total steps, preview): the preview is the first latent frame of the first sample of this step's
# predicted clean latents, ``[1, 1, C, h, w]``, when the job asked for previews, else None.
ProgressFn = Callable[[int, int, "torch.Tensor | None"], None]
CancelFn = Callable[[], bool]


# ---- errors -------------------------------------------------------------------------------------------------------


class PoolError(RuntimeError):
    """The pool could not start or a job could not run."""


class EngineUnavailable(PoolError):
    """torch.distributed (or the backend the devices need) is missing from this torch build."""


class WorkerDied(PoolError):
    def __init__(self, rank: int, device: str, pid: int, exitcode: int | None, doing: str, last_error: str = ""):
        self.rank, self.device, self.exitcode = rank, device, exitcode
        said = f" Its last error: {last_error}." if last_error else ""
        super().__init__(
            f"Step-Video worker {rank} (device {device}, pid {pid}) {describe_exit(exitcode)} while {doing}.{said} "
            f"{WORKER_HINT} The worker pool was shut down; the next run starts fresh workers (they reload the DiT)."
        )


class WorkerFailed(PoolError):
    def __init__(self, rank: int, device: str, error: str, worker_traceback: str, pool_stopped: bool):
        self.rank, self.device, self.error, self.worker_traceback = rank, device, error, worker_traceback
        then = ("The other workers were stuck waiting for it, so the pool was shut down; the next run starts fresh "
                "workers." if pool_stopped else "The pool is still loaded; fix the input and run again.")
        super().__init__(f"Step-Video worker {rank} (device {device}) failed: {error}\n{then}\n"
                         f"Worker traceback:\n{worker_traceback}")


class SamplingCancelled(PoolError):
    def __init__(self, step: int, total: int):
        self.step, self.total = step, total
        super().__init__(f"sampling cancelled after step {step} of {total}; every worker stopped and stays loaded"
                         if total else "cancelled while the workers were starting; they were stopped")


def describe_exit(exitcode: int | None) -> str:
    if exitcode is None:
        return "closed its connection"
    if exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = f"signal {-exitcode}"
        why = " (often the out-of-memory killer: check free host RAM)" if -exitcode == signal.SIGKILL else ""
        return f"was killed by {name}{why}"
    return f"exited with code {exitcode}"


# ---- what the parent asks for ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DiTSpec:
    """What each worker loads: a DiT file or official ``transformer/`` folder and how to hold it."""

    path: str
    weight_dtype: torch.dtype = torch.float32
    compute_dtype: torch.dtype | None = None  # None: bf16 for fp8 weights, else the weight dtype (as load_dit)
    attention: str = "sdpa"  # a stepvideo_core.attention backend name
    ff_chunk_size: int = 0  # DiTConfig.ff_chunk_size: the feed-forward over at most this many tokens at a time


@dataclass(frozen=True)
class PoolConfig:
    """One worker per entry of ``devices`` (``"cuda:1"``, ``"cpu"``); rank i runs on ``devices[i]``. The split of
    each job follows ``parallel.ParallelPlan.choose`` (as the command line under torchrun does): guidance parallel
    when the worker count is even and the job is guided (unless ``guidance_parallel`` says otherwise), sequence
    parallel over the rest, and with ``shard_weights`` the DiT's blocks sharded over all workers (FSDP2)."""

    devices: tuple[str, ...]
    guidance_parallel: bool | None = None
    ulysses: int | None = None  # None: as many heads as the ranks of a branch allow, ring attention for the rest
    shard_weights: bool = False
    backend: str | None = None  # None: "nccl" when every device is a GPU, else "gloo"
    connect_timeout_s: float = 180.0  # each worker must import torch and connect within this
    failure_grace_s: float = 10.0  # after one rank fails, how long the others get to report before the pool stops
    python: str = sys.executable

    def __post_init__(self):
        if not self.devices:
            raise ValueError("a worker pool needs at least one device")

    @property
    def world_size(self) -> int:
        return len(self.devices)

    def resolved_backend(self) -> str:
        if self.backend:
            return self.backend
        return "nccl" if all(torch.device(d).type == "cuda" for d in self.devices) else "gloo"


@dataclass
class SampleJob:
    """One sampling run: ``latents`` fixes the shape (and is the start when ``settings.denoise < 1``); the noise is
    drawn by every worker from ``settings.seed`` exactly as ``pipeline.sample_latents`` draws it."""

    positive: TextConditioning
    negative: TextConditioning | None
    settings: GenerationSettings
    latents: torch.Tensor
    loras: tuple[tuple[str, float], ...] = ()
    preview: bool = False  # rank 0 sends each step's preview latents with its progress


def parse_devices(devices: str, workers: int = 0, gpu_count: int | None = None) -> tuple[str, ...]:
    """One device per worker from what a user types: ``"all"`` (every visible GPU), GPU indices or ``cuda:N``
    separated by commas, or ``"cpu"``. ``workers`` > 0 takes the first that many (with ``"cpu"``: that many CPU
    workers); 0 takes one per device listed."""
    if gpu_count is None:
        gpu_count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    text = devices.strip().lower()
    if text == "all":
        if gpu_count == 0:
            raise ValueError("devices 'all': no CUDA GPU is visible to ComfyUI. Use 'cpu' (with workers >= 1) to run CPU "
                             "workers, which is slow and meant for testing.")
        entries = [f"cuda:{i}" for i in range(gpu_count)]
    else:
        entries = []
        for part in (p.strip() for p in text.split(",")):
            if part == "cpu":
                entries.append("cpu")
                continue
            index = part.removeprefix("cuda:")
            if not index.isdigit():
                raise ValueError(f"devices {devices!r}: {part!r} is not a GPU index, 'cuda:N' or 'cpu'. Examples: 'all', "
                                 "'0,1', 'cuda:2,cuda:3', 'cpu'.")
            if int(index) >= gpu_count:
                raise ValueError(f"devices {devices!r}: GPU {index} does not exist (this machine has {gpu_count} "
                                 "visible CUDA GPU(s), numbered from 0).")
            entries.append(f"cuda:{int(index)}")
    if workers < 0:
        raise ValueError(f"workers {workers} must be 0 (one per device) or more")
    if entries == ["cpu"] and workers > 0:
        entries = ["cpu"] * workers
    elif workers > len(entries):
        raise ValueError(f"workers {workers} but devices {devices!r} lists only {len(entries)}; list more GPUs or set "
                         "workers to 0 (one per device).")
    elif workers:
        entries = entries[:workers]
    gpus = [e for e in entries if e != "cpu"]
    if len(set(gpus)) < len(gpus):
        raise ValueError(f"devices {devices!r} lists a GPU twice; each worker needs a GPU of its own (two would hold "
                         "two copies of the DiT on one card).")
    return tuple(entries)


def default_weight_dtype(devices: tuple[str, ...]) -> torch.dtype:
    """bf16 on GPUs (the release's dtype), fp32 on the CPU (exact, and CPUs are slow at bf16)."""
    return torch.bfloat16 if all(torch.device(d).type == "cuda" for d in devices) else torch.float32


# ---- messages -------------------------------------------------------------------------------------------------------


def send(conn: Connection, kind: str, body: dict) -> None:
    buf = io.BytesIO()
    torch.save((kind, body), buf)
    conn.send_bytes(buf.getvalue())


def receive(conn: Connection) -> tuple[str, dict]:
    kind, body = torch.load(io.BytesIO(conn.recv_bytes()), weights_only=True)
    return kind, body


def conditioning_body(text: TextConditioning | None) -> dict | None:
    if text is None:
        return None
    return {"llm_states": text.llm_states.cpu(), "mask": text.mask.cpu(), "clip_states": text.clip_states.cpu()}


def job_body(job_id: int, job: SampleJob, plan: ParallelPlan) -> dict:
    return {"job": job_id, "plan": asdict(plan), "positive": conditioning_body(job.positive), "negative": conditioning_body(job.negative),
            "settings": asdict(job.settings), "latents": job.latents.float().cpu(),
            "loras": [[str(path), float(strength)] for path, strength in job.loras], "preview": job.preview}


def load_body(spec: DiTSpec, shard_weights: bool = False) -> dict:
    return {"spec": asdict(spec), "shard_weights": shard_weights}


# ---- the pool -------------------------------------------------------------------------------------------------------


@dataclass
class _Worker:
    rank: int
    device: str
    process: subprocess.Popen
    conn: Connection | None = None


@dataclass
class _JobState:
    pending: set[int]
    latents: torch.Tensor | None = None
    cancel: bool = False  # the caller asked to stop; sent to rank 0 as the answer to its next step
    cancelled_at: int | None = None
    total: int = 0
    failures: dict[int, dict] = field(default_factory=dict)
    failed_since: float | None = None
    caller_error: BaseException | None = None  # raised by on_progress / should_cancel; re-raised once all stopped


class WorkerPool:
    """``start()`` (or the first ``sample()``) starts the workers; ``sample()`` as often as needed; ``close()``.

    After a dead or stuck worker the pool closes itself and the next ``sample()`` starts fresh workers. When the pool
    object is garbage collected (or the interpreter exits) its workers are terminated.
    """

    def __init__(self, config: PoolConfig, spec: DiTSpec):
        self.config, self.spec = config, spec
        self.in_channels: int | None = None  # of the loaded DiT, known once started
        self.heads: int | None = None
        self._workers: list[_Worker] = []  # emptied in place by close(): the finalizer holds this same list
        self._store = None
        self._next_job = 0
        weakref.finalize(self, _terminate, self._workers)

    @property
    def running(self) -> bool:
        return bool(self._workers) and all(w.process.poll() is None for w in self._workers)

    # -- start / stop --

    def start(self, should_cancel: CancelFn | None = None) -> None:
        """Start the workers, join them into one group and load the DiT on each; any failure closes them again.

        ``should_cancel()`` turning true while they start closes them and raises ``SamplingCancelled``."""
        check_engine(self.config)
        self.close(force=True)  # what is left of an earlier pool
        try:
            self._spawn_and_connect(should_cancel)
            self._broadcast("load", load_body(self.spec, self.config.shard_weights))
            loaded = self._wait_all("loaded", "loading the DiT", should_cancel)
            self.in_channels, self.heads = int(loaded[0]["in_channels"]), int(loaded[0]["heads"])
        except BaseException:
            self.close(force=True)
            raise

    def _spawn_and_connect(self, should_cancel: CancelFn | None) -> None:
        import torch.distributed as dist

        cfg = self.config
        # The parent hosts the rendezvous store on a free port: no port guessing, no race with other programs.
        self._store = dist.TCPStore(HOST, 0, None, True, timedelta(seconds=cfg.connect_timeout_s),
                                    wait_for_workers=False)
        authkey = secrets.token_bytes(32)
        server = socket.create_server((HOST, 0))
        server.settimeout(0.1)
        try:
            base_env = {**os.environ, "STEPVIDEO_POOL_ROOT": str(ROOT),
                        "STEPVIDEO_POOL_ADDRESS": f"{HOST}:{server.getsockname()[1]}",
                        "STEPVIDEO_POOL_AUTHKEY": authkey.hex(), "STEPVIDEO_POOL_STORE_PORT": str(self._store.port),
                        "STEPVIDEO_POOL_WORLD_SIZE": str(cfg.world_size),
                        "STEPVIDEO_POOL_BACKEND": cfg.resolved_backend()}
            for rank, device in enumerate(cfg.devices):
                env = {**base_env, "STEPVIDEO_POOL_RANK": str(rank), "STEPVIDEO_POOL_DEVICE": device}
                # stdout/stderr are inherited: a worker's traceback lands in the host's console.
                proc = subprocess.Popen([cfg.python, "-c", WORKER_BOOT], env=env, cwd=str(ROOT),
                                        stdin=subprocess.DEVNULL)
                self._workers.append(_Worker(rank, device, proc))
            deadline = time.monotonic() + cfg.connect_timeout_s
            while any(w.conn is None for w in self._workers):
                self._check_alive("starting")
                if should_cancel is not None and should_cancel():
                    raise SamplingCancelled(0, 0)
                if time.monotonic() > deadline:
                    missing = [w.rank for w in self._workers if w.conn is None]
                    raise PoolError(f"Step-Video worker(s) {missing} did not connect within {cfg.connect_timeout_s:.0f} s "
                                    f"(importing torch took too long, or a firewall blocks {HOST}). {WORKER_HINT}")
                try:
                    sock, _ = server.accept()
                except TimeoutError:
                    continue
                sock.settimeout(None)
                conn = Connection(sock.detach())
                try:
                    deliver_challenge(conn, authkey)
                    answer_challenge(conn, authkey)
                    kind, body = receive(conn)
                except (AuthenticationError, EOFError, OSError):
                    conn.close()  # not one of our workers (they all hold the key): ignore it
                    continue
                if kind != "hello":
                    raise PoolError(f"a Step-Video worker sent {kind!r} instead of its greeting")
                self._workers[int(body["rank"])].conn = conn
        finally:
            server.close()

    def close(self, force: bool = False, timeout: float = 10.0) -> None:
        """Stop every worker: ask politely (unless ``force``), then terminate, then kill."""
        workers = list(self._workers)
        self._workers.clear()
        if not force:
            for w in workers:
                if w.conn is not None:
                    try:
                        send(w.conn, "shutdown", {})
                    except OSError:
                        pass
        for w in workers:
            try:
                w.process.wait(timeout=0 if force else timeout)
            except subprocess.TimeoutExpired:
                w.process.terminate()
        for w in workers:
            try:
                w.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                w.process.kill()
                w.process.wait()
            if w.conn is not None:
                w.conn.close()
        self._store = None

    # -- sampling --

    def sample(self, job: SampleJob, on_progress: ProgressFn | None = None,
               should_cancel: CancelFn | None = None) -> torch.Tensor:
        """Run ``job`` on every worker (starting them first if needed); returns rank 0's latents ``[b, F, C, h, w]``
        (fp32, CPU).

        After each step, ``on_progress(step, total, preview)`` is called, then ``should_cancel()``; when it is true every
        worker stops after that step and ``SamplingCancelled`` is raised. An exception from either callback (e.g.
        ComfyUI's interrupt, raised inside its progress hook) also stops the workers and is then re-raised. The pool
        stays loaded in both cases.
        """
        if not self.running:
            self.start(should_cancel)
        plan = self.plan_for(job)
        job_id = self._next_job
        self._next_job += 1
        self._broadcast("sample", job_body(job_id, job, plan))
        state = _JobState(pending={w.rank for w in self._workers})
        while state.pending:
            for rank, kind, body in self._receive(0.1, "sampling"):
                if body.get("job") == job_id:  # anything else is a late reply to an abandoned job
                    self._record(state, rank, kind, body, on_progress, should_cancel)
            if (state.failed_since is not None
                    and time.monotonic() - state.failed_since > self.config.failure_grace_s):
                self.close(force=True)
                raise self._failure(state, pool_stopped=True)
        if state.caller_error is not None:
            raise state.caller_error
        if state.failures:
            raise self._failure(state, pool_stopped=False)
        if state.cancelled_at is not None:
            raise SamplingCancelled(state.cancelled_at, state.total)
        if state.latents is None:
            raise PoolError("Step-Video worker 0 finished without returning latents")
        return state.latents

    def plan_for(self, job: SampleJob) -> ParallelPlan:
        """How the workers split ``job`` (raises ``parallel.ParallelError`` for a layout that cannot work)."""
        cfg = self.config
        guided = guidance_on(job.settings.cfg, job.negative is not None)
        return ParallelPlan.choose(cfg.world_size, self.heads, guided, guidance_parallel=cfg.guidance_parallel,
                                   ulysses=cfg.ulysses, shard_weights=cfg.shard_weights)

    def _record(self, state: _JobState, rank: int, kind: str, body: dict, on_progress: ProgressFn | None,
                should_cancel: CancelFn | None) -> None:
        if kind == "progress":
            step, total = int(body["step"]), int(body["total"])
            state.total = total
            if state.caller_error is None:
                try:
                    if on_progress is not None:
                        on_progress(step, total, body.get("preview"))
                    state.cancel = state.cancel or (should_cancel is not None and bool(should_cancel()))
                except BaseException as e:
                    state.caller_error = e
            stop = state.cancel or state.caller_error is not None or bool(state.failures)
            self._send(self._workers[rank], "continue", {"job": body["job"], "cancel": stop})
        elif kind == "done":
            state.pending.discard(rank)
            if body["latents"] is not None:
                state.latents = body["latents"]
        elif kind == "cancelled":
            state.pending.discard(rank)
            state.cancelled_at, state.total = int(body["step"]), int(body["total"])
        elif kind == "failed":
            state.pending.discard(rank)
            state.failures[rank] = body
            if state.failed_since is None:
                state.failed_since = time.monotonic()

    def _failure(self, state: _JobState, pool_stopped: bool) -> WorkerFailed:
        rank = min(state.failures)
        body = state.failures[rank]
        return WorkerFailed(rank, self.config.devices[rank], body["error"], body["traceback"], pool_stopped)

    # -- plumbing --

    def _broadcast(self, kind: str, body: dict) -> None:
        for w in list(self._workers):
            self._send(w, kind, body)

    def _send(self, worker: _Worker, kind: str, body: dict) -> None:
        try:
            send(worker.conn, kind, body)
        except OSError:
            self._died(worker, f"receiving {kind!r}")

    def _receive(self, timeout: float, doing: str) -> list[tuple[int, str, dict]]:
        """Messages that arrived within ``timeout``; a closed socket means a dead worker (WorkerDied)."""
        by_conn = {id(w.conn): w for w in self._workers}
        out = []
        for conn in wait([w.conn for w in self._workers], timeout):
            w = by_conn[id(conn)]
            try:
                kind, body = receive(conn)
            except (EOFError, OSError):
                self._died(w, doing)
            out.append((w.rank, kind, body))
        self._check_alive(doing)
        return out

    def _wait_all(self, kind: str, doing: str, should_cancel: CancelFn | None) -> dict[int, dict]:
        replies: dict[int, dict] = {}
        while len(replies) < len(self._workers):
            for rank, got, body in self._receive(0.1, doing):
                if got == "failed":
                    raise WorkerFailed(rank, self.config.devices[rank], body["error"], body["traceback"], True)
                if got == kind:
                    replies[rank] = body
            if should_cancel is not None and should_cancel():
                raise SamplingCancelled(0, 0)
        return replies

    def _check_alive(self, doing: str) -> None:
        for w in self._workers:
            if w.process.poll() is not None:
                self._died(w, doing)

    def _died(self, worker: _Worker, doing: str) -> None:
        try:
            code = worker.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            code = None
        last_error = _last_error(worker.conn)
        self.close(force=True)
        raise WorkerDied(worker.rank, worker.device, worker.process.pid, code, doing, last_error)


def _last_error(conn: Connection | None) -> str:
    """The error a worker reported just before it exited, if it got that far."""
    error = ""
    try:
        while conn is not None and conn.poll():
            kind, body = receive(conn)
            if kind == "failed":
                error = body["error"]
    except (EOFError, OSError):
        pass
    return error


def _terminate(workers: list[_Worker]) -> None:
    for w in workers:
        if w.process.poll() is None:
            w.process.kill()


def check_engine(config: PoolConfig) -> None:
    """torch.distributed with the backend the devices need, or a message saying what to install."""
    import torch.distributed as dist

    if not dist.is_available():
        raise EngineUnavailable("This torch build has no torch.distributed, which the Step-Video parallel sampler "
                                "runs on. Install an official PyTorch build (pip or conda); they all include it.")
    backend = config.resolved_backend()
    available = {"nccl": dist.is_nccl_available, "gloo": dist.is_gloo_available}.get(backend)
    if available is None or not available():
        hint = ("NCCL ships with PyTorch's Linux CUDA builds; on Windows run ComfyUI under WSL2 for several GPUs"
                if backend == "nccl" else "every official PyTorch build includes gloo")
        raise EngineUnavailable(f"torch.distributed backend {backend!r} is not available in this torch build ({hint}).")
    for device in config.devices:
        dev = torch.device(device)
        if dev.type == "cuda" and (not torch.cuda.is_available() or (dev.index or 0) >= torch.cuda.device_count()):
            raise PoolError(f"device {device!r} does not exist here (this machine has {torch.cuda.device_count()} "
                            "CUDA device(s)); pick existing GPUs or 'cpu'.")


def format_exception(e: BaseException) -> tuple[str, str]:
    """(one-line error, full traceback) as a worker reports them."""
    return f"{type(e).__name__}: {e}", "".join(traceback.format_exception(e))
