"""The synthetic world and its oracle: the oracle must read ground-truth clips right and catch wrong ones."""

import random

import numpy as np
import pytest

from stepvideo_core.tiny import oracle, synthetic


def render_all(combos) -> list:
    rng = random.Random(3)
    out = []
    for colour, shape, motion in combos:
        scene = synthetic.scene_for(colour, shape, motion, rng)
        out.append((scene, synthetic.render(scene)))
    return out


@pytest.fixture(scope="module")
def diagonal():
    """Seven clips that show every colour, every shape and every motion at least once (the oracle takes ~0.2 s
    per clip on a CPU core, so the full sweep of all combinations is a slow test)."""
    axes = [list(synthetic.COLOURS), list(synthetic.SHAPES), list(synthetic.MOTIONS)]
    n = max(map(len, axes))
    return render_all(tuple(axis[i % len(axis)] for axis in axes) for i in range(n))


def assert_reads_right(clips) -> None:
    for scene, frames in clips:
        s = oracle.score(frames, scene.objects[0])
        assert (s.colour, s.shape, s.motion) == (True, True, True), (scene.objects[0].combo, s.detection)
        assert s.artifacts < 0.05


def test_oracle_reads_every_colour_shape_and_motion(diagonal):
    assert {scene.objects[0].combo[i] for scene, _ in diagonal for i in range(3)} >= {
        *synthetic.COLOURS, *synthetic.SHAPES, *synthetic.MOTIONS}
    assert_reads_right(diagonal)


@pytest.mark.slow
def test_oracle_reads_every_ground_truth_combination():
    assert_reads_right(render_all((c, s, m) for c in synthetic.COLOURS for s in synthetic.SHAPES
                                  for m in synthetic.MOTIONS))


@pytest.mark.slow
def test_oracle_rejects_wrong_targets(diagonal):
    opposite = {"left": "right", "right": "left", "up": "down", "down": "up", "grow": "shrink", "shrink": "grow",
                "still": "left"}
    for scene, frames in diagonal:
        colour, shape, motion = scene.objects[0].combo
        other_colour = next(c for c in synthetic.COLOURS if c != colour)
        other_shape = next(s for s in synthetic.SHAPES if s != shape)
        assert not oracle.score(frames, (other_colour, shape, motion)).colour
        assert not oracle.score(frames, (colour, other_shape, motion)).shape
        assert not oracle.score(frames, (colour, shape, opposite[motion])).motion


def test_oracle_sees_noise_as_artifacts(diagonal):
    scene, frames = diagonal[0]
    rng = np.random.default_rng(0)
    noisy = np.clip(frames.astype(int) + rng.integers(-90, 90, frames.shape), 0, 255).astype(np.uint8)
    assert oracle.score(noisy, scene.objects[0]).artifacts > 5 * oracle.score(frames, scene.objects[0]).artifacts + 0.05


def test_held_out_combinations_never_appear_in_training_scenes():
    rng = random.Random(0)
    combos = synthetic.training_combos()
    assert len(synthetic.HELD_OUT) == 18 and not set(combos) & synthetic.HELD_OUT
    seen = {o.combo for _ in range(3000) for o in synthetic.make_scene(rng, combos).objects}
    assert seen == set(combos)
    # every single attribute value still appears in training, only the combinations are new
    for i, values in enumerate((synthetic.COLOURS, synthetic.SHAPES, synthetic.MOTIONS)):
        assert {c[i] for c in seen} == set(values)


def test_captions_are_bilingual_and_name_the_object():
    rng = random.Random(1)
    scene = synthetic.scene_for("purple", "triangle", "shrink", rng, background="white")
    assert all("purple triangle" in c for c in scene.captions["en"])
    assert all("紫" in c and ("三角形" in c) for c in scene.captions["zh"])
    assert any("white" in c for c in scene.captions["en"]) and any("白色" in c for c in scene.captions["zh"])
    assert len(set(scene.captions["en"])) >= 3 and len(set(scene.captions["zh"])) >= 3


def test_moving_objects_stay_inside_the_frame():
    rng = random.Random(2)
    for _ in range(300):
        scene = synthetic.make_scene(rng, synthetic.training_combos())
        for obj in scene.objects:
            for t in (0.0, 1.0):
                x, y, half = obj.at(t)
                reach = 1.5 * half
                assert reach <= x <= synthetic.SIZE - reach and reach <= y <= synthetic.SIZE - reach
