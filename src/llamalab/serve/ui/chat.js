// The chat page of `llamalab serve`: plain JavaScript, no build step, nothing fetched but this
// server's own API. The conversation lives in the page (and in localStorage, so that a reload
// keeps it); each turn sends the whole conversation to /v1/chat/completions and reads the answer
// as server-sent events. Text is always inserted as text (textContent), never as HTML.
"use strict";

const $ = (id) => document.getElementById(id);
const STORE = "llamalab.chat.";
const KEY_STORE = "llamalab.apiKey";  // sessionStorage: the key is forgotten with the tab

const state = {
  model: null,
  messages: load("messages", []),  // [{role: "user"|"assistant", content}]
  controller: null,                // the AbortController of the answer being streamed
};

function load(name, fallback) {
  try {
    const v = localStorage.getItem(STORE + name);
    return v === null ? fallback : JSON.parse(v);
  } catch (e) {
    return fallback;
  }
}

function save(name, value) {
  try { localStorage.setItem(STORE + name, JSON.stringify(value)); } catch (e) { /* private mode: page-only */ }
}

function apiKey() { return $("api-key").value.trim(); }

function headers() {
  const h = { "Content-Type": "application/json" };
  if (apiKey()) h["Authorization"] = "Bearer " + apiKey();
  return h;
}

function setStatus(text) { $("status").textContent = text || ""; }

// ------------------------------------------------------------------ settings

const SETTINGS = ["system-prompt", "temperature", "top-p", "max-tokens", "seed"];

function restoreSettings() {
  const saved = load("settings", {});
  for (const id of SETTINGS) if (saved[id] !== undefined) $(id).value = saved[id];
  $("api-key").value = sessionStorage.getItem(KEY_STORE) || "";
  for (const id of SETTINGS) $(id).addEventListener("change", saveSettings);
  $("api-key").addEventListener("change", () => {
    sessionStorage.setItem(KEY_STORE, apiKey());
    if (!state.model) fetchModel();
  });
}

function saveSettings() {
  const s = {};
  for (const id of SETTINGS) s[id] = $(id).value;
  save("settings", s);
}

function showSettings(show) {
  $("settings").hidden = !show;
  $("toggle-settings").setAttribute("aria-expanded", String(show));
}

function numberOr(id, fallback) {
  const v = $(id).value.trim();
  if (v === "") return fallback;
  const n = Number(v);
  return Number.isFinite(n) ? n : fallback;
}

function askForKey(message) {
  showSettings(true);
  setStatus(message || "This server needs an API key: enter it under Settings.");
  $("api-key").focus();
}

// ------------------------------------------------------------------ messages

function render() {
  const box = $("messages");
  box.replaceChildren();
  for (const m of state.messages) box.appendChild(bubble(m.role, m.content, m.note));
}

function bubble(role, content, note) {
  const div = document.createElement("div");
  div.className = "message " + role;
  const label = document.createElement("span");
  label.className = "role";
  label.textContent = role;
  const text = document.createElement("span");
  text.className = "content";
  text.textContent = content;
  div.append(label, text);
  if (note) addNote(div, note);
  return div;
}

function addNote(div, note) {
  const n = document.createElement("span");
  n.className = "note";
  n.textContent = note;
  div.appendChild(n);
}

function scrollDown() { window.scrollTo(0, document.body.scrollHeight); }

// ------------------------------------------------------------------ the API

async function errorMessage(response) {
  try {
    const body = await response.json();
    if (body && body.error && body.error.message) return body.error.message;
  } catch (e) { /* not JSON */ }
  return "HTTP " + response.status;
}

async function fetchModel() {
  try {
    const r = await fetch("v1/models", { headers: headers() });
    if (r.status === 401) { askForKey(); return; }
    if (!r.ok) { setStatus(await errorMessage(r)); return; }
    const body = await r.json();
    state.model = body.data[0].id;
    $("model-name").textContent = state.model;
    setStatus("");
  } catch (e) {
    setStatus("The server does not answer: " + e.message);
  }
}

function requestBody() {
  const messages = [];
  const system = $("system-prompt").value.trim();
  if (system) messages.push({ role: "system", content: system });
  for (const m of state.messages) messages.push({ role: m.role, content: m.content });
  const body = {
    model: state.model, messages, stream: true, stream_options: { include_usage: true },
    temperature: numberOr("temperature", 0.7), top_p: numberOr("top-p", 0.95),
    max_tokens: Math.round(numberOr("max-tokens", 512)),
  };
  const seed = numberOr("seed", null);
  if (seed !== null) body.seed = Math.round(seed);
  return body;
}

// Reads server-sent events from a fetch response: calls onData with each `data:` payload's JSON.
async function readEvents(response, onData) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data:")) continue;
        const data = line.slice(5).trim();
        if (data === "[DONE]") return;
        onData(JSON.parse(data));
      }
    }
  }
}

async function send(text) {
  if (!state.model) {
    await fetchModel();
    if (!state.model) { $("prompt").value = text; return; }
  }
  // "New chat" while this answer streams replaces state.messages: the answer goes to its own conversation.
  const conversation = state.messages;
  conversation.push({ role: "user", content: text });
  render();
  const answer = { role: "assistant", content: "" };
  const div = bubble("assistant", "");
  div.classList.add("streaming");
  $("messages").appendChild(div);
  const content = div.querySelector(".content");
  scrollDown();

  state.controller = new AbortController();
  setBusy(true);
  const t0 = performance.now();
  let first = null, usage = null, finish = null, failed = null;
  try {
    const r = await fetch("v1/chat/completions", {
      method: "POST", headers: headers(), body: JSON.stringify(requestBody()), signal: state.controller.signal,
    });
    if (r.status === 401) {
      conversation.pop();  // not answered: the question goes back into the box
      div.remove();
      render();
      $("prompt").value = text;
      askForKey();
      return;
    }
    if (!r.ok) throw new Error(await errorMessage(r));
    await readEvents(r, (chunk) => {
      if (chunk.error) { failed = chunk.error.message; return; }
      if (chunk.usage) usage = chunk.usage;
      const choice = chunk.choices && chunk.choices[0];
      if (!choice) return;
      if (choice.delta && choice.delta.content) {
        if (first === null) first = performance.now();
        answer.content += choice.delta.content;
        content.textContent = answer.content;
        scrollDown();
      }
      if (choice.finish_reason) finish = choice.finish_reason;
    });
    if (failed) throw new Error(failed);
    const seconds = (performance.now() - t0) / 1000;
    const parts = [];
    if (usage) parts.push(usage.completion_tokens + " tokens");
    if (usage && first !== null && usage.completion_tokens > 1) {
      const rate = (usage.completion_tokens - 1) / Math.max((performance.now() - first) / 1000, 1e-3);
      parts.push(rate.toFixed(1) + " tok/s");
    }
    if (first !== null) parts.push("first token " + Math.round(first - t0) + " ms");
    if (finish === "length") parts.push("cut at max tokens");
    answer.note = parts.join(" · ") || seconds.toFixed(1) + " s";
  } catch (e) {
    if (e.name === "AbortError") {
      answer.note = "stopped";
    } else {
      conversation.pop();
      div.remove();
      render();
      $("prompt").value = text;
      const err = bubble("error", e.message);
      err.classList.add("assistant");
      $("messages").appendChild(err);
      setStatus("The request failed: " + e.message);
      return;
    }
  } finally {
    state.controller = null;
    setBusy(false);
  }
  div.classList.remove("streaming");
  conversation.push(answer);
  if (conversation !== state.messages) return;
  save("messages", state.messages);
  if (answer.note) addNote(div, answer.note);
  setStatus("");
}

function setBusy(busy) {
  $("send").hidden = busy;
  $("stop").hidden = !busy;
  $("prompt").disabled = busy;
  setStatus(busy ? "answering…" : "");
  if (!busy) $("prompt").focus();
}

// ------------------------------------------------------------------ wiring

$("composer").addEventListener("submit", (ev) => {
  ev.preventDefault();
  const text = $("prompt").value.trim();
  if (!text || state.controller) return;
  $("prompt").value = "";
  send(text);
});

$("prompt").addEventListener("keydown", (ev) => {
  if (ev.key === "Enter" && !ev.shiftKey && !ev.isComposing) {
    ev.preventDefault();
    $("composer").requestSubmit();
  }
});

// Aborting the fetch closes the connection: the server sees the disconnect and frees the slot.
$("stop").addEventListener("click", () => { if (state.controller) state.controller.abort(); });

$("new-chat").addEventListener("click", () => {
  if (state.controller) state.controller.abort();
  state.messages = [];
  save("messages", state.messages);
  render();
  setStatus("");
  $("prompt").focus();
});

$("toggle-settings").addEventListener("click", () => showSettings($("settings").hidden));

restoreSettings();
render();
fetchModel();
