"""The video shape rules (stepvideo_core/video_shape.py) against brute-force enumerations, and the JS copy."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from stepvideo_core import video_shape as vs

ROOT = Path(__file__).resolve().parents[1]


def test_latent_frames_follow_the_chunk_rule_and_invert():
    assert [vs.latent_frames(n) for n in (1, 17, 34, 51, 102, 136, 204)] == [1, 3, 6, 9, 18, 24, 36]
    assert vs.latent_frames(18) == 4 and vs.latent_frames(26) == 5  # trailing 1 / 9 frames, as the reference allows
    assert [vs.video_frames(n) for n in (1, 2, 3, 4, 5, 6, 36)] == [1, 9, 17, 18, 26, 34, 204]
    # Independently: the encodable counts are 17q, 17q + 1 and 17q + 9, and latent counts 3q, 3q + 1, 3q + 2.
    encodable = {17 * q + r for q in range(8) for r in (0, 1, 9)} - {0}
    assert {n for n in range(1, 130) if vs.encodable_frames(n)} == {n for n in encodable if n < 130}
    assert [vs.latent_frames(n) for n in sorted(encodable)] == list(range(1, len(encodable) + 1))
    for n in range(1, 120):
        if vs.encodable_frames(n):
            assert vs.video_frames(vs.latent_frames(n)) == n
        else:
            with pytest.raises(ValueError, match=rf"frames {n} must be a multiple of 17 \(nearest valid: "):
                vs.latent_frames(n)
    with pytest.raises(ValueError, match="at least one latent frame"):
        vs.video_frames(0)


def test_nearest_valid_is_the_closest_grid_values_within_the_limits():
    for step, low, high in ((16, 16, 4096), (17, 17, 1700), (1, 1, 64)):
        grid = range(low, high + 1, step)
        for value in range(-5, high + 40):
            below = [g for g in grid if g <= value]
            above = [g for g in grid if g >= value]
            expected = sorted({*below[-1:], *above[:1]})
            assert list(vs.nearest_valid(value, step, low, high)) == expected, (value, step)


def test_request_errors_name_every_problem_and_the_nearest_valid_values():
    assert vs.request_error(992, 544, 204) is None and vs.request_error(4096, 16, 1700, 64) is None
    assert vs.request_error(None, None, None, None) is None  # linked node inputs are checked when the graph runs
    cases = {
        (992, 544, 16): "frames 16 must be at least 17 (nearest valid: 17)",
        (992, 544, 18): "frames 18 must be a multiple of 17 (nearest valid: 17 or 34)",
        (992, 544, 0): "frames 0 must be at least 17 (nearest valid: 17)",
        (992, 544, 10_000): "frames 10000 must be at most 1700 (nearest valid: 1700)",
        (100_000, 544, 17): "width 100000 must be at most 4096 (nearest valid: 4096)",
        (1000, 544, 17): "width 1000 must be a multiple of 16 (nearest valid: 992 or 1008)",
        (992, 8, 17): "height 8 must be at least 16 (nearest valid: 16)",
        (992, 544.0, 17): "height 544.0 must be a whole number",
    }
    for (w, h, f), expected in cases.items():
        message = vs.request_error(w, h, f)
        assert message.startswith("Step-Video video shape: ") and expected in message, message
        with pytest.raises(ValueError) as err:
            vs.latent_grid(w, h, f)
        assert str(err.value) == message
    # one message for all problems, with why each kind of rule exists
    message = vs.request_error(8192, 540, 3400, 1000)
    for part in ("width 8192 must be at most 4096", "height 540 must be a multiple of 16 (nearest valid: 528 or 544)",
                 "frames 3400 must be at most 1700", "batch_size 1000 must be at most 64",
                 "17 video frames -> 3 latent frames", "one latent cell is 16x16 pixels"):
        assert part in message, (part, message)
    assert "latent frames" not in vs.request_error(1000, 544, 17)  # only the reasons that apply
    assert "batch_size 0 must be at least 1" in vs.request_error(992, 544, 17, 0)


def test_latent_grid_and_size():
    assert vs.latent_grid(992, 544, 204) == (36, 34, 62)
    assert vs.latent_grid(544, 992, 17, 2) == (3, 62, 34)
    assert vs.latent_size(544, 992) == (34, 62)
    assert vs.latent_size(16, 16 * 500) == (1, 500)  # the VAE itself has no upper limit
    with pytest.raises(ValueError, match=r"height 540 must be a multiple of 16 \(nearest valid: 528 or 544\)"):
        vs.latent_size(540, 960)
    with pytest.raises(ValueError, match=r"width 8 must be at least 16 \(nearest valid: 16\)"):
        vs.latent_size(32, 8)


def test_the_frontend_copy_mirrors_the_python_rules():
    js = (ROOT / "js" / "stepvideo.js").read_text(encoding="utf-8")
    assert "stepvideo_core/video_shape.py" in js

    def const(name: str) -> int:
        return int(re.search(rf"const {name} = (\d+);", js).group(1))

    assert const("SPATIAL") == vs.SPATIAL_FACTOR
    assert const("CHUNK_FRAMES") == vs.FRAMES_PER_CHUNK
    assert const("CHUNK_LATENTS") == vs.LATENTS_PER_CHUNK
    assert const("MAX_TRAINED_FRAMES") == vs.TRAINED_FRAMES
    assert const("MAX_SIDE") == vs.MAX_SIDE
    assert const("MAX_FRAMES") == vs.MAX_FRAMES
    # the snapping notes use the Python messages' wording for each rule
    for phrase in ("must be a multiple of", "must be at least", "must be at most"):
        assert phrase in js


def test_encoded_grid_names_frame_and_size_problems_together():
    assert vs.encoded_grid(204, 544, 992) == (36, 34, 62) and vs.encoded_grid(1, 16, 16) == (1, 1, 1)
    with pytest.raises(ValueError) as err:
        vs.encoded_grid(20, 40, 32)
    message = str(err.value)
    assert "height 40 must be a multiple of 16 (nearest valid: 32 or 48)" in message
    assert "frames 20 must be a multiple of 17 (nearest valid: 17 or 34)" in message
    assert "width" not in message.split(".")[0] and "trailing 1 or 9 frames" in message
