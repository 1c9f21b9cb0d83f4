"""StepVideoParallelDiTLoader: the Step-Video DiT on several GPUs (of this machine or of a Ray cluster) as a MODEL.

One Ray actor per GPU holds the DiT (whole, or a shard with shard_weights) and the graph stays the single-GPU graph:
Step-Video Sampler, core KSampler and SamplerCustomAdvanced take the MODEL; LoRA loaders, the Step Cache node and
TI2V conditioning apply to it as to the single-device one (``parallel_model.py`` says how). The actors start on the
first run, keep the DiT between runs, and stop when the loader's settings change, when ComfyUI frees its models and
node cache, or when ComfyUI needs the memory of a GPU it shares with one of them.

The earlier Parallel LoRA Loader and Parallel Sampler remain as deprecated nodes, so saved graphs open and run:
they do what the Step-Video LoRA Loader and Step-Video Sampler do.
"""

from __future__ import annotations

import logging
import os
import weakref

import torch
from comfy_api.latest import io

from ..stepvideo_core.attention import AttentionBackendUnavailable, get_attention, is_available
from ..stepvideo_core.distributed.actor import DiTSpec
from ..stepvideo_core.distributed.engine import (
    EngineConfig,
    RayEngine,
    parse_cluster,
    parse_devices,
    require_ray,
)
from ..stepvideo_core.dit import open_dit_checkpoint, resolve_compute_dtype
from . import registered_folders, validation
from .dit_nodes import StepVideoLoraLoader
from .parallel_model import build_parallel_model
from .sampler_nodes import StepVideoSampler

log = logging.getLogger("stepvideo")

# The actors run without ComfyUI's attention functions, so its own choice ("comfy") is not among theirs.
WORKER_ATTENTION = tuple(a for a in validation.ATTENTION_CHOICES if a != "comfy")
GUIDANCE_PARALLEL = {"auto": None, "on": True, "off": False}
# Longest wait inside one collective before a rank gives up (a hung step then ends and the actors restart).
COLLECTIVE_TIMEOUT_S = 300.0


class EngineOwner:
    """The Ray engines of this ComfyUI process, one running at a time: GPUs hold one copy of the DiT, so a loader with
    new settings stops the previous actors, and so does any engine that starts (an older MODEL still in the node
    cache would otherwise restart its actors beside the new ones, and each would wait for the other's GPUs)."""

    def __init__(self):
        self.engines: weakref.WeakValueDictionary = weakref.WeakValueDictionary()  # settings -> engine (held by MODELs)
        self.owns_ray = False  # a loader started the local Ray: it is shut down once no engine runs

    def engine_for(self, config: EngineConfig, spec: DiTSpec, import_paths: tuple[str, ...]) -> RayEngine:
        key = (config, spec, import_paths)
        engine = self.engines.get(key)
        if engine is None:
            engine = RayEngine(config, spec, import_paths, on_start=self.starting)
            self.engines[key] = engine
        self.starting(engine)
        return engine

    def release(self, engine: RayEngine) -> None:
        """A MODEL is gone (ComfyUI freed its node cache, or the loader's output was replaced): stop its actors, and
        the local Ray this process started once nothing runs on it (its processes would outlive a killed ComfyUI)."""
        engine.close()
        if self.owns_ray and not any(e.running for e in self.engines.values()):
            import ray

            ray.shutdown()
            self.owns_ray = False
            log.info("StepVideo: shut down the local Ray (no parallel DiT left)")

    def starting(self, engine: RayEngine) -> None:
        self.owns_ray = self.owns_ray or engine.started_ray
        for other in list(self.engines.values()):
            if other is not engine and other.running:
                log.info("StepVideo: stopping the parallel DiT actors of earlier loader settings")
                other.close()


ENGINE_OWNER = EngineOwner()


def actor_paths() -> tuple[str, ...]:
    """Besides the core, the actors import ComfyUI's weight patching: the folder holding ``comfy``."""
    import comfy

    return (os.path.dirname(os.path.abspath(list(comfy.__path__)[0])),)


class StepVideoParallelDiTLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="StepVideoParallelDiTLoader",
            display_name="Step-Video Parallel DiT Loader",
            category="StepVideo/loaders",
            description="The Step-Video DiT on several GPUs, of this machine or of a Ray cluster, as a MODEL for any "
                        "sampler: one Ray actor per GPU holds it between runs and each step is split over them "
                        "(guidance parallel, sequence parallel, optionally sharded weights). A .gguf stays quantized "
                        'in every actor. Needs Ray (pip install "ray>=2.40").',
            inputs=[
                io.Combo.Input("model_name", options=registered_folders.dit_choices(),
                               tooltip=f"From {registered_folders.DIT_WHERE}; every machine of a cluster needs it at "
                                       "the same path."),
                io.Combo.Input("weight_dtype", options=list(validation.WEIGHT_DTYPES), default="default",
                               tooltip="Storage dtype on each GPU; default: bf16 on GPUs, fp32 on the CPU. For a "
                                       ".gguf: the dtype it computes in (its weights stay quantized; fp8: bf16)."),
                io.Combo.Input("attention", options=list(WORKER_ATTENTION), default="sdpa",
                               tooltip="Attention inside the actors (they run without ComfyUI's attention)."),
                io.String.Input("devices", default="all",
                                tooltip="'all' (every GPU: of this machine, or of the whole cluster), GPU indices of "
                                        "this machine like '0,1', or 'cpu' (slow, for testing)."),
                io.Int.Input("workers", default=0, min=0, max=64,
                             tooltip="0: one actor per GPU; N: N actors (with 'cpu': N CPU actors)."),
                io.Combo.Input("guidance_parallel", options=list(GUIDANCE_PARALLEL), default="auto",
                               tooltip="auto: cond and uncond on separate halves of the GPUs when their number is even "
                                       "and cfg != 1."),
                io.Boolean.Input("shard_weights", default=False,
                                 tooltip="Split the DiT blocks' weights over the GPUs (FSDP2) so that each holds 1/N "
                                         "of them: for GPUs too small for a whole copy. A .gguf is split as its "
                                         "quantized bytes."),
                io.Int.Input("ff_chunk_size", default=0, min=0, max=1_000_000, step=1024,
                             tooltip="Run the feed-forward over at most this many tokens at a time (0: all at once): "
                                     "less activation memory, the same result."),
                io.String.Input("cluster", default="local",
                                tooltip="'local': start Ray on this machine on first use; 'auto': the Ray already "
                                        "running here; HOST:PORT: a Ray head (`ray start --head`), whose machines' GPUs "
                                        "all serve this ComfyUI (docs/multi-gpu.md)."),
            ],
            outputs=[io.Model.Output()],
        )

    @classmethod
    def validate_inputs(cls, model_name, weight_dtype, attention, devices, workers, guidance_parallel, shard_weights,
                        ff_chunk_size, cluster="local"):
        if model_name is not None and registered_folders.dit_path(model_name) is None:
            return validation.not_found("DiT", model_name, registered_folders.DIT_WHERE)
        for name, value, choices in (("weight_dtype", weight_dtype, validation.WEIGHT_DTYPES),
                                     ("attention", attention, WORKER_ATTENTION),
                                     ("guidance_parallel", guidance_parallel, GUIDANCE_PARALLEL)):
            msg = validation.check_choice(name, value, choices)
            if msg is not True:
                return msg
        if attention is not None and not is_available(attention):
            try:
                get_attention(attention)
            except AttentionBackendUnavailable as e:
                return str(e)
        try:
            if cluster is not None:
                parse_cluster(cluster)
            if devices is not None and workers is not None:
                engine_config(devices, workers, cluster or "local", guidance_parallel or "auto")
        except ValueError as e:
            return str(e)
        return True

    @classmethod
    def execute(cls, model_name, weight_dtype, attention, devices, workers, guidance_parallel, shard_weights,
                ff_chunk_size, cluster="local") -> io.NodeOutput:
        require_ray()  # a missing Ray says what to install before anything else happens
        path = registered_folders.dit_path(model_name)
        if path is None:
            raise FileNotFoundError(validation.not_found("DiT", model_name, registered_folders.DIT_WHERE))
        config = engine_config(devices, workers, cluster, guidance_parallel)
        dtype = validation.parse_dtype(weight_dtype)
        if dtype is None:  # bf16 on GPUs (the release's dtype), fp32 on CPUs (exact, and CPUs are slow at bf16)
            dtype = torch.float32 if "cpu" in config.devices else torch.bfloat16
        spec = DiTSpec(str(path), weight_dtype=dtype, attention=attention, ff_chunk_size=int(ff_chunk_size),
                       shard_weights=bool(shard_weights), guidance_parallel=GUIDANCE_PARALLEL[guidance_parallel])
        engine = ENGINE_OWNER.engine_for(config, spec, actor_paths())
        skeleton, ckpt, _ = open_dit_checkpoint(path)  # names and shapes for LoRA keys and the step cache; no memory
        compute_dtype = resolve_compute_dtype(dtype, None)
        held = dtype if getattr(ckpt, "file", None) is None else f"GGUF kept quantized, compute {compute_dtype}"
        log.info("StepVideo: parallel DiT %s on %s (cluster %s, %s); the actors start on the first run", model_name,
                 ", ".join(config.devices) or "every GPU of the cluster", cluster, held)
        return io.NodeOutput(build_parallel_model(engine, skeleton, compute_dtype, release=ENGINE_OWNER.release))


def engine_config(devices: str, workers: int, cluster: str, guidance_parallel: str) -> EngineConfig:
    local = cluster.strip() == "local"
    wanted, visible = parse_devices(devices, int(workers), local_gpus=None)
    if visible is not None and not local:
        raise ValueError(f"devices {devices!r} names GPUs of this machine, which only a 'local' cluster uses; with a "
                         "cluster address give 'all' (every GPU of the cluster) and, if fewer, a number of workers.")
    if not wanted and local:
        raise ValueError("devices 'all': no CUDA GPU is visible to ComfyUI. Use 'cpu' (with workers >= 1) to run CPU "
                         "actors, which is slow and meant for testing.")
    return EngineConfig(devices=wanted, cluster=cluster.strip(), visible_gpus=visible,
                        collective_timeout_s=COLLECTIVE_TIMEOUT_S)


class StepVideoParallelLoraLoader(io.ComfyNode):
    """Kept so that graphs saved with it still open and run; the Step-Video LoRA Loader does the same."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        single = StepVideoLoraLoader.define_schema()
        return io.Schema(
            node_id="StepVideoParallelLoraLoader",
            display_name="Step-Video Parallel LoRA Loader (deprecated)",
            category="StepVideo/loaders",
            description="Deprecated: the parallel DiT loader now gives a MODEL, so use the Step-Video LoRA Loader (or "
                        "core LoraLoaderModelOnly). This node does the same for graphs saved with it.",
            inputs=[io.Model.Input("parallel_dit"), *single.inputs[1:]],
            outputs=[io.Model.Output(display_name="parallel_dit")],
            is_deprecated=True,
        )

    @classmethod
    def validate_inputs(cls, lora_name, strength):
        return StepVideoLoraLoader.validate_inputs(lora_name, strength)

    @classmethod
    def execute(cls, parallel_dit, lora_name, strength) -> io.NodeOutput:
        return StepVideoLoraLoader.execute(parallel_dit, lora_name, strength)


class StepVideoParallelSampler(io.ComfyNode):
    """Kept so that graphs saved with it still open and run; the Step-Video Sampler does the same."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        single = StepVideoSampler.define_schema()
        return io.Schema(
            node_id="StepVideoParallelSampler",
            display_name="Step-Video Parallel Sampler (deprecated)",
            category="StepVideo/sampling",
            description="Deprecated: the parallel DiT loader now gives a MODEL, so use the Step-Video Sampler (or any "
                        "core sampler). This node does the same for graphs saved with it.",
            inputs=[io.Model.Input("parallel_dit"), *single.inputs[1:]],
            outputs=[io.Latent.Output()],
            is_deprecated=True,
        )

    @classmethod
    def validate_inputs(cls, preset):
        return StepVideoSampler.validate_inputs(preset)

    @classmethod
    def execute(cls, parallel_dit, positive, negative, latent_image, preset, steps, cfg, shift, seed,
                denoise) -> io.NodeOutput:
        return StepVideoSampler.execute(parallel_dit, positive, negative, latent_image, preset, steps, cfg, shift,
                                        seed, denoise)
