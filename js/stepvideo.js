// Step-Video-T2V frontend helpers.
//
// On "Step-Video Empty Latent": snaps width/height to multiples of 16 and frames to multiples of 17, shows the
// duration at 25 fps, the latent shape [B, 64, T, H/16, W/16] and the DiT token count, and offers the official
// resolution presets and frame counts. The helper widgets are UI-only: they are kept out of the API prompt
// (options.serialize = false) and out of the saved workflow (widget.serialize = false), and they are added after
// the node's own widgets so that the saved widgets_values of the real inputs keep their indices.
// Text is only ever set with textContent (no HTML parsing of any value).
//
// The numbers and the wording of the notes mirror the Python rules in stepvideo_core/video_shape.py (the one home
// of the video shape rules; the server checks them again): change both together (tests/test_video_shape.py
// checks that the numbers agree).

import { app } from "../../scripts/app.js";

const NODE_ID = "StepVideoEmptyLatent";
const FPS = 25;
const SPATIAL = 16; // VAE spatial compression; the DiT patch size is 1
const CHUNK_FRAMES = 17; // 17 video frames -> 3 latent frames
const CHUNK_LATENTS = 3;
const CHANNELS = 64;
const MAX_TRAINED_FRAMES = 204;
const MAX_SIDE = 4096;
const MAX_FRAMES = 1700;
const OFFICIAL_TOKENS = (204 / CHUNK_FRAMES) * CHUNK_LATENTS * (544 / SPATIAL) * (992 / SPATIAL); // 75,888

const CUSTOM = "custom";
// [label, width, height]
export const RESOLUTION_PRESETS = [
    ["992×544 landscape (official)", 992, 544],
    ["544×992 portrait (official)", 544, 992],
    ["768×768 square (official)", 768, 768],
    ["496×272 landscape (quick test)", 496, 272],
    ["272×496 portrait (quick test)", 272, 496],
    ["384×384 square (quick test)", 384, 384],
    ["128×128 square (Step-Video-Tiny)", 128, 128],
];
export const FRAME_PRESETS = [
    ["204 frames (8.2 s, maximum)", 204],
    ["136 frames (5.4 s)", 136],
    ["102 frames (4.1 s)", 102],
    ["51 frames (2.0 s)", 51],
    ["17 frames (0.7 s, test)", 17],
];

const RES_WIDGET = "resolution preset";
const FRAMES_WIDGET = "frames preset";
const INFO_WIDGET = "stepvideo_latent_info";

export function snap(value, step, min, max) {
    let v = Number(value);
    if (!Number.isFinite(v)) v = min;
    const lo = Math.ceil(min / step) * step;
    const hi = Math.floor(max / step) * step;
    v = Math.round(v / step) * step;
    return Math.min(Math.max(v, lo), hi);
}

export function latentInfo(width, height, frames, batch) {
    const t = Math.max(Math.floor(frames / CHUNK_FRAMES) * CHUNK_LATENTS, 1);
    const h = Math.floor(height / SPATIAL);
    const w = Math.floor(width / SPATIAL);
    return {
        seconds: frames / FPS,
        shape: [batch, CHANNELS, t, h, w],
        tokens: t * h * w,
    };
}

function widget(node, name) {
    return node.widgets?.find((w) => w.name === name);
}

function isLinked(node, name) {
    const input = node.inputs?.find((i) => i.name === name || i.widget?.name === name);
    return input != null && input.link != null;
}

function limits(w, step, fallbackMin, fallbackMax) {
    const min = Number.isFinite(w?.options?.min) ? w.options.min : fallbackMin;
    const max = Number.isFinite(w?.options?.max) ? w.options.max : fallbackMax;
    return [Math.max(min, step), max];
}

const RULES = {
    width: [SPATIAL, SPATIAL, MAX_SIDE],
    height: [SPATIAL, SPATIAL, MAX_SIDE],
    frames: [CHUNK_FRAMES, CHUNK_FRAMES, MAX_FRAMES],
};

// "frames 100 → 102 (must be a multiple of 17)": the rule in the words of video_shape.request_error.
function snapNote(name, before, after, min, max) {
    const step = RULES[name][0];
    const rule = before < min ? `must be at least ${min}` : before > max ? `must be at most ${max}` : `must be a multiple of ${step}`;
    return `${name} ${before} → ${after} (${rule})`;
}

// Snap one widget in place; returns a note when the value changed.
function snapWidget(node, name) {
    const w = widget(node, name);
    if (!w) return null;
    const [step, fmin, fmax] = RULES[name];
    const [min, max] = limits(w, step, fmin, fmax);
    const before = w.value;
    const after = snap(before, step, min, max);
    if (after === before) return null;
    w.value = after;
    return snapNote(name, before, after, min, max);
}

function makeLine(cls) {
    const el = document.createElement("div");
    el.className = cls;
    el.style.whiteSpace = "pre";
    return el;
}

function setupNode(node) {
    if (node.__stepvideoHelper) return;
    const state = { notes: [], signature: "" };
    node.__stepvideoHelper = state;

    // --- presets (UI only) --------------------------------------------------------------------------------------
    const resValues = [CUSTOM, ...RESOLUTION_PRESETS.map((p) => p[0])];
    const resWidget = node.addWidget(
        "combo",
        RES_WIDGET,
        CUSTOM,
        (value) => {
            const preset = RESOLUTION_PRESETS.find((p) => p[0] === value);
            if (!preset) return;
            setValue(node, "width", preset[1]);
            setValue(node, "height", preset[2]);
            state.notes = [];
            refresh(node, true);
        },
        { values: resValues, serialize: false },
    );
    resWidget.serialize = false;
    resWidget.serializeValue = () => undefined;

    const frameValues = [CUSTOM, ...FRAME_PRESETS.map((p) => p[0])];
    const framesWidget = node.addWidget(
        "combo",
        FRAMES_WIDGET,
        CUSTOM,
        (value) => {
            const preset = FRAME_PRESETS.find((p) => p[0] === value);
            if (!preset) return;
            setValue(node, "frames", preset[1]);
            state.notes = [];
            refresh(node, true);
        },
        { values: frameValues, serialize: false },
    );
    framesWidget.serialize = false;
    framesWidget.serializeValue = () => undefined;

    // --- info panel (UI only) -----------------------------------------------------------------------------------
    const box = document.createElement("div");
    box.className = "stepvideo-latent-info";
    Object.assign(box.style, {
        font: "11px monospace",
        lineHeight: "1.45",
        color: "var(--descrip-text, #aaa)",
        padding: "4px 6px",
        boxSizing: "border-box",
        overflow: "hidden",
    });
    const lines = {
        duration: makeLine("stepvideo-duration"),
        shape: makeLine("stepvideo-shape"),
        tokens: makeLine("stepvideo-tokens"),
        warn: makeLine("stepvideo-warn"),
    };
    lines.warn.style.color = "var(--error-text, #f0a040)";
    for (const el of Object.values(lines)) box.appendChild(el);
    state.lines = lines;

    const info = node.addDOMWidget(INFO_WIDGET, "stepvideo-info", box, {
        serialize: false,
        hideOnZoom: false,
        getValue: () => undefined,
        setValue: () => {},
        getMinHeight: () => 76,
        getMaxHeight: () => 96,
    });
    info.serialize = false;
    info.serializeValue = () => undefined;

    // --- snapping of the real widgets ---------------------------------------------------------------------------
    for (const name of Object.keys(RULES)) {
        const w = widget(node, name);
        if (!w) continue;
        const original = w.callback;
        w.callback = function (value, ...rest) {
            const result = original?.apply(this, [value, ...rest]);
            const note = snapWidget(node, name);
            // the core INT widget may already have rounded to its step; report what the user typed
            const typed = Number(value);
            if (note) state.notes = [note];
            else if (Number.isFinite(typed) && typed !== w.value) {
                const [min, max] = limits(w, RULES[name][0], RULES[name][1], RULES[name][2]);
                state.notes = [snapNote(name, typed, w.value, min, max)];
            } else state.notes = [];
            refresh(node, true);
            return result;
        };
    }
    const bw = widget(node, "batch_size");
    if (bw) {
        const original = bw.callback;
        bw.callback = function (...args) {
            const result = original?.apply(this, args);
            refresh(node, true);
            return result;
        };
    }

    // keep the panel right whatever changed the values (loading a workflow, links, undo)
    const onDrawForeground = node.onDrawForeground;
    node.onDrawForeground = function (...args) {
        refresh(node, false);
        return onDrawForeground?.apply(this, args);
    };
    refresh(node, true);
}

function setValue(node, name, value) {
    const w = widget(node, name);
    if (!w) return;
    w.value = value;
    node.graph?.setDirtyCanvas?.(true, true);
}

// Snap values that came from a saved workflow (the callbacks do not run on load).
function snapAll(node) {
    const notes = [];
    for (const name of Object.keys(RULES)) {
        if (isLinked(node, name)) continue;
        const note = snapWidget(node, name);
        if (note) notes.push(note);
    }
    return notes;
}

function refresh(node, force) {
    const state = node.__stepvideoHelper;
    if (!state?.lines) return;
    const value = (name) => widget(node, name)?.value;
    const linked = Object.fromEntries(["width", "height", "frames", "batch_size"].map((n) => [n, isLinked(node, n)]));
    const signature = JSON.stringify([value("width"), value("height"), value("frames"), value("batch_size"), linked]);
    if (!force && signature === state.signature) return;
    if (!force) {
        const notes = snapAll(node);
        if (notes.length) state.notes = notes;
    }
    state.signature = JSON.stringify([value("width"), value("height"), value("frames"), value("batch_size"), linked]);

    const width = Number(value("width"));
    const height = Number(value("height"));
    const frames = Number(value("frames"));
    const batch = Number(value("batch_size") ?? 1);
    const { lines } = state;

    // keep the preset combos in step with the values
    const res = RESOLUTION_PRESETS.find((p) => p[1] === width && p[2] === height);
    const rw = widget(node, RES_WIDGET);
    if (rw) rw.value = res ? res[0] : CUSTOM;
    const fp = FRAME_PRESETS.find((p) => p[1] === frames);
    const fw = widget(node, FRAMES_WIDGET);
    if (fw) fw.value = fp ? fp[0] : CUSTOM;

    if (linked.width || linked.height || linked.frames || linked.batch_size) {
        lines.duration.textContent = "size comes from a link: computed when the graph runs";
        lines.shape.textContent = "";
        lines.tokens.textContent = "";
    } else {
        const i = latentInfo(width, height, frames, batch);
        lines.duration.textContent = `${frames} frames = ${i.seconds.toFixed(2)} s at ${FPS} fps, ${width}×${height}`;
        lines.shape.textContent = `latent [${i.shape.join(", ")}]`;
        lines.tokens.textContent =
            `DiT tokens ${i.tokens.toLocaleString("en-US")}` +
            ` (${((100 * i.tokens) / OFFICIAL_TOKENS).toFixed(0)}% of 992×544×204)`;
    }
    const warnings = [...state.notes];
    if (!linked.frames && frames > MAX_TRAINED_FRAMES) warnings.push(`more than ${MAX_TRAINED_FRAMES} frames: beyond training`);
    lines.warn.textContent = warnings.join("; ");
    node.graph?.setDirtyCanvas?.(true, false);
}

app.registerExtension({
    name: "stepvideo.latentHelper",
    async beforeRegisterNodeDef(nodeType, nodeData) {
        if (nodeData?.name !== NODE_ID) return;
        const onNodeCreated = nodeType.prototype.onNodeCreated;
        nodeType.prototype.onNodeCreated = function (...args) {
            const result = onNodeCreated?.apply(this, args);
            setupNode(this);
            return result;
        };
        const onConfigure = nodeType.prototype.onConfigure;
        nodeType.prototype.onConfigure = function (...args) {
            const result = onConfigure?.apply(this, args);
            setupNode(this);
            const state = this.__stepvideoHelper;
            const notes = snapAll(this);
            state.notes = notes;
            refresh(this, true);
            return result;
        };
    },
});
