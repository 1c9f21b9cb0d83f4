"""One worker process of ``worker_pool.WorkerPool``: connect, join the group, load the DiT, then serve jobs.

Started by the pool as a fresh interpreter (``worker_pool.WORKER_BOOT``) with its rank, device and the addresses in
``STEPVIDEO_POOL_*`` environment variables. The message protocol is described in ``worker_pool``.
"""

from __future__ import annotations

import os
import sys
from datetime import timedelta
from multiprocessing.connection import Client, Connection
from pathlib import Path

import torch

from . import distributed as parallel
from . import pipeline
from .attention import get_attention
from .dit import StepVideoDiT, load_dit
from .lora import LoraSet, attach, load_lora
from .pipeline import GenerationSettings
from .scheduler import make_noise
from .text_encoding import TextConditioning
from .worker_pool import format_exception, receive, send


class Cancelled(Exception):
    def __init__(self, step: int, total: int):
        super().__init__(step, total)
        self.step, self.total = step, total


class Worker:
    """Serves one rank. With several ranks a job runs ``parallel.sample_latents`` under the plan the parent chose;
    ``world_size == 1`` runs ``pipeline.sample_latents`` and needs no process group (the tests drive one in a
    thread)."""

    def __init__(self, conn: Connection, rank: int, world_size: int, device: str, backend: str = "gloo"):
        self.conn, self.rank, self.world_size = conn, rank, world_size
        self.device = torch.device(device)
        # NCCL moves GPU tensors only; gloo works on CPU tensors.
        self.flag_device = self.device if backend == "nccl" else torch.device("cpu")
        self.dit: StepVideoDiT | None = None
        self.contexts: dict[parallel.ParallelPlan, parallel.ParallelContext] = {}
        self.loras: dict[tuple, LoraSet] = {}  # (path, mtime, size) -> parsed adapters of the last job
        self.stopping = False

    def serve(self) -> None:
        while not self.stopping:
            try:
                kind, body = receive(self.conn)
            except (EOFError, OSError):
                return  # the parent is gone
            if kind == "shutdown":
                return
            if kind == "load":
                self._run(None, self._load, body)
            elif kind == "sample":
                self._run(body["job"], self._sample, body)
            # anything else (a late answer to an abandoned job) needs nothing

    def _run(self, job: int | None, handler, body: dict) -> None:
        try:
            handler(body)
        except Cancelled as c:
            send(self.conn, "cancelled", {"job": job, "rank": self.rank, "step": c.step, "total": c.total})
        except Exception as e:
            error, trace = format_exception(e)
            send(self.conn, "failed", {"job": job, "rank": self.rank, "error": error, "traceback": trace})

    # -- load --

    def _load(self, body: dict) -> None:
        spec = body["spec"]
        self.dit = None  # release the previous model before reading the next
        options = {"weight_dtype": spec["weight_dtype"], "compute_dtype": spec["compute_dtype"],
                   "ff_chunk_size": spec["ff_chunk_size"]}
        if body["shard_weights"] and self.world_size > 1:
            # Straight into FSDP2 shards (one tensor at a time in host memory); the mesh spans every rank whatever
            # split a job uses, so any plan over all ranks will do.
            plan = parallel.ParallelPlan(ulysses=self.world_size, shard_weights=True)
            dit = parallel.load_dit_sharded(spec["path"], self._context(plan), **options)
        else:
            dit = load_dit(spec["path"], device=self.device, **options)
        dit.set_attention(get_attention(spec["attention"]))
        self.dit = dit
        send(self.conn, "loaded", {"rank": self.rank, "in_channels": dit.config.in_channels,
                                   "heads": dit.config.num_attention_heads})

    def _context(self, plan: parallel.ParallelPlan) -> parallel.ParallelContext:
        """The process groups of ``plan``, made once (every rank runs the same jobs, so they make them together)."""
        if plan not in self.contexts:
            group = parallel.DistributedGroup(self.rank, self.world_size, self.device)
            self.contexts[plan] = parallel.ParallelContext.build(plan, group)
        return self.contexts[plan]

    # -- sample --

    def _sample(self, body: dict) -> None:
        if self.dit is None:
            raise RuntimeError("no DiT loaded in this worker")
        job = body["job"]
        settings = GenerationSettings(**body["settings"])
        positive = TextConditioning(**body["positive"])
        negative = TextConditioning(**body["negative"]) if body["negative"] is not None else None
        latents = body["latents"].to(self.device)
        positive, negative = (None if c is None else _to_batch(c, latents.shape[0]) for c in (positive, negative))
        attached = [attach(self.dit, self._lora(path), strength) for path, strength in body["loras"]]

        def after_step(done: int, total: int, x, denoised) -> None:
            preview = denoised[:1, :1].float().cpu() if body["preview"] and self.rank == 0 else None
            if self._agree(self._ask_parent(job, done, total, preview) if self.rank == 0 else False):
                raise Cancelled(done, total)

        try:
            with torch.no_grad():
                if self.world_size == 1:
                    # The same noise as the single-process pipeline (drawn on the CPU), handed over on the device so
                    # that it lives where the velocity does.
                    noise = make_noise(tuple(latents.shape), settings.seed, device=self.device)
                    out = pipeline.sample_latents(self.dit, positive, negative, settings, latents=latents,
                                                  callback=after_step, noise=noise)
                else:
                    ctx = self._context(parallel.ParallelPlan(**body["plan"]))
                    out = parallel.sample_latents(self.dit, ctx, positive, negative, settings, callback=after_step,
                                                  latents=latents)
        finally:
            for lora in attached:
                lora.detach()
        send(self.conn, "done", {"job": job, "rank": self.rank, "latents": out.float().cpu() if self.rank == 0 else None})

    def _lora(self, path: str) -> LoraSet:
        stat = Path(path).stat()
        key = (path, stat.st_mtime_ns, stat.st_size)
        if key not in self.loras:
            self.loras = {k: v for k, v in self.loras.items() if k[0] != path}  # a changed file replaces its old parse
            self.loras[key] = load_lora(path, self.dit)
        return self.loras[key]

    def _ask_parent(self, job: int, step: int, total: int, preview: torch.Tensor | None) -> bool:
        """Rank 0 only: report the step and wait for the parent's answer; True when the job is to stop."""
        send(self.conn, "progress", {"job": job, "step": step, "total": total, "preview": preview})
        while True:
            try:
                kind, body = receive(self.conn)
            except (EOFError, OSError):
                self.stopping = True  # the parent is gone: stop every rank, then exit
                return True
            if kind == "continue" and body["job"] == job:
                return bool(body["cancel"])
            if kind == "shutdown":
                self.stopping = True
                return True

    def _agree(self, flag: bool) -> bool:
        """Rank 0's decision on every rank, so all leave the loop after the same step."""
        if self.world_size == 1:
            return flag
        import torch.distributed as dist

        t = torch.tensor([1.0 if flag else 0.0], device=self.flag_device)
        dist.broadcast(t, src=0)
        return bool(t.item())


def _to_batch(text: TextConditioning, batch: int) -> TextConditioning:
    """One prompt's conditioning repeated for every sample of a latent batch (as ComfyUI's samplers do)."""
    rows = batch // text.mask.shape[0]
    if rows <= 1:
        return text
    return TextConditioning(*(t.repeat_interleave(rows, 0) for t in (text.llm_states, text.mask, text.clip_states)))


def main() -> None:
    env = os.environ
    rank, world_size = int(env["STEPVIDEO_POOL_RANK"]), int(env["STEPVIDEO_POOL_WORLD_SIZE"])
    device, backend = env["STEPVIDEO_POOL_DEVICE"], env["STEPVIDEO_POOL_BACKEND"]
    host, port = env["STEPVIDEO_POOL_ADDRESS"].rsplit(":", 1)
    conn = Client((host, int(port)), family="AF_INET", authkey=bytes.fromhex(env["STEPVIDEO_POOL_AUTHKEY"]))
    send(conn, "hello", {"rank": rank, "pid": os.getpid()})
    try:
        import torch.distributed as dist

        if torch.device(device).type == "cuda":
            torch.cuda.set_device(torch.device(device))
        elif "OMP_NUM_THREADS" not in env:
            # CPU workers share the machine's cores; each taking all of them would oversubscribe it many times over.
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
        store = dist.TCPStore(host, int(env["STEPVIDEO_POOL_STORE_PORT"]), world_size, False, timedelta(minutes=5))
        dist.init_process_group(backend, store=store, rank=rank, world_size=world_size)
    except Exception as e:
        error, trace = format_exception(e)
        send(conn, "failed", {"job": None, "rank": rank, "error": f"joining the process group: {error}",
                              "traceback": trace})
        raise SystemExit(1) from None
    try:
        Worker(conn, rank, world_size, device, backend).serve()
    finally:
        dist.destroy_process_group()
        conn.close()
    # Leave without the interpreter's teardown: it spends seconds in torch.distributed's native destructors, and a
    # worker holds nothing that needs finalising (the OS frees its memory and devices).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
