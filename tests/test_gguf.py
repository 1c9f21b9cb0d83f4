"""GGUF checkpoints: the converter's files, loading them through the usual loaders, LoRAs on quantized weights, and
the messages for broken files."""

from __future__ import annotations

import shutil
import struct

import pytest
import torch
from safetensors.torch import save_file

from tests.builders import small_dit, text_inputs
from tests.gguf_support import require_gguf

gguf = require_gguf()

from stepvideo_core import gguf_quant, lora  # noqa: E402
from stepvideo_core.dit import load_dit  # noqa: E402
from stepvideo_core.gguf_ops import is_quantized  # noqa: E402
from stepvideo_core.loading import CheckpointError  # noqa: E402
from stepvideo_core.quantize import convert  # noqa: E402
from stepvideo_core.step_llm import StepLLMTokenizer, load_step_llm  # noqa: E402
from stepvideo_core.tiny import model as tiny  # noqa: E402

Q = gguf.GGMLQuantizationType
TINY_DIT = tiny.TINY_DIR / "transformer"
TINY_LLM = tiny.TINY_DIR / "step_llm"


@pytest.fixture(scope="module")
def tiny_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("gguf")
    return {t: convert(TINY_DIT, t, folder / f"tiny_{t}.gguf").out for t in ("Q8_0", "Q4_0")} | {
        "llm_Q8_0": convert(TINY_LLM, "Q8_0", folder / "llm_Q8_0.gguf").out}


def dit_inputs(config, seed=0):
    g = torch.Generator().manual_seed(seed)
    llm, mask, clip = text_inputs(2, 320, config.caption_channels, [12, 30])
    x = torch.randn(2, 2, config.in_channels, 4, 6, generator=g)
    return x, torch.tensor([0.2, 0.7]), llm, mask, clip


def relative_error(a, b):
    return float((a - b).norm() / b.norm())


def test_converter_writes_official_names_architecture_and_kept_families(tiny_files):
    reader = gguf.GGUFReader(tiny_files["Q8_0"])
    assert reader.get_field("general.architecture").contents() == "stepvideo-dit"
    types = {t.name: t.tensor_type for t in reader.tensors}
    from stepvideo_core.loading import Checkpoint

    assert set(types) == set(Checkpoint(TINY_DIT).keys())  # the official names, nothing renamed or dropped
    assert types["transformer_blocks.0.attn1.wqkv.weight"] == Q.Q8_0
    assert types["transformer_blocks.0.ff.net.2.weight"] == Q.Q8_0
    assert types["transformer_blocks.0.scale_shift_table"] == Q.F32  # a bare parameter
    assert types["transformer_blocks.0.norm1.weight"] == Q.F32
    assert types["proj_out.weight"] == Q.F16 and types["pos_embed.proj.weight"] == Q.F16  # source is fp16
    shapes = {t.name: tuple(reversed(t.shape.tolist())) for t in reader.tensors}
    assert shapes["transformer_blocks.0.attn1.wqkv.weight"] == Checkpoint(TINY_DIT).shape(
        "transformer_blocks.0.attn1.wqkv.weight")


@pytest.mark.parametrize("qtype, tolerance", [("Q8_0", 0.01), ("Q4_0", 0.12)])
def test_gguf_dit_loads_quantized_and_matches_fp32(tiny_files, qtype, tolerance):
    ref = load_dit(TINY_DIT, weight_dtype=torch.float32)
    model = load_dit(tiny_files[qtype], weight_dtype=torch.float32)
    assert model.config == ref.config
    wqkv = model.transformer_blocks[0].attn1.wqkv
    assert is_quantized(wqkv) and wqkv.weight.dtype == torch.uint8 and wqkv.weight_qtype == Q[qtype]
    assert not is_quantized(model.proj_out) and model.scale_shift_table.dtype == torch.float32
    # held at the quantized size (what ComfyUI's module_size counts): Q8_0 under 0.6 of the fp32 bytes
    size = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    ref_size = sum(t.numel() * t.element_size() for t in ref.state_dict().values())
    assert size < {"Q8_0": 0.3, "Q4_0": 0.18}[qtype] * ref_size
    inputs = dit_inputs(model.config)
    with torch.no_grad():
        assert relative_error(model(*inputs), ref(*inputs)) < tolerance


def test_bf16_compute_dequantizes_in_bf16(tiny_files):
    model = load_dit(tiny_files["Q8_0"], weight_dtype=torch.bfloat16)
    ref = load_dit(tiny_files["Q8_0"], weight_dtype=torch.float32)
    assert model.compute_dtype == torch.bfloat16 and model.scale_shift_table.dtype == torch.bfloat16
    inputs = dit_inputs(model.config)
    with torch.no_grad():
        out = model(*inputs)
        assert out.dtype == torch.bfloat16 and relative_error(out.float(), ref(*inputs)) < 0.03


def test_gguf_in_the_official_folder_loads(tiny_files, tmp_path):
    folder = tmp_path / "transformer"
    folder.mkdir()
    shutil.copy(TINY_DIT / "config.json", folder)
    shutil.copy(tiny_files["Q8_0"], folder / "tiny.gguf")
    assert is_quantized(load_dit(folder, weight_dtype=torch.float32).transformer_blocks[0].attn2.wkv)


def test_gguf_step_llm_encodes_within_quantization_error(tiny_files, tmp_path):
    tokenizer = StepLLMTokenizer(TINY_LLM)
    ids, mask = tokenizer(["a red circle moves left", "一个绿色的方块向上移动"], max_length=48)
    ref = load_step_llm(TINY_LLM, weight_dtype=torch.float32)
    # in place of the shards in the Step-LLM folder (tokenizer and config beside it) ...
    folder = tmp_path / "step_llm"
    folder.mkdir()
    for name in ("config.json", "step1_chat_tokenizer.model"):
        shutil.copy(TINY_LLM / name, folder)
    shutil.copy(tiny_files["llm_Q8_0"], folder / "step_llm-Q8_0.gguf")
    in_folder = load_step_llm(folder, weight_dtype=torch.float32)
    # ... and alone, its head count then read from the config the converter recorded
    alone = load_step_llm(tiny_files["llm_Q8_0"], weight_dtype=torch.float32)
    assert alone.config == in_folder.config == ref.config
    assert is_quantized(alone.transformer.layers[0].feed_forward.w1)
    with torch.no_grad():
        expected = ref(ids, mask)
        for model in (in_folder, alone):
            assert relative_error(model(ids, mask), expected) < 0.02


def _write_small_dit(path, heads=2, head_dim=32, layers=2, caption=(64, 32), seed=0, edit=None):
    model = small_dit(heads=heads, head_dim=head_dim, layers=layers, channels=8, caption=caption, seed=seed)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if edit:
        edit(state)
    save_file(state, str(path))
    return model


def test_lora_on_gguf_equals_lora_on_fp32_within_quantization_error(tmp_path):
    _write_small_dit(tmp_path / "dit.safetensors")
    convert(tmp_path / "dit.safetensors", "Q8_0", tmp_path / "dit.gguf")
    ref = load_dit(tmp_path / "dit.safetensors", weight_dtype=torch.float32)
    model = load_dit(tmp_path / "dit.gguf", weight_dtype=torch.float32)
    adapters = lora.new_trainable_lora(ref, rank=4, seed=3)
    for pair in adapters.pairs.values():
        pair.up.data.normal_(0, 0.3, generator=torch.Generator().manual_seed(5))
    inputs = dit_inputs(ref.config)
    with torch.no_grad():
        base_error = relative_error(model(*inputs), ref(*inputs))
        base = ref(*inputs)
        handles = [lora.attach(m, adapters, 1.0) for m in (ref, model)]
        with_lora_ref, with_lora = ref(*inputs), model(*inputs)
        for h in handles:
            h.detach()
    assert relative_error(with_lora_ref, base) > 0.1  # the LoRA changes the output a lot ...
    assert relative_error(with_lora, with_lora_ref) < max(2 * base_error, 0.01)  # ... identically on GGUF

    # A core-style weight patch (ComfyUI's LoRA merged at forward time): applied to the dequantized weight exactly.
    layer_q = model.transformer_blocks[1].attn1.wqkv
    layer_ref = ref.transformer_blocks[1].attn1.wqkv
    delta = 0.05 * torch.randn(layer_ref.weight.shape, generator=torch.Generator().manual_seed(7))
    layer_q.weight_patches = (lambda w: w + delta.to(w.dtype),)
    dequantized = gguf_quant.dequantize(layer_q.weight, layer_q.weight_qtype, layer_q.weight_shape)
    assert torch.equal(layer_q.dequantized_weight(torch.device("cpu"), torch.float32), dequantized + delta)
    layer_ref.weight.data += delta
    with torch.no_grad():
        assert relative_error(model(*inputs), base) > 0.01
        assert relative_error(model(*inputs), ref(*inputs)) < max(2 * base_error, 0.01)


# ---- broken files ---------------------------------------------------------------------------------------------


def test_truncated_gguf_names_the_file(tiny_files, tmp_path):
    data = tiny_files["Q8_0"].read_bytes()
    for cut in (len(data) // 2, 100):
        bad = tmp_path / f"cut{cut}.gguf"
        bad.write_bytes(data[:cut])
        with pytest.raises(CheckpointError, match=rf"{bad.name} is truncated or corrupt .*download or convert it again"):
            load_dit(bad)


def test_not_a_gguf_file(tmp_path):
    bad = tmp_path / "x.gguf"
    bad.write_bytes(b"PK\x03\x04" + bytes(100))
    with pytest.raises(CheckpointError, match="is not a GGUF file"):
        load_dit(bad)


def _patch_tensor_type(data: bytes, name: str, new_type: int) -> bytes:
    """Rewrite the type field of one tensor's info (after its name, dim count and dims)."""
    start = data.index(name.encode()) + len(name)
    n_dims = struct.unpack_from("<I", data, start)[0]
    offset = start + 4 + 8 * n_dims
    return data[:offset] + struct.pack("<I", new_type) + data[offset + 4:]


def test_unknown_type_is_named(tiny_files, tmp_path):
    bad = tmp_path / "unknown.gguf"
    bad.write_bytes(_patch_tensor_type(tiny_files["Q8_0"].read_bytes(), "proj_out.weight", 99))
    with pytest.raises(CheckpointError, match=r"unknown.gguf holds a tensor of a GGUF type .* Convert the weights"):
        load_dit(bad)


def test_known_but_unsupported_type_is_named(tmp_path):
    path = tmp_path / "q2k.gguf"
    writer = gguf.GGUFWriter(path, arch="stepvideo-dit")
    writer.add_tensor("pos_embed.proj.weight", torch.zeros(4, 84, dtype=torch.uint8).numpy(), raw_dtype=Q.Q2_K)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(CheckpointError, match=r"use GGUF type\(s\) Q2_K \(e.g. pos_embed.proj.weight\).*quantize"):
        load_dit(path)


def test_wrong_architecture_is_refused(tiny_files, tmp_path):
    with pytest.raises(CheckpointError, match=r"llm_Q8_0.gguf is a GGUF of the Step-LLM text encoder .*not a Step-Video DiT"):
        load_dit(tiny_files["llm_Q8_0"])
    with pytest.raises(CheckpointError, match=r"is a GGUF of the Step-Video DiT .*not a Step-LLM text encoder"):
        load_step_llm(tiny_files["Q8_0"])
    path = tmp_path / "wan.gguf"
    writer = gguf.GGUFWriter(path, arch="wan")
    writer.add_tensor("blocks.0.self_attn.q.weight", torch.zeros(8, 32).numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(CheckpointError, match=r"wan.gguf is not a Step-Video DiT checkpoint .*GGUF architecture 'wan'"):
        load_dit(path)


def test_mismatched_shapes_are_named(tmp_path):
    def widen(state):
        state["transformer_blocks.1.attn1.wo.weight"] = torch.zeros(64, 96)

    _write_small_dit(tmp_path / "bad.safetensors", edit=widen)
    convert(tmp_path / "bad.safetensors", "Q8_0", tmp_path / "bad.gguf")
    with pytest.raises(CheckpointError, match=r"bad.gguf: 1 tensor shape\(s\) differ .*attn1.wo.weight: file \(64, 96\)"):
        load_dit(tmp_path / "bad.gguf")


def test_converter_refuses_what_it_cannot_write(tmp_path):
    with pytest.raises(ValueError, match="K-quants"):
        convert(TINY_DIT, "Q4_K", tmp_path / "x.gguf")
    with pytest.raises(CheckpointError, match="neither a Step-Video DiT nor a Step-LLM"):
        convert(tiny.TINY_DIR / "vae" / "vae_v2.safetensors", "Q8_0", tmp_path / "x.gguf")
    assert not (tmp_path / "x.gguf").exists() and not list(tmp_path.glob("*.part"))


def test_node_lists_offer_gguf_files(tmp_path):
    """The loaders' lists (pure functions of the nodes, no ComfyUI needed): a .gguf in an official part folder, in
    diffusion_models (any depth), and in a text_encoders folder only where the Step-LLM tokenizer is beside it."""
    from tests.builders import pack_nodes_module

    model_folders = pack_nodes_module("model_folders")

    root = tmp_path / "stepvideo"
    (root / "t2v" / "transformer").mkdir(parents=True)
    (root / "t2v" / "transformer" / "t2v-Q8_0.gguf").write_bytes(b"x")
    (root / "t2v" / "transformer" / "config.json").write_text("{}")
    assert model_folders.list_official_files([str(root)], "transformer") == ["stepvideo/t2v/transformer/t2v-Q8_0.gguf"]
    assert model_folders.resolve_official([str(root)], "stepvideo/t2v/transformer/t2v-Q8_0.gguf") == str(
        root / "t2v" / "transformer" / "t2v-Q8_0.gguf")
    dm = tmp_path / "diffusion_models"
    (dm / "video").mkdir(parents=True)
    (dm / "a.gguf").write_bytes(b"x")
    (dm / "video" / "b.gguf").write_bytes(b"x")
    (dm / "c.safetensors").write_bytes(b"x")
    assert model_folders.list_files([str(dm)]) == ["a.gguf", "video/b.gguf"]
    assert model_folders.resolve_file([str(dm)], "video/b.gguf") == str(dm / "video" / "b.gguf")
    assert model_folders.resolve_file([str(dm)], "../diffusion_models/a.gguf") is None
    enc = tmp_path / "text_encoders"
    (enc / "step_llm").mkdir(parents=True)
    (enc / "step_llm" / "llm-Q4_0.gguf").write_bytes(b"x")
    (enc / "stray.gguf").write_bytes(b"x")
    assert model_folders.list_files([str(enc)], marker=model_folders.STEP_LLM_MARKER) == []
    (enc / "step_llm" / model_folders.STEP_LLM_MARKER).write_bytes(b"x")
    assert model_folders.list_files([str(enc)], marker=model_folders.STEP_LLM_MARKER) == ["step_llm/llm-Q4_0.gguf"]


@pytest.mark.slow
def test_tiny_generation_from_gguf_matches_fp32(tiny_files):
    """Step-Video-Tiny's DiT converted to Q8_0 / Q4_0 renders the same prompts and seed as the fp32 one: the decoded
    frames stay above 35 dB for Q8_0 (bench/bench_gguf.py tiny measured 43-47 dB on six prompts) and, for Q4_0,
    keep the picture (21-27 dB measured)."""
    import numpy as np

    from stepvideo_core.tiny import evaluate
    from stepvideo_core.tiny.ti2v import psnr

    prompts = [p.text for p in evaluate.held_out_prompts(languages=("en",))[:2]]
    base = tiny.load_tiny()
    reference = evaluate.sample_clips(base, prompts, seed=0)[1]
    for qtype, floor in (("Q8_0", 35.0), ("Q4_0", 18.0)):
        model = tiny.TinyModel(load_dit(tiny_files[qtype], weight_dtype=torch.float32), base.vae, base.text)
        clips = evaluate.sample_clips(model, prompts, seed=0)[1]
        values = [psnr(a, b) for a, b in zip(clips, reference)]
        assert min(values) > floor, (qtype, values)
        assert not all(np.array_equal(a, b) for a, b in zip(clips, reference))  # really the quantized weights


@pytest.mark.slow
def test_text_cache_keys_on_the_gguf_file(tiny_files, tmp_path):
    """The text cache's encoder identity of a GGUF Step-LLM is its file (and the tokenizer beside it): a cached
    prompt is reused while the file stays, and encoded again once the file is replaced by another quantization."""
    from stepvideo_core.text_cache import TextEmbeddingCache, encode_prompts_cached, encoder_identity
    from stepvideo_core.text_encoding import load_text_encoders

    folder = tmp_path / "step_llm"
    folder.mkdir()
    shutil.copy(TINY_LLM / "step1_chat_tokenizer.model", folder)
    llm = folder / "step_llm.gguf"
    shutil.copy(tiny_files["llm_Q8_0"], llm)
    clip = tiny.TINY_DIR / "hunyuan_clip"
    loads = []

    def encoders():
        loads.append(1)
        return load_text_encoders(llm, clip, weight_dtype=torch.float32)

    def encode():
        identity = encoder_identity([llm, folder / "step1_chat_tokenizer.model", clip], llm_dtype=torch.float32)
        return encode_prompts_cached(store, identity, encoders, "a red circle moves left")

    store = TextEmbeddingCache(tmp_path / "cache")
    first, _, hit = encode()
    assert not hit and len(loads) == 1
    again, _, hit = encode()
    assert hit and len(loads) == 1 and torch.equal(again.llm_states, first.llm_states)
    convert(TINY_LLM, "Q4_0", llm)  # the same name, other weights
    other, _, hit = encode()
    assert not hit and len(loads) == 2 and not torch.equal(other.llm_states, first.llm_states)


def test_quantized_embedding_dequantizes_only_the_rows_it_reads():
    """A token table quantized by another tool (the converter keeps it BF16): a lookup equals the lookup in the
    dequantized table, and a patch on the table still applies."""
    from torch import nn

    from stepvideo_core.gguf_ops import set_quantized_weight

    table = torch.randn(40, 64, generator=torch.Generator().manual_seed(2))
    layer = nn.Embedding(40, 64)
    raw = torch.from_numpy(gguf_quant.quantize(table, Q.Q8_0))
    set_quantized_weight(layer, raw, Q.Q8_0, (40, 64))
    ids = torch.tensor([[3, 39, 0], [7, 7, 12]])
    dense = gguf_quant.dequantize(raw, Q.Q8_0, (40, 64))
    assert torch.equal(layer(ids), torch.nn.functional.embedding(ids, dense))
    layer.weight_patches = (lambda w: w * 2,)
    assert torch.equal(layer(ids), torch.nn.functional.embedding(ids, dense * 2))


@pytest.mark.slow
def test_cli_generates_from_gguf_dit_and_step_llm(tiny_files, tmp_path):
    """The issue's command with a GGUF DiT, and a GGUF Step-LLM beside its tokenizer (2 steps to stay short)."""
    from stepvideo_core.generate import build_parser, run

    llm = tmp_path / "step_llm"
    llm.mkdir()
    shutil.copy(TINY_LLM / "step1_chat_tokenizer.model", llm)
    shutil.copy(tiny_files["llm_Q8_0"], llm / "step_llm-Q8_0.gguf")
    args = build_parser().parse_args(["a red circle moves left", "--dit", str(tiny_files["Q8_0"]), "--step-llm",
                                      str(llm / "step_llm-Q8_0.gguf"), "--preset", "tiny", "--width", "128",
                                      "--height", "128", "--frames", "17", "--steps", "2", "--out", str(tmp_path)])
    written = run(args)
    assert written["mp4"].is_file() and written["png"].is_file()
    assert written["latents"].shape[1:] == (3, 16, 8, 8) and torch.isfinite(written["latents"]).all()


@pytest.mark.slow
def test_lora_trains_on_a_gguf_base(tiny_files, tmp_path):
    """``train_lora --dit x.gguf``: the frozen base stays quantized and the adapters learn (their up matrices start
    at zero); the file loads on the fp32 DiT, every target layer adapted."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    clips = Path(__file__).resolve().parents[1] / "workflows" / "inputs" / "step_video_tiny_lora_clips"
    out = tmp_path / "gguf_lora.safetensors"
    subprocess.run([sys.executable, "-m", "stepvideo_core.train_lora", "--data", str(clips), "--out", str(out),
                    "--steps", "2", "--seed", "0", "--dit", str(tiny_files["Q8_0"]), "--cache-dir",
                    str(tmp_path / "cache")], check=True, capture_output=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    dit = load_dit(TINY_DIT, weight_dtype=torch.float32)
    adapters = lora.load_lora(out, dit)
    assert adapters.matched_modules == len(lora.TARGET_MODULES) * dit.config.num_layers
    assert all(pair.up.abs().max() > 0 for pair in adapters.pairs.values())
