"""Fault catalogue, runs: cancelling and running out of memory part-way, on the CPU with the shipped tiny model.

A cancel is an exception raised from a progress callback; out of memory is simulated by a hook raising
``torch.OutOfMemoryError`` inside a model. Each must stop at the next step, chunk or tile with a message that
fits the situation, and (through the ``tiny`` fixture) leave every model giving its earlier output.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from stepvideo_core.dit import load_dit
from stepvideo_core.lora import attach, new_trainable_lora
from stepvideo_core.pipeline import generate, sample_latents
from stepvideo_core.text_encoding import encode_prompts
from stepvideo_core.tiny import model as tiny_model
from tests.fault_fixtures import tiny_fixture

# The catalogue reloads or probes the tiny model around every fault: a few minutes in all, so it runs with the
# slow set (scripts/run_tests.sh --all, as CI does).
pytestmark = pytest.mark.slow

tiny = tiny_fixture()
SETTINGS = replace(tiny_model.SETTINGS, height=32, width=32, steps=3)


class Cancelled(Exception):
    pass


@pytest.fixture
def text(tiny):
    with torch.no_grad():
        return encode_prompts(tiny.text, "a green triangle grows", after="keep")


def cancel_at(n):
    calls = []

    def callback(done, total, *latents):
        calls.append(done)
        if done == n:
            raise Cancelled(f"cancelled at {done}/{total}")

    return callback, calls


def simulated_oom(module):
    def hook(*args):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (simulated)")
    return module.register_forward_pre_hook(hook)


# ---- cancel --------------------------------------------------------------------------------------------------------


def test_cancel_mid_sampling_stops_at_that_step_and_the_next_run_matches(tiny, text):
    with torch.no_grad():
        want = sample_latents(tiny.dit, *text, SETTINGS)
        callback, calls = cancel_at(2)
        with pytest.raises(Cancelled, match="cancelled at 2/3"):
            sample_latents(tiny.dit, *text, SETTINGS, callback=callback)
        assert calls == [1, 2], "no model call after the cancelling step"
        assert torch.equal(sample_latents(tiny.dit, *text, SETTINGS), want)


def test_cancel_mid_sampling_with_a_lora_attached_then_detached(tiny, text):
    lora = new_trainable_lora(tiny.dit, rank=2)
    attached = attach(tiny.dit, lora, 0.5)
    try:
        with torch.no_grad(), pytest.raises(Cancelled):
            sample_latents(tiny.dit, *text, SETTINGS, callback=cancel_at(1)[0])
    finally:
        attached.detach()


@pytest.mark.slow  # ~13 s on 2 cores
def test_cancel_mid_tile_stops_at_that_tile(tiny):
    latents = torch.randn(1, 3, 16, 4, 4, generator=torch.Generator().manual_seed(3))
    want = tiny.vae.decode(latents, tile_size=2, tile_overlap=1)
    calls = []

    def callback(done, total):
        calls.append((done, total))
        if done == 2:
            raise Cancelled("tile 2")

    with pytest.raises(Cancelled):
        tiny.vae.decode(latents, tile_size=2, tile_overlap=1, callback=callback)
    assert calls == [(1, 9), (2, 9)]
    assert torch.equal(tiny.vae.decode(latents, tile_size=2, tile_overlap=1), want)


def test_cancel_mid_encode_stops_at_that_chunk(tiny):
    video = torch.rand(1, 34, 3, 32, 32, generator=torch.Generator().manual_seed(4)) * 2 - 1
    calls = []

    def callback(done, total):
        calls.append(done)
        raise Cancelled("chunk 1")

    with pytest.raises(Cancelled):
        tiny.vae.encode(video, sample=False, callback=callback)
    assert calls == [1], "the second 17-frame chunk was not encoded"


def test_cancel_in_generate_before_decoding(tiny, text):
    decoded = []
    handle = tiny.vae.decoder.register_forward_hook(lambda *a: decoded.append(1))
    try:
        with torch.no_grad(), pytest.raises(Cancelled):
            generate(tiny.dit, tiny.vae, *text, SETTINGS, callback=cancel_at(3)[0])
    finally:
        handle.remove()
    assert not decoded, "a cancelled generation does not go on to decode"


# ---- out of memory ---------------------------------------------------------------------------------------------------


def test_oom_at_a_step_names_the_step_with_advice_for_an_fp32_dit(tiny, text):
    handle = simulated_oom(tiny.dit.transformer_blocks[2])
    try:
        with torch.no_grad(), pytest.raises(torch.OutOfMemoryError) as e:
            sample_latents(tiny.dit, *text, SETTINGS)
    finally:
        handle.remove()
    message = str(e.value)
    assert message.startswith("Out of memory at sampling step 1/3 (latents (1, 3, 16, 2, 2)). To fit: ")
    for tip in ("weight dtype fp8_e4m3fn", "compute in bf16 rather than fp32", "ff_chunk_size", "--lowvram",
                "fewer frames (3 latent frames now)"):
        assert tip in message, tip
    assert "(simulated)" in message, "the original error is kept"


def test_oom_advice_fits_an_fp8_dit(tiny, text):
    dit8 = load_dit(tiny_model.paths()["transformer"], weight_dtype=torch.float8_e4m3fn, ff_chunk_size=64)
    handle = simulated_oom(dit8.transformer_blocks[0])
    with torch.no_grad(), pytest.raises(torch.OutOfMemoryError) as e:
        sample_latents(dit8, *text, SETTINGS)
    handle.remove()
    message = str(e.value)
    assert "fp8_e4m3fn" not in message and "rather than fp32" not in message and "ff_chunk_size" not in message
    assert "--lowvram" in message and "fewer frames" in message


def test_oom_at_an_untiled_decode_says_use_tiles(tiny):
    handle = simulated_oom(tiny.vae.decoder)
    try:
        with pytest.raises(torch.OutOfMemoryError, match=r"Out of memory decoding latent frames 0-2 \(2x2 latents\). "
                                                         r"To fit: decode in tiles \(tile_size 16, tile_overlap 4\)"):
            tiny.vae.decode(torch.zeros(1, 6, 16, 2, 2))
    finally:
        handle.remove()


def test_oom_at_a_tile_says_use_smaller_tiles(tiny):
    handle = simulated_oom(tiny.vae.decoder)
    try:
        with pytest.raises(torch.OutOfMemoryError, match=r"use smaller tiles \(now 4x4 latents; try 2x2 with "
                                                         r"tile_overlap 1\), decode in bf16"):
            tiny.vae.decode(torch.zeros(1, 3, 16, 6, 6), tile_size=4, tile_overlap=1)
    finally:
        handle.remove()


def test_oom_at_encode_says_what_to_shrink(tiny):
    handle = simulated_oom(tiny.vae.encoder)
    try:
        with pytest.raises(torch.OutOfMemoryError, match=r"Out of memory encoding frames 0-16 \(32x32\). To fit: "
                                                         "encode a smaller width/height, in bf16"):
            tiny.vae.encode(torch.zeros(1, 17, 3, 32, 32))
    finally:
        handle.remove()


def test_oom_in_a_text_encoder_names_it_with_advice_and_leaves_it_usable(tiny):
    want, _ = encode_prompts(tiny.text, ["a red square moves left", "a blue circle grows"], after="keep")
    for module, encoder, tip in ((tiny.text.step_llm.transformer.layers[1], "Step-LLM", "weight dtype fp8_e4m3fn"),
                                 (tiny.text.clip.model, "Hunyuan-CLIP", "offload the DiT and Step-LLM")):
        handle = simulated_oom(module)
        try:
            with torch.no_grad(), pytest.raises(torch.OutOfMemoryError) as e:
                encode_prompts(tiny.text, ["a red square moves left", "a blue circle grows"], after="keep")
        finally:
            handle.remove()
        message = str(e.value)
        assert message.startswith(f"Out of memory in the {encoder} text encoder (3 prompts"), message
        assert tip in message and "fewer prompts at once (3 now, the negative included)" in message
        assert "(simulated)" in message, "the original error is kept"
    again, _ = encode_prompts(tiny.text, ["a red square moves left", "a blue circle grows"], after="keep")
    assert torch.equal(again.llm_states, want.llm_states) and torch.equal(again.clip_states, want.clip_states)
