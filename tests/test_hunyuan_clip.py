import shutil

import pytest
import torch

from stepvideo_core.hunyuan_clip import load_hunyuan_clip
from stepvideo_core.loading import CheckpointError
from tests.text_fixtures import write_hunyuan_clip

TEXTS = ["一只红色的狐狸在黎明时分穿过雪林。", "A red fox runs with his dog.", "一个男孩在 park 里放风筝 with his dog。"]


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("hunyuan_clip")
    model = write_hunyuan_clip(root)
    return root, model


def test_outputs_last_hidden_state_of_all_77_positions(clip_dir):
    root, original = clip_dir
    clip = load_hunyuan_clip(root)
    out = clip(TEXTS)
    assert out.shape == (3, 77, 32) and out.dtype == torch.float32
    ids, mask = clip.tokenize(TEXTS)
    assert ids.shape == mask.shape == (3, 77)
    with torch.no_grad():
        expected = original(input_ids=ids, attention_mask=mask).last_hidden_state
    assert torch.equal(out, expected)
    assert out[:, -1].abs().sum() > 0  # padding positions are kept, not zeroed


def test_tokenizer_chinese_english_mixed(clip_dir):
    clip = load_hunyuan_clip(clip_dir[0])
    ids, mask = clip.tokenize(TEXTS)
    tokens = clip.tokenizer.convert_ids_to_tokens(ids[2, : int(mask[2].sum())].tolist())
    assert tokens[0] == "[CLS]" and tokens[-1] == "[SEP]" and "[UNK]" not in tokens
    assert tokens[1:6] == ["一", "个", "男", "孩", "在"]  # Chinese is split per character
    assert "park" in tokens and "dog" in tokens  # English lower-cased word pieces
    assert ids[0, 0] == 101 and (ids[0, int(mask[0].sum()):] == 0).all()
    long_ids, long_mask = clip.tokenize(["fox " * 200])
    assert long_ids.shape == (1, 77) and long_mask.all() and long_ids[0, -1] == 102


def test_pytorch_bin_without_prefix_and_dtype(tmp_path):
    original = write_hunyuan_clip(tmp_path, fmt="bin", prefix="", seed=3)
    clip = load_hunyuan_clip(tmp_path, dtype=torch.float64)
    ids, mask = clip.tokenize(TEXTS[:1])
    assert clip.model.embeddings.word_embeddings.weight.dtype == torch.float64
    with torch.no_grad():
        expected = original(input_ids=ids, attention_mask=mask).last_hidden_state
    assert torch.allclose(clip(TEXTS[:1]).float(), expected, atol=1e-5)


def test_bin_with_code_is_refused(tmp_path):
    write_hunyuan_clip(tmp_path, fmt="bin")
    torch.save({"embeddings.word_embeddings.weight": torch.zeros(2), "x": shutil.rmtree}, tmp_path / "clip_text_encoder" / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="plain tensors"):
        load_hunyuan_clip(tmp_path)


def test_missing_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="folder not found"):
        load_hunyuan_clip(tmp_path / "absent")
    write_hunyuan_clip(tmp_path)
    (tmp_path / "tokenizer" / "vocab.txt").unlink()
    with pytest.raises(FileNotFoundError, match=r"vocab\.txt at .*tokenizer"):
        load_hunyuan_clip(tmp_path)
    write_hunyuan_clip(tmp_path)
    (tmp_path / "clip_text_encoder" / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="pytorch_model.bin in .*clip_text_encoder"):
        load_hunyuan_clip(tmp_path)


def test_wrong_weights_are_named(tmp_path):
    from safetensors.torch import save_file

    write_hunyuan_clip(tmp_path)
    save_file({"tok_embeddings.word_embeddings.weight": torch.zeros(4, 4)}, str(tmp_path / "clip_text_encoder" / "model.safetensors"))
    with pytest.raises(CheckpointError, match="Step-LLM.*not a Hunyuan-CLIP"):
        load_hunyuan_clip(tmp_path)


def test_official_layout_bin_with_bert_prefix_and_pretraining_heads(tmp_path):
    """The release's form: pytorch_model.bin, "bert."-prefixed keys; heads the encoder does not use are skipped."""
    original = write_hunyuan_clip(tmp_path, fmt="bin", prefix="bert.", seed=5)
    file = tmp_path / "clip_text_encoder" / "pytorch_model.bin"
    state = torch.load(file, weights_only=True)
    torch.save({**state, "cls.predictions.bias": torch.zeros(3)}, file)
    clip = load_hunyuan_clip(tmp_path)
    for k, v in original.state_dict().items():
        if not k.startswith("pooler."):
            assert torch.equal(clip.model.state_dict()[k], v), k
    ids, mask = clip.tokenize(TEXTS)
    with torch.no_grad():
        assert torch.equal(clip(TEXTS), original(input_ids=ids, attention_mask=mask).last_hidden_state)
    del state["bert.encoder.layer.1.output.dense.weight"]
    torch.save(state, file)
    with pytest.raises(CheckpointError, match=r"missing \['encoder.layer.1.output.dense.weight'\]"):
        load_hunyuan_clip(tmp_path)
