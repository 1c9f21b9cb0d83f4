"""Fixtures for every test (tests/host/conftest.py adds ComfyUI's)."""

from __future__ import annotations

import os

import pytest


@pytest.fixture(scope="session", autouse=True)
def private_stepvideo_cache(tmp_path_factory):
    """The CLI's text cache (and anything else under STEPVIDEO_CACHE_DIR) goes to a folder of this test session,
    never to the user's cache folder; subprocesses inherit it."""
    before = os.environ.get("STEPVIDEO_CACHE_DIR")
    os.environ["STEPVIDEO_CACHE_DIR"] = str(tmp_path_factory.mktemp("stepvideo_cache"))
    yield
    if before is None:
        os.environ.pop("STEPVIDEO_CACHE_DIR", None)
    else:
        os.environ["STEPVIDEO_CACHE_DIR"] = before
