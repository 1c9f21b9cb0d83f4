"""LoRA training for Step-Video DiTs (the release, Turbo, TI2V and Step-Video-Tiny): supervised flow matching and
Video-DPO, from a folder of clips, on one process or several (``python -m stepvideo_core.train_lora``).

``data`` finds the clips and their captions and fits each to a bucket of the model's shape rules; ``cache``
encodes latents and text once to safetensors; ``losses`` holds the objectives; ``trainer`` runs the loop on the
cached data with the base DiT frozen and the adapters of ``stepvideo_core.lora`` as the only trained weights.
"""
