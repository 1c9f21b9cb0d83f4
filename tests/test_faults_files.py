"""Fault catalogue, files: damaged, incomplete, foreign and unsafe checkpoints, tokenizers and LoRAs.

Each fault damages a private copy of a part of the shipped Step-Video-Tiny (or writes a small foreign file), asserts
the message (what is wrong, which file/tensor/layer, what to do) and, through the ``tiny`` fixture, that the models
already loaded still give their earlier output.
"""

from __future__ import annotations

import json
import math
import shutil
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file

from stepvideo_core.dit import load_dit
from stepvideo_core.hunyuan_clip import load_hunyuan_clip
from stepvideo_core.loading import CheckpointError
from stepvideo_core.lora import LoraError, LoraPartialMatchWarning, attach, load_lora
from stepvideo_core.step_llm import StepLLMTokenizer, load_step_llm
from stepvideo_core.text_encoding import encode_prompts
from stepvideo_core.tiny import model as tiny_model
from stepvideo_core.vae import load_vae
from tests.fault_fixtures import copy_part, tiny_fixture

# The catalogue reloads or probes the tiny model around every fault: a few minutes in all, so it runs with the
# slow set (scripts/run_tests.sh --all, as CI does).
pytestmark = pytest.mark.slow

tiny = tiny_fixture()
SHARD = "diffusion_pytorch_model-00001-of-00001.safetensors"
INDEX = "diffusion_pytorch_model.safetensors.index.json"


@pytest.fixture
def dit_state():
    return load_file(tiny_model.paths()["transformer"] / SHARD)


@pytest.fixture
def transformer(tmp_path):
    """A private copy of the tiny model's transformer/ folder (shard + index + config.json)."""
    return copy_part("transformer", tmp_path)


def save(tmp_path, state, name="dit.safetensors"):
    path = tmp_path / name
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return path


def rewrite_header(path, change):
    """Rewrite a safetensors header through ``change(header dict)``, keeping the data bytes."""
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    change(header)
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n:])


# ---- damaged files -------------------------------------------------------------------------------------------------


def test_truncated_shard(tiny, transformer):
    shard = transformer / SHARD
    shard.write_bytes(shard.read_bytes()[:-5000])
    with pytest.raises(CheckpointError, match=f"{SHARD} is truncated: .*download it again"):
        load_dit(transformer)


def test_empty_file(tiny, tmp_path):
    (tmp_path / "dit.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"dit.safetensors is empty or truncated \(0 bytes\); download it again"):
        load_dit(tmp_path / "dit.safetensors")


def test_random_bytes(tiny, tmp_path):
    path = tmp_path / "dit.safetensors"
    path.write_bytes(torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0),
                                   dtype=torch.uint8).numpy().tobytes())
    with pytest.raises(CheckpointError, match="dit.safetensors is not a safetensors file, or its header is corrupt.*"
                                              "Download it again"):
        load_dit(path)


def test_pickle_checkpoint_is_never_unpickled(tiny, tmp_path, dit_state):
    path = tmp_path / "dit.pt"
    torch.save(dit_state, path)
    with pytest.raises(CheckpointError, match=r"dit.pt is a .pt file; only .safetensors checkpoints are loaded "
                                              r"\(pickle-based formats can run code\)"):
        load_dit(path)


def test_pickle_renamed_to_safetensors(tiny, tmp_path, dit_state):
    path = tmp_path / "dit.safetensors"
    torch.save(dit_state, path)
    with pytest.raises(CheckpointError, match="dit.safetensors is not a safetensors file, or its header is corrupt"):
        load_dit(path)


def test_garbled_header(tiny, tmp_path, dit_state):
    path = save(tmp_path, dit_state)
    data = bytearray(path.read_bytes())
    data[8:20] = b"#" * 12
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="dit.safetensors is not a safetensors file, or its header is corrupt"):
        load_dit(path)


def test_damaged_header_offsets(tiny, tmp_path, dit_state):
    path = save(tmp_path, dit_state)

    def shrink(header):
        entry = header["proj_out.bias"]
        entry["data_offsets"][1] = entry["data_offsets"][0] + 4

    rewrite_header(path, shrink)
    with pytest.raises(CheckpointError, match=r"dit.safetensors has a corrupt header: tensor 'proj_out.bias' has "
                                              r"data_offsets \[\d+, \d+\] \(4 bytes\) but its F16 shape \(16,\) "
                                              r"needs 32 bytes. Download it again") as e:
        load_dit(path)
    assert "is invalid for input of size" not in str(e.value)


def test_header_offset_that_leaves_a_gap_names_the_tensor_after_it(tiny, tmp_path, dit_state):
    path = save(tmp_path, dit_state)

    def move(header):
        entry = header["proj_out.bias"]
        entry["data_offsets"] = [entry["data_offsets"][0] + 4, entry["data_offsets"][1] + 4]

    rewrite_header(path, move)
    with pytest.raises(CheckpointError, match=r"corrupt header: tensor 'proj_out.bias' (starts at byte|ends at byte)"):
        load_dit(path)


# ---- wrong tensors -------------------------------------------------------------------------------------------------


def test_missing_tensor(tiny, tmp_path, dit_state):
    del dit_state["transformer_blocks.2.attn2.wo.weight"]
    with pytest.raises(CheckpointError, match=r"does not match the Step-Video DiT architecture. Missing 1 key\(s\): "
                                              r"transformer_blocks.2.attn2.wo.weight. Check that this is the right "
                                              r"file"):
        load_dit(save(tmp_path, dit_state))


@pytest.mark.parametrize("extra", ["transformer_blocks.4.attn1.stray", "transformer_blocks.1.attn1.lora_A.weight",
                                   "stray"])
def test_one_extra_tensor_is_reported_as_one_extra(tiny, tmp_path, dit_state, extra):
    dit_state[extra] = torch.zeros(2)
    with pytest.raises(CheckpointError, match=rf"Unexpected 1 key\(s\): {extra}\.") as e:
        load_dit(save(tmp_path, dit_state))
    assert "Missing" not in str(e.value)


def test_stray_block_weight_far_past_the_last_block_is_one_extra(tiny, tmp_path, dit_state):
    stray = f"transformer_blocks.{tiny_model.DIT_CONFIG.num_layers + 3}.attn1.wqkv.weight"
    dit_state[stray] = dit_state["transformer_blocks.0.attn1.wqkv.weight"].clone()
    with pytest.raises(CheckpointError, match=rf"Unexpected 1 key\(s\): {stray}\.") as e:
        load_dit(save(tmp_path, dit_state))
    assert "Missing" not in str(e.value)


def test_extra_tensor_in_a_shard_that_its_index_does_not_list(tiny, transformer, dit_state):
    dit_state["transformer_blocks.1.attn1.stray"] = torch.zeros(2)
    save_file(dit_state, str(transformer / SHARD))  # the index is left as downloaded
    with pytest.raises(CheckpointError, match=rf"the shards hold 1 tensor\(s\) that {INDEX} does not list: "
                                              rf"transformer_blocks.1.attn1.stray \(in {SHARD}\)"):
        load_dit(transformer)


def test_damaged_tensor_that_sets_the_head_size_is_named(tiny, tmp_path, dit_state):
    key = "transformer_blocks.0.attn1.q_norm.weight"
    dit_state[key] = dit_state[key][:16].clone()
    others = 4 * tiny_model.DIT_CONFIG.num_layers - 1
    with pytest.raises(CheckpointError, match=rf"'{key}' has shape \(16,\) but the {others} other QK-norm weights "
                                              r"have \(\d+,\): the head size is read from this tensor") as e:
        load_dit(save(tmp_path, dit_state))
    assert "differ from the Step-Video DiT model" not in str(e.value)


def test_reshaped_tensor(tiny, tmp_path, dit_state):
    dit_state["transformer_blocks.0.attn1.wo.weight"] = dit_state["transformer_blocks.0.attn1.wo.weight"][:, :64]
    with pytest.raises(CheckpointError, match=r"1 tensor shape\(s\) differ from the Step-Video DiT model: "
                                              r"transformer_blocks.0.attn1.wo.weight: file \(128, 64\) vs model "
                                              r"\(128, 128\)"):
        load_dit(save(tmp_path, dit_state))


def test_missing_last_block_is_caught_by_config_json(tiny, transformer, dit_state):
    layers = tiny_model.DIT_CONFIG.num_layers
    last = layers - 1
    kept = {k: v for k, v in dit_state.items() if not k.startswith(f"transformer_blocks.{last}.")}
    save_file(kept, str(transformer / SHARD))
    index = json.loads((transformer / INDEX).read_text())
    index["weight_map"] = {k: SHARD for k in kept}
    (transformer / INDEX).write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=f"config.json and the weights disagree: num_layers {layers} in config.json "
                                              f"but {last} in the tensors. Blocks transformer_blocks.{last} to {last} "
                                              "are missing"):
        load_dit(transformer)


def test_config_json_from_another_model(tiny, transformer):
    config = json.loads((transformer / "config.json").read_text())
    config.update(num_attention_heads=48, attention_head_dim=128, caption_channels=[6144, 1024])
    (transformer / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="num_attention_heads 48 in config.json but 4 in the tensors; "
                                              "attention_head_dim 128 .* remove a config.json that belongs to another"):
        load_dit(transformer)


def test_config_json_not_json(tiny, transformer):
    (transformer / "config.json").write_text("{num_layers: 4")
    with pytest.raises(CheckpointError, match="config.json is not valid JSON .*download it again, or delete it"):
        load_dit(transformer)


# ---- folders and indexes -------------------------------------------------------------------------------------------


def test_missing_shard(tiny, transformer):
    (transformer / SHARD).unlink()
    with pytest.raises(CheckpointError, match=f"the index lists shard\\(s\\) that were not found: {SHARD}. Download "
                                              "every shard"):
        load_dit(transformer)


def test_index_not_json(tiny, transformer):
    (transformer / INDEX).write_text('{"weight_map": {')
    with pytest.raises(CheckpointError, match=f"{INDEX} is not a valid safetensors index"):
        load_dit(transformer)


def test_index_names_a_tensor_the_shard_lacks(tiny, transformer):
    index = json.loads((transformer / INDEX).read_text())
    index["weight_map"]["transformer_blocks.9.attn1.wqkv.weight"] = SHARD
    (transformer / INDEX).write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=f"{SHARD} does not contain 'transformer_blocks.9.attn1.wqkv.weight', "
                                              "which the index says it holds"):
        load_dit(transformer)


def test_two_index_files(tiny, transformer):
    shutil.copy(transformer / INDEX, transformer / "copy.safetensors.index.json")
    with pytest.raises(CheckpointError, match="holds several index files .*; keep one"):
        load_dit(transformer)


def test_shards_without_their_index(tiny, transformer):
    (transformer / INDEX).unlink()
    shutil.copy(transformer / SHARD, transformer / "diffusion_pytorch_model-00002-of-00002.safetensors")
    with pytest.raises(CheckpointError, match=r"holds 2 .safetensors shards but no \*.safetensors.index.json; download "
                                              "the index file"):
        load_dit(transformer)


def test_folder_without_weights(tiny, tmp_path):
    with pytest.raises(CheckpointError, match="No .safetensors file was found in"):
        load_dit(tmp_path)


def test_path_that_does_not_exist(tiny, tmp_path):
    with pytest.raises(CheckpointError, match=r"Checkpoint not found: .*nowhere.safetensors \(no such file or "
                                              r"folder\)"):
        load_dit(tmp_path / "nowhere.safetensors")


# ---- wrong component, foreign models -------------------------------------------------------------------------------


def test_vae_given_to_the_dit_loader(tiny):
    with pytest.raises(CheckpointError, match=r"vae_v2.safetensors looks like the Step-Video VAE \(load it with the "
                                              r"Step-Video VAE loader\), not a Step-Video DiT checkpoint"):
        load_dit(tiny_model.paths()["vae"])


def test_dit_given_to_the_vae_loader(tiny):
    with pytest.raises(CheckpointError, match=r"looks like the Step-Video DiT \(load it with the Step-Video DiT "
                                              r"loader\), not a Step-Video VAE"):
        load_vae(tiny_model.paths()["transformer"])


def test_dit_given_to_the_step_llm_loader(tiny):
    with pytest.raises(CheckpointError, match=r"looks like the Step-Video DiT .*not a Step-LLM"):
        load_step_llm(tiny_model.paths()["transformer"])


def test_step_llm_given_to_the_dit_loader(tiny):
    with pytest.raises(CheckpointError, match=r"looks like the Step-LLM text encoder .*not a Step-Video DiT"):
        load_dit(tiny_model.paths()["step_llm"])


def test_wan_dit_message_reads_as_a_sentence(tiny, tmp_path):
    wan = save(tmp_path, {"patch_embedding.weight": torch.zeros(2, 2),
                          "blocks.0.self_attn.q.weight": torch.zeros(2, 2)})
    with pytest.raises(CheckpointError) as e:
        load_dit(wan)
    assert str(e.value) == f"{wan} looks like a Wan 2.x DiT, not a Step-Video DiT checkpoint."


def test_unknown_model(tiny, tmp_path):
    other = save(tmp_path, {"some.weight": torch.zeros(2, 2)})
    with pytest.raises(CheckpointError, match=r"dit.safetensors is not a Step-Video DiT checkpoint \(it has no "
                                              r"'pos_embed.proj.weight'\)\.$"):
        load_dit(other)


def test_v1_vae(tiny, tmp_path):
    v1 = save(tmp_path, {"decoder.conv_in.conv.weight": torch.zeros(8, 16, 3, 3, 3),
                         "encoder.conv_in.conv.weight": torch.zeros(8, 3, 3, 3, 3)}, "vae.safetensors")
    with pytest.raises(CheckpointError, match=r"is the version-1 Step-Video VAE \(16 latent channels.*load "
                                              r"vae/vae_v2.safetensors"):
        load_vae(v1)


# ---- text encoder files --------------------------------------------------------------------------------------------


def test_missing_step_llm_tokenizer(tiny, tmp_path):
    folder = copy_part("step_llm", tmp_path)
    (folder / "step1_chat_tokenizer.model").unlink()
    with pytest.raises(FileNotFoundError, match="Step-LLM tokenizer not found: expected step1_chat_tokenizer.model .*"
                                                "ships inside the step_llm/ folder"):
        StepLLMTokenizer(folder)


def test_garbage_step_llm_tokenizer(tiny, tmp_path):
    folder = copy_part("step_llm", tmp_path)
    (folder / "step1_chat_tokenizer.model").write_bytes(b"not a sentencepiece model")
    with pytest.raises(ValueError, match="step1_chat_tokenizer.model is not a valid SentencePiece model"):
        StepLLMTokenizer(folder)


def test_step_llm_extra_tensor_is_one_extra(tiny, tmp_path):
    folder = copy_part("step_llm", tmp_path)
    shard = folder / "model-00001-of-00001.safetensors"
    state = load_file(shard)
    state["transformer.layers.5.stray"] = torch.zeros(1)
    save_file(state, str(shard))
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    index["weight_map"]["transformer.layers.5.stray"] = shard.name
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"Unexpected 1 key\(s\): transformer.layers.5.stray") as e:
        load_step_llm(folder)
    assert "Missing" not in str(e.value)


def test_missing_clip_vocabulary(tiny, tmp_path):
    folder = copy_part("hunyuan_clip", tmp_path)
    (folder / "tokenizer" / "vocab.txt").unlink()
    with pytest.raises(FileNotFoundError, match="Hunyuan-CLIP tokenizer vocabulary not found: expected vocab.txt"):
        load_hunyuan_clip(folder)


def test_clip_pickle_with_code_is_refused(tiny, tmp_path):
    folder = copy_part("hunyuan_clip", tmp_path)
    encoder = folder / "clip_text_encoder"
    (encoder / "model.safetensors").unlink()
    torch.save({"weights": torch.zeros(2), "payload": Exception("arbitrary object")}, encoder / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="clip_text_encoder: the weights could not be read as plain tensors"):
        load_hunyuan_clip(folder)


# ---- devices -------------------------------------------------------------------------------------------------------


def test_cuda_device_that_is_not_there(tiny):
    with pytest.raises(ValueError, match="device 'cuda:7': (this PyTorch build has no CUDA support|no CUDA GPU is "
                                         r"visible|only \d+ CUDA device\(s\) are visible)"):
        load_dit(tiny_model.paths()["transformer"], weight_dtype=torch.float32, device="cuda:7")


def test_encoding_on_a_cuda_device_that_is_not_there(tiny):
    with pytest.raises(ValueError, match="device 'cuda:7': (this PyTorch build has no CUDA support|no CUDA GPU is "
                                         r"visible|only \d+ CUDA device\(s\) are visible)"):
        encode_prompts(tiny.text, "a red circle", device="cuda:7", after="keep")


def test_device_name_that_is_not_a_device(tiny):
    with pytest.raises(ValueError, match="device 'gpu0' is not a device name; use 'cpu', 'cuda' or 'cuda:N'"):
        load_vae(tiny_model.paths()["vae"], device="gpu0")


# ---- LoRAs ---------------------------------------------------------------------------------------------------------


def lora_pair(out_f, in_f, rank, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(out_f, rank, generator=g) * 0.01, torch.randn(rank, in_f, generator=g) * 0.01


def lora_file(tmp_path, pairs, name="lora.safetensors"):
    tensors = {}
    for key, (up, down) in pairs.items():
        tensors[f"diffusion_model.{key}.lora_up.weight"] = up
        tensors[f"diffusion_model.{key}.lora_down.weight"] = down
    return save(tmp_path, tensors, name)


def test_lora_for_another_model(tiny, tmp_path):
    up, down = lora_pair(64, 64, 4)
    path = save(tmp_path, {"lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight": up,
                           "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": down}, "flux_lora.safetensors")
    with pytest.raises(LoraError, match="flux_lora.safetensors: This LoRA matches no Step-Video DiT layer .*"
                                        "trained for another model"):
        load_lora(path, tiny.dit)


def test_lora_partial_match_is_warned_with_counts(tiny, tmp_path):
    path = lora_file(tmp_path, {"transformer_blocks.0.attn1.wo": lora_pair(128, 128, 4),
                                "transformer_blocks.0.attn1.gate": lora_pair(128, 128, 4),
                                "transformer_blocks.7.attn1.wo": lora_pair(128, 128, 4)})
    with pytest.warns(LoraPartialMatchWarning, match=r"matches this DiT only in part \(Step-Video LoRA: 1 DiT "
                                                     r"layer\(s\) patched from 6 tensor\(s\); 2 tensor\(s\) "
                                                     r"matched no layer"):
        lora = load_lora(path, tiny.dit)
    assert list(lora.pairs) == ["transformer_blocks.0.attn1.wo"]


def test_lora_ranks_that_do_not_fit_are_refused_at_load(tiny, tmp_path):
    up, _ = lora_pair(128, 128, 4)
    _, down = lora_pair(128, 128, 8)
    path = lora_file(tmp_path, {"transformer_blocks.0.attn1.wo": lora_pair(128, 128, 4),
                                "transformer_blocks.2.ff.net.2": (up, lora_pair(128, 512, 8)[1])})
    with pytest.raises(LoraError, match=r"lora.safetensors: layer transformer_blocks.2.ff.net.2 .*up \(128, 4\) and "
                                        r"down \(8, 512\) do not form a low-rank pair"):
        load_lora(path, tiny.dit)


def test_lora_for_a_wider_model_names_the_layer(tiny, tmp_path):
    path = lora_file(tmp_path, {"transformer_blocks.1.attn2.wq": lora_pair(6144, 6144, 2)})
    with pytest.raises(LoraError, match="layer transformer_blocks.1.attn2.wq: the LoRA's input size 6144 does not "
                                        "match the layer's 128; the LoRA was trained for another model"):
        load_lora(path, tiny.dit)


def test_lora_holding_nan_is_refused(tiny, tmp_path):
    up, down = lora_pair(128, 128, 4)
    up[3, 1] = math.nan
    path = lora_file(tmp_path, {"transformer_blocks.3.attn1.wo": (up, down)})
    with pytest.raises(LoraError, match="layer transformer_blocks.3.attn1.wo .*hold NaN/inf; the file is damaged"):
        load_lora(path, tiny.dit)


def test_lora_pickle_is_refused(tiny, tmp_path):
    torch.save({"x": torch.zeros(1)}, tmp_path / "lora.ckpt")
    with pytest.raises(CheckpointError, match="lora.ckpt is a .ckpt file; only .safetensors"):
        load_lora(tmp_path / "lora.ckpt", tiny.dit)


def test_good_lora_attaches_and_detaches_exactly(tiny, tmp_path):
    """The control for the LoRA faults above: a fitting file attaches, changes the output, and detaches."""
    path = lora_file(tmp_path, {"transformer_blocks.0.attn1.wo": lora_pair(128, 128, 4)})
    attached = attach(tiny.dit, load_lora(path, tiny.dit), 1.0)
    attached.detach()
