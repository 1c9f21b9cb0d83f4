import pytest
import torch

from stepvideo_core.hunyuan_clip import load_hunyuan_clip
from stepvideo_core.step_llm import load_step_llm
from stepvideo_core.text_encoding import (
    NEGATIVE_MAGIC,
    POSITIVE_MAGIC,
    TextConditioning,
    TextEncoders,
    build_prompts,
    combined_mask,
    encode_prompts,
    load_text_encoders,
)
from tests.builders import small_dit
from tests.text_fixtures import (
    write_text_encoder_folders,
)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    return write_text_encoder_folders(tmp_path_factory.mktemp("ckpt"))


def fresh(folders) -> TextEncoders:
    return load_text_encoders(folders / "step_llm", folders / "hunyuan_clip", weight_dtype=torch.float32)


def test_build_prompts_magic_switches():
    pos, neg = build_prompts("一只猫 a cat")
    assert pos == ["一只猫 a cat" + POSITIVE_MAGIC] and neg == [NEGATIVE_MAGIC]
    pos, neg = build_prompts(["a", "b"], positive_magic=False, negative_magic=False)
    assert pos == ["a", "b"] and neg == ["", ""]
    _, neg = build_prompts("a", "blurry, ")
    assert neg == ["blurry, " + NEGATIVE_MAGIC]
    _, neg = build_prompts("a", "blurry", negative_magic=False)
    assert neg == ["blurry"]
    with pytest.raises(ValueError):
        build_prompts([])


def test_combined_mask_layout():
    llm = torch.zeros(2, 320, dtype=torch.long)
    llm[0, :5] = 1
    llm[1, :320] = 1
    mask = combined_mask(llm)
    assert mask.shape == (2, 397)
    assert mask[:, :77].eq(1).all()
    assert mask[0, 77:82].eq(1).all() and mask[0, 82:].eq(0).all() and mask[1].sum() == 397


def test_encode_shapes_masks_and_independence(folders):
    enc = fresh(folders)
    prompts = ["一只红色的狐狸在黎明时分穿过雪林。", "A red fox runs through the snowy forest.", "一个男孩在 park 里 with his dog。"]
    pos, neg = encode_prompts(enc, prompts, after="keep")
    assert pos.llm_states.shape == (3, 320, 96) and pos.clip_states.shape == (3, 77, 32) and pos.mask.shape == (3, 397)
    assert neg.llm_states.shape == (3, 320, 96) and torch.equal(neg.llm_states[0], neg.llm_states[2])
    ids, llm_mask = enc.tokenizer([p + POSITIVE_MAGIC for p in prompts])
    assert torch.equal(pos.mask, torch.cat([torch.ones(3, 77, dtype=torch.long), llm_mask], 1))
    n_neg = len(enc.tokenizer.tokenize(NEGATIVE_MAGIC)) + 2
    assert neg.mask[0].sum() == 77 + n_neg
    # Each prompt encodes as it would alone: batching with others does not leak through padding.
    alone, _ = encode_prompts(enc, prompts[1], after="keep")
    assert torch.allclose(alone.llm_states[0], pos.llm_states[1], atol=1e-5)
    assert torch.allclose(alone.clip_states[0], pos.clip_states[1], atol=1e-5)
    # The switches reach the encoders.
    plain, plain_neg = encode_prompts(enc, prompts[1], positive_magic=False, negative_magic=False, after="keep")
    assert plain.mask[0].sum() < alone.mask[0].sum() and plain_neg.mask[0].sum() == 77 + 2
    assert not torch.allclose(plain.clip_states, alone.clip_states)
    direct = enc.step_llm(*enc.tokenizer([prompts[1]]))
    assert torch.equal(plain.llm_states, direct)
    clip_direct = enc.clip([prompts[1]])
    assert torch.equal(plain.clip_states, clip_direct)


def test_conditioning_feeds_the_dit(folders):
    """dit_kwargs hands each tensor to the DiT input it is (Step-LLM states, mask, CLIP states), and cat keeps
    each prompt in its batch row: the guided [positive, negative] call gives each prompt's own output."""
    enc = fresh(folders)
    pos, neg = encode_prompts(enc, "一只猫 a cat", after="release")
    both = TextConditioning.cat([pos, neg])
    dit = small_dit(head_dim=8, layers=1, caption=(96, 32))
    x, t = torch.randn(1, 1, 4, 2, 2).expand(2, -1, -1, -1, -1), torch.tensor([0.5, 0.5])
    with torch.no_grad():
        out = dit(x, t, **both.dit_kwargs())
        for row, cond in enumerate((pos, neg)):
            alone = dit(x[:1], t[:1], cond.llm_states, cond.mask, cond.clip_states)  # positional: the DiT's order
            torch.testing.assert_close(out[row:row + 1], alone, atol=1e-5, rtol=1e-5)
    assert (out[0] - out[1]).abs().max() > 1e-3, "the two prompts give different outputs for the same latent"


def test_release_and_offload(folders):
    enc = fresh(folders)
    encode_prompts(enc, "a cat", after="offload")
    assert enc.step_llm is not None and next(enc.step_llm.parameters()).device.type == "cpu"
    pos, _ = encode_prompts(enc, "a cat", dtype=torch.bfloat16, after="release")
    assert pos.llm_states.dtype == torch.bfloat16 and pos.mask.dtype == torch.long
    assert enc.step_llm is None and enc.clip is None
    with pytest.raises(RuntimeError, match="released"):
        encode_prompts(enc, "a cat")
    with pytest.raises(ValueError, match="after"):
        encode_prompts(fresh(folders), "a", after="drop")


def test_loaders_name_missing_pieces(tmp_path, folders):
    with pytest.raises(FileNotFoundError, match="step1_chat_tokenizer.model"):
        load_text_encoders(tmp_path, folders / "hunyuan_clip")
    with pytest.raises(FileNotFoundError, match="Hunyuan-CLIP folder"):
        load_hunyuan_clip(tmp_path / "hunyuan_clip")
    assert load_step_llm(folders / "step_llm").compute_dtype == torch.bfloat16
