"""The Step-Video DiT on Ray actors as a standard ComfyUI MODEL.

``ParallelStepVideoModel`` is ``StepVideoModel`` with the diffusion model's call sent to the actors of a
``RayEngine`` (``stepvideo_core/distributed/engine.py`` says why this split); everything before and after that
call (sampling, guidance, wrappers such as EasyCache, previews, cancellation) runs in ComfyUI as for one GPU. The
local ``diffusion_model`` is the DiT built on the meta device: it has the official module names and shapes, so the
LoRA loaders and the Step Cache node find their keys, and no memory.

``ParallelModelPatcher`` is the ModelPatcher for it: ComfyUI's weight patches (LoRAs from LoraLoaderModelOnly or
the Step-Video LoRA Loader) are never applied locally; before each DiT call the patches of the patcher that is
sampling are sent to the actors when they changed (by ComfyUI's ``patches_uuid``), and the actors apply them with
ComfyUI's own ``calculate_weight`` (``weight_patch.py``). Swapping a LoRA re-patches the actors' weights; the DiT
is not reloaded.
"""

from __future__ import annotations

import logging
import weakref

import comfy.model_management as mm
import comfy.model_patcher
import torch

from ..stepvideo_core.distributed.engine import EngineCancelled, RayEngine, RemoteDiT
from . import weight_patch
from .comfy_model import StepVideoLatentFormat, StepVideoModel, StepVideoModelConfig

log = logging.getLogger("stepvideo")
NO_PATCHES = "none"


class ParallelStepVideoModel(StepVideoModel):
    """``StepVideoModel`` whose DiT call runs on the engine's actors; ``diffusion_model`` is a meta-device twin."""

    def __init__(self, model_config, skeleton, engine: RayEngine, device=None):
        super().__init__(model_config, skeleton, device=device)
        self.engine = engine
        self.remote = RemoteDiT(engine)

    def memory_required(self, input_shape, cond_shapes=None):
        """What a call costs in this process: the latents sent and the output received (the DiT's activations are
        in the actors). Small, so ComfyUI runs cond and uncond as one call, which the actors split over two groups
        of ranks when they can."""
        elements = 1
        for n in input_shape:
            elements *= int(n)
        return 4 * elements * 4

    def _diffusion_forward(self, x, t_ref, llm_states, mask, clip_states, transformer_options, condition=None,
                           motion_score=None):
        patcher = self.current_patcher
        patches = patcher.patches if patcher is not None else {}
        try:
            self.engine.set_weight_patches(str(patcher.patches_uuid) if patches else NO_PATCHES, patches,
                                           shipped_patcher() if patches else None, mm.processing_interrupted)
            return self.remote(x, t_ref, llm_states, mask, clip_states, transformer_options, condition=condition,
                               motion_score=motion_score, should_cancel=mm.processing_interrupted)
        except EngineCancelled:
            mm.throw_exception_if_processing_interrupted()
            raise

    def shares_comfy_gpu(self) -> bool:
        """Whether an actor computes on the GPU ComfyUI itself uses (same card, by its UUID)."""
        device = mm.get_torch_device()
        if device.type != "cuda":
            return False
        mine = str(torch.cuda.get_device_properties(device).uuid)
        return any(info.get("gpu_uuid") == mine for info in self.engine.ranks)


def shipped_patcher() -> weight_patch.ComfyWeightPatcher:
    """``weight_patch.ComfyWeightPatcher``, to be pickled by value: the actors cannot import this pack by its module
    name (ComfyUI names it by its folder's path); its methods import only ComfyUI, which is on the actors' path."""
    import ray.cloudpickle

    ray.cloudpickle.register_pickle_by_value(weight_patch)
    return weight_patch.ComfyWeightPatcher()


class ParallelModelPatcher(comfy.model_patcher.ModelPatcher):
    """A ModelPatcher whose weights live in the actors: loading, offloading and weight patching are the actors'
    business, so the local side only keeps ComfyUI's bookkeeping consistent (nothing to move, nothing to patch).

    Memory: it reports almost no size to ComfyUI (its weights are not in this process). Before each run the actors
    are started if needed and, when one of them shares ComfyUI's GPU, ComfyUI's other models on that GPU are
    offloaded first; when ComfyUI later unloads this model to make room on that GPU, the actors are released."""

    def __init__(self, model, load_device, offload_device, size=1, weight_inplace_update=False):
        super().__init__(model, load_device, offload_device, size=max(1, size),
                         weight_inplace_update=weight_inplace_update)

    def model_size(self):
        return self.size

    def load(self, device_to=None, lowvram_model_memory=0, force_patch_weights=False, full_load=False):
        with self.use_ejected():
            self.model.device = device_to
            self.model.model_loaded_weight_memory = self.size
            self.model.model_lowvram = False
            self.model.current_weight_patches_uuid = self.patches_uuid

    def partially_load(self, device_to, extra_memory=0, force_patch_weights=False):
        self.patch_model(device_to, load_weights=self.model.model_loaded_weight_memory == 0)
        return 0

    def partially_unload(self, device_to, memory_to_free=0):
        return 0

    def unpatch_model(self, device_to=None, unpatch_weights=True):
        self.eject_model()
        if unpatch_weights:
            self.model.current_weight_patches_uuid = None
            self.model.model_loaded_weight_memory = 0
            if device_to is not None:
                self.model.device = device_to
        for key in list(self.object_patches_backup):
            comfy.utils.set_attr(self.model, key, self.object_patches_backup[key])
        self.object_patches_backup.clear()

    def detach(self, unpatch_all=True):
        model = super().detach(unpatch_all)
        if unpatch_all and self.model.engine.running and self.model.shares_comfy_gpu():
            log.info("StepVideo: ComfyUI needs the memory of its GPU, which a DiT actor uses; releasing the actors "
                     "(the next run loads the DiT again)")
            self.model.engine.close()
        return model

    def pre_run(self):
        super().pre_run()
        engine = self.model.engine
        try:
            engine.ensure_started(mm.processing_interrupted)
        except EngineCancelled:
            mm.throw_exception_if_processing_interrupted()
            raise
        if self.model.shares_comfy_gpu():
            device = mm.get_torch_device()
            ours = [m for m in mm.current_loaded_models if m.model is self]
            unloaded = mm.free_memory(1e30, device, keep_loaded=ours)
            if unloaded:
                log.info("StepVideo: offloaded %d ComfyUI model(s) from %s, which a DiT actor shares", len(unloaded),
                         device)


def build_parallel_model(engine: RayEngine, skeleton, compute_dtype: torch.dtype,
                         release=None) -> ParallelModelPatcher:
    """The MODEL for ``engine``'s DiT: ``skeleton`` is the DiT on the meta device (official names and shapes).
    The actors start on the first run; they stop when this MODEL and all its clones are gone (``release(engine)``
    then runs; default ``engine.close``), or earlier, when the loader's settings change or ComfyUI needs their GPU."""
    skeleton.dtype = compute_dtype  # what ComfyUI casts inputs to; the weights' own dtype lives in the actors
    skeleton.compute_dtype = compute_dtype
    config = StepVideoModelConfig(dict(StepVideoModelConfig.unet_config))
    config.latent_format = StepVideoLatentFormat(skeleton.config.in_channels)
    config.set_inference_dtype(compute_dtype, None)
    device = mm.get_torch_device()
    model = ParallelStepVideoModel(config, skeleton, engine, device=mm.unet_offload_device())
    weakref.finalize(model, engine.close if release is None else release, *(() if release is None else (engine,)))
    return ParallelModelPatcher(model, load_device=device, offload_device=mm.unet_offload_device())
