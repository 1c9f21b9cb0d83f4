"""Static checks of the shipped workflows and locales (no ComfyUI needed; runs on CI).

They follow the node contract in ``tests/builders.py``: the pack's public interface as the workflows, the frontend
extension and the locales use it (node id -> socket inputs, widget inputs in order with ranges, outputs).
``tests/host/test_frontend.py`` compares it with the live ``/object_info`` of a real ComfyUI.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest

from stepvideo_core.tiny import model as tiny
from tests.builders import (
    CONTRACT,
    CORE_CONTRACT,
    TI2V_START_IMAGE,
    VIRTUAL_NODES,
    WORKFLOW_DIR,
    WORKFLOWS,
    spec,
    widget_names_with_control,
)

ROOT = Path(__file__).resolve().parents[1]
LOCALES = ROOT / "locales"

PACK_NODES = sorted(CONTRACT)

LOADERS_WITH_MODELS = {"StepVideoDiTLoader", "StepVideoTextEncoderLoader", "StepVideoVAELoader"}
MODEL_DIRECTORIES = {"stepvideo", "diffusion_models", "text_encoders", "vae", "loras"}
CONTROL_VALUES = {"fixed", "increment", "decrement", "randomize"}
OFFICIAL_PREFIX = "stepvideo/"  # combo values of the official layout: stepvideo/<download>/<part> (nodes/model_folders.py)
EXPECTED_WORKFLOWS = {"stepvideo_t2v_standard", "stepvideo_t2v_turbo", "stepvideo_t2v_low_memory",
                      "stepvideo_t2v_lora_swap", "step_video_tiny_demo", "step_video_tiny_dpo_swap",
                      "stepvideo_t2v_multi_gpu", "step_video_tiny_ti2v", "step_video_tiny_train_lora"}
BUILTIN_PREFIX = f"{OFFICIAL_PREFIX}{tiny.NAME}/"  # Step-Video-Tiny ships in the pack's models/: nothing to download
BUILTIN_TI2V_PREFIX = f"{OFFICIAL_PREFIX}{tiny.NAME}-ti2v/"  # and its image-to-video DiT beside it
# The Video-DPO LoRA for Step-Video-Tiny ships at models/loras/ (where `python -m stepvideo_core.tiny.dpo` writes it);
# nodes/registered_folders.py adds that folder to ComfyUI's "loras", so the LoRA loaders list it by its bare file name.
DPO_LORA = tiny.TINY_DIR.parent / "loras" / "step-video-tiny-dpo.safetensors"


def load(path: Path) -> dict:
    with path.open(encoding="utf-8") as f:
        return json.load(f)


def named_widgets(node: dict) -> dict:
    return dict(zip(widget_names_with_control(node["type"]), node["widgets_values"], strict=True))


def check_value(w: dict, value, where: str) -> None:
    kind = w["kind"]
    if kind == "combo":
        assert isinstance(value, str) and value, f"{where}: combo value must be a non-empty string, got {value!r}"
        if w["options"] is not None:
            assert value in w["options"], f"{where}: {value!r} not in {w['options']}"
    elif kind == "int":
        assert isinstance(value, int) and not isinstance(value, bool), f"{where}: expected an int, got {value!r}"
        assert w["min"] <= value <= w["max"], f"{where}: {value} outside [{w['min']}, {w['max']}]"
        if w["step"]:
            assert value % w["step"] == 0, f"{where}: {value} is not a multiple of {w['step']}"
    elif kind == "float":
        assert isinstance(value, int | float) and not isinstance(value, bool), f"{where}: expected a number"
        assert math.isfinite(value) and w["min"] <= value <= w["max"], f"{where}: {value} out of range"
    elif kind == "bool":
        assert isinstance(value, bool), f"{where}: expected a boolean, got {value!r}"
    elif kind == "string":
        assert isinstance(value, str), f"{where}: expected a string, got {value!r}"
    else:  # pragma: no cover
        raise AssertionError(kind)


# --------------------------------------------------------------------------------------------------------------------


def test_workflow_folder_layout():
    assert not (ROOT / "example_workflows").exists(), "ship one workflow folder only (workflows/), see host doc §12"
    for other in ("example", "examples", "workflow"):
        assert not (ROOT / other).exists(), f"{other}/ would also be globbed as a template folder"
    assert {p.stem for p in WORKFLOWS} >= EXPECTED_WORKFLOWS
    for p in WORKFLOWS:  # the template browser shows <name>.jpg as the card's thumbnail
        jpg = p.with_suffix(".jpg")
        assert jpg.exists() and jpg.read_bytes()[:3] == b"\xff\xd8\xff", f"{jpg.name}: missing or not a JPEG"


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_workflow_structure_and_links(path: Path):
    wf = load(path)
    assert wf.get("version") == 0.4
    # the frontend's zod schema wants a UUID here ("Invalid uuid at 'id'" alert otherwise)
    assert re.fullmatch(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", wf.get("id", "")), wf.get("id")
    nodes = {n["id"]: n for n in wf["nodes"]}
    assert len(nodes) == len(wf["nodes"]), "duplicate node ids"
    assert wf["last_node_id"] >= max(nodes)
    links = {}
    for link in wf["links"]:
        assert len(link) == 6, link
        lid, src, sslot, dst, dslot, typ = link
        assert lid not in links, f"duplicate link id {lid}"
        links[lid] = link
        assert src in nodes and dst in nodes, f"link {lid} points at a missing node"
        out = nodes[src]["outputs"][sslot]
        inp = nodes[dst]["inputs"][dslot]
        assert out["type"] == typ == inp["type"], f"link {lid}: type mismatch {out['type']}/{typ}/{inp['type']}"
        assert lid in (out.get("links") or []), f"link {lid} missing from node {src} output {sslot}"
        assert inp.get("link") == lid, f"link {lid} missing from node {dst} input {dslot}"
    assert wf["last_link_id"] >= max(links, default=0)
    # and the other way: every link id a node mentions exists and points back at that node/slot
    for node in nodes.values():
        for slot, out in enumerate(node.get("outputs", [])):
            for lid in out.get("links") or []:
                assert links[lid][1:3] == [node["id"], slot], f"node {node['id']} output {slot} lists link {lid}"
        for slot, inp in enumerate(node.get("inputs", [])):
            if inp.get("link") is not None:
                assert links[inp["link"]][3:5] == [node["id"], slot], f"node {node['id']} input {slot}"
    # orders are a permutation and respect the links (a valid execution order)
    orders = sorted(n["order"] for n in nodes.values())
    assert orders == list(range(len(nodes)))
    for _lid, src, _s, dst, _d, _t in wf["links"]:
        assert nodes[src]["order"] < nodes[dst]["order"]


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_workflow_nodes_match_contract(path: Path):
    wf = load(path)
    for node in wf["nodes"]:
        t = node["type"]
        where = f"{path.name} node {node['id']} ({t})"
        assert t in CONTRACT or t in CORE_CONTRACT, f"{where}: unknown node type"
        s = spec(t)
        assert [(i["name"], i["type"]) for i in node.get("inputs", []) if "widget" not in i] == s["sockets"], where
        assert [(o["name"], o["type"]) for o in node.get("outputs", [])] == s["outputs"], where
        for i, o in enumerate(node.get("outputs", [])):
            assert o.get("slot_index", i) == i, where
        values = node.get("widgets_values", [])
        assert len(values) == len(widget_names_with_control(t)), f"{where}: widgets_values {values!r}"
        named = named_widgets(node)
        for w in s["widgets"]:
            check_value(w, named[w["name"]], f"{where}.{w['name']}")
            if w.get("control"):
                assert named[w["name"] + ".control_after_generate"] in CONTROL_VALUES, where
            if w.get("upload"):
                assert named[w["name"] + ".upload"] == "image", where
        assert node.get("mode", 0) in (0, 2, 4), where
        if t not in VIRTUAL_NODES:
            props = node.get("properties", {})
            assert props.get("Node name for S&R") == t, where
            assert props.get("cnr_id") == ("comfyui-stepvideo" if t in CONTRACT else "comfy-core"), where
        for sock in node.get("inputs", []):
            if sock["name"] in {"model", "positive", "negative", "latent_image", "vae", "samples", "images", "video",
                                "text_encoders", "start_image"}:
                assert sock.get("link") is not None, f"{where}: required input {sock['name']} is not connected"


def _node_rules(node: dict, where: str) -> None:
    """Step-Video's own rules on the values (beyond the widget ranges)."""
    t, v = node["type"], named_widgets(node) if node["type"] in CONTRACT else {}
    if t in ("StepVideoEmptyLatent", "StepVideoImageToVideo"):
        assert v["width"] % 16 == 0 and v["height"] % 16 == 0 and v["frames"] % 17 == 0, where
        assert v["frames"] <= 204, f"{where}: more than the 204 frames the model was trained for"
    if t == "StepVideoVAEDecode":
        assert v["tile_size"] == 0 or 2 * v["tile_overlap"] <= v["tile_size"], f"{where}: overlap above half a tile"
    if t in ("StepVideoSampler", "StepVideoParallelSampler"):
        if v["preset"] == "standard":
            assert (v["steps"], v["cfg"], v["shift"]) == (50, 9.0, 13.0), where
        if v["preset"] == "turbo":
            assert 10 <= v["steps"] <= 15 and v["cfg"] == 5.0 and v["shift"] == 17.0, where
        if v["preset"] == "tiny":
            assert (v["steps"], v["cfg"], v["shift"]) == (tiny.SETTINGS.steps, tiny.SETTINGS.cfg, tiny.SETTINGS.shift), where
    if t == "CreateVideo":
        assert node["widgets_values"][0] == 25, f"{where}: Step-Video renders at 25 fps"


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_workflow_values_follow_stepvideo_rules(path: Path):
    wf = load(path)
    for node in wf["nodes"]:
        _node_rules(node, f"{path.name} node {node['id']}")
    types = [n["type"] for n in wf["nodes"]]
    assert "SaveVideo" in types and "CreateVideo" in types
    assert any(t in VIRTUAL_NODES for t in types), "each workflow carries a note for the artist"
    for n in wf["nodes"]:
        if n["type"] in VIRTUAL_NODES:
            assert len(n["widgets_values"][0]) > 200


def test_each_workflow_has_its_purpose():
    by = {p.stem: load(p) for p in WORKFLOWS}

    def nodes(name, t):
        return [named_widgets(n) for n in by[name]["nodes"] if n["type"] == t]

    (s,) = nodes("stepvideo_t2v_standard", "StepVideoSampler")
    assert (s["steps"], s["cfg"], s["shift"]) == (50, 9.0, 13.0)
    (lat,) = nodes("stepvideo_t2v_standard", "StepVideoEmptyLatent")
    assert {lat["width"], lat["height"]} == {544, 992} and lat["frames"] == 204
    (dec,) = nodes("stepvideo_t2v_standard", "StepVideoVAEDecode")
    assert dec["tile_size"] > 0

    (s,) = nodes("stepvideo_t2v_turbo", "StepVideoSampler")
    assert 10 <= s["steps"] <= 15 and s["cfg"] == 5.0 and s["shift"] == 17.0
    (d,) = nodes("stepvideo_t2v_turbo", "StepVideoDiTLoader")
    assert "turbo" in d["model_name"]
    (d,) = [n for n in by["stepvideo_t2v_turbo"]["nodes"] if n["type"] == "StepVideoDiTLoader"]
    assert all("stepfun-ai/stepvideo-t2v-turbo/" in m["url"] for m in d["properties"]["models"])

    (d,) = nodes("stepvideo_t2v_low_memory", "StepVideoDiTLoader")
    assert d["weight_dtype"].startswith("fp8")
    (te,) = nodes("stepvideo_t2v_low_memory", "StepVideoTextEncoderLoader")
    assert te["llm_dtype"].startswith("fp8") and te["device"] == "cpu"
    (dec,) = nodes("stepvideo_t2v_low_memory", "StepVideoVAEDecode")
    assert 0 < dec["tile_size"] < 16

    wf = by["stepvideo_t2v_lora_swap"]
    loras = [n for n in wf["nodes"] if n["type"] == "StepVideoLoraLoader"]
    samplers = [named_widgets(n) for n in wf["nodes"] if n["type"] == "StepVideoSampler"]
    assert len(loras) == 2 and len(samplers) == 2
    a, b = (named_widgets(n) for n in loras)
    assert (a["lora_name"], a["strength"]) != (b["lora_name"], b["strength"])
    assert len({(s["seed"], s["steps"], s["cfg"], s["shift"], s["preset"]) for s in samplers}) == 1
    # both LoRAs hang off the same (single) DiT loader: swapping never loads the base model twice
    dit_ids = [n["id"] for n in wf["nodes"] if n["type"] == "StepVideoDiTLoader"]
    assert len(dit_ids) == 1
    links = {lk[0]: lk for lk in wf["links"]}
    for n in loras:
        assert links[n["inputs"][0]["link"]][1] == dit_ids[0]
    # both samplers share one latent and one conditioning
    for name in ("positive", "negative", "latent_image"):
        srcs = {tuple(links[i["link"]][1:3]) for n in wf["nodes"] if n["type"] == "StepVideoSampler"
                for i in n["inputs"] if i["name"] == name}
        assert len(srcs) == 1, name
    prefixes = [n["widgets_values"][0] for n in wf["nodes"] if n["type"] == "SaveVideo"]
    assert len(set(prefixes)) == 2

    # several GPUs: the standard graph with the parallel DiT loader (a MODEL) in place of the single-GPU one
    (d,) = nodes("stepvideo_t2v_multi_gpu", "StepVideoParallelDiTLoader")
    assert d["devices"] == "all" and d["workers"] == 0 and d["model_name"] == "stepvideo/stepvideo-t2v/transformer"
    assert d["cluster"] == "local"
    (s,) = nodes("stepvideo_t2v_multi_gpu", "StepVideoSampler")
    assert s["preset"] == "standard"
    types = {n["type"] for n in by["stepvideo_t2v_multi_gpu"]["nodes"]}
    assert not types & {"StepVideoDiTLoader", "StepVideoParallelSampler", "StepVideoParallelLoraLoader"}
    assert {n["type"] for n in by["stepvideo_t2v_standard"]["nodes"]} - types == {"StepVideoDiTLoader"}

    # the install check: the built-in Step-Video-Tiny at what it was trained for
    (d,) = nodes("step_video_tiny_demo", "StepVideoDiTLoader")
    (te,) = nodes("step_video_tiny_demo", "StepVideoTextEncoderLoader")
    (v,) = nodes("step_video_tiny_demo", "StepVideoVAELoader")
    assert (d["model_name"], te["step_llm"], te["hunyuan_clip"], v["vae_name"]) == tuple(
        BUILTIN_PREFIX + part for part in ("transformer", "step_llm", "hunyuan_clip", "vae/vae_v2.safetensors"))
    (enc,) = nodes("step_video_tiny_demo", "StepVideoTextEncode")
    assert enc["prompt"] == "a blue square moves right"
    (lat,) = nodes("step_video_tiny_demo", "StepVideoEmptyLatent")
    t = tiny.SETTINGS
    assert (lat["width"], lat["height"], lat["frames"], lat["batch_size"]) == (t.width, t.height, t.num_frames, 1)
    (s,) = nodes("step_video_tiny_demo", "StepVideoSampler")
    assert s["preset"] == "tiny" and (s["steps"], s["cfg"], s["shift"]) == (t.steps, t.cfg, t.shift)
    assert s["seed"] == 0  # the seed `python -m stepvideo_core.generate` uses, so both give the same video
    (note,) = [n["widgets_values"][0] for n in by["step_video_tiny_demo"]["nodes"] if n["type"] == "MarkdownNote"]
    assert "install" in note and "Nothing is downloaded" in note


def test_train_lora_workflow_trains_on_the_shipped_clips_and_compares():
    wf = load(WORKFLOW_DIR / "step_video_tiny_train_lora.json")
    (train,) = [n for n in wf["nodes"] if n["type"] == "StepVideoTrainLora"]
    w = named_widgets(train)
    clips = ROOT / w["data_folder"]
    videos = sorted(clips.glob("*.mp4"))
    assert len(videos) >= 4 and all(v.with_suffix(".txt").read_text(encoding="utf-8").strip() for v in videos)
    assert sum(f.stat().st_size for f in clips.iterdir()) < 300_000  # the pack ships them: keep them small
    t = tiny.SETTINGS
    assert (w["width"], w["height"], w["frames"], w["shift"]) == (t.width, t.height, t.num_frames, t.shift)
    links = {lk[0]: lk for lk in wf["links"]}
    samplers = [n for n in wf["nodes"] if n["type"] == "StepVideoSampler"]
    sources = {wf_node["type"] for n in samplers for i in n["inputs"] if i["name"] == "model"
               for wf_node in wf["nodes"] if wf_node["id"] == links[i["link"]][1]}
    assert sources == {"StepVideoDiTLoader", "StepVideoTrainLora"}  # base and trained, same seed and settings
    assert len({json.dumps(n["widgets_values"]) for n in samplers}) == 1
    (enc,) = [named_widgets(n) for n in wf["nodes"] if n["type"] == "StepVideoTextEncode"]
    assert enc["prompt"] == videos[0].with_suffix(".txt").read_text(encoding="utf-8").strip()


def test_dpo_swap_workflow_renders_base_and_lora_side_by_side():
    """The same prompt, seed and latent sampled by the built-in Step-Video-Tiny and by the same DiT through the
    shipped Video-DPO LoRA at strength 1; Image Stitch puts base (left) and LoRA (right) side by side, unresampled."""
    wf = load(WORKFLOW_DIR / "step_video_tiny_dpo_swap.json")
    by_id = {n["id"]: n for n in wf["nodes"]}
    links = {lk[0]: lk for lk in wf["links"]}

    def of(t):
        return [n for n in wf["nodes"] if n["type"] == t]

    def source(node, name):
        (sock,) = [i for i in node["inputs"] if i["name"] == name]
        lk = links[sock["link"]]
        return by_id[lk[1]], lk[2]

    (d,), (te,), (v,) = of("StepVideoDiTLoader"), of("StepVideoTextEncoderLoader"), of("StepVideoVAELoader")
    d, te, v = named_widgets(d), named_widgets(te), named_widgets(v)
    assert (d["model_name"], te["step_llm"], te["hunyuan_clip"], v["vae_name"]) == tuple(
        BUILTIN_PREFIX + part for part in ("transformer", "step_llm", "hunyuan_clip", "vae/vae_v2.safetensors"))
    (enc,) = of("StepVideoTextEncode")
    assert named_widgets(enc)["prompt"] == "a purple triangle moves to the left"
    (lat,) = of("StepVideoEmptyLatent")
    t = tiny.SETTINGS
    assert tuple(named_widgets(lat).values()) == (t.width, t.height, t.num_frames, 1)

    # the LoRA is the shipped file, at full strength, on the one DiT loader
    (lora,) = of("StepVideoLoraLoader")
    lw = named_widgets(lora)
    assert lw["lora_name"] == DPO_LORA.name and lw["strength"] == 1.0
    assert source(lora, "model")[0]["type"] == "StepVideoDiTLoader"

    # two samplers, identical but for the model: the base DiT and the DiT + LoRA
    samplers = of("StepVideoSampler")
    assert len(samplers) == 2
    assert len({tuple(named_widgets(s).values()) for s in samplers}) == 1
    s = named_widgets(samplers[0])
    assert s["preset"] == "tiny" and (s["steps"], s["cfg"], s["shift"]) == (t.steps, t.cfg, t.shift)
    assert s["seed.control_after_generate"] == "fixed"  # a rerun renders the same pair
    for name in ("positive", "negative", "latent_image"):
        assert len({(source(n, name)[0]["id"], source(n, name)[1]) for n in samplers}) == 1, name
    models = {source(n, "model")[0]["type"]: n for n in samplers}
    assert set(models) == {"StepVideoDiTLoader", "StepVideoLoraLoader"}
    base, dpo = models["StepVideoDiTLoader"], models["StepVideoLoraLoader"]

    # one video: base | LoRA along the width, neither clip resized, no spacer (two 128-wide halves)
    (stitch,) = of("ImageStitch")
    sw = named_widgets(stitch)
    assert sw["direction"] == "right" and sw["match_image_size"] is False and sw["spacing_width"] == 0
    for slot, sampler in (("image1", base), ("image2", dpo)):
        decode, _ = source(stitch, slot)
        assert decode["type"] == "StepVideoVAEDecode" and source(decode, "samples")[0] is sampler, slot
    (create,) = of("CreateVideo")
    assert source(create, "images")[0] is stitch
    (save,) = of("SaveVideo")
    assert source(save, "video")[0] is create
    assert save["widgets_values"][0] == "video/step_video_tiny_dpo_swap"

    (note,) = [n["widgets_values"][0] for n in of("MarkdownNote")]
    assert "DPO" in note and "What to look for" in note and "left = base, right = DPO" in note
    assert "Strength **0 reproduces the base model exactly**" in note
    assert not re.search(r"</?[a-zA-Z]", note), "plain Markdown only, no HTML"


def test_ti2v_workflow_animates_the_shipped_start_image():
    """The built-in TI2V DiT with Step-Video-Tiny's encoders and VAE; the start image shipped with the pack goes
    through Step-Video Image to Video, whose two conditionings and latent are what the sampler takes."""
    wf = load(WORKFLOW_DIR / "step_video_tiny_ti2v.json")
    by_id = {n["id"]: n for n in wf["nodes"]}
    links = {lk[0]: lk for lk in wf["links"]}

    def of(t):
        (n,) = [n for n in wf["nodes"] if n["type"] == t]
        return n

    def source(node, name):
        (sock,) = [i for i in node["inputs"] if i["name"] == name]
        lk = links[sock["link"]]
        return by_id[lk[1]]["type"], lk[2]

    d, te, v = (named_widgets(of(t)) for t in ("StepVideoDiTLoader", "StepVideoTextEncoderLoader", "StepVideoVAELoader"))
    assert (d["model_name"], te["step_llm"], te["hunyuan_clip"], v["vae_name"]) == (
        BUILTIN_TI2V_PREFIX + "transformer", *(BUILTIN_PREFIX + p for p in ("step_llm", "hunyuan_clip",
                                                                          "vae/vae_v2.safetensors")))
    image = of("LoadImage")
    assert named_widgets(image)["image"] == TI2V_START_IMAGE.name
    assert TI2V_START_IMAGE.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    i2v = of("StepVideoImageToVideo")
    t = tiny.SETTINGS
    w = named_widgets(i2v)
    assert (w["width"], w["height"], w["frames"], w["motion_score"], w["batch_size"]) == (t.width, t.height,
                                                                                          t.num_frames, 5.0, 1)
    assert source(i2v, "start_image") == ("LoadImage", 0)
    assert source(i2v, "positive") == ("StepVideoTextEncode", 0) and source(i2v, "negative") == ("StepVideoTextEncode", 1)
    sampler = of("StepVideoSampler")
    assert [source(sampler, n) for n in ("positive", "negative", "latent_image")] == [
        ("StepVideoImageToVideo", 0), ("StepVideoImageToVideo", 1), ("StepVideoImageToVideo", 2)]
    s = named_widgets(sampler)
    assert s["preset"] == "tiny" and s["seed"] == 0 and s["seed.control_after_generate"] == "fixed"
    # Step-Video-Tiny TI2V learnt the T2V suffixes; the note points the official TI2V model at the ti2v set
    assert named_widgets(of("StepVideoTextEncode"))["suffixes"] == "t2v"
    note = named_widgets(of("MarkdownNote"))["text"]
    assert "motion_score" in note and "Nothing is downloaded" in note and "102 frames" in note
    assert "**suffixes** to **ti2v**" in note
    assert not re.search(r"</?[a-zA-Z]", note), "plain Markdown only, no HTML"


HF_URL = re.compile(r"^https://huggingface\.co/stepfun-ai/stepvideo-t2v(-turbo)?/resolve/main/[\w./-]+$")


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_workflow_models_metadata(path: Path):
    wf = load(path)
    for node in wf["nodes"]:
        models = node.get("properties", {}).get("models")
        where = f"{path.name} node {node['id']} ({node['type']})"
        builtin = [v for v in node.get("widgets_values", [])
                   if isinstance(v, str) and v.startswith((BUILTIN_PREFIX, BUILTIN_TI2V_PREFIX))]
        if builtin:
            assert not models, f"{where}: the built-in {builtin} must not offer a download"
        elif node["type"] in LOADERS_WITH_MODELS:
            assert models, f"{where}: properties.models lists nothing to download"
        if not models:
            continue
        names = set()
        for m in models:
            assert set(m) >= {"name", "url", "directory"}, where
            assert m["url"].startswith("https://"), where
            assert HF_URL.match(m["url"]), f"{where}: unexpected URL {m['url']}"
            assert m["directory"] in MODEL_DIRECTORIES, where
            assert m["name"] not in names, f"{where}: {m['name']} listed twice"
            names.add(m["name"])
            # the target path mirrors the repository layout under models/stepvideo/<repo>/
            if m["directory"] == "stepvideo":
                repo, rel = m["url"].split("stepfun-ai/")[1].split("/resolve/main/")
                assert m["name"] == f"{repo}/{rel}", where
        # The widget values name the official layout as stepvideo/<download>/<part>; the entries are the files of
        # that part relative to models/stepvideo/. (They deliberately never equal a widget value: the frontend's
        # missing-model dialog compares names with widget values and would otherwise always report them missing.)
        w = {k: v[len(OFFICIAL_PREFIX):] for k, v in named_widgets(node).items()
             if isinstance(v, str) and v.startswith(OFFICIAL_PREFIX)} if node["type"] in CONTRACT else {}
        if node["type"] == "StepVideoDiTLoader":
            assert w["model_name"].endswith("/transformer"), where
            assert all(n.startswith(w["model_name"] + "/") for n in names), where
            assert sum(n.endswith(".safetensors") for n in names) == 6, where
        if node["type"] == "StepVideoTextEncoderLoader":
            assert w["step_llm"].endswith("/step_llm") and w["hunyuan_clip"].endswith("/hunyuan_clip"), where
            assert sum(n.startswith(w["step_llm"] + "/") for n in names) == 12, where
            assert any(n.startswith(w["hunyuan_clip"] + "/clip_text_encoder/") for n in names), where
            assert any(n == w["hunyuan_clip"] + "/tokenizer/vocab.txt" for n in names), where
            assert any(n.endswith("step_llm/step1_chat_tokenizer.model") for n in names), where
        if node["type"] == "StepVideoVAELoader":
            assert w["vae_name"] in names and w["vae_name"].endswith("/vae/vae_v2.safetensors"), where
        widget_strings = {v for v in node.get("widgets_values", []) if isinstance(v, str)}
        assert not names & widget_strings, where


# --------------------------------------------------------------------------------------------------------------------
# locales


def _locale(lang: str) -> dict:
    """What the server's /i18n merges for one language: main.json, with nodeDefs.json under "nodeDefs"."""
    d = LOCALES / lang
    data = load(d / "main.json")
    if (d / "nodeDefs.json").exists():
        data["nodeDefs"] = load(d / "nodeDefs.json")
    return data


@pytest.mark.parametrize("lang", ["en", "zh"])
def test_locales_cover_every_node(lang: str):
    defs = _locale(lang)["nodeDefs"]
    for node_id, s in CONTRACT.items():
        assert node_id in defs, f"{lang}: {node_id} missing"
        d = defs[node_id]
        assert d.get("display_name", "").strip(), f"{lang}: {node_id} display_name"
        assert d.get("description", "").strip(), f"{lang}: {node_id} description"
        for name in [n for n, _ in s["sockets"]] + [w["name"] for w in s["widgets"]]:
            entry = d.get("inputs", {}).get(name)
            assert entry and entry.get("name", "").strip(), f"{lang}: {node_id}.inputs.{name}.name"
            assert entry.get("tooltip", "").strip(), f"{lang}: {node_id}.inputs.{name}.tooltip"
        outs = d.get("outputs", {})
        for i in range(len(s["outputs"])):
            assert outs.get(str(i), {}).get("name", "").strip(), f"{lang}: {node_id}.outputs.{i}"
        extra = set(d.get("inputs", {})) - {n for n, _ in s["sockets"]} - {w["name"] for w in s["widgets"]}
        assert not extra, f"{lang}: {node_id} translates unknown inputs {extra}"
    assert set(defs) <= set(CONTRACT), f"{lang}: unknown node ids {set(defs) - set(CONTRACT)}"


def test_chinese_locale_is_chinese():
    zh = _locale("zh")["nodeDefs"]
    cjk = re.compile(r"[\u4e00-\u9fff]")
    for node_id, d in zh.items():
        assert cjk.search(d["display_name"]), node_id
        for name, entry in d["inputs"].items():
            assert cjk.search(entry["tooltip"]), f"{node_id}.{name}"


def test_locales_same_keys():
    def keys(x, prefix=""):
        if isinstance(x, dict):
            return set().union(*(keys(v, f"{prefix}/{k}") for k, v in x.items())) | {prefix}
        return {prefix}

    assert keys(_locale("en")) == keys(_locale("zh"))


# --------------------------------------------------------------------------------------------------------------------
# frontend extension (static part; the browser test is tests/host/test_frontend.py)


def test_frontend_extension_static():
    js = (ROOT / "js" / "stepvideo.js").read_text(encoding="utf-8")
    assert "innerHTML" not in js and "outerHTML" not in js and "insertAdjacentHTML" not in js
    assert "eval(" not in js and "new Function" not in js
    assert "StepVideoEmptyLatent" in js
    assert "serialize: false" in js and ".serialize = false" in js
    init = (ROOT / "__init__.py")
    if init.exists():
        assert re.search(r"WEB_DIRECTORY\s*=\s*[\"']\./js[\"']", init.read_text(encoding="utf-8"))


def test_the_previous_release_multi_gpu_template_still_opens():
    """Widget values are stored by position: the previous release's multi-GPU graph (Parallel DiT Loader -> Parallel
    Sampler) must still map onto today's nodes, whose inputs only grew at the end, and its link now carries a MODEL."""
    wf = load(Path(__file__).parent / "fixtures" / "previous_release_multi_gpu.json")
    for node in wf["nodes"]:
        if node["type"] in VIRTUAL_NODES:
            continue
        names = widget_names_with_control(node["type"])
        saved = node.get("widgets_values", [])
        assert len(saved) <= len(names), node["type"]
        # inputs added since only at the end: "cluster" (default "local") and the text suffix set (default "t2v")
        appended = {"StepVideoParallelDiTLoader": ["cluster"], "StepVideoTextEncode": ["suffixes"]}
        assert names[len(saved):] == appended.get(node["type"], []), node["type"]
    old = {n["id"]: n["type"] for n in wf["nodes"]}
    (link,) = [lk for lk in wf["links"] if old[lk[1]] == "StepVideoParallelDiTLoader"]
    assert old[link[3]] == "StepVideoParallelSampler"
    assert CONTRACT["StepVideoParallelDiTLoader"]["outputs"][0][1] == "MODEL"
    assert CONTRACT["StepVideoParallelSampler"]["sockets"][0] == ("parallel_dit", "MODEL")
