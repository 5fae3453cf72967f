// maskaudit reader study: image viewer (zoom, window/level) and keyboard shortcuts. No external code.
"use strict";
(function () {
  const form = document.getElementById("answers");
  if (!form) return;
  const viewer = document.getElementById("viewer");
  const canvas = document.getElementById("canvas");
  const source = document.getElementById("source");
  const gray = viewer.dataset.kind === "gray";
  // 16-bit gray arrives packed (red = high byte, green = low byte): window/level on the full depth
  const deep = gray && viewer.dataset.depth === "16";
  const top = deep ? 65535 : 255;
  const windowInput = document.getElementById("window");
  const levelInput = document.getElementById("level");
  const ctx = canvas.getContext("2d");
  let pixels = null;  // the original ImageData
  let zoom = 1;

  function fit() {
    if (!source.naturalWidth) return 1;
    const w = viewer.clientWidth - 4, h = viewer.clientHeight - 4;
    return Math.max(0.05, Math.min(w / source.naturalWidth, h / source.naturalHeight));
  }
  function layout() {
    const scale = fit() * zoom;
    canvas.style.width = Math.round(source.naturalWidth * scale) + "px";
    canvas.style.height = Math.round(source.naturalHeight * scale) + "px";
  }
  function render() {
    if (!pixels) return;
    if (!gray) { ctx.putImageData(pixels, 0, 0); return; }
    const w = Number(windowInput.value), l = Number(levelInput.value);
    const low = l - w / 2, lut = new Uint8ClampedArray(top + 1);
    for (let v = 0; v <= top; v++) lut[v] = Math.round(((v - low) / w) * 255);
    const out = ctx.createImageData(pixels.width, pixels.height), src = pixels.data, dst = out.data;
    for (let i = 0; i < src.length; i += 4) {
      const v = lut[deep ? src[i] * 256 + src[i + 1] : src[i]];
      dst[i] = v; dst[i + 1] = v; dst[i + 2] = v; dst[i + 3] = 255;
    }
    ctx.putImageData(out, 0, 0);
  }
  function load() {
    canvas.width = source.naturalWidth;
    canvas.height = source.naturalHeight;
    ctx.drawImage(source, 0, 0);
    pixels = ctx.getImageData(0, 0, canvas.width, canvas.height);
    canvas.dataset.loaded = "1";
    layout();
    render();
  }
  if (source.complete && source.naturalWidth) load(); else source.addEventListener("load", load);
  window.addEventListener("resize", layout);

  function setZoom(z) { zoom = Math.min(20, Math.max(0.2, z)); layout(); }
  function reset() {
    zoom = 1;
    if (gray) { windowInput.value = top; levelInput.value = (top + 1) / 2; }
    layout(); render();
  }
  document.getElementById("zoom-in").addEventListener("click", () => setZoom(zoom * 1.25));
  document.getElementById("zoom-out").addEventListener("click", () => setZoom(zoom / 1.25));
  document.getElementById("reset").addEventListener("click", reset);
  viewer.addEventListener("wheel", (e) => { e.preventDefault(); setZoom(zoom * (e.deltaY < 0 ? 1.15 : 1 / 1.15)); },
                          { passive: false });
  if (gray) {
    windowInput.addEventListener("input", render);
    levelInput.addEventListener("input", render);
    let drag = null;
    canvas.addEventListener("pointerdown", (e) => {
      drag = { x: e.clientX, y: e.clientY, w: Number(windowInput.value), l: Number(levelInput.value) };
      canvas.setPointerCapture(e.pointerId);
    });
    canvas.addEventListener("pointermove", (e) => {
      if (!drag) return;
      const step = top / 255;  // one screen pixel of drag moves as much of the range at either depth
      windowInput.value = Math.round(drag.w + (e.clientX - drag.x) * step);
      levelInput.value = Math.round(drag.l - (e.clientY - drag.y) * step);
      render();
    });
    canvas.addEventListener("pointerup", () => { drag = null; });
  }

  // ---------------------------------------------------------------- answers and keys
  const rows = Array.from(form.querySelectorAll(".class-row"));
  let active = 0, dirty = false;
  form.addEventListener("change", () => { dirty = true; });
  function highlight(k) {
    active = Math.max(0, Math.min(rows.length - 1, k));
    rows.forEach((row, i) => row.classList.toggle("active", i === active));
  }
  const firstOpen = rows.findIndex((row) => !row.querySelector("input[type=radio]:checked"));
  highlight(firstOpen < 0 ? 0 : firstOpen);
  rows.forEach((row, i) => row.addEventListener("click", () => highlight(i)));

  function choose(name, value) {
    const input = form.querySelector(`input[name="${name}"][value="${value}"]`);
    if (input) { input.checked = true; dirty = true; }
  }
  function submit(go) {
    const button = document.createElement("input");
    button.type = "hidden"; button.name = "go"; button.value = go;
    form.appendChild(button);
    form.submit();
  }
  function navigate(go) {
    if (dirty) { submit(go); return; }
    const link = document.getElementById(go);
    if (link) window.location.href = link.href;
  }
  const answerKeys = { p: "present", a: "absent", c: "cannot_tell" };
  document.addEventListener("keydown", (e) => {
    const typing = e.target instanceof HTMLTextAreaElement;
    if (typing) { if (e.key === "Escape") e.target.blur(); return; }
    if (e.ctrlKey || e.metaKey || e.altKey) return;
    const key = e.key;
    if (key === "Enter") { e.preventDefault(); submit("next"); return; }
    if (key === "ArrowLeft") { e.preventDefault(); navigate("prev"); return; }
    if (key === "ArrowRight") { e.preventDefault(); navigate("next"); return; }
    if (key === "ArrowDown") { e.preventDefault(); highlight(active + 1); return; }
    if (key === "ArrowUp") { e.preventDefault(); highlight(active - 1); return; }
    if (key === "+" || key === "=") { setZoom(zoom * 1.25); return; }
    if (key === "-") { setZoom(zoom / 1.25); return; }
    if (key === "0") { reset(); return; }
    const lower = key.toLowerCase();
    if (lower in answerKeys) { choose(`answer_${active}`, answerKeys[lower]); return; }
    if (e.shiftKey && /^Digit[1-9]$/.test(e.code)) { highlight(Number(e.code.slice(5)) - 1); return; }
    if (/^[1-5]$/.test(key)) {
      choose(`confidence_${active}`, key);
      if (active < rows.length - 1) highlight(active + 1);
    }
  });
})();
