"""Step-Video-Tiny, the built-in model, and the lab that trains and scores it.

``model`` (configs and the loader of the shipped weights), ``synthetic`` (the world of coloured shapes and its
captions), ``oracle`` (reads shape, colour and motion back from pixels), ``train`` (the staged recipe),
``evaluate`` (held-out scores) and ``dpo`` (the Video-DPO LoRA). Nothing outside this subpackage imports it,
except the CLI and the nodes, which need to know where the built-in model lives.
"""
