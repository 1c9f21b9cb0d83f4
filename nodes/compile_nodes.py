"""StepVideoCompileBlocks: ``torch.compile`` of the DiT's transformer blocks (``stepvideo_core/compile.py``)."""

from __future__ import annotations

import comfy.model_management as mm
import comfy.patcher_extension
from comfy_api.latest import io

from ..stepvideo_core.compile import CompiledBlocks, CompileSettings

WRAPPER_KEY = "stepvideo_compile_blocks"


def compiled_blocks_wrapper(compiled: CompiledBlocks):
    """An APPLY_MODEL wrapper (where core TorchCompileModel swaps its compiled modules in) running the blocks
    compiled, or eagerly once compilation has failed."""

    def wrapper(executor, *args, **kwargs):
        return compiled.run(lambda: executor(*args, **kwargs),
                            is_cancel=lambda e: isinstance(e, mm.InterruptProcessingException))

    return wrapper


class StepVideoCompileBlocks(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="StepVideoCompileBlocks",
            display_name="Step-Video Compile Blocks",
            category="StepVideo/sampling",
            description="Compiles the DiT's transformer blocks with torch.compile (static shapes: the first run at a "
                        "new video size compiles). If compiling fails, the log says why and the model runs without.",
            inputs=[
                io.Model.Input("model"),
                io.Combo.Input("backend", options=["inductor", "cudagraphs"], default="inductor",
                               tooltip="inductor generates fused kernels (needs Triton on the GPU, a C++ compiler "
                                       "on the CPU)."),
                io.Combo.Input("mode", options=["default", "max-autotune-no-cudagraphs", "reduce-overhead"],
                               default="default", tooltip="torch.compile mode; max-autotune compiles longer."),
            ],
            outputs=[io.Model.Output()],
        )

    @classmethod
    def execute(cls, model, backend, mode) -> io.NodeOutput:
        dit = getattr(model.model, "diffusion_model", None)
        if not hasattr(dit, "transformer_blocks") or not hasattr(dit, "config"):
            raise ValueError("Step-Video Compile Blocks needs a MODEL from the Step-Video DiT Loader.")
        compiled = CompiledBlocks(dit, CompileSettings(backend, None if mode == "default" else mode))
        patched = model.clone()
        patched.remove_wrappers_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, WRAPPER_KEY)
        patched.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, WRAPPER_KEY,
                                     compiled_blocks_wrapper(compiled))
        return io.NodeOutput(patched)
