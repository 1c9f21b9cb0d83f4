"""A GGUF DiT on Ray actors: Step-Video-Tiny converted to Q8_0, on two CPU ranks of a local Ray, whole on each rank
and sharded with FSDP2, gives the single-process GGUF DiT's outputs (within 1e-5 x max) for a guided batch split
over two rank groups and an unguided one split over the tokens; the ranks hold the quantized bytes (not a
dequantized copy), and weight patches reach quantized layers as a function of the dequantized weight (the way
GGUFModelPatcher applies them on one device) and plain tensors in place, and come off again."""

from __future__ import annotations

import pytest
import torch

from stepvideo_core.distributed.actor import DiTSpec
from stepvideo_core.distributed.engine import EngineConfig, RayEngine, RemoteDiT
from stepvideo_core.dit import load_dit
from tests.builders import text_inputs
from tests.gguf_support import require_gguf
from tests.test_ray_engine import assert_matches, local_call, needs_ray
from tests.weight_patchers import AddDiff

require_gguf()

from stepvideo_core.gguf_ops import is_quantized  # noqa: E402
from stepvideo_core.quantize import convert  # noqa: E402
from stepvideo_core.tiny import model as tiny  # noqa: E402

QUANTIZED_KEY = "diffusion_model.transformer_blocks.1.attn1.wqkv.weight"  # Q8_0 in the file
PLAIN_KEY = "diffusion_model.proj_out.weight"  # kept in F32 by the converter


@pytest.fixture(scope="module")
def q8_file(tmp_path_factory):
    return convert(tiny.TINY_DIR / "transformer", "Q8_0", tmp_path_factory.mktemp("ray_gguf") / "tiny_q8.gguf").out


def stored_bytes(model: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def inputs(model, batch: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    llm, mask, clip = text_inputs(2, 320, model.config.caption_channels, [12, 30])
    x = torch.randn(batch, model.config.in_channels, 2, 4, 6, generator=g)
    return x, torch.full((batch,), 0.3 + 0.2 * seed), llm[:batch], mask[:batch], clip[:batch]


@needs_ray
@pytest.mark.slow
@pytest.mark.parametrize("shard_weights", [False, True], ids=["replicated", "sharded"])
def test_gguf_dit_on_two_actors_stays_quantized_and_matches_one_process(q8_file, shard_weights, monkeypatch):
    import ray

    monkeypatch.setenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    local = load_dit(q8_file, weight_dtype=torch.float32)
    owner = local.get_submodule(QUANTIZED_KEY.removeprefix("diffusion_model.").rpartition(".")[0])
    assert is_quantized(owner) and not is_quantized(local.proj_out)
    g = torch.Generator().manual_seed(11)
    diffs = {key: 0.05 * torch.randn(local.get_parameter(key.removeprefix("diffusion_model.")).shape
                                     if key == PLAIN_KEY else owner.weight_shape, generator=g)
             for key in (QUANTIZED_KEY, PLAIN_KEY)}
    patched = load_dit(q8_file, weight_dtype=torch.float32)
    patched_owner = patched.get_submodule(QUANTIZED_KEY.removeprefix("diffusion_model.").rpartition(".")[0])
    patched_owner.weight_patches = (lambda w: w + diffs[QUANTIZED_KEY],)  # as GGUFModelPatcher's LowVramPatch
    with torch.no_grad():
        patched.proj_out.weight.add_(diffs[PLAIN_KEY])

    ray.init(num_cpus=4, include_dashboard=False)
    engine = RayEngine(EngineConfig(devices=("cpu", "cpu"), collective_timeout_s=60),
                       DiTSpec(str(q8_file), shard_weights=shard_weights))
    try:
        engine.start()
        info = engine.model_info
        assert info["gguf_type"] == "Q8_0" and info["quantized_layers"] == sum(map(is_quantized, local.modules()))
        if shard_weights:  # rank 0 holds its rows of the blocks' quantized bytes
            assert info["stored_bytes"] < 0.75 * stored_bytes(local)
        else:  # the file's bytes, as one process holds them, not a dequantized copy
            assert info["stored_bytes"] == stored_bytes(local)
        remote = RemoteDiT(engine)
        cases = [inputs(local, batch, seed) for batch, seed in ((2, 0), (1, 1))]  # split over groups; over tokens
        for args in cases:
            assert_matches(remote(*args), local_call(local, *args))
        engine.set_weight_patches("with-diffs", {k: [d] for k, d in diffs.items()}, AddDiff())
        for args in cases:
            want = local_call(patched, *args)
            assert not torch.allclose(want, local_call(local, *args), atol=1e-4)  # both patches matter
            assert_matches(remote(*args), want)
        engine.set_weight_patches("none", {}, None)
        assert_matches(remote(*cases[0]), local_call(local, *cases[0]))
    finally:
        engine.close()
        ray.shutdown()
