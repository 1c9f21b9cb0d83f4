"""Fault catalogue, safety: no network at run time, no pickle, no shell built from user text, no HTML injection,
and prompts reach the encoders exactly as typed (quotes, backslashes, shell metacharacters included)."""

from __future__ import annotations

import re
import socket
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from stepvideo_core.pipeline import generate
from stepvideo_core.text_encoding import NEGATIVE_MAGIC, POSITIVE_MAGIC, encode_prompts
from stepvideo_core.tiny import model as tiny_model
from tests.fault_fixtures import tiny_fixture

tiny = tiny_fixture()
ROOT = Path(__file__).resolve().parents[1]
SKIP_DIRS = {".venv", ".git", "runs", "outputs", "node_modules", "__pycache__"}


def sources(*suffixes: str) -> list[Path]:
    return [p for p in ROOT.rglob("*") if p.suffix in suffixes and p.is_file()
            and not SKIP_DIRS.intersection(p.relative_to(ROOT).parts)]


def calls(text: str, name: str) -> list[str]:
    """The argument text of every call ``name(...)`` in ``text`` (brackets balanced)."""
    found = []
    for m in re.finditer(re.escape(name) + r"\s*\(", text):
        depth, i = 1, m.end()
        while depth and i < len(text):
            depth += {"(": 1, ")": -1}.get(text[i], 0)
            i += 1
        found.append(text[m.end():i - 1])
    return found


@pytest.mark.slow  # loads every model afresh (seconds on an idle machine, more on a busy one)
def test_no_network_while_loading_and_generating(monkeypatch):
    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise OSError("network blocked by the fault catalogue")

    for name in ("connect", "connect_ex"):
        monkeypatch.setattr(socket.socket, name, refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    model = tiny_model.load_tiny()
    with torch.no_grad():
        pos, neg = encode_prompts(model.text, "a purple square moves up", after="release")
        video = generate(model.dit, model.vae, pos, neg, replace(tiny_model.SETTINGS, height=32, width=32, steps=2))
    assert torch.isfinite(video).all()
    assert not attempts, f"network use at run time: {attempts}"


def test_no_pickle_loading_anywhere():
    offenders = []
    for path in sources(".py"):
        if path.name == Path(__file__).name:
            continue
        text = path.read_text(encoding="utf-8")
        offenders += [f"{path.relative_to(ROOT)}: torch.load({args})" for args in calls(text, "torch.load")
                      if not re.search(r"weights_only\s*=\s*True", args)]
        offenders += [f"{path.relative_to(ROOT)}: {m.group(0)}" for m in
                      re.finditer(r"\bpickle\.loads?\(|\bdill\.|allow_pickle\s*=\s*True|trust_remote_code\s*=\s*True",
                                  text)]
    assert not offenders, "pickle loading (use safetensors or torch.load(weights_only=True)): " + "; ".join(offenders)


def test_no_shell_commands():
    pattern = re.compile(r"shell\s*=\s*True|\bos\.system\(|\bos\.popen\(|\bsubprocess\.getoutput\(|"
                         r"\bsubprocess\.getstatusoutput\(|\bos\.exec\w*\(")
    offenders = [f"{p.relative_to(ROOT)}: {m.group(0)}" for p in sources(".py")
                 for m in pattern.finditer(p.read_text(encoding="utf-8")) if p.name != Path(__file__).name]
    assert not offenders, "a shell could be built from user text: " + "; ".join(offenders)


def test_no_html_injection_in_the_frontend():
    pattern = re.compile(r"\.innerHTML\b|\.outerHTML\b|insertAdjacentHTML|document\.write|\beval\(|new Function\(")
    scripts = sources(".js", ".mjs")
    assert scripts, "the frontend extension is checked"
    offenders = [f"{p.relative_to(ROOT)}: {m.group(0)}" for p in scripts if "js" in p.relative_to(ROOT).parts
                 for m in pattern.finditer(p.read_text(encoding="utf-8"))]
    assert not offenders, "HTML built from strings (use textContent): " + "; ".join(offenders)


@pytest.mark.parametrize("prompt", [
    'a "red" circle; rm -rf / && echo $(whoami) `id` | cat > /tmp/x',
    "a cat's \\n backslash \\\\ and 'quotes' %s {0} ${HOME} <b>bold</b> * ? ~ #",
    "红色的圆形向左移动；\"引号\" & 'single' \\t",
])
def test_prompts_reach_the_encoders_unchanged(tiny, monkeypatch, prompt):
    seen = {"step_llm": [], "clip": []}
    llm_tokenize, clip_tokenize = tiny.text.tokenizer.tokenize, tiny.text.clip.tokenize

    def spy_llm(text):
        seen["step_llm"].append(text)
        return llm_tokenize(text)

    def spy_clip(texts):
        seen["clip"].extend(texts)
        return clip_tokenize(texts)

    monkeypatch.setattr(tiny.text.tokenizer, "tokenize", spy_llm)
    monkeypatch.setattr(tiny.text.clip, "tokenize", spy_clip)
    with torch.no_grad():
        encode_prompts(tiny.text, prompt, 'no "shell" here; $(true)', after="keep")
    want = [prompt + POSITIVE_MAGIC, 'no "shell" here; $(true)' + NEGATIVE_MAGIC]
    assert seen == {"step_llm": want, "clip": want}
