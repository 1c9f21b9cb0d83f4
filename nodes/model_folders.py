"""Finding model files in folders: the official multi-file layout (``stepvideo/<download>/<part>``) and plain
subfolders. Pure functions over a list of roots; ``registered_folders`` binds them to ComfyUI's registry."""

from __future__ import annotations

import os

from ..stepvideo_core.step_llm import TOKENIZER_FILE
from ..stepvideo_core.tiny import model as tiny

OFFICIAL_PREFIX = "stepvideo/"  # combo values of the official multi-file layout: stepvideo/<download>/<part>
# The pack's own models/ folder: Step-Video-Tiny ships there in the official layout, so registering it as one more
# "stepvideo" root makes every loader list stepvideo/step-video-tiny/<part> without any download.
BUILTIN_MODELS_DIR = str(tiny.TINY_DIR.parent)


def list_official(roots, part: str, check=os.path.isdir) -> list[str]:
    """``stepvideo/<download>/<part>`` for every ``<root>/<download>/<part>`` that exists (``check``)."""
    found = set()
    for root in roots:
        if not os.path.isdir(root):
            continue
        for name in sorted(os.listdir(root)):
            if check(os.path.join(root, name, part)):
                found.add(f"{OFFICIAL_PREFIX}{name}/{part}")
    return sorted(found)


def resolve_official(roots, value: str) -> str | None:
    """Path of a ``stepvideo/<download>/<part>`` combo value under the first root that has it, else None."""
    if not value.startswith(OFFICIAL_PREFIX):
        return None
    rel = value[len(OFFICIAL_PREFIX):]
    if ".." in rel.replace("\\", "/").split("/"):
        return None
    for root in roots:
        path = os.path.join(root, rel)
        if os.path.exists(path):
            return path
    return None


def list_subfolders(roots, marker: str) -> list[str]:
    """Names of ``<root>/<name>/`` folders that contain ``marker`` (a file or folder)."""
    found = set()
    for root in roots:
        if not os.path.isdir(root):
            continue
        for name in os.listdir(root):
            if os.path.exists(os.path.join(root, name, marker)):
                found.add(name)
    return sorted(found)


def resolve_subfolder(roots, name: str) -> str | None:
    if not name or ".." in name.replace("\\", "/").split("/"):
        return None
    for root in roots:
        path = os.path.join(root, name)
        if os.path.isdir(path):
            return path
    return None


STEP_LLM_MARKER = TOKENIZER_FILE
HUNYUAN_CLIP_MARKER = "clip_text_encoder"


GGUF_SUFFIX = ".gguf"


def list_official_files(roots, part: str, suffix: str = GGUF_SUFFIX) -> list[str]:
    """``stepvideo/<download>/<part>/<file>`` for every ``<file>`` ending in ``suffix`` in an official part folder
    (a GGUF placed beside, or instead of, the shards)."""
    found = set()
    for entry in list_official(roots, part):
        folder = resolve_official(roots, entry)
        if folder and os.path.isdir(folder):
            found.update(f"{entry}/{name}" for name in os.listdir(folder) if name.endswith(suffix))
    return sorted(found)


def list_files(roots, suffix: str = GGUF_SUFFIX, marker: str | None = None) -> list[str]:
    """Paths (``/``-separated, relative to their root) of the files ending in ``suffix`` under ``roots``, at any
    depth; with ``marker``, only those whose folder also holds ``marker`` (the Step-LLM tokenizer)."""
    found = set()
    for root in roots:
        if not os.path.isdir(root):
            continue
        for folder, _dirs, files in os.walk(root, followlinks=True):
            if marker is not None and marker not in files:
                continue
            rel = os.path.relpath(folder, root)
            found.update((name if rel == "." else f"{rel}/{name}").replace(os.sep, "/") for name in files
                         if name.endswith(suffix))
    return sorted(found)


def resolve_file(roots, name: str) -> str | None:
    """Path of a ``list_files`` value under the first root that has it, else None."""
    if not name or ".." in name.replace("\\", "/").split("/"):
        return None
    for root in roots:
        path = os.path.join(root, name)
        if os.path.isfile(path):
            return path
    return None
