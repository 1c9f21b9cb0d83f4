"""One rank of a Ray-hosted DiT: what runs inside each actor that ``engine.RayEngine`` places on a GPU (or CPU).

The actor holds the DiT (whole, or its FSDP2 shard) and the torch.distributed group it shares with the other
ranks; the host process keeps the sampler and sends one DiT call at a time (``forward``). Every rank receives every
call and runs it in the same order, so the collectives of the sequence split, the guidance split and FSDP2 meet
as they do under ``torchrun``. What lives here across calls:

- the conditioning bundles (text states, TI2V image latents, motion score), sent once per run under a content key;
- the weight patches (LoRAs from ComfyUI's loaders): applied to the weights in place, originals kept to undo them;
  a GGUF layer's quantized bytes cannot take a patch, so it gets the patch as a function of its dequantized weight,
  run in every forward (what the pack's ``GGUFModelPatcher`` does on one device);
- the step cache of the current run (``step_cache.StepCache``): its state has to survive from one step to the
  next, so it is created here when a new run's token arrives, never shipped with each call.

This module imports no ComfyUI and no Ray at import time; a weight patch is applied by a callable the host sends
with the patches (ComfyUI's own ``calculate_weight`` in the ComfyUI pack).
"""

from __future__ import annotations

import os
import socket
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Protocol

import torch
import torch.distributed as dist

from ..attention import get_attention
from ..dit import StepVideoDiT, load_dit
from ..image_condition import ImageCondition
from ..step_cache import GROUP_MEAN_KEY, StepCache, StepCacheSettings
from ..text_encoding import TextConditioning
from .plan import DistributedGroup, ParallelContext, ParallelPlan
from .sequence import branch_forward
from .sharding import load_dit_sharded, shard_rows


class WeightPatcher(Protocol):
    """Applies a host's weight patches in an actor (the ComfyUI pack sends one built on ComfyUI's own functions)."""

    def load(self, blob: bytes) -> dict:
        """The patches (MODEL key "diffusion_model.<official name>" -> list of patches) from their bytes."""

    def __call__(self, weight_fp32: torch.Tensor, patches: list, key: str, like: torch.Tensor) -> torch.Tensor:
        """One weight (an fp32 copy) with its key's patches applied, in the storage dtype of ``like``."""

    def at_forward(self, patches: list, key: str) -> Callable[[torch.Tensor], torch.Tensor]:
        """The key's patches as a function of a GGUF layer's dequantized weight (compute dtype), run per forward."""


CONDITIONING_KEPT = 4  # bundles kept per actor: a run needs one; a few more serve re-runs and batch variants


@dataclass(frozen=True)
class DiTSpec:
    """What each actor loads: a DiT file or official ``transformer/`` folder and how to hold it."""

    path: str
    weight_dtype: torch.dtype = torch.float32
    compute_dtype: torch.dtype | None = None  # None: bf16 for fp8 weights, else the weight dtype (as load_dit)
    attention: str = "sdpa"  # a stepvideo_core.attention backend name (the actors run without ComfyUI's)
    ff_chunk_size: int = 0
    shard_weights: bool = False  # FSDP2 over all ranks: each holds 1/N of the block weights
    guidance_parallel: bool | None = None  # None: split an even batch over two rank groups when the world is even
    ulysses: int | None = None  # None: as many heads as the ranks of a branch allow, ring attention for the rest


class DiTRank:
    """The actor class (wrapped by ``ray.remote`` in ``engine.py``); also usable in plain processes for tests."""

    def __init__(self, rank: int, world_size: int, device_type: str, threads: int = 0):
        self.rank, self.world_size = rank, world_size
        # Ray hands a GPU actor its own card as cuda:0 (it sets CUDA_VISIBLE_DEVICES); never rewrite that variable.
        self.device = torch.device("cuda", 0) if device_type == "cuda" else torch.device("cpu")
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        elif threads:
            torch.set_num_threads(threads)  # CPU ranks share a machine's cores
        self.spec: DiTSpec | None = None
        self.dit: StepVideoDiT | None = None
        self.contexts: dict[ParallelPlan, ParallelContext] = {}
        self.conditioning: dict[str, dict] = {}
        self.patch_version: str | None = None
        self.originals: dict[str, torch.Tensor] = {}  # weight key -> the unpatched weight (or this rank's shard)
        self.forward_patched: list[torch.nn.Module] = []  # GGUF layers whose patches run on the dequantized weight
        self.cache_token: str | None = None
        self.cache: StepCache | None = None
        self.timeout: timedelta | None = None  # of every collective, subgroups included

    # -- where this rank runs ------------------------------------------------------------------------------------

    def describe(self) -> dict:
        """Where this rank runs, for error messages and for ComfyUI's memory manager."""
        info = {"rank": self.rank, "pid": os.getpid(), "host": socket.gethostname(), "node_ip": _node_ip(),
                "node_id": _node_id(), "device": str(self.device), "gpu_uuid": None, "gpu_name": None}
        if self.device.type == "cuda":
            props = torch.cuda.get_device_properties(self.device)
            info["gpu_uuid"], info["gpu_name"] = str(props.uuid), props.name
            info["gpu_ids"] = _ray_gpu_ids()
        return info

    def rendezvous_address(self) -> tuple[str, int]:
        """Rank 0: an address and a free port on its node for the process group's TCP rendezvous."""
        with socket.socket() as s:
            s.bind(("", 0))
            return _node_ip(), s.getsockname()[1]

    def join(self, address: str, port: int, timeout_s: float) -> None:
        """Join the group (NCCL on GPUs, gloo on CPUs). ``timeout_s`` bounds every collective: a rank whose peer
        never arrives raises instead of waiting forever, so a hung step ends and the host can start afresh."""
        backend = "nccl" if self.device.type == "cuda" else "gloo"
        self.timeout = timedelta(seconds=timeout_s)
        dist.init_process_group(backend, init_method=f"tcp://{address}:{port}", rank=self.rank,
                                world_size=self.world_size, timeout=timedelta(seconds=timeout_s))

    def barrier(self) -> None:
        """Every rank meets here (the group answers); with a missing rank it raises after the group timeout."""
        dist.barrier()

    def leave(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()

    # -- the model -----------------------------------------------------------------------------------------------

    def load(self, spec: dict) -> dict:
        """Load the DiT of ``spec`` (``DiTSpec``'s fields: the host may know this module by another name)."""
        self.dit, self.originals, self.forward_patched, self.patch_version = None, {}, [], None  # release it first
        self.spec = spec = DiTSpec(**spec)
        options = {"weight_dtype": spec.weight_dtype, "compute_dtype": spec.compute_dtype,
                   "ff_chunk_size": spec.ff_chunk_size}
        if spec.shard_weights and self.world_size > 1:
            # The mesh spans every rank whatever split a call uses, so any plan over all ranks will do.
            plan = ParallelPlan(ulysses=1, ring=self.world_size, shard_weights=True)
            dit = load_dit_sharded(spec.path, self._context(plan), **options)
        else:
            dit = load_dit(spec.path, device=self.device, **options)
        dit.set_attention(get_attention(spec.attention))
        self.dit = dit
        gguf_type = getattr(dit, "weight_format", None)
        return {"in_channels": dit.config.in_channels, "heads": dit.config.num_attention_heads,
                "layers": dit.config.num_layers, "gguf_type": None if gguf_type is None else gguf_type.name,
                "quantized_layers": sum(self._is_quantized(m) for m in dit.modules()),
                "stored_bytes": sum(_local(p).numel() * _local(p).element_size() for p in dit.parameters())}

    def set_weight_patches(self, update: tuple[str, bytes, WeightPatcher | None]) -> int:
        """``(version, patches as bytes, patcher)``: make the weights the originals plus the patches; returns how
        many weights are patched. Every rank walks the keys in the same order, because patching a sharded weight
        gathers it from all ranks."""
        version, blob, patcher = update
        if version == self.patch_version:
            return len(self.originals)
        patches = patcher.load(blob) if patcher is not None else {}
        with torch.no_grad():
            for key in sorted(self.originals):
                _local(self._param(key)).copy_(self.originals[key])
            for layer in self.forward_patched:
                layer.weight_patches = ()
            self.originals, self.forward_patched = {}, []
            for key in sorted(patches):
                owner, attr = self._owner(key)
                if attr == "weight" and self._is_quantized(owner):
                    # No collective here: in a sharded block the forward applies it to the gathered weight.
                    owner.weight_patches = (patcher.at_forward(patches[key], key),)
                    self.forward_patched.append(owner)
                    continue
                param = getattr(owner, attr)
                local = _local(param)
                self.originals[key] = local.detach().to("cpu", copy=True)
                full = _full(param)
                patched = patcher(full.float(), patches[key], key, full)
                local.copy_(_rows_of(patched.to(local.dtype), param, self.rank, self.world_size))
        self.patch_version = version
        return len(self.originals) + len(self.forward_patched)

    def _owner(self, key: str) -> tuple[torch.nn.Module, str]:
        """(module, attribute) of a patch key "diffusion_model.<official name>"."""
        owner, _, attr = key.removeprefix("diffusion_model.").rpartition(".")
        try:
            module = self.dit.get_submodule(owner)
            getattr(module, attr)
        except AttributeError:
            raise KeyError(f"weight patch for {key!r}: the DiT has no such weight") from None
        return module, attr

    def _param(self, key: str) -> torch.Tensor:
        owner, attr = self._owner(key)
        return getattr(owner, attr)

    def _is_quantized(self, module: torch.nn.Module) -> bool:
        """A layer holding GGUF bytes; a DiT from safetensors has none (and may run without the gguf package)."""
        if getattr(self.dit, "gguf_file", None) is None:
            return False
        from ..gguf_ops import is_quantized

        return is_quantized(module)

    # -- one DiT call ----------------------------------------------------------------------------------------------

    def put_conditioning(self, key: str, bundle: dict) -> None:
        """Keep a run's conditioning (text states, mask, CLIP states, optional TI2V latents and motion score)."""
        self.conditioning.pop(key, None)
        self.conditioning[key] = bundle
        while len(self.conditioning) > CONDITIONING_KEPT:
            self.conditioning.pop(next(iter(self.conditioning)))

    def forward(self, call: dict) -> dict:
        """One DiT call in ComfyUI's layout: ``x`` [B, C, T, H, W], ``t`` [B] (1 = clean), the conditioning key,
        ``options`` (``sigmas``, ``sample_sigmas``, ``cond_or_uncond``, ``step_cache``: (run token, settings) or
        None). Returns rank 0's ``out`` (the flow output, noise - x0, same layout and dtype as ``x``) and its step
        cache counts; other ranks return no tensor."""
        if self.dit is None:
            raise RuntimeError("no DiT loaded on this rank")
        x, t = unpack(call["x"]), call["t"]
        bundle = self.conditioning.get(call["cond_key"])
        if bundle is None:
            raise RuntimeError("the conditioning of this call was never sent to this rank")
        batch = x.shape[0]
        plan = self._plan(batch)
        ctx = self._context(plan)
        if plan.guidance == 2:
            half = batch // 2
            rows = slice(ctx.guidance_rank * half, (ctx.guidance_rank + 1) * half)
        else:
            rows = slice(0, batch)
        dev = self.device
        text = TextConditioning(*(bundle[k][rows].to(dev) for k in ("llm_states", "mask", "clip_states")))
        image = None
        if bundle.get("condition") is not None:
            image = ImageCondition(bundle["condition"][rows].to(dev).movedim(1, 2),
                                   bundle["motion_score"][rows].to(dev))
        options = self._options(call["options"], rows, ctx)
        with torch.no_grad():
            # a copy: ``x`` is a read-only view of Ray's object store
            tokens, grid = branch_forward(self.dit, ctx, x[rows].to(dev, copy=True).movedim(1, 2), t[rows].to(dev),
                                          text, image, options)
            v = self.dit.unpatchify(tokens, grid)
            if plan.guidance == 2:
                parts = [torch.empty_like(v) for _ in range(2)]
                dist.all_gather(parts, v.contiguous(), group=ctx.guidance_group)
                v = torch.cat(parts)
        stats = None
        if self.cache is not None and options.get("stepvideo_step_cache") is self.cache:
            s = self.cache.stats
            stats = {"forward_passes": s.forward_passes, "computed": s.computed,
                     "block_evaluations": s.block_evaluations}
        out = pack((-v).movedim(2, 1).to(x.dtype)) if self.rank == 0 else None  # ComfyUI's sign: noise - x0
        return {"out": out, "step_cache": stats}

    def _plan(self, batch: int) -> ParallelPlan:
        """Two rank groups take half the batch each (cond/uncond in one guided ComfyUI call) when both are even."""
        spec = self.spec
        return ParallelPlan.choose(self.world_size, self.dit.config.num_attention_heads, guided=batch % 2 == 0,
                                   guidance_parallel=spec.guidance_parallel if batch % 2 == 0 else None,
                                   ulysses=spec.ulysses, shard_weights=spec.shard_weights)

    def _context(self, plan: ParallelPlan) -> ParallelContext:
        """The process groups of ``plan``, made once (every rank sees the same calls, so they make them together)."""
        if plan not in self.contexts:
            group = DistributedGroup(self.rank, self.world_size, self.device)
            self.contexts[plan] = ParallelContext.build(plan, group, self.timeout)
        return self.contexts[plan]

    def _options(self, sent: dict, rows: slice, ctx: ParallelContext) -> dict:
        options = {"sigmas": sent["sigmas"][rows] if sent["sigmas"].numel() > 1 else sent["sigmas"]}
        if sent.get("sample_sigmas") is not None:
            options["sample_sigmas"] = sent["sample_sigmas"]
        if sent.get("cond_or_uncond") is not None:
            kinds, g = list(sent["cond_or_uncond"]), ctx.guidance_rank
            if ctx.plan.guidance == 2 and len(kinds) % 2 == 0:  # the batch is one chunk per kind: half the chunks
                kinds = kinds[g * len(kinds) // 2:(g + 1) * len(kinds) // 2]
            options["cond_or_uncond"] = kinds
        cache = sent.get("step_cache")
        if cache is not None:
            token, settings = cache
            if token != self.cache_token:
                self.cache_token, self.cache = token, StepCache(StepCacheSettings(**settings))
            options = self.cache.transformer_options(self.dit, base=options)
            if ctx.plan.guidance == 2:
                # One guided ComfyUI call holds cond and uncond; split over two groups, the skip decision must
                # still read statistics of the whole batch, so average over every rank (equal shards each).
                options[GROUP_MEAN_KEY] = _world_mean
        return options


def pack(t: torch.Tensor) -> tuple:
    """A tensor as (dtype name, shape, bytes as a numpy array): Ray hands numpy arrays to the receiver straight from
    its object store, where a torch tensor would be pickled and copied on each side (bench_ray_dispatch.py)."""
    t = t.detach().contiguous().cpu()
    return str(t.dtype).removeprefix("torch."), tuple(t.shape), t.reshape(-1).view(torch.uint8).numpy()


def unpack(packed: tuple) -> torch.Tensor:
    """The tensor of ``pack``: a read-only view when the array came from Ray's object store (copy before writing)."""
    dtype, shape, data = packed
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(data).view(getattr(torch, dtype)).reshape(shape)


def _world_mean(value: torch.Tensor) -> torch.Tensor:
    total = value.detach().float().reshape(1).clone()
    dist.all_reduce(total)
    return total[0] / dist.get_world_size()


def _local(param: torch.Tensor) -> torch.Tensor:
    """The tensor this rank stores for ``param`` (its shard when FSDP2 sharded it)."""
    return param.to_local() if hasattr(param, "to_local") else param.data


def _full(param: torch.Tensor) -> torch.Tensor:
    """The whole weight (gathered from every rank when sharded: a collective)."""
    return param.full_tensor() if hasattr(param, "full_tensor") else param.data


def _rows_of(full: torch.Tensor, param: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """This rank's rows of a whole weight, as FSDP2's Shard(0) split it."""
    if not hasattr(param, "to_local"):
        return full
    return full[shard_rows(full.shape[0], rank, world)]


def _node_ip() -> str:
    try:
        import ray

        return ray.util.get_node_ip_address()
    except Exception:  # outside Ray (tests driving a rank directly)
        return "127.0.0.1"


def _node_id() -> str | None:
    try:
        import ray

        return ray.get_runtime_context().get_node_id()
    except Exception:
        return None


def _ray_gpu_ids() -> list:
    try:
        import ray

        return [str(i) for i in ray.get_gpu_ids()]
    except Exception:
        return []
