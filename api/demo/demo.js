/* The demo page of the face recognition service: plain JavaScript (no build step, nothing loaded from
 * elsewhere). It only calls the service's public API, the way any client would. */
"use strict";

(() => {
  const ROOT = new URL(".", window.location.href); // the service root, also behind a path prefix
  const KEY_STORAGE = "face-demo:api-key";
  const MAX_PHOTOS = 10; // the service's default FACE_MAX_FILES_PER_REQUEST
  const EMOTION_COLORS = {
    angry: "#d7263d",
    disgust: "#6a994e",
    fear: "#7b2cbf",
    happy: "#a86a00",
    sad: "#1d70b8",
    surprise: "#c2410c",
    neutral: "#4a5560",
  };
  const CAMERA_ERRORS = {
    NotAllowedError: "CAMERA_DENIED",
    NotFoundError: "CAMERA_NOT_FOUND",
    NotReadableError: "CAMERA_BUSY",
    OverconstrainedError: "CAMERA_NOT_FOUND",
  };
  const LIVE_COLOR = "#1b873f";
  const SPOOF_COLOR = "#c62828";
  const MATCH_COLOR = "#1b873f";
  const UNKNOWN_COLOR = "#b35c00";

  const $ = (id) => document.getElementById(id);

  const state = {
    photos: [], // {id, blob, name, source, url, image (HTMLImageElement or null when the browser cannot show it)}
    selectedId: null,
    compare: { a: null, b: null },
    stream: null,
    nextId: 1,
    captures: 0,
  };

  // --- helpers ------------------------------------------------------------------------------------------

  /** An element with attributes and children (strings become text: nothing is ever parsed as HTML). */
  function el(tag, attributes = {}, ...children) {
    const node = document.createElement(tag);
    for (const [name, value] of Object.entries(attributes)) {
      if (value !== null && value !== undefined && value !== false) node.setAttribute(name, String(value));
    }
    for (const child of children) {
      if (child !== null && child !== undefined) node.append(child);
    }
    return node;
  }

  class DemoError extends Error {
    constructor(code, message, details = null, status = 0) {
      super(message);
      this.code = code;
      this.details = details;
      this.status = status;
    }
  }

  function asDemoError(error) {
    if (error instanceof DemoError) return error;
    return new DemoError("PAGE_ERROR", error && error.message ? error.message : String(error));
  }

  const fixed = (value, digits = 3) => (typeof value === "number" ? value.toFixed(digits) : "–");
  const percent = (value) => `${Math.round(value * 100)}%`;

  // --- the API ------------------------------------------------------------------------------------------

  function apiKey() {
    return $("api-key").value.trim();
  }

  function collection() {
    return $("collection").value.trim();
  }

  /** Calls the service; resolves with the JSON body, or rejects with a DemoError carrying the service's
   * error code and message (`{"error": {"code", "message", "details"}}`). */
  async function callApi(path, { method = "GET", form = null, json = null, withCollection = false } = {}) {
    const url = new URL(path, ROOT);
    if (withCollection && collection()) url.searchParams.set("collection", collection());
    const headers = { Accept: "application/json" };
    if (apiKey()) headers["X-API-Key"] = apiKey();
    let body = null;
    if (form) body = form;
    if (json) {
      body = JSON.stringify(json);
      headers["Content-Type"] = "application/json";
    }
    let response;
    try {
      response = await fetch(url, { method, headers, body, cache: "no-store" });
    } catch (error) {
      throw new DemoError("NETWORK_ERROR", `The service could not be reached (${error.message}).`);
    }
    const text = await response.text();
    let payload = null;
    try {
      payload = text ? JSON.parse(text) : null;
    } catch {
      payload = null;
    }
    if (!response.ok) {
      const problem = payload && payload.error;
      if (problem && problem.code) {
        throw new DemoError(problem.code, problem.message || "", problem.details || null, response.status);
      }
      throw new DemoError(`HTTP_${response.status}`, text.slice(0, 300) || response.statusText, null, response.status);
    }
    return payload;
  }

  // --- errors -------------------------------------------------------------------------------------------

  function showError(error, context) {
    const problem = asDemoError(error);
    $("error-code").textContent = problem.code;
    $("error-context").textContent = problem.status ? `${context} · HTTP ${problem.status}` : context;
    $("error-message").textContent = problem.message;
    const details = $("error-details");
    if (problem.details && Object.keys(problem.details).length) {
      details.textContent = JSON.stringify(problem.details, null, 2);
      details.hidden = false;
    } else {
      details.textContent = "";
      details.hidden = true;
    }
    const banner = $("error");
    banner.dataset.code = problem.code;
    banner.hidden = false;
  }

  function clearError() {
    const banner = $("error");
    banner.hidden = true;
    delete banner.dataset.code;
  }

  /** Runs one user action: busy button, the result area's data-status (pending, ok, error), errors shown. */
  async function runAction(context, button, result, work) {
    clearError();
    button.disabled = true;
    button.setAttribute("aria-busy", "true");
    result.dataset.status = "pending";
    result.replaceChildren(el("p", { class: "muted" }, "Working…"));
    try {
      await work();
      result.dataset.status = "ok";
    } catch (error) {
      const problem = asDemoError(error);
      result.dataset.status = "error";
      result.dataset.code = problem.code;
      result.replaceChildren(
        el("p", { class: "result-error" }, el("strong", {}, problem.code), " ", problem.message),
      );
      showError(problem, context);
    } finally {
      button.disabled = false;
      button.removeAttribute("aria-busy");
    }
  }

  // --- status and collections ---------------------------------------------------------------------------

  let statusTimer = null;

  async function refreshStatus() {
    clearTimeout(statusTimer);
    const line = $("service-status");
    try {
      const status = await callApi("");
      const users = status.users === null || status.users === undefined ? "?" : status.users;
      const parts = [`v${status.version}`, `${users} ${users === 1 ? "user" : "users"}`, `${status.store} store`];
      if (status.ready) {
        line.dataset.state = "ready";
        line.textContent = `Ready · ${parts.join(" · ")}`;
      } else {
        line.dataset.state = "loading";
        line.textContent = `Loading models… · ${parts.join(" · ")}`;
        statusTimer = setTimeout(refreshStatus, 2000);
      }
    } catch (error) {
      line.dataset.state = "down";
      line.textContent = `Service unavailable (${asDemoError(error).code})`;
      statusTimer = setTimeout(refreshStatus, 5000);
    }
  }

  async function refreshCollections() {
    try {
      const list = await callApi("api/collections");
      $("collection-list").replaceChildren(
        ...list.map((c) => el("option", { value: c.name }, `${c.users} users, ${c.faces} faces`)),
      );
    } catch {
      // Listing needs an admin key; without one the field still takes any name.
    }
  }

  async function createCollection() {
    const name = collection();
    const note = $("collection-note");
    note.textContent = "";
    clearError();
    if (!name) {
      showError(new DemoError("COLLECTION_NAME_MISSING", "Type the new collection's name first."), "Create collection");
      return;
    }
    try {
      const created = await callApi("api/collections", { method: "POST", json: { name } });
      note.textContent = `Collection “${created.name}” created.`;
      refreshCollections();
    } catch (error) {
      showError(error, "Create collection");
    }
  }

  // --- photos -------------------------------------------------------------------------------------------

  function loadImage(url) {
    return new Promise((resolve) => {
      const image = new Image();
      image.onload = () => resolve(image);
      image.onerror = () => resolve(null); // not displayable here; the service still gets the file
      image.src = url;
    });
  }

  async function addPhoto(blob, name, source) {
    const url = URL.createObjectURL(blob);
    const image = await loadImage(url);
    const photo = { id: state.nextId++, blob, name, source, url, image };
    state.photos.push(photo);
    while (state.photos.length > MAX_PHOTOS) forgetPhoto(state.photos.shift());
    state.selectedId = photo.id;
    renderPhotos();
    return photo;
  }

  function forgetPhoto(photo) {
    if (photo !== state.compare.a && photo !== state.compare.b) URL.revokeObjectURL(photo.url);
  }

  function removePhoto(id) {
    const index = state.photos.findIndex((p) => p.id === id);
    if (index < 0) return;
    const [photo] = state.photos.splice(index, 1);
    forgetPhoto(photo);
    if (state.selectedId === id) {
      const next = state.photos[Math.min(index, state.photos.length - 1)];
      state.selectedId = next ? next.id : null;
    }
    renderPhotos();
  }

  function selectedPhoto() {
    const photo = state.photos.find((p) => p.id === state.selectedId);
    if (!photo) throw new DemoError("NO_PHOTO", "Capture or upload a photo first.");
    return photo;
  }

  function renderPhotos() {
    const items = state.photos.map((photo, index) => {
      const selected = photo.id === state.selectedId;
      const label = `Photo ${index + 1} (${photo.source}: ${photo.name})`;
      const pick = el(
        "button",
        { type: "button", class: "thumb", "aria-pressed": String(selected), "aria-label": label, title: label },
        photo.image ? el("img", { src: photo.url, alt: "" }) : el("span", { class: "thumb-name" }, photo.name),
      );
      pick.addEventListener("click", () => {
        state.selectedId = photo.id;
        renderPhotos();
      });
      const remove = el(
        "button",
        { type: "button", class: "thumb-remove", "aria-label": `Remove photo ${index + 1}` },
        "×",
      );
      remove.addEventListener("click", () => removePhoto(photo.id));
      return el("li", { "data-testid": "photo", "data-selected": String(selected) }, pick, remove);
    });
    $("photos").replaceChildren(...items);
    const count = state.photos.length;
    $("photo-count").textContent = String(count);
    $("register-count").textContent = `${count} ${count === 1 ? "photo" : "photos"}`;
  }

  // --- camera -------------------------------------------------------------------------------------------

  async function startCamera() {
    const note = $("camera-note");
    note.textContent = "";
    clearError();
    if (!navigator.mediaDevices || !navigator.mediaDevices.getUserMedia) {
      showError(
        new DemoError(
          "CAMERA_UNAVAILABLE",
          "This browser offers no camera here: it needs a secure context (https, or http on localhost).",
        ),
        "Camera",
      );
      return;
    }
    try {
      const stream = await navigator.mediaDevices.getUserMedia({ video: { facingMode: "user" }, audio: false });
      const video = $("camera");
      video.srcObject = stream;
      state.stream = stream;
      await video.play();
      if (!video.videoWidth) {
        await new Promise((resolve) => video.addEventListener("loadeddata", resolve, { once: true }));
      }
      $("camera-placeholder").hidden = true;
      $("camera-start").disabled = true;
      $("camera-stop").disabled = false;
      $("capture").disabled = false;
      note.textContent = `Camera on (${video.videoWidth}×${video.videoHeight}).`;
    } catch (error) {
      stopCamera();
      const code = CAMERA_ERRORS[error.name] || "CAMERA_ERROR";
      showError(new DemoError(code, `${error.name || "Error"}: ${error.message || error}`), "Camera");
    }
  }

  function stopCamera() {
    if (state.stream) state.stream.getTracks().forEach((track) => track.stop());
    state.stream = null;
    $("camera").srcObject = null;
    $("camera-placeholder").hidden = false;
    $("camera-start").disabled = false;
    $("camera-stop").disabled = true;
    $("capture").disabled = true;
    $("camera-note").textContent = "";
  }

  async function capture() {
    const video = $("camera");
    if (!state.stream || !video.videoWidth) return;
    const canvas = document.createElement("canvas");
    canvas.width = video.videoWidth;
    canvas.height = video.videoHeight;
    canvas.getContext("2d").drawImage(video, 0, 0, canvas.width, canvas.height);
    const blob = await new Promise((resolve) => canvas.toBlob(resolve, "image/jpeg", 0.92));
    if (!blob) return;
    state.captures += 1;
    await addPhoto(blob, `capture-${state.captures}.jpg`, "camera");
    $("camera-note").textContent = `Captured ${canvas.width}×${canvas.height}.`;
  }

  // --- drawing ------------------------------------------------------------------------------------------

  /** Draws the photo on the canvas with a box and a label per face: [{box: [x, y, w, h], label, color}]. */
  function drawFaces(canvas, photo, faces) {
    if (!photo.image) {
      canvas.hidden = true;
      return;
    }
    const image = photo.image;
    canvas.width = image.naturalWidth;
    canvas.height = image.naturalHeight;
    const context = canvas.getContext("2d");
    context.drawImage(image, 0, 0);
    const side = Math.max(canvas.width, canvas.height);
    const line = Math.max(2, Math.round(side / 160));
    const fontSize = Math.max(12, Math.round(side / 26));
    const pad = Math.round(fontSize / 4);
    context.font = `600 ${fontSize}px system-ui, sans-serif`;
    context.textBaseline = "top";
    for (const face of faces) {
      const [x, y, w, h] = face.box;
      context.lineWidth = line;
      context.strokeStyle = face.color;
      context.strokeRect(x, y, w, h);
      const width = context.measureText(face.label).width + 2 * pad;
      const height = fontSize + 2 * pad;
      let top = y - height - line / 2;
      if (top < 0) top = Math.min(y + h + line / 2, canvas.height - height);
      const left = Math.max(0, Math.min(x - line / 2, canvas.width - width));
      context.fillStyle = face.color;
      context.fillRect(left, top, width, height);
      context.fillStyle = "#ffffff";
      context.fillText(face.label, left + pad, top + pad);
    }
    canvas.dataset.faces = String(faces.length);
    canvas.setAttribute("aria-label", faces.length ? faces.map((f) => f.label).join("; ") : "No face found");
    canvas.hidden = false;
  }

  function definitionList(rows) {
    return el("dl", { class: "facts" }, ...rows.flatMap(([term, value, testid]) => [
      el("dt", {}, term),
      el("dd", { "data-testid": testid || null }, value),
    ]));
  }

  // --- actions ------------------------------------------------------------------------------------------

  async function register() {
    const name = $("register-name").value.trim();
    if (!name) throw new DemoError("NAME_MISSING", "Type the person's name.");
    if (!state.photos.length) {
      throw new DemoError("NO_PHOTO", "Capture or upload at least one photo (three work best).");
    }
    const form = new FormData();
    form.append("name", name);
    for (const photo of state.photos) form.append("files", photo.blob, photo.name);
    form.append("allow_duplicate", String($("register-allow-duplicate").checked));
    if ($("register-liveness").checked) form.append("liveness", "true");
    const outcome = await callApi("api/register", { method: "POST", form, withCollection: true });
    const user = outcome.user;
    const children = [
      el(
        "p",
        { class: "verdict ok" },
        "Registered ",
        el("strong", { id: "register-user-name", "data-testid": "register-user-name" }, user.name),
      ),
      definitionList([
        ["Faces stored", String(user.faces), "register-faces"],
        ["Collection", user.collection],
        ["User id", el("code", {}, user.id)],
      ]),
    ];
    if (outcome.rejected && outcome.rejected.length) {
      children.push(
        el("p", { class: "muted" }, `${outcome.rejected.length} photo(s) not used:`),
        el(
          "ul",
          { class: "rejected", "data-testid": "register-rejected" },
          ...outcome.rejected.map((r) =>
            el("li", {}, `${r.file}: `, el("strong", {}, r.error.code), ` ${r.error.message}`),
          ),
        ),
      );
    }
    $("result-register").replaceChildren(...children);
    refreshStatus();
    refreshCollections();
  }

  async function identify() {
    const photo = selectedPhoto();
    const form = new FormData();
    form.append("file", photo.blob, photo.name);
    const threshold = $("identify-threshold").value.trim();
    if (threshold) form.append("threshold", threshold);
    form.append("top_k", "3");
    if ($("identify-below-threshold").checked) form.append("include_below_threshold", "true");
    const outcome = await callApi("api/verify", { method: "POST", form, withCollection: true });
    const verdict = outcome.verified
      ? el(
          "p",
          { class: "verdict ok" },
          "Match: ",
          el("strong", { id: "identify-name", "data-testid": "identify-name" }, outcome.user.name),
        )
      : el("p", { class: "verdict warn", id: "identify-no-match", "data-testid": "identify-no-match" }, "No match");
    const children = [
      verdict,
      definitionList([
        ["Similarity", fixed(outcome.similarity), "identify-similarity"],
        ["Threshold", fixed(outcome.threshold), "identify-threshold-used"],
      ]),
    ];
    if (outcome.candidates.length) {
      children.push(
        el("p", { class: "muted" }, "Closest users:"),
        el(
          "ol",
          { class: "candidates" },
          ...outcome.candidates.map((c) => el("li", {}, `${c.name} · ${fixed(c.similarity)}`)),
        ),
      );
    } else if (outcome.similarity === null || outcome.similarity === undefined) {
      children.push(el("p", { class: "muted" }, "Nobody is registered in this collection yet."));
    }
    $("result-identify").replaceChildren(...children);
    const label = outcome.verified ? `${outcome.user.name} ${fixed(outcome.similarity, 2)}` : "no match";
    drawFaces($("identify-canvas"), photo, [
      { box: outcome.face.box, label, color: outcome.verified ? MATCH_COLOR : UNKNOWN_COLOR },
    ]);
  }

  function setCompareSlot(slot, photo) {
    state.compare[slot] = photo;
    const preview = $(`compare-preview-${slot}`);
    preview.src = photo.url;
    preview.alt = `Photo ${slot.toUpperCase()}: ${photo.name}`;
    preview.hidden = !photo.image;
    $(`compare-empty-${slot}`).textContent = photo.image ? "" : photo.name;
  }

  async function compare() {
    const { a, b } = state.compare;
    if (!a || !b) throw new DemoError("NO_PHOTO", "Choose photo A and photo B first.");
    const form = new FormData();
    form.append("image1", a.blob, a.name);
    form.append("image2", b.blob, b.name);
    const outcome = await callApi("api/compare", { method: "POST", form });
    $("result-compare").replaceChildren(
      el(
        "p",
        { class: `verdict ${outcome.verified ? "ok" : "warn"}`, "data-testid": "compare-verdict" },
        outcome.verified ? "Same person" : "Different people",
      ),
      definitionList([
        ["Similarity", fixed(outcome.similarity), "compare-similarity"],
        ["Threshold", fixed(outcome.threshold), "compare-threshold"],
      ]),
    );
  }

  async function emotion() {
    const photo = selectedPhoto();
    const form = new FormData();
    form.append("file", photo.blob, photo.name);
    form.append("all_faces", String($("emotion-all-faces").checked));
    const outcome = await callApi("api/emotion", { method: "POST", form });
    const faces = outcome.faces;
    const colorOf = (face) => EMOTION_COLORS[face.dominant_emotion] || "#333333";
    drawFaces(
      $("emotion-canvas"),
      photo,
      faces.map((face, index) => ({
        box: face.box,
        label: `${index + 1} ${face.dominant_emotion} ${percent(face.emotions[face.dominant_emotion])}`,
        color: colorOf(face),
      })),
    );
    $("result-emotion").replaceChildren(
      faces.length
        ? el(
            "ol",
            { class: "faces" },
            ...faces.map((face) => {
              const ranked = Object.entries(face.emotions).sort((x, y) => y[1] - x[1]);
              const swatch = el("span", { class: "swatch", "aria-hidden": "true" });
              swatch.style.backgroundColor = colorOf(face); // CSSOM, which the page's CSP allows
              return el(
                "li",
                {
                  "data-testid": "emotion-face",
                  "data-emotion": face.dominant_emotion,
                  "data-box": face.box.join(","),
                  "data-color": colorOf(face),
                },
                swatch,
                el("strong", { class: "emotion-label" }, face.dominant_emotion),
                ` ${percent(face.emotions[face.dominant_emotion])}`,
                el(
                  "div",
                  { class: "bars" },
                  ...ranked.slice(0, 3).map(([name, value]) =>
                    el(
                      "div",
                      { class: "bar" },
                      el("span", { class: "bar-name" }, name),
                      el("meter", { min: "0", max: "1", value: value.toFixed(3), "aria-label": `${name}` }),
                      el("span", { class: "bar-value" }, percent(value)),
                    ),
                  ),
                ),
              );
            }),
          )
        : el("p", { class: "muted" }, "No face found."),
    );
  }

  async function antiSpoof() {
    const photo = selectedPhoto();
    const form = new FormData();
    form.append("file", photo.blob, photo.name);
    const outcome = await callApi("api/anti-spoof", { method: "POST", form });
    drawFaces(
      $("antispoof-canvas"),
      photo,
      outcome.faces.map((face, index) => ({
        box: face.box,
        label: `${index + 1} ${face.is_real ? "live" : "spoof"} ${fixed(face.real_score, 2)}`,
        color: face.is_real ? LIVE_COLOR : SPOOF_COLOR,
      })),
    );
    $("result-antispoof").replaceChildren(
      el(
        "p",
        {
          class: `verdict ${outcome.is_real ? "ok" : "bad"}`,
          "data-testid": "antispoof-verdict",
          "data-real": String(outcome.is_real),
        },
        outcome.is_real ? "Live face" : "Spoof: a photo or a screen",
      ),
      el(
        "ol",
        { class: "faces" },
        ...outcome.faces.map((face) =>
          el(
            "li",
            {
              "data-testid": "antispoof-face",
              "data-real": String(face.is_real),
              "data-box": face.box.join(","),
              "data-color": face.is_real ? LIVE_COLOR : SPOOF_COLOR,
            },
            el("strong", {}, face.is_real ? "live" : "spoof"),
            ` · real_score ${fixed(face.real_score)}`,
          ),
        ),
      ),
    );
  }

  // --- wiring -------------------------------------------------------------------------------------------

  function onSubmit(formId, buttonId, resultId, canvasId, context, work) {
    $(formId).addEventListener("submit", (event) => {
      event.preventDefault();
      if (canvasId) $(canvasId).hidden = true; // no stale drawing next to a new result or error
      runAction(context, $(buttonId), $(resultId), work);
    });
  }

  function init() {
    const keyField = $("api-key");
    keyField.value = sessionStorage.getItem(KEY_STORAGE) || "";
    keyField.addEventListener("change", () => {
      const key = apiKey();
      if (key) sessionStorage.setItem(KEY_STORAGE, key);
      else sessionStorage.removeItem(KEY_STORAGE);
      refreshCollections();
    });

    $("error-dismiss").addEventListener("click", clearError);
    $("collection-create").addEventListener("click", createCollection);
    $("camera-start").addEventListener("click", startCamera);
    $("camera-stop").addEventListener("click", stopCamera);
    $("capture").addEventListener("click", capture);
    $("photos-clear").addEventListener("click", () => {
      state.photos.splice(0).forEach(forgetPhoto);
      state.selectedId = null;
      renderPhotos();
    });
    $("file-input").addEventListener("change", async (event) => {
      const input = event.target;
      for (const file of Array.from(input.files)) await addPhoto(file, file.name, "upload");
      input.value = ""; // the same file can be chosen again
    });
    for (const slot of ["a", "b"]) {
      $(`compare-use-${slot}`).addEventListener("click", () => {
        clearError();
        try {
          setCompareSlot(slot, selectedPhoto());
        } catch (error) {
          showError(error, "Compare");
        }
      });
      $(`compare-file-${slot}`).addEventListener("change", async (event) => {
        const file = event.target.files[0];
        if (!file) return;
        const url = URL.createObjectURL(file);
        setCompareSlot(slot, { blob: file, name: file.name, url, image: await loadImage(url) });
        event.target.value = "";
      });
    }

    $("connection-form").addEventListener("submit", (event) => event.preventDefault());
    onSubmit("register-form", "register-button", "result-register", null, "Register", register);
    onSubmit("identify-form", "identify-button", "result-identify", "identify-canvas", "Identify", identify);
    onSubmit("compare-form", "compare-button", "result-compare", null, "Compare", compare);
    onSubmit("emotion-form", "emotion-button", "result-emotion", "emotion-canvas", "Emotion", emotion);
    onSubmit("antispoof-form", "antispoof-button", "result-antispoof", "antispoof-canvas", "Anti-spoofing", antiSpoof);

    renderPhotos();
    refreshStatus();
    refreshCollections();
    document.body.dataset.ready = "true";
  }

  init();
})();
