// PainterNet frontend extension (ES module, no build step; ComfyUI serves it from the pack's WEB_DIRECTORY).
//
// PainterNetBoxMask gets an editor widget: the image the node saw on its last run (its ui.images temp preview), the
// image shown by the node feeding it (e.g. Load Image) before that, or a blank canvas. Drag boxes ("Box") or paint
// strokes ("Brush"), undo, clear. The drawing lives in the node's `shapes` STRING widget as normalised JSON (see
// painternet_core/shapes.py), so it is saved with the workflow and sent with the prompt like any widget value; the
// editor only reads and writes that value, it keeps no copy of its own.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const EXTENSION = "PainterNet.Web";
const BOX_MASK_NODE = "PainterNetBoxMask";
const SHAPES_WIDGET = "shapes";
const INVERT_WIDGET = "invert";
const EDITOR_WIDGET = "painternet_editor";
const FORMAT_VERSION = 1;
// Blank canvas before any image is known (no run yet, nothing displayed upstream): square.
const BLANK_SIZE = [512, 512];
// Normalised values are written with 5 decimals: 0.1 px on a 10k image, and a short JSON string in the workflow.
const DECIMALS = 5;
// A box smaller than this (fraction of the image) is a click, not a drag, and is ignored.
const MIN_BOX = 0.002;
// A new stroke point is kept once the pointer moved this far (fraction of the canvas' short side).
const MIN_STEP = 0.003;
const DEFAULT_BRUSH = 0.05;
const BRUSH_RANGE = [0.005, 0.3];
const FILL = "rgba(255, 72, 72, 1)";
const OVERLAY_ALPHA = 0.45;
const EDITOR_MIN_HEIGHT = 240;
const HISTORY_LIMIT = 100;
// The backend refuses a shapes document above painternet_core.shapes.MAX_JSON_CHARS (4 MiB): the editor neither
// parses a longer one (a shared workflow may hold anything) nor writes one (the run would fail).
const MAX_JSON_CHARS = 4 * 2 ** 20;

const round = (v) => Math.round(v * 10 ** DECIMALS) / 10 ** DECIMALS;
const clamp01 = (v) => Math.min(1, Math.max(0, v));

function viewUrl(ref) {
  const params = new URLSearchParams({
    filename: ref.filename, subfolder: ref.subfolder ?? "", type: ref.type ?? "temp",
  });
  return api.apiURL(`/view?${params}&rand=${Math.random()}`);
}

const isNumber = (v) => typeof v === "number" && Number.isFinite(v);
const isPoint = (p) => Array.isArray(p) && p.length === 2 && isNumber(p[0]) && isNumber(p[1]);

function isDrawable(s) {
  // Only shapes the editor can paint; a shared workflow may hold anything (null points, objects, strings).
  if (!s || typeof s !== "object") return false;
  if (s.type === "box") return [s.x, s.y, s.w, s.h].every(isNumber);
  if (s.type === "stroke") return isNumber(s.width) && Array.isArray(s.points) && s.points.length > 0
    && s.points.every(isPoint);
  return false;
}

// The picture an upstream node displays: its previews (canvas-drawn nodes keep them in `imgs`) or, when those are
// not there (Nodes 2.0 renders nodes with Vue and keeps previews elsewhere), the input file its `image` combo names
// (Load Image).
function upstreamImageSrc(upstream) {
  const shown = upstream?.imgs?.[upstream.imageIndex ?? 0]?.src;
  if (shown) return shown;
  const widget = upstream?.widgets?.find((w) => w.name === "image" && w.type === "combo");
  if (typeof widget?.value !== "string" || !widget.value) return null;
  const name = widget.value.replace(/\s*\[(input|output|temp)\]$/, "");
  const cut = name.lastIndexOf("/");
  const params = new URLSearchParams({
    filename: name.slice(cut + 1), subfolder: cut >= 0 ? name.slice(0, cut) : "", type: "input",
  });
  return api.apiURL(`/view?${params}`);
}

function parseShapes(text) {
  // The backend validates strictly and reports errors on run; here bad values are skipped (with a console warning)
  // so a malformed shared workflow still loads instead of stopping the frontend with an error dialog.
  if (!text || !String(text).trim()) return [];
  if (String(text).length > MAX_JSON_CHARS) {
    console.warn(`[${EXTENSION}] shapes widget holds ${String(text).length} characters, more than the `
      + `${MAX_JSON_CHARS} the backend accepts; showing no shapes (Clear to start over)`);
    return [];
  }
  let list;
  try {
    const data = JSON.parse(text);
    list = Array.isArray(data) ? data : data?.shapes;
  } catch (error) {
    console.warn(`[${EXTENSION}] shapes widget holds invalid JSON, showing no shapes:`, error);
    return [];
  }
  if (!Array.isArray(list)) {
    console.warn(`[${EXTENSION}] shapes widget holds no shape list, showing no shapes`);
    return [];
  }
  const shapes = list.filter(isDrawable);
  if (shapes.length !== list.length) {
    console.warn(`[${EXTENSION}] ignored ${list.length - shapes.length} malformed shape(s) of ${list.length}`);
  }
  return shapes;
}

function button(label, title, onClick) {
  const el = document.createElement("button");
  el.type = "button";
  el.textContent = label;
  el.title = title;
  Object.assign(el.style, {
    padding: "2px 8px", fontSize: "12px", borderRadius: "4px", cursor: "pointer",
    border: "1px solid var(--border-color, #555)", background: "var(--comfy-input-bg, #222)",
    color: "var(--input-text, #ddd)",
  });
  el.addEventListener("click", (e) => { e.stopPropagation(); onClick(); });
  return el;
}

class ShapeEditor {
  constructor(node) {
    this.node = node;
    this.shapesWidget = node.widgets?.find((w) => w.name === SHAPES_WIDGET);
    this.invertWidget = node.widgets?.find((w) => w.name === INVERT_WIDGET);
    this.history = [];
    this.draft = null;
    this.parsedText = undefined; // the widget value `parsed` was made from: parse once per change, not per redraw
    this.parsed = [];
    this.image = null;         // HTMLImageElement being shown
    this.imageSource = "none"; // "none" | "upstream" | "run": what the canvas shows, exposed for tests
    this.upstreamSrc = null;
    node.properties ??= {};
    node.properties.painternet_mode ??= "box";
    node.properties.painternet_brush ??= DEFAULT_BRUSH;
    this.buildDom();
    if (this.shapesWidget) {
      // The JSON stays the single source of truth, but a one-line text box of it only gets in the way.
      this.shapesWidget.hidden = true;
      this.shapesWidget.computeSize = () => [0, -4];
    }
    if (this.invertWidget) {
      const callback = this.invertWidget.callback;
      this.invertWidget.callback = (...args) => {
        const result = callback?.apply(this.invertWidget, args);
        this.draw();
        return result;
      };
    }
    this.widget = node.addDOMWidget(EDITOR_WIDGET, EDITOR_WIDGET, this.root, {
      serialize: false,
      hideOnZoom: false,
      getMinHeight: () => EDITOR_MIN_HEIGHT,
    });
    this.widget.serialize = false;
    this.widget.onRemove = () => this.resizeObserver?.disconnect();
  }

  // ---------------------------------------------------------------- DOM

  buildDom() {
    const root = document.createElement("div");
    root.className = "painternet-editor";
    Object.assign(root.style, { display: "flex", flexDirection: "column", gap: "4px", width: "100%", height: "100%",
                                boxSizing: "border-box" });
    const bar = document.createElement("div");
    Object.assign(bar.style, { display: "flex", flexWrap: "wrap", alignItems: "center", gap: "4px", fontSize: "12px",
                               color: "var(--input-text, #ddd)" });
    this.boxButton = button("Box", "Drag rectangles on the image", () => this.setMode("box"));
    this.brushButton = button("Brush", "Paint strokes with the brush width on the right", () => this.setMode("stroke"));
    this.brushInput = document.createElement("input");
    Object.assign(this.brushInput, { type: "range", min: String(BRUSH_RANGE[0]), max: String(BRUSH_RANGE[1]),
                                     step: "0.005", title: "Brush diameter, as a fraction of the image's short side" });
    this.brushInput.style.width = "70px";
    this.brushInput.value = String(this.node.properties.painternet_brush);
    this.brushInput.addEventListener("input", () => {
      this.node.properties.painternet_brush = Number(this.brushInput.value);
      this.updateStatus();
    });
    this.brushInput.addEventListener("pointerdown", (e) => e.stopPropagation());
    const undo = button("Undo", "Undo the last change (shape or clear)", () => this.undo());
    const clear = button("Clear", "Remove every shape", () => this.commit([]));
    this.status = document.createElement("span");
    Object.assign(this.status.style, { opacity: "0.75", marginLeft: "auto", whiteSpace: "nowrap" });
    bar.append(this.boxButton, this.brushButton, this.brushInput, undo, clear, this.status);

    const stage = document.createElement("div");
    Object.assign(stage.style, { flex: "1 1 auto", minHeight: "0", position: "relative", display: "flex",
                                 alignItems: "center", justifyContent: "center", overflow: "hidden" });
    const canvas = document.createElement("canvas");
    canvas.className = "painternet-editor-canvas";
    Object.assign(canvas.style, { display: "block", cursor: "crosshair", touchAction: "none" });
    stage.append(canvas);
    root.append(bar, stage);
    this.root = root;
    this.stage = stage;
    this.canvas = canvas;
    this.overlay = document.createElement("canvas");

    canvas.addEventListener("pointerdown", (e) => this.onPointerDown(e));
    canvas.addEventListener("pointermove", (e) => this.onPointerMove(e));
    canvas.addEventListener("pointerup", (e) => this.onPointerUp(e));
    canvas.addEventListener("pointercancel", () => { this.draft = null; this.draw(); });
    this.resizeObserver = new ResizeObserver(() => this.layout());
    this.resizeObserver.observe(stage);
    this.setMode(this.node.properties.painternet_mode);
  }

  setMode(mode) {
    this.node.properties.painternet_mode = mode === "stroke" ? "stroke" : "box";
    const active = this.node.properties.painternet_mode;
    for (const [el, m] of [[this.boxButton, "box"], [this.brushButton, "stroke"]]) {
      el.style.outline = m === active ? "2px solid var(--p-primary-color, #4a9eff)" : "none";
      el.setAttribute("aria-pressed", String(m === active));
    }
    this.brushInput.disabled = active !== "stroke";
    this.updateStatus();
  }

  imageSize() {
    return this.image ? [this.image.naturalWidth, this.image.naturalHeight] : BLANK_SIZE;
  }

  layout() {
    // Fit the image's aspect ratio inside the stage; the canvas is exactly the image area, so a pointer position
    // divided by the canvas size is the normalised coordinate the backend expects.
    const [iw, ih] = this.imageSize();
    const sw = this.stage.clientWidth;
    const sh = this.stage.clientHeight;
    if (sw < 2 || sh < 2) return;
    const scale = Math.min(sw / iw, sh / ih);
    const cw = Math.max(1, Math.floor(iw * scale));
    const ch = Math.max(1, Math.floor(ih * scale));
    this.canvas.style.width = `${cw}px`;
    this.canvas.style.height = `${ch}px`;
    const rect = this.canvas.getBoundingClientRect();
    const dpr = window.devicePixelRatio || 1;
    // Backing store at screen resolution (the widget is CSS-scaled with the graph's zoom).
    const bw = Math.max(1, Math.round(Math.max(rect.width, cw) * dpr));
    const bh = Math.max(1, Math.round(Math.max(rect.height, ch) * dpr));
    if (this.canvas.width !== bw || this.canvas.height !== bh) {
      this.canvas.width = bw;
      this.canvas.height = bh;
      this.overlay.width = bw;
      this.overlay.height = bh;
    }
    this.draw();
  }

  // ---------------------------------------------------------------- images

  setImage(url, source) {
    const img = new Image();
    img.onload = () => {
      this.image = img;
      this.imageSource = source;
      this.layout();
      this.updateStatus();
    };
    img.onerror = () => console.warn(`[${EXTENSION}] could not load the preview ${url}`);
    img.src = url;
  }

  // Called every frame the node is drawn. Shows the upstream node's displayed image (e.g. Load Image's preview)
  // before the first run, and again whenever it changes afterwards (a new file picked), so the editor never keeps
  // a stale run preview of a picture that is no longer connected.
  pollUpstream() {
    const slot = this.node.inputs?.findIndex((input) => input.name === "image") ?? -1;
    const upstream = slot >= 0 ? this.node.getInputNode(slot) : null;
    const src = upstreamImageSrc(upstream);
    if (src && src !== this.upstreamSrc) {
      this.upstreamSrc = src;
      this.setImage(src, "upstream");
    }
  }

  // ---------------------------------------------------------------- shapes <-> widget

  get shapes() {
    // Every redraw (each pointer move) reads the shapes; the widget value changes only on a commit, an undo or a
    // workflow load, so it is parsed when it differs from the last one parsed.
    const text = this.shapesWidget?.value;
    if (text !== this.parsedText) {
      this.parsed = parseShapes(text);
      this.parsedText = text;
    }
    return this.parsed;
  }

  commit(shapes, { record = true } = {}) {
    if (!this.shapesWidget) return;
    const before = this.shapesWidget.value;
    const after = JSON.stringify({ version: FORMAT_VERSION, shapes });
    if (before === after) return;
    if (after.length > MAX_JSON_CHARS) {
      console.warn(`[${EXTENSION}] the drawing would be ${after.length} characters, more than the `
        + `${MAX_JSON_CHARS} the backend accepts; the shape was not added (undo, clear or use fewer strokes)`);
      this.limitReached = true;
      this.draw();
      return;
    }
    this.limitReached = false;
    if (record) {
      this.history.push(before);
      if (this.history.length > HISTORY_LIMIT) this.history.shift();
    }
    this.shapesWidget.value = after;
    this.shapesWidget.callback?.(after);
    this.node.setDirtyCanvas?.(true, true);
    this.draw();
  }

  undo() {
    if (!this.history.length) return;
    this.commit(parseShapes(this.history.pop()), { record: false });
  }

  // ---------------------------------------------------------------- pointer

  toNormalised(e) {
    const rect = this.canvas.getBoundingClientRect();
    return [clamp01((e.clientX - rect.left) / rect.width), clamp01((e.clientY - rect.top) / rect.height)];
  }

  onPointerDown(e) {
    if (e.button !== 0) return;
    e.preventDefault();
    e.stopPropagation();
    this.canvas.setPointerCapture?.(e.pointerId);
    const [x, y] = this.toNormalised(e);
    this.draft = this.node.properties.painternet_mode === "stroke"
      ? { type: "stroke", width: round(Number(this.node.properties.painternet_brush)), points: [[round(x), round(y)]] }
      : { type: "box", x0: x, y0: y, x1: x, y1: y };
    this.draw();
  }

  onPointerMove(e) {
    if (!this.draft) return;
    e.preventDefault();
    e.stopPropagation();
    const [x, y] = this.toNormalised(e);
    if (this.draft.type === "box") {
      this.draft.x1 = x;
      this.draft.y1 = y;
    } else {
      const [px, py] = this.draft.points[this.draft.points.length - 1];
      const [iw, ih] = this.imageSize();
      const short = Math.min(iw, ih);
      if (Math.hypot((x - px) * iw, (y - py) * ih) / short < MIN_STEP) return;
      this.draft.points.push([round(x), round(y)]);
    }
    this.draw();
  }

  onPointerUp(e) {
    const draft = this.draft;
    if (!draft) return;
    this.draft = null;
    this.canvas.releasePointerCapture?.(e.pointerId);
    const [x, y] = this.toNormalised(e);
    let shape = null;
    if (draft.type === "box") {
      draft.x1 = x;
      draft.y1 = y;
      const x0 = Math.min(draft.x0, draft.x1);
      const y0 = Math.min(draft.y0, draft.y1);
      const w = Math.abs(draft.x1 - draft.x0);
      const h = Math.abs(draft.y1 - draft.y0);
      if (w >= MIN_BOX && h >= MIN_BOX) {
        shape = { type: "box", x: round(x0), y: round(y0), w: round(w), h: round(h) };
      }
    } else {
      shape = draft;
    }
    if (shape) this.commit([...this.shapes, shape]);
    else this.draw();
  }

  // ---------------------------------------------------------------- drawing

  draw() {
    const { canvas, overlay } = this;
    const ctx = canvas.getContext("2d");
    const W = canvas.width;
    const H = canvas.height;
    ctx.clearRect(0, 0, W, H);
    if (this.image) {
      ctx.drawImage(this.image, 0, 0, W, H);
    } else {
      ctx.fillStyle = "#2a2a2a";
      ctx.fillRect(0, 0, W, H);
      ctx.fillStyle = "#888";
      ctx.font = `${Math.max(10, Math.round(W / 28))}px sans-serif`;
      ctx.textAlign = "center";
      ctx.fillText("Draw here; run once to see the image", W / 2, H / 2);
    }
    const shapes = this.shapes;
    const draftShape = this.draftAsShape();
    const all = draftShape ? [...shapes, draftShape] : shapes;
    const invert = Boolean(this.invertWidget?.value);

    // Shapes are drawn opaque on an offscreen canvas and composited once, so overlaps do not darken.
    const o = overlay.getContext("2d");
    o.clearRect(0, 0, W, H);
    o.globalCompositeOperation = "source-over";
    if (invert) {
      o.fillStyle = FILL;
      o.fillRect(0, 0, W, H);
      o.globalCompositeOperation = "destination-out";
    }
    o.fillStyle = FILL;
    o.strokeStyle = FILL;
    o.lineCap = "round";
    o.lineJoin = "round";
    for (const s of all) this.paintShape(o, s, W, H);
    o.globalCompositeOperation = "source-over";
    ctx.save();
    ctx.globalAlpha = OVERLAY_ALPHA;
    ctx.drawImage(overlay, 0, 0);
    ctx.restore();
    // Box outlines stay visible even where boxes overlap.
    ctx.strokeStyle = "rgba(255, 255, 255, 0.9)";
    ctx.lineWidth = Math.max(1, Math.round((window.devicePixelRatio || 1)));
    for (const s of all) {
      if (s.type === "box") ctx.strokeRect(s.x * W, s.y * H, s.w * W, s.h * H);
    }
    this.updateStatus();
  }

  draftAsShape() {
    const d = this.draft;
    if (!d) return null;
    if (d.type === "stroke") return d;
    return { type: "box", x: Math.min(d.x0, d.x1), y: Math.min(d.y0, d.y1), w: Math.abs(d.x1 - d.x0),
             h: Math.abs(d.y1 - d.y0) };
  }

  paintShape(ctx, s, W, H) {
    if (s.type === "box") {
      ctx.fillRect(s.x * W, s.y * H, s.w * W, s.h * H);
      return;
    }
    const points = s.points ?? [];
    if (!points.length) return;
    ctx.lineWidth = Math.max(1, s.width * Math.min(W, H));
    ctx.beginPath();
    ctx.moveTo(points[0][0] * W, points[0][1] * H);
    // A one-point stroke is a dot: a zero-length segment with round caps.
    for (const [x, y] of points.length > 1 ? points.slice(1) : points) ctx.lineTo(x * W, y * H);
    ctx.stroke();
  }

  updateStatus() {
    if (!this.status) return;
    const [iw, ih] = this.imageSize();
    const n = this.shapes.length;
    const size = this.image ? `${iw}×${ih}` : "no image yet";
    const brush = this.node.properties.painternet_mode === "stroke"
      ? ` · brush ${Math.round(Number(this.node.properties.painternet_brush) * 1000) / 10}%` : "";
    const full = this.limitReached ? " · size limit reached" : "";
    this.status.textContent = `${n} shape${n === 1 ? "" : "s"} · ${size}${brush}${full}`;
  }
}

app.registerExtension({
  name: EXTENSION,
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData?.name !== BOX_MASK_NODE) return;

    const onNodeCreated = nodeType.prototype.onNodeCreated;
    nodeType.prototype.onNodeCreated = function () {
      const result = onNodeCreated?.apply(this, arguments);
      this.painternetEditor = new ShapeEditor(this);
      // Nodes 2.0 never calls onDrawForeground (the canvas does not draw Vue-rendered nodes): poll on a timer too.
      this.painternetPoll = setInterval(() => this.painternetEditor?.pollUpstream(), 300);
      const [w, h] = this.size;
      this.setSize([Math.max(w, 340), Math.max(h, EDITOR_MIN_HEIGHT + 110)]);
      return result;
    };

    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (output) {
      const result = onExecuted?.apply(this, arguments);
      const ref = output?.images?.[0];
      if (ref) this.painternetEditor?.setImage(viewUrl(ref), "run");
      return result;
    };

    const onConfigure = nodeType.prototype.onConfigure;
    nodeType.prototype.onConfigure = function () {
      const result = onConfigure?.apply(this, arguments);
      // Loading a workflow restores the widget value (and the properties) after the editor was built.
      const editor = this.painternetEditor;
      if (editor) {
        editor.setMode(this.properties?.painternet_mode);
        editor.brushInput.value = String(this.properties?.painternet_brush ?? DEFAULT_BRUSH);
        editor.draw();
      }
      return result;
    };

    const onRemoved = nodeType.prototype.onRemoved;
    nodeType.prototype.onRemoved = function () {
      clearInterval(this.painternetPoll);
      return onRemoved?.apply(this, arguments);
    };

    const onDrawForeground = nodeType.prototype.onDrawForeground;
    nodeType.prototype.onDrawForeground = function () {
      const result = onDrawForeground?.apply(this, arguments);
      this.painternetEditor?.pollUpstream();
      return result;
    };

    // The editor shows the run's preview itself; without this the frontend would draw the same image again below it.
    nodeType.prototype.onDrawBackground = function () {};
  },
});
