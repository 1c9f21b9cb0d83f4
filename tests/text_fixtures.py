"""Small stand-ins for the text encoders' files, built on the fly so tests need no downloads.

- a SentencePiece model trained on a tiny Chinese/English corpus, carrying the special tokens the Step-1 chat
  tokenizer must have (six control tokens, two user-defined mask tokens);
- a BERT ``vocab.txt`` with the Chinese-RoBERTa special ids ([PAD]=0, [UNK]=100, [CLS]=101, [SEP]=102, [MASK]=103);
- random-weight Step-LLM and BERT checkpoints written in the official layouts.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from stepvideo_core.step_llm import (
    CONTROL_TOKENS,
    MASK_TOKENS,
    TOKENIZER_FILE,
    StepLLM,
    StepLLMConfig,
    StepLLMTokenizer,
)
from tests.builders import write_sharded

CORPUS = [
    "A red fox runs through the snowy forest at dawn.",
    "An astronaut rides a horse on the moon, cinematic lighting.",
    "A cat sleeps on a sunny windowsill while rain falls outside.",
    "Waves crash against the rocky shore under a purple sky.",
    "一只红色的狐狸在黎明时分穿过雪林。",
    "宇航员在月球上骑马，电影般的灯光。",
    "一只猫在阳光明媚的窗台上睡觉，窗外下着雨。",
    "海浪在紫色的天空下拍打着岩石海岸。",
    "一个男孩在 park 里放风筝 with his dog。",
    "City lights 夜晚的城市灯光 reflect on the river 河面。",
    "超高清、HDR 视频、环境光、杜比全景声、画面稳定、流畅动作、逼真的细节、专业级构图、超现实主义、自然、生动、超细节、清晰。",
    "画面暗、低分辨率、不良手、文本、缺少手指、多余的手指、裁剪、低质量、颗粒状、签名、水印、用户名、模糊。",
]

BERT_CHARS = "一只红色的狐狸在黎明时分穿过雪林宇航员月球上骑马电影般灯光猫阳明媚窗台睡觉外下着雨海浪紫天空拍打岩石岸个男孩里放风筝夜晚城市河面超高清视频环境杜比全景声画稳定流畅动作逼真细节专业级构图现实主义自然生清晰暗低分辨率不良手文本缺少指多余裁剪质量颗粒状签名水印用户模糊"
BERT_WORDS = ["a", "red", "fox", "runs", "the", "cat", "moon", "hdr", "park", "dog", "city", "lights", "river", "with",
              "his", "##s", "##ing", ",", ".", "、", "，", "。"]


def write_sentencepiece(folder: Path, vocab_size: int = 400) -> Path:
    import sentencepiece as spm

    folder.mkdir(parents=True, exist_ok=True)
    corpus = folder / "corpus.txt"
    corpus.write_text("\n".join(CORPUS * 3) + "\n", encoding="utf-8")
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(folder / "step1_chat_tokenizer"), vocab_size=vocab_size,
        model_type="bpe", character_coverage=1.0, hard_vocab_limit=False, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        control_symbols=list(CONTROL_TOKENS), user_defined_symbols=list(MASK_TOKENS), byte_fallback=False,
        minloglevel=2, num_threads=1,
    )
    corpus.unlink()
    (folder / "step1_chat_tokenizer.vocab").unlink()
    return folder / TOKENIZER_FILE


def write_bert_vocab(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    tokens = ["[PAD]"] + [f"[unused{i}]" for i in range(1, 100)] + ["[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tokens += list(dict.fromkeys(BERT_CHARS)) + BERT_WORDS
    path = folder / "vocab.txt"
    path.write_text("\n".join(tokens) + "\n", encoding="utf-8")
    return path


def small_llm_config(vocab_size: int, **overrides) -> StepLLMConfig:
    # 12 heads over 2 groups keeps the release's 6 heads per group and exercises the non-power-of-two slopes.
    values = dict(hidden_size=96, num_layers=2, num_attention_heads=12, num_attention_groups=2, ffn_hidden_size=256,
                  vocab_size=vocab_size)
    return StepLLMConfig(**{**values, **overrides})


def random_step_llm(config: StepLLMConfig, seed: int = 0) -> StepLLM:
    torch.manual_seed(seed)
    model = StepLLM(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.2 * torch.randn_like(p))
            else:
                p.normal_(0, 1 / p.shape[-1] ** 0.5)
    return model.eval().requires_grad_(False)


def write_step_llm_folder(folder: Path, model: StepLLM, shards: int = 2, dtype: torch.dtype = torch.float32) -> Path:
    """Official layout: shards ``model-0000i-of-0000n.safetensors`` + index + ``config.json``."""
    write_sharded(folder, {k: v.to(dtype) for k, v in model.state_dict().items()}, "model", shards)
    cfg = model.config
    (folder / "config.json").write_text(json.dumps({
        "architectures": ["Step1Model"], "hidden_size": cfg.hidden_size, "num_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_attention_heads, "num_attention_groups": cfg.num_attention_groups,
        "ffn_hidden_size": cfg.ffn_hidden_size, "padded_vocab_size": cfg.vocab_size, "layernorm_epsilon": cfg.layernorm_epsilon,
    }))
    return folder


def small_bert_config(vocab_size: int):
    from transformers import BertConfig

    return BertConfig(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                      intermediate_size=64, max_position_embeddings=128, type_vocab_size=2, layer_norm_eps=1e-12,
                      pad_token_id=0)


def write_hunyuan_clip(root: Path, fmt: str = "safetensors", prefix: str = "bert.", seed: int = 0):
    """``root/clip_text_encoder`` (config + weights) and ``root/tokenizer/vocab.txt``; returns the BertModel."""
    from transformers import BertModel

    vocab = write_bert_vocab(root / "tokenizer")
    (root / "tokenizer" / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": True, "tokenize_chinese_chars": True}))
    n_vocab = len(vocab.read_text(encoding="utf-8").splitlines())
    torch.manual_seed(seed)
    model = BertModel(small_bert_config(n_vocab)).eval()
    enc = root / "clip_text_encoder"
    enc.mkdir(parents=True, exist_ok=True)
    model.config.to_json_file(str(enc / "config.json"))
    state = {prefix + k: v.contiguous() for k, v in model.state_dict().items() if not k.endswith("position_ids")}
    if fmt == "safetensors":
        save_file(state, str(enc / "model.safetensors"))
    else:
        torch.save(state, enc / "pytorch_model.bin")
    return model


def write_text_encoder_folders(root: Path) -> Path:
    """A one-layer Step-LLM (with its SentencePiece tokenizer) and a small Hunyuan-CLIP under ``root/step_llm`` and
    ``root/hunyuan_clip``, as the release lays them out."""
    write_sentencepiece(root / "step_llm")
    n_vocab = StepLLMTokenizer(root / "step_llm").sp.get_piece_size()
    write_step_llm_folder(root / "step_llm", random_step_llm(small_llm_config(n_vocab, num_layers=1)))
    write_hunyuan_clip(root / "hunyuan_clip")
    return root
