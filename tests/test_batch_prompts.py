"""``generate --prompts FILE``: the prompt file, what names each video, the gallery page, and whole runs."""

from __future__ import annotations

import html
import re
from pathlib import Path

import pytest

from stepvideo_core import batch, generate
from stepvideo_core.tiny import model as tiny

EVAL_PROMPTS = Path("/work/shared/data/step-video-t2v-eval-prompts.txt")
DPO_LORA = tiny.TINY_DIR.parent / "loras" / "step-video-tiny-dpo.safetensors"


def test_prompt_file_one_a_line_with_blank_and_comment_lines_skipped(tmp_path):
    f = tmp_path / "p.txt"
    f.write_bytes("\ufeffa red circle\r\n\r\n  # a note\n  一只熊猫  \nlast line without newline".encode())
    assert batch.read_prompts(f) == ["a red circle", "一只熊猫", "last line without newline"]
    (tmp_path / "empty.txt").write_text("\n# only a comment\n")
    with pytest.raises(ValueError, match="holds no prompt"):
        batch.read_prompts(tmp_path / "empty.txt")
    with pytest.raises(FileNotFoundError, match="one prompt a line"):
        batch.read_prompts(tmp_path / "missing.txt")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9\n".encode("latin-1"))
    with pytest.raises(ValueError, match="not UTF-8"):
        batch.read_prompts(tmp_path / "latin1.txt")


@pytest.mark.skipif(not EVAL_PROMPTS.is_file(), reason=f"the official eval prompt file is not at {EVAL_PROMPTS}")
def test_the_official_eval_prompt_file_reads_as_it_is():
    prompts = batch.read_prompts(EVAL_PROMPTS)
    lines = EVAL_PROMPTS.read_text(encoding="utf-8").splitlines()
    assert prompts == [line.strip() for line in lines if line.strip()]
    assert len(prompts) == 128 and len(set(prompts)) == 128


def test_gallery_escapes_prompts_and_file_names(tmp_path):
    evil = '<script>alert("x")</script> & <img src=x onerror=alert(1)>'
    item = batch.GalleryItem(evil, tmp_path / 'a "b" <c>.mp4', tmp_path / "a&b.png")
    page = batch.gallery_html("title <b>", [item], tmp_path, settings_line="seed <0>")
    assert "<script" not in page and "onerror=alert" not in page.replace(html.escape("onerror=alert"), "")
    assert html.escape(evil) in page
    assert "<b>" not in page.replace("<b>1.</b>", "")  # the only markup is the page's own
    srcs = re.findall(r'src="([^"]*)"', page)
    assert srcs == ["a%20%22b%22%20%3Cc%3E.mp4", "a%26b.png"]  # quoted, so no attribute can be closed


def stem_for(*argv: str) -> str:
    args = generate.build_parser().parse_args(["x", *argv])
    paths = generate.ModelPaths.from_args(args)
    settings = generate.resolve_settings(args, is_tiny=True)
    return batch.output_stem("tiny", args.prompt, generate.output_settings(args, paths, settings, weight_dtype=None))


def test_every_setting_that_changes_the_video_changes_its_name():
    base = stem_for()
    assert stem_for() == base
    variants = [("--seed", "1"), ("--width", "144"), ("--frames", "34"), ("--steps", "3"), ("--cfg", "4"),
                ("--shift", "2"), ("--negative", "blurry"), ("--lora", str(DPO_LORA)),
                ("--dit", str(tiny.TI2V_DIR / "transformer")), ("--cache", "0.3"), ("--tile-size", "8"),
                ("--attention", "math")]
    stems = {v: stem_for(*v) for v in variants}
    assert base not in stems.values() and len(set(stems.values())) == len(variants), stems
    assert stem_for("--lora", str(DPO_LORA), "--lora-strength", "0.5") != stems[("--lora", str(DPO_LORA))]
    args = generate.build_parser().parse_args(["x"])
    settings = generate.resolve_settings(args, is_tiny=True)
    paths = generate.ModelPaths.from_args(args)
    key = generate.output_settings(args, paths, settings, weight_dtype=None)
    assert batch.output_stem("tiny", "y", key) != batch.output_stem("tiny", "x", key)


def outputs(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}


@pytest.mark.slow
def test_three_prompts_render_once_and_a_changed_setting_renders_again(tmp_path, monkeypatch):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a blue square moves right\n红色的圆形向左移动\na green triangle grows\n", encoding="utf-8")
    out = tmp_path / "out"
    argv = ["--prompts", str(prompts), "--steps", "1", "--out", str(out), "--text-cache", str(tmp_path / "cache")]
    done = generate.run_batch(generate.build_parser().parse_args(argv))
    first = outputs(out)
    assert sorted(Path(n).suffix for n in first) == [".html", *[".mp4"] * 3, *[".png"] * 3]
    page = (out / "index.html").read_text(encoding="utf-8")
    assert [v["mp4"].name for v in done["videos"]] == re.findall(r'video src="([^"]+)"', page)
    assert "红色的圆形向左移动" in page and len(list((tmp_path / "cache").glob("*.safetensors"))) == 3

    def must_not_load(*a, **k):
        raise AssertionError("a rerun with every output present loaded a model")

    for name in ("load_text_encoders", "load_dit", "load_vae"):
        monkeypatch.setattr(generate, name, must_not_load)
    again = generate.run_batch(generate.build_parser().parse_args(argv))
    assert again["videos"] == [] and len(again["skipped"]) == 3
    assert outputs(out) == first, "a second run wrote or touched a file"

    monkeypatch.undo()
    encoded = []
    monkeypatch.setattr(generate, "load_text_encoders",
                        lambda *a, **k: encoded.append(a) or must_not_load())  # every prompt is in the text cache
    changed = generate.run_batch(generate.build_parser().parse_args([*argv, "--seed", "5"]))
    assert len(changed["videos"]) == 3 and not encoded
    new = set(outputs(out)) - set(first)
    assert len(new) == 6 and all(n.endswith((".mp4", ".png")) for n in new)
    assert all(first[n] == outputs(out)[n] for n in first if n != "index.html"), "older videos are kept as they were"
