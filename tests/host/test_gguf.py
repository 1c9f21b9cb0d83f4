"""A GGUF DiT in a real ComfyUI: listed by the DiT loader, loaded at its quantized size, a LoRA through core
LoraLoaderModelOnly applied to the dequantized weights, and ComfyUI's partial (low-VRAM) loading."""

from __future__ import annotations

import pytest
import torch

from ..gguf_support import require_gguf
from .conftest import our_sampler, run

require_gguf()

from stepvideo_core.quantize import convert  # noqa: E402

GGUF_NAME = "tiny_q8.gguf"


def is_quantized(module) -> bool:
    """By attribute: ComfyUI imports the pack under its own package name, so its classes are not this test's."""
    return getattr(module, "weight_qtype", None) is not None


@pytest.fixture(scope="module")
def gguf_model(host, base_dir):
    convert(host.tiny / "transformer", "Q8_0", base_dir / "models" / "diffusion_models" / GGUF_NAME)
    assert GGUF_NAME in host.registered_folders.dit_choices()
    (model,) = run(host.classes["StepVideoDiTLoader"], model_name=GGUF_NAME, weight_dtype="fp32", attention="sdpa")
    return model


def _core_lora(host, model):
    (patched,) = host.nodes.LoraLoaderModelOnly().load_lora_model_only(model, "tiny_comfy.safetensors", 1.0)
    return patched


def relative_error(a, b):
    return float((a - b).norm() / b.norm())


def test_gguf_dit_loads_quantized_at_its_size(host, parts, gguf_model):  # noqa: F811
    dit = gguf_model.model.diffusion_model
    assert type(gguf_model).__name__ == "GGUFModelPatcher"
    assert is_quantized(dit.transformer_blocks[0].ff.net[2]) and dit.transformer_blocks[0].ff.net[2].weight.dtype == torch.uint8
    # ComfyUI sizes the model (for its loading decisions) at the quantized bytes: each block-type tensor at its
    # size in the file, the rest in the fp32 compute dtype
    import gguf

    reader = gguf.GGUFReader(gguf_model.model.diffusion_model.gguf_file)
    expected = sum(int(t.n_bytes) if t.tensor_type.name.startswith("Q") else 4 * int(t.n_elements)
                   for t in reader.tensors)
    outside = sum(t.numel() * t.element_size() for k, t in gguf_model.model.state_dict().items()
                  if not k.startswith("diffusion_model."))  # the sampling schedule's buffers
    assert gguf_model.model_size() == expected + outside < 0.6 * parts["model"].model_size()


def test_core_lora_on_gguf_matches_fp32_within_quantization_error(host, parts, gguf_model):  # noqa: F811
    base_ref, base = our_sampler(host, parts["model"], parts), our_sampler(host, gguf_model, parts)
    lora_ref = our_sampler(host, _core_lora(host, parts["model"]), parts)
    patched = _core_lora(host, gguf_model)
    assert len(patched.patches) == 2 and not gguf_model.patches
    with_lora = our_sampler(host, patched, parts)
    quantization = relative_error(base, base_ref)
    assert relative_error(lora_ref, base_ref) > 10 * quantization  # the LoRA moves the output far more ...
    assert relative_error(with_lora, lora_ref) < 2 * quantization + 1e-4  # ... and the same way on GGUF
    # the pack's LoRA loader node patches the same keys the same way
    ours = host.classes["StepVideoLoraLoader"].execute(model=gguf_model, lora_name="tiny_comfy.safetensors",
                                                         strength=1.0).result[0]
    torch.testing.assert_close(our_sampler(host, ours, parts), with_lora, rtol=1e-5, atol=1e-5)
    # the base MODEL is unpatched again once the LoRA's clone is gone
    torch.testing.assert_close(our_sampler(host, gguf_model, parts), base, rtol=0, atol=1e-6)


def test_partial_loading_of_gguf_with_lora_gives_the_same_output(host, parts, gguf_model):  # noqa: F811
    import comfy.model_management as mm
    import comfy.model_patcher

    patched = _core_lora(host, gguf_model)
    full = our_sampler(host, patched, parts)
    mm.unload_all_models()
    budget = patched.model_size() // 4
    original = comfy.model_patcher.ModelPatcher.load
    seen = {}

    def partial_load(self, device_to=None, lowvram_model_memory=0, force_patch_weights=False, full_load=False):
        result = original(self, device_to, lowvram_model_memory=budget, force_patch_weights=force_patch_weights,
                          full_load=False)
        layers = [m for m in self.model.modules() if is_quantized(m)]
        seen["lowvram"] = self.model.model_lowvram
        seen["streamed"] = sum(1 for m in layers if getattr(m, "comfy_cast_weights", False))
        seen["patched"] = sum(1 for m in layers if m.weight_patches)
        return result

    monkeypatch = pytest.MonkeyPatch()
    monkeypatch.setattr(comfy.model_patcher.ModelPatcher, "load", partial_load)
    try:
        partial = our_sampler(host, patched, parts)
    finally:
        monkeypatch.undo()
        mm.unload_all_models()
    # some quantized layers stayed on the offload device, and both LoRA layers carry their patch
    assert seen["lowvram"] and seen["streamed"] > 0 and seen["patched"] == 2, seen
    torch.testing.assert_close(partial, full, rtol=1e-5, atol=1e-5)


def test_gguf_step_llm_in_its_folder_encodes_like_the_safetensors(host, base_dir):
    """A Step-LLM .gguf beside its tokenizer in models/text_encoders/<folder>: the loader lists it, and the states
    it encodes equal the safetensors folder's within the quantization error; its identity for the text cache is
    not the safetensors folder's."""
    import shutil

    from .conftest import CLIP, encode, loader, states

    source = host.tiny / "step_llm"
    folder = base_dir / "models" / "text_encoders" / "step_llm_gguf"
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("config.json", "step1_chat_tokenizer.model"):
        shutil.copy(source / name, folder)
    convert(source, "Q8_0", folder / "step_llm-Q8_0.gguf")
    name = "step_llm_gguf/step_llm-Q8_0.gguf"
    assert name in host.registered_folders.step_llm_choices()
    (enc,) = run(host.classes["StepVideoTextEncoderLoader"], step_llm=name, hunyuan_clip=CLIP, llm_dtype="fp32",
                 device="default")
    reference = loader(host)
    assert enc.identity() != reference.identity()
    pos, _ = encode(host, enc)
    ref_pos, _ = encode(host, reference)
    llm_states, mask, clip = states(pos)
    ref_states, ref_mask, ref_clip = states(ref_pos)
    assert torch.equal(mask, ref_mask) and torch.equal(clip, ref_clip)
    assert 0 < relative_error(llm_states, ref_states) < 0.02
    assert getattr(enc.encoders.step_llm.transformer.layers[0].attention.wqkv, "weight_qtype", None) is not None

    # ComfyUI's partial loading of the quantized Step-LLM (a quarter of it on the load device): the same states
    import comfy.model_management as mm
    import comfy.model_patcher

    mm.unload_all_models()
    budget = enc.llm_patcher.model_size() // 4
    original = comfy.model_patcher.ModelPatcher.load
    seen = {}

    def partial_load(self, device_to=None, lowvram_model_memory=0, force_patch_weights=False, full_load=False):
        if self is not enc.llm_patcher:
            return original(self, device_to, lowvram_model_memory, force_patch_weights, full_load)
        result = original(self, device_to, lowvram_model_memory=budget, force_patch_weights=False, full_load=False)
        seen["streamed"] = sum(1 for m in self.model.modules()
                               if getattr(m, "comfy_cast_weights", False) and is_quantized(m))
        return result

    monkeypatch = pytest.MonkeyPatch()
    monkeypatch.setattr(comfy.model_patcher.ModelPatcher, "load", partial_load)
    try:
        partial, _ = encode(host, enc)
    finally:
        monkeypatch.undo()
        mm.unload_all_models()
    assert seen["streamed"] > 0, seen
    torch.testing.assert_close(states(partial)[0], llm_states, rtol=1e-6, atol=1e-6)
