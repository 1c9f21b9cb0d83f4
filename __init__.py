"""Step-Video-T2V for ComfyUI (V3 nodes).

Importing this package does nothing heavy and needs no ComfyUI: the node modules (which import ``comfy``) are
imported inside ``comfy_entrypoint``, which ComfyUI calls when it loads the pack. So ``pytest`` in the
repository root, where ComfyUI is absent, can import this file safely.
"""

WEB_DIRECTORY = "./js"


def _node_list() -> list:
    from .nodes.cache_nodes import StepVideoStepCache
    from .nodes.compile_nodes import StepVideoCompileBlocks
    from .nodes.dit_nodes import StepVideoDiTLoader, StepVideoLoraLoader
    from .nodes.i2v_nodes import StepVideoImageToVideo, provide_example_image
    from .nodes.latent_nodes import StepVideoEmptyLatent
    from .nodes.parallel_nodes import StepVideoParallelDiTLoader, StepVideoParallelLoraLoader, StepVideoParallelSampler
    from .nodes.registered_folders import register_folders
    from .nodes.sampler_nodes import StepVideoNoise, StepVideoSampler, StepVideoSigmas
    from .nodes.text_nodes import StepVideoTextEncode, StepVideoTextEncoderLoader
    from .nodes.training_nodes import StepVideoTrainLora
    from .nodes.vae_nodes import StepVideoVAEDecode, StepVideoVAEEncode, StepVideoVAELoader

    register_folders()
    provide_example_image()
    return [
        StepVideoDiTLoader,
        StepVideoLoraLoader,
        StepVideoTextEncoderLoader,
        StepVideoTextEncode,
        StepVideoVAELoader,
        StepVideoVAEDecode,
        StepVideoVAEEncode,
        StepVideoEmptyLatent,
        StepVideoImageToVideo,
        StepVideoSampler,
        StepVideoSigmas,
        StepVideoNoise,
        StepVideoParallelDiTLoader,
        StepVideoParallelLoraLoader,
        StepVideoParallelSampler,
        StepVideoStepCache,
        StepVideoCompileBlocks,
        StepVideoTrainLora,
    ]


async def comfy_entrypoint():
    from comfy_api.latest import ComfyExtension

    class StepVideoExtension(ComfyExtension):
        async def get_node_list(self) -> list:
            return _node_list()

    return StepVideoExtension()
