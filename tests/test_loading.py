
import pytest
import torch
from safetensors.torch import save_file

from stepvideo_core.dit import StepVideoDiT, load_dit
from stepvideo_core.loading import Checkpoint, CheckpointError
from tests.builders import small_dit, text_inputs, write_sharded


@pytest.fixture
def model_and_file(tmp_path):
    model = small_dit(layers=2)
    path = tmp_path / "dit.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return model, path


def forward(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 2, 4, 2, 3, generator=g)
    llm, mask, clip = text_inputs(1, 5, (24, 12), (4,))
    with torch.no_grad():
        return model(x, torch.tensor([0.3]), llm, mask, clip)


def test_single_file_round_trip_is_exact(model_and_file):
    model, path = model_and_file
    loaded = load_dit(path, weight_dtype=torch.float32)
    assert loaded.config == model.config
    torch.testing.assert_close(forward(loaded), forward(model), atol=0, rtol=0)


def test_sharded_folder_with_index_loads_like_the_single_file(model_and_file, tmp_path):
    model, _ = model_and_file
    folder = write_sharded(tmp_path / "transformer", model.state_dict(), "diffusion_pytorch_model")
    index = folder / "diffusion_pytorch_model.safetensors.index.json"
    torch.testing.assert_close(forward(load_dit(folder, weight_dtype=torch.float32)), forward(model), atol=0, rtol=0)

    index_text = index.read_text()
    index.unlink()
    with pytest.raises(CheckpointError, match="no \\*.safetensors.index.json"):
        load_dit(folder)
    index.write_text(index_text)
    (folder / "diffusion_pytorch_model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match="not found: diffusion_pytorch_model-00002"):
        load_dit(folder)


@pytest.mark.parametrize("fp8", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_fp8_storage_computes_in_bf16(model_and_file, fp8):
    model, path = model_and_file
    loaded = load_dit(path, weight_dtype=fp8)
    block = loaded.transformer_blocks[0]
    assert block.attn1.wqkv.weight.dtype == fp8 and block.ff.net[2].weight.dtype == fp8
    assert block.norm1.weight.dtype == torch.bfloat16 and block.scale_shift_table.dtype == torch.bfloat16
    assert loaded.compute_dtype == torch.bfloat16
    out = forward(loaded).float()
    # the same fp8-rounded weights upcast to fp32: what remains is only bf16 compute rounding
    dequantised = small_dit(layers=2)
    dequantised.load_state_dict({k: v.float() for k, v in loaded.state_dict().items()})
    want = forward(dequantised)
    assert (out - want).norm() / want.norm() < 0.03
    assert not torch.equal(dequantised.state_dict()["transformer_blocks.0.attn1.wqkv.weight"],
                           model.state_dict()["transformer_blocks.0.attn1.wqkv.weight"]), "weights really are fp8"


def test_bf16_and_fp16_storage(model_and_file):
    model, path = model_and_file
    want = forward(model)
    for dtype in (torch.bfloat16, torch.float16):
        loaded = load_dit(path, weight_dtype=dtype)
        assert all(p.dtype == dtype for p in loaded.parameters())
        out = forward(loaded).float()
        assert (out - want).norm() / want.norm() < 0.03


def test_comfyui_prefixed_keys_load(model_and_file, tmp_path):
    model, _ = model_and_file
    path = tmp_path / "prefixed.safetensors"
    save_file({"model.diffusion_model." + k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    torch.testing.assert_close(forward(load_dit(path, weight_dtype=torch.float32)), forward(model), atol=0, rtol=0)


def test_truncated_file_is_named(model_and_file, tmp_path):
    _, path = model_and_file
    data = path.read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[: len(data) - 1000])
    with pytest.raises(CheckpointError, match="cut.safetensors is truncated"):
        load_dit(cut)


def test_corrupt_header_and_wrong_format(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}")
    with pytest.raises(CheckpointError, match="corrupt"):
        Checkpoint(bad)
    pickle = tmp_path / "model.ckpt"
    pickle.write_bytes(b"\x80\x02")
    with pytest.raises(CheckpointError, match="only .safetensors"):
        Checkpoint(pickle)
    with pytest.raises(CheckpointError, match="not found"):
        Checkpoint(tmp_path / "missing.safetensors")


def test_other_models_are_recognised(tmp_path):
    wan = tmp_path / "wan.safetensors"
    save_file({"patch_embedding.weight": torch.zeros(2, 2), "blocks.0.self_attn.q.weight": torch.zeros(2, 2)}, str(wan))
    with pytest.raises(CheckpointError, match="looks like a Wan 2.x DiT"):
        load_dit(wan)
    vae = tmp_path / "vae.safetensors"
    save_file({"decoder.conv_in.conv.weight": torch.zeros(2), "encoder.conv_in.conv.weight": torch.zeros(2)}, str(vae))
    with pytest.raises(CheckpointError, match="Step-Video VAE"):
        load_dit(vae)


def test_missing_unexpected_and_mismatched_keys_are_listed(model_and_file, tmp_path):
    model, _ = model_and_file
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    broken = dict(sd)
    del broken["transformer_blocks.1.attn2.wo.weight"]
    broken["transformer_blocks.1.attn2.extra.weight"] = torch.zeros(1)
    path = tmp_path / "broken.safetensors"
    save_file(broken, str(path))
    with pytest.raises(CheckpointError, match=r"Missing 1 key\(s\): transformer_blocks.1.attn2.wo.weight.*Unexpected 1"):
        load_dit(path)
    wrong = dict(sd)
    wrong["transformer_blocks.0.attn1.wo.weight"] = torch.zeros(3, 3)
    save_file(wrong, str(path))
    with pytest.raises(CheckpointError, match="shape"):
        load_dit(path)


def test_loading_builds_on_the_meta_device_then_fills_every_tensor_from_the_file(model_and_file, monkeypatch):
    """load_dit never initialises a model in memory: it builds one DiT, every parameter and buffer on the meta
    device, then every tensor comes from the file."""
    model, path = model_and_file
    built = []
    construct = StepVideoDiT.__init__

    def spy(self, *args, **kwargs):
        construct(self, *args, **kwargs)
        built.append([t.is_meta for t in (*self.parameters(), *self.buffers())])

    monkeypatch.setattr(StepVideoDiT, "__init__", spy)
    loaded = load_dit(path, weight_dtype=torch.float32)
    assert len(built) == 1 and built[0] and all(built[0])
    state = loaded.state_dict()
    assert state.keys() == model.state_dict().keys()
    for key, value in model.state_dict().items():
        assert not state[key].is_meta and torch.equal(state[key], value), key


def test_full_size_dit_builds_on_meta_without_allocating():
    """The 30B config under torch.device('meta'): no parameter or buffer may be made on a real device (an explicit
    device in the constructor would allocate it, for every loader)."""
    with torch.device("meta"):
        model = StepVideoDiT()
    tensors = [*model.parameters(), *model.buffers()]
    assert sum(t.numel() for t in model.parameters()) == 29_342_478_400 and all(t.is_meta for t in tensors)
