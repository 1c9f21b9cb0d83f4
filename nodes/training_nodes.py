"""StepVideoTrainLora: trains a LoRA on a Step-Video MODEL from a folder of clips, with the CLI trainer's code.

Core ``TrainLoraNode`` cannot make the pack's LoRA: it adapts every comfy.ops layer (norms and biases included,
with no target filter), trains on an x0 loss instead of the release's velocity, needs core latents and
conditioning of one shape, and has no Video-DPO. So this node runs ``stepvideo_core.training`` (the trainer of
``python -m stepvideo_core.train_lora``): same buckets, cache, loss, checkpoints and LoRA file.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import comfy.model_management as mm
import comfy.utils
import folder_paths
import torch
from comfy.weight_adapter.lora import LoRAAdapter
from comfy_api.latest import io, ui

from ..stepvideo_core.loading import read_safetensors
from ..stepvideo_core.lora import parse_lora
from ..stepvideo_core.training.cache import Encoders, build_cache
from ..stepvideo_core.training.data import BucketSettings, DataError, scan_folder
from ..stepvideo_core.training.trainer import TrainConfig, train
from . import conversions
from .sampler_nodes import seed_input
from .text_nodes import StepVideoTextEncoders, TextEncodersType
from .vae_nodes import StepVideoVAEHandle, VAEType

log = logging.getLogger("stepvideo")
PACK_ROOT = Path(__file__).resolve().parents[1]
LESSON_CLIPS = "workflows/inputs/step_video_tiny_lora_clips"  # six cyan-square clips the pack ships


def resolve_data_folder(name: str) -> Path:
    """An absolute folder as is; a relative one under ComfyUI's input folder, else under the pack."""
    path = Path(name).expanduser()
    if path.is_absolute():
        return path
    for root in (Path(folder_paths.get_input_directory()), PACK_ROOT):
        if (root / path).is_dir():
            return root / path
    return Path(folder_paths.get_input_directory()) / path


def lora_output_path(lora_name: str) -> Path:
    stem = lora_name.strip().removesuffix(".safetensors")
    if not stem or os.sep in stem or (os.altsep and os.altsep in stem) or stem.startswith("."):
        raise ValueError(f"lora_name {lora_name!r} must be a plain file name (it is written to models/loras)")
    return Path(folder_paths.get_folder_paths("loras")[0]) / f"{stem}.safetensors"


def release_inference_tensors(module: torch.nn.Module) -> int:
    """ComfyUI builds and loads models under ``torch.inference_mode``, and autograd cannot keep such tensors for
    the backward pass (a frozen weight is still needed for the gradient of the activations). Swap each for a
    normal copy, one tensor at a time; returns how many were swapped."""
    swapped = 0
    for sub in module.modules():
        for store in (sub._parameters, sub._buffers):
            for name, tensor in list(store.items()):
                if tensor is not None and tensor.is_inference():
                    copy = tensor.clone()
                    store[name] = torch.nn.Parameter(copy, requires_grad=False) if store is sub._parameters else copy
                    swapped += 1
    return swapped


class StepVideoTrainLora(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="StepVideoTrainLora",
            display_name="Step-Video Train LoRA",
            category="StepVideo/training",
            description="Trains a LoRA on the Step-Video DiT from a folder of clips with same-name .txt captions "
                        "(flow matching, the base frozen), saves it to models/loras and returns the MODEL with it. "
                        "The same trainer as python -m stepvideo_core.train_lora; reruns go on from its checkpoint.",
            inputs=[
                io.Model.Input("model"),
                TextEncodersType.Input("text_encoders"),
                VAEType.Input("vae"),
                io.String.Input("data_folder", default=LESSON_CLIPS,
                                tooltip="Videos/images with same-name .txt captions; a relative path is looked up "
                                        "in ComfyUI's input folder, then in the pack."),
                io.String.Input("lora_name", default="my_step_video_lora"),
                io.Int.Input("steps", default=200, min=1, max=100_000),
                io.Int.Input("rank", default=16, min=1, max=256),
                io.Float.Input("learning_rate", default=0.003, min=1e-7, max=1.0, step=1e-5),
                io.Int.Input("batch_size", default=1, min=1, max=64),
                seed_input("seed"),
                io.Int.Input("width", default=128, min=16, max=4096, step=16),
                io.Int.Input("height", default=128, min=16, max=4096, step=16),
                io.Int.Input("frames", default=17, min=17, max=1700, step=17),
                io.Float.Input("shift", default=3.0, min=0.01, max=100.0, step=0.01),
                io.Float.Input("caption_dropout", default=0.1, min=0.0, max=0.99, step=0.01),
                io.Boolean.Input("gradient_checkpointing", default=False),
            ],
            outputs=[io.Model.Output(), io.String.Output(display_name="lora_file")],
        )

    @classmethod
    def execute(cls, model, text_encoders, vae, data_folder, lora_name, steps, rank, learning_rate, batch_size,
                seed, width, height, frames, shift, caption_dropout, gradient_checkpointing) -> io.NodeOutput:
        dit = getattr(model.model, "diffusion_model", None)
        if not hasattr(dit, "transformer_blocks") or not hasattr(dit, "config"):
            raise ValueError("StepVideoTrainLora needs a MODEL from StepVideoDiTLoader.")
        if not isinstance(text_encoders, StepVideoTextEncoders) or not isinstance(vae, StepVideoVAEHandle):
            raise ValueError("text_encoders and vae must come from the Step-Video loaders.")
        out = lora_output_path(lora_name)
        try:
            report = scan_folder(resolve_data_folder(data_folder), BucketSettings(frames, width, height))
        except DataError as e:
            raise ValueError(str(e)) from None
        log.info("StepVideo LoRA training: %s", report.summary())

        def load_vae():
            vae.load()
            return vae.vae

        # the VAE by its config and a checksum of its first tensors (the socket carries no file name)
        vae_id = f"{vae.vae.config}:" + ",".join(f"{float(p.double().sum()):.10e}" for p in list(vae.vae.parameters())[:4])
        encoders = Encoders(text_id=text_encoders.identity(), vae_id=vae_id,
                            load_text=text_encoders.load, load_vae=load_vae, owned=False,
                            prepare=text_encoders.prepare)
        cache = Path(folder_paths.get_user_directory()) / "stepvideo" / "lora_cache"
        config = TrainConfig(steps=steps, rank=rank, lr=learning_rate, batch_size=batch_size, seed=seed, shift=shift,
                             caption_dropout=caption_dropout, gradient_checkpointing=gradient_checkpointing)
        bar = comfy.utils.ProgressBar(steps)

        def on_step(done, total, loss):
            bar.update_absolute(done, total)
            mm.throw_exception_if_processing_interrupted()  # the trainer checkpoints the steps done, then stops

        with torch.inference_mode(False), torch.enable_grad():
            data = build_cache(report.clips, cache, encoders, log=log.info, device=text_encoders.load_device)
            mm.load_models_gpu([model], force_full_load=True)
            release_inference_tensors(dit)
            result = train(dit, data, config, out, resume=True, device=model.load_device, progress=False,
                           on_step=on_step, log=log.info,
                           metadata={"base_model": f"Step-Video DiT ({dit.config.num_layers} blocks, "
                                                   f"{dit.config.inner_dim} wide)", "data": str(data_folder)})
        lora = parse_lora(read_safetensors(out), dit)
        patches = {key: LoRAAdapter(set(), (up, down, None, None, None, None))
                   for key, (up, down) in conversions.lora_patch_keys(lora.pairs).items()}
        patched = model.clone()
        patched.add_patches(patches, 1.0)
        last = result.history[-1]["loss"] if result.history else float("nan")
        text = (f"{report.summary()}\nLoRA {out.name}: {steps} steps (resumed from {result.resumed_from}), last loss "
                f"{last:.4f}; loss curve {result.paths['plot'].name} beside it in models/loras")
        return io.NodeOutput(patched, out.name, ui=ui.PreviewText(text))
