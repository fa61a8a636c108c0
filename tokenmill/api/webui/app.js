// The chat page: conversations on the left, the open one on the right, replies streamed from
// /v1/chat/completions. Only api.js talks to the server; store.js keeps what survives a reload.
import { Api, ApiError } from "./api.js";
import { renderMarkdown } from "./markdown.js";
import * as store from "./store.js";

const $ = (id) => document.getElementById(id);
const ui = {
  sidebar: $("sidebar"), list: $("conversations"), newChat: $("new-chat"), toggle: $("toggle-sidebar"),
  model: $("model"), system: $("system"), temperature: $("temperature"), topP: $("top_p"),
  maxTokens: $("max_tokens"), schema: $("schema"), messages: $("messages"), notice: $("notice"),
  composer: $("composer"), input: $("input"), send: $("send"), stop: $("stop"),
  keyDialog: $("key-dialog"), keyForm: $("key-form"), keyInput: $("key-input"), keyError: $("key-error"),
};
const SETTING_FIELDS = { system: ui.system, temperature: ui.temperature, top_p: ui.topP,
  max_tokens: ui.maxTokens, schema: ui.schema };

const api = new Api(store.loadKey());
let conversations = store.loadConversations();
let current = null; // the open conversation; null: a new one, saved at its first message
let controller = null; // the AbortController of the reply streaming now

// ---- the server: models and the API key -------------------------------------------------------------

async function connect() {
  try {
    const ids = await api.models();
    const wanted = ui.model.value || store.loadSettings().model;
    ui.model.replaceChildren(...ids.map((id) => new Option(id, id)));
    if (ids.includes(wanted)) ui.model.value = wanted;
    hideNotice();
  } catch (e) {
    if (e.status === 401) askForKey(e.message);
    else showNotice(`Cannot list the models: ${describe(e)}`);
  }
}

function askForKey(message) {
  ui.keyError.textContent = message;
  if (!ui.keyDialog.open) ui.keyDialog.showModal();
  ui.keyInput.focus();
}

ui.keyDialog.addEventListener("cancel", () => showNotice("This server needs an API key: reload the page to give it."));

ui.keyForm.addEventListener("submit", async (event) => {
  event.preventDefault();
  ui.keyError.textContent = "";
  api.key = ui.keyInput.value.trim();
  store.saveKey(api.key);
  ui.keyDialog.close();
  await connect(); // a wrong key opens the dialog again, with the server's 401 message
});

// ---- conversations ----------------------------------------------------------------------------------

function save() {
  conversations.sort((a, b) => b.updated - a.updated);
  store.saveConversations(conversations);
  renderSidebar();
}

function open(conversation) {
  stop();
  current = conversation;
  document.body.classList.remove("sidebar-open");
  renderSidebar();
  renderMessages();
  ui.input.focus();
}

function remove(conversation) {
  if (conversation === current) open(null);
  conversations = conversations.filter((c) => c !== conversation);
  save();
}

function renderSidebar() {
  ui.list.replaceChildren(...conversations.map((c) => {
    const item = document.createElement("li");
    if (c === current) item.className = "current";
    const title = button(c.title, () => open(c), "title");
    const del = button("\u00d7", () => remove(c), "delete");
    del.setAttribute("aria-label", `Delete conversation: ${c.title}`);
    item.append(title, del);
    return item;
  }));
}

function button(label, onClick, className) {
  const b = document.createElement("button");
  b.type = "button";
  b.textContent = label;
  b.className = className;
  b.addEventListener("click", onClick);
  return b;
}

// ---- messages ---------------------------------------------------------------------------------------

function renderMessages() {
  const messages = current ? current.messages : [];
  const lastUser = messages.findLastIndex((m) => m.role === "user");
  ui.messages.replaceChildren(...messages.map((m, i) => {
    const node = document.createElement("article");
    node.className = `msg ${m.role}`;
    const content = document.createElement("div");
    content.className = "content";
    const footer = document.createElement("footer");
    node.append(content, footer);
    fillMessage(node, m);
    if (!controller && i === messages.length - 1 && m.role === "assistant") {
      footer.append(button("Regenerate", regenerate, "action"));
    }
    if (!controller && i === lastUser) footer.append(button("Edit", editLast, "action"));
    return node;
  }));
  if (!messages.length) {
    const hint = document.createElement("p");
    hint.className = "empty";
    hint.textContent = "Ask anything. Replies stream from this server's /v1/chat/completions.";
    ui.messages.append(hint);
  }
  ui.messages.scrollTop = ui.messages.scrollHeight;
}

// A message's text, and under a reply its stats or error; called again as a reply streams in.
function fillMessage(node, m) {
  node.querySelector(".content").replaceChildren(m.role === "assistant" ? renderMarkdown(m.content) : m.content);
  node.querySelectorAll(".stats, .error").forEach((n) => n.remove());
  const footer = node.querySelector("footer");
  if (m.error) footer.prepend(line("error", m.error));
  if (m.role === "assistant" && (m.stats || m.stopped)) footer.prepend(line("stats", statsText(m)));
}

function line(className, text) {
  const p = document.createElement("p");
  p.className = className;
  p.textContent = text;
  return p;
}

function statsText(m) {
  const parts = m.stats?.model ? [m.stats.model] : [];
  if (m.stats?.ttftMs != null) parts.push(`TTFT ${Math.round(m.stats.ttftMs)} ms`);
  if (m.stats?.tokensPerS != null) parts.push(`${m.stats.tokensPerS.toFixed(1)} tok/s`);
  if (m.stats?.tokens != null) parts.push(`${m.stats.tokens} tokens`);
  if (m.stopped) parts.push("stopped");
  return parts.join(" \u00b7 ");
}

// ---- sending and streaming --------------------------------------------------------------------------

function requestBody(messages) {
  const body = { messages: [] };
  if (ui.model.value) body.model = ui.model.value;
  if (ui.system.value.trim()) body.messages.push({ role: "system", content: ui.system.value });
  for (const m of messages) {
    if (m.content) body.messages.push({ role: m.role, content: m.content }); // failed replies are left out
  }
  for (const [field, input] of [["temperature", ui.temperature], ["top_p", ui.topP], ["max_tokens", ui.maxTokens]]) {
    if (input.value !== "") body[field] = Number(input.value);
  }
  if (ui.schema.value.trim()) {
    let schema;
    try {
      schema = JSON.parse(ui.schema.value);
    } catch (e) {
      throw new ApiError(`JSON schema: not valid JSON (${e.message})`);
    }
    body.response_format = { type: "json_schema", json_schema: { name: "reply", schema } };
  }
  return body;
}

async function send(text) {
  let body;
  try {
    body = requestBody([...(current?.messages ?? []), { role: "user", content: text }]);
  } catch (e) {
    showNotice(e.message); // nothing is sent, and the message stays in the box to fix
    return;
  }
  if (!current) {
    // Not crypto.randomUUID: a page opened over plain http from another host is not a secure context.
    const id = `${Date.now().toString(36)}-${Math.random().toString(36).slice(2)}`;
    current = { id, title: text.slice(0, 60), updated: Date.now(), messages: [] };
    conversations.push(current);
  }
  current.messages.push({ role: "user", content: text });
  ui.input.value = "";
  await reply(body);
}

async function regenerate() {
  current.messages.pop();
  await resend();
}

function editLast() {
  const i = current.messages.findLastIndex((m) => m.role === "user");
  ui.input.value = current.messages[i].content;
  current.messages.splice(i);
  save();
  renderMessages();
  ui.input.focus();
}

async function resend() {
  let body;
  try {
    body = requestBody(current.messages);
  } catch (e) {
    showNotice(e.message);
    renderMessages();
    return;
  }
  await reply(body);
}

// Streams the reply to `body` into a new assistant message of the open conversation.
async function reply(body) {
  hideNotice();
  const conversation = current;
  const m = { role: "assistant", content: "" };
  conversation.messages.push(m);
  conversation.updated = Date.now();
  controller = new AbortController();
  setBusy(true);
  save();
  renderMessages();
  const node = ui.messages.lastElementChild;
  const started = performance.now();
  let first = null;
  let usage = null;
  let model = body.model;
  try {
    for await (const chunk of api.streamChat(body, controller.signal)) {
      model = chunk.model || model;
      if (chunk.usage) usage = chunk.usage;
      const delta = chunk.choices?.[0]?.delta?.content;
      if (!delta) continue;
      first ??= performance.now();
      m.content += delta;
      const atBottom = ui.messages.scrollHeight - ui.messages.scrollTop - ui.messages.clientHeight < 40;
      fillMessage(node, m);
      if (atBottom) ui.messages.scrollTop = ui.messages.scrollHeight;
    }
  } catch (e) {
    if (e.name === "AbortError") m.stopped = true;
    else m.error = describe(e);
    if (e.status === 401) askForKey(e.message);
  } finally {
    m.stats = stats(model, started, first, performance.now(), usage);
    controller = null;
    setBusy(false);
    save();
    if (conversation === current) renderMessages();
  }
}

function stats(model, started, first, ended, usage) {
  const s = { model };
  if (first !== null) s.ttftMs = first - started;
  if (usage) {
    s.tokens = usage.completion_tokens;
    // Decoding speed: the tokens after the first, over the time since the first arrived.
    if (first !== null && s.tokens > 1 && ended > first) s.tokensPerS = (s.tokens - 1) / ((ended - first) / 1000);
  }
  return s;
}

function describe(e) {
  if ((e.status === 429 || e.status === 503) && e.retryAfter !== null) {
    return `Server busy, retry in ${e.retryAfter} s: ${e.message}`;
  }
  return e.status ? `Error ${e.status}: ${e.message}` : `Error: ${e.message}`;
}

function stop() {
  controller?.abort(); // the server sees the connection close and aborts the request
}

function setBusy(busy) {
  ui.send.hidden = busy;
  ui.stop.hidden = !busy;
  if (!busy) ui.input.focus();
}

function showNotice(text) {
  ui.notice.textContent = text;
  ui.notice.hidden = false;
}

function hideNotice() {
  ui.notice.hidden = true;
}

// ---- wiring -----------------------------------------------------------------------------------------

ui.composer.addEventListener("submit", (event) => {
  event.preventDefault();
  const text = ui.input.value.trim();
  if (text && !controller) send(text);
});
ui.input.addEventListener("keydown", (event) => {
  // Enter sends, Shift+Enter is a new line; not while an input method is composing a character.
  if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
    event.preventDefault();
    ui.composer.requestSubmit();
  }
});
document.addEventListener("keydown", (event) => {
  if (event.key === "Escape" && controller) stop();
});
ui.stop.addEventListener("click", stop);
ui.newChat.addEventListener("click", () => open(null));
ui.toggle.addEventListener("click", () => {
  const shown = document.body.classList.toggle("sidebar-open");
  ui.toggle.setAttribute("aria-expanded", String(shown));
});

function saveSettingsNow() {
  const settings = { model: ui.model.value };
  for (const [name, input] of Object.entries(SETTING_FIELDS)) settings[name] = input.value;
  store.saveSettings(settings);
}
for (const input of [ui.model, ...Object.values(SETTING_FIELDS)]) input.addEventListener("change", saveSettingsNow);

const saved = store.loadSettings();
for (const [name, input] of Object.entries(SETTING_FIELDS)) input.value = saved[name] ?? "";
conversations.sort((a, b) => b.updated - a.updated);
open(conversations[0] ?? null);
connect();
