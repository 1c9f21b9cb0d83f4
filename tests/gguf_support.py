"""The gguf package for the GGUF tests: on CI (CI=true) a missing package is a broken install and the tests fail;
elsewhere they are skipped with the install line."""

from __future__ import annotations

import os

import pytest


def require_gguf():
    try:
        import gguf
    except ImportError:
        if os.environ.get("CI", "").lower() == "true":
            raise
        pytest.skip("gguf is not installed (pip install 'gguf>=0.19')", allow_module_level=True)
    return gguf
