"""What fits a machine: the precision of the DiT and Step-LLM, how much is offloaded, peak VRAM and RAM.

Projected, not measured: weight bytes come from the models' tensor shapes (the released configs) stored the way
the loaders store them (fp8: Linear/embedding weights 1 byte, the rest bf16; GGUF: the converter's per-tensor
choice, ``quantize.choose_type``), and activation bytes from the measured formulas of ``memory.py``. The run is
taken as the CLI runs it: Step-LLM encodes (batch of the prompt and the negative) and is released, then the DiT
samples (cond and uncond in one batch when that fits, else one after the other, as ComfyUI decides), then the VAE
decodes in tiles. Each model's weights are loaded into RAM first; what does not fit the GPU next to the activations
stays in RAM and is streamed layer by layer (ComfyUI's partial loading), costing its bytes over PCIe every step.

``GPU_RESERVE`` and ``RAM_RESERVE`` stand for the CUDA context and allocator slack, and for the interpreter, torch,
ComfyUI and the small models (CLIP, VAE); both are assumptions, stated in the output.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
from torch import nn

from . import memory
from .dit import DiTConfig, StepVideoDiT
from .ops import is_weight_layer
from .step_llm import StepLLM, StepLLMConfig
from .vae import VAEConfig
from .video_shape import check_request, latent_grid

GB = 1e9
GPU_RESERVE = 1.5 * GB
RAM_RESERVE = 6.0 * GB
# In order of quality (Q8_0 is reported closer to bf16 than plain fp8 for video DiTs); the plan takes the first
# that fits. GGUF names are the converter's types.
DIT_FORMATS = ("bf16", "Q8_0", "fp8", "Q5_0", "Q4_0")
LLM_FORMATS = ("bf16", "Q8_0", "fp8", "Q4_0")
VAE_TILES = (None, 32, 24, 16, 12, 8)  # latents per tile side; None = whole frames
VAE_WEIGHT_BYTES = 2 * 0.52e9  # decoder + encoder of vae_v2 in bf16 (about 260 M parameters each side, projected)
STREAM_GBPS = 25.0  # PCIe 4.0 x16 in practice, for the per-step streaming time (projected)


def _gguf_bytes(name: str, shape: tuple[int, ...], fmt: str) -> int | None:
    try:
        from . import gguf_quant
        from .quantize import choose_type
    except ImportError:
        return None
    qtype, _ = choose_type(name, shape, gguf_quant.Q[fmt], torch.bfloat16)
    return gguf_quant.stored_bytes(shape, qtype)


def weight_bytes(model: nn.Module, fmt: str) -> int | None:
    """Bytes of ``model``'s tensors stored as ``fmt`` (bf16, fp8 or a GGUF type); None when gguf is missing."""
    total = 0
    for name, tensor in model.state_dict().items():
        owner = model.get_submodule(name.rpartition(".")[0])
        shape = tuple(tensor.shape)
        n = math.prod(shape)
        if fmt == "bf16":
            total += 2 * n
        elif fmt == "fp8":
            total += n if name.endswith("weight") and is_weight_layer(owner) else 2 * n
        else:
            size = _gguf_bytes(name, shape, fmt)
            if size is None:
                return None
            total += size
    return total


def _weight_format(fmt: str):
    if fmt == "bf16":
        return torch.bfloat16
    if fmt == "fp8":
        return torch.float8_e4m3fn
    from .gguf_quant import Q

    return Q[fmt]


@dataclass
class StagePlan:
    model: str
    fmt: str
    weights: float  # bytes
    activations: float
    offloaded: float
    vram: float
    ram: float
    note: str = ""

    forwards_per_step: int = 0  # DiT calls per sampling step (0: runs once, as Step-LLM does)

    def streamed_per_step(self) -> float:
        return self.offloaded * self.forwards_per_step

    def describe(self) -> str:
        if self.offloaded <= 0:
            where = "all on the GPU"
        elif self.forwards_per_step:
            where = (f"{self.offloaded / GB:.1f} GB offloaded to RAM and streamed {self.forwards_per_step}x per step "
                     f"(~{self.streamed_per_step() / GB / STREAM_GBPS:.1f} s per step at {STREAM_GBPS:g} GB/s)")
        else:
            where = f"{self.offloaded / GB:.1f} GB offloaded to RAM and streamed layer by layer"
        return (f"{self.model}: {self.fmt} ({self.weights / GB:.1f} GB weights), {where}; peak VRAM "
                f"{self.vram / GB:.1f} GB, RAM {self.ram / GB:.1f} GB{'; ' + self.note if self.note else ''}")


@dataclass
class FitPlan:
    gpu: float
    ram: float
    request: tuple[int, int, int]
    llm: StagePlan | None
    dit: StagePlan | None
    vae_tile: int | None | str
    problems: list[str]

    @property
    def fits(self) -> bool:
        return not self.problems

    def peak_vram(self) -> float:
        return max(s.vram for s in (self.llm, self.dit) if s is not None)

    def peak_ram(self) -> float:
        return max(s.ram for s in (self.llm, self.dit) if s is not None)

    def describe(self) -> str:
        w, h, f = self.request
        lines = [f"Plan for {w}x{h}, {f} frames on a {self.gpu / GB:g} GB GPU with {self.ram / GB:g} GB RAM "
                 "(projected from the model's shapes and stepvideo_core.memory; assumes "
                 f"{GPU_RESERVE / GB:g} GB of VRAM and {RAM_RESERVE / GB:g} GB of RAM for everything else):"]
        for stage in (self.llm, self.dit):
            if stage is not None:
                lines.append("  " + stage.describe())
        if self.vae_tile is not None:
            tile = "whole frames" if self.vae_tile == "whole" else f"--tile-size {self.vae_tile}"
            lines.append(f"  VAE decode: {tile}")
        if self.fits:
            lines.append(f"  Peak VRAM {self.peak_vram() / GB:.1f} GB, peak RAM {self.peak_ram() / GB:.1f} GB.")
        else:
            lines.append("  Does not fit: " + " ".join(self.problems))
        return "\n".join(lines)


@functools.cache
def _meta_models() -> tuple[StepVideoDiT, StepLLM]:
    """The released architectures on the meta device (shapes only; built once, never changed)."""
    with torch.device("meta"):
        return StepVideoDiT(DiTConfig()), StepLLM(StepLLMConfig())


def _stage(name, model, formats, gpu, ram, options_for) -> tuple[StagePlan | None, str | None]:
    """The first format whose weights fit the RAM and whose activations (with one layer in flight) fit the GPU;
    of its ways to run (``options_for``: (activation bytes, forwards per step, note)), the one streaming the
    fewest bytes per step."""
    tried = []
    for fmt in formats:
        weights = weight_bytes(model, fmt)
        if weights is None:
            continue
        if weights + RAM_RESERVE > ram:
            tried.append(f"{fmt} needs {(weights + RAM_RESERVE) / GB:.0f} GB RAM")
            continue
        stages = []
        for activations, forwards, note in options_for(_weight_format(fmt)):
            if activations + GPU_RESERVE > gpu:
                continue
            on_gpu = max(0.0, min(weights, gpu - GPU_RESERVE - activations))
            stages.append(StagePlan(name, fmt, weights, activations, weights - on_gpu,
                                    GPU_RESERVE + activations + on_gpu, RAM_RESERVE + weights, note, forwards))
        if stages:
            return min(stages, key=lambda st: st.streamed_per_step()), None
        tried.append(f"{fmt}: the activations alone exceed the GPU")
    return None, f"{name}: nothing fits ({'; '.join(tried)})."


def plan(gpu_gb: float, ram_gb: float, width: int = 992, height: int = 544, frames: int = 204) -> FitPlan:
    check_request(width, height, frames)
    gpu, ram = gpu_gb * GB, ram_gb * GB
    dit_model, llm_model = _meta_models()
    lf, lh, lw = latent_grid(width, height, frames)
    tokens = lf * lh * lw
    dit_cfg = dit_model.config
    problems = []

    def llm_activations(fmt):
        batch, length = memory.prompt_pair_tokens()
        return [(memory.step_llm_activation_bytes(llm_model.config, batch, length, torch.bfloat16, fmt, True), 0, "")]

    def dit_activations(fmt):
        options = []
        for batch, chunk, note in ((2, 0, "cond+uncond batched"), (1, 0, "cond, uncond in turn"),
                                   (1, 8192, "in turn, --ff-chunk-size 8192")):
            cfg = DiTConfig(**{**vars(dit_cfg), "ff_chunk_size": chunk})
            options.append((memory.dit_activation_bytes(cfg, batch, tokens, torch.bfloat16, fmt, streamed=True),
                            3 - batch, note))
        return options

    llm, problem = _stage("Step-LLM", llm_model, LLM_FORMATS, gpu, ram, llm_activations)
    if problem:
        problems.append(problem)
    dit, problem = _stage("DiT", dit_model, DIT_FORMATS, gpu, ram, dit_activations)
    if problem:
        problems.append(problem)

    vae_tile = None
    for tile in VAE_TILES:
        need = memory.vae_decode_bytes(VAEConfig(), 1, lf, lh, lw, torch.bfloat16, tile) + VAE_WEIGHT_BYTES
        if need + GPU_RESERVE <= gpu:
            vae_tile = "whole" if tile is None else tile
            break
    if vae_tile is None:
        problems.append("VAE decode: even 8-latent tiles exceed the GPU.")
    if problems:
        problems.append(advice(gpu_gb, ram_gb, frames, width, height, dit, llm))
    return FitPlan(gpu, ram, (width, height, frames), llm, dit, vae_tile, problems)


def advice(gpu_gb, ram_gb, frames, width, height, dit, llm) -> str:
    tips = []
    if dit is None or llm is None:
        tips.append(f"more RAM (Q4_0 needs about {((weight_bytes(_meta_models()[0], 'Q4_0') or 0) + RAM_RESERVE) / GB:.0f} "
                    "GB for the DiT), or swap space")
    if frames > 51:
        tips.append(f"fewer frames (--frames {max(17, frames // 2 // 17 * 17)})")
    if width * height > 544 * 544:
        tips.append("a smaller size (e.g. --width 544 --height 320)")
    tips.append("several GPUs (torchrun ... --shard-weights, see the README's multi-GPU section)")
    return "To fit: " + "; ".join(tips) + "."


def fit_table(gpus=(12, 16, 24, 48, 80), rams=(32, 64), **request) -> str:
    """A Markdown table of ``plan`` over GPU and RAM sizes (projected)."""
    width, height, frames = request.get("width", 992), request.get("height", 544), request.get("frames", 204)
    rows = ["| GPU | RAM | frames | DiT | Step-LLM | DiT streamed per step | VAE decode | peak VRAM | peak RAM |",
            "|---|---|---|---|---|---|---|---|---|"]
    for gpu in gpus:
        for ram in rams:
            count = frames
            p = plan(gpu, ram, width, height, count)
            while not p.fits and count > 17:  # the longest clip that fits, in whole 17-frame chunks
                count -= 17
                p = plan(gpu, ram, width, height, count)
            if not p.fits:
                rows.append(f"| {gpu} GB | {ram} GB | - | does not fit: {' '.join(p.problems[:-1])} | | | | | |")
                continue
            tile = "whole frames" if p.vae_tile == "whole" else f"tiles of {p.vae_tile}"
            rows.append(f"| {gpu} GB | {ram} GB | {count} | {p.dit.fmt} ({p.dit.note}) | {p.llm.fmt} | "
                        f"{p.dit.streamed_per_step() / GB:.1f} GB | {tile} | {p.peak_vram() / GB:.1f} GB | "
                        f"{p.peak_ram() / GB:.1f} GB |")
    return "\n".join(rows)
