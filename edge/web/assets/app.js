// The live page of edge (docs/web.md): every camera's live picture, the device's health, and
// a zone and line editor. Plain JavaScript, no build step, nothing loaded from elsewhere.
"use strict";

const TOKEN = new URLSearchParams(location.search).get("token");
const FPS = 5;                  // frames/s asked of each live picture
const POLL_MS = 2000;           // cameras' figures and health
const cards = new Map();        // camera name -> its card's state

function withToken(path) {
  if (!TOKEN) return path;
  return path + (path.includes("?") ? "&" : "?") + "token=" + encodeURIComponent(TOKEN);
}

async function api(method, path, body) {
  const options = {method: method, headers: {}, cache: "no-store"};
  if (TOKEN) options.headers["Authorization"] = "Bearer " + TOKEN;
  if (body !== undefined) {
    options.headers["Content-Type"] = "application/json";
    options.body = JSON.stringify(body);
  }
  const response = await fetch(path, options);
  let doc = null;
  try { doc = await response.json(); } catch (e) { doc = null; }
  if (!response.ok) {
    const error = new Error((doc && doc.error) || (response.status + " " + response.statusText));
    error.status = response.status;
    throw error;
  }
  return doc;
}

function el(tag, attributes, text) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attributes || {})) node.setAttribute(key, value);
  if (text !== undefined) node.textContent = text;
  return node;
}

function path(name, rest) {
  return "/api/cameras/" + encodeURIComponent(name) + rest;
}

// -- a camera's card ------------------------------------------------------------------

function makeCard(camera) {
  const node = document.getElementById("camera-card").content.firstElementChild.cloneNode(true);
  node.id = "camera-" + camera.name;
  node.dataset.camera = camera.name;
  node.querySelector(".name").textContent = camera.name;
  const card = {
    name: camera.name, node: node, tracked: camera.tracked, labels: null,
    img: node.querySelector("img.live"), shape: node.querySelector("polyline.shape"),
    form: node.querySelector("form.editor"), message: node.querySelector(".message"),
    kind: null, points: [], zones: [], lines: [],
  };
  card.img.src = withToken(path(camera.name, "/stream?fps=" + FPS));
  card.img.addEventListener("error", () => {
    // refused (busy) or cut: ask again a little later
    setTimeout(() => { card.img.src = withToken(path(camera.name, "/stream?fps=" + FPS +
                                                      "&t=" + Date.now())); }, 3000);
  });
  node.querySelector(".view").addEventListener("click", (event) => addPoint(card, event));
  node.querySelector(".draw-zone").addEventListener("click", () => startDrawing(card, "zones"));
  node.querySelector(".draw-line").addEventListener("click", () => startDrawing(card, "lines"));
  node.querySelector(".undo").addEventListener("click", () => {
    card.points.pop();
    showDraft(card);
  });
  node.querySelector(".cancel").addEventListener("click", () => stopDrawing(card));
  card.form.addEventListener("submit", (event) => {
    event.preventDefault();
    save(card);
  });
  if (!camera.tracked) {
    for (const button of node.querySelectorAll(".tools button")) button.disabled = true;
    say(card, "Not tracked: set a detector and track.enabled: true for zones and lines.");
  }
  document.getElementById("cameras").appendChild(node);
  cards.set(camera.name, card);
  if (camera.tracked) loadRegions(card);
  return card;
}

function say(card, text, bad) {
  card.message.textContent = text || "";
  card.message.classList.toggle("error", !!bad);
}

function showFigures(card, camera) {
  const state = card.node.querySelector(".state");
  state.textContent = camera.state;
  state.dataset.state = camera.state;
  const size = camera.width ? camera.width + "\u00d7" + camera.height : "no frame yet";
  card.node.querySelector(".fps").textContent =
    (camera.fps === null ? "- fps" : camera.fps.toFixed(1) + " fps") + ", " + size;
  card.width = camera.width;
  card.height = camera.height;
}

// -- zones and lines --------------------------------------------------------------------

async function loadRegions(card) {
  try {
    card.zones = await api("GET", path(card.name, "/zones"));
    card.lines = await api("GET", path(card.name, "/lines"));
    showItems(card);
    if (card.labels === null) {
      card.labels = (await api("GET", path(card.name, "/labels"))).labels;
      const select = card.node.querySelector("select.labels");
      for (const label of card.labels) select.appendChild(el("option", {value: label}, label));
    }
  } catch (error) {
    say(card, error.message, true);
  }
}

function describe(item) {
  const where = item.points.map((p) => "(" + p.map((v) => +v.toFixed(3)).join(", ") + ")");
  let text = item.name + (item.normalized ? "" : " px") + ": " + where.join(" ");
  if (item.direction && item.direction !== "both") text += ", " + item.direction;
  text += item.labels ? ", " + item.labels.join(", ") : ", every label";
  return text;
}

function showItems(card) {
  const list = card.node.querySelector("ul.items");
  list.textContent = "";
  for (const kind of ["zones", "lines"]) {
    for (const item of card[kind]) {
      const row = el("li", {"data-kind": kind, "data-name": item.name});
      row.appendChild(el("span", {"class": "kind"}, kind === "zones" ? "zone" : "line"));
      row.appendChild(el("span", {"class": "what"}, describe(item)));
      const button = el("button", {type: "button", "class": "delete"}, "Delete");
      button.addEventListener("click", () => remove(card, kind, item.name));
      row.appendChild(button);
      list.appendChild(row);
    }
  }
}

function startDrawing(card, kind) {
  card.kind = kind;
  card.points = [];
  card.form.hidden = false;
  card.node.classList.add("drawing");
  card.node.querySelector(".direction-field").hidden = kind !== "lines";
  card.node.querySelector(".hint").textContent = kind === "zones"
    ? "Click the corners of the zone (3 or more), then name it and save."
    : "Click the line's two ends, then name it and save.";
  say(card, "");
  showDraft(card);
  card.node.querySelector(".item-name").focus();
}

function stopDrawing(card) {
  card.kind = null;
  card.points = [];
  card.form.hidden = true;
  card.node.classList.remove("drawing");
  card.node.querySelector(".hint").textContent = "";
  showDraft(card);
}

function addPoint(card, event) {
  if (!card.kind) return;
  if (card.kind === "lines" && card.points.length >= 2) return;
  const box = card.img.getBoundingClientRect();
  if (!box.width || !box.height) return;
  const clamp = (v) => Math.min(1, Math.max(0, v));
  const x = clamp((event.clientX - box.left) / box.width);
  const y = clamp((event.clientY - box.top) / box.height);
  card.points.push([+x.toFixed(4), +y.toFixed(4)]);
  showDraft(card);
}

function showDraft(card) {
  const points = card.points.slice();
  if (card.kind === "zones" && points.length > 2) points.push(points[0]);
  card.shape.setAttribute("points", points.map((p) => p[0] + "," + p[1]).join(" "));
  card.shape.dataset.count = card.points.length;
}

async function put(card, kind, items) {
  card[kind] = await api("PUT", path(card.name, "/" + kind), items);
  showItems(card);
}

async function save(card) {
  const kind = card.kind;
  const name = card.node.querySelector(".item-name").value.trim();
  const need = kind === "zones" ? 3 : 2;
  if (card.points.length < need) {
    say(card, "Click " + need + (kind === "zones" ? " or more points" : " points") +
        " on the picture first (" + card.points.length + " so far).", true);
    return;
  }
  const labels = Array.from(card.node.querySelector("select.labels").selectedOptions,
                            (option) => option.value);
  const item = {name: name, points: card.points, normalized: true,
                labels: labels.length ? labels : null};
  if (kind === "lines") item.direction = card.node.querySelector("select.direction").value;
  const items = card[kind].filter((other) => other.name !== name).concat([item]);
  try {
    await put(card, kind, items);
    say(card, "Saved " + (kind === "zones" ? "zone " : "line ") + name + ": it counts from the next frame.");
    stopDrawing(card);
  } catch (error) {
    say(card, error.message, true);
  }
}

async function remove(card, kind, name) {
  try {
    await put(card, kind, card[kind].filter((item) => item.name !== name));
    say(card, "Deleted " + name + ".");
  } catch (error) {
    say(card, error.message, true);
  }
}

// -- health -----------------------------------------------------------------------------

function fixed(value, digits, unit) {
  return typeof value === "number" ? value.toFixed(digits) + (unit || "") : "-";
}

function showHealth(report) {
  document.getElementById("device").textContent = report.device;
  const verdict = document.getElementById("verdict");
  verdict.textContent = report.state;
  verdict.dataset.state = report.state;
  document.getElementById("uptime").textContent = "up " + Math.round(report.uptime_s) + " s";
  const reasons = document.getElementById("reasons");
  reasons.textContent = "";
  for (const reason of report.verdict.reasons) reasons.appendChild(el("li", {}, reason));
  const rows = [];
  for (const [name, task] of Object.entries(report.tasks)) {
    rows.push(["task " + name, fixed(task.fps, 1, " fps") + ", queue " + task.queue +
               ", dropped " + task.dropped + (task.error ? ", " + task.error : "")]);
  }
  if (report.mqtt) {
    rows.push(["mqtt", (report.mqtt.connected ? "connected" : "not connected") +
               ", queue " + report.mqtt.queue + ", sent " + report.mqtt.sent]);
  }
  const system = report.system || {};
  if (Array.isArray(system.cpu_percent)) {     // per core
    rows.push(["cpu", system.cpu_percent.map((v) => fixed(v, 0, "%")).join(" ")]);
  }
  if (system.memory) rows.push(["memory", fixed(system.memory.used_percent, 0, "% used")]);
  for (const [name, celsius] of Object.entries(system.temperatures || {})) {
    rows.push(["temperature " + name, fixed(celsius, 1, " \u00b0C")]);
  }
  const body = document.querySelector("#figures tbody");
  body.textContent = "";
  for (const [key, value] of rows) {
    const row = el("tr");
    row.appendChild(el("th", {}, key));
    row.appendChild(el("td", {}, value));
    body.appendChild(row);
  }
  document.getElementById("report").textContent = JSON.stringify(report, null, 2);
}

// -- polling ----------------------------------------------------------------------------

async function poll() {
  try {
    const doc = await api("GET", "/api/cameras");
    for (const camera of doc.cameras) {
      const card = cards.get(camera.name) || makeCard(camera);
      showFigures(card, camera);
    }
    showHealth(await api("GET", "/api/health"));
  } catch (error) {
    const verdict = document.getElementById("verdict");
    verdict.textContent = error.status === 503 ? "starting" : "unreachable";
    verdict.dataset.state = "degraded";
    verdict.title = error.message;
  }
  setTimeout(poll, POLL_MS);
}

poll();
