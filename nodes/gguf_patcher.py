"""ComfyUI's ModelPatcher for models with GGUF-quantized layers (``stepvideo_core.gguf_ops``).

Core weight patches (LoRAs from ``LoraLoaderModelOnly`` or our LoRA loader) cannot be merged into quantized bytes,
so for a quantized weight the patcher keeps them on the layer (``weight_patches``: one ComfyUI ``LowVramPatch``
over this patcher's patch list) and the layer applies them to the dequantized weight in every forward, on the
compute device. Unquantized tensors (norms, biases, tables, F16 layers) take ComfyUI's usual path.

Partial loading: ComfyUI decides per module whether its weights go to the GPU or stay on the offload device; a
quantized layer left behind moves its bytes in its forward. Patches are forced onto the layer at load for both
kinds (``force_patch_weights``), so an offloaded layer keeps its LoRA, and the ``LowVramPatch`` entries ComfyUI
adds to a quantized layer's ``weight_function`` when it offloads it later are dropped (the layer already has
them), so a patch is never applied twice.
"""

from __future__ import annotations

import comfy.model_patcher
import comfy.utils

from ..stepvideo_core.gguf_ops import is_quantized


def _quantized_layers(model):
    return [m for m in model.modules() if is_quantized(m)]


class GGUFModelPatcher(comfy.model_patcher.ModelPatcher):
    def patch_weight_to_device(self, key, device_to=None, inplace_update=False):
        owner_name, _, attr = key.rpartition(".")
        owner = comfy.utils.get_attr(self.model, owner_name) if owner_name else self.model
        if attr != "weight" or not is_quantized(owner):
            return super().patch_weight_to_device(key, device_to, inplace_update)
        if key in self.patches:
            owner.weight_patches = (comfy.model_patcher.LowVramPatch(key, self.patches),)
        return None

    def _drop_duplicate_lowvram_patches(self) -> None:
        for layer in _quantized_layers(self.model):
            functions = getattr(layer, "weight_function", None)
            if functions:
                layer.weight_function = [f for f in functions if not isinstance(f, comfy.model_patcher.LowVramPatch)]

    def load(self, device_to=None, lowvram_model_memory=0, force_patch_weights=False, full_load=False):
        super().load(device_to, lowvram_model_memory=lowvram_model_memory, force_patch_weights=True,
                     full_load=full_load)
        self._drop_duplicate_lowvram_patches()

    def partially_unload(self, device_to, memory_to_free=0):
        freed = super().partially_unload(device_to, memory_to_free)
        self._drop_duplicate_lowvram_patches()
        return freed

    def unpatch_model(self, device_to=None, unpatch_weights=True):
        if unpatch_weights:
            for layer in _quantized_layers(self.model):
                layer.weight_patches = ()
        return super().unpatch_model(device_to, unpatch_weights)
