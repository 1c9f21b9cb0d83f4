"""The pack in a real ComfyUI, through the real frontend in headless Chromium.

Skipped unless ``COMFYUI_PATH`` points at a ComfyUI checkout and Chromium, Node.js and playwright-core are present
(``CHROMIUM`` default /usr/bin/chromium, ``PLAYWRIGHT_CORE`` default /work/browser-tools/node_modules/playwright-core).

A private ComfyUI is started on a free port with ``--base-directory`` set to a temporary folder whose
``custom_nodes/comfyui-stepvideo`` is a symlink to this repository, so it never touches the ComfyUI checkout's own
``custom_nodes/`` or models, nor other test servers. The browser loads every shipped workflow with
``app.loadGraphData``, converts it with ``app.graphToPrompt`` and the API prompt is checked against the workflow and
the node contract (UI-only helper widgets absent); the latent helper is exercised (invalid values snap, info text,
presets) and a screenshot is written (``STEPVIDEO_SCREENSHOT_DIR`` or the test's tmp dir).

Every converted prompt is then run end to end on the CPU: tiny models in the official layout are written at the
paths the workflows name (``models/stepvideo/stepvideo-t2v/...``, ``stepvideo-t2v-turbo/transformer``,
``loras/stepvideo_lora_a.safetensors``, and Step-Video-Tiny with its DPO LoRA: built in, or stand-ins at
``stepvideo/step-video-tiny`` and ``loras/step-video-tiny-dpo.safetensors``)
before the server starts; only the size inputs of the converted prompt are shrunk (latent size and frames, sampler
steps, decode tiles) and every SaveVideo must write a video. In the LoRA
workflow the two branches (strength 0 and 1 of a LoRA that changes the output) must give different videos; in the
DPO swap workflow the base and LoRA halves of its one video must differ.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
from tests.builders import (  # noqa: E402
    CONTRACT,
    CORE_CONTRACT,
    VIRTUAL_NODES,
    WORKFLOWS,
    widget_names_with_control,
)

COMFYUI = os.environ.get("COMFYUI_PATH")
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
PLAYWRIGHT_CORE = Path(os.environ.get("PLAYWRIGHT_CORE", "/work/browser-tools/node_modules/playwright-core"))
NODE = shutil.which("node")
PACK_FOLDER = "comfyui-stepvideo"
UI_ONLY_WIDGETS = {"resolution preset", "frames preset", "stepvideo_latent_info"}
# frontend 1.27.10 logs this on every page load, with or without custom packs (host doc §12)
KNOWN_PAGE_ERRORS = ("Cannot read properties of undefined (reading 'id')",)

pytestmark = [
    pytest.mark.host,
    pytest.mark.skipif(not COMFYUI, reason="COMFYUI_PATH not set"),
]
needs_browser = pytest.mark.skipif(
    not (Path(CHROMIUM).exists() and NODE and (PLAYWRIGHT_CORE / "index.mjs").exists()),
    reason="needs Chromium, node and playwright-core",
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str, timeout: float = 30):
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return json.loads(r.read().decode("utf-8"))


def _post(url: str, data: dict):
    req = urllib.request.Request(url, data=json.dumps(data).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read() or b"null")
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null")


def _write_workflow_models(models: Path) -> None:
    """Tiny models at the names the shipped workflows use, and a LoRA for the DiT that really changes its output."""
    import torch

    from stepvideo_core.lora import new_trainable_lora, save_lora

    from .tiny_models import dpo_lora, tiny_demo, tiny_ti2v, write_all, write_dit

    root = write_all(models)  # models/stepvideo/tiny/... + test LoRAs
    demo = tiny_demo(models)  # the demo workflow's built-in model (a stand-in until the pack ships its weights)
    dpo_lora(models, demo.root)  # the DPO swap workflow's LoRA for it (likewise)
    tiny_ti2v(models, demo.root)  # the TI2V workflow's built-in DiT (likewise)
    official = models / "stepvideo" / "stepvideo-t2v"
    shutil.copytree(root, official)
    dit = write_dit(models / "stepvideo" / "stepvideo-t2v-turbo" / "transformer", seed=1)
    lora = new_trainable_lora(dit, rank=4, seed=2)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for pair in lora.pairs.values():
            pair.up.copy_(torch.randn(pair.up.shape, generator=g) * 0.5)
    save_lora(lora, models / "loras" / "stepvideo_lora_a.safetensors")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    base = tmp_path_factory.mktemp("comfy_frontend_base")
    (base / "custom_nodes").mkdir()
    _write_workflow_models(base / "models")  # before the start: the model combos list what is on disk
    (base / "custom_nodes" / PACK_FOLDER).symlink_to(ROOT, target_is_directory=True)
    port = _free_port()
    python = os.environ.get("COMFYUI_PYTHON") or str(Path(COMFYUI) / ".venv" / "bin" / "python")
    if not Path(python).exists():
        python = sys.executable
    log = (base / "comfyui.log").open("w")
    proc = subprocess.Popen(
        [python, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port), "--base-directory", str(base),
         "--disable-auto-launch"],
        cwd=COMFYUI, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 240
        while True:
            if proc.poll() is not None:
                pytest.fail(f"ComfyUI exited ({proc.returncode}):\n{(base / 'comfyui.log').read_text()[-4000:]}")
            try:
                _get(url + "/system_stats", timeout=5)
                break
            except OSError:
                if time.time() > deadline:
                    pytest.fail("ComfyUI did not start:\n" + (base / "comfyui.log").read_text()[-4000:])
                time.sleep(1)
        yield {"url": url, "base": base, "log": base / "comfyui.log"}
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
        log.close()


# --------------------------------------------------------------------------------------------------------------------
# server side: what the frontend is going to fetch


def test_pack_loads_without_import_errors(server):
    text = server["log"].read_text()
    failed = [ln for ln in text.splitlines() if "IMPORT FAILED" in ln and PACK_FOLDER in ln]
    assert not failed, text[-4000:]
    info = _get(server["url"] + "/object_info")
    missing = [n for n in CONTRACT if n not in info]
    assert not missing, f"nodes not registered: {missing}\n{text[-3000:]}"


def test_object_info_matches_contract(server):
    """The workflows and the frontend are written against CONTRACT; the live node definitions must agree."""
    info = _get(server["url"] + "/object_info")
    for node_id, spec in {**CONTRACT, **CORE_CONTRACT}.items():
        if node_id in VIRTUAL_NODES:  # frontend-only nodes
            continue
        d = info[node_id]
        order = d["input_order"].get("required", []) + d["input_order"].get("optional", [])
        inputs = {**d["input"].get("required", {}), **d["input"].get("optional", {})}
        sockets = [(n, t) for n, t in spec["sockets"]]
        widgets = [w["name"] for w in spec["widgets"]]
        assert set(order) == {n for n, _ in sockets} | set(widgets), f"{node_id}: inputs {order}"
        assert [n for n in order if n in widgets] == widgets, f"{node_id}: widget order {order}"
        for name, typ in sockets:
            assert inputs[name][0] == typ, f"{node_id}.{name}: {inputs[name][0]} != {typ}"
        for w in spec["widgets"]:
            typ, opts = inputs[w["name"]][0], (inputs[w["name"]][1] if len(inputs[w["name"]]) > 1 else {})
            kind = {"INT": "int", "FLOAT": "float", "BOOLEAN": "bool", "STRING": "string"}.get(
                typ if isinstance(typ, str) else "", "combo")
            assert kind == w["kind"], f"{node_id}.{w['name']}: {typ}"
            if kind in ("int", "float"):
                assert opts.get("min") == w["min"] and opts.get("max") == w["max"], f"{node_id}.{w['name']}: {opts}"
                if w.get("step"):
                    assert opts.get("step") == w["step"], f"{node_id}.{w['name']}: {opts}"
            if kind == "combo" and w["options"] is not None:
                options = typ if isinstance(typ, list) else opts.get("options")
                assert list(options) == w["options"], f"{node_id}.{w['name']}: {options}"
        # types must match; names may be the bare type (V3 outputs without display_name): the locales name them
        assert d["output"] == [t for _, t in spec["outputs"]], f"{node_id}: outputs {d['output']}"
        for got, (name, typ) in zip(d["output_name"], spec["outputs"], strict=True):
            assert got in (name, typ), f"{node_id}: output {got!r}, expected {name!r}"


def test_locales_cover_every_registered_pack_node(server):
    info = _get(server["url"] + "/object_info")
    ours = sorted(k for k, v in info.items() if PACK_FOLDER in str(v.get("python_module", "")) or k.startswith("StepVideo"))
    i18n = _get(server["url"] + "/i18n")
    for lang in ("en", "zh"):
        defs = i18n[lang]["nodeDefs"]
        for node_id in ours:
            assert node_id in defs, f"{lang}: no translation for {node_id}"
            d = info[node_id]
            names = list(d["input"].get("required", {})) + list(d["input"].get("optional", {}))
            for name in names:
                assert name in defs[node_id].get("inputs", {}), f"{lang}: {node_id}.inputs.{name}"


def test_web_extension_and_templates_served(server):
    url = server["url"]
    exts = _get(url + "/extensions")
    assert f"/extensions/{PACK_FOLDER}/stepvideo.js" in exts
    templates = _get(url + "/api/workflow_templates")
    assert sorted(templates.get(PACK_FOLDER, [])) == sorted(p.stem for p in WORKFLOWS), templates
    for path in WORKFLOWS:
        served = _get(f"{url}/api/workflow_templates/{PACK_FOLDER}/{path.name}")
        assert served == json.loads(path.read_text(encoding="utf-8"))
        with urllib.request.urlopen(f"{url}/api/workflow_templates/{PACK_FOLDER}/{path.stem}.jpg", timeout=30) as r:
            assert r.read() == path.with_suffix(".jpg").read_bytes()


# --------------------------------------------------------------------------------------------------------------------
# the real frontend

DRIVER = r"""
import { chromium } from '__PLAYWRIGHT__';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';

const [url, workflowsJson, shotDir] = process.argv.slice(2);
const workflows = JSON.parse(fs.readFileSync(workflowsJson, 'utf8'));
const profile = fs.mkdtempSync(path.join(os.tmpdir(), 'stepvideo-chromium-'));
const context = await chromium.launchPersistentContext(profile, {
  executablePath: '__CHROMIUM__', headless: true, viewport: { width: 1600, height: 1000 },
  args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
         '--disable-background-networking', '--disable-component-update', '--disable-sync'],
});
const result = { pageErrors: [], consoleErrors: [], failedRequests: [], workflows: {}, helper: {} };
try {
  const page = context.pages()[0] || await context.newPage();
  page.on('pageerror', e => result.pageErrors.push(String(e)));
  page.on('console', m => { if (m.type() === 'error') result.consoleErrors.push(m.text()); });
  page.on('response', r => { if (r.status() >= 400) result.failedRequests.push(r.status() + ' ' + r.url()); });
  page.on('requestfailed', r => result.failedRequests.push('failed ' + r.url()));
  await page.goto(url, { waitUntil: 'domcontentloaded', timeout: 120000 });
  await page.waitForFunction(() => window.app && window.app.graph && window.LiteGraph
      && window.LiteGraph.registered_node_types['StepVideoEmptyLatent']
      && window.app.extensions.some(e => e.name === 'stepvideo.latentHelper'), null, { timeout: 120000 });
  await page.waitForTimeout(2000);
  await page.keyboard.press('Escape');
  result.templates = await page.evaluate(async () => await window.comfyAPI.api.api.getWorkflowTemplates());

  for (const [name, wf] of Object.entries(workflows)) {
    result.workflows[name] = await page.evaluate(async (wf) => {
      for (const t of document.querySelectorAll('.p-toast-message')) t.remove();
      await window.app.loadGraphData(structuredClone(wf));
      await new Promise(r => setTimeout(r, 300));
      const toasts = [...document.querySelectorAll('.p-toast-message')].map(t => t.textContent);
      const dialogs = [...document.querySelectorAll('.p-dialog')].map(d => d.textContent.slice(0, 300));
      const p = await window.app.graphToPrompt();
      const saved = window.app.graph.serialize();
      for (const t of document.querySelectorAll('.p-toast-message')) t.remove();
      return { toasts, dialogs, output: p.output, saved: saved.nodes.map(n => ({ id: n.id, type: n.type, widgets_values: n.widgets_values })),
               latentWidgets: window.app.graph._nodes.filter(n => n.type === 'StepVideoEmptyLatent')
                   .map(n => n.widgets.map(w => w.name)) };
    }, wf);
  }

  // the latent helper, on the standard workflow
  await page.evaluate(async (wf) => { await window.app.loadGraphData(structuredClone(wf)); }, workflows['stepvideo_t2v_standard']);
  result.helper = await page.evaluate(async () => {
    const app = window.app;
    const node = app.graph._nodes.find(n => n.type === 'StepVideoEmptyLatent');
    const w = name => node.widgets.find(x => x.name === name);
    const info = () => w('stepvideo_latent_info').element.textContent;
    const type = (name, v) => w(name).setValue(v, { e: undefined, node, canvas: app.canvas });
    const out = { initial: info(), initialPreset: w('resolution preset').value };
    type('frames', 100);
    out.frames = w('frames').value;
    type('width', 1000);
    out.width = w('width').value;
    out.afterTyping = info();
    const res = w('resolution preset');
    res.value = '544×992 portrait (official)';
    res.callback(res.value, app.canvas, node);
    out.afterPreset = { width: w('width').value, height: w('height').value, info: info() };
    const fr = w('frames preset');
    fr.value = '51 frames (2.0 s)';
    fr.callback(fr.value, app.canvas, node);
    out.afterFramesPreset = { frames: w('frames').value, info: info() };
    const p = await app.graphToPrompt();
    out.promptInputs = p.output[String(node.id)].inputs;
    out.saved = app.graph.serialize().nodes.find(n => n.id === node.id).widgets_values;
    out.presetValues = { res: res.options.values, frames: fr.options.values };
    out.htmlOfInfo = w('stepvideo_latent_info').element.children.length;
    // show the node big for the screenshot
    app.canvas.ds.scale = 1.1;
    app.canvas.ds.offset = [-node.pos[0] + 40, -node.pos[1] + 40];
    app.graph.setDirtyCanvas(true, true);
    return out;
  });
  await page.waitForTimeout(800);
  result.screenshot = path.join(shotDir, 'stepvideo_latent_helper.png');
  await page.screenshot({ path: result.screenshot });

  // a saved workflow with invalid values snaps on load (values typed in an older version / by hand)
  result.loadSnap = await page.evaluate(async (wf) => {
    const bad = structuredClone(wf);
    const n = bad.nodes.find(n => n.type === 'StepVideoEmptyLatent');
    n.widgets_values = [1000, 540, 100, 1];
    await window.app.loadGraphData(bad);
    const node = window.app.graph._nodes.find(n => n.type === 'StepVideoEmptyLatent');
    const p = await window.app.graphToPrompt();
    return { prompt: p.output[String(node.id)].inputs,
             info: node.widgets.find(x => x.name === 'stepvideo_latent_info').element.textContent };
  }, workflows['stepvideo_t2v_standard']);

  // overview screenshot of the LoRA workflow
  await page.evaluate(async (wf) => { await window.app.loadGraphData(structuredClone(wf)); }, workflows['stepvideo_t2v_lora_swap']);
  await page.waitForTimeout(800);
  await page.screenshot({ path: path.join(shotDir, 'stepvideo_lora_swap.png') });
} catch (e) {
  result.error = String(e && e.stack || e);
} finally {
  await context.close();
  fs.rmSync(profile, { recursive: true, force: true });
}
console.log('RESULT ' + JSON.stringify(result));
"""


@pytest.fixture(scope="module")
def browser(server, tmp_path_factory):
    work = tmp_path_factory.mktemp("frontend_driver")
    shots = Path(os.environ.get("STEPVIDEO_SCREENSHOT_DIR") or work)
    shots.mkdir(parents=True, exist_ok=True)
    script = work / "driver.mjs"
    script.write_text(DRIVER.replace("__PLAYWRIGHT__", (PLAYWRIGHT_CORE / "index.mjs").as_posix())
                      .replace("__CHROMIUM__", CHROMIUM), encoding="utf-8")
    wfs = work / "workflows.json"
    wfs.write_text(json.dumps({p.stem: json.loads(p.read_text(encoding="utf-8")) for p in WORKFLOWS}),
                   encoding="utf-8")
    run = subprocess.run([NODE, str(script), server["url"] + "/", str(wfs), str(shots)], capture_output=True,
                         text=True, timeout=540)
    line = next((ln for ln in run.stdout.splitlines() if ln.startswith("RESULT ")), None)
    assert line, f"driver failed (rc {run.returncode}):\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}"
    result = json.loads(line[len("RESULT "):])
    assert "error" not in result, result["error"]
    return result


@needs_browser
def test_no_page_errors_from_the_pack(browser):
    errors = [e for e in browser["pageErrors"] if not any(k in e for k in KNOWN_PAGE_ERRORS)]
    assert not errors, errors
    ours = [e for e in browser["consoleErrors"] if "stepvideo" in e.lower()]
    assert not ours, ours
    ours = [r for r in browser["failedRequests"] if PACK_FOLDER in r]
    assert not ours, ours
    print("console errors (not ours):", browser["consoleErrors"], browser["failedRequests"])


@needs_browser
def test_template_browser_lists_workflows(browser):
    assert sorted(browser["templates"].get(PACK_FOLDER, [])) == sorted(p.stem for p in WORKFLOWS)


@needs_browser
@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_workflow_converts_to_api_prompt(browser, path):
    wf = json.loads(path.read_text(encoding="utf-8"))
    got = browser["workflows"][path.stem]
    # no schema alert, no missing-nodes / missing-models dialog on load
    assert not got["toasts"], got["toasts"]
    assert not got["dialogs"], got["dialogs"]
    prompt = got["output"]
    real = [n for n in wf["nodes"] if n["type"] not in VIRTUAL_NODES and n.get("mode", 0) == 0]
    assert sorted(map(int, prompt)) == sorted(n["id"] for n in real)
    links = {lk[0]: lk for lk in wf["links"]}
    for node in real:
        entry = prompt[str(node["id"])]
        assert entry["class_type"] == node["type"]
        spec = CONTRACT.get(node["type"]) or CORE_CONTRACT[node["type"]]
        inputs = entry["inputs"]
        assert not UI_ONLY_WIDGETS & set(inputs), f"{node['type']}: UI-only widget in the prompt: {inputs}"
        widgets = dict(zip(widget_names_with_control(node["type"]), node["widgets_values"], strict=True))
        expected = {w["name"]: widgets[w["name"]] for w in spec["widgets"]}
        for sock in node["inputs"]:
            if sock.get("link") is not None:
                lk = links[sock["link"]]
                expected[sock["name"]] = [str(lk[1]), lk[2]]
        assert inputs == expected, f"{path.stem} node {node['id']} ({node['type']})"
    # the helper adds its widgets to the latent node, after the real ones, without changing what is saved
    for names in got["latentWidgets"]:
        assert names[:4] == ["width", "height", "frames", "batch_size"]
        assert set(names[4:]) == UI_ONLY_WIDGETS
    saved = {n["id"]: n for n in got["saved"]}
    for node in wf["nodes"]:
        if node["type"] == "StepVideoEmptyLatent":
            assert saved[node["id"]]["widgets_values"] == node["widgets_values"]


@needs_browser
def test_latent_helper(browser):
    h = browser["helper"]
    assert "204 frames = 8.16 s at 25 fps" in h["initial"]
    assert "latent [1, 64, 36, 34, 62]" in h["initial"]
    assert "DiT tokens 75,888" in h["initial"]
    assert h["initialPreset"] == "992×544 landscape (official)"
    # invalid values typed by the user snap to the model's grid
    assert h["frames"] == 102
    assert h["width"] == 1008
    assert "102 frames = 4.08 s" in h["afterTyping"]
    assert "latent [1, 64, 18, 34, 63]" in h["afterTyping"]
    assert "DiT tokens 38,556" in h["afterTyping"]
    assert "1000 → 1008" in h["afterTyping"]
    # presets set the real widgets
    assert (h["afterPreset"]["width"], h["afterPreset"]["height"]) == (544, 992)
    assert "latent [1, 64, 18, 62, 34]" in h["afterPreset"]["info"]
    assert h["afterFramesPreset"]["frames"] == 51
    assert "latent [1, 64, 9, 62, 34]" in h["afterFramesPreset"]["info"]
    # UI-only: neither in the API prompt nor in the saved workflow
    assert h["promptInputs"] == {"width": 544, "height": 992, "frames": 51, "batch_size": 1}
    assert h["saved"] == [544, 992, 51, 1]
    assert "544×992 portrait (official)" in h["presetValues"]["res"]
    assert "768×768 square (official)" in h["presetValues"]["res"]
    assert h["htmlOfInfo"] == 4
    assert Path(browser["screenshot"]).stat().st_size > 10_000


@needs_browser
def test_invalid_values_in_a_saved_workflow_snap_on_load(browser):
    got = browser["loadSnap"]
    assert got["prompt"] == {"width": 1008, "height": 544, "frames": 102, "batch_size": 1}
    assert "frames 100 → 102" in got["info"] and "height 540 → 544" in got["info"]


# --------------------------------------------------------------------------------------------------------------------
# the converted prompts, run end to end on the CPU with tiny models

TINY_SIZES = {  # only size inputs change; everything else stays as the frontend converted it
    # 32x16 px = 2x1 latents: the tiny VAE is 151M parameters and bf16 (as converted) convolutions are slow on CPU
    "StepVideoEmptyLatent": {"width": 32, "height": 16, "frames": 17},
    "StepVideoImageToVideo": {"width": 32, "height": 16, "frames": 17},
    "StepVideoSampler": {"steps": 2},  # used by preset 'custom'; named presets keep their own step counts
    "StepVideoVAEDecode": {"tile_size": 1, "tile_overlap": 0},  # smaller than the latent: still decoded in tiles
    "StepVideoParallelSampler": {"steps": 2},
    # not a size, the machine: no GPU here, so the multi-GPU workflow's workers run on the CPU (two, joined by gloo)
    "StepVideoParallelDiTLoader": {"devices": "cpu", "workers": 2},
}


def _shrink(prompt: dict) -> dict:
    out = json.loads(json.dumps(prompt))
    for node in out.values():
        for name, value in TINY_SIZES.get(node["class_type"], {}).items():
            assert name in node["inputs"] and not isinstance(node["inputs"][name], list), (node, name)
            node["inputs"][name] = value
    return out


def _frames(path: Path):
    import av
    import numpy as np

    with av.open(str(path)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


@needs_browser
@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_converted_workflow_runs_end_to_end(browser, server, path):
    converted = browser["workflows"][path.stem]["output"]
    prompt = _shrink(converted)
    changed = {(nid, k) for nid, n in prompt.items() for k, v in n["inputs"].items() if converted[nid]["inputs"][k] != v}
    assert changed <= {(nid, k) for nid, n in prompt.items() for k in TINY_SIZES.get(n["class_type"], {})}
    status, body = _post(server["url"] + "/prompt", {"prompt": prompt, "client_id": "stepvideo-frontend-tests"})
    assert status == 200, body
    pid = body["prompt_id"]
    deadline = time.time() + 300
    while True:
        hist = _get(f"{server['url']}/history/{pid}")
        entry = hist.get(pid)
        if entry and entry.get("status", {}).get("status_str") in ("success", "error"):
            break
        assert time.time() < deadline, "prompt did not finish:\n" + server["log"].read_text()[-4000:]
        time.sleep(0.3)
    assert entry["status"]["status_str"] == "success", (json.dumps(entry["status"])[-3000:],
                                                         server["log"].read_text()[-3000:])
    saves = sorted(nid for nid, n in prompt.items() if n["class_type"] == "SaveVideo")
    assert saves
    stitched = path.stem in ("step_video_tiny_dpo_swap", "step_video_tiny_train_lora")  # base | LoRA side by side
    videos = {}
    for nid in saves:
        items = [i for v in entry["outputs"][nid].values() if isinstance(v, list) for i in v if isinstance(i, dict)]
        assert len(items) == 1, entry["outputs"][nid]
        file = server["base"] / "output" / items[0]["subfolder"] / items[0]["filename"]
        assert file.is_file() and file.stat().st_size > 0, file
        assert items[0]["subfolder"] == str(Path(prompt[nid]["inputs"]["filename_prefix"]).parent)
        videos[nid] = _frames(file)
        assert videos[nid].shape == (17, 16, 64 if stitched else 32, 3), videos[nid].shape
    if path.stem == "stepvideo_t2v_lora_swap":
        strengths = sorted(n["inputs"]["strength"] for n in prompt.values() if n["class_type"] == "StepVideoLoraLoader")
        assert strengths == [0.0, 1.0]
        a, b = (videos[n].astype(float) for n in saves)
        assert abs(a - b).mean() > 1.0, "LoRA strength 0 and 1 gave the same video"
    if stitched:
        (video,) = (videos[n].astype(float) for n in saves)
        assert abs(video[:, :, :32] - video[:, :, 32:]).mean() > 1.0, "the base and LoRA halves are the same"
