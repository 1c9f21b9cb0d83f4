import os

import pytest
import torch

from stepvideo_core.text_cache import TextEmbeddingCache, encode_prompts_cached, encoder_identity
from stepvideo_core.text_encoding import encode_prompts, load_text_encoders
from tests.text_fixtures import (
    write_text_encoder_folders,
)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    return write_text_encoder_folders(tmp_path_factory.mktemp("ckpt"))


@pytest.fixture(scope="module")
def encoders(folders):
    return load_text_encoders(folders / "step_llm", folders / "hunyuan_clip", weight_dtype=torch.float32)


class Loader:
    """Counts how often the encoders are asked for (a hit must not ask)."""

    def __init__(self, encoders):
        self.encoders, self.calls = encoders, 0

    def __call__(self):
        self.calls += 1
        return self.encoders


def identity(folders):
    return encoder_identity([folders / "step_llm", folders / "hunyuan_clip"], llm_dtype="fp32")


def encode(cache, folders, loader, prompt="a red fox runs", **kw):
    return encode_prompts_cached(cache, identity(folders), loader, prompt, kw.pop("negative_prompt", None), after="keep", **kw)


def assert_same(a, b):
    for f in ("llm_states", "mask", "clip_states"):
        torch.testing.assert_close(getattr(a, f), getattr(b, f), rtol=0, atol=0)


def test_hit_returns_the_stored_states_without_asking_for_the_encoders(tmp_path, folders, encoders):
    cache, loader = TextEmbeddingCache(tmp_path / "cache"), Loader(encoders)
    pos, neg, hit = encode(cache, folders, loader)
    assert not hit and loader.calls == 1 and len(cache.entries()) == 1
    ref_pos, ref_neg = encode_prompts(encoders, "a red fox runs", after="keep")
    assert_same(pos, ref_pos)
    assert_same(neg, ref_neg)
    pos2, neg2, hit2 = encode(cache, folders, loader)
    assert hit2 and loader.calls == 1
    assert_same(pos2, pos)
    assert_same(neg2, neg)


@pytest.mark.slow
def test_every_input_of_the_states_is_in_the_key(tmp_path, folders, encoders):
    cache, loader = TextEmbeddingCache(tmp_path / "cache"), Loader(encoders)
    encode(cache, folders, loader)
    variants = [dict(prompt="a red fox walks"), dict(negative_prompt="blurry"), dict(positive_magic=False),
                dict(negative_magic=False), dict(dtype=torch.bfloat16)]
    for kw in variants:
        _, _, hit = encode(cache, folders, loader, **kw)
        assert not hit, kw
    assert loader.calls == 1 + len(variants) and len(cache.entries()) == 1 + len(variants)
    base = identity(folders)
    assert encoder_identity([folders / "step_llm", folders / "hunyuan_clip"], llm_dtype="bf16") != base
    vocab = folders / "hunyuan_clip" / "tokenizer" / "vocab.txt"
    st = vocab.stat()
    os.utime(vocab, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    try:
        assert identity(folders) != base  # a replaced encoder file changes every key
        _, _, hit = encode(cache, folders, loader)
        assert not hit
    finally:
        os.utime(vocab, ns=(st.st_atime_ns, st.st_mtime_ns))


@pytest.mark.parametrize("damage", ["truncate", "garbage", "wrong_tensors"])
def test_a_corrupt_entry_is_encoded_again(tmp_path, folders, encoders, damage, caplog):
    cache, loader = TextEmbeddingCache(tmp_path / "cache"), Loader(encoders)
    pos, _, _ = encode(cache, folders, loader)
    (entry,) = cache.entries()
    if damage == "truncate":
        entry.write_bytes(entry.read_bytes()[:200])
    elif damage == "garbage":
        entry.write_bytes(b"not a safetensors file at all" * 10)
    else:
        from safetensors.torch import save_file

        save_file({"positive.llm_states": torch.zeros(1, 3, 4)}, entry)
    again, _, hit = encode(cache, folders, loader)
    assert not hit and loader.calls == 2 and "unreadable" in caplog.text
    assert_same(again, pos)
    _, _, hit = encode(cache, folders, loader)
    assert hit  # the rewritten entry is whole again


def test_the_cache_keeps_the_most_recently_used_entries_within_its_limit(tmp_path, folders, encoders):
    cache, loader = TextEmbeddingCache(tmp_path / "cache"), Loader(encoders)
    encode(cache, folders, loader, prompt="first")
    entry_size = cache.entries()[0].stat().st_size
    cache.max_bytes = int(2.5 * entry_size)  # room for two entries
    encode(cache, folders, loader, prompt="second")
    first = cache.entries()[0]
    os.utime(first, ns=(0, 1))  # make the order unambiguous whatever the clock's resolution
    encode(cache, folders, loader, prompt="first")  # a hit refreshes "first": "second" is now the oldest
    encode(cache, folders, loader, prompt="third")
    assert len(cache.entries()) == 2
    assert sum(p.stat().st_size for p in cache.entries()) <= cache.max_bytes
    calls = loader.calls
    assert encode(cache, folders, loader, prompt="first")[2]
    assert encode(cache, folders, loader, prompt="third")[2]
    assert not encode(cache, folders, loader, prompt="second")[2]
    assert loader.calls == calls + 1


def test_no_cache_always_encodes(folders, encoders):
    loader = Loader(encoders)
    encode(None, folders, loader)
    encode(None, folders, loader)
    assert loader.calls == 2


def test_limit_must_be_positive(tmp_path):
    with pytest.raises(ValueError, match="max_bytes"):
        TextEmbeddingCache(tmp_path, max_bytes=0)
