"""Fixtures for tests against a real ComfyUI (skipped unless COMFYUI_PATH is set).

Run with ComfyUI's own Python (it has ComfyUI's requirements; the pack's test venv does not):
``COMFYUI_PATH=/path/to/ComfyUI scripts/run_tests.sh`` finds it, or directly
``COMFYUI_PATH=/path/to/ComfyUI /path/to/ComfyUI/.venv/bin/python -m pytest tests/host -q``.

- ``base_dir``: a throw-away ComfyUI base directory (``--base-directory``) holding tiny official-layout models
  and ``custom_nodes/comfyui-stepvideo`` -> this repository;
- ``tiny_demo``: the built-in Step-Video-Tiny reachable as ``stepvideo/step-video-tiny/<part>`` (the shipped weights,
  or a random stand-in in ``base_dir`` until they exist);
- ``host``: ComfyUI imported in this process (``--cpu``) with the pack loaded by ComfyUI's own loader;
- ``server``: ``main.py --cpu`` on a free loopback port using ``base_dir``; its log is kept for assertions.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import socket
import subprocess
import sys
import time
import types
import urllib.error
import urllib.request
from pathlib import Path

import pytest

COMFYUI_PATH = os.environ.get("COMFYUI_PATH")
REPO = Path(__file__).resolve().parents[2]

if not COMFYUI_PATH:
    collect_ignore_glob = ["test_*.py"]
elif importlib.util.find_spec("PIL") is None or importlib.util.find_spec("aiohttp") is None:
    # Both are ComfyUI requirements the pack does not need: this is not ComfyUI's Python.
    raise pytest.UsageError(
        f"tests/host run inside ComfyUI and need ComfyUI's own Python; {sys.executable} lacks its requirements "
        f"(Pillow, aiohttp). Run `COMFYUI_PATH={COMFYUI_PATH} scripts/run_tests.sh` (it finds ComfyUI's Python, or set "
        f"COMFYUI_PYTHON), or `<ComfyUI's python> -m pytest tests/host`.")


@pytest.fixture(scope="session")
def base_dir(tmp_path_factory) -> Path:
    from .tiny_models import write_all

    base = tmp_path_factory.mktemp("comfy_base")
    write_all(base / "models")
    for sub in ("custom_nodes", "input", "output", "temp", "user"):
        (base / sub).mkdir(exist_ok=True)
    (base / "custom_nodes" / "comfyui-stepvideo").symlink_to(REPO, target_is_directory=True)
    return base


@pytest.fixture(scope="session")
def tiny_demo(base_dir):
    from .tiny_models import tiny_demo as find_or_write

    return find_or_write(base_dir / "models")


@pytest.fixture(scope="session")
def host(base_dir):
    """ComfyUI in-process, CPU only, with core + extra nodes and this pack loaded through ``load_custom_node``."""
    if COMFYUI_PATH not in sys.path:
        sys.path.insert(0, COMFYUI_PATH)
    import comfy.cli_args

    comfy.cli_args.args.cpu = True
    import folder_paths

    import nodes

    folder_paths.set_user_directory(str(base_dir / "user"))  # the text cache writes there, not into the checkout

    asyncio.run(nodes.init_extra_nodes(init_custom_nodes=False, init_api_nodes=False))
    assert asyncio.run(nodes.load_custom_node(str(REPO))), "the pack failed to load"
    models = base_dir / "models"
    for name in ("loras", "vae", "diffusion_models", "text_encoders"):
        folder_paths.add_model_folder_path(name, str(models / name))
    folder_paths.add_model_folder_path("stepvideo", str(models / "stepvideo"))
    pack_name = nodes.NODE_CLASS_MAPPINGS["StepVideoSampler"].__module__.rsplit(".nodes.", 1)[0]
    pack = types.SimpleNamespace(
        nodes=nodes,
        classes={k: v for k, v in nodes.NODE_CLASS_MAPPINGS.items() if k.startswith("StepVideo")},
        comfy_model=sys.modules[f"{pack_name}.nodes.comfy_model"],
        conversions=sys.modules[f"{pack_name}.nodes.conversions"],
        model_folders=sys.modules[f"{pack_name}.nodes.model_folders"],
        registered_folders=sys.modules[f"{pack_name}.nodes.registered_folders"],
        validation=sys.modules[f"{pack_name}.nodes.validation"],
        tiny=base_dir / "models" / "stepvideo" / "tiny",
        loras=base_dir / "models" / "loras",
    )
    return pack


CLIENT_ID = "stepvideo-tests"  # the server sends this client's progress messages to its websocket


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, url: str, log: Path, base: Path):
        self.url, self.log, self.base = url, log, base

    def get(self, path: str):
        with urllib.request.urlopen(self.url + path, timeout=60) as r:
            return json.loads(r.read())

    def post(self, path: str, data: dict | None = None):
        req = urllib.request.Request(self.url + path, data=json.dumps(data or {}).encode(),
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                body = r.read()
                return r.status, (json.loads(body) if body else None)
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"null")

    def queue(self, prompt: dict) -> str:
        status, body = self.post("/prompt", {"prompt": prompt, "client_id": CLIENT_ID})
        assert status == 200, body
        return body["prompt_id"]

    def wait(self, prompt_id: str, timeout: float = 240) -> dict:
        end = time.time() + timeout
        while time.time() < end:
            hist = self.get(f"/history/{prompt_id}")
            if prompt_id in hist and hist[prompt_id].get("status", {}).get("completed") is not None:
                entry = hist[prompt_id]
                if entry["status"].get("status_str") in ("success", "error"):
                    return entry
            time.sleep(0.3)
        raise TimeoutError(f"prompt {prompt_id} did not finish in {timeout}s; log tail:\n{self.log_text()[-3000:]}")

    def run(self, prompt: dict, timeout: float = 240) -> dict:
        entry = self.wait(self.queue(prompt), timeout)
        assert entry["status"]["status_str"] == "success", (json.dumps(entry["status"])[-3000:], self.log_text()[-3000:])
        return entry

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def queue_and_wait_for_progress(self, prompt: dict, node: str, timeout: float = 120) -> str:
        """Queue ``prompt`` and return its id once node ``node`` reports progress (a sampler: its first step done),
        read from the server's websocket messages to this client rather than guessed with a sleep."""
        import aiohttp

        async def listen() -> str:
            url = self.url.replace("http://", "ws://", 1) + "/ws?clientId=" + CLIENT_ID
            async with aiohttp.ClientSession() as session, session.ws_connect(url) as ws:
                prompt_id = await asyncio.to_thread(self.queue, prompt)
                async with asyncio.timeout(timeout):
                    async for message in ws:
                        if message.type != aiohttp.WSMsgType.TEXT:
                            continue
                        event = json.loads(message.data)
                        data = event.get("data") or {}
                        if (event.get("type") == "progress" and data.get("node") == node
                                and data.get("prompt_id") == prompt_id):
                            return prompt_id
            raise RuntimeError(f"the server closed its websocket before node {node} reported progress")

        return asyncio.run(listen())


@pytest.fixture(scope="session")
def server(base_dir, tmp_path_factory):
    port = _free_port()
    log = tmp_path_factory.mktemp("server") / "comfyui.log"
    python = os.environ.get("COMFYUI_PYTHON") or sys.executable
    cmd = [python, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port), "--base-directory", str(base_dir),
           "--preview-method", "latent2rgb", "--disable-auto-launch"]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, cwd=COMFYUI_PATH, stdout=out, stderr=subprocess.STDOUT)
    srv = Server(f"http://127.0.0.1:{port}", log, base_dir)
    try:
        end = time.time() + 180
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with {proc.returncode}:\n{srv.log_text()[-3000:]}")
            try:
                srv.get("/system_stats")
                break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                if time.time() > end:
                    raise
                time.sleep(0.5)
        yield srv
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()


# ---- helpers the host tests share -------------------------------------------------------------------------------


def run(cls, **kw):
    """A V3 node's outputs, called as ComfyUI calls it."""
    out = cls.execute(**kw)
    return out.result if hasattr(out, "result") else out


def builtin(part: str) -> str:
    """The loaders' name for a part of the built-in Step-Video-Tiny (``stepvideo/step-video-tiny/<part>``)."""
    from stepvideo_core.tiny import model as tiny

    return f"stepvideo/{tiny.NAME}/{part}"


def video_frames(path: Path):
    """The frames of a saved video as uint8 ``[T, H, W, 3]``."""
    import av
    import numpy as np

    with av.open(str(path)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


@pytest.fixture(scope="module")
def demo(host, tiny_demo):
    """The built-in Step-Video-Tiny loaded through the pack's nodes, with the demo prompt encoded and an empty
    latent of its trained size."""
    from stepvideo_core.tiny import model as tiny

    c = host.classes
    (enc,) = run(c["StepVideoTextEncoderLoader"], step_llm=builtin("step_llm"), hunyuan_clip=builtin("hunyuan_clip"),
                 llm_dtype="fp32", device="default")
    pos, neg = run(c["StepVideoTextEncode"], text_encoders=enc, prompt="a blue square moves right", negative_prompt="",
                   positive_magic=True, negative_magic=True)
    (model,) = run(c["StepVideoDiTLoader"], model_name=builtin("transformer"), weight_dtype="fp32", attention="comfy")
    s = tiny.SETTINGS
    (latent,) = run(c["StepVideoEmptyLatent"], width=s.width, height=s.height, frames=s.num_frames, batch_size=1)
    return dict(pos=pos, neg=neg, model=model, latent=latent)


def sample_tiny(host, demo, model, steps: int):
    """``steps`` steps of Step-Video Sampler (custom, the tiny preset's cfg and shift, seed 0) from ``demo``."""
    from stepvideo_core.tiny import model as tiny

    s = tiny.SETTINGS
    (out,) = run(host.classes["StepVideoSampler"], model=model, positive=demo["pos"], negative=demo["neg"],
                 latent_image=demo["latent"], preset="custom", steps=steps, cfg=s.cfg, shift=s.shift, seed=0, denoise=1.0)
    return out["samples"]


def api_prompt(workflow: dict) -> dict:
    """The API prompt of a flat UI workflow: widget values by the node contract, links as [node id, slot].
    (tests/host/test_frontend.py checks that the real frontend converts the shipped workflows the same way.)"""
    from tests.builders import CONTRACT, CORE_CONTRACT, VIRTUAL_NODES, widget_names_with_control

    links = {lk[0]: lk for lk in workflow["links"]}
    prompt = {}
    for node in workflow["nodes"]:
        if node["type"] in VIRTUAL_NODES:
            continue
        spec = CONTRACT.get(node["type"]) or CORE_CONTRACT[node["type"]]
        values = dict(zip(widget_names_with_control(node["type"]), node["widgets_values"], strict=True))
        inputs = {w["name"]: values[w["name"]] for w in spec["widgets"]}
        for sock in node["inputs"]:
            if sock.get("link") is not None:
                src = links[sock["link"]]
                inputs[sock["name"]] = [str(src[1]), src[2]]
        prompt[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
    return prompt


# The small in-process sampling setup that several host tests share.
SAMPLER_PROMPT = "一只猫在窗台上睡觉, a cat sleeps on a windowsill"
STEPS, CFG, SHIFT, SEED = 4, 5.0, 13.0, 7


@pytest.fixture(scope="module")
def parts(host):
    c = host.classes
    (enc,) = run(c["StepVideoTextEncoderLoader"], step_llm="stepvideo/tiny/step_llm", hunyuan_clip="stepvideo/tiny/hunyuan_clip",
                 llm_dtype="fp32", device="default")
    pos, neg = run(c["StepVideoTextEncode"], text_encoders=enc, prompt=SAMPLER_PROMPT, negative_prompt="", positive_magic=True,
                   negative_magic=True)
    (model,) = run(c["StepVideoDiTLoader"], model_name="stepvideo/tiny/transformer", weight_dtype="fp32", attention="sdpa")
    (latent,) = run(c["StepVideoEmptyLatent"], width=64, height=32, frames=17, batch_size=1)
    return dict(pos=pos, neg=neg, model=model, latent=latent)


def our_sampler(host, model, parts, **kw):
    args = dict(model=model, positive=parts["pos"], negative=parts["neg"], latent_image=parts["latent"], preset="custom",
                steps=STEPS, cfg=CFG, shift=SHIFT, seed=SEED, denoise=1.0)
    args.update(kw)
    return run(host.classes["StepVideoSampler"], **args)[0]["samples"]


# ComfyUI-managed text encoders of the built-in tiny model, as the memory-plan and GGUF tests load them.
ENCODE_PROMPT = "一只狐狸在雪地里奔跑, a fox runs through snow"
LLM, CLIP = "stepvideo/tiny/step_llm", "stepvideo/tiny/hunyuan_clip"


def loader(host, dtype="fp32"):
    (enc,) = run(host.classes["StepVideoTextEncoderLoader"], step_llm=LLM, hunyuan_clip=CLIP, llm_dtype=dtype,
                 device="default")
    return enc


def encode(host, enc, prompt=ENCODE_PROMPT, cache=False):
    return run(host.classes["StepVideoTextEncode"], text_encoders=enc, prompt=prompt, negative_prompt="",
               positive_magic=True, negative_magic=True, cache=cache)


def states(cond):
    return cond[0][0], cond[0][1]["stepvideo_mask"], cond[0][1]["stepvideo_clip"]
