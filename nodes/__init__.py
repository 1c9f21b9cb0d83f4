"""ComfyUI nodes of the Step-Video pack, one module per node family.

Only ``conversions``, ``validation``, ``previews`` and ``model_folders`` are importable without ComfyUI; every other module imports ``comfy`` and is loaded by the pack's
``comfy_entrypoint``. Nothing is imported here, so importing this package never touches ComfyUI.
"""
