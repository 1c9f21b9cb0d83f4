"""Import the official Step-Video-T2V (or -TI2V) code from a checkout outside this repository, for parity tests.

Set ``STEPVIDEO_REFERENCE`` to the T2V checkout's root (the folder that holds ``stepvideo/``), and
``STEPVIDEO_TI2V_REFERENCE`` to the TI2V one. Both name their package ``stepvideo``, so switching checkouts drops the
other's modules from ``sys.modules`` first. Its heavy,
GPU-only or network dependencies (xfuser, diffusers' config machinery, imageio) are replaced by minimal
stand-ins here; the model code itself is imported unmodified. Tests using it skip when the variable is unset.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import os
import sys
import types
from pathlib import Path

import pytest
from torch import nn

ENV_VAR = "STEPVIDEO_REFERENCE"
TI2V_ENV_VAR = "STEPVIDEO_TI2V_REFERENCE"


def _stub(name: str, **attrs) -> types.ModuleType:
    module = sys.modules.get(name) or types.ModuleType(name)
    module.__dict__.update(attrs)
    sys.modules[name] = module
    return module


def _register_to_config(init):
    @functools.wraps(init)
    def wrapper(self, *args, **kwargs):
        bound = inspect.signature(init).bind(self, *args, **kwargs)
        bound.apply_defaults()
        values = {k: v for k, v in bound.arguments.items() if k != "self"}
        object.__setattr__(self, "config", types.SimpleNamespace(**values))
        return init(self, *args, **kwargs)

    return wrapper


class _ConfigMixin:
    pass


def _install_stubs(root: Path) -> None:
    if "stepvideo" in sys.modules and getattr(sys.modules["stepvideo"], "__reference_root__", None) == str(root):
        return
    for name in [n for n in sys.modules if n == "stepvideo" or n.startswith("stepvideo.")]:
        del sys.modules[name]  # the other checkout's modules
    other = [p for p in sys.path if (Path(p) / "stepvideo").is_dir() and Path(p) != root]
    for p in other:
        sys.path.remove(p)
    pkg = types.ModuleType("stepvideo")
    pkg.__path__ = [str(root / "stepvideo")]  # a package without running its __init__ (which pulls in the pipeline)
    pkg.__reference_root__ = str(root)
    sys.modules["stepvideo"] = pkg
    # Bare package: text_encoder/__init__.py parses sys.argv and tries to load the closed CUDA kernel.
    text_pkg = types.ModuleType("stepvideo.text_encoder")
    text_pkg.__path__ = [str(root / "stepvideo" / "text_encoder")]
    sys.modules["stepvideo.text_encoder"] = text_pkg
    import transformers.modeling_utils as hf_modeling  # transformers 5 no longer re-exports the config class here

    if not hasattr(hf_modeling, "PretrainedConfig"):
        import transformers

        hf_modeling.PretrainedConfig = transformers.PretrainedConfig
    _stub("imageio")
    _stub("xfuser")
    _stub("diffusers")
    _stub("diffusers.configuration_utils", ConfigMixin=_ConfigMixin, register_to_config=_register_to_config)
    _stub("diffusers.models")
    _stub("diffusers.models.modeling_utils", ModelMixin=nn.Module)
    for name in ("xfuser.model_executor", "xfuser.model_executor.models", "xfuser.model_executor.models.customized",
                 "xfuser.model_executor.models.customized.step_video_t2v"):
        _stub(name)
    # At HEAD the DiT imports its blocks from xfuser; the local copies in the checkout are numerically identical.
    blocks = importlib.import_module("stepvideo.modules.blocks")
    norms = importlib.import_module("stepvideo.modules.normalization")
    sys.modules["xfuser.model_executor.models.customized.step_video_t2v.blocks"] = blocks
    sys.modules["xfuser.model_executor.models.customized.step_video_t2v.normalization"] = norms


def reference_root(env_var: str = ENV_VAR) -> Path:
    root = os.environ.get(env_var)
    if not root:
        what = "Step-Video-TI2V" if env_var == TI2V_ENV_VAR else "Step-Video-T2V"
        pytest.skip(f"{env_var} is not set (path to a {what} checkout)")
    path = Path(root)
    if not (path / "stepvideo").is_dir():
        pytest.fail(f"{env_var}={root} does not contain a stepvideo/ package")
    return path


def import_reference(module: str, env_var: str = ENV_VAR) -> types.ModuleType:
    """Import ``stepvideo.<module>`` from the reference checkout, e.g. ``import_reference('modules.model')``;
    ``env_var=TI2V_ENV_VAR`` for the TI2V checkout."""
    root = reference_root(env_var)
    _install_stubs(root)
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    return importlib.import_module(f"stepvideo.{module}")
