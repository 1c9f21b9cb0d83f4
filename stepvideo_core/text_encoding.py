"""Prompts -> what the DiT takes: Step-LLM states, CLIP states and the combined 397-long mask.

Follows the official conditioning: the positive "magic" suffix is glued onto each prompt (no separator), the
negative prompt defaults to the negative magic string, Step-LLM framing is BOS + up to 318 tokens + EOS padded
to 320, and the combined mask is 77 ones (every CLIP position, its padding included) followed by the LLM mask.
"""

from __future__ import annotations

import gc
import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from .hunyuan_clip import HunyuanClip, load_hunyuan_clip
from .loading import check_device
from .ops import FP8_DTYPES
from .scheduler import check_finite
from .step_llm import StepLLM, StepLLMTokenizer, load_step_llm, tokenizer_folder

POSITIVE_MAGIC = "超高清、HDR 视频、环境光、杜比全景声、画面稳定、流畅动作、逼真的细节、专业级构图、超现实主义、自然、生动、超细节、清晰。"
NEGATIVE_MAGIC = "画面暗、低分辨率、不良手、文本、缺少手指、多余的手指、裁剪、低质量、颗粒状、签名、水印、用户名、模糊。"
# Step-Video-TI2V's run script appends its own pair (its config.py defaults); pass them as the magic strings.
TI2V_POSITIVE_MAGIC = ("画面中的主体动作表现生动自然、画面流畅、生动细节、光线统一柔和、超真实动态捕捉、大师级运镜、整体不变形、"
                       "超高清、画面稳定、逼真的细节、专业级构图、超细节、清晰。")
TI2V_NEGATIVE_MAGIC = "动画、模糊、变形、毁容、低质量、拼贴、粒状、标志、抽象、插图、计算机生成、扭曲、动作不流畅、面部有褶皱、表情僵硬、畸形手指"
# The suffix sets by name (the text node's choice; the CLI picks t2v or ti2v from the model): True is the T2V pair
# (the key the text cache has always used for it), a string the suffix itself, False none.
MAGIC_SETS: dict[str, tuple[bool | str, bool | str]] = {
    "t2v": (True, True),
    "ti2v": (TI2V_POSITIVE_MAGIC, TI2V_NEGATIVE_MAGIC),
    "none": (False, False),
}
CLIP_TOKENS = 77


@dataclass
class TextConditioning:
    """One batch of DiT text inputs: ``llm_states`` [b, 320, 6144], ``mask`` [b, 397], ``clip_states`` [b, 77, 1024]."""

    llm_states: torch.Tensor
    mask: torch.Tensor
    clip_states: torch.Tensor

    def to(self, device=None, dtype=None) -> TextConditioning:
        return TextConditioning(self.llm_states.to(device=device, dtype=dtype), self.mask.to(device=device),
                                self.clip_states.to(device=device, dtype=dtype))

    def dit_kwargs(self) -> dict[str, torch.Tensor]:
        """Keyword arguments for ``StepVideoDiT.forward``."""
        return dict(encoder_hidden_states=self.llm_states, encoder_attention_mask=self.mask,
                    encoder_hidden_states_2=self.clip_states)

    def check(self, name: str, caption_channels: tuple[int, int]) -> None:
        """A ``ValueError`` naming ``name`` unless the states fit a DiT taking ``caption_channels`` (Step-LLM,
        CLIP) and are finite."""
        for what, states, want in (("Step-LLM", self.llm_states, caption_channels[0]),
                                   ("CLIP", self.clip_states, caption_channels[1])):
            if states.ndim != 3 or states.shape[-1] != want:
                raise ValueError(f"{name}: its {what} states have shape {tuple(states.shape)} but this DiT takes "
                                 f"{want} channels; encode the prompt with the text encoders that belong to this DiT.")
            check_finite(f"{name} ({what} states)", states)
        if self.mask.shape[0] != self.llm_states.shape[0]:
            raise ValueError(f"{name}: {self.mask.shape[0]} mask row(s) for {self.llm_states.shape[0]} prompt(s).")

    @staticmethod
    def cat(items: Sequence[TextConditioning]) -> TextConditioning:
        """Stack along the batch, e.g. [positive, negative] for one guided DiT call."""
        return TextConditioning(torch.cat([c.llm_states for c in items]), torch.cat([c.mask for c in items]),
                                torch.cat([c.clip_states for c in items]))


@dataclass
class TextEncoders:
    """The two encoders with the Step-LLM tokenizer; any of them may be released (set to None) after use."""

    step_llm: StepLLM | None
    tokenizer: StepLLMTokenizer
    clip: HunyuanClip | None

    def offload(self, device: torch.device | str = "cpu") -> None:
        for model in (self.step_llm, self.clip):
            if model is not None:
                model.to(device)
        _free_accelerator_cache()

    def release(self) -> None:
        """Drop the models (the caller must hold no other reference for the memory to return)."""
        self.step_llm = None
        self.clip = None
        gc.collect()
        _free_accelerator_cache()


def load_text_encoders(step_llm_dir, hunyuan_clip_dir, weight_dtype: torch.dtype = torch.bfloat16,
                       device: torch.device | str = "cpu", clip_dtype: torch.dtype = torch.float32,
                       operations=None) -> TextEncoders:
    """``step_llm/`` (weights + ``step1_chat_tokenizer.model``) and ``hunyuan_clip/`` from the official download;
    ``step_llm_dir`` may also be a Step-LLM ``.gguf`` file, whose tokenizer is the one beside it."""
    tokenizer = StepLLMTokenizer(tokenizer_folder(step_llm_dir))
    llm = load_step_llm(step_llm_dir, weight_dtype=weight_dtype, device=device, operations=operations)
    return TextEncoders(llm, tokenizer, load_hunyuan_clip(hunyuan_clip_dir, dtype=clip_dtype, device=device))


def _free_accelerator_cache() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def magic_suffixes(suffix_set: str, positive: bool = True, negative: bool = True) -> tuple[bool | str, bool | str]:
    """(positive_magic, negative_magic) for ``encode_prompts``: the named set of ``MAGIC_SETS``, each side only when
    its switch is on. An unknown name raises ``ValueError`` listing the sets."""
    if suffix_set not in MAGIC_SETS:
        raise ValueError(f"unknown suffix set {suffix_set!r}; choose one of {', '.join(MAGIC_SETS)}")
    pos, neg = MAGIC_SETS[suffix_set]
    return (pos if positive else False), (neg if negative else False)


def build_prompts(prompts: str | Sequence[str], negative_prompt: str | None = None, *,
                  positive_magic: bool | str = True, negative_magic: bool | str = True) -> tuple[list[str], list[str]]:
    """Return (positive texts, negative texts), one negative per prompt.

    With the switches on this is what the official T2V pipeline feeds its encoders; a negative prompt given by the
    user is followed by the negative magic string (the reference has no user negative, only the magic string). A
    string instead of True is the suffix to use (``TI2V_POSITIVE_MAGIC`` / ``TI2V_NEGATIVE_MAGIC`` for TI2V).
    """
    if prompts is None:
        raise ValueError("the prompt is None: give the text of the video to generate.")
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompts:
        raise ValueError("at least one prompt is needed")
    for i, text in enumerate(prompts):
        check_prompt(text, "the prompt" if len(prompts) == 1 else f"prompt {i + 1}")
    if negative_prompt is not None:
        check_prompt(negative_prompt, "the negative prompt", allow_empty=True)
    positive_suffix = POSITIVE_MAGIC if positive_magic is True else (positive_magic or "")
    negative_suffix = NEGATIVE_MAGIC if negative_magic is True else (negative_magic or "")
    positives = [p + positive_suffix for p in prompts]
    negative = (negative_prompt or "") + negative_suffix
    return positives, [negative] * len(prompts)


def check_prompt(text, name: str = "the prompt", allow_empty: bool = False) -> None:
    """A ``ValueError`` naming the prompt unless it is text, not blank (unless allowed) and free of control
    characters (tabs and line breaks are fine): the tokenizers drop or garble those, so the model would read
    another prompt than the one on screen."""
    if not isinstance(text, str):
        raise ValueError(f"{name} must be text, got {type(text).__name__} {text!r}.")
    if not allow_empty and not text.strip():
        raise ValueError(f"{name} is empty: describe the video to generate.")
    bad = [(i, c) for i, c in enumerate(text) if unicodedata.category(c) == "Cc" and c not in "\t\n\r"]
    if bad:
        i, c = bad[0]
        raise ValueError(f"{name} holds {len(bad)} control character(s), first U+{ord(c):04X} at position {i} "
                         f"(after {text[max(0, i - 20):i]!r}); remove them (they are invisible, and the tokenizers "
                         "drop or garble them).")


def combined_mask(llm_mask: torch.Tensor) -> torch.Tensor:
    """[b, 320] LLM mask -> [b, 397]: CLIP's 77 positions all count as valid, and come first."""
    ones = torch.ones(llm_mask.shape[0], CLIP_TOKENS, dtype=llm_mask.dtype, device=llm_mask.device)
    return torch.cat([ones, llm_mask], dim=1)


# Called with "step_llm" or "clip" right before that encoder runs, so a host can bring each model to its device
# then (ComfyUI loads one, possibly partially, while the other may be offloaded).
PrepareHook = Callable[[str], None]


@torch.no_grad()
def encode_texts(encoders: TextEncoders, texts: Sequence[str], device: torch.device | str | None = None,
                 prepare: PrepareHook | None = None) -> TextConditioning:
    if encoders.step_llm is None or encoders.clip is None:
        raise RuntimeError("the text encoders were released; load them again to encode new prompts")
    llm = encoders.step_llm
    device = next(llm.parameters()).device if device is None else check_device(device)
    ids, llm_mask = encoders.tokenizer(list(texts))
    if prepare is not None:
        prepare("step_llm")
    try:
        # Weights may stay on the CPU while ids go to ``device``: the default operations stream each layer over.
        llm_states = llm(ids.to(device), llm_mask.to(device))
    except torch.OutOfMemoryError as e:
        raise torch.OutOfMemoryError(text_oom_message("Step-LLM", llm, len(texts), int(llm_mask.sum(1).max()), e)) from e
    if prepare is not None:
        prepare("clip")
    try:
        clip_states = encoders.clip(list(texts))
    except torch.OutOfMemoryError as e:
        raise torch.OutOfMemoryError(text_oom_message("Hunyuan-CLIP", None, len(texts), None, e)) from e
    return TextConditioning(llm_states, combined_mask(llm_mask).to(device), clip_states.to(device))


def text_oom_message(encoder: str, llm: StepLLM | None, prompts: int, tokens: int | None, error: Exception) -> str:
    """What to change when a text encoder runs out of memory; ``llm`` is Step-LLM when it was the one running."""
    tips = []
    if llm is not None:
        if llm.tok_embeddings.word_embeddings.weight.dtype not in FP8_DTYPES:
            tips.append("load Step-LLM with weight dtype fp8_e4m3fn (about 20 GB instead of 39)")
        tips.append("keep its weights on the CPU and let each layer go to the GPU as it runs (ComfyUI --lowvram, "
                    "or load it with device cpu)")
    else:  # the BERT is small: the memory went to what else is loaded
        tips.append("free the GPU for it: let ComfyUI offload the DiT and Step-LLM (--lowvram)")
    if prompts > 2:
        tips.append(f"encode fewer prompts at once ({prompts} now, the negative included)")
    size = f"{prompts} prompts" + (f" of up to {tokens} tokens" if tokens is not None else "")
    return f"Out of memory in the {encoder} text encoder ({size}). To fit: " + "; ".join(tips) + f". ({error})"


def encode_prompts(
    encoders: TextEncoders,
    prompts: str | Sequence[str],
    negative_prompt: str | None = None,
    *,
    positive_magic: bool | str = True,
    negative_magic: bool | str = True,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    after: Literal["keep", "offload", "release"] = "offload",
    prepare: PrepareHook | None = None,
) -> tuple[TextConditioning, TextConditioning]:
    """Encode prompts and their negative into (positive, negative) conditioning for the DiT.

    ``dtype`` casts the states (the reference hands bf16 to the DiT; None keeps the encoders' own). ``after``
    decides what happens to the encoders once done: "offload" moves them to the CPU, "release" drops them,
    "keep" leaves them where they are; so the 39 GB model need not stay on the GPU while the DiT samples.
    ``prepare`` is called before each encoder runs (see ``PrepareHook``).
    """
    if after not in ("keep", "offload", "release"):
        raise ValueError(f"after must be 'keep', 'offload' or 'release', not {after!r}")
    positives, negatives = build_prompts(prompts, negative_prompt, positive_magic=positive_magic,
                                         negative_magic=negative_magic)
    both = encode_texts(encoders, positives + negatives[:1], device, prepare)
    n = len(positives)
    pos = TextConditioning(both.llm_states[:n], both.mask[:n], both.clip_states[:n])
    neg_one = TextConditioning(both.llm_states[n:], both.mask[n:], both.clip_states[n:])
    neg = TextConditioning.cat([neg_one] * n)
    if dtype is not None:
        pos, neg = pos.to(dtype=dtype), neg.to(dtype=dtype)
    if after == "offload":
        encoders.offload("cpu")
    elif after == "release":
        encoders.release()
    return pos, neg
