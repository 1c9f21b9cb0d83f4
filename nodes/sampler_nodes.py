"""StepVideoSampler, plus StepVideoSigmas and StepVideoNoise for composing with SamplerCustomAdvanced."""

from __future__ import annotations

import comfy.model_management as mm
import comfy.sample
import comfy.samplers
import comfy.utils
import latent_preview
from comfy_api.latest import io

from ..stepvideo_core import scheduler
from . import conversions, validation

_DEFAULT = scheduler.PRESETS[scheduler.DEFAULT_PRESET]


def steps_input() -> io.Int.Input:
    return io.Int.Input("steps", default=_DEFAULT.steps, min=scheduler.STEPS_RANGE[0], max=scheduler.STEPS_RANGE[1])


def shift_input() -> io.Float.Input:
    return io.Float.Input("shift", default=_DEFAULT.shift, min=scheduler.SHIFT_RANGE[0], max=scheduler.SHIFT_RANGE[1],
                          step=0.1, round=0.01)


def denoise_input() -> io.Float.Input:
    return io.Float.Input("denoise", default=1.0, min=scheduler.DENOISE_RANGE[0], max=scheduler.DENOISE_RANGE[1],
                          step=0.01)


def seed_input(name: str) -> io.Int.Input:
    return io.Int.Input(name, default=scheduler.DEFAULT_SEED, min=scheduler.SEED_RANGE[0], max=scheduler.SEED_RANGE[1],
                        control_after_generate=True)


class StepVideoNoiseSource:
    """A NOISE object (``seed`` + ``generate_noise``) drawing the core pipeline's noise for any latent."""

    def __init__(self, seed: int):
        self.seed = int(seed)

    def generate_noise(self, input_latent: dict):
        return conversions.noise_for(input_latent["samples"], self.seed)


def fit_to_model(model, latent_image: dict) -> dict:
    """The latent with the model's channel count: an empty one (StepVideoEmptyLatent makes 64 channels) is
    resized as KSampler does, anything else must already match."""
    conversions.to_core_latent(latent_image["samples"])  # shape check with a clear message
    samples = comfy.sample.fix_empty_latent_channels(model, latent_image["samples"])
    conversions.check_latent_channels(samples, model.get_model_object("latent_format").latent_channels, "this model")
    return {**latent_image, "samples": samples}


def sample(model, positive, negative, latent_image: dict, steps: int, cfg: float, shift: float, seed: int,
           denoise: float = 1.0) -> dict:
    """Euler on the reference schedule through ComfyUI's CFGGuider (model loading, lowvram, LoRA patches,
    previews, progress and cancellation all come from the host)."""
    latent_image = fit_to_model(model, latent_image)
    latent = latent_image["samples"]
    sigmas = conversions.comfy_sigmas(steps, shift, denoise)
    noise = StepVideoNoiseSource(seed).generate_noise(latent_image)
    guider = comfy.samplers.CFGGuider(model)
    guider.set_conds(positive, negative)
    guider.set_cfg(cfg)
    preview = latent_preview.prepare_callback(model, len(sigmas) - 1)

    def callback(step, x0, x, total_steps):
        preview(step, x0, x, total_steps)
        mm.throw_exception_if_processing_interrupted()  # also without a server (the bar's hook does it under one)

    samples = guider.sample(noise, latent, comfy.samplers.sampler_object("euler"), sigmas,
                            denoise_mask=latent_image.get("noise_mask"), callback=callback,
                            disable_pbar=not comfy.utils.PROGRESS_BAR_ENABLED, seed=int(seed))
    out = latent_image.copy()
    out.pop("noise_mask", None)
    out["samples"] = samples.to(mm.intermediate_device())
    return out


class StepVideoSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="StepVideoSampler",
            display_name="Step-Video Sampler",
            category="StepVideo/sampling",
            description="Flow-matching Euler with the reference Step-Video schedule and classifier-free guidance. "
                        f"Presets: {validation.preset_summary()}; 'custom' uses the widgets below.",
            inputs=[
                io.Model.Input("model"),
                io.Conditioning.Input("positive"),
                io.Conditioning.Input("negative"),
                io.Latent.Input("latent_image"),
                io.Combo.Input("preset", options=list(validation.SAMPLER_PRESETS), default=scheduler.DEFAULT_PRESET,
                               tooltip="standard / turbo / tiny override steps, cfg and shift; custom uses them."),
                steps_input(),
                io.Float.Input("cfg", default=_DEFAULT.cfg, min=scheduler.CFG_RANGE[0], max=scheduler.CFG_RANGE[1],
                               step=0.1, round=0.01),
                shift_input(),
                seed_input("seed"),
                denoise_input(),
            ],
            outputs=[io.Latent.Output()],
        )

    @classmethod
    def validate_inputs(cls, preset):
        return validation.check_choice("preset", preset, validation.SAMPLER_PRESETS)

    @classmethod
    def execute(cls, model, positive, negative, latent_image, preset, steps, cfg, shift, seed, denoise) -> io.NodeOutput:
        s = validation.resolve_preset(preset, steps, cfg, shift)
        return io.NodeOutput(sample(model, positive, negative, latent_image, s.steps, s.cfg, s.shift, seed, denoise))


class StepVideoSigmas(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="StepVideoSigmas",
            display_name="Step-Video Sigmas",
            category="StepVideo/sampling",
            description="The reference Step-Video noise schedule as SIGMAS for SamplerCustomAdvanced (euler matches "
                        "StepVideoSampler).",
            inputs=[
                steps_input(),
                shift_input(),
                denoise_input(),
            ],
            outputs=[io.Sigmas.Output()],
        )

    @classmethod
    def execute(cls, steps, shift, denoise=1.0) -> io.NodeOutput:
        return io.NodeOutput(conversions.comfy_sigmas(steps, shift, denoise))


class StepVideoNoise(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="StepVideoNoise",
            display_name="Step-Video Noise",
            category="StepVideo/sampling",
            description="Seeded noise as drawn by StepVideoSampler and the core pipeline, for SamplerCustomAdvanced.",
            inputs=[seed_input("noise_seed")],
            outputs=[io.Noise.Output()],
        )

    @classmethod
    def execute(cls, noise_seed) -> io.NodeOutput:
        return io.NodeOutput(StepVideoNoiseSource(noise_seed))
