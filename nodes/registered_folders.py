"""Model folders: the standard ComfyUI ones plus ``models/stepvideo/`` for the official multi-file download, and
the pack's own ``models/`` (the built-in Step-Video-Tiny) as one more ``stepvideo`` root."""

from __future__ import annotations

import os

import folder_paths

from . import model_folders, validation

SAFETENSORS = {".safetensors", ".sft"}


def register_folders() -> None:
    """Make sure our folders exist in ComfyUI's registry with explicit extensions. The pack's node list calls it once,
    when ComfyUI loads the pack (idempotent all the same)."""
    for name in ("diffusion_models", "text_encoders", "vae", "loras"):
        if name in folder_paths.folder_names_and_paths:
            paths, exts = folder_paths.folder_names_and_paths[name]
            exts = set(exts) | SAFETENSORS if exts else set(folder_paths.supported_pt_extensions)
            folder_paths.folder_names_and_paths[name] = (paths, exts)
        else:
            path = os.path.join(folder_paths.models_dir, name)
            folder_paths.folder_names_and_paths[name] = ([path], set(folder_paths.supported_pt_extensions))
    if "stepvideo" not in folder_paths.folder_names_and_paths:
        folder_paths.folder_names_and_paths["stepvideo"] = ([os.path.join(folder_paths.models_dir, "stepvideo")],
                                                            set(SAFETENSORS))
    # Last, so a user's own download of the same name wins; listed whether or not models/stepvideo exists.
    folder_paths.add_model_folder_path("stepvideo", model_folders.BUILTIN_MODELS_DIR)
    # The shipped Video-DPO LoRA for the tiny model, in every LoRA loader (ours and ComfyUI's core ones).
    folder_paths.add_model_folder_path("loras", os.path.join(model_folders.BUILTIN_MODELS_DIR, "loras"))


def stepvideo_roots() -> list[str]:
    return folder_paths.get_folder_paths("stepvideo")


# ---- DiT -----------------------------------------------------------------------------------------------------

DIT_WHERE = "models/diffusion_models (.safetensors or .gguf) or models/stepvideo/<download>/transformer"


def dit_choices() -> list[str]:
    roots = stepvideo_roots()
    files = [f for f in folder_paths.get_filename_list("diffusion_models") if f.endswith((".safetensors", ".sft"))]
    # .gguf files are listed here rather than registered as a diffusion_models extension, so core loaders that
    # cannot read them do not offer them.
    files += model_folders.list_files(folder_paths.get_folder_paths("diffusion_models"))
    return (model_folders.list_official(roots, "transformer") + model_folders.list_official_files(roots, "transformer")
            + sorted(files))


def model_path(name: str, folder: str) -> str | None:
    """A combo value: an official-layout entry under models/stepvideo, else a file in ComfyUI's ``folder``."""
    if name.startswith(model_folders.OFFICIAL_PREFIX):
        found = model_folders.resolve_official(stepvideo_roots(), name)
        if found:
            return found
    if name.endswith(model_folders.GGUF_SUFFIX):
        return model_folders.resolve_file(folder_paths.get_folder_paths(folder), name)
    return folder_paths.get_full_path(folder, name)


def dit_path(name: str) -> str | None:
    return model_path(name, "diffusion_models")


# ---- text encoders -----------------------------------------------------------------------------------------------

STEP_LLM_WHERE = ("models/text_encoders/<folder> (with step1_chat_tokenizer.model; a .gguf in it is listed too) or "
                  "models/stepvideo/<download>/step_llm")
CLIP_WHERE = "models/text_encoders/<folder> (with clip_text_encoder/) or models/stepvideo/<download>/hunyuan_clip"


def step_llm_choices() -> list[str]:
    roots, encoders = stepvideo_roots(), folder_paths.get_folder_paths("text_encoders")
    return (model_folders.list_official(roots, "step_llm") + model_folders.list_official_files(roots, "step_llm")
            + model_folders.list_subfolders(encoders, model_folders.STEP_LLM_MARKER)
            + model_folders.list_files(encoders, marker=model_folders.STEP_LLM_MARKER))


def hunyuan_clip_choices() -> list[str]:
    return (model_folders.list_official(stepvideo_roots(), "hunyuan_clip")
            + model_folders.list_subfolders(folder_paths.get_folder_paths("text_encoders"), model_folders.HUNYUAN_CLIP_MARKER))


def text_encoder_path(name: str) -> str | None:
    if name.startswith(model_folders.OFFICIAL_PREFIX):
        found = model_folders.resolve_official(stepvideo_roots(), name)
        if found and (os.path.isdir(found) or found.endswith(model_folders.GGUF_SUFFIX)):
            return found
    if name.endswith(model_folders.GGUF_SUFFIX):
        return model_folders.resolve_file(folder_paths.get_folder_paths("text_encoders"), name)
    return model_folders.resolve_subfolder(folder_paths.get_folder_paths("text_encoders"), name)


# ---- VAE ----------------------------------------------------------------------------------------------------------

VAE_WHERE = "models/vae or models/stepvideo/<download>/vae/vae_v2.safetensors"


def vae_choices() -> list[str]:
    files = [f for f in folder_paths.get_filename_list("vae") if f.endswith((".safetensors", ".sft"))]
    return model_folders.list_official(stepvideo_roots(), "vae/vae_v2.safetensors", check=os.path.isfile) + sorted(files)


def vae_path(name: str) -> str | None:
    return model_path(name, "vae")


# ---- LoRA ---------------------------------------------------------------------------------------------------------

LORA_WHERE = "models/loras"


def lora_choices() -> list[str]:
    return folder_paths.get_filename_list("loras")


def lora_path(name: str) -> str | None:
    return folder_paths.get_full_path("loras", name)


def lora_input_error(lora_name: str | None, strength: float | None) -> bool | str:
    """``validate_inputs`` of every LoRA loader: True, or what is wrong with the file choice or the strength."""
    if lora_name is not None and lora_path(lora_name) is None:
        return validation.not_found("LoRA", lora_name, LORA_WHERE)
    low, high = validation.LORA_STRENGTH_RANGE
    if strength is not None and not low <= strength <= high:
        return f"strength {strength} must be between {low:g} and {high:g}"
    return True


def lora_file(lora_name: str) -> str:
    """The LoRA file behind a combo value; a clear error when it has gone since the graph was queued."""
    path = lora_path(lora_name)
    if path is None:
        raise FileNotFoundError(validation.not_found("LoRA", lora_name, LORA_WHERE))
    return path
