"""The command line: its checks, its outputs, and the same latents from one process and from torchrun."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file, save_file

from stepvideo_core import generate
from stepvideo_core.dit import DiTConfig, StepVideoDiT
from stepvideo_core.pipeline import sample_latents
from stepvideo_core.text_encoding import encode_prompts
from stepvideo_core.tiny import model as tiny
from stepvideo_core.video_shape import request_error
from tests.builders import randomize

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cli_error(capsys, *argv) -> str:
    with pytest.raises(SystemExit) as e:
        generate.main(list(argv))
    assert e.value.code == 2
    return capsys.readouterr().err


def test_bad_values_get_the_nodes_messages_before_anything_loads(capsys):
    err = cli_error(capsys, "x", "--frames", "16", "--width", "100")
    assert err == f"error: {request_error(100, 128, 16)}\n", "the nodes' message, word for word"
    assert "width 100 must be a multiple of 16 (nearest valid: 96 or 112)" in err
    assert "shift 0 is out of range: use a number from 0.01 to 100" in cli_error(capsys, "x", "--shift", "0")
    assert "threshold must be >= 0" in cli_error(capsys, "x", "--cache", "-1")
    assert "--ff-chunk-size -5" in cli_error(capsys, "x", "--ff-chunk-size", "-5")
    assert "overlap of at most half a tile" in cli_error(capsys, "x", "--tile-size", "4", "--tile-overlap", "3")
    err = cli_error(capsys, "x", "--model", "/nonexistent/stepvideo-t2v")
    assert "step_llm (/nonexistent/stepvideo-t2v/step_llm)" in err and "--dit/--step-llm/--clip/--vae" in err


def test_defaults_follow_the_model_and_flags_override_the_preset():
    args = generate.build_parser().parse_args(["x", "--steps", "7"])
    s = generate.resolve_settings(args, is_tiny=True)
    assert (s.width, s.height, s.num_frames, s.steps, s.cfg, s.shift) == (128, 128, 17, 7, 5.0, 3.0)
    args = generate.build_parser().parse_args(["x", "--preset", "turbo", "--cfg", "6"])
    s = generate.resolve_settings(args, is_tiny=False)
    assert (s.width, s.height, s.num_frames, s.steps, s.cfg, s.shift) == (992, 544, 204, 10, 6.0, 17.0)


@pytest.mark.slow
def test_cli_latents_are_the_pipelines_and_the_video_is_written(tmp_path):
    latents_file = tmp_path / "a.safetensors"
    written = generate.run(generate.build_parser().parse_args(
        ["a red circle moves left", "--seed", "3", "--steps", "3", "--out", str(tmp_path),
         "--out-latents", str(latents_file)]))
    model = tiny.load_tiny()
    with torch.no_grad():
        pos, neg = encode_prompts(model.text, "a red circle moves left", after="release")
        want = sample_latents(model.dit, pos, neg, replace(tiny.SETTINGS, steps=3, seed=3))
    assert torch.equal(load_file(latents_file)["latents"], want)
    assert written["mp4"].stat().st_size > 0 and written["png"].stat().st_size > 0


def torchrun(nproc: int, *argv: str) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "stepvideo_core.generate", *argv]
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]


def assert_same_latents(a_file, b_file):
    a, b = load_file(a_file)["latents"], load_file(b_file)["latents"]
    err = (a - b).abs().max().item()
    assert err <= 1e-5 * a.abs().max().item(), f"max |diff| {err:.3g} vs max |ref| {a.abs().max():.3g}"


@pytest.mark.slow
@pytest.mark.parametrize("nproc", [2, 3])
def test_torchrun_gives_the_single_process_latents_tiny(tmp_path, nproc):
    """2 processes: guidance parallel; 3: sequence parallel, as a ring (Step-Video-Tiny's 4 heads do not split 3 ways)."""
    common = ["a red circle moves left", "--seed", "3", "--steps", "6", "--out", str(tmp_path)]
    generate.main([*common, "--out-latents", str(tmp_path / "A.safetensors")])
    torchrun(nproc, *common, "--out-latents", str(tmp_path / "B.safetensors"))
    assert_same_latents(tmp_path / "A.safetensors", tmp_path / "B.safetensors")


@pytest.mark.slow
def test_torchrun_sharded_weights_give_the_single_process_latents_reduced_model(tmp_path):
    """A random-weight DiT with 6 heads (tiny's text and latent widths, so tiny's encoders and VAE serve it),
    its blocks sharded over 2 ranks with sequence parallel (guidance off), against one process."""
    torch.manual_seed(0)
    dit = StepVideoDiT(DiTConfig(num_attention_heads=6, attention_head_dim=16, in_channels=16, out_channels=16,
                                 num_layers=3, caption_channels=(128, 128)))
    save_file(randomize(dit, seed=4, scale=0.1), tmp_path / "dit.safetensors")
    common = ["a green square moves up", "--dit", str(tmp_path / "dit.safetensors"), "--preset", "tiny",
              "--steps", "4", "--width", "96", "--height", "80", "--frames", "17", "--out", str(tmp_path)]
    generate.main([*common, "--out-latents", str(tmp_path / "A.safetensors")])
    torchrun(2, *common, "--shard-weights", "--guidance-parallel", "off", "--out-latents", str(tmp_path / "B.safetensors"))
    assert_same_latents(tmp_path / "A.safetensors", tmp_path / "B.safetensors")


@pytest.mark.slow
def test_torchrun_takes_a_start_image_like_one_process(tmp_path):
    """TI2V under torchrun: rank 0 encodes the start image, every rank samples with it (guidance parallel on 2)."""
    image = os.path.join(REPO, "workflows", "inputs", "step_video_tiny_ti2v_start.png")
    common = ["a red circle moves left", "--dit", str(tiny.TI2V_DIR / "transformer"), "--image", image, "--seed", "3",
              "--steps", "3", "--out", str(tmp_path)]
    generate.main([*common, "--out-latents", str(tmp_path / "A.safetensors")])
    torchrun(2, *common, "--out-latents", str(tmp_path / "B.safetensors"))
    assert_same_latents(tmp_path / "A.safetensors", tmp_path / "B.safetensors")
