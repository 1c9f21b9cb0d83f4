import math
import warnings

import pytest
import torch
import torch.nn.functional as F

from stepvideo_core.loading import CheckpointError
from stepvideo_core.step_llm import (
    Attention,
    FeedForward,
    PromptTruncatedWarning,
    StepLLM,
    StepLLMConfig,
    StepLLMTokenizer,
    alibi_slopes,
    grouped_causal_attention,
    load_step_llm,
    relative_distance,
)
from tests.text_fixtures import random_step_llm, small_llm_config, write_sentencepiece, write_step_llm_folder

PROMPTS = ["A red fox runs through the snowy forest at dawn.", "一只猫在阳光明媚的窗台上睡觉，窗外下着雨。",
           "一个男孩在 park 里放风筝 with his dog。"]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("step_llm")
    write_sentencepiece(folder)
    return folder


@pytest.fixture(scope="module")
def tokenizer(tok_dir):
    return StepLLMTokenizer(tok_dir)


@pytest.fixture(scope="module")
def model(tokenizer):
    return random_step_llm(small_llm_config(tokenizer.sp.get_piece_size()))


# ---- an independent, deliberately plain forward written from the spec (stepvideo-model.md §2.5) ----------------

def spec_slopes(heads):
    n = 1
    while n * 2 <= heads:
        n *= 2
    return [2 ** (-8 * k / n) for k in range(1, n + 1)] + [2 ** (-8 * (2 * j - 1) / (2 * n)) for j in range(1, heads - n + 1)]


def plain_attention_bshd(q, k, v, kind="sqrt_alibi"):
    """q, k, v [b, s, h, d] with k/v already one per query head; causal + per-head position penalty."""
    b, s, h, d = q.shape
    slopes = spec_slopes(h)
    i = torch.arange(s)[:, None].double()
    j = torch.arange(s)[None, :].double()
    future = j > i
    out = torch.zeros(b, s, h, d, dtype=torch.float64)
    for head in range(h):
        scores = q[:, :, head].double() @ k[:, :, head].double().transpose(1, 2) / math.sqrt(d)
        if kind == "sqrt_alibi":
            scores = scores - slopes[head] * (i - j).clamp(min=0).sqrt()
        elif kind == "alibi":
            scores = scores - slopes[head] * (i - j).clamp(min=0)
        scores = scores.masked_fill(future, float("-inf"))
        out[:, :, head] = scores.softmax(-1) @ v[:, :, head].double()
    return out.to(q.dtype)


def plain_forward(state, cfg, ids, kind="sqrt_alibi"):
    d = cfg.hidden_size // cfg.num_attention_heads
    per_group = cfg.num_attention_heads // cfg.num_attention_groups

    def rms(x, w):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + cfg.layernorm_epsilon) * w

    x = state["tok_embeddings.word_embeddings.weight"][ids]
    b, s, _ = x.shape
    for layer in range(cfg.num_layers):
        p = f"transformer.layers.{layer}."
        h = rms(x, state[p + "attention_norm.weight"])
        qkv = h @ state[p + "attention.wqkv.weight"].T
        q = qkv[..., :cfg.hidden_size].reshape(b, s, cfg.num_attention_heads, d)
        ks, vs = [], []
        for head in range(cfg.num_attention_heads):
            g = head // per_group
            base = cfg.hidden_size + g * 2 * d
            ks.append(qkv[..., base:base + d])
            vs.append(qkv[..., base + d:base + 2 * d])
        att = plain_attention_bshd(q, torch.stack(ks, 2), torch.stack(vs, 2), kind)
        x = x + att.reshape(b, s, -1) @ state[p + "attention.wo.weight"].T
        h = rms(x, state[p + "ffn_norm.weight"])
        w1 = state[p + "feed_forward.w1.weight"]
        gate, up = w1[: w1.shape[0] // 2], w1[w1.shape[0] // 2:]
        x = x + (F.silu(h @ gate.T) * (h @ up.T)) @ state[p + "feed_forward.w2.weight"].T
    return x


def close(a, b, rel=1e-5):
    return (a - b).abs().max().item() <= rel * b.abs().max().item()


# ---- architecture ------------------------------------------------------------------------------------------------

def test_default_config_is_the_release():
    cfg = StepLLMConfig()
    assert (cfg.hidden_size, cfg.num_layers, cfg.num_attention_heads, cfg.num_attention_groups, cfg.ffn_hidden_size,
            cfg.vocab_size, cfg.layernorm_epsilon, cfg.position_bias) == (6144, 48, 48, 8, 16896, 65536, 1e-5, "sqrt_alibi")
    with torch.device("meta"):
        model = StepLLM(cfg)
    state = model.state_dict()
    assert len(state) == 289
    assert sum(v.numel() for v in state.values()) == 19_579_600_896
    assert state["transformer.layers.47.attention.wqkv.weight"].shape == (8192, 6144)
    assert state["transformer.layers.0.feed_forward.w1.weight"].shape == (33792, 6144)
    with pytest.raises(ValueError, match="position_bias"):
        StepLLMConfig(position_bias="rope")


@pytest.mark.parametrize("kind", ["sqrt_alibi", "alibi", "none"])
def test_matches_plain_spec_forward(tokenizer, kind):
    cfg = small_llm_config(tokenizer.sp.get_piece_size(), position_bias=kind)
    model = random_step_llm(cfg, seed=1)
    ids, mask = tokenizer(PROMPTS[:2], max_length=48)
    ours = model(ids, mask)
    ref = plain_forward(model.state_dict(), cfg, ids, kind)
    assert ours.shape == (2, 48, cfg.hidden_size)
    assert close(ours, ref)


def test_position_schemes_differ(tokenizer):
    ids, _ = tokenizer(PROMPTS[:1], max_length=40)
    outs = [random_step_llm(small_llm_config(tokenizer.sp.get_piece_size(), position_bias=k))(ids) for k in ("sqrt_alibi", "alibi", "none")]
    assert not torch.allclose(outs[0], outs[1], atol=1e-3) and not torch.allclose(outs[0], outs[2], atol=1e-3)


def test_alibi_slopes_values_and_order():
    s48 = alibi_slopes(48)
    expected = [2 ** (-k / 4) for k in range(1, 33)] + [2 ** (-(2 * j - 1) / 8) for j in range(1, 17)]
    assert torch.allclose(s48, torch.tensor(expected, dtype=torch.float64), rtol=0, atol=1e-15)
    assert torch.equal(alibi_slopes(8), torch.tensor([2.0 ** -k for k in range(1, 9)], dtype=torch.float64))
    assert alibi_slopes(12).tolist() == pytest.approx([2 ** -k for k in range(1, 9)] + [2 ** -0.5, 2 ** -1.5, 2 ** -2.5, 2 ** -3.5])


def test_bias_reaches_the_right_heads():
    """With q = 0 the softmax weights are the bias alone: head h at query i must weight key j by
    exp(-slope_h sqrt(i-j)), normalised over j <= i."""
    heads, groups, length = 48, 8, 24
    q = torch.zeros(1, heads, length, length)
    v = torch.eye(length)[None, None].expand(1, groups, length, length).contiguous()
    k = torch.randn(1, groups, length, length)
    out = grouped_causal_attention(q, k, v,
                                   relative_distance(length, "sqrt_alibi"), alibi_slopes(heads).float())
    slopes = spec_slopes(heads)
    for head in (0, 5, 31, 32, 47):
        i = length - 1
        w = torch.tensor([math.exp(-slopes[head] * math.sqrt(i - j)) for j in range(length)])
        assert torch.allclose(out[0, head, i], w / w.sum(), atol=1e-6), head


def test_fused_wqkv_layout_and_head_to_group():
    """wqkv rows = all query heads, then per group (key rows, value rows); head h reads group h // 6."""
    cfg = StepLLMConfig(hidden_size=48, num_layers=1, num_attention_heads=12, num_attention_groups=2,
                        ffn_hidden_size=256, vocab_size=8, position_bias="none")
    att = Attention(cfg, __import__("stepvideo_core.ops", fromlist=["default_ops"]).default_ops)
    d = cfg.head_dim
    torch.manual_seed(0)
    with torch.no_grad():
        att.wqkv.weight.normal_()
        att.wo.weight.copy_(torch.eye(48))
    x = torch.randn(1, 7, 48)
    base = att(x, relative_distance(7, "none"), alibi_slopes(12).float())
    original = att.wqkv.weight.detach().clone()
    with torch.no_grad():  # perturb only group 1's value rows
        att.wqkv.weight[48 + 2 * d + d: 48 + 4 * d] += 1.0
    changed = (att(x, relative_distance(7, "none"), alibi_slopes(12).float()) - base).abs().view(7, 12, d).amax(dim=(0, 2)) > 1e-6
    assert changed.tolist() == [False] * 6 + [True] * 6
    with torch.no_grad():  # group 0's key rows: changes heads 0-5 only (beyond the first token)
        att.wqkv.weight.copy_(original)
        att.wqkv.weight[48: 48 + d] += 1.0
    changed = (att(x, relative_distance(7, "none"), alibi_slopes(12).float()) - base).abs().view(7, 12, d).amax(dim=(0, 2)) > 1e-6
    assert changed.tolist() == [True] * 6 + [False] * 6


def test_swiglu_gate_then_up():
    cfg = StepLLMConfig(hidden_size=16, num_layers=1, num_attention_heads=2, num_attention_groups=1,
                        ffn_hidden_size=256, vocab_size=8)
    ff = FeedForward(cfg, __import__("stepvideo_core.ops", fromlist=["default_ops"]).default_ops)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in ff.parameters():
            p.normal_()
    x = torch.randn(3, 16)
    gate, up = ff.w1.weight[:256], ff.w1.weight[256:]
    right = (F.silu(x @ gate.T) * (x @ up.T)) @ ff.w2.weight.T
    wrong = (F.silu(x @ up.T) * (x @ gate.T)) @ ff.w2.weight.T
    assert torch.allclose(ff(x), right, atol=1e-4)
    assert not torch.allclose(ff(x), wrong, atol=1e-2)


def test_causal_pads_never_reach_valid_tokens(model, tokenizer):
    ids, mask = tokenizer(["a cat"], max_length=32)
    valid = int(mask.sum())
    out = model(ids, mask)
    ids2 = ids.clone()
    ids2[0, valid:] = torch.randint(3, 50, (32 - valid,))
    assert torch.equal(model(ids2, None)[:, :valid], out[:, :valid])
    assert torch.equal(model(ids, None), out)  # the mask is ignored, as in the reference


# ---- parity with the official Step1Model (closed attention replaced by a plain sqrt-ALiBi) ---------------------

def test_parity_with_official_step1model(model, tokenizer, monkeypatch):
    from tests.reference_impl import import_reference

    stepllm = import_reference("text_encoder.stepllm")
    flash = import_reference("text_encoder.flashattention")
    import transformers

    def plain_kernel(q, k, v, dropout_p=0.0, **_):
        return plain_attention_bshd(q, k, v, "sqrt_alibi")

    monkeypatch.setattr(flash, "flash_attn_func", plain_kernel)
    cfg = model.config
    ref_cfg = transformers.PretrainedConfig(
        hidden_size=cfg.hidden_size, num_layers=cfg.num_layers, num_attention_heads=cfg.num_attention_heads,
        num_attention_groups=cfg.num_attention_groups, ffn_hidden_size=cfg.ffn_hidden_size,
        padded_vocab_size=cfg.vocab_size, layernorm_epsilon=cfg.layernorm_epsilon, seq_length=320,
        use_flash_attn=True, attention_dropout=0.0, hidden_dropout=0.0, params_dtype=torch.float32,
        fp32_residual_connection=False, embedding_weights_in_fp32=False,
    )
    ref = stepllm.Step1Model(ref_cfg)
    ref.load_state_dict(model.state_dict())
    ref.eval()
    ref_tok = stepllm.Wrapped_StepChatTokenizer(str(tokenizer.file))
    tokens = ref_tok(PROMPTS)
    ids, mask = tokenizer(PROMPTS)
    assert torch.equal(ids, tokens.input_ids) and torch.equal(mask, tokens.attention_mask)
    with torch.no_grad():
        expected = ref(ids, mask).transpose(0, 1)
    assert close(model(ids, mask), expected)


# ---- loading -------------------------------------------------------------------------------------------------------

def test_load_sharded_folder_in_every_storage_dtype(model, tokenizer, tmp_path):
    folder = write_step_llm_folder(tmp_path / "step_llm", model, shards=3)
    ids, mask = tokenizer(PROMPTS[:2], max_length=24)
    expected = model(ids, mask)
    loaded = load_step_llm(folder, weight_dtype=torch.float32)
    assert loaded.config == model.config
    assert torch.equal(loaded(ids, mask), expected)
    for dtype, tol in ((torch.bfloat16, 0.05), (torch.float16, 0.01), (torch.float8_e4m3fn, 0.2), (torch.float8_e5m2, 0.4)):
        m = load_step_llm(folder, weight_dtype=dtype, compute_dtype=torch.float32)
        assert m.transformer.layers[0].attention.wqkv.weight.dtype == dtype
        err = (m(ids, mask) - expected).abs().max() / expected.abs().max()
        assert err < tol, (dtype, float(err))
    assert load_step_llm(folder, weight_dtype=torch.float8_e4m3fn).compute_dtype == torch.bfloat16


def test_wrong_checkpoint_is_named(tmp_path):
    from safetensors.torch import save_file

    save_file({"pos_embed.proj.weight": torch.zeros(4, 4, 1, 1), "transformer_blocks.0.attn1.wqkv.weight": torch.zeros(12, 4)},
              str(tmp_path / "dit.safetensors"))
    with pytest.raises(CheckpointError, match="Step-Video DiT.*not a Step-LLM"):
        load_step_llm(tmp_path / "dit.safetensors")
    save_file({"bert.embeddings.word_embeddings.weight": torch.zeros(4, 4)}, str(tmp_path / "bert.safetensors"))
    with pytest.raises(CheckpointError, match="BERT.*not a Step-LLM"):
        load_step_llm(tmp_path / "bert.safetensors")
    with pytest.raises(CheckpointError, match="not found"):
        load_step_llm(tmp_path / "nowhere")


# ---- tokenizer -----------------------------------------------------------------------------------------------------

def test_tokenizer_framing_and_mask(tokenizer):
    ids, mask = tokenizer(PROMPTS + [""])
    assert ids.shape == mask.shape == (4, 320) and ids.dtype == torch.long
    for row, text in enumerate(PROMPTS + [""]):
        body = tokenizer.tokenize(text)
        n = len(body) + 2
        assert ids[row, :n].tolist() == [1, *body, 2]
        assert (ids[row, n:] == 2).all()
        assert mask[row].tolist() == [1] * n + [0] * (320 - n)
    assert mask[3].sum() == 2  # empty prompt = BOS, EOS


def test_bilingual_prompts_tokenize_without_unknowns(tokenizer):
    for text in PROMPTS:
        body = tokenizer.tokenize(text)
        assert body and 0 not in body, text
    assert tokenizer.sp.decode_ids(tokenizer.tokenize(PROMPTS[2])) == PROMPTS[2]


def test_truncation_warns_with_the_count(tokenizer):
    long = " ".join(["fox"] * 400)
    n = len(tokenizer.tokenize(long))
    with pytest.warns(PromptTruncatedWarning, match=f"{n - 318} of {n} tokens dropped"):
        ids, mask = tokenizer([long])
    assert mask.sum() == 320 and ids[0, 0] == 1 and ids[0, -1] == 2
    assert ids[0, 1:319].tolist() == tokenizer.tokenize(long)[:318]
    exact = tokenizer.sp.decode_ids(tokenizer.tokenize(long)[:318])
    assert len(tokenizer.tokenize(exact)) == 318
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tokenizer([exact])


def test_tokenizer_errors(tmp_path, tok_dir):
    with pytest.raises(FileNotFoundError, match=r"step1_chat_tokenizer\.model.*" + str(tmp_path.name)):
        StepLLMTokenizer(tmp_path)
    import sentencepiece as spm

    (tmp_path / "c.txt").write_text("plain words only here\n" * 20)
    spm.SentencePieceTrainer.train(input=str(tmp_path / "c.txt"), model_prefix=str(tmp_path / "step1_chat_tokenizer"),
                                   vocab_size=30, hard_vocab_limit=False, minloglevel=2)
    with pytest.raises(ValueError, match="not the Step-1 chat tokenizer.*<\\|BOT\\|>"):
        StepLLMTokenizer(tmp_path)
