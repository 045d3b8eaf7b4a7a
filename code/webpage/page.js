// The search page: one query at a time to /api/search (text: GET, music file: POST of its bytes)
// or /api/similar ("more like this"); each hit drawn with its score (/api/score) and sound (/api/audio).
"use strict";

const $ = (id) => document.getElementById(id);
let info = null;
const RECORDINGS = ["audio", "mert"];  // kinds without a score

function showMessage(text) {
  $("message").textContent = text;
  $("message").hidden = !text;
}

function options() {
  const params = new URLSearchParams({ model: $("model").value, format: $("format").value, k: $("k").value || "10" });
  return params;
}

async function answer(response) {
  let body = null;
  try { body = await response.json(); } catch (e) { body = null; }
  if (!response.ok) {
    throw new Error((body && body.error) || `the server answered ${response.status} ${response.statusText}`);
  }
  return body;
}

function fileUrl(what, path) {
  return `/api/${what}?` + new URLSearchParams({ path });
}

// The score as an <img> of the SVG the server drew (an image: nothing in it runs), with what it is.
async function drawScore(hit, sheet, note) {
  try {
    const response = await fetch(fileUrl("score", hit.path));
    if (!response.ok) await answer(response);
    const image = document.createElement("img");
    image.alt = `score of ${hit.path}`;
    image.addEventListener("load", () => URL.revokeObjectURL(image.src), { once: true });
    image.src = URL.createObjectURL(await response.blob());
    sheet.appendChild(image);
    const pages = Number(response.headers.get("X-Score-Pages") || "1");
    note.textContent = response.headers.get("X-Notation") === "piano-roll"
      ? "piano roll: a MIDI file holds no notation to engrave"
      : (pages > 1 ? `first page of ${pages}` : "");
  } catch (error) {
    sheet.remove();
    note.textContent = `no score: ${error.message}`;
  }
}

function hitElement(hit) {
  const item = document.createElement("li");
  item.className = "hit";
  item.dataset.path = hit.path;
  const head = document.createElement("div");
  head.className = "head";
  const add = (tag, cls, text) => {
    const el = document.createElement(tag);
    el.className = cls;
    el.textContent = text;
    head.appendChild(el);
    return el;
  };
  add("span", "rank", `${hit.rank}.`);
  add("span", "score", hit.score.toFixed(4));
  add("span", "kind", hit.kind);
  const name = add("a", "name", hit.path);
  name.href = fileUrl("file", hit.path);
  if (hit.duplicates.length) add("span", "copies", `+${hit.duplicates.length} identical: ${hit.duplicates.join(", ")}`);
  const more = add("button", "more", "more like this");
  more.type = "button";
  more.addEventListener("click", () => run(`/api/similar?path=${encodeURIComponent(hit.path)}&${options()}`, {},
                                           `more like ${hit.path}`));
  item.appendChild(head);

  const note = document.createElement("div");
  note.className = "note";
  if (RECORDINGS.includes(hit.kind)) {
    note.textContent = hit.kind === "audio" ? "a recording: no score to draw" : "MERT features: no score, no sound";
    item.appendChild(note);
  } else {
    const sheet = document.createElement("div");
    sheet.className = "sheet";
    item.appendChild(sheet);
    item.appendChild(note);
    drawScore(hit, sheet, note);
  }
  if (hit.kind !== "mert") {
    const audio = document.createElement("audio");
    audio.controls = true;
    audio.preload = "none";
    audio.src = fileUrl("audio", hit.path);
    item.appendChild(audio);
  }
  return item;
}

function showResults(result, what) {
  const hits = $("hits");
  hits.replaceChildren(...result.results.map(hitElement));
  $("status").textContent = `${what}: ${result.results.length} best of ${result.n_indexed} pieces ` +
    `(${result.search_ms} ms), ${result.model_label}`;
}

async function run(url, init, what) {
  showMessage("");
  $("status").textContent = `searching: ${what} …`;
  $("go").disabled = true;
  try {
    showResults(await answer(await fetch(url, init)), what);
  } catch (error) {
    $("status").textContent = "";
    $("hits").replaceChildren();
    showMessage(error.message);
  } finally {
    $("go").disabled = false;
  }
}

function search(event) {
  event.preventDefault();
  const file = $("file").files[0];
  if (file) {
    if (info && file.size > info.max_upload_bytes) {
      showMessage(`${file.name} is larger than the upload limit of ${(info.max_upload_bytes / 1e6).toFixed(1)} MB`);
      return;
    }
    const params = options();
    params.set("name", file.name);
    run(`/api/search?${params}`, { method: "POST", body: file, headers: { "Content-Type": "application/octet-stream" } },
        `music like ${file.name}`);
    return;
  }
  const text = $("text").value.trim();
  if (!text) {
    showMessage("type a text to search for, or choose a music file");
    return;
  }
  const params = options();
  params.set("q", text);
  run(`/api/search?${params}`, {}, `“${text}”`);
}

async function start() {
  try {
    info = await answer(await fetch("/api/info"));
  } catch (error) {
    showMessage(error.message);
    return;
  }
  $("about").textContent = `${info.n_indexed} pieces in ${info.folder}` +
    (info.n_failed ? ` (${info.n_failed} files could not be read)` : "");
  $("about").title = info.describe.join("\n");
  for (const m of info.models) $("model").add(new Option(m.label, m.name, false, m.name === info.default_model));
  for (const f of info.formats) $("format").add(new Option(f.label, f.name));
  $("k").max = info.max_top_k;
  $("file").accept = info.upload_extensions.join(",");
  $("sound").textContent = `sound: ${info.synthesiser}`;
  // A chosen file is the query until it is cleared; typing a text clears it.
  $("text").addEventListener("input", () => { $("file").value = ""; });
  $("file").addEventListener("change", () => { if ($("file").files.length) $("text").value = ""; });
  $("query").addEventListener("submit", search);
}

start();
