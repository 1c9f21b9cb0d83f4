"""The Ray engine: one actor per GPU (or CPU) holding the DiT, driven one DiT call at a time by the host's sampler.

Why this design (measured in ``bench/bench_ray_dispatch.py``): sampling stays in the host process (ComfyUI's own
samplers, guiders, step callbacks, previews and cancellation), and only the diffusion model's call crosses to the
actors. Per step that is the latents in and the model output back: at the release size (204 frames, 992x544,
guided, bf16) 19.4 MB each way, as numpy arrays the object store hands over without copies. Measured on the 2-core
CPU box (echo actors, local Ray): 68 ms per step with the conditioning check, against a modelled step of 26.7 /
13.3 / 6.7 s on 2 / 4 / 8 GPUs (21 PFLOP at 400 TFLOP/s): 0.26 / 0.51 / 1.0%; a 10 Gb/s link between ComfyUI and
the GPUs adds 31 ms, a 1 Gb/s link 311 ms (5.7% on 8 GPUs). The conditioning (8.2 MB) crosses once per run and
weight patches (LoRAs) once per change. The alternative, shipping the
whole sampling loop to the actors, needs a second sampler, cannot run what a graph attaches to the model in the
host (EasyCache, sampler callbacks, custom guiders) and was the reason the previous process pool was "a second
world". Everything a call needs that outlives it stays in the actors (``actor.DiTRank``): the weights and their
patches, the run's conditioning, and the step cache's state.

Ray supplies placement (placement groups over one machine or many), process lifetime and fault reports;
torch.distributed inside the actors carries the collectives (NCCL on GPUs, gloo on CPUs) with a timeout, so a
hung collective ends. The host never blocks without polling: every wait is ``ray.wait`` with a short timeout, so
a cancel request stops the host within one poll, and calls abandoned by a cancel are settled (or the actors
restarted) before the next run.

Typical use::

    engine = RayEngine(EngineConfig(devices=("cpu", "cpu")), DiTSpec(path), import_paths=[...])
    engine.start(should_cancel)                       # places the actors, joins the group, loads the DiT
    dit = RemoteDiT(engine)
    out = dit(x, t, llm_states, mask, clip_states, options)   # one DiT call, ComfyUI's layout and sign
    engine.close()
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import importlib.util
import logging
import os
import socket
import sys
import time
import uuid
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from ..step_cache import OPTIONS_KEY, StepCache
from .actor import DiTSpec, WeightPatcher, pack, unpack

log = logging.getLogger("stepvideo")

RAY_REQUIREMENT = "ray>=2.40"
INSTALL_HINT = (f'pip install "{RAY_REQUIREMENT}" into the Python that runs ComfyUI (or the pack\'s extra: '
                'pip install ".[ray]"); on Windows run ComfyUI under WSL2 for several GPUs')
CancelFn = Callable[[], bool]
FAILURE_GRACE_S = 2.0  # after one rank fails, how long the others get to say whether one of them died


class EngineError(RuntimeError):
    """The engine could not start or a call could not run; the message says why and what to do."""


class RayMissing(EngineError):
    pass


class ClusterUnreachable(EngineError):
    pass


class EngineCancelled(EngineError):
    """The caller's cancel request stopped a wait; the actors stay loaded (or are restarted before the next run)."""


class RankDied(EngineError):
    pass


class RankFailed(EngineError):
    pass


def require_ray():
    try:
        import ray
    except ImportError:
        raise RayMissing(f"Several GPUs in ComfyUI run on Ray, which is not installed: {INSTALL_HINT}.") from None
    return ray


@dataclass(frozen=True)
class EngineConfig:
    """One rank per entry of ``devices`` ("cuda": one GPU, "cpu": one CPU core, slow, for tests); ``cluster`` is
    "local" (start a Ray on this machine on first use), "auto" (the Ray already running on this machine) or
    "HOST:PORT" (a Ray head; its workers' GPUs count too)."""

    devices: tuple[str, ...]  # empty: one rank per GPU of the whole cluster (known once connected)
    cluster: str = "local"
    visible_gpus: str | None = None  # a local cluster's GPUs ("0,2"): CUDA_VISIBLE_DEVICES when it starts
    collective_timeout_s: float = 300.0  # longest wait of a rank inside one collective before it raises
    placement_timeout_s: float = 120.0  # the cluster must offer the actors' resources within this
    connect_timeout_s: float = 5.0  # a cluster address must answer within this
    poll_s: float = 0.1  # how often a wait looks at the cancel request

    def __post_init__(self):
        bad = [d for d in self.devices if d not in ("cuda", "cpu")]
        if bad:
            raise ValueError(f"devices must be 'cuda' or 'cpu', got {bad}")
        if not self.devices and self.cluster.strip() == "local":
            raise ValueError("no device for the DiT: this machine has no CUDA GPU. Use devices 'cpu' with workers >= 1 "
                             "(slow, for testing), or give the address of a Ray cluster with GPUs.")


def parse_devices(devices: str, workers: int = 0, local_gpus: int | None = None) -> tuple[tuple[str, ...], str | None]:
    """(one "cuda"/"cpu" entry per rank, the local GPU indices to expose or None) from what a user types:
    "all" (every GPU: of this machine for a local cluster; 0 ranks here means "ask the cluster"), GPU indices or
    "cuda:N" separated by commas (this machine's GPUs, local cluster only), or "cpu" (``workers`` CPU ranks).
    ``workers`` > 0 takes the first that many; 0 one per device listed."""
    if local_gpus is None:
        local_gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if workers < 0:
        raise ValueError(f"workers {workers} must be 0 (one per device) or more")
    text = devices.strip().lower()
    if text == "cpu":
        return ("cpu",) * max(1, workers), None
    if text == "all":
        return ("cuda",) * (workers or local_gpus), None
    indices = []
    for part in (p.strip() for p in text.split(",")):
        index = part.removeprefix("cuda:")
        if not index.isdigit():
            raise ValueError(f"devices {devices!r}: {part!r} is not a GPU index, 'cuda:N', 'all' or 'cpu'. Examples: "
                             "'all', '0,1', 'cuda:2,cuda:3', 'cpu'.")
        if int(index) >= local_gpus:
            raise ValueError(f"devices {devices!r}: GPU {index} does not exist (this machine has {local_gpus} visible "
                             "CUDA GPU(s), numbered from 0).")
        indices.append(int(index))
    if len(set(indices)) < len(indices):
        raise ValueError(f"devices {devices!r} lists a GPU twice; each rank needs a GPU of its own.")
    if workers > len(indices):
        raise ValueError(f"workers {workers} but devices {devices!r} lists only {len(indices)}; list more GPUs or set "
                         "workers to 0 (one per device).")
    indices = indices[:workers] if workers else indices
    return ("cuda",) * len(indices), ",".join(map(str, indices))


# ---- the cluster ---------------------------------------------------------------------------------------------------


def parse_cluster(cluster: str) -> tuple[str, int] | None:
    """(host, port) of a cluster address; None for "local" and "auto". Raises ValueError with examples."""
    text = cluster.strip()
    if text in ("local", "auto"):
        return None
    host, sep, port = text.removeprefix("ray://").rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"cluster {cluster!r} is not 'local', 'auto' or HOST:PORT (e.g. 192.168.1.20:6379, the "
                         "address `ray start --head` prints).")
    return host.strip("[]"), int(port)


def connect(cluster: str, local_cpus: int = 0, connect_timeout_s: float = 5.0, visible_gpus: str | None = None) -> bool:
    """Connect this process to Ray once: start a local Ray ("local"), join the one running here ("auto") or a
    head at HOST:PORT (checked with a plain TCP connect first, so a wrong address fails in seconds, not after
    Ray's own minute of retries). An existing connection of this process is kept (another pack may own it) unless
    an explicit address names a different cluster. Returns whether this call started a local Ray."""
    ray = require_ray()
    address = parse_cluster(cluster)
    if ray.is_initialized():
        if address is None:
            return False
        current = ray.get_runtime_context().gcs_address
        host, port = current.rsplit(":", 1)
        if (host, int(port)) != address and not (int(port) == address[1] and _same_host(host, address[0])):
            raise EngineError(f"this ComfyUI is already connected to the Ray cluster at {current}; restart ComfyUI to "
                              f"use {cluster!r}, or set the cluster input to 'auto' to use the connected one.")
        return False
    if address is not None:
        _probe(*address, timeout=connect_timeout_s, cluster=cluster)
    options = dict(include_dashboard=False, namespace="stepvideo", log_to_driver=True, ignore_reinit_error=True)
    try:
        if cluster.strip() == "local":
            saved = os.environ.get("CUDA_VISIBLE_DEVICES")
            if visible_gpus is not None:  # the local Ray's GPUs are the ones it sees when it starts
                os.environ["CUDA_VISIBLE_DEVICES"] = _physical(visible_gpus, saved)
            try:
                ray.init(address="local", num_cpus=max(os.cpu_count() or 1, local_cpus), **options)
            finally:
                if visible_gpus is not None:
                    _restore_env("CUDA_VISIBLE_DEVICES", saved)
        else:
            ray.init(address=cluster.strip(), **options)
    except ConnectionError as e:
        raise ClusterUnreachable(f"no Ray cluster at {cluster!r}: {e}. Start one (`ray start --head` on the head "
                                 "machine) or use cluster 'local'.") from None
    return cluster.strip() == "local"


def _physical(indices: str, visible: str | None) -> str:
    """This process's GPU indices as the machine numbers them (when CUDA_VISIBLE_DEVICES already renumbers)."""
    if not visible:
        return indices
    physical = [v.strip() for v in visible.split(",")]
    return ",".join(physical[int(i)] for i in indices.split(","))


def _restore_env(name: str, value: str | None) -> None:
    if value is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = value


def _probe(host: str, port: int, timeout: float, cluster: str) -> None:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            pass
    except OSError as e:
        raise ClusterUnreachable(
            f"the Ray cluster at {cluster!r} does not answer ({e.strerror or e}) within {timeout:g} s. Check the "
            "address `ray start --head` printed on the head machine (HOST:PORT, default port 6379), that the head "
            "is running, and that this machine can reach it (firewall). Or use cluster 'local'.") from None


def _same_host(a: str, b: str) -> bool:
    try:
        return socket.gethostbyname(a) == socket.gethostbyname(b)
    except OSError:
        return False


# ---- the engine ------------------------------------------------------------------------------------------------


CORE_ROOT = str(Path(__file__).resolve().parents[2])  # the folder holding stepvideo_core
ACTOR_MODULE = "stepvideo_core.distributed.actor"


def actor_class():
    """``DiTRank`` as ``stepvideo_core.distributed.actor``: the name an actor can import with ``CORE_ROOT`` on its
    path. Ray pickles the class by that name. Inside ComfyUI this package is a submodule of the pack, whose module
    name is its folder's path, which no other process can import, so the core is also loaded under its top-level
    name (from the same files; nothing is added to ``sys.path``)."""
    if "stepvideo_core" not in sys.modules:
        spec = importlib.util.spec_from_file_location("stepvideo_core", os.path.join(CORE_ROOT, "stepvideo_core", "__init__.py"),
                                                      submodule_search_locations=[os.path.join(CORE_ROOT, "stepvideo_core")])
        module = importlib.util.module_from_spec(spec)
        sys.modules["stepvideo_core"] = module
        spec.loader.exec_module(module)
    return importlib.import_module(ACTOR_MODULE).DiTRank


class RayEngine:
    """The actors of one loaded DiT. ``start`` (or the first call) places and loads them; calls go to every rank;
    ``close`` kills them. After a dead or failed rank the engine closes itself and the next call starts afresh."""

    def __init__(self, config: EngineConfig, spec: DiTSpec, import_paths: tuple[str, ...] = (),
                 on_start: Callable[[RayEngine], None] | None = None):
        """``import_paths``: folders the actors need on their path besides the core's (ComfyUI's, for weight
        patches); every machine of a cluster needs them at the same paths, as it needs the model files.
        ``on_start(engine)`` runs before the actors start (the ComfyUI pack stops other engines there)."""
        self.config, self.spec, self.on_start = config, spec, on_start
        self.started_ray = False  # whether this engine's start launched the local Ray
        self.devices: tuple[str, ...] = config.devices  # resolved when started (empty: every GPU of the cluster)
        self.import_paths = [CORE_ROOT, *(p for p in import_paths if p != CORE_ROOT)]
        self.ranks: list[dict] = []  # describe() of each rank, once started
        self.model_info: dict = {}
        self._actors: list = []  # emptied in place by close(): the finalizer holds this same list
        self._group: list = [None]  # the placement group
        self._abandoned: list = []  # calls left running by a cancel, settled before the next call
        self._setup: list = []  # conditioning / patch uploads not yet confirmed
        self._conditioning: list[str] = []  # keys the actors hold
        self._patch_version: str | None = None
        weakref.finalize(self, _kill, self._actors, self._group)

    @property
    def running(self) -> bool:
        return bool(self._actors)

    @property
    def world_size(self) -> int:
        return len(self.devices)

    def describe_rank(self, rank: int) -> str:
        device = self.devices[rank] if rank < len(self.devices) else "?"
        if rank < len(self.ranks):
            info = self.ranks[rank]
            where = f"{info['host']} ({info['node_ip']})"
            if info.get("gpu_name"):
                gpu = ",".join(info.get("gpu_ids") or []) or "?"
                return f"rank {rank} on GPU {gpu} ({info['gpu_name']}) of {where}, pid {info['pid']}"
            return f"rank {rank} on the CPU of {where}, pid {info['pid']}"
        return f"rank {rank} ({device})"

    # -- start / stop --

    def start(self, should_cancel: CancelFn | None = None) -> None:
        ray = require_ray()
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        cfg = self.config
        self.close()
        cpus = sum(d == "cpu" for d in cfg.devices)
        self.started_ray = connect(cfg.cluster, local_cpus=cpus, connect_timeout_s=cfg.connect_timeout_s,
                                   visible_gpus=cfg.visible_gpus)
        if self.on_start is not None:
            self.on_start(self)
        total = ray.cluster_resources()
        self.devices = cfg.devices or ("cuda",) * int(total.get("GPU", 0))
        if not self.devices:
            raise EngineError(f"the Ray cluster ({cfg.cluster}) has no GPU; start its workers on machines with GPUs "
                              "(docs/multi-gpu.md), or use devices 'cpu' for a slow test run.")
        gpus = len(self.devices) - cpus
        if total.get("GPU", 0) < gpus or total.get("CPU", 0) < cpus:
            raise EngineError(f"the Ray cluster ({cfg.cluster}) has {int(total.get('GPU', 0))} GPU(s) and "
                              f"{int(total.get('CPU', 0))} CPU(s) in all; this DiT needs {gpus} GPU(s) and {cpus} "
                              "CPU(s), one per rank. Lower 'workers', or add machines to the cluster (docs/multi-gpu.md).")
        try:
            bundles = [{"GPU": 1} if d == "cuda" else {"CPU": 1} for d in self.devices]
            # PACK fills one machine before the next, so neighbouring ranks (an Ulysses group) share a node.
            self._group[0] = group = placement_group(bundles, strategy="PACK", name=f"stepvideo-dit-{uuid.uuid4().hex[:8]}")
            try:
                self._wait([group.ready()], "waiting for the cluster to place the actors", should_cancel,
                           cfg.placement_timeout_s)
            except TimeoutError:
                free = ray.available_resources()
                raise EngineError(f"Ray could not place {len(bundles)} actor(s) ({gpus} GPU, {cpus} CPU) within "
                                  f"{cfg.placement_timeout_s:g} s; free now: {int(free.get('GPU', 0))} GPU(s), "
                                  f"{int(free.get('CPU', 0))} CPU(s). Another program (or an older ComfyUI run) may "
                                  "hold them.") from None
            env = {"PYTHONPATH": os.pathsep.join(self.import_paths)}
            remote = ray.remote(actor_class())
            for rank, device in enumerate(self.devices):
                self._actors.append(remote.options(
                    num_cpus=1 if device == "cpu" else 0, num_gpus=1 if device == "cuda" else 0,
                    scheduling_strategy=PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=rank),
                    runtime_env={"env_vars": env}, max_restarts=0,
                ).remote(rank, self.world_size, device, 1 if device == "cpu" else 0))
            self.ranks = self._wait([a.describe.remote() for a in self._actors], "starting", should_cancel)
            if self.world_size > 1:
                address, port = self._wait([self._actors[0].rendezvous_address.remote()], "starting", should_cancel)[0]
                self._wait([a.join.remote(address, port, cfg.collective_timeout_s) for a in self._actors],
                           "joining the process group", should_cancel)
            spec = dataclasses.asdict(self.spec)  # plain values: the actors know the core by another module name
            self.model_info = self._wait([a.load.remote(spec) for a in self._actors], "loading the DiT",
                                         should_cancel)[0]
        except BaseException:
            self.close()
            raise
        log.info("StepVideo: DiT loaded on %d Ray actor(s): %s", self.world_size,
                 "; ".join(self.describe_rank(r) for r in range(self.world_size)))

    def close(self) -> None:
        """Kill every actor and free the placement group (the DiT's memory goes with the processes)."""
        _kill(self._actors, self._group)
        self._abandoned, self._setup, self._conditioning, self._patch_version = [], [], [], None

    # -- calls --

    def ensure_started(self, should_cancel: CancelFn | None = None) -> None:
        self._settle(should_cancel)
        if not self.running:
            self.start(should_cancel)

    def set_weight_patches(self, version: str, patches: dict, patcher: WeightPatcher | None,
                           should_cancel: CancelFn | None = None) -> None:
        """Send weight patches (ComfyUI's ``ModelPatcher.patches``) when they differ from the actors' (``version``:
        the patcher's uuid); ``patcher`` unpickles and applies them in the actors (see ``actor.WeightPatcher``)."""
        self.ensure_started(should_cancel)
        if version == self._patch_version:
            return
        ray = require_ray()
        # The patches travel as bytes inside the object, so that the patcher can prepare their library first.
        blob = ray.cloudpickle.dumps(patches)
        ref = ray.put((version, blob, patcher))  # once in the object store for every rank
        self._setup.extend(a.set_weight_patches.remote(ref) for a in self._actors)
        self._patch_version = version

    def forward(self, call: dict, bundle: dict, should_cancel: CancelFn | None = None) -> dict:
        """One DiT call on every rank; returns rank 0's answer. ``bundle`` is the conditioning, sent only when the
        actors do not hold it yet (its content key is ``call["cond_key"]``)."""
        self.ensure_started(should_cancel)
        ray = require_ray()
        key = call["cond_key"]
        if key not in self._conditioning:
            ref = ray.put(bundle)
            self._setup.extend(a.put_conditioning.remote(key, ref) for a in self._actors)
            self._conditioning = [*self._conditioning[-3:], key]
        ref = ray.put(call)  # once in the object store, fetched by every rank
        setup = len(self._setup)
        refs = [a.forward.remote(ref) for a in self._actors]
        return self._wait([*self._setup, *refs], "computing a DiT step", should_cancel, ends_setup=True)[setup]

    # -- waiting --

    def _settle(self, should_cancel: CancelFn | None) -> None:
        """Calls a cancel left running must end (within a step, or the collective timeout if one hangs) before the
        next call; if they failed or hang past that, the actors are replaced."""
        if not self._abandoned:
            return
        refs, self._abandoned = self._abandoned, []
        try:
            self._wait(refs, "finishing the cancelled step", should_cancel, self.config.collective_timeout_s + 30)
        except EngineCancelled:
            self._abandoned = refs
            raise
        except (TimeoutError, EngineError) as e:
            log.warning("StepVideo: the cancelled step did not end cleanly (%s); restarting the DiT actors", e)
            self.close()

    def _wait(self, refs: list, doing: str, should_cancel: CancelFn | None, timeout: float | None = None,
              ends_setup: bool = False) -> list:
        """Every result of ``refs`` in order. Polls: a cancel request raises ``EngineCancelled`` within ``poll_s``
        (the refs are kept to settle before the next call); the first failed rank closes the engine (the others
        may be stuck in a collective with it) and raises a message naming the rank and machine. ``ends_setup``:
        ``refs`` include the pending uploads (conditioning, weight patches), which this wait settles or abandons."""
        ray = require_ray()
        deadline = None if timeout is None else time.monotonic() + timeout
        pending = list(refs)
        while pending:
            ready, pending = ray.wait(pending, num_returns=len(pending), timeout=self.config.poll_s)
            for ref in ready:
                self._check(ray, ref, refs, doing)
            if pending and should_cancel is not None and should_cancel():
                self._abandoned = [*self._abandoned, *pending]
                if ends_setup:
                    self._setup = []
                raise EngineCancelled(f"cancelled while {doing}")
            if pending and deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"{doing}: no answer within {timeout:g} s")
        if ends_setup:
            self._setup = []
        return ray.get(list(refs))

    def _check(self, ray, ref, refs: list, doing: str) -> None:
        """Raise the failure of ``ref``, if any. A rank that dies makes its peers fail too (their collectives lose
        it), often first; so the other ranks get a moment to report, and a death is named before a failure."""
        try:
            ray.get(ref)
            return
        except (ray.exceptions.RayActorError, ray.exceptions.RayTaskError) as e:
            first = (ref, e)
        others = [r for r in refs if r != ref]
        ray.wait(others, num_returns=len(others), timeout=FAILURE_GRACE_S)
        failures = [first]
        for other in others:
            try:
                ray.get(other, timeout=0)
            except (ray.exceptions.RayActorError, ray.exceptions.RayTaskError) as e:
                failures.append((other, e))
            except Exception:
                pass
        died = [(r, e) for r, e in failures if isinstance(e, ray.exceptions.RayActorError)]
        ref, e = died[0] if died else first
        rank = self._rank_of(ref, refs)
        self.close()
        if died:
            raise RankDied(f"Step-Video DiT {self.describe_rank(rank)} died while {doing}: {_first_line(e)}. If it "
                           "ran out of memory, lower the size or frames, use fp8 or shard_weights. The other actors "
                           "were stopped; the next run starts fresh ones (they load the DiT again).") from None
        cause = e.cause if getattr(e, "cause", None) is not None else e
        raise RankFailed(f"Step-Video DiT {self.describe_rank(rank)} failed while {doing}: "
                         f"{type(cause).__name__}: {_first_line(cause)}. The actors were stopped; the next run "
                         f"starts fresh ones.\nActor traceback:\n{e}") from None

    def _rank_of(self, ref, refs: list) -> int:
        n = len(self._actors) or self.world_size
        index = refs.index(ref)
        return index % n if n else 0


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _kill(actors: list, group: list) -> None:
    if not actors and group[0] is None:
        return
    try:
        import ray
        from ray.util.placement_group import remove_placement_group
    except ImportError:
        return
    if not ray.is_initialized():
        actors.clear()
        group[0] = None
        return
    for actor in actors:
        try:
            ray.kill(actor, no_restart=True)
        except Exception:
            pass
    actors.clear()
    if group[0] is not None:
        try:
            remove_placement_group(group[0])
        except Exception:
            pass
        group[0] = None


# ---- the host-side DiT ---------------------------------------------------------------------------------------------


def conditioning_key(tensors: dict) -> str:
    """A content key for a run's conditioning: ComfyUI builds new tensors for every step's call, so identity cannot
    tell a run's conditioning from a new one, and a wrong reuse would be silent. Hashing 8 MB costs about as much
    as copying it once (bench/bench_ray_dispatch.py), far less than sending it every step."""
    h = hashlib.blake2b(digest_size=16)
    for name in sorted(tensors):
        t = tensors[name]
        if t is None:
            h.update(f"{name}:none;".encode())
            continue
        t = t.detach().contiguous().cpu()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


# transformer_options entries that reach the actors (others stay in the host: wrappers run there)
SENT_OPTIONS = ("sigmas", "sample_sigmas", "cond_or_uncond", OPTIONS_KEY)


class RemoteDiT:
    """The DiT as the host sees it: ``(x, t, llm_states, mask, clip_states, transformer_options, condition,
    motion_score) -> noise - x0``, in ComfyUI's layout ``[B, C, T, H, W]``, computed by the engine's actors.

    A step cache in ``transformer_options`` (``step_cache.OPTIONS_KEY``) is not sent: its settings and a token of
    its run are, and the actors keep one cache per run across steps; its counts come back after each call into
    the host's cache object, so the host's log and tests read them as on one device."""

    def __init__(self, engine: RayEngine):
        self.engine = engine
        self._run_tokens: weakref.WeakKeyDictionary[StepCache, str] = weakref.WeakKeyDictionary()
        self._warned: set[str] = set()
        self._last: tuple[dict, str] | None = None  # the last conditioning seen and its key

    def __call__(self, x: torch.Tensor, t: torch.Tensor, llm_states: torch.Tensor, mask: torch.Tensor,
                 clip_states: torch.Tensor, transformer_options: dict | None = None,
                 condition: torch.Tensor | None = None, motion_score: torch.Tensor | None = None,
                 should_cancel: CancelFn | None = None) -> torch.Tensor:
        options = transformer_options or {}
        b = x.shape[0]
        bundle = {"llm_states": llm_states, "mask": mask, "clip_states": clip_states, "condition": condition,
                  "motion_score": None if motion_score is None else motion_score.reshape(-1).expand(b)}
        key = self._key(bundle)
        bundle = {k: None if v is None else v.detach().cpu() for k, v in bundle.items()}
        sent = {"sigmas": _cpu(options.get("sigmas", 1 - t)), "sample_sigmas": _cpu(options.get("sample_sigmas")),
                "cond_or_uncond": list(options.get("cond_or_uncond", [])) or None, "step_cache": None}
        cache = options.get(OPTIONS_KEY)
        if isinstance(cache, StepCache):
            token = self._run_tokens.get(cache)
            if token is None:
                token = self._run_tokens[cache] = uuid.uuid4().hex
            sent["step_cache"] = (token, dataclasses.asdict(cache.settings))
        self._warn_unsent(options)
        call = {"x": pack(x), "t": t.detach().reshape(-1).expand(b).cpu(), "cond_key": key, "options": sent}
        answer = self.engine.forward(call, bundle, should_cancel)
        if sent["step_cache"] is not None and answer.get("step_cache"):
            for name, value in answer["step_cache"].items():
                setattr(cache.stats, name, value)
        return unpack(answer["out"]).to(x.device, copy=True)

    def _key(self, bundle: dict) -> str:
        """The conditioning's content key; within a run the same values come every step, which an exact comparison
        with the last bundle (where it lives) confirms faster than hashing them again."""
        if self._last is not None:
            last, key = self._last
            if last.keys() == bundle.keys() and all(_same(last[k], bundle[k]) for k in bundle):
                return key
        key = conditioning_key(bundle)
        self._last = ({k: None if v is None else v.detach() for k, v in bundle.items()}, key)
        return key

    def _warn_unsent(self, options: dict) -> None:
        """Block patches and attention overrides run in the host's model; say once that the actors do not get them."""
        replaced = {k for k in options.get("patches_replace", {}).get("dit", {})}
        unsent = []
        if OPTIONS_KEY not in options and replaced:
            unsent.append("block replacements (patches_replace)")
        if options.get("patches"):
            unsent.append("model patches (" + ", ".join(sorted(options["patches"])) + ")")
        if options.get("optimized_attention_override") is not None:
            unsent.append("an attention override")
        for what in unsent:
            if what not in self._warned:
                self._warned.add(what)
                log.warning("StepVideo: the parallel DiT runs in Ray actors; %s attached to the MODEL do not reach "
                            "them and are ignored.", what)


def _same(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return a.shape == b.shape and a.dtype == b.dtype and a.device == b.device and bool(torch.equal(a, b))


def _cpu(t):
    return None if t is None else torch.as_tensor(t).detach().cpu()
