"""StepVideoStepCache: the core step cache (``stepvideo_core/step_cache.py``) on a Step-Video MODEL."""

from __future__ import annotations

import logging

import comfy.model_patcher
import comfy.patcher_extension
from comfy_api.latest import io

from ..stepvideo_core.step_cache import OPTIONS_KEY, StepCache, StepCacheSettings

log = logging.getLogger("stepvideo")


def fresh_cache_per_run(executor, *args, **kwargs):
    """OUTER_SAMPLE wrapper: each sampling run gets its own cache state (a cancelled or finished run leaves nothing
    behind for the next), and the log says how many forward passes ran their blocks."""
    guider = executor.class_obj
    original = guider.model_options
    guider.model_options = comfy.model_patcher.create_model_options_clone(original)
    options = guider.model_options["transformer_options"]
    cache = StepCache(options[OPTIONS_KEY].settings)
    cache.stats.blocks_per_pass = options[OPTIONS_KEY].stats.blocks_per_pass
    options[OPTIONS_KEY] = cache
    try:
        return executor(*args, **kwargs)
    finally:
        log.info("Step-Video %s", cache.stats.summary())
        guider.model_options = original


class StepVideoStepCache(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="StepVideoStepCache",
            display_name="Step-Video Step Cache",
            category="StepVideo/sampling",
            description="Skips the DiT's transformer blocks on steps where their work can be predicted from the last "
                        "computed steps (about 2-3x fewer block evaluations at the default threshold). Works with "
                        "guidance, LoRAs, partial loading and any sampler node.",
            inputs=[
                io.Model.Input("model"),
                io.Float.Input("threshold", default=StepCacheSettings.threshold, min=0.0, max=3.0, step=0.01,
                               tooltip="Higher skips more steps. 0 turns the cache off."),
                io.Float.Input("start_percent", default=StepCacheSettings.start, min=0.0, max=1.0, step=0.01,
                               tooltip="Fraction of the steps that always run before caching starts."),
                io.Float.Input("end_percent", default=StepCacheSettings.end, min=0.0, max=1.0, step=0.01,
                               tooltip="Fraction of the steps after which every step runs again."),
            ],
            outputs=[io.Model.Output()],
        )

    @classmethod
    def validate_inputs(cls, threshold, start_percent, end_percent):
        try:
            StepCacheSettings(threshold, start_percent, end_percent)
        except ValueError as e:
            return str(e)
        return True

    @classmethod
    def execute(cls, model, threshold, start_percent, end_percent) -> io.NodeOutput:
        dit = getattr(model.model, "diffusion_model", None)
        if not hasattr(dit, "transformer_blocks") or not hasattr(dit, "config"):
            raise ValueError("Step-Video Step Cache needs a MODEL from the Step-Video DiT Loader.")
        cache = StepCache(StepCacheSettings(threshold, start_percent, end_percent))
        patched = model.clone()
        patched.model_options["transformer_options"] = cache.transformer_options(
            dit, base=patched.model_options.get("transformer_options", {}))
        patched.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, OPTIONS_KEY, fresh_cache_per_run)
        return io.NodeOutput(patched)
