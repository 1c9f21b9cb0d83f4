"""ComfyUI's weight patching for one weight, as the Ray actors of the parallel DiT run it.

The actors receive ``ComfyWeightPatcher`` pickled by value (they cannot import this pack by ComfyUI's module name
for it) and ComfyUI's patch objects (LoRAAdapter and friends) as bytes, which it unpickles only after preparing
ComfyUI for the actor's device: ``comfy.model_management`` picks a device when first imported, and the actors do
not get ComfyUI's command line (a CPU actor must say --cpu itself). A LoRA then changes an actor's weight exactly as
``ModelPatcher.patch_weight_to_device`` changes a local one: the patches combined in fp32 by
``comfy.lora.calculate_weight`` (every adapter kind ComfyUI knows), then stochastically rounded to the storage
dtype with the key's seed. A GGUF layer's weight stays quantized, so it gets ``at_forward``: ComfyUI's
``LowVramPatch``, which runs the same ``calculate_weight`` on the dequantized weight in every forward, exactly as
the pack's ``GGUFModelPatcher`` does for a GGUF DiT on one device.
"""

from __future__ import annotations

import torch


class ComfyWeightPatcher:
    def load(self, blob: bytes) -> dict:
        import comfy.cli_args

        if not torch.cuda.is_available():
            comfy.cli_args.args.cpu = True
        import ray.cloudpickle

        return ray.cloudpickle.loads(blob)

    def __call__(self, weight_fp32: torch.Tensor, patches: list, key: str, like: torch.Tensor) -> torch.Tensor:
        import comfy.float
        import comfy.lora
        from comfy.model_patcher import string_to_seed

        out = comfy.lora.calculate_weight(patches, weight_fp32, key)
        return comfy.float.stochastic_rounding(out, like.dtype, seed=string_to_seed(key))

    def at_forward(self, patches: list, key: str):
        from comfy.model_patcher import LowVramPatch

        return LowVramPatch(key, {key: patches})
