"""Many prompts in one run of the CLI: the prompt file, the name of each prompt's outputs, and the gallery page.

Each video's files are named by a hash over every setting that changes the video (``output_stem``), so a rerun
finds the prompts already rendered with the same settings and skips them, and changing any setting (seed, model,
size, steps, guidance, LoRA, ...) renders again under new names; nothing is overwritten.
"""

from __future__ import annotations

import hashlib
import html
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

INDEX_NAME = "index.html"


def read_prompts(path: str | os.PathLike) -> list[str]:
    """One prompt a line (UTF-8, a byte-order mark allowed); blank lines and lines starting with ``#`` are
    skipped. A missing or empty file raises, naming it."""
    file = Path(path)
    try:
        text = file.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise FileNotFoundError(f"prompt file {file} not found: give a text file with one prompt a line") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"prompt file {file} is not UTF-8 text ({e}); save it as UTF-8") from None
    prompts = [line.strip() for line in text.splitlines()]
    prompts = [p for p in prompts if p and not p.startswith("#")]
    if not prompts:
        raise ValueError(f"prompt file {file} holds no prompt: write one prompt a line")
    return prompts


def output_stem(tag: str, prompt: str, settings: dict) -> str:
    """``<tag>_<12 hex digits>``: a hash over the prompt and ``settings`` (JSON-able values only), the name of
    the prompt's MP4 and PNG."""
    blob = json.dumps({"prompt": prompt, **settings}, ensure_ascii=False, sort_keys=True, default=str)
    return f"{tag}_{hashlib.sha256(blob.encode()).hexdigest()[:12]}"


@dataclass(frozen=True)
class GalleryItem:
    prompt: str
    mp4: Path
    png: Path


def gallery_html(title: str, items: Iterable[GalleryItem], folder: Path, settings_line: str = "") -> str:
    """A self-contained page (no script) showing each item's video, contact sheet and prompt, in order. Every text is
    escaped and every file is linked by its name relative to ``folder``, quoted, so a prompt can never become
    markup."""
    cards = []
    for i, item in enumerate(items, 1):
        mp4 = html.escape(quote(os.path.relpath(item.mp4, folder)), quote=True)
        png = html.escape(quote(os.path.relpath(item.png, folder)), quote=True)
        cards.append(
            f'<figure><video src="{mp4}" controls loop muted preload="metadata"></video>'
            f'<img src="{png}" alt="contact sheet" loading="lazy">'
            f'<figcaption><b>{i}.</b> {html.escape(item.prompt)}</figcaption></figure>')
    return "\n".join([
        "<!DOCTYPE html>",
        '<html><head><meta charset="utf-8">',
        f"<title>{html.escape(title)}</title>",
        "<style>body{font-family:sans-serif;background:#111;color:#ddd;margin:1em}"
        "main{display:grid;grid-template-columns:repeat(auto-fill,minmax(320px,1fr));gap:1em}"
        "figure{margin:0}video,img{width:100%;background:#000}</style>",
        "</head><body>",
        f"<h1>{html.escape(title)}</h1>",
        f"<p>{html.escape(settings_line)}</p>" if settings_line else "",
        "<main>", *cards, "</main>",
        "</body></html>",
        "",
    ])


def write_if_changed(path: Path, text: str) -> bool:
    """Write ``text`` to ``path`` unless the file already holds it; True when it wrote."""
    if path.is_file() and path.read_text(encoding="utf-8") == text:
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    return True
